"""Windows shorter than their capacity keep the sequential grid."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import max_relative_difference

import deer_diffrax
from deer_diffrax import DeerSolver
from deer_diffrax._window import substep_grid


def _pendulum(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - 0.1 * y[1]])


_Y0 = jnp.array([1.0, 0.0])
# Windows of 0.5 with 20 substeps of 0.025, and a last window of 0.3 (12 substeps).
_WINDOW_ENDS = jnp.array([0.0, 0.5, 1.0, 1.3])
_SEQUENTIAL_STEP = 0.025


def _solve(solver, terms, stepsize_controller, dt0=None, t1=1.3, **kwargs):
    return diffrax.diffeqsolve(
        terms,
        solver,
        0.0,
        t1,
        dt0,
        _Y0,
        stepsize_controller=stepsize_controller,
        saveat=diffrax.SaveAt(t1=True, dense=True, solver_state=True),
        **kwargs,
    )


def test_grid_of_a_short_window():
    full = substep_grid(0.0, 1.0, 10, jnp.nan)
    assert int(full.num_active) == 10
    assert np.allclose(full.ts, np.linspace(0.0, 1.0, 11), rtol=0, atol=1e-15)
    # Capacity 10 at 0.1 per substep; a window of 0.35 takes four, the last clipped.
    short = substep_grid(1.0, 1.35, 10, 0.1)
    assert int(short.num_active) == 4
    expected = [1.0, 1.1, 1.2, 1.3] + [1.35] * 7
    assert np.allclose(short.ts, expected, rtol=0, atol=1e-15)
    # A rounding error past a whole number of substeps adds no substep of ~eps.
    exact = substep_grid(1.0, 1.0 + 3 * 0.1, 10, 0.1)
    assert int(exact.num_active) == 3
    # A window at least as long as its capacity is divided evenly.
    long = substep_grid(0.0, 2.0, 10, 0.1)
    assert int(long.num_active) == 10
    assert np.allclose(np.diff(long.ts), 0.2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("base", [diffrax.Euler(), diffrax.Tsit5()], ids=type)
def test_short_last_window_keeps_the_sequential_grid(base):
    term = diffrax.ODETerm(_pendulum)
    deer = _solve(DeerSolver(base, num_substeps=20), term, diffrax.StepTo(_WINDOW_ENDS))
    sequential = _solve(base, term, diffrax.ConstantStepSize(), dt0=_SEQUENTIAL_STEP)
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-12
    info = deer_diffrax.diagnostics(deer)
    assert info.num_windows == 3
    assert info.total_substeps == int(sequential.stats["num_steps"]) == 52
    # Dense output, at substep ends and in between, from either side.
    ts = jnp.linspace(0.0, 1.3, 105)
    for left in (True, False):
        expected = jax.vmap(lambda t, left=left: sequential.evaluate(t, left=left))(ts)
        got = jax.vmap(lambda t, left=left: deer.evaluate(t, left=left))(ts)
        assert max_relative_difference(got, expected) <= 1e-12
        fast = deer_diffrax.evaluate(deer, ts, left=left)
        assert max_relative_difference(fast, expected) <= 1e-12


def test_window_clipped_to_a_third_with_an_implicit_base():
    # A stiff-capable base, whose inner root find also meets the zero-length
    # inactive substeps: windows of 1 (30 substeps) and a last one of 1/3.
    root_finder = optx.Newton(rtol=1e-12, atol=1e-12)
    base = diffrax.Kvaerno5(root_finder=root_finder)
    term = diffrax.ODETerm(_pendulum)
    t1 = 2.0 + 1 / 3
    ends = jnp.array([0.0, 1.0, 2.0, t1])
    deer = _solve(DeerSolver(base, num_substeps=30), term, diffrax.StepTo(ends), t1=t1)
    sequential = _solve(base, term, diffrax.StepTo(jnp.linspace(0.0, t1, 71)), t1=t1)
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-10
    assert deer_diffrax.diagnostics(deer).total_substeps == 70


def test_sde_short_window_matches_sequential():
    brownian = diffrax.VirtualBrownianTree(
        0.0, 1.3, tol=1e-4, shape=(2,), key=jax.random.key(0)
    )
    diffusion = lambda t, y, args: 0.2 * jnp.eye(2)
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(_pendulum), diffrax.ControlTerm(diffusion, brownian)
    )
    base = diffrax.EulerHeun()
    deer = _solve(
        DeerSolver(base, num_substeps=20), terms, diffrax.StepTo(_WINDOW_ENDS)
    )
    sequential = _solve(base, terms, diffrax.ConstantStepSize(), dt0=_SEQUENTIAL_STEP)
    # The two grids agree to rounding (`0.5 + k h` against `1.3 k / 52`), which the
    # Brownian path's increments amplify: 1e-10 measured.
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9


def test_gradient_through_a_short_window():
    term = diffrax.ODETerm(lambda t, y, args: -args * y + jnp.sin(y[::-1]))
    controllers = dict(
        deer=(
            DeerSolver(diffrax.Tsit5(), num_substeps=20),
            diffrax.StepTo(_WINDOW_ENDS),
        ),
        sequential=(diffrax.Tsit5(), diffrax.ConstantStepSize()),
    )

    def loss(args, solver, controller):
        dt0 = None if isinstance(controller, diffrax.StepTo) else _SEQUENTIAL_STEP
        sol = diffrax.diffeqsolve(
            term, solver, 0.0, 1.3, dt0, _Y0, args=args, stepsize_controller=controller
        )
        return jnp.sum(sol.ys**2)

    args = jnp.array(0.7)
    grads = {name: jax.grad(loss)(args, *pair) for name, pair in controllers.items()}
    assert max_relative_difference(grads["deer"], grads["sequential"]) <= 1e-10


def test_adaptive_last_window_is_not_over_resolved():
    # PID windows of up to 50 substeps; the last one is clipped at t1 and keeps the
    # substep length of the window before it.
    term = diffrax.ODETerm(_pendulum)
    sol = _solve(
        DeerSolver(num_substeps=50),
        term,
        diffrax.PIDController(rtol=1e-8, atol=1e-10),
        dt0=0.5,
        t1=7.3,
    )
    assert sol.result == diffrax.RESULTS.successful
    windows = int(sol.stats["num_accepted_steps"])
    infos = sol.interpolation.infos
    ts = infos["ts"][:windows]
    active = np.asarray(infos["num_active"][:windows]).astype(int)
    assert active[-1] < 50
    sizes = np.diff(np.asarray(ts), axis=1)
    # Substeps of the window before the last, and of the last except its clipped end.
    assert np.allclose(sizes[-1, : active[-1] - 1], sizes[-2, 0], rtol=1e-12)
    assert sizes[-1, active[-1] - 1] <= sizes[-2, 0] * (1 + 1e-12)
    assert np.all(sizes[-1, active[-1] :] == 0)
    info = deer_diffrax.diagnostics(sol)
    assert info.total_substeps == active.sum()
    reference = diffrax.diffeqsolve(
        term,
        diffrax.Dopri8(),
        0.0,
        7.3,
        0.01,
        _Y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
    )
    assert max_relative_difference(sol.ys, reference.ys) <= 1e-6
