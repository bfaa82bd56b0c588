"""Helpers shared by the benchmark scripts: ahead-of-time compilation, interleaved
timing, a description of the machine, and markdown tables.

Import it from a script in this folder (`from _common import ...`): Python puts the
script's own folder on `sys.path`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import deer_diffrax


HERE = Path(__file__).resolve().parent


def load_average() -> float:
    """The 1-minute load average (`nan` where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def git_revision() -> str:
    """The short commit of this checkout, marked when the library has uncommitted
    changes (`DEER_BENCH_REVISION` outside a git checkout)."""
    root = HERE.parent
    try:
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
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DEER_BENCH_REVISION", "unknown")
    return rev + ("+uncommitted changes" if dirty else "")


def machine_line() -> str:
    """One line saying what the numbers were measured on, and when."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    return (
        f"{kind} ({jax.default_backend()}, {os.cpu_count()} CPU cores, "
        f"{platform.machine()}), jax {jax.__version__}, deer-diffrax at "
        f"{git_revision()}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )


def compile_ahead(fn: Callable, args: tuple) -> tuple[Callable, float]:
    """`jax.jit(fn)` lowered and compiled for `args`, and the seconds that took."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_interleaved(
    calls: dict[str, tuple[Callable, tuple]], repeats: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """The shortest wall time of each compiled call over `repeats` rounds, each
    round running every call once in turn, so that a change of machine load hits
    all of them alike.

    The minimum, not the median: on a shared machine the other processes only ever
    add time, so the fastest round is the best estimate of the call's own cost.
    Each call is run once untimed first (warm-up). Returns the times and the
    outputs of the last round.
    """
    outputs = {
        name: jax.block_until_ready(fn(*args)) for name, (fn, args) in calls.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: min(s) for name, s in samples.items()}, outputs


def best_time(fn: Callable, args: tuple, repeats: int) -> tuple[float, Any]:
    """The shortest wall time of `fn(*args)` over `repeats` runs after one warm-up
    run (see `time_interleaved`), and its output."""
    times, outputs = time_interleaved({"call": (fn, args)}, repeats)
    return times["call"], outputs["call"]


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


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
        revision=git_revision(),
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


def format_value(value, spec: str) -> str:
    """`value` formatted with `spec`, or `-` for a missing one."""
    return "-" if value is None else format(value, spec)


def mib(nbytes: int | None) -> float | None:
    """Bytes in MiB (`None` stays `None`)."""
    return None if nbytes is None else nbytes / 2**20


def file_suffix(args) -> str:
    """`_<tag>` for a run given `--tag`, so that tagged runs write their own files."""
    return f"_{args.tag}" if getattr(args, "tag", None) else ""


def rows_table(
    rows: Sequence[dict],
    columns: Sequence[tuple[str, Callable[[dict], str]]],
    header: bool = True,
) -> str:
    """A markdown table of dict rows: `columns` pairs each column's title with the
    function that formats a row's cell. `header=False` gives the rows alone, for
    printing a table one row at a time."""
    lines = []
    if header:
        lines.append("| " + " | ".join(title for title, _ in columns) + " |")
        lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(cell(row) for _, cell in columns) + " |")
    return "\n".join(lines)


def write_rows(
    rows: Sequence[dict], out: Path, name: str, table: Callable[[list[dict]], str]
) -> None:
    """`<name>.csv` (every key of every row) and `<name>.md` (`table(rows)`) in
    the folder `out`."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.md").write_text(table(list(rows)) + "\n")
