"""DeerSolver against sequential Diffrax on the same discretisation."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import EXPLICIT_RK_SOLVERS, max_relative_difference, PROBLEMS

from deer_diffrax import DeerSolver


def _deer_and_sequential(problem, base, num_windows, num_substeps, **deer_kwargs):
    """Solve with DeerSolver (windows of `num_substeps`) and with the base solver on
    the same grid; save at every window end."""
    window = problem.t1 / num_windows
    window_ends = jnp.linspace(0.0, problem.t1, num_windows + 1)[1:]
    deer = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(base, num_substeps=num_substeps, **deer_kwargs),
        0.0,
        problem.t1,
        window,
        problem.y0,
        args=problem.args,
        saveat=diffrax.SaveAt(steps=True, solver_state=True),
        max_steps=num_windows,
    )
    sequential = diffrax.diffeqsolve(
        problem.term,
        base,
        0.0,
        problem.t1,
        window / num_substeps,
        problem.y0,
        args=problem.args,
        saveat=diffrax.SaveAt(ts=window_ends),
        max_steps=num_windows * num_substeps + 1,
    )
    return deer, sequential


# (num_windows, num_substeps): one window over the whole interval, and many windows.
# Per problem so that each one-window solve stays within the range where Newton from
# the constant initial guess converges (measured: long windows of expanding or
# oscillatory dynamics overflow undamped Newton).
_ONE_WINDOW = {
    "decay": (1, 300),
    "complex_linear": (1, 400),
    "lotka_volterra": (1, 400),
    "van_der_pol": (1, 600),
    "pendulum": (1, 2000),
    "dict_state": (1, 500),
    "mlp64": (1, 300),
}
_MANY_WINDOWS = {
    "decay": (6, 50),
    "complex_linear": (8, 50),
    "lotka_volterra": (16, 40),
    "van_der_pol": (12, 50),
    "pendulum": (40, 50),
    "dict_state": (10, 50),
    "mlp64": (6, 50),
}


def _check_matches_sequential(base_cls, name, layout):
    problem = PROBLEMS[name]
    num_windows, num_substeps = (
        _ONE_WINDOW if layout == "one_window" else _MANY_WINDOWS
    )[name]
    deer, sequential = _deer_and_sequential(
        problem, base_cls(), num_windows, num_substeps, max_newton_steps=100
    )
    assert deer.result == diffrax.RESULTS.successful
    ys = jax.tree_util.tree_map(lambda y: y[:num_windows], deer.ys)
    assert max_relative_difference(ys, sequential.ys) <= 1e-9
    assert deer.stats["num_accepted_steps"] == num_windows
    state = deer.solver_state
    assert int(state.num_windows) == num_windows
    assert 1 <= int(state.most_newton_steps) <= 100
    assert float(state.last_residual) <= 1.0


_LAYOUTS = ["one_window", "many_windows"]
# The default run checks every problem and base solver in many windows; one long
# window each runs with `-m slow` (tests/test_accuracy.py keeps single windows in the
# default run).
_DEFAULT_LAYOUTS = [
    "many_windows",
    pytest.param("one_window", marks=pytest.mark.slow),
]
_SOLVER_IDS = lambda c: c.__name__


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("layout", _DEFAULT_LAYOUTS)
def test_every_problem_matches_sequential(name, layout):
    _check_matches_sequential(diffrax.Tsit5, name, layout)


@pytest.mark.parametrize("base_cls", EXPLICIT_RK_SOLVERS, ids=_SOLVER_IDS)
@pytest.mark.parametrize("layout", _DEFAULT_LAYOUTS)
def test_every_base_solver_matches_sequential(base_cls, layout):
    _check_matches_sequential(base_cls, "van_der_pol", layout)


@pytest.mark.slow
@pytest.mark.parametrize("base_cls", EXPLICIT_RK_SOLVERS, ids=_SOLVER_IDS)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("layout", _LAYOUTS)
def test_every_problem_and_base_solver_matches_sequential(base_cls, name, layout):
    _check_matches_sequential(base_cls, name, layout)


def test_analytic_decay():
    y0 = jnp.array([1.0, 2.0])
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: -0.7 * y),
        DeerSolver(num_substeps=200),
        0.0,
        3.0,
        1.0,
        y0,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0, 3, 7)),
    )
    exact = y0 * jnp.exp(-0.7 * jnp.linspace(0, 3, 7))[:, None]
    assert jnp.max(jnp.abs(sol.ys - exact)) < 1e-12


def test_complex_eigenvalues_analytic():
    # y' = A y with eigenvalues -0.1 +- 2i: a decaying rotation.
    problem = PROBLEMS["complex_linear"]
    ts = jnp.linspace(0.0, problem.t1, 9)
    sol = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(diffrax.Dopri8(), num_substeps=100),
        0.0,
        problem.t1,
        1.0,
        problem.y0,
        args=problem.args,
        saveat=diffrax.SaveAt(ts=ts),
    )
    exact = jax.vmap(lambda t: jax.scipy.linalg.expm(t * problem.args) @ problem.y0)(ts)
    assert jnp.max(jnp.abs(sol.ys - exact)) < 1e-10


def _pendulum_solves(saveat, num_windows=8, num_substeps=25):
    problem = PROBLEMS["pendulum"]
    t1 = 10.0
    common = dict(args=problem.args, saveat=saveat, max_steps=4096)
    deer = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(num_substeps=num_substeps),
        0.0,
        t1,
        t1 / num_windows,
        problem.y0,
        **common,
    )
    sequential = diffrax.diffeqsolve(
        problem.term,
        diffrax.Tsit5(),
        0.0,
        t1,
        t1 / (num_windows * num_substeps),
        problem.y0,
        **common,
    )
    return deer, sequential


def test_saveat_ts_matches_sequential_dense_output():
    ts = jnp.linspace(0.0, 10.0, 57)  # not aligned with the substeps
    deer, sequential = _pendulum_solves(diffrax.SaveAt(ts=ts))
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9


def test_saveat_t0_t1():
    deer, sequential = _pendulum_solves(diffrax.SaveAt(t0=True, t1=True))
    assert deer.ys.shape == (2, 2)
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9


def test_saveat_steps_are_window_ends():
    deer, sequential = _pendulum_solves(diffrax.SaveAt(steps=True))
    ts = deer.ts[: deer.stats["num_accepted_steps"]]
    assert jnp.allclose(ts, jnp.linspace(0.0, 10.0, 9)[1:])
    seq_ts = sequential.ts[: sequential.stats["num_accepted_steps"]]
    seq_ys = sequential.ys[: sequential.stats["num_accepted_steps"]]
    assert jnp.allclose(seq_ts[24::25], ts)
    ys = deer.ys[: deer.stats["num_accepted_steps"]]
    assert max_relative_difference(ys, seq_ys[24::25]) <= 1e-9


def test_dense_output_matches_sequential():
    deer, sequential = _pendulum_solves(diffrax.SaveAt(dense=True))
    ts = jnp.linspace(0.0, 10.0, 301)
    a = jax.vmap(deer.evaluate)(ts)
    b = jax.vmap(sequential.evaluate)(ts)
    assert max_relative_difference(a, b) <= 1e-9
    # Derivative of the interpolant, and left/right limits at a window boundary.
    assert max_relative_difference(deer.evaluate(2.5, left=False), b[75]) <= 1e-9
    assert max_relative_difference(deer.evaluate(1.0, 3.0), b[90] - b[30]) <= 1e-9


@pytest.mark.parametrize("name", ["pendulum", "van_der_pol", "lotka_volterra"])
def test_pid_controller_against_reference(name):
    problem = PROBLEMS[name]
    t1 = min(problem.t1, 10.0)
    ts = jnp.linspace(0.0, t1, 11)
    deer = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(num_substeps=20),
        0.0,
        t1,
        None,
        problem.y0,
        args=problem.args,
        stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
        saveat=diffrax.SaveAt(ts=ts),
        max_steps=1000,
    )
    reference = diffrax.diffeqsolve(
        problem.term,
        diffrax.Dopri8(),
        0.0,
        t1,
        None,
        problem.y0,
        args=problem.args,
        stepsize_controller=diffrax.PIDController(rtol=1e-13, atol=1e-13),
        saveat=diffrax.SaveAt(ts=ts),
        max_steps=100_000,
    )
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, reference.ys) <= 1e-6
    # The windows are adapted: far fewer windows than a sequential Tsit5 takes steps.
    assert deer.stats["num_accepted_steps"] < 200


def test_pid_rejects_window_when_newton_fails():
    # A first window far too long for Newton (Van der Pol over 20 time units): the
    # failure must be a rejection that shrinks the window, not an error or NaNs.
    problem = PROBLEMS["van_der_pol"]
    sol = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(num_substeps=200, max_newton_steps=8),
        0.0,
        20.0,
        20.0,
        problem.y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=1000,
    )
    assert sol.result == diffrax.RESULTS.successful
    assert sol.stats["num_rejected_steps"] >= 1
    reference = diffrax.diffeqsolve(
        problem.term,
        diffrax.Dopri8(),
        0.0,
        20.0,
        None,
        problem.y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=100_000,
    )
    assert max_relative_difference(sol.ys, reference.ys) <= 1e-5


def test_jit_and_vmap_over_y0_and_args():
    problem = PROBLEMS["pendulum"]

    def vf(t, y, args):
        return jnp.stack([y[1], -args * jnp.sin(y[0]) - 0.05 * y[1]])

    def solve(solver, y0, strength, dt):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            solver,
            0.0,
            5.0,
            dt,
            y0,
            args=strength,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=1000,
        ).ys[0]

    y0s = jnp.stack([problem.y0, 0.5 * problem.y0, -problem.y0])
    strengths = jnp.array([0.5, 1.0, 2.0])
    deer = jax.jit(jax.vmap(lambda y, s: solve(DeerSolver(num_substeps=50), y, s, 1.0)))
    seq = jax.vmap(lambda y, s: solve(diffrax.Tsit5(), y, s, 1.0 / 50))
    assert max_relative_difference(deer(y0s, strengths), seq(y0s, strengths)) <= 1e-9
    deer_args = jax.vmap(lambda s: solve(DeerSolver(num_substeps=50), y0s[0], s, 1.0))
    seq_args = jax.vmap(lambda s: solve(diffrax.Tsit5(), y0s[0], s, 1.0 / 50))
    assert max_relative_difference(deer_args(strengths), seq_args(strengths)) <= 1e-9


def test_float32():
    problem = PROBLEMS["van_der_pol"]
    y0 = problem.y0.astype(jnp.float32)
    kwargs = dict(saveat=diffrax.SaveAt(t1=True), max_steps=1000)
    t0, t1 = jnp.float32(0.0), jnp.float32(6.0)
    deer = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(num_substeps=50),
        t0,
        t1,
        jnp.float32(1.0),
        y0,
        **kwargs,
    )
    seq = diffrax.diffeqsolve(
        problem.term, diffrax.Tsit5(), t0, t1, jnp.float32(0.02), y0, **kwargs
    )
    assert deer.ys.dtype == jnp.float32
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, seq.ys) <= 1e-4


def test_float32_times_and_integer_times():
    problem = PROBLEMS["decay"]
    exact = problem.y0 * np.exp(-0.7 * 3.0)
    for t0, t1, dt0 in [
        (jnp.float32(0.0), jnp.float32(3.0), jnp.float32(1.0)),
        (0, 3, 1),
    ]:
        sol = diffrax.diffeqsolve(
            problem.term, DeerSolver(num_substeps=100), t0, t1, dt0, problem.y0
        )
        assert sol.result == diffrax.RESULTS.successful
        assert jnp.max(jnp.abs(sol.ys[0] - exact)) < 1e-6


def test_complex_state():
    # y' = i w y - 0.1 y: exact solution y0 exp((i w - 0.1) t); and a field that is not
    # holomorphic (|y|^2 enters), compared with sequential.
    y0 = jnp.array([1.0 + 0.5j, -0.3j])
    rate = jnp.array([2.0j - 0.1, -1.0j - 0.1])
    linear = diffrax.ODETerm(lambda t, y, args: rate * y)
    sol = diffrax.diffeqsolve(
        linear, DeerSolver(num_substeps=200), 0.0, 2.0, 1.0, y0, max_steps=10
    )
    assert sol.ys.dtype == jnp.complex128
    assert jnp.max(jnp.abs(sol.ys[0] - y0 * jnp.exp(2.0 * rate))) < 1e-10

    nonholomorphic = diffrax.ODETerm(
        lambda t, y, args: 1j * jnp.abs(y) ** 2 * y - 0.1 * jnp.conj(y)
    )
    kwargs = dict(saveat=diffrax.SaveAt(t1=True), max_steps=1000)
    deer = diffrax.diffeqsolve(
        nonholomorphic, DeerSolver(num_substeps=50), 0.0, 2.0, 0.5, y0, **kwargs
    )
    seq = diffrax.diffeqsolve(
        nonholomorphic, diffrax.Tsit5(), 0.0, 2.0, 0.01, y0, **kwargs
    )
    assert max_relative_difference(deer.ys, seq.ys) <= 1e-9


def test_strict_promotion_and_rank_promotion():
    problem = PROBLEMS["dict_state"]
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        deer = diffrax.diffeqsolve(
            problem.term,
            DeerSolver(num_substeps=50),
            0.0,
            5.0,
            None,
            problem.y0,
            stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-7),
            saveat=diffrax.SaveAt(t1=True, dense=True),
        )
        deer.evaluate(1.3)
    assert deer.result == diffrax.RESULTS.successful


def test_dt0_none_initial_window():
    problem = PROBLEMS["lotka_volterra"]
    sol = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(num_substeps=30),
        0.0,
        4.0,
        None,
        problem.y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        max_steps=1000,
    )
    assert sol.result == diffrax.RESULTS.successful
    assert jnp.all(jnp.isfinite(sol.ys))


def test_diagonal_jacobian_matches_sequential():
    problem = PROBLEMS["pendulum"]
    deer, sequential = _deer_and_sequential(
        problem, diffrax.Tsit5(), 40, 50, jacobian="diagonal", max_newton_steps=200
    )
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys[:40], sequential.ys) <= 1e-9


def test_one_compilation_for_any_number_of_windows_and_iterations():
    # Windows are Diffrax's step loop and Newton iterations Optimistix's loop, both
    # traced once: new values of y0, args and dt0 (hence of the number of windows and
    # of Newton iterations) reuse the compiled program.
    traces = []

    def field(t, y, args):
        traces.append(None)
        return -args * jnp.sin(y)

    @jax.jit
    def solve(y0, args, dt0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            DeerSolver(num_substeps=20),
            0.0,
            1.0,
            dt0,
            y0,
            args,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            max_steps=64,
        )
        return sol.ys, sol.solver_state.num_windows, sol.solver_state.total_newton_steps

    _, windows, iterations = solve(jnp.array([0.5, 1.0]), 1.0, 0.5)
    num_traces = len(traces)
    _, more_windows, more_iterations = solve(jnp.array([2.0, -1.5]), 3.0, 0.05)
    assert (int(windows), int(more_windows)) == (2, 20)
    assert int(more_iterations) > int(iterations)
    assert len(traces) == num_traces
    assert solve._cache_size() == 1
