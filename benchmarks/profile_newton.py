"""Where the time of one DEER Newton iteration goes, piece by piece.

    python benchmarks/profile_newton.py                    # T = 1e4, n = 4, CPU
    python benchmarks/profile_newton.py --lengths 1e5,1e6 --sizes 4,16

Times, for the problem of `benchmarks/run.py` (Tsit5 substeps of a forced
`-y + 0.5 tanh(W y)` system), each piece of a Newton iteration as the library does it
and as an alternative would do it:

- the residual `Y - Phi(shift(Y))`: the library's (Tsit5's stages written out from
    its tableau) against one vmapped `Tsit5.step` of Diffrax per substep (its stage
    loop with `scan_kind="bounded"`, as the library used before, and the default);
- the Jacobian blocks: the library's (`jax.linearize` of the whole residual, then
    `n` batched probes; for the diagonal mode, by default, the linearisation of an
    Euler step of the vector field, `linearise="vector_field"`) against linearising
    Diffrax's step and a per-substep `vmap(jacfwd)` / `vmap(linearize)`;
- the linear recurrence: `lax.associative_scan` (full and diagonal) against a
    sequential `lax.scan` over the same blocks;
- one whole window solve (`diffeqsolve` with `DeerSolver`), divided by its Newton
    iterations.

It uses private functions of `deer_diffrax` (`deer_diffrax._solver`), so it is a
developer tool: it may need updating when they change.
"""

from __future__ import annotations

import argparse
import functools as ft
import os
from pathlib import Path


def parse_args():
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1e4")
    parser.add_argument("--sizes", default="4")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--pieces-only",
        action="store_true",
        help="skip the whole solves (sequential and DEER), which dominate the "
        "compile and run time at large T.",
    )
    parser.add_argument("--out", default=None, help="also write the table here (.md)")
    return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dtype == "float64":
    os.environ["JAX_ENABLE_X64"] = "1"

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import best_time, compile_ahead  # noqa: E402

from deer_diffrax import DeerSolver, solve_linear_recurrence  # noqa: E402
from deer_diffrax._jacobian import DiagonalJacobian, FullJacobian  # noqa: E402
from deer_diffrax._ravel import real_ravel  # noqa: E402
from deer_diffrax._window import (  # noqa: E402
    euler_residual,
    trajectory_residual,
    transition,
    WindowInputs,
)


STEP_SIZE = 0.01


def vector_field(t, y, args):
    """The same field as `benchmarks/run.py`."""
    weight, freq = args
    return -y + 0.5 * jnp.tanh(weight @ y) + 0.5 * jnp.sin(freq * t)


def timeit(fn, *args, repeats: int) -> tuple[float, float]:
    """The best wall time of `fn(*args)`, compiled ahead, and the compile time."""
    compiled, compile_seconds = compile_ahead(fn, args)
    return best_time(compiled, args, repeats)[0], compile_seconds


def _compose_elementwise(earlier, later):
    # The library's `compose_affine` with the n x n products written as broadcast
    # multiply-and-sum instead of `matmul`: no batched-GEMM library call (and no
    # GEMM autotuning at compile time) for tiny blocks.
    a1, b1 = earlier
    a2, b2 = later
    a = jnp.sum(a2[..., :, :, None] * a1[..., None, :, :], axis=-2)
    b = jnp.sum(a2 * b1[..., None, :], axis=-1)
    return a, b + b2


def scan_elementwise(blocks, rhs):
    """`solve_linear_recurrence` for dense blocks with `_compose_elementwise`."""
    return jax.lax.associative_scan(_compose_elementwise, (blocks, rhs))[1]


def profile(
    num_steps: int, size: int, dtype, repeats: int, pieces_only: bool = False
) -> list[tuple]:
    """`(piece, seconds, compile seconds)` for one `(T, n)`."""
    rng = np.random.default_rng(0)
    q, r = np.linalg.qr(rng.normal(size=(size, size)))
    params = (
        jnp.asarray(q * np.sign(np.diag(r)), dtype),
        jnp.asarray(0.5 + rng.uniform(size=size), dtype),
    )
    y0 = jnp.asarray(rng.normal(size=size), dtype)
    term = diffrax.ODETerm(vector_field)
    t1 = num_steps * STEP_SIZE
    ts = jnp.linspace(0.0, t1, num_steps + 1, dtype=dtype)
    trajectory = jnp.broadcast_to(y0, (num_steps, size)) + 0.01
    _, unravel = real_ravel(y0)
    bounded = diffrax.Tsit5(scan_kind="bounded")
    default = diffrax.Tsit5()
    struct = jax.ShapeDtypeStruct(trajectory.shape, trajectory.dtype)

    def substeps(solver):
        # Diffrax's own `step` (the library's `_substep` now bypasses it for explicit
        # Runge-Kutta methods): the "Diffrax step" rows.
        def substep(y_prev, t_start, t_end):
            y = unravel(y_prev)
            state = solver.init(term, t_start, t_end, y, params)
            out = solver.step(term, t_start, t_end, y, params, state, made_jump=True)
            return (real_ravel(out[0])[0],)

        return substep

    def shifted(y):
        return jnp.concatenate([y0[None], y[:-1]])

    def residual(solver, y):
        step = lambda yp, a, b: substeps(solver)(yp, a, b)[0]
        return y - jax.vmap(step)(shifted(y), ts[:-1], ts[1:])

    def library_blocks(mode, y):
        res, linear_fn = jax.linearize(ft.partial(residual, bounded), y)
        return res, mode.blocks(linear_fn, struct)

    def jacfwd_full(y):
        step = lambda yp, a, b: substeps(bounded)(yp, a, b)[0]
        prev = shifted(y)
        out = jax.vmap(step)(prev, ts[:-1], ts[1:])
        blocks = jax.vmap(jax.jacfwd(step))(prev, ts[:-1], ts[1:])
        return y - out, blocks

    def linearize_diagonal(y):
        step = lambda yp, a, b: substeps(bounded)(yp, a, b)[0]
        eye = jnp.eye(size, dtype=y.dtype)

        def one(yp, a, b):
            out, jvp = jax.linearize(lambda z: step(z, a, b), yp)
            return out, jnp.diagonal(jax.vmap(jvp)(eye))

        out, diagonal = jax.vmap(one)(shifted(y), ts[:-1], ts[1:])
        return y - out, diagonal

    full_blocks = jnp.broadcast_to(
        0.99 * jnp.eye(size, dtype=dtype), (num_steps, size, size)
    )
    diagonal_blocks = jnp.full((num_steps, size), 0.99, dtype)

    def sequential_recurrence(blocks, rhs):
        def body(x, pair):
            block, r = pair
            x = (block @ x if block.ndim == 2 else block * x) + r
            return x, x

        return jax.lax.scan(body, jnp.zeros(size, dtype), (blocks, rhs))[1]

    def deer_solve(mode, y0, params):
        sol = diffrax.diffeqsolve(
            term,
            DeerSolver(diffrax.Tsit5(), num_substeps=num_steps, jacobian=mode),
            0.0,
            t1,
            t1,
            y0,
            params,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            max_steps=2,
            throw=False,
        )
        return sol.ys, sol.solver_state.total_newton_steps

    def sequential_solve(y0, params):
        return diffrax.diffeqsolve(
            term,
            default,
            0.0,
            t1,
            t1 / num_steps,
            y0,
            params,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=num_steps + 1,
        ).ys

    rows = []
    add = lambda name, fn, *a: rows.append((name, *timeit(fn, *a, repeats=repeats)))
    if not pieces_only:
        add("sequential diffeqsolve (whole solve)", sequential_solve, y0, params)
    inputs = WindowInputs(
        step=ft.partial(transition, default, term, params, unravel),
        y_start=y0,
        ts=ts,
        terms=term,
        args=params,
    )
    library_residual = lambda y: trajectory_residual(y, inputs)
    surrogate_residual = lambda y: euler_residual(unravel, y, inputs)

    def linearised_blocks(fn, mode, y):
        res, linear_fn = jax.linearize(fn, y)
        return res, mode.blocks(linear_fn, struct)

    add("residual (library: written-out stages)", library_residual, trajectory)
    add(
        "residual, Diffrax Tsit5.step, bounded loop",
        ft.partial(residual, bounded),
        trajectory,
    )
    add(
        "residual, Diffrax Tsit5.step, default",
        ft.partial(residual, default),
        trajectory,
    )
    add(
        "linearize + full blocks (library)",
        ft.partial(linearised_blocks, library_residual, FullJacobian()),
        trajectory,
    )
    add(
        "linearize + full blocks, Diffrax step",
        ft.partial(library_blocks, FullJacobian()),
        trajectory,
    )
    add(
        "diagonal blocks (library: Euler step, linearise='vector_field')",
        ft.partial(linearised_blocks, surrogate_residual, DiagonalJacobian()),
        trajectory,
    )
    add(
        "linearize + exact diagonal blocks (linearise='step')",
        ft.partial(linearised_blocks, library_residual, DiagonalJacobian()),
        trajectory,
    )
    add(
        "linearize + exact diagonal blocks, Diffrax step",
        ft.partial(library_blocks, DiagonalJacobian()),
        trajectory,
    )
    add(
        "vmap(linearize substep) diagonal, Diffrax step", linearize_diagonal, trajectory
    )
    add("vmap(jacfwd substep) full, Diffrax step", jacfwd_full, trajectory)
    scan = solve_linear_recurrence
    add("associative scan, full blocks", scan, full_blocks, trajectory)
    add(
        "associative scan, full blocks, elementwise compose",
        scan_elementwise,
        full_blocks,
        trajectory,
    )
    add(
        "associative scan, diagonal blocks",
        solve_linear_recurrence,
        diagonal_blocks,
        trajectory,
    )
    add(
        "lax.scan recurrence, full blocks",
        sequential_recurrence,
        full_blocks,
        trajectory,
    )
    add(
        "lax.scan recurrence, diagonal blocks",
        sequential_recurrence,
        diagonal_blocks,
        trajectory,
    )
    for mode in () if pieces_only else ("full", "diagonal"):
        fn = ft.partial(deer_solve, mode)
        seconds, compile_seconds = timeit(fn, y0, params, repeats=repeats)
        iterations = int(eqx.filter_jit(fn)(y0, params)[1])
        rows.append(
            (f"DEER {mode}: whole window ({iterations} its)", seconds, compile_seconds)
        )
        rows.append((f"DEER {mode}: per Newton iteration", seconds / iterations, None))
    return rows


def main(args) -> None:
    """Profile every `(T, n)` and print one markdown table."""
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    lengths = [int(float(x)) for x in args.lengths.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    device = jax.devices()[0]
    lines = [
        f"{getattr(device, 'device_kind', device)} ({jax.default_backend()}), "
        f"jax {jax.__version__}, {args.dtype}",
        "",
        "| T | n | piece | time | compile |",
        "|---|---|---|---|---|",
    ]
    for num_steps in lengths:
        for size in sizes:
            for name, seconds, compile_s in profile(
                num_steps, size, dtype, args.repeats, args.pieces_only
            ):
                compiled = "-" if compile_s is None else f"{compile_s:.1f} s"
                line = (
                    f"| {num_steps:.0e} | {size} | {name} | {seconds * 1e3:.3f} ms | "
                    f"{compiled} |"
                )
                lines.append(line)
                print(line, flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main(ARGS)
