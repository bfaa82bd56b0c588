"""The GRU sweep of `run.py`: `jax.lax.scan` over `equinox.nn.GRUCell` against
`deer_diffrax.scan`."""

from __future__ import annotations

import functools as ft
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
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

import deer_diffrax


# GRU: jax.lax.scan over equinox.nn.GRUCell vs deer_diffrax.scan


def gru_solvers(static, h0, deer_scan) -> tuple[Callable, Callable]:
    """`(params, xs) -> (states, stats)` by `lax.scan` and by `deer_diffrax.scan`
    (`mode=` selects the Jacobian) for the GRU whose non-array part is `static`.
    Both run the same step, which outputs every state."""

    def collect_states(params):
        gru = eqx.combine(params, static)

        def step(h, x):
            h = gru(x, h)
            return h, h

        return step

    def sequential(params, xs):
        return jax.lax.scan(collect_states(params), h0, xs)[1], jnp.asarray(0)

    def parallel(params, xs, mode):
        # `deer_diffrax.scan` has `jax.lax.scan`'s signature: the states are its
        # outputs `ys`, computed in one parallel pass after Newton has converged.
        (_, states), stats = deer_scan(
            collect_states(params),
            h0,
            xs,
            jacobian=mode,
            throw=False,
            return_stats=True,
        )
        ok = stats.result == optx.RESULTS.successful
        return states, (stats.num_newton_steps, ok)

    return sequential, parallel


def _with_grad(solve: Callable) -> Callable:
    """Value and gradient (w.r.t. the parameters) of `mean(states^2)`."""

    def loss(params, xs):
        states, stats = solve(params, xs)
        return jnp.mean(states**2), stats

    return jax.value_and_grad(loss, has_aux=True)


def run_gru(args, dtype, out: Path) -> list[dict]:
    """Time a GRU over `T` inputs: `lax.scan` vs `deer_diffrax.scan` (if present)."""
    deer_scan = getattr(deer_diffrax, "scan", None)
    if deer_scan is None:
        print(
            "\nGRU comparison skipped: `deer_diffrax.scan` does not exist in this "
            "version of deer_diffrax."
        )
        return []
    results = []
    for hidden in args.gru_hidden:
        cell = eqx.nn.GRUCell(
            args.gru_input, hidden, dtype=dtype, key=jax.random.PRNGKey(0)
        )
        params, static = eqx.partition(cell, eqx.is_array)
        sequential, parallel = gru_solvers(static, jnp.zeros(hidden, dtype), deer_scan)
        for num_steps in args.gru_lengths:
            key = jax.random.PRNGKey(num_steps)
            xs = jax.random.normal(key, (num_steps, args.gru_input), dtype)
            for pass_ in args.passes:
                if time.perf_counter() > args.deadline:
                    print("budget spent: stopping the GRU part.")
                    return results
                seq_fn = sequential if pass_ == "fwd" else _with_grad(sequential)
                try:
                    seq = measure(seq_fn, (params, xs), args.repeats, args.long_run)
                except Exception as e:
                    print(f"GRU sequential failed: {e!r}")
                    continue
                for mode in args.modes:
                    solve = ft.partial(parallel, mode=mode)
                    fn = solve if pass_ == "fwd" else _with_grad(solve)
                    row = dict(
                        T=num_steps,
                        hidden=hidden,
                        mode=mode,
                        pass_=pass_,
                        scan_s=seq.seconds,
                    )
                    try:
                        deer = measure(fn, (params, xs), args.repeats, args.long_run)
                    except Exception as e:
                        row["note"] = f"DEER failed: {type(e).__name__}: {str(e)[:200]}"
                        traceback.print_exc()
                        results.append(row)
                        continue
                    if pass_ == "fwd":
                        values, (newton, ok) = deer.output
                        reference = seq.output[0]
                    else:
                        (_, (newton, ok)), values = deer.output
                        reference = seq.output[1]
                    row.update(
                        deer_s=deer.seconds,
                        speedup=seq.seconds / deer.seconds,
                        newton=int(newton),
                        converged=bool(ok),
                        deer_mem_mib=mib(deer.temp_bytes),
                        err=rel_error(values, reference),
                        note="" if bool(ok) else "Newton did not converge",
                    )
                    results.append(row)
                    print(gru_table([row], header=len(results) == 1), flush=True)
                    write_rows(results, out, f"gru{file_suffix(args)}", gru_table)
    return results


_GRU_COLUMNS = [
    ("T", lambda r: f"{r['T']:.0e}"),
    ("hidden", lambda r: str(r["hidden"])),
    ("mode", lambda r: r["mode"]),
    ("pass", lambda r: r["pass_"]),
    ("lax.scan time", lambda r: format_seconds(r.get("scan_s"))),
    ("DEER time", lambda r: format_seconds(r.get("deer_s"))),
    ("scan/DEER", lambda r: format_value(r.get("speedup"), ".2f")),
    ("Newton its", lambda r: str(r.get("newton", "-"))),
    ("DEER mem (MiB)", lambda r: format_value(r.get("deer_mem_mib"), ".1f")),
    ("max rel err", lambda r: format_value(r.get("err"), ".1e")),
    ("note", lambda r: r.get("note", "")),
]


def gru_table(rows: list[dict], header: bool = True) -> str:
    """The GRU table as markdown."""
    return rows_table(rows, _GRU_COLUMNS, header)


# --------------------------------------------------------------------------------------
