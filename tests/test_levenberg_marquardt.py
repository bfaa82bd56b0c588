"""`LevenbergMarquardt` damping: its step against the normal equations, the sequential
answer where Newton works, and jit/vmap/grad through `deer_diffrax.scan`."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import max_relative_difference, PROBLEMS

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
    for lam in (0.0, 1e-3, 0.7, 50.0):
        # argmin |F - L dY|^2 + lam |dY|^2; at lam = 0 Newton's L dY = F.
        expected = np.linalg.solve(
            matrix.T @ matrix + lam * np.eye(num_steps * size),
            matrix.T @ np.asarray(residual).reshape(-1),
        ).reshape(num_steps, size)
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
    deer = solve(
        DeerSolver(num_substeps=200, jacobian=jacobian, damping=LevenbergMarquardt()),
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


def _gru(gain):
    cell = eqx.nn.GRUCell(3, 4, key=jax.random.key(0))
    cell = jax.tree_util.tree_map(lambda x: gain * x if eqx.is_array(x) else x, cell)
    xs = jax.random.normal(jax.random.key(1), (2, 200, 3))
    return cell, xs


# Slow (65 s on 2 cores): under vmap the strategy's branch between Newton's solve
# and its own becomes a select, so both are compiled.
@pytest.mark.slow
@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
def test_scan_under_jit_vmap_and_grad(jacobian):
    cell, xs = _gru(2.0)
    h0 = jnp.zeros(4)

    def final(cell, xs, parallel):
        step = lambda h, x: (cell(x, h), None)
        if parallel:
            out, stats = deer_diffrax.scan(
                step,
                h0,
                xs,
                jacobian=jacobian,
                damping=LevenbergMarquardt(),
                throw=False,
                return_stats=True,
            )
            return jnp.sum(out[0] ** 2), stats.result
        return jnp.sum(jax.lax.scan(step, h0, xs)[0] ** 2), None

    def value_and_grad(parallel):
        fn = eqx.filter_value_and_grad(lambda c, x: final(c, x, parallel)[0])
        return eqx.filter_jit(eqx.filter_vmap(fn, in_axes=(None, 0)))(cell, xs)

    (value, grad), (value_ref, grad_ref) = value_and_grad(True), value_and_grad(False)
    results = eqx.filter_vmap(lambda x: final(cell, x, True)[1])(xs)
    assert bool(jnp.all(results == optx.RESULTS.successful))
    assert max_relative_difference(value, value_ref) <= 1e-9
    grads = jax.tree_util.tree_leaves(eqx.filter(grad, eqx.is_array))
    grads_ref = jax.tree_util.tree_leaves(eqx.filter(grad_ref, eqx.is_array))
    assert max_relative_difference(grads, grads_ref) <= 1e-9
