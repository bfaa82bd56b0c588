"""Jacobian structures for the Newton iteration: which part of each `J_i` is kept.

Every mode reads the blocks off the linearised residual `F(Y)_i = y_i - Phi_i(y_{i-1})`
by probing: pushing the tangent that is `e_j` at *every* time index through the
linearisation gives `(dF V)_i = e_j - J_i e_j` for all `i` at once, so `n` probes (one
vmapped batch) yield every column of every block. A mode only has to say which of
those entries it keeps and how it stores them.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Inexact


def _probe(linear_fn: Callable[[Array], Array], struct: jax.ShapeDtypeStruct) -> Array:
    """`out[j, i, :] = (dF V^j)_i` for the all-times unit probes `V^j`."""
    if len(struct.shape) != 2:
        raise ValueError(
            "Block recovery needs a trajectory of shape (T, n); got shape "
            f"{struct.shape}."
        )
    num_times, size = struct.shape
    eye = jnp.eye(size, dtype=struct.dtype)
    probes = jnp.broadcast_to(eye[:, None, :], (size, num_times, size))
    return jax.vmap(linear_fn)(probes)


class AbstractJacobianMode(eqx.Module):
    """Which structure of the per-step Jacobians `J_i` the Newton iteration uses.

    Subclass it and implement `blocks` to add a structure (block-diagonal, say).
    A mode whose blocks are the exact Jacobian sets the class variable
    `exact = True`; Newton's method then trusts its last update as the error estimate
    (quadratic convergence). Any other mode is a quasi-Newton method, whose solve
    [`deer_diffrax.DeerNewton`][] finishes with one exact Newton step.

    **Arguments:** None.
    """

    exact: ClassVar[bool] = False

    @abc.abstractmethod
    def blocks(
        self, linear_fn: Callable[[Array], Array], struct: jax.ShapeDtypeStruct
    ) -> Inexact[Array, "T n n"] | Inexact[Array, "T n"]:
        """Recover the blocks `J_i` from the linearised residual.

        **Arguments:**

        - `linear_fn`: the linear map `dY -> dF(Y) dY` on `(T, n)` arrays, whose
            matrix is unit lower block-bidiagonal.
        - `struct`: the shape and dtype of `Y`.

        **Returns:** the blocks, in a layout that
        [`deer_diffrax.BlockBidiagonalOperator`][] accepts.
        """

    def restrict(self, dense: Inexact[Array, "*batch n n"]) -> Array | None:
        """The blocks this mode keeps, taken from dense Jacobians, or `None` (the
        default) if the mode reads its blocks only through `blocks`.

        Where every step's dense Jacobian can be computed directly (a
        [`deer_diffrax.scan`][] cell, `jax.jacfwd` batched over time), this is
        cheaper than probing the linearised residual, which `blocks` does. It is
        used only where it is defined by the class that defines `blocks` or by a
        subclass of it: a subclass that overrides `blocks` alone (to clip the
        blocks, say) keeps its own blocks.

        **Arguments:**

        - `dense`: Jacobians `J[..., i, j] = d f_i / d h_j`, any leading axes.

        **Returns:** the mode's blocks with the same leading axes, or `None`.
        """
        del dense
        return None


class FullJacobian(AbstractJacobianMode):
    """Exact Newton: dense `n x n` blocks, `O(T n^2)` memory and `O(T n^3)` scan work.
    Converges quadratically near the solution.

    **Arguments:** None.
    """

    exact: ClassVar[bool] = True

    def blocks(self, linear_fn, struct):
        out = _probe(linear_fn, struct)
        eye = jnp.eye(struct.shape[1], dtype=struct.dtype)
        # out[j, i, k] = delta_jk - J_i[k, j]
        return eye[None] - jnp.transpose(out, (1, 2, 0))

    def restrict(self, dense):
        return dense


class DiagonalJacobian(AbstractJacobianMode):
    """Quasi-Newton ("quasi-DEER"): only the exact diagonal of each `J_i` is kept, so
    the scan stores `O(T n)` and costs `O(T n)`. Converges linearly; needs shorter
    windows on strongly coupled or oscillatory dynamics. Never used for gradients.

    **Arguments:** None.
    """

    def blocks(self, linear_fn, struct):
        size = struct.shape[1]

        def diagonal_entry(j):
            probe = jnp.zeros(struct.shape, struct.dtype).at[:, j].set(1)
            return linear_fn(probe)[:, j]

        # Batches of probes: parallel enough to fill the device, while the stored
        # outputs stay at most `batch x T x n` rather than `n x T x n`.
        out = jax.lax.map(diagonal_entry, jnp.arange(size), batch_size=min(size, 16))
        return 1 - out.T

    def restrict(self, dense):
        return jnp.diagonal(dense, axis1=-2, axis2=-1)


class BlockDiagonalJacobian(AbstractJacobianMode):
    """Quasi-Newton with the exact `k x k` diagonal blocks of each `J_i`: the flat
    state vector (a pytree state ravelled in leaf order) is cut into `n / k`
    consecutive pieces of `block_size = k` entries, and only the coupling within a
    piece is kept. The scan stores `O(T n k)` and costs `O(T n k^2)`, between
    [`deer_diffrax.DiagonalJacobian`][] (`k = 1`) and
    [`deer_diffrax.FullJacobian`][] (`k = n`). Exact (quadratic convergence) when
    the Jacobian is block diagonal, as for a recurrence built of independent
    blocks; otherwise it converges linearly, and the solve finishes with one exact
    Newton step. Never used for gradients.

    **Arguments:**

    - `block_size`: `k`, which must divide the size `n` of the flat state.
    - `structured`: `False` (default) reads the blocks with `n` Jacobian-vector
        products, so they are the exact diagonal blocks of any Jacobian. `True`
        promises that the Jacobian *is* block diagonal (no coupling between
        pieces: a ParaRNN-style cell, say): then `k` products suffice (each probes
        the same column of every block at once) and Newton is exact, without the
        final exact step. With coupling between pieces the blocks are then wrong,
        so only promise what the model guarantees.
    """

    block_size: int = eqx.field(static=True)
    structured: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(
                "`BlockDiagonalJacobian` needs a positive integer `block_size`; got "
                f"{self.block_size!r}."
            )

    @property
    def exact(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.structured

    def _pieces(self, size: int) -> int:
        """How many blocks a flat state of `size` entries is cut into."""
        if size % self.block_size:
            raise ValueError(
                f"`BlockDiagonalJacobian(block_size={self.block_size})`: the block "
                f"size must divide the size of the flat state, {size}."
            )
        return size // self.block_size

    def blocks(self, linear_fn, struct):
        if len(struct.shape) != 2:
            raise ValueError(
                "Block recovery needs a trajectory of shape (T, n); got shape "
                f"{struct.shape}."
            )
        num_times, size = struct.shape
        k = self.block_size
        pieces = self._pieces(size)
        if self.structured:
            # Probe j is e_j in every piece at once: with no coupling between
            # pieces, piece b of the output is column j of block b alone.
            def column(j):
                probe = jnp.zeros((pieces, k), struct.dtype).at[:, j].set(1)
                probe = jnp.broadcast_to(probe.reshape(size), struct.shape)
                return linear_fn(probe).reshape(num_times, pieces, k)

            out = jax.vmap(column)(jnp.arange(k))  # (j, T, b, i)
            out = jnp.transpose(out, (1, 2, 3, 0))
        else:

            def column(c):
                probe = jnp.zeros(struct.shape, struct.dtype).at[:, c].set(1)
                start = (c // k) * k
                return jax.lax.dynamic_slice_in_dim(linear_fn(probe), start, k, 1)

            # Batched like the diagonal mode's probes, for the same reason.
            out = jax.lax.map(column, jnp.arange(size), batch_size=min(size, 16))
            out = out.reshape(pieces, k, num_times, k)  # (b, j, T, i)
            out = jnp.transpose(out, (2, 0, 3, 1))
        eye = jnp.eye(k, dtype=struct.dtype)
        # out[t, b, i, j] = delta_ij - J_t[bk + i, bk + j]
        return eye - out

    def restrict(self, dense):
        if self.structured:
            return None  # `k` probes are cheaper than `n` dense columns
        k = self.block_size
        pieces = self._pieces(dense.shape[-1])
        split = dense.reshape(dense.shape[:-2] + (pieces, k, pieces, k))
        # (..., b, i, b', j) -> the b == b' blocks, (..., i, j, b) -> (..., b, i, j)
        diagonal = jnp.diagonal(split, axis1=-4, axis2=-2)
        return jnp.moveaxis(diagonal, -1, -3)


def _defined_by(cls: type, name: str) -> type:
    return next(base for base in cls.__mro__ if name in vars(base))


def dense_restriction(
    mode: AbstractJacobianMode, size: int, dtype
) -> Callable[[Array], Array] | None:
    """`mode.restrict` where it gives `mode`'s blocks of a state of `size` entries
    (see `AbstractJacobianMode.restrict`), else `None`."""
    cls = type(mode)
    if not issubclass(_defined_by(cls, "restrict"), _defined_by(cls, "blocks")):
        return None  # `blocks` was overridden below the `restrict` it inherits
    dense = jax.ShapeDtypeStruct((size, size), dtype)
    if jax.eval_shape(mode.restrict, dense) is None:
        return None
    return mode.restrict


def jacobian_mode(mode: "str | AbstractJacobianMode") -> AbstractJacobianMode:
    """Turn `"full"` / `"diagonal"` (or a mode instance) into a Jacobian mode."""
    if isinstance(mode, AbstractJacobianMode):
        return mode
    modes = {"full": FullJacobian, "diagonal": DiagonalJacobian}
    try:
        return modes[mode]()
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown Jacobian mode {mode!r}: use one of {sorted(modes)} or an "
            "`AbstractJacobianMode` instance."
        ) from None
