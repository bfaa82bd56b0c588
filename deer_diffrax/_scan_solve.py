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


# Block sizes whose products are written out as sums of outer products; every other
# size uses a batched matmul. Measured on a 2-core x86 CPU, associative scan alone
# (compile s / run ms; float64 unless said): n = 2, T = 1e3 written out 1.2 / 0.13
# against matmul 1.0 / 0.08, T = 1e5 2.3 / 5.2 against 1.6 / 3.8; n = 3, float32,
# T = 1e4 2.1 / 0.69 against 1.2 / 0.41, T = 1e5 2.7 / 3.6 against 1.8 / 5.0; n = 4,
# T = 1e5 3.0 / 8.5 against 1.9 / 30 (broadcast-and-sum 1.2 / 15); n = 8, T = 1e5
# 5.5 / 92 against 1.7 / 66. Writing out costs compile time that grows with `n`,
# and pays only where XLA's dot of tiny blocks is slow.
_WRITTEN_OUT_SIZES = range(4, 7)


def _apply(a: Array, x: Array) -> Array:
    """`a @ x` for blocks `a` in any layout (diagonal `(..., n)`, dense
    `(..., n, n)`) and vectors `x` `(..., n)`, batched over the leading axes."""
    if a.ndim == x.ndim:  # diagonal blocks
        return a * x
    size = a.shape[-1]
    if size in _WRITTEN_OUT_SIZES:
        return sum(a[..., :, k] * x[..., k : k + 1] for k in range(size))
    return jnp.einsum("...ij,...j->...i", a, x, precision=jax.lax.Precision.HIGHEST)


def compose_affine(earlier, later):
    # Affine maps x -> A x + b compose as (A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2).
    a1, b1 = earlier
    a2, b2 = later
    if a1.ndim == b1.ndim:  # diagonal blocks
        return a2 * a1, a2 * b1 + b2
    size = a1.shape[-1]
    if size in _WRITTEN_OUT_SIZES:
        # A sum of `size` elementwise products: XLA fuses it into one loop with no
        # `(T, n, n, n)` intermediate.
        a = sum(a2[..., :, k : k + 1] * a1[..., k : k + 1, :] for k in range(size))
    else:
        a = jnp.matmul(a2, a1, precision=jax.lax.Precision.HIGHEST)
    return a, _apply(a2, b1) + b2


def _interleave(even: Array, odd: Array) -> Array:
    """`x` with `x[0::2] = even` and `x[1::2] = odd` (`len(even) - len(odd)` is 0 or
    1)."""
    num = even.shape[0] + odd.shape[0]
    if odd.shape[0] < even.shape[0]:
        odd = jnp.concatenate([odd, jnp.zeros_like(even[:1])])
    pairs = jnp.stack([even, odd], axis=1)
    return pairs.reshape((2 * even.shape[0],) + even.shape[1:])[:num]


def _identity_blocks(blocks: Array, rhs: Array) -> Array:
    """Identity blocks shaped like `blocks` (all ones for diagonal blocks)."""
    if blocks.ndim == rhs.ndim:
        return jnp.ones_like(blocks)
    eye = jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
    return jnp.broadcast_to(eye, blocks.shape)


def _solve_by_doubling(blocks: Array, rhs: Array) -> Array:
    # Prefix compositions by recursive doubling: after the round with shift `s`,
    # element `i` holds the composition of steps `i - 2s + 1 .. i` (clipped at 0),
    # and once it reaches step 0 its affine part is `x_i` (`x_{-1} = 0`). Every
    # round has the same shapes, so this is one loop body however many rounds:
    # `log2 m` rounds of `m` compositions, against `2m` compositions in as many
    # unrolled levels for halving. Used where the sequence is short enough that
    # the extra work is cheaper than compiling (and, on a CPU, launching) the
    # levels.
    num_steps = rhs.shape[0]
    # `blocks[0]` multiplies `x_{-1} = 0`; it may even be non-finite.
    blocks = blocks.at[0].set(jnp.zeros_like(blocks[0]))
    identity = _identity_blocks(blocks, rhs)
    index = jnp.arange(num_steps)

    def double(round_, maps):
        shift = 2**round_
        has_earlier = index >= shift

        def earlier(x, default):
            mask = has_earlier.reshape((num_steps,) + (1,) * (x.ndim - 1))
            return jnp.where(mask, jnp.roll(x, shift, axis=0), default)

        a, b = maps
        return compose_affine((earlier(a, identity), earlier(b, 0)), (a, b))

    num_rounds = max(1, (num_steps - 1).bit_length())
    _, solution = jax.lax.fori_loop(0, num_rounds, double, (blocks, rhs))
    return solution


def _doubling_size(blocks: Array) -> int:
    """The length below which `_solve_by_halves` hands over to `_solve_by_doubling`
    (for recurrences of up to `2^7` times that length), from the work of one
    composition (multiply-adds per step: `n` for diagonal blocks, `n^3` for dense
    ones, `m k^3` for `m` blocks of `k x k`). Doubling composes `log2` of the
    length times more blocks than halving, but is one loop body however many levels
    it replaces: worth it where a composition is cheap. Measured on a 2-core CPU
    (GRU scan, full Jacobian, `T = 1e3`, 4 or 3 Newton iterations): at `n = 2..4`
    handing over at 128 steps roughly halves the recurrence's compile time and
    costs no run time; at `n = 8` it cost 13% (float32) and 26% (float64) of the
    whole solve against 32, with the same compile time within noise; at `n = 32`
    handing over at 32 took 20-23 ms against 9-13 ms at 8."""
    if blocks.ndim == 2:
        work = blocks.shape[-1]
    else:
        work = blocks[0].size * blocks.shape[-1]
    if work <= 64:  # up to 4 x 4 dense blocks
        return 128
    if work <= 512:  # up to 8 x 8
        return 32
    return 8


# The most halving levels before doubling takes over, whatever the length: each
# level is a copy of the halving code in the compiled program (about 9 kernels),
# while doubling's extra compositions on the last `T / 2^7` steps are a few percent
# of the `2T` that halving does. Measured on a 2-core CPU, recurrence alone at
# `T = 1e5`: 8 x 8 blocks 95 -> 60 kernels, compile 1.56 -> 0.96 s, run 28.4 ->
# 27.2 ms; 2 x 2 blocks 69 -> 52 kernels, compile 0.97-1.13 -> 0.82-0.90 s, run
# 1.51-1.52 -> 1.64-2.3 ms (noisy).
_MAX_HALVING_LEVELS = 7


def _hand_over_length(blocks: Array) -> int:
    """The length at which halving hands over to doubling for a recurrence of
    `len(blocks)` steps."""
    longest_tail = -(-blocks.shape[0] // 2**_MAX_HALVING_LEVELS)
    return max(_doubling_size(blocks), longest_tail)


def _solve_by_halves(blocks: Array, rhs: Array, hand_over: int) -> Array:
    # Pairing neighbours, `x_{2k+1} = (J_{2k+1} J_{2k}) x_{2k-1} + (J_{2k+1} r_{2k} +
    # r_{2k+1})` is a recurrence of the same form (with `x_{-1} = 0`) over the odd
    # steps, half as long: solve it recursively (`log2 T` levels), then each even
    # step is one product away, `x_{2k} = J_{2k} x_{2k-1} + r_{2k}`. The way back
    # propagates vectors only. A generic prefix scan also forms every prefix
    # product of the blocks, which XLA then removes as dead code (so it runs as
    # fast), but only after tracing and compiling it: this program is smaller.
    # Once at most `hand_over` steps are left, recursive doubling finishes.
    num_steps = rhs.shape[0]
    if num_steps == 1:
        return rhs  # x_0 = r_0: blocks[0] multiplies x_{-1} = 0.
    if num_steps <= hand_over:
        return _solve_by_doubling(blocks, rhs)
    pair_blocks, pair_rhs = compose_affine(
        (blocks[0:-1:2], rhs[0:-1:2]), (blocks[1::2], rhs[1::2])
    )
    odd = _solve_by_halves(pair_blocks, pair_rhs, hand_over)
    later_even = _apply(blocks[2::2], odd[: (num_steps - 1) // 2]) + rhs[2::2]
    even = jnp.concatenate([rhs[:1], later_even])
    return _interleave(even, odd)


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
        x = _solve_by_halves(
            blocks, rhs.reshape(blocks.shape[:3]), _hand_over_length(blocks)
        )
        return x.reshape(rhs.shape)
    return _solve_by_halves(blocks, rhs, _hand_over_length(blocks))


def shift_transposed(blocks):
    # Backward recurrence x_i = J_{i+1}^T x_{i+1} + r_i: the coefficient of step i is
    # J_{i+1}^T, and the last step has none.
    if blocks.ndim >= 3:
        blocks = jnp.swapaxes(blocks, -1, -2)
    return shift_out(blocks, jnp.zeros_like(blocks[0]))


ScanState: TypeAlias = tuple[Array, bool]


class AbstractBidiagonalScanSolver(lx.AbstractLinearSolver[ScanState]):
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
            if isinstance(operator, lx.JacobianLinearOperator) and operator.jac in (
                None,
                "fwd",
            ):
                # Probe with forward-mode products directly: the primal is shared
                # by the batch of probes, and nothing of the whole residual's
                # linearisation is stored (measured faster than probing
                # `lx.linearise(operator)`: the gradient of a GRU scan on CPU).
                mv = operator.mv
            else:
                mv = lx.linearise(operator).mv
            return FullJacobian().blocks(mv, struct), True
        raise ValueError(
            f"`{type(self).__name__}` can only solve unit block-bidiagonal systems: "
            "pass a `deer_diffrax.BlockBidiagonalOperator`, or an operator tagged "
            "with `deer_diffrax.unit_lower_block_bidiagonal_tag`."
        )

    def transpose(self, state: ScanState, options: dict[str, Any]):
        blocks, lower = state
        return (blocks, not lower), options

    def conj(self, state: ScanState, options: dict[str, Any]):
        blocks, lower = state
        return (blocks.conj(), lower), options

    def assume_full_rank(self):
        return True


class AssociativeScanSolver(AbstractBidiagonalScanSolver):
    """Solves `(I - L) x = r` for unit lower block-bidiagonal `I - L` (and its
    transpose) by a parallel prefix computation in `O(log T)` depth: neighbouring
    steps are composed pairwise into a recurrence half as long, solved the same
    way, and the remaining steps filled in by matrix-vector products (about `T`
    block products in all; no prefix products of the blocks are formed). The
    last, short levels (up to 128 steps for blocks up to 4 x 4, 32 up to 8 x 8, 8
    for larger ones; all after the seventh halving for longer recurrences) are one
    loop of recursive doubling, which compiles to one loop body instead of a copy
    per level.

    Accepts a [`deer_diffrax.BlockBidiagonalOperator`][] directly, or any Lineax
    operator on `(T, n)` arrays carrying
    [`deer_diffrax.unit_lower_block_bidiagonal_tag`][]; for the latter (e.g. the
    `JacobianLinearOperator` of an implicit-function-theorem solve) the exact dense
    blocks are recovered with `n` vmapped matrix-vector products. The transpose solve
    (reverse-mode autodiff) is the same scan run backwards in time.

    Work is `O(T n^3)` for dense blocks, `O(T n k^2)` for block-diagonal ones with
    blocks of size `k` and `O(T n)` for diagonal ones.
    """

    def compute(self, state: ScanState, vector, options):
        del options
        blocks, lower = state
        if lower:
            solution = solve_linear_recurrence(blocks, vector)
        else:
            backward = solve_linear_recurrence(
                jnp.flip(shift_transposed(blocks), 0), jnp.flip(vector, 0)
            )
            solution = jnp.flip(backward, 0)
        return solution, lx.RESULTS.successful, {}


AssociativeScanSolver.__init__.__doc__ = """**Arguments:** None."""
