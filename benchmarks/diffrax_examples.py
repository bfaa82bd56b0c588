"""Diffrax's own documentation examples, run as written and with only the solver
swapped for `deer_diffrax.DeerSolver(solver)`.

The script reads the example notebooks from a Diffrax checkout (a working tree or a
bare git directory, at `--ref`) at run time: no Diffrax code is stored here. For each
notebook it joins the code cells (IPython magics dropped), applies the edits listed
in `EXAMPLES` below, and runs the result in a fresh subprocess twice: as the original
and with the solver swapped (plus, where listed, a third run "with the docs'
recommended change"). Each edit is an exact string substitution with an expected
count; an edit that no longer applies stops the script with the example's name and
the text it looked for.

Edits are of three kinds, and each example's table says which is which:

- `swap`: `X -> deer_diffrax.DeerSolver(X)` where the example builds the solver of
    the solve it is about (its model, not the solves that generate training data).
    Applied to the DEER run only.
- `shrink`: fewer training steps, smaller data sets, a loss printed every step, an
    image reader where the example's is not installed. Applied to both runs alike.
- `recommended`: the one documented change of "Switching from a sequential solver"
    (docs/choosing-options.md): with a constant step `h` the window is `dt0`, so pass
    `dt0 = num_substeps * h`, with `num_substeps` chosen so that the window divides
    the interval. Applied on top of `swap`, in a third run.

Plots go to matplotlib's Agg backend (`plt.show` and `savefig` do nothing). In the
subprocess, `diffrax.diffeqsolve` is wrapped to record, for every solve (host
callbacks, so solves inside `jit`/`vmap`/`grad` count too), its call site, the accepted
and rejected steps, and for a `DeerSolver` solve the base-method substeps
(`deer_diffrax.diagnostics(sol).total_substeps`; the wrapper asks for
`SaveAt(solver_state=True)` to read them, which changes nothing else). The steps
compared are those of the call sites the swap touched.

Reported per example: whether each run finished (else the first line of its error),
the output against the original (an example-specific quantity, named in the table:
a final loss or trained parameter, or the max abs difference of the solution), base
steps per solve at the swapped call sites, and the wall-time ratio DEER / original
of the whole script (compilation included) and, where the example has a natural
repeatable call, of that call once compiled (min of 3).

    python benchmarks/diffrax_examples.py --diffrax-repo PATH [--ref v0.7.2]
        [--only neural_ode,stiff_ode] [--repeats 1] [--timeout 900]

Writes `benchmarks/results/diffrax_examples_<backend>.md`, and its rows to the `.json`
beside it: `--only` re-measures the examples it names and keeps the other rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SITE = "<diffrax-example>"  # the filename the example's code is compiled under


@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace `old` by `new`, which must occur exactly `count` times."""

    old: str
    new: str
    count: int = 1


def swap(old: str, solver: str | None = None, count: int = 1, **options) -> Edit:
    """`solver -> deer_diffrax.DeerSolver(solver, **options)` inside the text `old`
    (`solver` defaults to all of `old`)."""
    solver = old if solver is None else solver
    extra = "".join(f", {k}={v!r}" for k, v in options.items())
    return Edit(
        old, old.replace(solver, f"deer_diffrax.DeerSolver({solver}{extra})"), count
    )


@dataclasses.dataclass(frozen=True)
class Example:
    """One documentation notebook and what the script does to it.

    - `swap`, `shrink`, `recommended`: the edits (see the module docstring).
    - `output`: a Python expression evaluated in the example's namespace after it
        ran, or `stdout:REGEX` for the last match of `REGEX` in what it printed; the
        quantity compared between the runs, described by `output_name`.
    - `warm`: an expression the child evaluates three more times after the
        script (compiled by then) and times; `None` where there is none.
    - `needs`: modules without which the notebook cannot run at all.
    """

    name: str
    swap: tuple[Edit, ...]
    output: str
    output_name: str
    shrink: tuple[Edit, ...] = ()
    recommended: tuple[Edit, ...] | None = None
    warm: str | None = None
    needs: tuple[str, ...] = ()
    shrunk: str = "nothing"


_TSIT5 = "Tsit5()"

EXAMPLES = (
    Example(
        "coupled_odes",
        swap=(swap("solver = Tsit5()", _TSIT5),),
        recommended=(Edit("dt0 = 0.1\n", "dt0 = 10.0\n"),),  # 14 windows of 100
        output="sol.ys",
        output_name="max abs diff of sol.ys (1000 saved times)",
        warm="diffeqsolve(term, solver, t0, t1, dt0, y0, args=args, saveat=saveat).ys",
    ),
    Example(
        "forcing",
        swap=(swap("    solver = Tsit5()\n", _TSIT5, count=2),),
        recommended=(Edit("    dt0 = 0.1\n", "    dt0 = 10.0\n", count=2),),
        # The first solve's saved values and the second's gradient.
        shrink=(
            Edit("sol = solve(y0, args)\n", "sol = solve(y0, args); sol_1 = sol\n"),
        ),
        output="(sol_1.ys, grads)",
        output_name="max abs diff of sol.ys and of the gradient",
        warm="solve(points)",
    ),
    Example(
        "hessian",
        swap=(swap('Tsit5(scan_kind="bounded")'),),
        recommended=(Edit("    dt0 = 0.1\n", "    dt0 = 10.0\n"),),
        output="run(y0)",
        output_name="max abs diff of the Hessian",
        warm="run(y0)",
    ),
    Example(
        "steady_state",
        swap=(swap("diffrax.Tsit5()"),),
        shrink=(Edit("for step in range(100):", "for step in range(10):"),),
        output="model.steady_state",
        output_name="steady state learnt after 10 steps",
        warm="make_step(model, opt_state, target_steady_state)[0].steady_state",
        shrunk="10 of 100 training steps",
    ),
    Example(
        "stiff_ode",
        swap=(swap("diffrax.Kvaerno5()"),),
        output="sol.ys",
        output_name="max abs diff of sol.ys (8 saved times)",
        warm="main(0.04, 3e7, 1e4).ys",
    ),
    Example(
        "underdamped_langevin_example",
        swap=(swap("diffrax.QUICSORT(100.0)"),),
        # The notebook's potential gradient takes `x` alone; Diffrax 0.7.2 calls it
        # with `(x, args)`, so the notebook fails as written in both runs.
        shrink=(Edit("lambda x: 2 * x", "lambda x, args: 2 * x"),),
        recommended=(Edit("dt0 = 0.05\n", "dt0 = 5.0\n"),),  # 4 windows of 100
        output="_final(sol.ys)",
        output_name="max abs diff of the final state",
        shrunk="nothing (`grad_f` takes `(x, args)`, as Diffrax calls it)",
        warm=(
            "diffrax.diffeqsolve(terms, solver, t0, t1, dt0=dt0, y0=y0, args=None, "
            "saveat=saveat).ys"
        ),
    ),
    Example(
        "kalman_filter",
        swap=(swap("solver: dfx.AbstractSolver = dfx.Dopri5(),", "dfx.Dopri5()"),),
        recommended=(Edit("dt0: float = 0.01,", "dt0: float = 1.0,"),),
        shrink=(
            # Optax (0.2.8 here) casts the optimiser state like the gradients, which
            # are `None` outside `filter_spec`: initialise it on the trainable part
            # only, or the notebook fails in both runs.
            Edit(
                "opt_state = opt.init(kmf)",
                "opt_state = opt.init(eqx.filter(kmf, filter_spec))",
            ),
            Edit(
                "main(n_gradient_steps=100)",
                "main(n_gradient_steps=10, print_every=1, plot=False)",
            ),
        ),
        output=r"stdout:Current MSE:\s+(\S+)",
        output_name="MSE at the 10th gradient step",
        shrunk="10 of 100 gradient steps (optimiser state of the trainable leaves)",
    ),
    Example(
        "neural_ode",
        swap=(swap("            diffrax.Tsit5(),\n", "diffrax.Tsit5()"),),
        shrink=(
            Edit(
                "ts, ys, model = main()",
                "ts, ys, model = main(dataset_size=64, steps_strategy=(3, 3), "
                "print_every=1)",
            ),
        ),
        output=r"stdout:Loss: ([^,]+),",
        output_name="loss at the last training step",
        shrunk="64 of 256 series, 3 + 3 of 500 + 500 steps",
    ),
    Example(
        "latent_ode",
        swap=(
            swap(
                "diffrax.ODETerm(self.func),\n            diffrax.Tsit5(),",
                "diffrax.Tsit5()",
            ),
        ),
        shrink=(
            Edit(
                "main()",
                "main(dataset_size=64, batch_size=32, steps=3, save_every=3)",
            ),
        ),
        output=r"stdout:Loss: ([^,]+),",
        output_name="loss at the last training step",
        shrunk="64 of 10000 series, batch 32, 3 of 250 steps",
    ),
    Example(
        "neural_cde",
        swap=(swap("        solver = diffrax.Tsit5()\n", "diffrax.Tsit5()"),),
        shrink=(Edit("main()", "main(dataset_size=64, steps=3)"),),
        output=r"stdout:Test loss: ([^,]+),",
        output_name="test loss after training",
        shrunk="64 of 256 series, 3 of 20 steps",
    ),
    Example(
        "neural_sde",
        swap=(
            swap("solver = diffrax.ReversibleHeun()", "diffrax.ReversibleHeun()", 2),
        ),
        shrink=(
            Edit(
                "main()",
                "main(batch_size=32, dataset_size=64, steps=2, steps_per_print=1)",
            ),
        ),
        # The generator and the discriminator each in one window of 63 substeps:
        # the original grid (`dt0 = 1` over `[0, 63]`); `dt0` itself stays, as it
        # also sets the Brownian tree's tolerance.
        recommended=(
            Edit(
                "deer_diffrax.DeerSolver(diffrax.ReversibleHeun())",
                "deer_diffrax.DeerSolver(diffrax.ReversibleHeun(), num_substeps=63)",
                count=2,
            ),
            Edit(
                "diffrax.diffeqsolve(terms, solver, t0, t1, dt0, y0, saveat=saveat)",
                "diffrax.diffeqsolve(terms, solver, t0, t1, t1 - t0, y0, "
                "saveat=saveat)",
                count=2,
            ),
        ),
        output=r"stdout:Loss: (\S+)",
        output_name="loss at the last step",
        shrunk="64 of 8192 series, batch 32, 2 of 10000 steps",
    ),
    Example(
        "nonlinear_heat_pde",
        swap=(
            swap("solver = diffrax.Tsit5()", "diffrax.Tsit5()"),
            swap(
                "solver = CrankNicolson(rtol=rtol, atol=atol)",
                "CrankNicolson(rtol=rtol, atol=atol)",
            ),
        ),
        shrink=(
            Edit(
                "    max_steps=None,\n)\n\n# ---- cell\nplt.figure",
                "    max_steps=None,\n); sol_1 = sol\n\n# ---- cell\nplt.figure",
                count=2,
            ),
        ),
        output="(sol_1.ys.vals,)",
        output_name="max abs diff of sol.ys (CrankNicolson solve; Tsit5 in notes)",
    ),
    Example(
        "sde_example",
        swap=(
            swap("terms, diffrax.SPaRK(), t0, t1, dt0", "diffrax.SPaRK()"),
            swap("solver = diffrax.SPaRK()\n# solver", "diffrax.SPaRK()"),
            swap("        diffrax.SPaRK(),\n        t0,", "diffrax.SPaRK()"),
        ),
        shrink=(
            Edit("num_samples = 100\n", "num_samples = 10\n"),
            Edit("num_steps = 191\n", "num_steps = 2\n"),
        ),
        # Windows of 64 substeps: the fixed-step solve on the original grid (`dt0`
        # of 64 original steps divides [0, 2]; 100 would not, and Diffrax would
        # spread the windows evenly off the grid), the PID solve's first window 64
        # original steps, the batch of `StepTo` solves in windows of 64 of its 256
        # steps (the original grid).
        recommended=(
            Edit("dt0 = 2**-9\n", "dt0 = 64 * 2**-9\n"),
            Edit(
                "deer_diffrax.DeerSolver(diffrax.SPaRK())",
                "deer_diffrax.DeerSolver(diffrax.SPaRK(), num_substeps=64)",
                count=3,
            ),
            Edit(
                "constant_controller = diffrax.StepTo(ts=step_times)",
                "constant_controller = diffrax.StepTo(ts=step_times[::64])",
            ),
        ),
        output="(_final(sol.ys), _final(sol_pid_spark.ys), batch_ys_opt)",
        output_name="max abs diff of final states (fixed dt0, PID, 10 StepTo paths)",
        shrunk="10 of 100 sample paths, 2 of 191 training steps",
    ),
    Example(
        "continuous_normalising_flow",
        swap=(swap("        solver = diffrax.Tsit5()\n", "diffrax.Tsit5()", count=3),),
        # Each solve in one window of 10 substeps: the original grid (`dt0 = 0.05`
        # over an interval of 0.5).
        recommended=(
            Edit("self.dt0 = 0.05\n", "self.dt0 = 0.5\n"),
            Edit(
                "deer_diffrax.DeerSolver(diffrax.Tsit5())",
                "deer_diffrax.DeerSolver(diffrax.Tsit5(), num_substeps=10)",
                count=3,
            ),
        ),
        shrink=(
            # imageio is not a dependency here: read the PNG with matplotlib, as
            # the integers 0..255 that imageio returns.
            Edit(
                "import imageio\n",
                "imageio = __import__('types').SimpleNamespace(imread=lambda p: "
                "(__import__('matplotlib.pyplot').pyplot.imread(p) * 255).round())\n",
            ),
            Edit(
                'main(in_path="../imgs/cat.png")',
                "main(in_path=CAT_PNG, out_path=OUT_PNG, batch_size=50, steps=2, "
                "print_every=1)",
            ),
            Edit("num_samples = 5000\n", "num_samples = 100\n"),
        ),
        output=r"stdout:Loss: ([^,]+),",
        output_name="loss at the last step",
        shrunk="2 of 10000 steps, batch 50 of 500, 100 of 5000 samples",
    ),
    Example(
        "symbolic_regression",
        swap=(),
        output="None",
        output_name="-",
        needs=("pysr", "sympy", "sympy2jax"),
    ),
)


# ---------------------------------------------------------------------------
# Reading and patching the notebooks


def notebook_source(repo: Path, ref: str, name: str) -> str:
    """The code cells of Diffrax's `docs/examples/<name>.ipynb` (or
    `examples/<name>.ipynb` in older releases), joined, magics dropped."""
    text = None
    for folder in ("docs/examples", "examples"):
        path = f"{folder}/{name}.ipynb"
        if (repo / path).is_file():
            text = (repo / path).read_text()
            break
        git_dir = ["--git-dir", str(repo)] if not (repo / ".git").exists() else []
        result = subprocess.run(
            ["git", *git_dir, "show", f"{ref}:{path}"],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            text = result.stdout
            break
    if text is None:
        raise SystemExit(f"{name}: no notebook {name}.ipynb at {ref} in {repo}.")
    cells = [
        "".join(cell["source"])
        for cell in json.loads(text)["cells"]
        if cell["cell_type"] == "code"
    ]
    code = "\n\n# ---- cell\n".join(cells)
    return "\n".join(
        "" if line.lstrip().startswith(("%", "!")) else line
        for line in code.splitlines()
    )


def apply_edits(name: str, code: str, edits: tuple[Edit, ...]) -> str:
    """`code` with every edit made, each checked to apply exactly as often as
    expected and to keep the lines where they were (the call sites are compared by
    line between the runs)."""
    for edit in edits:
        if edit.old.count("\n") != edit.new.count("\n"):
            raise ValueError(f"{name}: an edit must not add or remove lines: {edit}")
        found = code.count(edit.old)
        if found != edit.count:
            raise SystemExit(
                f"{name}: a patch no longer applies: expected {edit.count} "
                f"occurrence(s) of {edit.old!r}, found {found}. The notebook changed; "
                "update its entry in EXAMPLES."
            )
        code = code.replace(edit.old, edit.new)
    return code


# ---------------------------------------------------------------------------
# The child process: run one patched example and report what happened

_CHILD = r'''
import contextlib, inspect, io, json, re, sys, time, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
plt.show = lambda *a, **k: None
plt.savefig = lambda *a, **k: None
import matplotlib.figure
matplotlib.figure.Figure.savefig = lambda *a, **k: None
import diffrax, jax, deer_diffrax

spec = json.loads(sys.argv[1])
records = {}  # call-site line -> list of [is_deer, accepted, rejected, substeps]
_real = diffrax.diffeqsolve
_signature = inspect.signature(_real)

def _site():
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename != spec["site"]:
        frame = frame.f_back
    return -1 if frame is None else frame.f_lineno

recording = [True]  # the solves of the script only, not of the output or warm calls

def _record(site, is_deer, exact, accepted, rejected, substeps):
    if not recording[0]:
        return
    accepted, rejected, substeps = (
        np.asarray(x).ravel() for x in (accepted, rejected, substeps))
    for a, r, s in zip(accepted, rejected, substeps):
        records.setdefault(site, []).append([is_deer, int(a), int(r), int(s), exact])

def recording_diffeqsolve(*args, **kwargs):
    bound = _signature.bind(*args, **kwargs)
    solver = bound.arguments["solver"]
    is_deer = isinstance(solver, deer_diffrax.DeerSolver)
    # `ImplicitAdjoint` allows no saved solver state: there the substeps are read as
    # windows x num_substeps (exact when no window is shorter than its capacity).
    implicit = isinstance(bound.arguments.get("adjoint"), diffrax.ImplicitAdjoint)
    exact = not (is_deer and implicit)
    if is_deer and not implicit:
        s = bound.arguments.get("saveat", diffrax.SaveAt(t1=True))
        bound.arguments["saveat"] = diffrax.SaveAt(
            subs=s.subs, dense=s.dense, solver_state=True,
            controller_state=s.controller_state, made_jump=s.made_jump)
    sol = _real(*bound.args, **bound.kwargs)
    accepted = sol.stats["num_accepted_steps"]
    rejected = sol.stats["num_rejected_steps"]
    if is_deer and exact:
        substeps = sol.solver_state.total_substeps
    elif is_deer:
        substeps = accepted * solver.num_substeps
    else:
        substeps = accepted
    site = _site()
    jax.debug.callback(lambda a, r, s: _record(site, is_deer, exact, a, r, s),
                       accepted, rejected, substeps)
    return sol

diffrax.diffeqsolve = recording_diffeqsolve

def _final(ys):
    """The last saved state with finite entries (SaveAt(steps=True) pads with inf)."""
    leaves = jax.tree_util.tree_leaves(ys)
    rows = [np.isfinite(np.asarray(x)).reshape(len(x), -1).all(axis=1) for x in leaves]
    finite = np.all(np.stack(rows), axis=0)
    last = int(np.nonzero(finite)[0][-1])
    return [np.asarray(x)[last] for x in leaves]

namespace = {"__name__": "__main__", "_final": _final, "deer_diffrax": deer_diffrax,
             "CAT_PNG": spec.get("cat_png"), "OUT_PNG": "out.png"}
out = {"ok": False, "error": None, "records": None}
stdout = io.StringIO()
class Tee(io.TextIOBase):
    def write(self, s):
        stdout.write(s); sys.__stdout__.write(s); return len(s)
start = time.perf_counter()
try:
    with contextlib.redirect_stdout(Tee()):
        exec(compile(spec["code"], spec["site"], "exec"), namespace)
        out["script_s"] = time.perf_counter() - start
        out["ok"] = True
        recording[0] = False
        if spec["output"].startswith("stdout:"):
            found = re.findall(spec["output"][7:], stdout.getvalue())
            value = [float(found[-1])] if found else None
        else:
            value = eval(spec["output"], namespace)
        if value is not None:
            leaves = jax.tree_util.tree_leaves(value)
            np.savez(spec["npz"], *[np.asarray(l) for l in leaves])
        if spec["warm"]:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                jax.block_until_ready(eval(spec["warm"], namespace))
                times.append(time.perf_counter() - t)
            out["warm_s"] = min(times)
except BaseException as e:  # noqa: BLE001 (report everything, KeyboardInterrupt too)
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    out["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    out["traceback"] = traceback.format_exc()[-4000:]
    out.setdefault("script_s", time.perf_counter() - start)
out["records"] = {str(k): v for k, v in records.items()}
with open(spec["json"], "w") as f:
    json.dump(out, f)
'''


def run_child(code: str, example: Example, cat_png: str | None, timeout: float) -> dict:
    """Run one patched example in a fresh Python; return the child's report plus the
    output arrays (`"output"`) and the process wall time (`"process_s"`)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(
            code=code,
            site=SITE,
            output=example.output,
            warm=example.warm,
            json=os.path.join(tmp, "out.json"),
            npz=os.path.join(tmp, "out.npz"),
            cat_png=cat_png,
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(spec)],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return dict(ok=False, error=f"timeout after {timeout:.0f} s", records={})
        process_s = time.perf_counter() - start
        if not os.path.exists(spec["json"]):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            return dict(ok=False, error=f"crashed: {tail[0][:300]}", records={})
        with open(spec["json"]) as f:
            report = json.load(f)
        report["process_s"] = process_s
        report["stdout_tail"] = proc.stdout[-2000:]
        if os.path.exists(spec["npz"]):
            import numpy as np

            with np.load(spec["npz"]) as data:
                report["output"] = [data[k] for k in data.files]
        return report


# ---------------------------------------------------------------------------
# Comparing and tabulating


def swapped_sites(deer: dict) -> set[str]:
    """The call sites (lines of the example) whose solves used a `DeerSolver` in the
    swapped run. The swap keeps every line where it was, so the same lines of the
    original are the solves it replaced."""
    return {
        site
        for site, solves in deer.get("records", {}).items()
        if any(s[0] for s in solves)
    }


def steps_per_solve(
    report: dict, deer_sites: set[str]
) -> tuple[float, float, int, bool]:
    """Mean (accepted steps, base substeps) per solve over the call sites in
    `deer_sites`, the number of solves, and whether every substep count was read
    from the solver state (else it is windows x num_substeps)."""
    rows = [r for site in deer_sites for r in report.get("records", {}).get(site, [])]
    if not rows:
        return math.nan, math.nan, 0, True
    accepted = sum(r[1] for r in rows) / len(rows)
    substeps = sum(r[3] for r in rows) / len(rows)
    return accepted, substeps, len(rows), all(r[4] for r in rows)


def compare(reference, other) -> str:
    """The largest absolute difference over the output arrays, and relative to the
    largest reference entry; a scalar output prints both values."""
    import numpy as np

    if reference is None or other is None:
        return "-"
    if len(reference) != len(other) or any(
        a.shape != b.shape for a, b in zip(reference, other, strict=True)
    ):
        return "outputs differ in shape"
    diff = max(
        float(np.max(np.abs(a - b))) if a.size else 0.0
        for a, b in zip(reference, other, strict=True)
    )
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in reference)
    if len(reference) == 1 and reference[0].size == 1:
        return (
            f"{float(reference[0].ravel()[0]):.6g} vs {float(other[0].ravel()[0]):.6g}"
            f" (rel {diff / max(scale, 1e-300):.1e})"
        )
    return f"{diff:.1e} (rel {diff / max(scale, 1e-300):.1e})"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2g}"


def _status(report: dict) -> str:
    return "yes" if report.get("ok") else f"no: {report.get('error')}"


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _fmt(x: float) -> str:
    return "-" if x != x else (f"{x:.0f}" if x >= 10 else f"{x:.3g}")


def _min_report(reports: list[dict]) -> dict:
    # The fastest of the interleaved repeats (others on a shared machine only add
    # time); outputs and step counts are identical between repeats.
    best = dict(reports[0])
    for key in ("script_s", "process_s", "warm_s"):
        values = [r[key] for r in reports if r.get(key) is not None]
        best[key] = min(values) if values else None
    return best


def row(example: Example, variant: str, original: dict, deer: dict, sites) -> list[str]:
    orig_steps, _, orig_solves, _ = steps_per_solve(original, sites)
    deer_windows, deer_substeps, deer_solves, exact = steps_per_solve(deer, sites)
    steps = (
        f"{_fmt(orig_steps)} -> {'' if exact else '<= '}{_fmt(deer_substeps)} "
        f"({_fmt(deer_windows)} windows)"
        f"; {orig_solves}/{deer_solves} solves"
        if deer_solves
        else f"{_fmt(orig_steps)} -> -"
    )
    return [
        f"{example.name}{variant}",
        _status(deer) if original.get("ok") else f"original: {_status(original)}",
        example.output_name,
        compare(original.get("output"), deer.get("output")) if deer.get("ok") else "-",
        steps,
        _ratio(deer.get("script_s"), original.get("script_s"))
        if deer.get("ok")
        else "-",
        _ratio(deer.get("warm_s"), original.get("warm_s")),
        f"{_seconds(original.get('script_s'))} / {_seconds(deer.get('script_s'))}",
    ]


HEADER = (
    "example",
    "runs with DeerSolver?",
    "output compared",
    "original vs DEER",
    "base steps per solve: original -> DEER substeps (windows); solves",
    "time ratio, script",
    "time ratio, compiled call",
    "script s (orig / DEER)",
)


def measure_example(example: Example, repo: Path, args) -> dict:
    """Run one example (original, swapped and, where listed, recommended) and return
    its table rows, per-call-site lines, load averages and date."""
    import importlib.util

    entry = dict(rows=[], details=[], date=f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    loads = [os.getloadavg()[0]]
    missing = [m for m in example.needs if importlib.util.find_spec(m) is None]
    if missing:
        entry["rows"].append(
            [example.name, f"not run: needs {', '.join(missing)} (not installed)"]
            + ["-"] * (len(HEADER) - 2)
        )
        entry["loads"] = loads
        return entry
    cat_png = None
    if example.name == "continuous_normalising_flow":
        cat_png = _extract_image(repo, args.ref, "imgs/cat.png")
    code = apply_edits(
        example.name, notebook_source(repo, args.ref, example.name), example.shrink
    )
    swapped = apply_edits(example.name, code, example.swap)
    variants = {} if args.recommended_only else {"": swapped}
    if example.recommended and not args.no_recommended:
        variants[" (window = 100 steps)"] = apply_edits(
            example.name, swapped, example.recommended
        )
    original_runs, deer_runs = [], {v: [] for v in variants}
    for _ in range(args.repeats):
        print(f"== {example.name}: original", flush=True)
        original_runs.append(run_child(code, example, cat_png, args.timeout))
        loads.append(os.getloadavg()[0])
        for variant, patched in variants.items():
            print(f"== {example.name}: DeerSolver{variant}", flush=True)
            deer_runs[variant].append(
                run_child(patched, example, cat_png, args.timeout)
            )
            loads.append(os.getloadavg()[0])
    original = _min_report(original_runs)
    for variant in variants:
        deer = _min_report(deer_runs[variant])
        sites = swapped_sites(deer)
        entry["rows"].append(row(example, variant, original, deer, sites))
        entry["details"] += site_lines(example.name + variant, original, deer, sites)
        print(" | ".join(entry["rows"][-1]), flush=True)
    entry["loads"] = loads
    return entry


def site_lines(name: str, original: dict, deer: dict, sites: set[str]) -> list[str]:
    """One line per call site: steps of the original, substeps and windows of the
    swapped run; then the errors, if any."""
    lines = []
    records = lambda report, site: report.get("records", {}).get(site, [])
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows) if rows else math.nan
    for site in sorted(
        set(original.get("records", {})) | set(deer.get("records", {})), key=int
    ):
        o, d = records(original, site), records(deer, site)
        lines.append(
            f"- {name}, line {site}{' (swapped)' if site in sites else ''}: "
            f"original {_fmt(mean(o, 1))} steps x {len(o)} solves; "
            f"run with DeerSolver {'' if all(r[4] for r in d) else '<= '}"
            f"{_fmt(mean(d, 3))} substeps in "
            f"{_fmt(mean(d, 1))} windows ({_fmt(mean(d, 2))} rejected) "
            f"x {len(d)} solves"
        )
    for label, report in (("original", original), ("DeerSolver", deer)):
        if report.get("error"):
            lines.append(f"- {name}, {label} failed: `{report['error']}`")
    return lines


def render(entries: dict, ref: str, machine: str) -> str:
    """The markdown page of every measured example, in the order of `EXAMPLES`."""
    measured = [e for e in EXAMPLES if e.name in entries]
    loads = [x for e in measured for x in entries[e.name]["loads"]]
    dates = sorted(entries[e.name]["date"] for e in measured)
    lines = [
        "# Diffrax's documentation examples with the solver swapped for DeerSolver",
        "",
        f"Diffrax {ref} notebooks; {machine}; measured {dates[0]} to {dates[-1]}; "
        f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs "
        "(a shared machine: single timings move by tens of percent).",
        f"Command: `python benchmarks/diffrax_examples.py --diffrax-repo DIFFRAX "
        f"--ref {ref}` (or `--only NAME,...` to re-measure some rows).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += [
        "| " + " | ".join(r) + " |" for e in measured for r in entries[e.name]["rows"]
    ]
    lines += ["", "What was shrunk (both runs alike):", ""]
    lines += [f"- {e.name}: {e.shrunk}" for e in measured]
    lines += [
        "",
        "Steps per call site (accepted steps, or DEER substeps; mean per solve):",
        "",
    ]
    lines += [line for e in measured for line in entries[e.name]["details"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffrax-repo", type=Path, required=True)
    parser.add_argument("--ref", default="v0.7.2")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated example names: re-measure these and keep the other "
        "rows of the results file",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--no-recommended", action="store_true")
    parser.add_argument(
        "--recommended-only",
        action="store_true",
        help="with --only: run the original and the recommended variant, and keep "
        "the stored swap-only row (for examples whose swap-only run times out)",
    )
    parser.add_argument("--out", type=Path, default=None, help="the markdown file")
    args = parser.parse_args()

    import jax

    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - {e.name for e in EXAMPLES}
    if unknown:
        raise SystemExit(f"Unknown examples: {sorted(unknown)}")
    repo = args.diffrax_repo.resolve()
    out = args.out or HERE / "results" / f"diffrax_examples_{jax.default_backend()}.md"
    # The rows live in a JSON file beside the page, so that `--only` re-measures
    # some examples and the page keeps the others.
    store = out.with_suffix(".json")
    entries = json.loads(store.read_text()) if only and store.exists() else {}
    entries = {k: v for k, v in entries.items() if v.get("ref") == args.ref}
    machine = (
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} "
        f"cores, {platform.machine()}), jax {jax.__version__}"
    )
    for example in EXAMPLES:
        if only and example.name not in only:
            continue
        entry = dict(measure_example(example, repo, args), ref=args.ref)
        if args.recommended_only and example.name in entries:
            # Keep the stored swap-only row and its per-site lines.
            old = entries[example.name]
            prefix = f"- {example.name},"
            entry["rows"] = [r for r in old["rows"] if r[0] == example.name] + entry[
                "rows"
            ]
            entry["details"] = [
                line for line in old["details"] if line.startswith(prefix)
            ] + entry["details"]
        entries[example.name] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(entries, indent=1) + "\n")
        out.write_text(render(entries, args.ref, machine))
    print(out.read_text())
    print(f"Wrote {out} and {store}")


def _extract_image(repo: Path, ref: str, path: str) -> str:
    """A file of the Diffrax checkout (or of `ref` in a git directory), as a path."""
    if (repo / path).is_file():
        return str(repo / path)
    target = Path(tempfile.gettempdir()) / f"diffrax-{ref}-{Path(path).name}"
    git_dir = ["--git-dir", str(repo)] if not (repo / ".git").exists() else []
    data = subprocess.run(
        ["git", *git_dir, "show", f"{ref}:{path}"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    target.write_bytes(data)
    return str(target)


if __name__ == "__main__":
    main()
