"""Regressions: a failed window is never read as an answer, `throw=False` never
raises, and DeerSolver behaves like Diffrax's own solvers as a pytree."""

import pickle

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

from deer_diffrax import DeerSolver


def _nan_beyond_two(t, y, args):
    # Real only for t <= 2: a window reaching past it cannot converge.
    return -args * jnp.sqrt(2 - t) * jnp.ones_like(y)


def _exact_nan_beyond_two(t, y0=1.0):
    return y0 + (2 / 3) * ((2 - t) ** 1.5 - 2**1.5)


_EVENT = diffrax.Event(
    lambda t, y, args, **kwargs: t - 1.9, root_finder=optx.Newton(1e-12, 1e-12)
)


def test_event_in_a_failed_window_is_not_an_answer():
    # The window [1.8, 2.4] holds the event at t = 1.9 but cannot be solved. Diffrax
    # replaces any solver failure by `event_occurred` when a terminating event
    # fires, so the window's values must be unusable rather than plausible.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_nan_beyond_two),
        DeerSolver(num_substeps=20),
        0.0,
        3.0,
        0.6,
        jnp.array(1.0),
        args=1.0,
        event=_EVENT,
        throw=False,
    )
    if sol.result == diffrax.RESULTS.event_occurred:
        assert not np.any(np.isfinite(np.asarray(sol.ys)))
    else:
        assert sol.result != diffrax.RESULTS.successful


def test_event_after_rejected_windows_is_exact():
    # Under an adaptive controller the failed window is rejected and shrunk, and the
    # event is then found on converged windows.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_nan_beyond_two),
        DeerSolver(num_substeps=20),
        0.0,
        3.0,
        0.6,
        jnp.array(1.0),
        args=1.0,
        event=_EVENT,
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        max_steps=200,
    )
    assert sol.result == diffrax.RESULTS.event_occurred
    assert float(sol.ts[-1]) == pytest.approx(1.9, abs=1e-10)
    assert float(sol.ys[-1]) == pytest.approx(_exact_nan_beyond_two(1.9), abs=1e-6)


def test_failed_window_values_are_nan():
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_nan_beyond_two),
        DeerSolver(num_substeps=20),
        0.0,
        3.0,
        0.6,
        jnp.array(1.0),
        args=1.0,
        saveat=diffrax.SaveAt(ts=jnp.array([1.0, 2.2])),
        throw=False,
    )
    assert sol.result != diffrax.RESULTS.successful
    assert float(sol.ys[0]) == pytest.approx(_exact_nan_beyond_two(1.0), abs=1e-9)
    assert np.isnan(float(sol.ys[1]))


def test_gradient_of_failed_solve_with_throw_false():
    def loss(y0, scale):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_nan_beyond_two),
            DeerSolver(num_substeps=20),
            0.0,
            3.0,
            0.6,
            y0,
            args=scale,
            throw=False,
        )
        return jnp.sum(sol.ys)

    # No error from Lineax or anywhere else; the derivative with respect to the
    # parameter of the failed vector field is NaN, as is the loss.
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(
        jnp.array(1.0), jnp.array(1.0)
    )
    assert np.isnan(float(value))
    assert np.isnan(float(grads[1]))

    # Where the solve succeeds the gradient is finite and exact: y(1.8) is
    # y0 - scale * (2/3) (2^1.5 - 0.2^1.5).
    def good_loss(y0, scale):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_nan_beyond_two),
            DeerSolver(num_substeps=20),
            0.0,
            1.8,
            0.6,
            y0,
            args=scale,
            throw=False,
        )
        return jnp.sum(sol.ys)

    grads = jax.grad(good_loss, argnums=(0, 1))(jnp.array(1.0), jnp.array(1.0))
    assert float(grads[0]) == pytest.approx(1.0, abs=1e-10)
    expected = -(2 / 3) * (2**1.5 - 0.2**1.5)
    assert float(grads[1]) == pytest.approx(expected, rel=1e-6)


def _decay(t, y, args):
    return -y + jnp.sin(3 * t)


def test_solver_passes_through_jit_as_an_argument():
    @jax.jit
    def solve(solver, y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_decay), solver, 0.0, 1.0, 0.5, y0
        ).ys

    # Between them: a solver state carried across windows, a non-default base and
    # Jacobian mode, and every option that used to be a string leaf.
    for solver in [
        DeerSolver(diffrax.Heun(), initial_guess="previous"),
        DeerSolver(jacobian="diagonal", initial_guess="predictor"),
    ]:
        direct = diffrax.diffeqsolve(
            diffrax.ODETerm(_decay), solver, 0.0, 1.0, 0.5, jnp.array(1.0)
        ).ys
        np.testing.assert_allclose(solve(solver, jnp.array(1.0)), direct, rtol=1e-12)


def test_dense_solution_pickles():
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_decay),
        DeerSolver(),
        0.0,
        1.0,
        0.5,
        jnp.array(1.0),
        saveat=diffrax.SaveAt(dense=True),
    )
    restored = pickle.loads(pickle.dumps(sol))
    for t in [0.1, 0.5, 0.77]:
        assert float(restored.evaluate(t)) == float(sol.evaluate(t))


def test_python_float_args():
    field = lambda t, y, args: -args * y
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), DeerSolver(), 0.0, 1.0, 0.5, jnp.array(1.0), args=0.5
    )
    assert float(sol.ys[-1]) == pytest.approx(np.exp(-0.5), rel=1e-8)
    # NaN is a float that is not equal to itself: still a reported failure.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        DeerSolver(),
        0.0,
        1.0,
        0.5,
        jnp.array(1.0),
        args=float("nan"),
        throw=False,
    )
    assert sol.result != diffrax.RESULTS.successful


def test_sign_change_event_inside_a_long_window():
    # A damped pendulum's first zero crossing, inside a window of many substeps,
    # found by bisection on the window's dense output: the sequential solve's event
    # time and its derivative with respect to the field's parameter.
    def pendulum(t, y, gain):
        return jnp.stack([y[1], -gain * jnp.sin(y[0]) - 0.1 * y[1]])

    event = diffrax.Event(
        lambda t, y, args, **kwargs: y[0], root_finder=optx.Bisection(1e-12, 1e-12)
    )

    def event_time(gain, solver):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(pendulum),
            solver,
            0.0,
            5.0,
            None,
            jnp.array([2.5, 0.0]),
            args=gain,
            event=event,
            stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
            max_steps=10_000,
        )
        return sol.ts[-1]

    solver = DeerSolver(num_substeps=100)
    got, got_derivative = jax.value_and_grad(event_time)(1.0, solver)
    expected, expected_derivative = jax.value_and_grad(event_time)(1.0, diffrax.Tsit5())
    assert 2.6 < float(expected) < 2.8
    assert abs(float(got) - float(expected)) <= 1e-8
    assert abs(float(got_derivative - expected_derivative)) <= 1e-6
