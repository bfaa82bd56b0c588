"""Bad input and failed Newton solves give clear errors or result codes, never a
silently wrong answer."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import max_relative_difference, PROBLEMS

from deer_diffrax import DeerSolver


@pytest.mark.parametrize(
    "base",
    [diffrax.SemiImplicitEuler(), diffrax.ReversibleHeun(), diffrax.LeapfrogMidpoint()],
    ids=lambda s: type(s).__name__,
)
def test_unsupported_base_solver(base):
    with pytest.raises(ValueError, match="one-step base solver"):
        DeerSolver(base)


def test_nested_deer_solver_rejected():
    with pytest.raises(ValueError, match="one-step base solver"):
        DeerSolver(DeerSolver())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_substeps=0), "num_substeps"),
        (dict(max_newton_steps=0), "max_newton_steps"),
        (dict(rtol=-1.0), "rtol"),
        (dict(jacobian="banana"), "Unknown Jacobian mode"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeerSolver(**kwargs)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_y0(bad):
    problem = PROBLEMS["pendulum"]
    y0 = problem.y0.at[0].set(bad)
    with pytest.raises(eqx.EquinoxRuntimeError, match="y0 contains NaN or inf"):
        diffrax.diffeqsolve(
            problem.term, DeerSolver(num_substeps=10), 0.0, 1.0, 0.5, y0
        )


def test_unsafe_brownian_path_rejected():
    brownian = diffrax.UnsafeBrownianPath(shape=(2,), key=jax.random.PRNGKey(0))
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y),
        diffrax.ControlTerm(lambda t, y, args: 0.1 * y, brownian),
    )
    with pytest.raises(ValueError, match="UnsafeBrownianPath"):
        diffrax.diffeqsolve(
            terms, DeerSolver(diffrax.Euler()), 0.0, 1.0, 0.5, jnp.ones(2)
        )


def test_wrong_term_structure_rejected():
    # Tsit5 (hence DeerSolver(Tsit5)) takes a single term, not a tuple of terms.
    terms = (diffrax.ODETerm(lambda t, y, args: -y), diffrax.ODETerm(lambda t, y, a: y))
    with pytest.raises(Exception, match="term"):
        diffrax.diffeqsolve(terms, DeerSolver(), 0.0, 1.0, 0.5, jnp.ones(2))


def _long_van_der_pol(throw, max_newton_steps=8, damping=False):
    # One window of Van der Pol over 20 time units: undamped Newton from the constant
    # guess overflows within a few iterations (measured).
    problem = PROBLEMS["van_der_pol"]
    return diffrax.diffeqsolve(
        problem.term,
        DeerSolver(
            num_substeps=2000, max_newton_steps=max_newton_steps, damping=damping
        ),
        0.0,
        20.0,
        20.0,
        problem.y0,
        throw=throw,
    )


def test_newton_failure_raises_with_throw():
    with pytest.raises(eqx.EquinoxRuntimeError, match="onlinear solve"):
        _long_van_der_pol(throw=True)


def test_newton_failure_gives_result_code_without_throw():
    sol = _long_van_der_pol(throw=False)
    assert sol.result != diffrax.RESULTS.successful
    assert sol.result in (
        diffrax.RESULTS.nonlinear_max_steps_reached,
        diffrax.RESULTS.nonlinear_divergence,
    )


def test_newton_divergence_to_nan_is_reported():
    # Undamped Newton, run long enough to blow up: the non-finite iterate is reported
    # as divergence, and no NaN is returned as a success.
    sol = _long_van_der_pol(throw=False, max_newton_steps=60)
    assert sol.result == diffrax.RESULTS.nonlinear_divergence


def test_damping_rescues_the_same_window():
    sol = _long_van_der_pol(throw=True, max_newton_steps=80, damping=True)
    problem = PROBLEMS["van_der_pol"]
    sequential = diffrax.diffeqsolve(
        problem.term, diffrax.Tsit5(), 0.0, 20.0, 0.01, problem.y0, max_steps=2001
    )
    assert max_relative_difference(sol.ys, sequential.ys) <= 1e-9
