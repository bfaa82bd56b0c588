"""Written-out one-step maps and `linearise="vector_field"` (cheap Newton blocks)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import EXPLICIT_RK_SOLVERS, max_relative_difference, PROBLEMS
from test_solver import _deer_and_sequential
from test_stiff_and_sde import _sde_terms

from deer_diffrax import DeerSolver, diagnostics
from deer_diffrax._one_step import one_step_map


@pytest.mark.parametrize("base_cls", EXPLICIT_RK_SOLVERS, ids=lambda c: c.__name__)
def test_one_step_map_is_the_base_step(base_cls):
    problem = PROBLEMS["dict_state"]
    base = base_cls()
    t0, t1 = 0.3, 0.45
    state = base.init(problem.term, t0, t1, problem.y0, None)
    y1, y_error, dense_info, _, _ = base.step(
        problem.term, t0, t1, problem.y0, None, state, True
    )
    got = one_step_map(base)(problem.term, t0, t1, problem.y0, None)
    assert max_relative_difference(got, y1) <= 1e-14
    assert jax.tree.structure(got) == jax.tree.structure(y1)
    outputs = one_step_map(base, with_outputs=True)(
        problem.term, t0, t1, problem.y0, None
    )
    expected = (y1, y_error, dense_info)
    assert jax.tree.structure(outputs) == jax.tree.structure(expected)
    for got_leaf, leaf in zip(
        jax.tree.leaves(outputs), jax.tree.leaves(expected), strict=True
    ):
        assert got_leaf.shape == leaf.shape and got_leaf.dtype == leaf.dtype
        np.testing.assert_allclose(got_leaf, leaf, rtol=1e-13, atol=1e-15)


def test_one_step_map_declines_implicit_solvers():
    assert one_step_map(diffrax.Kvaerno5()) is None
    assert one_step_map(diffrax.ImplicitEuler()) is None
    assert one_step_map(diffrax.EulerHeun()) is None


_DEFAULT_CASES = ["pendulum", "mlp64"]


@pytest.mark.parametrize("mode", ["full", "diagonal"])
@pytest.mark.parametrize("name", _DEFAULT_CASES)
def test_vector_field_linearisation_matches_sequential(name, mode):
    problem = PROBLEMS[name]
    deer, sequential = _deer_and_sequential(
        problem,
        diffrax.Tsit5(),
        10,
        100,
        jacobian=mode,
        linearise="vector_field",
        max_newton_steps=200,
    )
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9
    assert diagnostics(deer).last_residual <= 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "diagonal"])
@pytest.mark.parametrize("name", sorted(set(PROBLEMS) - set(_DEFAULT_CASES)))
def test_vector_field_linearisation_on_other_problems(name, mode):
    test_vector_field_linearisation_matches_sequential(name, mode)


@pytest.mark.parametrize(
    "base_cls",
    [
        diffrax.Euler,
        diffrax.Heun,
        pytest.param(diffrax.Dopri8, marks=pytest.mark.slow),
    ],
    ids=lambda c: c.__name__,
)
def test_vector_field_linearisation_other_base_solvers(base_cls):
    deer, sequential = _deer_and_sequential(
        PROBLEMS["van_der_pol"],
        base_cls(),
        6,
        100,
        jacobian="diagonal",
        linearise="vector_field",
        max_newton_steps=200,
    )
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9


# Slow run only (CI time): an iteration-count property.
@pytest.mark.slow
def test_cheap_blocks_cost_few_extra_iterations():
    # The Euler blocks differ from the exact ones by O(dt^2) per substep, so Newton
    # with them converges linearly but fast: on the pendulum's 10 x 100 substeps
    # (measured) 72 iterations in all against 55 with the exact blocks.
    problem = PROBLEMS["pendulum"]
    totals = {}
    for linearise in ("step", "vector_field"):
        deer, _ = _deer_and_sequential(
            problem, diffrax.Tsit5(), 10, 100, jacobian="full", linearise=linearise
        )
        totals[linearise] = int(diagnostics(deer).total_newton_steps)
    assert totals["vector_field"] <= 1.5 * totals["step"]


def test_vector_field_linearisation_sde():
    terms = _sde_terms()
    y0 = jnp.array([1.0, -0.5])
    kwargs = dict(saveat=diffrax.SaveAt(t1=True))
    deer = diffrax.diffeqsolve(
        terms,
        DeerSolver(diffrax.Heun(), num_substeps=100, linearise="vector_field"),
        0.0,
        2.0,
        0.5,
        y0,
        max_steps=4,
        **kwargs,
    )
    sequential = diffrax.diffeqsolve(
        terms, diffrax.Heun(), 0.0, 2.0, 0.005, y0, max_steps=401, **kwargs
    )
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-10


def test_vector_field_linearisation_complex_state():
    # A non-holomorphic field: the blocks are those of the real-ified state.
    def field(t, y, args):
        return 1j * y - 0.2 * y * jnp.abs(y) ** 2 + 0.1 * jnp.conj(y)

    y0 = jnp.array([1.0 + 0.5j, -0.3j])
    term = diffrax.ODETerm(field)
    deer = diffrax.diffeqsolve(
        term,
        DeerSolver(num_substeps=100, jacobian="diagonal", linearise="vector_field"),
        0.0,
        4.0,
        1.0,
        y0,
    )
    sequential = diffrax.diffeqsolve(
        term, diffrax.Tsit5(), 0.0, 4.0, 0.01, y0, max_steps=401
    )
    assert deer.ys.dtype == y0.dtype
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-9


def test_vector_field_linearisation_gradients_are_exact():
    problem = PROBLEMS["van_der_pol"]

    def loss(y0, solver, dt0):
        sol = diffrax.diffeqsolve(
            problem.term, solver, 0.0, 2.0, dt0, y0, max_steps=200
        )
        return jnp.sum(sol.ys**2)

    deer = jax.grad(loss)(
        problem.y0,
        DeerSolver(num_substeps=50, jacobian="diagonal", linearise="vector_field"),
        0.5,
    )
    sequential = jax.grad(loss)(problem.y0, diffrax.Tsit5(), 0.01)
    np.testing.assert_allclose(deer, sequential, rtol=1e-8)


def test_vector_field_linearisation_rejects_implicit_base():
    with pytest.raises(ValueError, match="explicit base solvers"):
        DeerSolver(diffrax.Kvaerno5(), linearise="vector_field")
    with pytest.raises(ValueError, match="Unknown linearise"):
        DeerSolver(linearise="euler")
