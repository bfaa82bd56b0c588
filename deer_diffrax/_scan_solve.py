"""A Lineax solver for unit block-bidiagonal systems by a parallel prefix scan."""

from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Inexact

from ._jacobian import FullJacobian
from ._operator import (
    BlockBidiagonalOperator,
    shift_out,
    unit_lower_block_bidiagonal_tag,
)


_SMALL_BLOCK = 8


def _compose(earlier, later):
    # Affine maps x -> A x + b compose as (A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2).
    a1, b1 = earlier
    a2, b2 = later
    if a1.ndim == b1.ndim:  # diagonal blocks
        return a2 * a1, a2 * b1 + b2
    if a1.shape[-1] <= _SMALL_BLOCK:
        # Tiny blocks: broadcast-and-sum beats a batched matmul call (measured 3.4x
        # on CPU and 1.15x on an H100 for n = 4).
        a = jnp.sum(a2[..., :, :, None] * a1[..., None, :, :], axis=-2)
        b = jnp.sum(a2 * b1[..., None, :], axis=-1)
    else:
        a = jnp.matmul(a2, a1, precision=jax.lax.Precision.HIGHEST)
        b = jnp.einsum("...ij,...j->...i", a2, b1, precision=jax.lax.Precision.HIGHEST)
    return a, b + b2


def solve_linear_recurrence(
    blocks: (
        Inexact[Array, "T n n"] | Inexact[Array, "T n"] | Inexact[Array, "T m k k"]
    ),
    rhs: Inexact[Array, "T n"],
) -> Inexact[Array, "T n"]:
    """Solve `x_i = J_i x_{i-1} + r_i` (with `x_{-1} = 0`) in `O(log T)` depth.

    **Arguments:**

    - `blocks`: the `J_i`, dense `(T, n, n)`, diagonal `(T, n)` or
        block-diagonal `(T, n / k, k, k)`; `blocks[0]` is unused.
    - `rhs`: the `r_i`, shape `(T, n)`.

    **Returns:** the `x_i`, shape `(T, n)`.
    """
    if blocks.ndim == 4:
        # `n / k` independent recurrences of size `k`, batched: `O(T n k^2)` work.
        _, x = jax.lax.associative_scan(
            _compose, (blocks, rhs.reshape(blocks.shape[:3]))
        )
        return x.reshape(rhs.shape)
    _, x = jax.lax.associative_scan(_compose, (blocks, rhs))
    return x


def _shift_transposed(blocks):
    # Backward recurrence x_i = J_{i+1}^T x_{i+1} + r_i: the coefficient of step i is
    # J_{i+1}^T, and the last step has none.
    if blocks.ndim >= 3:
        blocks = jnp.swapaxes(blocks, -1, -2)
    return shift_out(blocks, jnp.zeros_like(blocks[0]))


_ScanState: TypeAlias = tuple[Array, bool]


class AbstractBidiagonalScanSolver(lx.AbstractLinearSolver[_ScanState]):
    """What the scan solvers of unit block-bidiagonal systems share: reading the
    blocks off the operator, and transposition (the same recurrence backwards in
    time). Subclasses implement `compute`."""

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if isinstance(operator, BlockBidiagonalOperator):
            return operator.blocks, operator.lower
        if unit_lower_block_bidiagonal_tag in getattr(operator, "tags", ()):
            struct = operator.in_structure()
            if not isinstance(struct, jax.ShapeDtypeStruct):
                raise ValueError(
                    f"`{type(self).__name__}` needs an operator acting on a single "
                    f"(T, n) array; got input structure {struct}."
                )
            linear = lx.linearise(operator)
            return FullJacobian().blocks(linear.mv, struct), True
        raise ValueError(
            f"`{type(self).__name__}` can only solve unit block-bidiagonal systems: "
            "pass a `deer_diffrax.BlockBidiagonalOperator`, or an operator tagged "
            "with `deer_diffrax.unit_lower_block_bidiagonal_tag`."
        )

    def transpose(self, state: _ScanState, options: dict[str, Any]):
        blocks, lower = state
        return (blocks, not lower), options

    def conj(self, state: _ScanState, options: dict[str, Any]):
        blocks, lower = state
        return (blocks.conj(), lower), options

    def assume_full_rank(self):
        return True


class AssociativeScanSolver(AbstractBidiagonalScanSolver):
    """Solves `(I - L) x = r` for unit lower block-bidiagonal `I - L` (and its
    transpose) with `jax.lax.associative_scan`, in `O(log T)` parallel depth.

    Accepts a [`deer_diffrax.BlockBidiagonalOperator`][] directly, or any Lineax
    operator on `(T, n)` arrays carrying
    [`deer_diffrax.unit_lower_block_bidiagonal_tag`][]; for the latter (e.g. the
    `JacobianLinearOperator` of an implicit-function-theorem solve) the exact dense
    blocks are recovered with `n` vmapped matrix-vector products. The transpose solve
    (reverse-mode autodiff) is the same scan run backwards in time.

    Work is `O(T n^3)` for dense blocks, `O(T n k^2)` for block-diagonal ones with
    blocks of size `k` and `O(T n)` for diagonal ones.
    """

    def compute(self, state: _ScanState, vector, options):
        del options
        blocks, lower = state
        if lower:
            solution = solve_linear_recurrence(blocks, vector)
        else:
            backward = solve_linear_recurrence(
                jnp.flip(_shift_transposed(blocks), 0), jnp.flip(vector, 0)
            )
            solution = jnp.flip(backward, 0)
        return solution, lx.RESULTS.successful, {}


AssociativeScanSolver.__init__.__doc__ = """**Arguments:** None."""
