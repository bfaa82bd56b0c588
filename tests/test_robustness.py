"""Jacobian modes, initial guesses, damping, fallback and diagnostics."""

import diffrax
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import equations, max_relative_difference, PROBLEMS

import deer_diffrax
from deer_diffrax import DeerNewton, DeerSolver


def _compare(problem, num_windows, num_substeps, t1=None, **deer_kwargs):
    t1 = problem.t1 if t1 is None else t1
    window = t1 / num_windows
    kwargs = dict(args=problem.args, max_steps=num_windows * num_substeps + 1)
    deer = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(num_substeps=num_substeps, **deer_kwargs),
        0.0,
        t1,
        window,
        problem.y0,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        throw=False,
        **kwargs,
    )
    sequential = diffrax.diffeqsolve(
        problem.term,
        diffrax.Tsit5(),
        0.0,
        t1,
        window / num_substeps,
        problem.y0,
        saveat=diffrax.SaveAt(t1=True),
        **kwargs,
    )
    return deer, sequential


def _coarse_guess(problem, t1):
    coarse = diffrax.diffeqsolve(
        problem.term,
        diffrax.Tsit5(),
        0.0,
        t1,
        t1 / 40,
        problem.y0,
        args=problem.args,
        saveat=diffrax.SaveAt(dense=True),
    )
    return coarse.evaluate


_GUESSES = ["constant", "previous", "predictor", "trajectory"]


def _guess(name, problem, t1):
    return _coarse_guess(problem, t1) if name == "trajectory" else name


@pytest.mark.parametrize("guess", _GUESSES)
@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_modes_and_guesses_match_sequential(mode, guess):
    problem = PROBLEMS["pendulum"]
    deer, sequential = _compare(
        problem,
        40,
        50,
        jacobian=mode,
        initial_guess=_guess(guess, problem, problem.t1),
        max_newton_steps=200,
        rtol=1e-13,
        atol=1e-13,
    )
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("guess", _GUESSES)
@pytest.mark.parametrize("mode", ["full", "diagonal"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_modes_and_guesses_on_every_problem(name, mode, guess):
    problem = PROBLEMS[name]
    deer, sequential = _compare(
        problem,
        10,
        40,
        jacobian=mode,
        initial_guess=_guess(guess, problem, problem.t1),
        max_newton_steps=300,
        rtol=1e-13,
        atol=1e-13,
    )
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9


# Slow run only (CI time): an iteration-count property; the guesses' correctness
# is tested by test_modes_and_guesses_match_sequential.
@pytest.mark.slow
def test_better_guesses_need_fewer_iterations():
    problem = PROBLEMS["van_der_pol"]
    iterations = {}
    for guess in ["constant", "predictor", "trajectory"]:
        deer, sequential = _compare(
            problem, 1, 600, initial_guess=_guess(guess, problem, problem.t1)
        )
        assert deer.result == diffrax.RESULTS.successful
        assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9
        iterations[guess] = int(deer.solver_state.last_newton_steps)
    assert iterations["predictor"] < iterations["constant"]
    assert iterations["trajectory"] < iterations["constant"]


def _lorenz(t, y, args):
    x, v, z = y[0], y[1], y[2]
    return jnp.stack([10 * (v - x), x * (28 - z) - v, x * v - 8 / 3 * z])


def test_lorenz_never_silently_wrong():
    # Chaotic: one window over [0, 20] is out of Newton's reach from a constant guess.
    # Whatever happens, success must mean agreement with the sequential solve.
    term = diffrax.ODETerm(_lorenz)
    y0 = jnp.array([1.0, 1.0, 1.0])
    sequential = diffrax.diffeqsolve(
        term, diffrax.Tsit5(), 0.0, 20.0, 0.005, y0, max_steps=4001
    )
    for kwargs in [dict(damping=False), dict(damping=True)]:
        sol = diffrax.diffeqsolve(
            term,
            DeerSolver(num_substeps=4000, max_newton_steps=40, **kwargs),
            0.0,
            20.0,
            20.0,
            y0,
            throw=False,
        )
        if sol.result == diffrax.RESULTS.successful:
            assert max_relative_difference(sol.ys, sequential.ys) <= 1e-9
        else:
            assert sol.result in (
                diffrax.RESULTS.nonlinear_max_steps_reached,
                diffrax.RESULTS.nonlinear_divergence,
            )
    # With the sequential fallback the window is finished and marked as such.
    sol = diffrax.diffeqsolve(
        term,
        DeerSolver(num_substeps=4000, max_newton_steps=10, fallback="sequential"),
        0.0,
        20.0,
        20.0,
        y0,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    assert max_relative_difference(sol.ys, sequential.ys) <= 1e-9
    assert int(sol.solver_state.num_fallbacks) == 1
    assert deer_diffrax.diagnostics(sol).num_fallbacks == 1


@pytest.mark.parametrize(
    "field, y0, t1",
    [
        (lambda t, y, args: y**2, jnp.array([1.0]), 2.0),  # blows up at t = 1
        (_lorenz, jnp.array([1.0, 1.0, 1.0]), 3.0),
    ],
    ids=["blow-up", "lorenz"],
)
def test_damping_that_can_only_repeat_itself_stops(field, y0, t1):
    # Shrinking at its largest lambda (a Picard sweep) from an iterate whose sweep
    # overflows: every step would compute the same non-finite trial and reject it.
    # The solve stops there as diverged instead of running out its iterations
    # (before: 50 of 50 iterations on both, reported as out of steps).
    max_newton_steps = 50
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        DeerSolver(num_substeps=100, max_newton_steps=max_newton_steps, damping=True),
        0.0,
        t1,
        t1,
        y0,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        max_steps=1,
        throw=False,
    )
    assert sol.result == diffrax.RESULTS.nonlinear_divergence
    assert int(sol.solver_state.last_newton_steps) < max_newton_steps
    assert bool(jnp.all(jnp.isnan(sol.ys)))


def test_default_trust_region_solves_a_window_that_shrinking_cannot():
    # Why the trust region is DeerSolver's default: one Lorenz window of 100
    # substeps over [0, 3] converges to the sequential solve with it (25 iterations
    # when measured) and diverges with `damping=True`.
    term = diffrax.ODETerm(_lorenz)
    y0 = jnp.array([1.0, 1.0, 1.0])
    sequential = diffrax.diffeqsolve(
        term, diffrax.Tsit5(), 0.0, 3.0, 0.03, y0, max_steps=101
    )
    assert isinstance(DeerSolver().damping, deer_diffrax.TrustRegion)

    def solve(**kwargs):
        return diffrax.diffeqsolve(
            term,
            DeerSolver(num_substeps=100, **kwargs),
            0.0,
            3.0,
            3.0,
            y0,
            max_steps=1,
            throw=False,
        )

    sol = solve()
    assert sol.result == diffrax.RESULTS.successful
    assert max_relative_difference(sol.ys, sequential.ys) <= 1e-9
    assert solve(damping=True).result != diffrax.RESULTS.successful


# Slow run only (CI time): a cost property, not a correctness one.
@pytest.mark.slow
def test_damping_costs_nothing_when_newton_works():
    problem = PROBLEMS["mlp64"]
    results = {}
    for damping in [False, True]:
        deer, sequential = _compare(problem, 6, 50, damping=damping)
        assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9
        results[damping] = deer.solver_state
    assert int(results[True].num_rejected) == 0
    assert int(results[True].total_newton_steps) == int(
        results[False].total_newton_steps
    )


def _output_shapes(jaxpr, primitive):
    """The output shapes of every `primitive` equation in `jaxpr` and the jaxprs
    nested in it (loop bodies, branches, inner jits)."""
    return [
        tuple(v.aval.shape)
        for eqn in equations(jaxpr)
        if eqn.primitive.name == primitive
        for v in eqn.outvars
    ]


def test_shrinking_keeps_no_copy_of_the_blocks():
    # A trial that shrinking rejects takes no step; the next step linearises the
    # anchor again. So Newton neither selects the anchor's `(T, n, n)` blocks
    # against the trial's in every step nor carries them (that select made a GRU
    # scan's forward solve 13-27% slower than undamped Newton at T = 1e5).
    num_steps, size = 50, 3
    weights = jnp.eye(size) * 0.5

    def solve(xs):
        def step(h, x):
            h = jnp.tanh(weights @ h + x)
            return h, h

        return deer_diffrax.scan(step, jnp.zeros(size), xs, damping=True)

    jaxpr = jax.make_jaxpr(solve)(jnp.ones((num_steps, size)))
    selected = _output_shapes(jaxpr.jaxpr, "select_n")
    assert (num_steps, size) in selected  # the anchor itself is still selected
    assert (num_steps, size, size) not in selected


def test_adaptive_windows_shrink_past_failures():
    # Lotka--Volterra far from equilibrium: a 4-unit first window fails, the PID
    # controller rejects it and finds windows Newton can solve.
    problem = PROBLEMS["lotka_volterra"]
    y0 = jnp.array([10.0, 1.0])
    sol = diffrax.diffeqsolve(
        problem.term,
        DeerSolver(num_substeps=100, max_newton_steps=20),
        0.0,
        4.0,
        4.0,
        y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=1000,
    )
    reference = diffrax.diffeqsolve(
        problem.term,
        diffrax.Dopri8(),
        0.0,
        4.0,
        None,
        y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=100_000,
    )
    assert sol.stats["num_rejected_steps"] >= 1
    assert max_relative_difference(sol.ys, reference.ys) <= 1e-5


def test_diagnostics_helper():
    problem = PROBLEMS["van_der_pol"]
    deer, _ = _compare(problem, 12, 50)
    info = deer_diffrax.diagnostics(deer)
    assert info.num_windows == 12
    assert sum(info.newton_steps_histogram.values()) == 12
    assert info.total_newton_steps == sum(
        k * v for k, v in info.newton_steps_histogram.items()
    )
    assert info.most_newton_steps == max(info.newton_steps_histogram)
    assert info.last_residual <= 1
    assert "12 windows" in str(info)
    with pytest.raises(ValueError, match="solver_state=True"):
        deer_diffrax.diagnostics(
            diffrax.diffeqsolve(
                problem.term, DeerSolver(num_substeps=10), 0.0, 1.0, 0.5, problem.y0
            )
        )


def test_diagonal_mode_gradients_are_exact():
    # Quasi-Newton only changes the forward iterations: the implicit gradient always
    # uses the exact transposed Jacobian.
    problem = PROBLEMS["pendulum"]

    def loss(y0, solver, dt):
        sol = diffrax.diffeqsolve(
            problem.term, solver, 0.0, 5.0, dt, y0, max_steps=1000
        )
        return jnp.sum(sol.ys[-1] ** 2)

    deer = DeerSolver(num_substeps=50, jacobian="diagonal", max_newton_steps=200)
    g_deer = jax.grad(loss)(problem.y0, deer, 1.0)
    g_seq = jax.grad(loss)(problem.y0, diffrax.Tsit5(), 1.0 / 50)
    assert max_relative_difference(g_deer, g_seq) <= 1e-8


@st.composite
def _stable_linear_system(draw):
    n = draw(st.integers(1, 4))
    num_substeps = draw(st.integers(2, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    skew = rng.normal(size=(n, n))
    # Negative-definite symmetric part: all eigenvalues in the left half-plane.
    a = -(m @ m.T) / n - 0.1 * np.eye(n) + (skew - skew.T)
    y0 = rng.normal(size=n)
    return jnp.asarray(a), jnp.asarray(y0), num_substeps


def _tsit5_residual(term, a, y0, ts):
    solver = diffrax.Tsit5(scan_kind="bounded")  # a forward-differentiable loop

    def phi(y, ta, tb):
        state = solver.init(term, ta, tb, y, a)
        return solver.step(term, ta, tb, y, a, state, made_jump=True)[0]

    def residual(trajectory, _):
        previous = jnp.concatenate([y0[None], trajectory[:-1]])
        return trajectory - jax.vmap(phi)(previous, ts[:-1], ts[1:])

    return residual


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(_stable_linear_system())
def test_linear_odes_converge_in_one_newton_iteration(system):
    # For y' = A y every Runge--Kutta step is affine in y, so the linearisation is
    # exact and one full Newton step lands on the sequential solution.
    a, y0, num_substeps = system
    term = diffrax.ODETerm(lambda t, y, args: args @ y)
    sequential = diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        0.0,
        1.0,
        1.0 / num_substeps,
        y0,
        args=a,
        saveat=diffrax.SaveAt(steps=True),
    )
    ts = jnp.linspace(0.0, 1.0, num_substeps + 1)
    one_step = optx.root_find(
        _tsit5_residual(term, a, y0, ts),
        DeerNewton(rtol=1e-12, atol=1e-12),
        jnp.broadcast_to(y0, (num_substeps, y0.shape[0])),
        max_steps=1,
        throw=False,
        tags=frozenset({deer_diffrax.unit_lower_block_bidiagonal_tag}),
    )
    exact = sequential.ys[:num_substeps]
    assert max_relative_difference(one_step.value, exact) <= 1e-10


def test_linear_ode_solver_takes_one_iteration_plus_confirmation():
    a = jnp.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.0, -0.3, -1.0]])
    y0 = jnp.array([1.0, -1.0, 0.5])
    term = diffrax.ODETerm(lambda t, y, args: args @ y)
    sol = diffrax.diffeqsolve(
        term,
        DeerSolver(num_substeps=200),
        0.0,
        4.0,
        4.0,
        y0,
        args=a,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    # The first iteration solves the window, the second only confirms convergence.
    assert int(sol.solver_state.last_newton_steps) == 2
    exact = jax.scipy.linalg.expm(4.0 * a) @ y0
    assert max_relative_difference(sol.ys[-1], exact) <= 1e-10
