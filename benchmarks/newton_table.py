"""Newton iterations and CPU wall-time ratios of DeerSolver configurations.

For each problem, one window layout, every Jacobian mode (full / diagonal), damping
(on / off) and initial guess, prints the Newton iterations (mean and max over
windows), whether the solve succeeded, the max relative difference of the final state
from sequential Tsit5 on the same grid in float64 (next to the sequential solve's own
difference in the chosen dtype), and DeerSolver's wall time divided by the sequential
one's in that dtype.

    python benchmarks/newton_table.py [--repeats 3] [--dtype float32]
"""

import argparse

import diffrax
import jax
import jax.numpy as jnp
from _common import best_time

import deer_diffrax
from deer_diffrax import DeerSolver


jax.config.update("jax_enable_x64", True)


def _pendulum(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - 0.05 * y[1]])


def _van_der_pol(t, y, args):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def _lotka_volterra(t, y, args):
    return jnp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def _kepler(t, y, args):
    q, p = y[:2], y[2:]
    return jnp.concatenate([p, -q / jnp.sum(q**2) ** 1.5])


def _rotating_tanh(t, y, args):
    rotation = jnp.array(
        [[-0.1, 1.0, 0, 0], [-1.0, -0.1, 0, 0], [0, 0, -0.1, 2.0], [0, 0, -2.0, -0.1]],
        dtype=y.dtype,
    )
    return rotation @ y + 0.1 * jnp.tanh(y[::-1])


# name -> (vector field, y0, t1, number of windows, substeps per window)
PROBLEMS = {
    "pendulum": (_pendulum, jnp.array([2.5, 0.0]), 40.0, 20, 200),
    "van_der_pol": (_van_der_pol, jnp.array([2.0, 0.0]), 20.0, 10, 200),
    "lotka_volterra": (_lotka_volterra, jnp.array([4.0, 2.0]), 8.0, 4, 200),
    "kepler_e0.5": (
        _kepler,
        jnp.array([0.5, 0.0, 0.0, jnp.sqrt(3.0)]),
        20.0,
        10,
        200,
    ),
    "rotating_tanh_4d": (
        _rotating_tanh,
        jnp.array([1.0, 0.0, -1.0, 0.5]),
        20.0,
        10,
        400,
    ),
}
GUESSES = ["constant", "previous", "predictor"]


def _sequential_solver(term, t1, window, substeps, windows, dtype):
    @jax.jit
    def solve(y0):
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            jnp.asarray(window / substeps, dtype),
            y0,
            max_steps=windows * substeps + 1,
        )
        return sol.ys[-1]

    return solve


def _deer_solver(term, solver, t1, window, windows, dtype):
    @jax.jit
    def solve(y0):
        sol = diffrax.diffeqsolve(
            term,
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(t1, dtype),
            jnp.asarray(window, dtype),
            y0,
            max_steps=windows,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            throw=False,
        )
        return sol.ys[-1], sol.solver_state, sol.result

    return solve


def _relative(y, reference):
    y = jnp.asarray(y, jnp.float64)
    return float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))


def main(repeats=3, dtype="float64"):
    dtype = jnp.dtype(dtype)
    print(
        "| problem | mode | damping | guess | ok | iters mean/max | rel. diff | "
        f"sequential {dtype.name} rel. diff | time ratio DEER/seq |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (field, y0, t1, windows, substeps) in PROBLEMS.items():
        term = diffrax.ODETerm(field)
        window = t1 / windows
        y0_64 = jnp.asarray(y0, jnp.float64)
        y0 = jnp.asarray(y0, dtype)
        reference = _sequential_solver(
            term, t1, window, substeps, windows, jnp.float64
        )(y0_64)
        sequential = _sequential_solver(term, t1, window, substeps, windows, dtype)
        t_seq, y_seq = best_time(sequential, (y0,), repeats)
        seq_diff = _relative(y_seq, reference)
        for mode in ["full", "diagonal"]:
            for damping in [False, True]:
                for guess in GUESSES:
                    solver = DeerSolver(
                        num_substeps=substeps,
                        jacobian=mode,
                        damping=damping,
                        initial_guess=guess,
                        max_newton_steps=200,
                    )
                    deer = _deer_solver(term, solver, t1, window, windows, dtype)
                    t_deer, (y, state, result) = best_time(deer, (y0,), repeats)
                    ok = bool(result == diffrax.RESULTS.successful)
                    info = deer_diffrax.diagnostics(state)
                    print(
                        f"| {name} | {mode} | {damping} | {guess} | {ok} | "
                        f"{info.mean_newton_steps:.1f}/{info.most_newton_steps} | "
                        f"{_relative(y, reference):.1e} | {seq_diff:.1e} | "
                        f"{t_deer / t_seq:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    options = parser.parse_args()
    main(options.repeats, options.dtype)
