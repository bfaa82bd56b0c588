"""Jacobian structures for the Newton iteration: which part of each `J_i` is kept.

Every mode reads the blocks off the linearised residual `F(Y)_i = y_i - Phi_i(y_{i-1})`
by probing: pushing the tangent that is `e_j` at *every* time index through the
linearisation gives `(dF V)_i = e_j - J_i e_j` for all `i` at once, so `n` probes (one
vmapped batch) yield every column of every block. A new mode (block-diagonal, say)
only has to say which of those entries it keeps and how it stores them.
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
