"""Quickstart: solve a damped pendulum with DeerSolver and with sequential Diffrax.

DeerSolver puts `num_substeps` Tsit5 steps into one window and solves the whole window
at once with Newton's method, each Newton step being a parallel (associative) scan.
The answer is the sequential Tsit5 solution on the same grid, to the Newton tolerance.

On a CPU DeerSolver is expected to be *slower* than the sequential solve: it does
several Newton iterations of work that is only cheap when run in parallel (GPU/TPU).
"""

import time

import diffrax
import jax
import jax.numpy as jnp

from deer_diffrax import DeerSolver


jax.config.update("jax_enable_x64", True)


def pendulum(t, y, args):
    angle, velocity = y
    return jnp.stack([velocity, -jnp.sin(angle) - args * velocity])


def main(t1=20.0, num_windows=10, num_substeps=200):
    term = diffrax.ODETerm(pendulum)
    y0 = jnp.array([2.5, 0.0])
    ts = jnp.linspace(0.0, t1, 201)
    common = dict(args=0.05, saveat=diffrax.SaveAt(ts=ts), max_steps=100_000)
    window = t1 / num_windows

    @jax.jit
    def solve_deer(y0):
        solver = DeerSolver(diffrax.Tsit5(), num_substeps=num_substeps)
        sol = diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            t1,
            window,
            y0,
            args=common["args"],
            saveat=diffrax.SaveAt(ts=ts, solver_state=True),
            max_steps=common["max_steps"],
        )
        return sol.ys, sol.solver_state

    @jax.jit
    def solve_sequential(y0):
        sol = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, t1, window / num_substeps, y0, **common
        )
        return sol.ys

    def timed(fn):
        jax.block_until_ready(fn(y0))  # compile
        start = time.perf_counter()
        out = jax.block_until_ready(fn(y0))
        return out, time.perf_counter() - start

    (ys_deer, state), time_deer = timed(solve_deer)
    ys_seq, time_seq = timed(solve_sequential)
    difference = jnp.max(jnp.abs(ys_deer - ys_seq)) / jnp.max(jnp.abs(ys_seq))

    print(
        f"Damped pendulum on [0, {t1}]: {num_windows} windows x {num_substeps} "
        "Tsit5 substeps"
    )
    print(f"  max relative difference DEER vs sequential : {float(difference):.2e}")
    print(
        f"  Newton iterations per window (max / mean)  : "
        f"{int(state.most_newton_steps)} / "
        f"{int(state.total_newton_steps) / int(state.num_windows):.1f}"
    )
    print(f"  DeerSolver time                            : {time_deer * 1e3:.1f} ms")
    print(f"  sequential Tsit5 time                      : {time_seq * 1e3:.1f} ms")
    ratio = time_deer / time_seq
    verdict = f"{ratio:.1f}x slower" if ratio >= 1 else f"{1 / ratio:.1f}x faster"
    print(
        f"  DeerSolver vs sequential                   : {verdict}"
        f" on {jax.devices()[0].platform.upper()}"
    )
    return float(difference), state


if __name__ == "__main__":
    main()
