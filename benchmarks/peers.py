"""deer-diffrax against the reference DEER implementation (Lim et al., ICLR 2024:
the `deer` package of the machine-discovery/deer repository), `jax.lax.scan` and
sequential Diffrax, on the reference's own tasks.

The reference is not on PyPI: pass the folder of a checkout of machine-discovery/deer
(the folder that contains the `deer` package) with `--reference PATH`, or put it on
`PYTHONPATH`.

    python benchmarks/peers.py --reference PATH            # default grid
    python benchmarks/peers.py --reference PATH --quick    # a few minutes on 2 cores
    python benchmarks/peers.py --reference PATH --full     # hidden 8/32/64, T 1e3..1e5
    python benchmarks/peers.py --reference PATH --ode --no-gru   # the ODE task alone

Tasks:

- **GRU** (`equinox.nn.GRUCell`, input 4, hidden `--hidden`), `T` random inputs:
    `deer.seq1d(func, h0, xs, params)` against `deer_diffrax.scan` (full Jacobian)
    and `jax.lax.scan`, all returning every hidden state. Errors are
    `max |h - h_scan| / max |h_scan|` against `jax.lax.scan` in the same dtype.
- **ODE** (`--ode`): `y' = -y + 0.5 tanh(W y) + 0.5 sin(w t)`, `n = 4`, steps of
    0.01: `deer.solve_ivp` on `T + 1` time points (its own second-order
    discretisation) against `DeerSolver(Tsit5(), num_substeps=T)` in one window
    and sequential `diffeqsolve` with `Tsit5`, final state only for the Diffrax
    solves. Errors are against a sequential Tsit5 solve with ten times more steps,
    so they include each method's discretisation error.

`fwd` is the solve; `fwd+bwd` is `jax.value_and_grad` of the mean square of the
states with respect to the parameters (errors then compare the gradients). The timed
deer-diffrax GRU call is `deer_diffrax.scan(step, h0, xs)` with its defaults (no
statistics, so no Lyapunov estimate); its Newton iterations come from a separate,
untimed call with `return_stats=True`. Both DEER codes run at their default
tolerances; for the GRU, deer-diffrax also runs at the reference's default
tolerances (`rtol, atol` = `1e-3, 1e-4` in float32, `1e-4, 1e-6` in float64: the
same convergence test as ours with looser values), and for the ODE also with
`DeerSolver(Bosh3(), num_substeps=T)`, a three-stage third-order base on the same
grid, so closer in cost to the reference's second-order discretisation than Tsit5 and
still more accurate than it: the last three columns ("matched").
Timing: every function compiled ahead of time and run once, then
`--repeats` interleaved rounds (each round runs every solver once, so load changes
hit all alike); the table shows the fastest round and ratios (`> 1`: deer-diffrax is
slower). The reference does not report its iteration
count: it is found as the smallest `max_iter` that reproduces its converged result
bit for bit.

Writes the table to `benchmarks/results/peers_<backend>.md` (`--out`).
"""

from __future__ import annotations

import argparse
import functools as ft
import importlib
import sys
from pathlib import Path

from _common import (
    compile_ahead,
    format_seconds,
    HERE,
    load_average,
    machine_line,
    markdown_table,
    time_interleaved,
    write_result,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The reference: pass the folder of a checkout of "
        "machine-discovery/deer (holding the `deer` package) with --reference, "
        "or put it on PYTHONPATH.",
    )
    parser.add_argument(
        "--reference",
        help="folder of a checkout of machine-discovery/deer (default: PYTHONPATH)",
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--lengths", type=lambda s: int(float(s)), nargs="+", default=[1000, 10000]
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "float64"],
        default=["float32", "float64"],
    )
    parser.add_argument(
        "--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"]
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ode", action="store_true", help="also the ODE task")
    parser.add_argument(
        "--no-gru", action="store_true", help="skip the GRU task (with --ode)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small grid: hidden 8, T 1e3 and 1e4 (a few minutes on 2 cores)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the whole grid: hidden 8/32/64, T 1e3/1e4/1e5, and the ODE task",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.lengths = [8], [1000, 10000]
    if args.full:
        args.hidden, args.lengths, args.ode = [8, 32, 64], [1000, 10000, 100000], True
    return args


def import_reference(path: str | None):
    if path is not None:
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        return importlib.import_module("deer")
    except ImportError:
        sys.exit(
            "peers.py: cannot import the reference `deer` package. Pass the folder of "
            "a checkout of machine-discovery/deer with --reference PATH, or put it on "
            "PYTHONPATH."
        )


args = parse_args()
deer = import_reference(args.reference)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


if "float64" in args.dtypes:
    jax.config.update("jax_enable_x64", True)

import deer_diffrax  # noqa: E402


def rel_error(output, reference) -> float:
    """`max |output - reference| / max |reference|` over all leaves."""
    leaves = zip(jax.tree.leaves(output), jax.tree.leaves(reference), strict=True)
    num = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves)
    den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(reference))
    return num / max(den, 1e-300)


def with_grad(solve):
    """`(params, data) -> ((loss, iterations), grads)` for the mean square of the
    states that `solve(params, data) -> (states, iterations)` returns."""

    def loss(params, data):
        states, iterations = solve(params, data)
        return jnp.mean(states**2), iterations

    return jax.value_and_grad(loss, has_aux=True)


def reference_iterations(solve_with_max_iter, params, data, converged) -> int | None:
    """The smallest `max_iter` whose result is the converged one, bit for bit."""
    for max_iter in range(1, 60):
        fn = jax.jit(ft.partial(solve_with_max_iter, max_iter=max_iter))
        if bool(jnp.all(fn(params, data) == converged)):
            return max_iter
    return None


# --------------------------------------------------------------------------------------
# GRU


def reference_tolerances(dtype) -> dict:
    """The reference's default convergence tolerances (`deer.seq1d`): the same test
    as ours, `|update| <= atol + rtol |h|` at every step, with other values."""
    if jnp.dtype(dtype) == jnp.float64:
        return dict(rtol=1e-4, atol=1e-6)
    return dict(rtol=1e-3, atol=1e-4)


def gru_solvers(static, h0):
    """`(params, xs) -> (states, iterations)` for each solver of the GRU, and
    deer-diffrax's iteration counters (at its defaults, and at the reference's
    tolerances)."""

    def cell(params):
        return eqx.combine(params, static)

    def lax_scan(params, xs):
        gru = cell(params)

        def step(h, x):
            h = gru(x, h)
            return h, h

        return jax.lax.scan(step, h0, xs)[1], jnp.asarray(0)

    def ours(params, xs, return_stats=False, **tolerances):
        gru = cell(params)

        def step(h, x):
            h = gru(x, h)
            return h, h

        if not return_stats:
            # What a user calls: no statistics (so no Lyapunov estimate).
            return deer_diffrax.scan(step, h0, xs, **tolerances)[1], jnp.asarray(-1)
        (_, states), stats = deer_diffrax.scan(
            step, h0, xs, throw=False, return_stats=True, **tolerances
        )
        return states, stats.num_newton_steps

    def ours_reference_tolerance(params, xs, return_stats=False):
        return ours(params, xs, return_stats, **reference_tolerances(h0.dtype))

    def reference_func(h, x, params):
        return cell(params)(x, h)

    def reference(params, xs, max_iter=None):
        method = None if max_iter is None else deer.fseq1d.DEER(max_iter=max_iter)
        return deer.seq1d(reference_func, h0, xs, params, method=method).value

    def reference_solver(params, xs):
        return reference(params, xs), jnp.asarray(0)

    solvers = dict(
        lax_scan=lax_scan,
        ours=ours,
        reference=reference_solver,
        ours_matched=ours_reference_tolerance,
    )
    # The timed calls return no statistics; the iterations come from untimed
    # calls that do.
    count = {
        name: jax.jit(lambda params, xs, f=solvers[name]: f(params, xs, True)[1])
        for name in ("ours", "ours_matched")
    }
    return solvers, reference, count


# --------------------------------------------------------------------------------------
# ODE

_ODE_SIZE = 4
_ODE_STEP = 0.01


def _ode_vector_field(y, forcing, params):
    weights, _ = params
    return -y + 0.5 * jnp.tanh(weights @ y) + 0.5 * forcing


def ode_solvers(num_steps: int, dtype):
    t1 = num_steps * _ODE_STEP
    times = jnp.linspace(0, t1, num_steps + 1, dtype=dtype)
    y0 = jnp.linspace(-1, 1, _ODE_SIZE, dtype=dtype)

    def term():
        return diffrax.ODETerm(
            lambda t, y, params: _ode_vector_field(y, jnp.sin(params[1] * t), params)
        )

    def diffrax_solve(params, solver, dt0, max_steps, solver_state=False):
        return diffrax.diffeqsolve(
            term(),
            solver,
            jnp.asarray(0, dtype),
            jnp.asarray(t1, dtype),
            jnp.asarray(dt0, dtype),
            y0,
            args=params,
            saveat=diffrax.SaveAt(t1=True, solver_state=solver_state),
            max_steps=max_steps,
        )

    def sequential(params, _):
        sol = diffrax_solve(params, diffrax.Tsit5(), _ODE_STEP, num_steps + 1)
        return sol.ys, jnp.asarray(0)

    def fine(params):
        sol = diffrax_solve(params, diffrax.Tsit5(), _ODE_STEP / 10, 10 * num_steps + 1)
        return sol.ys

    def ours(params, _, base=None):
        base = diffrax.Tsit5() if base is None else base
        solver = deer_diffrax.DeerSolver(base, num_substeps=num_steps)
        sol = diffrax_solve(params, solver, t1, 2, solver_state=True)
        return sol.ys, sol.solver_state.most_newton_steps

    def ours_second_order(params, data):
        # On the same grid, a cheaper base than Tsit5 that is still more accurate
        # than the reference's second-order discretisation: Bogacki-Shampine (3rd).
        return ours(params, data, base=diffrax.Bosh3())

    def reference(params, _, max_iter=None):
        method = None if max_iter is None else deer.fsolve_ivp.DEER(max_iter=max_iter)
        forcing = jnp.sin(params[1] * times)[:, None]
        return deer.solve_ivp(
            _ode_vector_field, y0, forcing, params, times, method=method
        ).value

    def reference_solver(params, data):
        return reference(params, data)[-1:], jnp.asarray(0)

    solvers = dict(
        lax_scan=sequential,
        ours=ours,
        reference=reference_solver,
        ours_matched=ours_second_order,
    )
    count = {
        name: jax.jit(lambda params, data, f=solvers[name]: f(params, data)[1])
        for name in ("ours", "ours_matched")
    }
    return solvers, reference, fine, count


# --------------------------------------------------------------------------------------


_HEADER = [
    "task",
    "n",
    "T",
    "dtype",
    "pass",
    "baseline",
    "reference",
    "deer-diffrax",
    "ours / reference",
    "ours / baseline",
    "its (ours / ref)",
    "err ours",
    "err ref",
    "ours matched / reference",
    "its (ours matched)",
    "err ours matched",
]


_REFERENCE_ITERATIONS: dict = {}


def measure_row(
    task,
    size,
    num_steps,
    dtype,
    pass_,
    solvers,
    reference,
    data,
    params,
    exact,
    repeats,
    count_iterations,
):
    """Times the solvers of one configuration and returns the table row.
    `count_iterations[name](params, data)` gives deer-diffrax's Newton iterations
    (untimed) for each of its variants."""
    fns = {
        name: (solve if pass_ == "fwd" else with_grad(solve))
        for name, solve in solvers.items()
    }
    calls = {}
    for name, fn in fns.items():
        compiled, _ = compile_ahead(fn, (params, data))
        calls[name] = (compiled, (params, data))
    times, outputs = time_interleaved(calls, repeats)
    if pass_ == "fwd":
        values = {name: out[0] for name, out in outputs.items()}
    else:
        values = {name: out[1] for name, out in outputs.items()}
    target = values["lax_scan"] if exact is None else exact
    iterations = {name: int(f(params, data)) for name, f in count_iterations.items()}
    key = (task, size, num_steps, dtype)
    if key not in _REFERENCE_ITERATIONS:
        converged = jax.jit(reference)(params, data)
        _REFERENCE_ITERATIONS[key] = reference_iterations(
            reference, params, data, converged
        )
    ref_its = _REFERENCE_ITERATIONS[key]
    return [
        task,
        size,
        f"{num_steps:.0e}".replace("+0", ""),
        dtype,
        pass_,
        format_seconds(times["lax_scan"]),
        format_seconds(times["reference"]),
        format_seconds(times["ours"]),
        f"**{times['ours'] / times['reference']:.2f}**",
        f"{times['ours'] / times['lax_scan']:.2f}",
        f"{iterations['ours']} / {ref_its if ref_its is not None else '?'}",
        f"{rel_error(values['ours'], target):.1e}",
        f"{rel_error(values['reference'], target):.1e}",
    ] + (
        [
            f"{times['ours_matched'] / times['reference']:.2f}",
            f"{iterations['ours_matched']}",
            f"{rel_error(values['ours_matched'], target):.1e}",
        ]
        if "ours_matched" in times
        else ["-"] * 3
    )


def gru_rows(args):
    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        for hidden in args.hidden:
            gru = eqx.nn.GRUCell(4, hidden, dtype=dtype, key=jax.random.PRNGKey(0))
            params, static = eqx.partition(gru, eqx.is_array)
            solvers, reference, count = gru_solvers(static, jnp.zeros(hidden, dtype))
            for num_steps in args.lengths:
                xs = jax.random.normal(
                    jax.random.PRNGKey(num_steps), (num_steps, 4), dtype
                )
                for pass_ in args.passes:
                    yield measure_row(
                        "GRU",
                        hidden,
                        num_steps,
                        dtype_name,
                        pass_,
                        solvers,
                        reference,
                        xs,
                        params,
                        None,
                        args.repeats,
                        count,
                    )


def ode_rows(args):
    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        key_w, key_f = jax.random.split(jax.random.PRNGKey(0))
        weights = jnp.linalg.qr(jax.random.normal(key_w, (_ODE_SIZE, _ODE_SIZE)))[0]
        params = (weights.astype(dtype), jnp.asarray(2.0, dtype))
        for num_steps in [t for t in args.lengths if t <= 10000]:
            solvers, reference, fine, count = ode_solvers(num_steps, dtype)
            for pass_ in args.passes:
                if pass_ == "fwd":
                    exact = fine(params)
                else:
                    exact = jax.grad(lambda p, f=fine: jnp.mean(f(p) ** 2))(params)
                yield measure_row(
                    "ODE",
                    _ODE_SIZE,
                    num_steps,
                    dtype_name,
                    pass_,
                    solvers,
                    reference,
                    jnp.zeros(()),
                    params,
                    exact,
                    args.repeats,
                    count,
                )


def main(args) -> None:
    loads = [load_average()]
    header_text = (
        f"{machine_line()}\n\nBaseline: `jax.lax.scan` (GRU) or sequential Diffrax "
        "Tsit5 (ODE). Ratios are times over times: `> 1` means deer-diffrax is "
        "slower. Errors: GRU against `jax.lax.scan` in the same dtype; ODE against a "
        "sequential Tsit5 solve with 10x more steps (so the reference's error includes "
        "its second-order discretisation).\n"
    )
    print(header_text)
    rows = []
    out = args.out or HERE / "results" / f"peers_{jax.default_backend()}.md"
    generators = ([] if args.no_gru else [gru_rows(args)]) + (
        [ode_rows(args)] if args.ode else []
    )
    for generator in generators:
        for row in generator:
            rows.append(row)
            loads.append(load_average())
            table = markdown_table(_HEADER, rows)
            lines = markdown_table(_HEADER, [row]).splitlines()
            print("\n".join(lines if len(rows) == 1 else lines[-1:]), flush=True)
            load_text = (
                f"\nLoad average (1 min) during the run: {min(loads):.2f} to "
                f"{max(loads):.2f}; {args.repeats} rounds; hidden {args.hidden}, "
                f"T {args.lengths}, {args.dtypes}, {args.passes}.\n"
            )
            write_result(out, header_text + "\n" + table + "\n" + load_text)
    print(load_text)
    print(f"written to {out}")


if __name__ == "__main__":
    main(args)
