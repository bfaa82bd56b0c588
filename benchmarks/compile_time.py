"""Compile time of a DeerSolver solve against the same sequential solve.

For each number of substeps T, the damped pendulum is solved over [0, T / 100] with
Tsit5 steps of 0.01: sequentially, and with DeerSolver in one window of T substeps
(full and diagonal Jacobians). Lowering, compiling and running are timed separately
(`jax.jit(f).lower(y0)`, `.compile()`, a call of the compiled function), each in a
fresh process so that no cache is shared; each figure is the smallest over
`--repeats` such processes (single measurements move by 20-40% on a shared machine).
Prints a markdown table.

    python benchmarks/compile_time.py [--substeps 1000 100000] [--dtype float32]
        [--repeats 3]
"""

import argparse
import json
import os
import platform
import subprocess
import sys


_CHILD = r"""
import json, sys, time
import jax
config = json.loads(sys.argv[1])
jax.config.update("jax_enable_x64", config["dtype"] == "float64")
import diffrax
import jax.numpy as jnp
import deer_diffrax

dtype = jnp.dtype(config["dtype"])
substeps = config["substeps"]
step = 0.01
t1 = substeps * step


def pendulum(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - 0.1 * y[1]])


if config["solver"] == "sequential":
    solver, dt0, max_steps = diffrax.Tsit5(), step, substeps + 1
else:
    solver = deer_diffrax.DeerSolver(
        diffrax.Tsit5(), num_substeps=substeps, jacobian=config["solver"]
    )
    dt0, max_steps = t1, 2


def solve(y0):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(pendulum),
        solver,
        jnp.asarray(0.0, dtype),
        jnp.asarray(t1, dtype),
        jnp.asarray(dt0, dtype),
        y0,
        max_steps=max_steps,
        # Compilation is what is measured: a window that does not converge must not
        # stop the one timed run.
        throw=False,
    ).ys


y0 = jnp.array([2.5, 0.0], dtype)
start = time.perf_counter()
lowered = jax.jit(solve).lower(y0)
lower = time.perf_counter() - start
start = time.perf_counter()
compiled = lowered.compile()
compile_ = time.perf_counter() - start
start = time.perf_counter()
jax.block_until_ready(compiled(y0))
run = time.perf_counter() - start
print(json.dumps(dict(lower=lower, compile=compile_, run=run)))
"""


def _measure(solver: str, substeps: int, dtype: str, repeats: int) -> dict:
    config = json.dumps(dict(solver=solver, substeps=substeps, dtype=dtype))
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, config],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")),
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: min(run[key] for run in runs) for key in runs[0]}


def main(substeps: list[int], dtype: str, repeats: int) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{platform.machine()} CPU, {os.cpu_count()} cores, {dtype}, load average "
        f"{load:.2f} at start; seconds, fastest of {repeats} fresh processes per "
        "entry\n"
    )
    print("| T | solver | lower | compile | lower+compile / sequential | first run |")
    print("|---|---|---|---|---|---|")
    for count in substeps:
        sequential = _measure("sequential", count, dtype, repeats)
        base = sequential["lower"] + sequential["compile"]
        for solver in ("sequential", "full", "diagonal"):
            times = (
                sequential
                if solver == "sequential"
                else _measure(solver, count, dtype, repeats)
            )
            total = times["lower"] + times["compile"]
            name = "Tsit5" if solver == "sequential" else f"DeerSolver ({solver})"
            print(
                f"| {count} | {name} | {times['lower']:.2f} | {times['compile']:.2f} "
                f"| {total / base:.2f} | {times['run']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--substeps", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    main(options.substeps, options.dtype, options.repeats)
