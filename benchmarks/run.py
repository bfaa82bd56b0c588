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
import json
import math
import os
import sys
import time
from pathlib import Path


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

# After the dtype is known: JAX reads JAX_ENABLE_X64 when it is first imported.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import (  # noqa: E402
    file_suffix,  # noqa: E402
    machine_info,
    machine_line,
)
from problem import STEP_SIZE  # noqa: E402
from sweep_gru import gru_table, run_gru  # noqa: E402
from sweep_main import markdown_table, merge_csv, plot_main, run_main  # noqa: E402
from sweep_saveat import run_saveat, saveat_table  # noqa: E402


def main(args) -> None:
    """Run the selected parts and write everything to the output folder."""
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    on_gpu = jax.default_backend() == "gpu"
    default_out = HERE / "results" / ("gpu" if on_gpu else "cpu")
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    # The sweeps stop starting new configurations after this time.
    args.deadline = (
        math.inf if args.budget is None else time.perf_counter() + args.budget
    )
    info = machine_info()
    info.update(
        dtype=args.dtype,
        command=" ".join(["python", "benchmarks/run.py"] + sys.argv[1:]),
        step_size=STEP_SIZE,
        deer_options={k: repr(v) for k, v in args.deer_options.items()},
    )
    (out / f"machine{file_suffix(args)}.json").write_text(
        json.dumps(info, indent=2) + "\n"
    )
    print(machine_line(), f"dtype {args.dtype}", flush=True)
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
    (out / f"machine{file_suffix(args)}.json").write_text(
        json.dumps(info, indent=2) + "\n"
    )
    print(f"\nresults written to {os.path.relpath(out)}")


if __name__ == "__main__":
    if ARGS.from_csv:
        merge_csv(ARGS)
    else:
        main(ARGS)
