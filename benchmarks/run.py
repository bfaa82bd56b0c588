"""Benchmark `DeerSolver` against sequential Diffrax and a plain `jax.lax.scan`.

One command runs the whole comparison and writes a table and a plot:

    python benchmarks/run.py                      # CPU sizes (6-12 min, 2 cores)
    python benchmarks/run.py --large --max-seq-steps 1e4 --max-unrolled-steps 1e5
                                                  # GPU sizes (T up to 1e6)
    python benchmarks/run.py --lengths 1e5 --sizes 4 --batches 1 \
        --modes diagonal --passes fwd --no-gru --no-saveat   # one configuration

The problem is a small, contracting, forced nonlinear system

    y' = -y + 0.5 tanh(W y) + 0.5 sin(w t),     W orthogonal (n x n),

integrated with Tsit5 on a constant grid of `T` steps of size 0.01. Four solvers
compute the same discrete trajectory:

- `seq`: `diffrax.diffeqsolve(term, Tsit5(), t0, t1, (t1 - t0) / T, y0)`, the
    sequential baseline users run today;
- `scan`: a hand-written `jax.lax.scan` over `Tsit5().step` on the same grid (so a
    DEER win is never only Diffrax's loop overhead);
- `unrolled`: `jax.lax.scan` over a Tsit5 step written out stage by stage, the
    leanest sequential loop (Diffrax runs the stages of a step in an inner loop,
    which dominates its per-step cost on a GPU);
- `deer`: `diffeqsolve(term, DeerSolver(Tsit5(), num_substeps=T // windows,
    jacobian=mode), t0, t1, (t1 - t0) / windows, y0)`, by default one window.

Every run saves only the final state (`SaveAt(t1=True)`); `SaveAt(ts=...)` is a
sequential loop inside Diffrax and is benchmarked separately (`--saveat-lengths`).
"pass" is `fwd` (the final state) or `fwd+bwd` (value and gradient of
`sum(y(t1)^2)` with respect to `W`, `w` and `y0`). A batch larger than one is a
`jax.vmap` over initial conditions.

Timing: each function is compiled ahead of time (`jit(...).lower(...).compile()`),
run once as a warm-up, then run `--repeats` times (`block_until_ready`); the table
reports the median. A function whose warm-up run takes longer than `--long-run`
seconds is not repeated: the warm-up time is reported.

Long sequential baselines can be capped (`--max-seq-steps`, `--max-unrolled-steps`):
above the cap they are timed at the cap and scaled linearly in T, and the table marks
them `~`. `--from-csv` merges the CSV files of several runs into one table and plot.

A GRU comparison (`jax.lax.scan` over `equinox.nn.GRUCell` vs `deer_diffrax.scan`)
and a dense-output comparison (`SaveAt(ts=...)` vs `SaveAt(dense=True)` with
`jax.vmap(sol.evaluate)`) follow the main table.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime
import functools as ft
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


SMALL = dict(
    lengths="1e2,1e3,1e4",
    base_length="1e3",
    sizes="1,4,16,64",
    batches="1,16",
    gru_lengths="1e3,1e4",
    gru_hidden="8",
    saveat_lengths="1e3,1e4",
)
LARGE = dict(
    lengths="1e3,1e4,1e5,1e6",
    base_length="1e5",
    sizes="1,4,16,64",
    batches="1,16",
    gru_lengths="1e4,1e5,1e6",
    gru_hidden="8,32",
    saveat_lengths="1e4,1e5",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `--large` switches the size defaults to GPU sizes."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--large", action="store_true", help="GPU sizes: T up to 1e6, base T 1e5."
    )
    parser.add_argument(
        "--lengths", help="sequence lengths T swept at n=4, batch 1 (comma list)."
    )
    parser.add_argument(
        "--base-length", help="T used for the state-size and batch sweeps."
    )
    parser.add_argument("--sizes", help="state sizes n swept at the base length.")
    parser.add_argument("--batches", help="batch sizes swept at the base length.")
    parser.add_argument(
        "--base-size", type=int, default=4, help="n of the T and batch sweeps."
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="full cross product of lengths x sizes x batches instead of three "
        "one-factor sweeps.",
    )
    parser.add_argument("--modes", default="full,diagonal", help="Jacobian modes.")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd.")
    parser.add_argument(
        "--windows", type=int, default=1, help="DEER windows (Diffrax steps) over T."
    )
    parser.add_argument(
        "--deer-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra DeerSolver keyword (Python literal), e.g. damping=False; "
        "repeatable.",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats.")
    parser.add_argument(
        "--long-run",
        type=float,
        default=2.0,
        help="seconds above which a warm-up run is taken as the only timing.",
    )
    parser.add_argument(
        "--max-seq-steps",
        type=float,
        default=None,
        help="above this T x batch, time the Diffrax and lax.scan baselines at this "
        "length and scale linearly (marked ~; default: no cap).",
    )
    parser.add_argument(
        "--max-unrolled-steps",
        type=float,
        default=None,
        help="the same cap for the unrolled-RK lax.scan baseline.",
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="skip configurations whose estimated DEER memory exceeds this "
        "(default: 60 on GPU, 4 on CPU).",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which no new configuration is started.",
    )
    parser.add_argument("--no-main", action="store_true", help="skip the main sweep.")
    parser.add_argument("--no-gru", action="store_true", help="skip the GRU part.")
    parser.add_argument(
        "--no-saveat", action="store_true", help="skip the dense-output part."
    )
    parser.add_argument("--gru-lengths", help="GRU sequence lengths.")
    parser.add_argument("--gru-hidden", help="GRU hidden sizes.")
    parser.add_argument("--gru-input", type=int, default=2, help="GRU input size.")
    parser.add_argument("--saveat-lengths", help="T for the dense-output comparison.")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: benchmarks/results/<cpu|gpu>).",
    )
    parser.add_argument("--tag", default="", help="suffix for the output file names.")
    parser.add_argument(
        "--from-csv",
        nargs="+",
        default=None,
        metavar="CSV",
        help="benchmark nothing: merge these main*.csv files into one main table "
        "and plot (written to --out, default the first file's folder).",
    )
    args = parser.parse_args(argv)
    defaults = LARGE if args.large else SMALL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lengths = _int_list(args.lengths)
    args.base_length = _int_list(args.base_length)[0]
    args.sizes = _int_list(args.sizes)
    args.batches = _int_list(args.batches)
    args.modes = _str_list(args.modes)
    args.passes = _str_list(args.passes)
    args.gru_lengths = _int_list(args.gru_lengths)
    args.gru_hidden = _int_list(args.gru_hidden)
    args.saveat_lengths = _int_list(args.saveat_lengths)
    options = {}
    for item in args.deer_option:
        name, _, value = item.partition("=")
        try:
            options[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[name.strip()] = value.strip()
    args.deer_options = options
    for p in args.passes:
        if p not in ("fwd", "fwd+bwd"):
            parser.error(f"unknown pass {p!r}: use fwd and/or fwd+bwd")
    return args


# JAX is imported after the command line is read: float64 must be switched on first.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dtype == "float64":
    os.environ["JAX_ENABLE_X64"] = "1"

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402

import deer_diffrax  # noqa: E402
from deer_diffrax import DeerSolver  # noqa: E402


STEP_SIZE = 0.01  # time units per Tsit5 step: t1 = T * STEP_SIZE


# --------------------------------------------------------------------------------------
# Timing and memory


@dataclasses.dataclass
class Timing:
    """One compiled function's measurements."""

    seconds: float  # median wall time of the timed runs
    compile_seconds: float
    runs: int  # number of timed runs behind `seconds`
    temp_bytes: int | None  # XLA's buffer plan: scratch + outputs of the executable
    output: Any


def _memory_bytes(compiled) -> int | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def measure(fn: Callable, args: tuple, repeats: int, long_run: float) -> Timing:
    """Compile `fn` ahead of time, warm it up once, and time `repeats` runs."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    output = jax.block_until_ready(compiled(*args))
    warm = time.perf_counter() - start
    if warm > long_run or repeats < 1:
        return Timing(warm, compile_seconds, 1, _memory_bytes(compiled), output)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(
        float(np.median(times)),
        compile_seconds,
        len(times),
        _memory_bytes(compiled),
        output,
    )


def peak_device_bytes() -> int | None:
    """The process's peak device memory so far (`memory_stats`, GPU only)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def rel_error(output, reference) -> float:
    """`max |output - reference| / max |reference|` over all leaves."""
    num = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(*map(jax.tree.leaves, (output, reference)), strict=True)
    )
    den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(reference))
    return num / max(den, 1e-300)


# --------------------------------------------------------------------------------------
# The ODE problem and the three solvers


def vector_field(t, y, args):
    """`y' = -y + 0.5 tanh(W y) + 0.5 sin(w t)`: contracting (W orthogonal)."""
    weight, freq = args
    return -y + 0.5 * jnp.tanh(weight @ y) + 0.5 * jnp.sin(freq * t)


TERM = diffrax.ODETerm(vector_field)


def make_problem(size: int, batch: int, dtype, seed: int = 0):
    """Parameters `(W, w)` and a batch of initial conditions `y0s` (batch, n)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(size, size)))
    weight = q * np.sign(np.diag(r))  # a random orthogonal matrix
    freq = 0.5 + rng.uniform(size=size)
    y0s = rng.normal(size=(batch, size))
    params = (jnp.asarray(weight, dtype), jnp.asarray(freq, dtype))
    return params, jnp.asarray(y0s, dtype)


def time_grid(num_steps: int, dtype):
    """`t0, t1` and the grid `t_k = t0 + (t1 - t0) k / T`, computed as Diffrax's
    `ConstantStepSize` does."""
    t0 = jnp.asarray(0.0, dtype)
    t1 = jnp.asarray(num_steps * STEP_SIZE, dtype)
    fractions = jnp.arange(num_steps + 1, dtype=dtype) / jnp.asarray(num_steps, dtype)
    ts = (t0 + (t1 - t0) * fractions).at[-1].set(t1)
    return t0, t1, ts


def solve_sequential(y0, params, num_steps: int):
    """Sequential Diffrax: `num_steps` Tsit5 steps, final state only."""
    t0, t1, _ = time_grid(num_steps, y0.dtype)
    sol = diffrax.diffeqsolve(
        TERM,
        diffrax.Tsit5(),
        t0,
        t1,
        (t1 - t0) / num_steps,
        y0,
        params,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=num_steps + 1,
    )
    return sol.ys[-1], jnp.asarray(sol.stats["num_steps"])


def solve_scan(y0, params, num_steps: int):
    """A hand-written `jax.lax.scan` over `Tsit5().step` on the same grid (first same
    as last: the state carries the last stage, as Diffrax does)."""
    solver = diffrax.Tsit5()
    _, _, ts = time_grid(num_steps, y0.dtype)
    state = solver.init(TERM, ts[0], ts[1], y0, params)

    def body(carry, times):
        y, state = carry
        t_start, t_end = times
        y, _, _, state, _ = solver.step(
            TERM, t_start, t_end, y, params, state, made_jump=False
        )
        return (y, state), None

    (y1, _), _ = jax.lax.scan(body, (y0, state), (ts[:-1], ts[1:]))
    return y1, jnp.asarray(num_steps)


def solve_scan_unrolled(y0, params, num_steps: int):
    """The leanest sequential baseline: `jax.lax.scan` over a Tsit5 step written out
    stage by stage (Diffrax's step runs its stages in an inner loop, which costs a
    lot per step on a GPU). Same tableau and grid; equal up to rounding."""
    tableau = diffrax.Tsit5.tableau
    dtype = y0.dtype
    _, _, ts = time_grid(num_steps, dtype)
    # Stages 1..6 give y1 (b_sol's last entry, the first-same-as-last stage, is 0).
    num_stages = int(np.count_nonzero(np.asarray(tableau.b_sol))) + 1
    b_sol = [float(b) for b in tableau.b_sol[: num_stages - 1]]
    b_sol += [0.0] * (num_stages - len(b_sol))

    def body(y, times):
        t_start, t_end = times
        dt = t_end - t_start
        ks = [vector_field(t_start, y, params)]
        for c, a in zip(tableau.c[: num_stages - 1], tableau.a_lower, strict=False):
            increment = sum(float(a_j) * k for a_j, k in zip(a, ks, strict=True))
            ks.append(vector_field(t_start + float(c) * dt, y + dt * increment, params))
        y = y + dt * sum(b * k for b, k in zip(b_sol, ks, strict=True) if b != 0)
        return y, None

    y1, _ = jax.lax.scan(body, y0, (ts[:-1], ts[1:]))
    return y1, jnp.asarray(num_steps)


def solve_deer(y0, params, num_steps: int, mode: str, windows: int, options=None):
    """DeerSolver: `windows` Diffrax steps of `num_steps // windows` parallel
    substeps each. Returns the final state and `(newton_iterations, ok)`."""
    t0, t1, _ = time_grid(num_steps, y0.dtype)
    solver = DeerSolver(
        diffrax.Tsit5(),
        num_substeps=num_steps // windows,
        jacobian=mode,
        **(options or {}),
    )
    sol = diffrax.diffeqsolve(
        TERM,
        solver,
        t0,
        t1,
        (t1 - t0) / windows,
        y0,
        params,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=windows + 1,
        throw=False,
    )
    ok = sol.result == diffrax.RESULTS.successful
    return sol.ys[-1], (sol.solver_state.total_newton_steps, ok)


def batched(solve: Callable, batch: int) -> Callable:
    """Batch 1: the plain solve of `y0s[0]`; otherwise `jax.vmap` over `y0s`."""
    if batch == 1:
        return lambda y0s, params: jax.tree.map(
            lambda x: x[None], solve(y0s[0], params)
        )
    return jax.vmap(solve, in_axes=(0, None))


def forward(solve: Callable, batch: int) -> Callable:
    """`(y0s, params) -> (final states, stats)`."""
    return batched(solve, batch)


def forward_backward(solve: Callable, batch: int) -> Callable:
    """`(y0s, params) -> ((loss, stats), gradients)` of `mean_b sum(y_b(t1)^2)`."""
    solve_all = batched(solve, batch)

    def loss(params, y0s):
        final, stats = solve_all(y0s, params)
        return jnp.mean(jnp.sum(final**2, axis=-1)), stats

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return lambda y0s, params: grad(params, y0s)


def split_output(output, pass_: str):
    """(the values compared between solvers, the solver's stats)."""
    if pass_ == "fwd":
        final, stats = output
        return final, stats
    (loss, stats), grads = output
    return grads, stats


# --------------------------------------------------------------------------------------
# Main sweep


@dataclasses.dataclass
class Row:
    """One line of the main table."""

    T: int
    n: int
    batch: int
    mode: str
    pass_: str
    seq_s: float | None = None
    scan_s: float | None = None
    unrolled_s: float | None = None
    deer_s: float | None = None
    speedup_seq: float | None = None
    speedup_scan: float | None = None
    speedup_unrolled: float | None = None
    newton: int | None = None
    converged: bool | None = None
    deer_mem_mib: float | None = None
    seq_mem_mib: float | None = None
    gpu_peak_mib: float | None = None
    err: float | None = None
    baseline_err_vs_seq: float | None = None
    seq_extrapolated_from: int | None = None
    unrolled_extrapolated_from: int | None = None
    deer_compile_s: float | None = None
    seq_compile_s: float | None = None
    note: str = ""


ROW_FIELDS = [f.name for f in dataclasses.fields(Row)]


def configurations(args) -> list[tuple[int, int, int]]:
    """`(T, n, batch)` triples: three one-factor sweeps, or the full grid."""
    if args.grid:
        return [
            (t, n, b) for t in args.lengths for n in args.sizes for b in args.batches
        ]
    configs = [(t, args.base_size, 1) for t in args.lengths]
    configs += [(args.base_length, n, 1) for n in args.sizes]
    configs += [(args.base_length, args.base_size, b) for b in args.batches]
    unique = []
    for c in configs:
        if c not in unique:
            unique.append(c)
    return sorted(unique, key=lambda c: (c[0] * c[2] * c[1], c))


def deer_memory_estimate(num_steps: int, size: int, batch: int, itemsize: int) -> float:
    """Rough bytes of a full-Jacobian DEER window: the blocks and the associative
    scan's copies of them, plus the linearised Tsit5 stages."""
    return batch * num_steps * itemsize * (12 * size * size + 60 * size)


BASELINES = {
    "seq": solve_sequential,
    "scan": solve_scan,
    "unrolled": solve_scan_unrolled,
}


def measure_baselines(args, cache: dict, num_steps, size, batch, pass_, problem):
    """Time the sequential baselines, each at `T = num_steps` or, above its cap
    (`--max-seq-steps`, `--max-unrolled-steps`, counted as T x batch), at the cap,
    scaled linearly to `num_steps` (a sequential loop's time is linear in T).

    Returns `{name: (seconds, measured_steps, Timing)}`; cached across rows."""
    wrap = forward if pass_ == "fwd" else forward_backward
    params, y0s = problem
    found = {}
    for name, solve in BASELINES.items():
        cap = args.max_unrolled_steps if name == "unrolled" else args.max_seq_steps
        steps = num_steps
        if cap is not None and num_steps * batch > cap:
            steps = max(1, int(cap // batch))
        key = (name, steps, size, batch, pass_)
        if key not in cache:
            try:
                cache[key] = measure(
                    wrap(ft.partial(solve, num_steps=steps), batch),
                    (y0s, params),
                    args.repeats,
                    args.long_run,
                )
            except Exception as e:  # report, do not stop the sweep
                print(f"  {name} failed at T={steps}: {type(e).__name__}: {e}")
                cache[key] = None
        if cache[key] is not None:
            timing = cache[key]
            found[name] = (timing.seconds * num_steps / steps, steps, timing)
    return found


def run_main(args, dtype, out: Path, on_gpu: bool) -> list[Row]:
    """The main sweep: for every configuration and pass, time the baselines and
    DEER in each Jacobian mode."""
    rows: list[Row] = []
    cache: dict = {}
    limit = args.memory_limit_gb
    if limit is None:
        limit = 60.0 if on_gpu else 4.0
    itemsize = jnp.dtype(dtype).itemsize
    for num_steps, size, batch in configurations(args):
        problem = make_problem(size, batch, dtype)
        params, y0s = problem
        for pass_ in args.passes:
            wrap = forward if pass_ == "fwd" else forward_backward
            if time.perf_counter() > _DEADLINE:
                print(f"budget of {args.budget:.0f} s spent: stopping the sweep.")
                return rows
            base = measure_baselines(
                args, cache, num_steps, size, batch, pass_, problem
            )
            # The reference for the error column: the first baseline that was run
            # at the full length (sequential Diffrax unless it was extrapolated).
            reference = None
            for name in ("seq", "scan", "unrolled"):
                if name in base and base[name][1] == num_steps:
                    reference = name, split_output(base[name][2].output, pass_)
                    break
            for mode in args.modes:
                row = Row(num_steps, size, batch, mode, pass_)
                if "seq" in base:
                    row.seq_s, steps, timing = base["seq"]
                    row.seq_extrapolated_from = None if steps == num_steps else steps
                    row.seq_compile_s = timing.compile_seconds
                    row.seq_mem_mib = _mib(timing.temp_bytes)
                    if steps == num_steps:
                        seq_steps = int(jnp.max(split_output(timing.output, pass_)[1]))
                        if seq_steps != num_steps:
                            row.note += f"seq took {seq_steps} steps; "
                if "scan" in base:
                    row.scan_s = base["scan"][0]
                if "unrolled" in base:
                    row.unrolled_s, steps, _ = base["unrolled"]
                    row.unrolled_extrapolated_from = (
                        None if steps == num_steps else steps
                    )
                if reference is not None and reference[0] != "seq":
                    row.note += f"error vs {reference[0]}; "
                if reference is not None and "seq" in base and reference[0] == "seq":
                    errors = []
                    for name in ("scan", "unrolled"):
                        if name in base and base[name][1] == num_steps:
                            output = split_output(base[name][2].output, pass_)[0]
                            errors.append(rel_error(output, reference[1][0]))
                    row.baseline_err_vs_seq = max(errors, default=None)
                estimate = deer_memory_estimate(
                    num_steps, size if mode == "full" else 1, batch, itemsize
                )
                if pass_ == "fwd+bwd":
                    estimate *= 1.5
                if estimate > limit * 2**30:
                    row.note += f"DEER skipped: ~{estimate / 2**30:.0f} GiB estimated"
                    _emit(rows, row, out, args)
                    continue
                solve = ft.partial(
                    solve_deer,
                    num_steps=num_steps,
                    mode=mode,
                    windows=args.windows,
                    options=args.deer_options,
                )
                try:
                    deer = measure(
                        wrap(solve, batch), (y0s, params), args.repeats, args.long_run
                    )
                except Exception as e:
                    row.note += f"DEER failed: {type(e).__name__}: {str(e)[:200]}"
                    traceback.print_exc()
                    _emit(rows, row, out, args)
                    continue
                values, (newton, ok) = split_output(deer.output, pass_)
                row.deer_s = deer.seconds
                row.deer_compile_s = deer.compile_seconds
                row.deer_mem_mib = _mib(deer.temp_bytes)
                row.gpu_peak_mib = _mib(peak_device_bytes()) if on_gpu else None
                row.newton = int(jnp.max(newton))
                row.converged = bool(jnp.all(ok))
                if not row.converged:
                    row.note += "Newton did not converge; "
                if reference is not None:
                    row.err = rel_error(values, reference[1][0])
                for name, attr in (
                    ("seq", "speedup_seq"),
                    ("scan", "speedup_scan"),
                    ("unrolled", "speedup_unrolled"),
                ):
                    if name in base:
                        setattr(row, attr, base[name][0] / deer.seconds)
                _emit(rows, row, out, args)
    return rows


_INT_FIELDS = {
    "T",
    "n",
    "batch",
    "newton",
    "seq_extrapolated_from",
    "unrolled_extrapolated_from",
}
_STR_FIELDS = {"mode", "pass_", "note"}


def load_rows(paths: list[str]) -> list[Row]:
    """Rows from `main*.csv` files; a later file's row replaces an earlier one with
    the same `(T, n, batch, mode, pass)`."""
    merged: dict = {}
    for path in paths:
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                values: dict[str, Any] = {}
                for name in ROW_FIELDS:
                    text = record.get(name, "")
                    if name in _STR_FIELDS:
                        values[name] = text or ""
                    elif text in ("", "None"):
                        values[name] = None
                    elif name == "converged":
                        values[name] = text == "True"
                    elif name in _INT_FIELDS:
                        values[name] = int(float(text))
                    else:
                        values[name] = float(text)
                row = Row(**values)
                merged[(row.T, row.n, row.batch, row.mode, row.pass_)] = row
    order = {"full": 0, "diagonal": 1, "fwd": 0, "fwd+bwd": 1}
    return sorted(
        merged.values(),
        key=lambda r: (
            r.batch,
            r.n,
            r.T,
            order.get(r.pass_, 2),
            order.get(r.mode, 2),
        ),
    )


def merge_csv(args) -> None:
    """`--from-csv`: one table and plot from earlier runs' CSV files."""
    rows = load_rows(args.from_csv)
    out = Path(args.out) if args.out else Path(args.from_csv[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    title = None
    machine = Path(args.from_csv[0]).parent / "machine.json"
    if machine.exists():
        info = json.loads(machine.read_text())
        title = (
            f"{info.get('device')} ({info.get('backend')}), jax {info.get('jax')}, "
            f"diffrax {info.get('diffrax')}, {info.get('dtype')}, {info.get('date')}"
        )
    write_main(rows, out, args)
    plot_main(rows, out, args, title=title)
    print(markdown_table(rows))


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _emit(rows: list[Row], row: Row, out: Path, args) -> None:
    rows.append(row)
    print(markdown_table([row], header=len(rows) == 1), flush=True)
    write_main(rows, out, args)


# --------------------------------------------------------------------------------------
# Output


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


MAIN_HEADER = (
    "| T | n | batch | mode | pass | seq time | scan time | unrolled scan time | "
    "DEER time | seq/DEER | unrolled/DEER | Newton its | DEER mem (MiB) | "
    "max rel err | note |"
)


def _baseline_time(seconds: float | None, extrapolated_from: int | None) -> str:
    text = _fmt_time(seconds)
    return text if extrapolated_from is None else "~" + text


def markdown_table(rows: list[Row], header: bool = True) -> str:
    """The main table as markdown (`~`: a baseline timed at a shorter T and scaled)."""
    lines = []
    if header:
        lines.append(MAIN_HEADER)
        lines.append("|" + "---|" * (MAIN_HEADER.count("|") - 1))
    for r in rows:
        newton = "-" if r.newton is None else str(r.newton)
        if r.converged is False:
            newton += " (FAIL)"
        mem_text = _fmt(r.deer_mem_mib, ".1f")
        if r.gpu_peak_mib is not None:
            mem_text += f" (peak {r.gpu_peak_mib:.0f})"
        lines.append(
            f"| {r.T:.0e} | {r.n} | {r.batch} | {r.mode} | {r.pass_} | "
            f"{_baseline_time(r.seq_s, r.seq_extrapolated_from)} | "
            f"{_baseline_time(r.scan_s, r.seq_extrapolated_from)} | "
            f"{_baseline_time(r.unrolled_s, r.unrolled_extrapolated_from)} | "
            f"{_fmt_time(r.deer_s)} | {_fmt(r.speedup_seq, '.2f')} | "
            f"{_fmt(r.speedup_unrolled, '.2f')} | {newton} | {mem_text} | "
            f"{_fmt(r.err, '.1e')} | {r.note.strip().rstrip(';')} |"
        )
    return "\n".join(lines)


def _suffix(args) -> str:
    return f"_{args.tag}" if args.tag else ""


def write_main(rows: list[Row], out: Path, args) -> None:
    """`main.csv` and `main.md` (rewritten after every row)."""
    suffix = _suffix(args)
    with open(out / f"main{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(dataclasses.asdict(r))
    (out / f"main{suffix}.md").write_text(markdown_table(rows) + "\n")


def _xy(points) -> tuple[list, list]:
    return [p[0] for p in points], [p[1] for p in points]


def plot_main(rows: list[Row], out: Path, args, title: str | None = None) -> None:
    """`speedup_vs_T.png`: seq/DEER speedup and absolute times against T."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot.")
        return
    sweep = [r for r in rows if r.n == args.base_size and r.batch == 1]
    if len({r.T for r in sweep}) < 2:
        return  # nothing to plot against T
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in args.modes:
        for pass_ in args.passes:
            pts = sorted(
                (r.T, r.speedup_seq)
                for r in sweep
                if r.mode == mode and r.pass_ == pass_ and r.speedup_seq
            )
            if pts:
                style = "-" if pass_ == "fwd" else "--"
                marker = "o" if mode == "full" else "s"
                ax1.plot(*_xy(pts), style, marker=marker, label=f"{mode}, {pass_}")
    for mode in args.modes:
        pts = sorted(
            (r.T, r.speedup_unrolled)
            for r in sweep
            if r.mode == mode and r.pass_ == "fwd" and r.speedup_unrolled
        )
        if pts:
            marker = "o" if mode == "full" else "s"
            label = f"{mode}, fwd, vs unrolled-RK lax.scan"
            ax1.plot(*_xy(pts), ":", marker=marker, color="grey", label=label)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("sequence length T (Tsit5 steps, one window)")
    ax1.set_ylabel("speedup = sequential time / DEER time")
    ax1.set_title(f"DEER speedup, n = {args.base_size}, batch 1")
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    for pass_ in args.passes:
        style = "-" if pass_ == "fwd" else "--"
        series = {
            "seq (Diffrax)": lambda r: r.seq_s,
            "lax.scan": lambda r: r.scan_s,
            "lax.scan, unrolled RK": lambda r: r.unrolled_s,
        }
        for label, get in series.items():
            pts = sorted({(r.T, get(r)) for r in sweep if r.pass_ == pass_ and get(r)})
            if pts:
                ax2.plot(*_xy(pts), style, marker="x", label=f"{label}, {pass_}")
        for mode in args.modes:
            pts = sorted(
                (r.T, r.deer_s)
                for r in sweep
                if r.mode == mode and r.pass_ == pass_ and r.deer_s
            )
            if pts:
                marker = "o" if mode == "full" else "s"
                ax2.plot(*_xy(pts), style, marker=marker, label=f"DEER {mode}, {pass_}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("sequence length T")
    ax2.set_ylabel("wall time (s)")
    ax2.set_title("wall time")
    ax2.legend(fontsize=7)
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(title or _machine_line(), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"speedup_vs_T{_suffix(args)}.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
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
                if time.perf_counter() > _DEADLINE:
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
                        deer_mem_mib=_mib(deer.temp_bytes),
                        err=rel_error(values, reference),
                        note="" if bool(ok) else "Newton did not converge",
                    )
                    results.append(row)
                    print(gru_table([row], header=len(results) == 1), flush=True)
                    write_simple(results, out, f"gru{_suffix(args)}", gru_table)
    return results


def gru_table(rows: list[dict], header: bool = True) -> str:
    """The GRU table as markdown."""
    lines = []
    if header:
        lines.append(
            "| T | hidden | mode | pass | lax.scan time | DEER time | scan/DEER | "
            "Newton its | DEER mem (MiB) | max rel err | note |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['T']:.0e} | {r['hidden']} | {r['mode']} | {r['pass_']} | "
            f"{_fmt_time(r.get('scan_s'))} | {_fmt_time(r.get('deer_s'))} | "
            f"{_fmt(r.get('speedup'), '.2f')} | {r.get('newton', '-')} | "
            f"{_fmt(r.get('deer_mem_mib'), '.1f')} | {_fmt(r.get('err'), '.1e')} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
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
        if time.perf_counter() > _DEADLINE:
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
                mem_mib=_mib(timing.temp_bytes),
                err=rel_error(timing.output, reference.output),
            )
            results.append(row)
            print(saveat_table([row], header=len(results) == 1), flush=True)
            write_simple(results, out, f"saveat{_suffix(args)}", saveat_table)
    return results


def saveat_table(rows: list[dict], header: bool = True) -> str:
    """The dense-output table as markdown."""
    lines = []
    if header:
        lines.append(
            "| T (= saved points) | n | method | time | speedup vs seq SaveAt(ts) | "
            "mem (MiB) | max rel err | note |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['T']:.0e} | {r['n']} | {r['method']} | "
            f"{_fmt_time(r.get('seconds'))} | {_fmt(r.get('vs_seq_ts'), '.2f')} | "
            f"{_fmt(r.get('mem_mib'), '.1f')} | {_fmt(r.get('err'), '.1e')} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines)


def write_simple(rows: list[dict], out: Path, name: str, table) -> None:
    """`<name>.csv` and `<name>.md` for a list of dict rows."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.md").write_text(table(rows) + "\n")


# --------------------------------------------------------------------------------------
# Machine description


def _git_revision() -> str:
    try:
        root = HERE.parent
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "deer_diffrax"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("+uncommitted changes" if dirty else "")
    except Exception:
        return os.environ.get("DEER_BENCH_REVISION", "unknown")


def machine_info() -> dict:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        backend=jax.default_backend(),
        device=getattr(device, "device_kind", str(device)),
        cpu_count=os.cpu_count(),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        equinox=eqx.__version__,
        deer_diffrax=getattr(deer_diffrax, "__version__", "?"),
        revision=_git_revision(),
        x64=bool(jax.config.jax_enable_x64),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_average_1min=round(os.getloadavg()[0], 2),
    )


def _machine_line() -> str:
    info = machine_info()
    return (
        f"{info['device']} ({info['backend']}, {info['cpu_count']} CPU cores), "
        f"jax {info['jax']}, diffrax {info['diffrax']}, {info['date']}"
    )


_DEADLINE = math.inf


def main(args) -> None:
    """Run the selected parts and write everything to the output folder."""
    global _DEADLINE
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    on_gpu = jax.default_backend() == "gpu"
    default_out = HERE / "results" / ("gpu" if on_gpu else "cpu")
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    if args.budget is not None:
        _DEADLINE = time.perf_counter() + args.budget
    info = machine_info()
    info.update(
        dtype=args.dtype,
        command=" ".join(["python", "benchmarks/run.py"] + sys.argv[1:]),
        step_size=STEP_SIZE,
        deer_options={k: repr(v) for k, v in args.deer_options.items()},
    )
    (out / f"machine{_suffix(args)}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(_machine_line(), f"dtype {args.dtype}", flush=True)
    if not args.no_main:
        rows = run_main(args, dtype, out, on_gpu)
        if rows:
            print("\n" + markdown_table(rows))
            plot_main(rows, out, args)
    if not args.no_gru:
        print()
        gru_rows = run_gru(args, dtype, out)
        if gru_rows:
            print("\n" + gru_table(gru_rows))
    if not args.no_saveat:
        print()
        saveat_rows = run_saveat(args, dtype, out)
        if saveat_rows:
            print("\n" + saveat_table(saveat_rows))
    end_load = round(os.getloadavg()[0], 2)
    info["load_average_1min_at_end"] = end_load
    (out / f"machine{_suffix(args)}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nresults written to {os.path.relpath(out)}")


if __name__ == "__main__":
    if ARGS.from_csv:
        merge_csv(ARGS)
    else:
        main(ARGS)
