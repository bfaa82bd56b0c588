"""The dense-output sweep of `run.py`: `SaveAt(ts=...)` against `SaveAt(dense=True)`
with `jax.vmap(sol.evaluate)`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
from _common import (
    file_suffix,
    format_seconds,
    format_value,
    measure,
    mib,
    rel_error,
    rows_table,
    write_rows,
)
from problem import (
    make_problem,
    TERM,
    time_grid,
)

import deer_diffrax
from deer_diffrax import DeerSolver


# Dense output: SaveAt(ts=...) against SaveAt(dense=True) + vmap(sol.evaluate)


def saveat_solvers(num_steps: int, dtype, options: dict) -> dict[str, Callable]:
    """Five ways to save a `num_steps`-step Tsit5 trajectory at `num_steps` times."""
    t0, t1, _ = time_grid(num_steps, dtype)
    # Times that fall between grid points, so the interpolation is exercised.
    save_ts = jnp.linspace(t0, t1, num_steps, dtype=dtype)
    sequential = (diffrax.Tsit5(), num_steps + 1, (t1 - t0) / num_steps)
    parallel = (
        DeerSolver(diffrax.Tsit5(), num_substeps=num_steps, **options),
        2,
        t1 - t0,
    )

    def solve(y0, params, method, saveat):
        solver, max_steps, dt0 = method
        return diffrax.diffeqsolve(
            TERM,
            solver,
            t0,
            t1,
            dt0,
            y0,
            params,
            saveat=saveat,
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=max_steps,
        )

    def with_ts(method):
        return lambda y0, params: (
            solve(y0, params, method, diffrax.SaveAt(ts=save_ts)).ys
        )

    def with_dense(method):
        def fn(y0, params):
            sol = solve(y0, params, method, diffrax.SaveAt(dense=True))
            return jax.vmap(sol.evaluate)(save_ts)

        return fn

    def with_deer_evaluate(method):
        def fn(y0, params):
            sol = solve(y0, params, method, diffrax.SaveAt(dense=True))
            return deer_diffrax.evaluate(sol, save_ts)

        return fn

    return {
        "seq, SaveAt(ts)": with_ts(sequential),
        "seq, dense + vmap(evaluate)": with_dense(sequential),
        "DEER full, SaveAt(ts)": with_ts(parallel),
        "DEER full, dense + vmap(evaluate)": with_dense(parallel),
        "DEER full, dense + deer_diffrax.evaluate": with_deer_evaluate(parallel),
    }


def run_saveat(args, dtype, out: Path) -> list[dict]:
    """Save the whole trajectory at `T` times, four ways, and time each."""
    results = []
    size = args.base_size
    params, y0s = make_problem(size, 1, dtype)
    y0 = y0s[0]
    for num_steps in args.saveat_lengths:
        if time.perf_counter() > args.deadline:
            print("budget spent: stopping the dense-output part.")
            return results
        methods = saveat_solvers(num_steps, dtype, args.deer_options)
        reference = None
        for name, fn in methods.items():
            row = dict(T=num_steps, n=size, method=name)
            try:
                timing = measure(fn, (y0, params), args.repeats, args.long_run)
            except Exception as e:
                row["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                results.append(row)
                continue
            if reference is None:
                reference = timing
            row.update(
                seconds=timing.seconds,
                vs_seq_ts=reference.seconds / timing.seconds,
                mem_mib=mib(timing.temp_bytes),
                err=rel_error(timing.output, reference.output),
            )
            results.append(row)
            print(saveat_table([row], header=len(results) == 1), flush=True)
            write_rows(results, out, f"saveat{file_suffix(args)}", saveat_table)
    return results


_SAVEAT_COLUMNS = [
    ("T (= saved points)", lambda r: f"{r['T']:.0e}"),
    ("n", lambda r: str(r["n"])),
    ("method", lambda r: r["method"]),
    ("time", lambda r: format_seconds(r.get("seconds"))),
    ("speedup vs seq SaveAt(ts)", lambda r: format_value(r.get("vs_seq_ts"), ".2f")),
    ("mem (MiB)", lambda r: format_value(r.get("mem_mib"), ".1f")),
    ("max rel err", lambda r: format_value(r.get("err"), ".1e")),
    ("note", lambda r: r.get("note", "")),
]


def saveat_table(rows: list[dict], header: bool = True) -> str:
    """The dense-output table as markdown."""
    return rows_table(rows, _SAVEAT_COLUMNS, header)


# --------------------------------------------------------------------------------------
