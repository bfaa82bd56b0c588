"""Damping strategies on a panel of problems that are hard for Newton's method.

Rows: DeerSolver (Tsit5 substeps, the whole interval in ONE window, constant initial
guess) on Van der Pol mu = 1 and mu = 10, the Kepler orbit e = 0.5, Lotka-Volterra
and an `eqx.nn.MLP` vector field; `deer_diffrax.scan` on a GRU cell with its weights
scaled up and on a random tanh RNN of growing gain. Columns: for `jacobian="full"`
and `"diagonal"` and each damping strategy (`NoDamping`, `ShrinkBlocksDamping` =
`damping=True`, `TrustRegion`, `LevenbergMarquardt`): whether the solve succeeded,
the Newton iterations (`/r` rejected trials), the relative error of the end state
against the sequential solve (Diffrax's `diffeqsolve` with the base solver on the
same grid; `jax.lax.scan`), and the wall time relative to `TrustRegion`'s where both
converged (fastest of 5 rounds, the strategies interleaved in each).
Beside each row: the largest Lyapunov exponent along the solution times the window
length (`deer_diffrax.diagnostics(sol).lyapunov_exponent` of a converged DeerSolver
solve; for the scans `ScanStats.lyapunov_exponent` of a scan started at the
sequential carries), which predicts how hard the window is.

    python benchmarks/hard_panel.py [--float32] [--max-newton-steps 200]

Prints a markdown table and writes `benchmarks/results/hard_panel_cpu.md` (or
`hard_panel_cpu_float32.md`). Takes about ten minutes on a 2-core CPU, almost all of
it compilation.
"""

import argparse
import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from _common import (
    HERE,
    load_average,
    machine_line,
    markdown_table,
    time_interleaved,
    write_result,
)

import deer_diffrax


def _van_der_pol(mu):
    def field(t, y, args):
        return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    return field


def _kepler(t, y, args):
    q, p = y[:2], y[2:]
    return jnp.concatenate([p, -q / jnp.sum(q**2) ** 1.5])


def _lotka_volterra(t, y, args):
    return jnp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def _mlp_field(dtype):
    # A fixed random MLP, weights scaled by 1.5 ("moderate"): a nonlinear field whose
    # solutions stay bounded.
    mlp = eqx.nn.MLP(2, 2, 32, 2, activation=jnp.tanh, key=jax.random.key(0))
    mlp = jax.tree_util.tree_map(
        lambda x: (1.5 * x).astype(dtype) if eqx.is_array(x) else x, mlp
    )
    return lambda t, y, args: mlp(y)


def ode_problems(dtype):
    """name -> (vector field, y0, window length, substeps)."""
    return {
        "Van der Pol mu=1": (_van_der_pol(1.0), [2.0, 0.0], 20.0, 2000),
        "Van der Pol mu=10": (_van_der_pol(10.0), [2.0, 0.0], 20.0, 4000),
        "Kepler e=0.5": (_kepler, [0.5, 0.0, 0.0, math.sqrt(3.0)], 20.0, 2000),
        "Lotka-Volterra": (_lotka_volterra, [4.0, 2.0], 20.0, 2000),
        "MLP field": (_mlp_field(dtype), [1.0, 0.5], 20.0, 2000),
    }


def _gru(gain, dtype, hidden=8, inputs=4, length=1000):
    cell = eqx.nn.GRUCell(inputs, hidden, key=jax.random.key(1))
    cell = jax.tree_util.tree_map(
        lambda x: (gain * x).astype(dtype) if eqx.is_array(x) else x, cell
    )
    xs = jax.random.normal(jax.random.key(2), (length, inputs), dtype)
    return (lambda h, x: (cell(x, h), None)), jnp.zeros(hidden, dtype), xs


def _tanh_rnn(gain, dtype, hidden=8, length=1000):
    w = jax.random.normal(jax.random.key(3), (hidden, hidden), dtype) / hidden**0.5
    u = jax.random.normal(jax.random.key(4), (hidden, 2), dtype)
    xs = jax.random.normal(jax.random.key(5), (length, 2), dtype)
    return (
        (lambda h, x: (jnp.tanh(gain * w @ h + u @ x), None)),
        jnp.zeros(hidden, dtype),
        xs,
    )


def scan_problems(dtype):
    """name -> (step, h0, xs)."""
    return {
        "GRU, weights x4, T=1000": _gru(4.0, dtype),
        "GRU, weights x8, T=1000": _gru(8.0, dtype),
        "tanh RNN gain 2, T=1000": _tanh_rnn(2.0, dtype),
        "tanh RNN gain 3, T=1000": _tanh_rnn(3.0, dtype),
    }


DAMPINGS = {
    "none": deer_diffrax.NoDamping(),
    "shrink": deer_diffrax.ShrinkBlocksDamping(),
    "trust": deer_diffrax.TrustRegion(),
    "lm": deer_diffrax.LevenbergMarquardt(),
}


# Interleaved rounds per (problem, mode): the three strategies alternate.
REPEATS = 5


def _relative(y, reference):
    return float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))


def ode_solve(field, length, substeps, mode, damping, max_newton_steps):
    """A jitted one-window DeerSolver solve `y0 -> solution`."""
    term = diffrax.ODETerm(field)
    solver = deer_diffrax.DeerSolver(
        num_substeps=substeps,
        jacobian=mode,
        damping=damping,
        max_newton_steps=max_newton_steps,
        # The exponent beside each row (off by default in the library).
        estimate_lyapunov=True,
    )

    @jax.jit
    def solve(y0):
        return diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            length,
            length,
            y0,
            max_steps=2,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            throw=False,
        )

    return solve


def ode_outcome(sol):
    """(converged, iterations, rejected trials, end state, LLE) of a solve."""
    info = deer_diffrax.diagnostics(sol)
    ok = bool(sol.result == diffrax.RESULTS.successful)
    lle = info.lyapunov_exponent if ok else math.nan
    return ok, info.total_newton_steps, info.num_rejected, sol.ys[-1], lle


def sequential_ode(field, y0, length, substeps):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        0.0,
        length,
        length / substeps,
        y0,
        max_steps=substeps + 1,
    )
    return sol.ys[-1]


def scan_solve(step, mode, damping, max_newton_steps, initial_guess=None):
    """A jitted `deer_diffrax.scan` `(h0, xs) -> ((final, ys), stats)`."""

    @jax.jit
    def solve(h0, xs):
        return deer_diffrax.scan(
            step,
            h0,
            xs,
            jacobian=mode,
            damping=damping,
            max_newton_steps=max_newton_steps,
            initial_guess=initial_guess,
            throw=False,
            return_stats=True,
        )

    return solve


def scan_outcome(out):
    """(converged, iterations, rejected trials, final carry, LLE per step)."""
    (final, _), stats = out
    ok = bool(stats.result == optx.RESULTS.successful)
    return (
        ok,
        int(stats.num_newton_steps),
        int(stats.num_rejected),
        final,
        float(stats.lyapunov_exponent),
    )


def _cell(ok, iterations, rejected, error):
    mark = "yes" if ok else "**no**"
    its = f"{iterations}" + (f"/{rejected}r" if rejected else "")
    return f"{mark} {its} ({error:.0e})"


def main(dtype, max_newton_steps):
    header = ["problem", "LLE x L"] + [
        f"{mode} {name}" for mode in ("full", "diag") for name in DAMPINGS
    ]
    rows = []
    ratios = []  # (problem, mode, damping, time / TrustRegion's time)

    def add_row(name, results, lle_times_length):
        cells = []
        for mode in ("full", "diagonal"):
            trust_ok, _, _, _, trust_seconds = results[mode, "trust"]
            for damping in DAMPINGS:
                ok, its, rejected, error, seconds = results[mode, damping]
                cells.append(_cell(ok, its, rejected, error))
                if ok and trust_ok and damping != "trust":
                    ratios.append((name, mode, damping, seconds / trust_seconds))
        rows.append([name, f"{lle_times_length:.3g}"] + cells)
        print(markdown_table(header, rows[-1:]).splitlines()[-1], flush=True)

    print(markdown_table(header, []), flush=True)
    for name, (field, y0, length, substeps) in ode_problems(dtype).items():
        y0 = jnp.asarray(y0, dtype)
        reference = sequential_ode(field, y0, length, substeps)
        results, lle = {}, math.nan
        for mode in ("full", "diagonal"):
            calls = {
                damping_name: (
                    ode_solve(field, length, substeps, mode, damping, max_newton_steps),
                    (y0,),
                )
                for damping_name, damping in DAMPINGS.items()
            }
            times, outputs = time_interleaved(calls, REPEATS)
            for damping_name in DAMPINGS:
                ok, its, rejected, y1, run_lle = ode_outcome(outputs[damping_name])
                error = _relative(y1, reference) if ok else math.nan
                seconds = times[damping_name]
                results[mode, damping_name] = (ok, its, rejected, error, seconds)
                if math.isnan(lle) and not math.isnan(run_lle):
                    lle = run_lle
        add_row(name, results, lle * length)

    for name, (step, h0, xs) in scan_problems(dtype).items():
        collect = lambda h, x, step=step: (step(h, x)[0],) * 2
        reference, carries = jax.lax.scan(collect, h0, xs)
        # The exponent along the sequential carries: Newton started there stops at
        # once, with the blocks of the solution.
        at_solution = scan_solve(step, "full", True, 2, initial_guess=carries)
        lle = scan_outcome(at_solution(h0, xs))[-1]
        results = {}
        for mode in ("full", "diagonal"):
            calls = {
                damping_name: (
                    scan_solve(step, mode, damping, max_newton_steps),
                    (h0, xs),
                )
                for damping_name, damping in DAMPINGS.items()
            }
            times, outputs = time_interleaved(calls, REPEATS)
            for damping_name in DAMPINGS:
                ok, its, rejected, final, _ = scan_outcome(outputs[damping_name])
                error = _relative(final, reference) if ok else math.nan
                seconds = times[damping_name]
                results[mode, damping_name] = (ok, its, rejected, error, seconds)
        add_row(name, results, lle * xs.shape[0])

    table = markdown_table(header, rows)
    ratio_rows = [
        [name, mode, damping, f"{ratio:.2f}"] for name, mode, damping, ratio in ratios
    ]
    ratio_table = markdown_table(
        ["problem", "mode", "damping", "time / TrustRegion time"], ratio_rows
    )
    text = (
        f"# Damping on the hard panel ({jnp.dtype(dtype).name})\n\n"
        f"{machine_line()}, load average {load_average():.2f} at the end; "
        f"max_newton_steps={max_newton_steps}, one window, constant initial guess.\n"
        "Each cell: converged?, Newton iterations (/rejected trials), relative "
        "error of the end state vs the sequential solve.\n\n"
        f"{table}\n\nWall time relative to TrustRegion's, where both converged "
        f"(fastest of {REPEATS} interleaved rounds of the three strategies):\n\n"
        f"{ratio_table}\n"
    )
    print()
    print(ratio_table)
    suffix = "" if dtype == jnp.float64 else "_float32"
    write_result(HERE / "results" / f"hard_panel_cpu{suffix}.md", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float32", action="store_true")
    parser.add_argument("--max-newton-steps", type=int, default=200)
    args = parser.parse_args()
    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    main(jnp.float32 if args.float32 else jnp.float64, args.max_newton_steps)
