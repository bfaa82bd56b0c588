"""The main sweep of `run.py`: DeerSolver against the sequential baselines over
lengths, state sizes, batches, modes and passes; CSV, markdown table and plot."""

from __future__ import annotations

import csv
import dataclasses
import functools as ft
import json
import time
import traceback
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from _common import (
    file_suffix,
    format_seconds,
    format_value,
    machine_line,
    measure,
    mib,
    peak_device_bytes,
    rel_error,
)
from problem import (
    forward,
    forward_backward,
    make_problem,
    solve_deer,
    solve_scan,
    solve_scan_unrolled,
    solve_sequential,
    split_output,
)


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
            if time.perf_counter() > args.deadline:
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
                    row.seq_mem_mib = mib(timing.temp_bytes)
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
                row.deer_mem_mib = mib(deer.temp_bytes)
                row.gpu_peak_mib = mib(peak_device_bytes()) if on_gpu else None
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


def _emit(rows: list[Row], row: Row, out: Path, args) -> None:
    rows.append(row)
    print(markdown_table([row], header=len(rows) == 1), flush=True)
    write_main(rows, out, args)


# --------------------------------------------------------------------------------------
# Output


MAIN_HEADER = (
    "| T | n | batch | mode | pass | seq time | scan time | unrolled scan time | "
    "DEER time | seq/DEER | unrolled/DEER | Newton its | DEER mem (MiB) | "
    "max rel err | note |"
)


def _baseline_time(seconds: float | None, extrapolated_from: int | None) -> str:
    text = format_seconds(seconds)
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
        mem_text = format_value(r.deer_mem_mib, ".1f")
        if r.gpu_peak_mib is not None:
            mem_text += f" (peak {r.gpu_peak_mib:.0f})"
        lines.append(
            f"| {r.T:.0e} | {r.n} | {r.batch} | {r.mode} | {r.pass_} | "
            f"{_baseline_time(r.seq_s, r.seq_extrapolated_from)} | "
            f"{_baseline_time(r.scan_s, r.seq_extrapolated_from)} | "
            f"{_baseline_time(r.unrolled_s, r.unrolled_extrapolated_from)} | "
            f"{format_seconds(r.deer_s)} | {format_value(r.speedup_seq, '.2f')} | "
            f"{format_value(r.speedup_unrolled, '.2f')} | {newton} | {mem_text} | "
            f"{format_value(r.err, '.1e')} | {r.note.strip().rstrip(';')} |"
        )
    return "\n".join(lines)


def write_main(rows: list[Row], out: Path, args) -> None:
    """`main.csv` and `main.md` (rewritten after every row)."""
    suffix = file_suffix(args)
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
    fig.suptitle(title or machine_line(), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"speedup_vs_T{file_suffix(args)}.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
