"""The block-bidiagonal linear operator of one DEER Newton step.

Linearising `y_i = Phi_i(y_{i-1})` around a trajectory gives the system

    dy_i - J_i dy_{i-1} = r_i,   i = 0..T-1,   dy_{-1} = 0,

i.e. `A dy = r` with `A = I - L`, where `L` holds the Jacobians `J_i` on its block
sub-diagonal. This module expresses `A` (and its transpose) as a Lineax operator.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Inexact


try:
    from jax.experimental.layout import Layout, with_layout_constraint
except ImportError:  # older JAX: XLA chooses every layout
    Layout = with_layout_constraint = None


def time_major(blocks: Array) -> Array:
    """`blocks` (any array) in row-major layout, so time-major for `(T, ...)`
    blocks, where this JAX can say so (since about 0.7); else as they are."""
    if with_layout_constraint is None:
        return blocks
    return with_layout_constraint(blocks, Layout(tuple(range(blocks.ndim))))


class _UnitLowerBlockBidiagonalTag:
    """Lineax tag: the operator on `(T, n)` arrays is unit lower block-bidiagonal."""

    def __repr__(self):
        return "unit_lower_block_bidiagonal_tag"


unit_lower_block_bidiagonal_tag = _UnitLowerBlockBidiagonalTag()
"""Lineax tag declaring that an operator acting on arrays of shape `(T, n)` has the
form `I - L`, with `L` non-zero only on its block sub-diagonal (`n x n` blocks coupling
time index `i - 1` to `i`). The residual of a discretised trajectory,
`F(Y)_i = y_i - Phi_i(y_{i-1})`, has a Jacobian of exactly this form.

[`deer_diffrax.AssociativeScanSolver`][] uses the tag to recover the blocks from any
operator (for example the `JacobianLinearOperator` that Optimistix builds for implicit
differentiation) with `n` matrix-vector products.
"""


def shift_in(first: Array, rows: Array) -> Array:
    """`(first, rows[0], ..., rows[-2])`: every row moved one place later in time.

    Written as a roll rather than a concatenation: on a time axis split over devices
    XLA then exchanges one row between neighbours instead of gathering everything.
    """
    return jnp.roll(rows, 1, axis=0).at[0].set(first)


def shift_out(rows: Array, last: Array) -> Array:
    """`(rows[1], ..., rows[-1], last)`: every row moved one place earlier in time."""
    return jnp.roll(rows, -1, axis=0).at[-1].set(last)


def _has_diagonal_blocks(blocks: Array) -> bool:
    return blocks.ndim == 2


def _has_block_diagonal_blocks(blocks: Array) -> bool:
    return blocks.ndim == 4


def dense_blocks(blocks: Array) -> Array:
    """The `(T, n, n)` dense form of blocks in any layout (dense, diagonal or
    block-diagonal)."""
    if _has_diagonal_blocks(blocks):
        return jax.vmap(jnp.diag)(blocks)
    if _has_block_diagonal_blocks(blocks):
        return jax.vmap(lambda b: jax.scipy.linalg.block_diag(*b))(blocks)
    return blocks


def apply_blocks(blocks: Array, x: Array, transpose: bool = False) -> Array:
    """Batched product `J_i x_i` (or `J_i^T x_i`) over the leading time axis.

    **Arguments:**

    - `blocks`: `(T, n, n)` dense blocks, `(T, n)` diagonal blocks or
        `(T, n / k, k, k)` block-diagonal blocks.
    - `x`: `(T, n)` vectors.
    - `transpose`: whether to multiply by the transposed blocks.

    **Returns:** the `(T, n)` products.
    """
    if _has_diagonal_blocks(blocks):
        return blocks * x
    if _has_block_diagonal_blocks(blocks):
        pieces = x.reshape(blocks.shape[:3])
        spec = "tbji,tbj->tbi" if transpose else "tbij,tbj->tbi"
        out = jnp.einsum(spec, blocks, pieces, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(x.shape)
    if transpose:
        return jnp.einsum("tji,tj->ti", blocks, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("tij,tj->ti", blocks, x, precision=jax.lax.Precision.HIGHEST)


class BlockBidiagonalOperator(lx.AbstractLinearOperator):
    """The operator `A = I - L` of a linear recurrence, acting on `(T, n)` arrays.

    With `lower=True`, `(A x)_i = x_i - J_i x_{i-1}` (and `(A x)_0 = x_0`): solving
    `A x = r` is the forward recurrence `x_i = J_i x_{i-1} + r_i`. With `lower=False`
    it is the transpose, `(A^T x)_i = x_i - J_{i+1}^T x_{i+1}`, a backward recurrence.
    `blocks[0]` couples the fixed initial condition to `x_0`, so it is not part of
    the operator (it is ignored here).

    **Arguments:**

    - `blocks`: the Jacobians `J_i`, either dense `(T, n, n)`, diagonal `(T, n)`
        or block-diagonal `(T, n / k, k, k)` (`n / k` blocks of size `k` along the
        diagonal; the last two are quasi-Newton approximations, see
        [`deer_diffrax.DiagonalJacobian`][] and
        [`deer_diffrax.BlockDiagonalJacobian`][]).
    - `lower`: `True` for `I - L`, `False` for its transpose `I - L^T`.
    """

    blocks: Inexact[Array, "T n n"] | Inexact[Array, "T n"] | Inexact[Array, "T m k k"]
    lower: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.blocks.ndim not in (2, 3, 4):
            raise ValueError(
                "`BlockBidiagonalOperator` needs blocks of shape (T, n, n), (T, n) or "
                f"(T, n / k, k, k); got shape {self.blocks.shape}."
            )
        if self.blocks.ndim >= 3 and self.blocks.shape[-1] != self.blocks.shape[-2]:
            raise ValueError(
                f"Dense blocks must be square; got shape {self.blocks.shape}."
            )

    @property
    def num_times(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_size(self) -> int:
        """`n`, the size of each `J_i` (whatever layout stores it)."""
        if _has_block_diagonal_blocks(self.blocks):
            return self.blocks.shape[1] * self.blocks.shape[2]
        return self.blocks.shape[1]

    def mv(self, vector):
        zero = jnp.zeros_like(vector[0])
        if self.lower:
            coupled = apply_blocks(self.blocks, shift_in(zero, vector))
            # `blocks[0]` is not part of the operator, even if it is not finite.
            return vector - coupled.at[0].set(zero)
        coupled = apply_blocks(self.blocks, vector, transpose=True)
        return vector - shift_out(coupled, zero)

    def as_matrix(self):
        t, n = self.num_times, self.block_size
        dense = dense_blocks(self.blocks)
        # Place -J_i at block (i, i-1) of a (T, n, T, n) array, then flatten.
        matrix = jnp.zeros((t, n, t, n), dense.dtype)
        idx = jnp.arange(1, t)
        matrix = matrix.at[idx, :, idx - 1, :].set(-dense[1:])
        matrix = matrix.reshape(t * n, t * n) + jnp.eye(t * n, dtype=dense.dtype)
        return matrix if self.lower else matrix.T

    def transpose(self):
        return BlockBidiagonalOperator(self.blocks, lower=not self.lower)

    def in_structure(self):
        return jax.ShapeDtypeStruct(
            (self.num_times, self.block_size), self.blocks.dtype
        )

    def out_structure(self):
        return self.in_structure()


@lx.linearise.register(BlockBidiagonalOperator)
@lx.materialise.register(BlockBidiagonalOperator)
def _(operator):
    return operator


@lx.diagonal.register(BlockBidiagonalOperator)
def _(operator):
    return jnp.ones(operator.num_times * operator.block_size, operator.blocks.dtype)


@lx.tridiagonal.register(BlockBidiagonalOperator)
def _(operator):
    if operator.block_size != 1:
        raise ValueError(
            "A block-bidiagonal operator with blocks larger than 1x1 is not "
            "tridiagonal."
        )
    size = operator.num_times
    off = -operator.blocks[1:].reshape(size - 1)
    zeros = jnp.zeros_like(off)
    diagonal = jnp.ones(size, operator.blocks.dtype)
    if operator.lower:
        return diagonal, off, zeros
    return diagonal, zeros, off


@lx.is_tridiagonal.register(BlockBidiagonalOperator)
def _(operator):
    return operator.block_size == 1


@lx.is_lower_triangular.register(BlockBidiagonalOperator)
def _(operator):
    return operator.lower


@lx.is_upper_triangular.register(BlockBidiagonalOperator)
def _(operator):
    return not operator.lower


@lx.has_unit_diagonal.register(BlockBidiagonalOperator)
def _(operator):
    return True


# Symmetry and definiteness would need every J_i to vanish: not a structural property.
@lx.is_symmetric.register(BlockBidiagonalOperator)
@lx.is_diagonal.register(BlockBidiagonalOperator)
@lx.is_positive_semidefinite.register(BlockBidiagonalOperator)
@lx.is_negative_semidefinite.register(BlockBidiagonalOperator)
def _(operator):
    return False


@lx.conj.register(BlockBidiagonalOperator)
def _(operator):
    return BlockBidiagonalOperator(operator.blocks.conj(), lower=operator.lower)
