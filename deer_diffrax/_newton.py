"""Newton's method on a whole trajectory, as an Optimistix root finder."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._jacobian import AbstractJacobianMode, FullJacobian
from ._operator import BlockBidiagonalOperator
from ._scan_solve import AssociativeScanSolver


class DeerNewtonState(eqx.Module):
    """State of [`deer_diffrax.DeerNewton`][] between iterations.

    - `residual_norm`: the scaled max-norm of the residual at the last accepted
        iterate (`inf` before the first step); `<= 1` means converged.
    - `finite`: `False` once the iteration has produced a non-finite residual that
        damping cannot recover from.
    - `num_steps`: the number of Newton steps taken.
    - `num_rejected`: how many trial iterates damping rejected.
    - `damping`: the current damping `lambda >= 0`; the step solves
        `(I - L / (1 + lambda)) dY = -F`, so `0` is Newton and a large value is the
        Picard (Jacobi) sweep `Y <- Phi(Y)`.
    - `anchor`: the last accepted iterate, its residual and Jacobian blocks (`None`
        without damping), the point a rejected trial falls back to.
    """

    residual_norm: Float[Array, ""]
    finite: Bool[Array, ""]
    num_steps: Int[Array, ""]
    num_rejected: Int[Array, ""]
    damping: Float[Array, ""]
    anchor: tuple[Array, Array, Array] | None


_MAX_DAMPING = 1e12


class DeerNewton(optx.AbstractRootFinder):
    """Newton's method for a residual `F(Y)_i = y_i - Phi_i(y_{i-1})` over a whole
    trajectory `Y` of shape `(T, n)`, whose Jacobian is unit lower block-bidiagonal.

    Each step linearises `F` once (`jax.linearize`: residual and Jacobian from the
    same pass), reads the blocks `J_i` off the linearisation (see
    [`deer_diffrax.AbstractJacobianMode`][]) and solves the linear recurrence
    `dy_i = J_i dy_{i-1} - F_i` with [`deer_diffrax.AssociativeScanSolver`][].

    Converged means the residual is small, `|F(Y)_i| <= atol + rtol |y_i|` for every
    entry: each substep then satisfies the base method's equation to within the same
    tolerance that a sequential solve's rounding would, independently of the length
    `T` (a criterion on the Newton update would have to grow with `T`). The returned
    iterate is the one after that final step, so with full Newton it is accurate to
    about the square of the tolerance.

    **Damping.** Far from the solution the linearised recurrence can amplify
    exponentially and the next iterate overflows (Van der Pol or Lotka--Volterra
    over long windows). With `damping=True` a trial iterate whose residual is
    non-finite or grew more than `max_residual_growth` times is rejected: the step is
    recomputed from the last accepted iterate with the Jacobian blocks shrunk,
    `J_i / (1 + lambda)`, and `lambda` grows tenfold per rejection (it shrinks
    tenfold per acceptance). As `lambda -> inf` the step becomes the Picard sweep
    `Y <- Phi(shift(Y))`, which cannot overshoot and makes the exact prefix of the
    trajectory at least one substep longer every iteration; so the damped
    iteration interpolates between Newton's quadratic convergence and a sweep that
    always makes progress. On problems where Newton works no trial is rejected and
    the only cost is keeping the last accepted blocks (one more `O(T n^2)` array).

    Non-finite residuals that damping cannot recover from stop the iteration with
    `RESULTS.nonlinear_divergence`; running out of steps gives
    `RESULTS.nonlinear_max_steps_reached`.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    jacobian: AbstractJacobianMode = FullJacobian()
    damping: bool = eqx.field(static=True, default=True)
    max_residual_growth: float = eqx.field(static=True, default=1e3)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, aux_struct, tags
        if self.damping:
            struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
            blocks = jax.eval_shape(lambda: self.jacobian.blocks(lambda v: v, struct))
            anchor = (
                y,
                jnp.zeros(f_struct.shape, f_struct.dtype),
                jnp.zeros(blocks.shape, blocks.dtype),
            )
        else:
            anchor = None
        return DeerNewtonState(
            residual_norm=jnp.array(jnp.inf, dtype=y.dtype),
            finite=jnp.array(True),
            num_steps=jnp.array(0),
            num_rejected=jnp.array(0),
            damping=jnp.array(0.0, dtype=y.dtype),
            anchor=anchor,
        )

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        residual, linear_fn, aux = jax.linearize(
            lambda _y: fn(_y, args), y, has_aux=True
        )
        struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
        blocks = self.jacobian.blocks(linear_fn, struct)
        scale = self.atol + self.rtol * jnp.abs(y)
        residual_norm = self.norm(residual / scale).astype(state.residual_norm.dtype)
        finite = jnp.all(jnp.isfinite(residual))
        first = state.num_steps == 0

        if self.damping:
            growth_ok = residual_norm <= self.max_residual_growth * state.residual_norm
            # A full Picard sweep always extends the exact prefix, so at maximal
            # damping any finite trial is taken.
            picard = state.damping >= _MAX_DAMPING
            accept = finite & (first | growth_ok | picard)
            keep = lambda new, old: jnp.where(accept, new, old)
            anchor = jtu.tree_map(keep, (y, residual, blocks), state.anchor)
            base_y, base_residual, base_blocks = anchor
            damping = jnp.where(
                accept,
                state.damping / 10,
                jnp.minimum(jnp.maximum(10 * state.damping, 1.0), _MAX_DAMPING),
            )
            base_blocks = base_blocks / (1 + damping)
            residual_norm = jnp.where(accept, residual_norm, state.residual_norm)
            # Only a non-finite starting residual is beyond rescue.
            still_finite = state.finite & (finite | jnp.invert(first))
            num_rejected = state.num_rejected + jnp.where(accept, 0, 1)
        else:
            anchor = None
            base_y, base_residual, base_blocks = y, residual, blocks
            damping = state.damping
            still_finite = state.finite & finite
            num_rejected = state.num_rejected

        update = lx.linear_solve(
            BlockBidiagonalOperator(base_blocks),
            base_residual,
            AssociativeScanSolver(),
            throw=False,
        ).value
        new_y = base_y - update
        if not self.damping:
            still_finite = still_finite & jnp.all(jnp.isfinite(update))
        new_state = DeerNewtonState(
            residual_norm=residual_norm,
            finite=still_finite,
            num_steps=state.num_steps + 1,
            num_rejected=num_rejected,
            damping=damping,
            anchor=anchor,
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        converged = state.residual_norm <= 1
        diverged = jnp.invert(state.finite)
        result = optx.RESULTS.where(
            diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return converged | diverged, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, args, options, tags, result
        stats: dict[str, Any] = dict(
            residual_norm=state.residual_norm,
            num_newton_steps=state.num_steps,
            num_rejected=state.num_rejected,
        )
        return y, aux, stats


DeerNewton.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: the residual tolerance, `|F(Y)_i| <= atol + rtol |y_i|` entrywise.
- `norm`: how the scaled residual is reduced to a scalar (default: max-norm).
- `jacobian`: the structure of the blocks used in the Newton step (default exact,
    [`deer_diffrax.FullJacobian`][]).
- `damping`: reject trial iterates whose residual is non-finite or grew too much,
    and retry from the last accepted iterate with shrunk Jacobian blocks (default
    `True`; see above).
- `max_residual_growth`: the factor by which the scaled residual norm may grow from
    one accepted iterate to the next trial before the trial is rejected.
"""
