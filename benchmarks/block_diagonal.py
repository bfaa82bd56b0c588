"""Cost of one Newton iteration of `deer_diffrax.scan` by Jacobian mode, at n = 64.

The cell is `h <- tanh(W h + x)` with hidden size 64. One Newton iteration is the
linearisation of the residual at every step, the recovery of the blocks the mode
keeps, and the associative scan of the linearised recurrence: that is what is timed
here (jitted, best of several calls), for full, block-diagonal (blocks of 4 and 8,
read with `n` probes, or with `k` probes when the cell's Jacobian is block diagonal
by construction) and diagonal Jacobians. The Lyapunov estimate's tree product
(once per solve, on the exact blocks) is timed against one full iteration too.
Prints a markdown table of times relative to the full mode.

    python benchmarks/block_diagonal.py [--steps 1000] [--hidden 64]
"""

import argparse
import os

import jax
import jax.numpy as jnp
from _common import best_time

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

    print(
        f"T = {steps}, n = {n}, {jax.devices()[0].platform}, float32, load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print("| mode | ms per Newton iteration | / full |")
    print("|---|---|---|")
    for name, _ in modes:
        ms = 1e3 * times[name]
        print(f"| {name} | {ms:.2f} | {times[name] / times['full']:.3f} |")
    print(
        f"| Lyapunov tree product (once per solve) | {1e3 * lyapunov:.2f} | "
        f"{lyapunov / times['full']:.3f} |"
    )


if __name__ == "__main__":
    main()
