"""The block-bidiagonal operator and the associative-scan Lineax solver against dense
linear algebra."""

import functools as ft

import jax
import jax.numpy as jnp
import lineax as lx
import pytest

from deer_diffrax import (
    AssociativeScanSolver,
    BlockBidiagonalOperator,
    DiagonalJacobian,
    FullJacobian,
    solve_linear_recurrence,
    unit_lower_block_bidiagonal_tag,
)
from deer_diffrax._operator import dense_blocks


def _blocks(kind, t=37, n=3, seed=0):
    key = jax.random.PRNGKey(seed)
    shape = (t, n, n) if kind == "full" else (t, n)
    return 0.6 * jax.random.normal(key, shape)


@pytest.mark.parametrize("kind", ["full", "diagonal"])
@pytest.mark.parametrize("lower", [True, False])
def test_mv_matches_matrix(kind, lower):
    op = BlockBidiagonalOperator(_blocks(kind), lower=lower)
    x = jax.random.normal(jax.random.PRNGKey(3), (37, 3))
    dense = op.as_matrix() @ x.reshape(-1)
    assert jnp.allclose(op.mv(x).reshape(-1), dense, rtol=1e-13, atol=1e-13)
    assert jnp.allclose(op.T.as_matrix(), op.as_matrix().T)


@pytest.mark.parametrize("kind", ["full", "diagonal"])
@pytest.mark.parametrize("lower", [True, False])
def test_scan_solve_matches_dense(kind, lower):
    op = BlockBidiagonalOperator(_blocks(kind), lower=lower)
    rhs = jax.random.normal(jax.random.PRNGKey(4), (37, 3))
    solution = lx.linear_solve(op, rhs, AssociativeScanSolver()).value
    expected = jnp.linalg.solve(op.as_matrix(), rhs.reshape(-1)).reshape(37, 3)
    assert jnp.allclose(solution, expected, rtol=1e-11, atol=1e-11)


def _sequential_recurrence(blocks, rhs):
    def step(state, block_and_rhs):
        block, r = block_and_rhs
        state = block @ state + r
        return state, state

    _, later = jax.lax.scan(step, rhs[0], (dense_blocks(blocks)[1:], rhs[1:]))
    return jnp.concatenate([rhs[:1], later])


# Lengths on both sides of where halving hands over to recursive doubling (128 steps
# for blocks up to 4 x 4, 32 up to 8 x 8, 8 for larger ones), odd and even, the
# degenerate ones, and lengths past 2^7 times that, where doubling takes over after
# at most 7 halvings.
@pytest.mark.parametrize(
    "layout, t",
    [("dense", t) for t in (1, 128, 129, 1001, 20001)]
    + [("medium", 5000)]
    + [("diagonal", 2), ("diagonal", 129), ("block_diagonal", 3)]
    + [("block_diagonal", 300), ("medium", 32), ("medium", 33), ("medium", 300)]
    + [("large", 8), ("large", 9), ("large", 300)],
)
def test_recurrence_matches_sequential_loop(layout, t):
    key_blocks, key_rhs = jax.random.split(jax.random.PRNGKey(5))
    shape, n = {
        "dense": ((t, 2, 2), 2),
        "diagonal": ((t, 3), 3),
        "block_diagonal": ((t, 2, 2, 2), 4),
        "medium": ((t, 8, 8), 8),
        "large": ((t, 12, 12), 12),
    }[layout]
    # Contracting on average, so that 1000 steps stay representable.
    blocks = jax.random.normal(key_blocks, shape) * 0.9 / jnp.sqrt(shape[-1])
    # `blocks[0]` multiplies `x_{-1} = 0` and is ignored, even if it is not finite.
    blocks = blocks.at[0].set(jnp.nan)
    rhs = jax.random.normal(key_rhs, (t, n))
    x = jax.jit(solve_linear_recurrence)(blocks, rhs)
    expected = _sequential_recurrence(blocks.at[0].set(0.0), rhs)
    assert jnp.allclose(x, expected, rtol=1e-11, atol=1e-11)


def test_recurrence_gradient_matches_sequential_loop():
    # `solve_linear_recurrence` is public: differentiable directly (both code
    # paths: 200 steps are halved once, then doubled).
    blocks = _blocks("full", t=200, n=2) * 0.5
    rhs = jax.random.normal(jax.random.PRNGKey(8), (200, 2))

    def loss(solve, blocks, rhs):
        return jnp.sum(jnp.sin(solve(blocks, rhs)))

    grads = jax.grad(ft.partial(loss, solve_linear_recurrence), argnums=(0, 1))(
        blocks, rhs
    )
    expected = jax.grad(ft.partial(loss, _sequential_recurrence), argnums=(0, 1))(
        blocks, rhs
    )
    for got, want in zip(grads, expected, strict=True):
        assert jnp.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_transpose_solve_and_autodiff():
    op = BlockBidiagonalOperator(_blocks("full"))
    rhs = jax.random.normal(jax.random.PRNGKey(6), (37, 3))
    cotangent = jax.random.normal(jax.random.PRNGKey(7), (37, 3))

    def solve(v):
        return lx.linear_solve(op, v, AssociativeScanSolver()).value

    _, vjp = jax.vjp(solve, rhs)
    (grad,) = vjp(cotangent)
    expected = jnp.linalg.solve(op.as_matrix().T, cotangent.reshape(-1))
    assert jnp.allclose(grad.reshape(-1), expected, rtol=1e-11, atol=1e-11)


def _residual_fn(t, n):
    weights = jax.random.normal(jax.random.PRNGKey(8), (n, n)) / n

    def phi(y):
        return jnp.tanh(weights @ y) + 0.5 * y

    def residual(trajectory, y_start):
        previous = jnp.concatenate([y_start[None], trajectory[:-1]])
        return trajectory - jax.vmap(phi)(previous)

    return residual, phi


def test_blocks_recovered_from_tagged_jacobian_operator():
    t, n = 15, 4
    residual, phi = _residual_fn(t, n)
    y_start = jnp.ones(n)
    trajectory = jax.random.normal(jax.random.PRNGKey(9), (t, n))
    op = lx.JacobianLinearOperator(
        residual, trajectory, y_start, tags=unit_lower_block_bidiagonal_tag
    )
    rhs = jax.random.normal(jax.random.PRNGKey(10), (t, n))
    solution = lx.linear_solve(op, rhs, AssociativeScanSolver()).value
    expected = jnp.linalg.solve(op.as_matrix(), rhs.reshape(-1)).reshape(t, n)
    assert jnp.allclose(solution, expected, rtol=1e-11, atol=1e-11)

    # The probed blocks are the exact per-step Jacobians.
    previous = jnp.concatenate([y_start[None], trajectory[:-1]])
    exact = jax.vmap(jax.jacfwd(phi))(previous)
    lin = lx.linearise(op)
    struct = jax.ShapeDtypeStruct((t, n), trajectory.dtype)
    full = FullJacobian().blocks(lin.mv, struct)
    diagonal = DiagonalJacobian().blocks(lin.mv, struct)
    assert jnp.allclose(full[1:], exact[1:], rtol=1e-12, atol=1e-12)
    assert jnp.allclose(
        diagonal[1:], jnp.diagonal(exact[1:], axis1=1, axis2=2), rtol=1e-12
    )


def test_untagged_operator_is_rejected():
    op = lx.MatrixLinearOperator(jnp.eye(6))
    with pytest.raises(ValueError, match="unit block-bidiagonal"):
        AssociativeScanSolver().init(op, {})


def test_lineax_structure_queries():
    op = BlockBidiagonalOperator(_blocks("full"))
    assert lx.is_lower_triangular(op) and not lx.is_upper_triangular(op)
    assert lx.is_upper_triangular(op.T)
    assert lx.has_unit_diagonal(op)
    assert not lx.is_symmetric(op)
    assert jnp.all(lx.diagonal(op) == 1)
    scalar = BlockBidiagonalOperator(_blocks("full", n=1))
    diag, lower, upper = lx.tridiagonal(scalar)
    dense = scalar.as_matrix()
    assert jnp.allclose(jnp.diagonal(dense, -1), lower)
    assert jnp.allclose(jnp.diagonal(dense, 1), upper)
