"""Cost of one Newton iteration of `deer_diffrax.scan` by Jacobian mode, at n = 64.

The cell is `h <- tanh(W h + x)` with hidden size 64. One Newton iteration is the
linearisation of the residual at every step, the recovery of the blocks the mode
keeps, and the associative scan of the linearised recurrence: that is what is timed
here (jitted, best of several calls), for full, block-diagonal (blocks of 4 and 8,
read with `n` probes, or with `k` probes when the cell's Jacobian is block diagonal
by construction) and diagonal Jacobians. The Lyapunov estimate's tree product
(once per solve, on the exact blocks) is timed against one full iteration too.

A second table times whole `deer_diffrax.scan` solves (float32, the defaults but
the Jacobian mode) of two cells of the same size: one whose weight matrix is block
diagonal with 8 x 8 blocks (a ParaRNN-style cell, for which the block-diagonal mode
is exact Newton), and one with a dense weight matrix, where block-diagonal and
diagonal modes are quasi-Newton and finish with one exact step. Iterations and the
error against `jax.lax.scan` are printed beside the times.

Prints both tables and writes them to `benchmarks/results/block_diagonal_cpu.md`
(or `_gpu`).

    python benchmarks/block_diagonal.py [--steps 1000] [--hidden 64]
"""

import argparse
import os

import jax
import jax.numpy as jnp
from _common import (
    best_time,
    HERE,
    machine_line,
    rel_error,
    time_interleaved,
    write_result,
)

import deer_diffrax
from deer_diffrax._lyapunov import trajectory_growth
from deer_diffrax._operator import shift_in


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=64)
    options = parser.parse_args()
    n, steps = options.hidden, options.steps
    key_w, key_x, key_h = jax.random.split(jax.random.key(0), 3)
    weight = 0.9 * jax.random.normal(key_w, (n, n)) / jnp.sqrt(n)
    xs = jax.random.normal(key_x, (steps, n))
    trajectory = 0.1 * jax.random.normal(key_h, (steps, n))

    def residual(h):
        return h - jnp.tanh(shift_in(jnp.zeros(n), h) @ weight.T + xs)

    struct = jax.ShapeDtypeStruct(trajectory.shape, trajectory.dtype)

    def iteration(mode):
        @jax.jit
        def run(h):
            value, linear_fn = jax.linearize(residual, h)
            blocks = mode.blocks(linear_fn, struct)
            return deer_diffrax.solve_linear_recurrence(blocks, -value)

        return run

    modes = [
        ("full", deer_diffrax.FullJacobian()),
        ("block-diagonal, k = 8", deer_diffrax.BlockDiagonalJacobian(8)),
        ("block-diagonal, k = 4", deer_diffrax.BlockDiagonalJacobian(4)),
        (
            "block-diagonal, k = 8, structured",
            deer_diffrax.BlockDiagonalJacobian(8, structured=True),
        ),
        (
            "block-diagonal, k = 4, structured",
            deer_diffrax.BlockDiagonalJacobian(4, structured=True),
        ),
        ("diagonal", deer_diffrax.DiagonalJacobian()),
    ]
    times = {
        name: best_time(iteration(mode), (trajectory,), 7)[0] for name, mode in modes
    }
    full_blocks = jax.jit(
        lambda h: deer_diffrax.FullJacobian().blocks(
            jax.linearize(residual, h)[1], struct
        )
    )(trajectory)
    lyapunov = best_time(jax.jit(trajectory_growth), (full_blocks,), 7)[0]

    lines = [
        f"# Newton iterations by Jacobian mode, n = {n}",
        "",
        machine_line() + f", load average {os.getloadavg()[0]:.1f}.",
        "",
        f"One Newton iteration of a tanh cell, T = {steps}, float32 "
        "(`python benchmarks/block_diagonal.py`):",
        "",
        "| mode | ms per Newton iteration | / full |",
        "|---|---|---|",
    ]
    for name, _ in modes:
        ms = 1e3 * times[name]
        lines.append(f"| {name} | {ms:.2f} | {times[name] / times['full']:.3f} |")
    lines.append(
        "| Lyapunov tree product (once per solve, when asked for) | "
        f"{1e3 * lyapunov:.2f} | {lyapunov / times['full']:.3f} |"
    )
    lines += ["", *_whole_solves(n, steps, key_w, key_x)]
    text = "\n".join(lines)
    print(text)
    write_result(HERE / "results" / f"block_diagonal_{jax.default_backend()}.md", text)


def _whole_solves(n, steps, key_w, key_x):
    """Whole `scan` solves of a block-diagonal and a dense tanh cell, by mode."""
    k = 8
    dense = 0.9 * jax.random.normal(key_w, (n, n)) / jnp.sqrt(n)
    mask = jnp.kron(jnp.eye(n // k), jnp.ones((k, k)))
    blocked = 0.9 * jax.random.normal(key_w, (n, n)) / jnp.sqrt(k) * mask
    xs = jax.random.normal(key_x, (steps, n))
    modes = [
        ("full", "full"),
        (f"block-diagonal, k = {k}", deer_diffrax.BlockDiagonalJacobian(k)),
        (
            f"block-diagonal, k = {k}, structured",
            deer_diffrax.BlockDiagonalJacobian(k, structured=True),
        ),
        ("diagonal", "diagonal"),
    ]
    lines = [
        f"Whole `deer_diffrax.scan` solves, T = {steps}, float32, defaults but the "
        "Jacobian mode; the fastest of 7 interleaved rounds; error of the states "
        "against `jax.lax.scan` (relative to their largest entry):",
        "",
        "| cell | mode | ms per solve | / full | Newton iterations | error |",
        "|---|---|---|---|---|---|",
    ]
    for cell_name, weight in (
        (f"block-diagonal weights ({k} x {k} blocks)", blocked),
        ("dense weights", dense),
    ):

        def step(h, x, weight=weight):
            h = jnp.tanh(weight @ h + x)
            return h, h

        reference = jax.lax.scan(step, jnp.zeros(n), xs)[1]
        calls = {}
        for name, mode in modes:
            if cell_name == "dense weights" and name.endswith("structured"):
                continue  # the promise would be false: wrong blocks

            def solve(xs, mode=mode, step=step):
                (_, states), stats = deer_diffrax.scan(
                    step, jnp.zeros(n), xs, jacobian=mode, return_stats=True
                )
                return states, stats.num_newton_steps

            calls[name] = (jax.jit(solve), (xs,))
        times, outputs = time_interleaved(calls, 7)
        for name in calls:
            states, iterations = outputs[name]
            lines.append(
                f"| {cell_name} | {name} | {1e3 * times[name]:.2f} | "
                f"{times[name] / times['full']:.3f} | {int(iterations)} | "
                f"{rel_error(states, reference):.1e} |"
            )
    return lines


if __name__ == "__main__":
    main()
