"""`LevenbergMarquardt` damping: its step against the normal equations, the sequential
answer where Newton works, and jit/vmap/grad through `deer_diffrax.scan`."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    check_scan_under_jit_vmap_and_grad,
    max_relative_difference,
    PROBLEMS,
)

import deer_diffrax
from deer_diffrax import (
    BlockBidiagonalOperator,
    DeerSolver,
    levenberg_marquardt_step,
    LevenbergMarquardt,
)


@pytest.mark.parametrize("layout", ["dense", "diagonal", "block_diagonal"])
def test_step_solves_the_damped_normal_equations(layout):
    rng = np.random.default_rng(0)
    num_steps, size = 13, 4
    shape = {
        "dense": (num_steps, size, size),
        "diagonal": (num_steps, size),
        "block_diagonal": (num_steps, size // 2, 2, 2),
    }[layout]
    blocks = jnp.asarray(0.8 * rng.standard_normal(shape))
    residual = jnp.asarray(rng.standard_normal((num_steps, size)))
    matrix = np.asarray(BlockBidiagonalOperator(blocks).as_matrix())
    step = jax.jit(levenberg_marquardt_step)
    strict = jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise")
    for lam in (0.0, 1e-3, 0.7, 50.0):
        # argmin |F - L dY|^2 + lam |dY|^2; at lam = 0 Newton's L dY = F.
        expected = np.linalg.solve(
            matrix.T @ matrix + lam * np.eye(num_steps * size),
            matrix.T @ np.asarray(residual).reshape(-1),
        ).reshape(num_steps, size)
        with strict[0], strict[1]:
            update = step(blocks, residual, jnp.asarray(lam))
        assert max_relative_difference(update, expected) <= 1e-10, lam


def test_step_shrinks_towards_steepest_descent():
    # For large lam the step is L^T F / lam.
    rng = np.random.default_rng(1)
    blocks = jnp.asarray(rng.standard_normal((9, 3, 3)))
    residual = jnp.asarray(rng.standard_normal((9, 3)))
    matrix = np.asarray(BlockBidiagonalOperator(blocks).as_matrix())
    lam = 1e8
    update = jax.jit(levenberg_marquardt_step)(blocks, residual, jnp.asarray(lam))
    descent = (matrix.T @ np.asarray(residual).reshape(-1)).reshape(9, 3) / lam
    assert max_relative_difference(update, descent) <= 1e-6


def test_matches_sequential_where_newton_converges():
    # Van der Pol, one window of 2 time units: the answer is the sequential one, and
    # Newton's steps are never rejected (the merit falls at every step). (Not so in
    # the diagonal mode: quasi-Newton steps need not lower the merit, and there the
    # strict merit test stalls; see the class's docstring.)
    jacobian = "full"
    problem = PROBLEMS["van_der_pol"]
    solve = lambda solver, dt0: diffrax.diffeqsolve(
        problem.term,
        solver,
        0.0,
        2.0,
        dt0,
        problem.y0,
        saveat=diffrax.SaveAt(t1=True, solver_state=isinstance(solver, DeerSolver)),
        max_steps=201,
    )
    # Both branches of the step (Newton's solve and the smoother) are traced.
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        deer = solve(
            DeerSolver(
                num_substeps=200, jacobian=jacobian, damping=LevenbergMarquardt()
            ),
            2.0,
        )
    plain = solve(DeerSolver(num_substeps=200, jacobian=jacobian, damping=False), 2.0)
    sequential = solve(diffrax.Tsit5(), 0.01)
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-10
    assert int(deer.solver_state.num_rejected) == 0
    assert int(deer.solver_state.total_newton_steps) == int(
        plain.solver_state.total_newton_steps
    )


def test_rejects_a_step_that_raises_the_merit():
    damping = LevenbergMarquardt()
    state = damping.init(jnp.float64)
    blocks = jnp.zeros((3, 2))
    residual = jnp.ones((3, 2))
    _, _, state = damping.update(
        state, jnp.zeros((3, 2)), blocks, residual, deer_diffrax.AssociativeScanSolver()
    )
    assert float(state.merit) == 6.0
    args = (jnp.array(False), jnp.array(1.0), jnp.array(True), jnp.array(1.0))
    accept, judged = damping.judge(state, *args, 2 * residual)
    assert not bool(accept)
    assert float(judged.damping) > 0
    assert not bool(damping.is_undamped(judged))
    accept, relaxed = damping.judge(judged, *args, residual / 2)
    assert bool(accept)
    assert float(relaxed.damping) < float(judged.damping)


# Slow (65 s on 2 cores): under vmap the strategy's branch between Newton's solve
# and its own becomes a select, so both are compiled.
@pytest.mark.slow
@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
def test_scan_under_jit_vmap_and_grad(jacobian):
    check_scan_under_jit_vmap_and_grad(LevenbergMarquardt(), jacobian)
