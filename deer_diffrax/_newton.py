"""Newton's method on a whole trajectory, as an Optimistix root finder."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._jacobian import AbstractJacobianMode, FullJacobian
from ._operator import BlockBidiagonalOperator
from ._scan_solve import AssociativeScanSolver


class DeerNewtonState(eqx.Module):
    """State of [`deer_diffrax.DeerNewton`][] between iterations.

    **Arguments:** (built by `DeerNewton.init`, not by hand)

    - `residual_norm`: the scaled max-norm of the residual at the last accepted
        iterate (`inf` before the first step); `<= 1` means converged.
    - `update_norm`, `previous_update_norm`: scaled max-norms of the last two Newton
        updates, from which quasi-Newton modes estimate their remaining error.
    - `finite`: `False` once the iteration has produced a non-finite residual that
        damping cannot recover from.
    - `num_steps`: the number of Newton steps taken.
    - `num_rejected`: how many trial iterates damping rejected.
    - `damping`: the current damping `lambda >= 0`; the step solves
        `(I - L / (1 + lambda)) dY = -F`, so `0` is Newton and a large value is the
        Picard (Jacobi) sweep `Y <- Phi(Y)`.
    - `anchor`: the iterate the last step started from (with damping: the last
        accepted one), at which `residual_norm` was measured; a rejected trial falls
        back to it, and it is returned if the final step made things worse.
    - `anchor_residual`, `anchor_blocks`: the residual and the (undamped) Jacobian
        blocks at `anchor`, kept with damping when the trial iterate is linearised
        directly (`linearise_trials` or `jacobian_fn`), so that a rejected trial
        costs no re-evaluation (else `None`).
    """

    residual_norm: Float[Array, ""]
    update_norm: Float[Array, ""]
    previous_update_norm: Float[Array, ""]
    finite: Bool[Array, ""]
    num_steps: Int[Array, ""]
    num_rejected: Int[Array, ""]
    damping: Float[Array, ""]
    anchor: Array
    anchor_residual: Array | None
    anchor_blocks: Array | None


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
    exponentially and the next iterate overflows (Van der Pol or Lotka-Volterra
    over long windows). With `damping=True` a trial iterate whose residual is
    non-finite or grew more than `max_residual_growth` times is rejected: the step is
    recomputed from the last accepted iterate with the Jacobian blocks shrunk,
    `J_i / (1 + lambda)`, and `lambda` grows tenfold per rejection (it shrinks
    tenfold per acceptance). As `lambda -> inf` the step becomes the Picard sweep
    `Y <- Phi(shift(Y))`, which cannot overshoot and makes the exact prefix of the
    trajectory at least one substep longer every iteration; so the damped
    iteration interpolates between Newton's quadratic convergence and a sweep that
    always makes progress. On problems where Newton works no trial is rejected. With
    `linearise_trials=True` (what `DeerSolver` uses for explicit base solvers) each
    trial is linearised directly and the last accepted linearisation is kept, so
    damping costs memory, not time; otherwise it costs one more residual evaluation
    per iteration (the trial is judged before the accepted point is linearised).

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
    linear_solver: lx.AbstractLinearSolver = AssociativeScanSolver()
    jacobian_fn: Callable[[Array, Any], Array] | None = None
    linearise_trials: bool = eqx.field(static=True, default=False)

    def _keeps_anchor_linearisation(self) -> bool:
        # With damping, a rejected trial needs the residual and blocks at the last
        # accepted iterate. Where the residual may be linearised anywhere, the step
        # linearises the trial once and keeps that linearisation for later; otherwise
        # it evaluates the trial, then linearises the accepted point (two passes).
        return self.damping and (self.linearise_trials or self.jacobian_fn is not None)

    def _linearise(self, fn, y, args, struct):
        """The residual at `y`, the aux, and the Jacobian blocks there."""
        if self.jacobian_fn is None:
            residual, linear_fn, aux = jax.linearize(
                lambda _y: fn(_y, args), y, has_aux=True
            )
        else:
            residual, aux = fn(y, args)
            _, linear_fn = jax.linearize(lambda _y: self.jacobian_fn(_y, args), y)
        return residual, aux, self.jacobian.blocks(linear_fn, struct)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del options, f_struct, aux_struct, tags
        if self._keeps_anchor_linearisation():
            struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
            shapes = jax.eval_shape(lambda: self._linearise(fn, y, args, struct))
            anchor_residual = jnp.zeros_like(y)
            anchor_blocks = jnp.zeros(shapes[2].shape, shapes[2].dtype)
        else:
            anchor_residual = anchor_blocks = None
        return DeerNewtonState(
            residual_norm=jnp.array(jnp.inf, dtype=y.dtype),
            update_norm=jnp.array(jnp.inf, dtype=y.dtype),
            previous_update_norm=jnp.array(jnp.inf, dtype=y.dtype),
            finite=jnp.array(True),
            num_steps=jnp.array(0),
            num_rejected=jnp.array(0),
            damping=jnp.array(0.0, dtype=y.dtype),
            anchor=y,
            anchor_residual=anchor_residual,
            anchor_blocks=anchor_blocks,
        )

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
        first = state.num_steps == 0

        def scaled_norm(residual, at):
            scale = self.atol + self.rtol * jnp.abs(at)
            return self.norm(residual / scale).astype(state.residual_norm.dtype)

        keep = self._keeps_anchor_linearisation()
        if keep or not self.damping:
            trial_residual, aux, trial_blocks = self._linearise(fn, y, args, struct)
        else:
            # Judge the trial on its residual alone, and linearise only the accepted
            # point: linearising a wild trial can fail outright (an implicit base
            # solver's own tangent solve raises on the NaNs of its failed stage
            # solve).
            trial_residual, aux = fn(y, args)

        if self.damping:
            trial_norm = scaled_norm(trial_residual, y)
            finite = jnp.all(jnp.isfinite(trial_residual))
            growth_ok = trial_norm <= self.max_residual_growth * state.residual_norm
            # A full Picard sweep always extends the exact prefix, so at maximal
            # damping any finite trial is taken.
            picard = state.damping >= _MAX_DAMPING
            accept = finite & (first | growth_ok | picard)
            anchor = jnp.where(accept, y, state.anchor)
            damping = jnp.where(
                accept,
                state.damping / 10,
                jnp.minimum(jnp.maximum(10 * state.damping, 1.0), _MAX_DAMPING),
            )
            residual_norm = jnp.where(accept, trial_norm, state.residual_norm)
            # Only a non-finite starting residual is beyond rescue.
            still_finite = state.finite & (finite | jnp.invert(first))
            num_rejected = state.num_rejected + jnp.where(accept, 0, 1)
            base_y = anchor
            if keep:
                residual = jnp.where(accept, trial_residual, state.anchor_residual)
                blocks = jnp.where(accept, trial_blocks, state.anchor_blocks)
            else:
                residual, aux, blocks = self._linearise(fn, base_y, args, struct)
            anchor_residual, anchor_blocks = residual, blocks
            blocks = blocks / (1 + damping)
        else:
            anchor = base_y = y
            damping = state.damping
            num_rejected = state.num_rejected
            residual, blocks = trial_residual, trial_blocks
            residual_norm = scaled_norm(residual, y)
            still_finite = state.finite & jnp.all(jnp.isfinite(residual))

        update = lx.linear_solve(
            BlockBidiagonalOperator(blocks),
            residual,
            self.linear_solver,
            throw=False,
        ).value
        new_y = base_y - update
        if self.damping:
            # A non-finite trial would stop Optimistix's loop before the next step
            # could reject it: reject it here, staying at the anchor. The next step
            # re-accepts the anchor and divides the damping by 10, so raise it by
            # 100 to come back with ten times more.
            update_finite = jnp.all(jnp.isfinite(new_y))
            new_y = jnp.where(update_finite, new_y, base_y)
            damping = jnp.where(
                update_finite,
                damping,
                jnp.minimum(jnp.maximum(100 * damping, 10.0), _MAX_DAMPING),
            )
            num_rejected = num_rejected + jnp.where(update_finite, 0, 1)
        else:
            still_finite = still_finite & jnp.all(jnp.isfinite(update))
        new_state = DeerNewtonState(
            residual_norm=residual_norm,
            update_norm=scaled_norm(update, base_y),
            previous_update_norm=state.update_norm,
            finite=still_finite,
            num_steps=state.num_steps + 1,
            num_rejected=num_rejected,
            damping=damping,
            anchor=anchor,
            anchor_residual=anchor_residual if keep else None,
            anchor_blocks=anchor_blocks if keep else None,
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        converged = state.residual_norm <= 1
        exact = isinstance(self.jacobian, FullJacobian) and self.jacobian_fn is None
        if not exact:
            # Quasi-Newton converges linearly: the last update does not square the
            # error, which is about rate / (1 - rate) times that update. Without this
            # the residual test left errors of ~1e-3 in float32 (measured).
            rate = jnp.minimum(state.update_norm / state.previous_update_norm, 0.99)
            rate = jnp.where(jnp.isfinite(rate), rate, 0.0)
            converged = converged & (state.update_norm * rate / (1 - rate) <= 1)
        diverged = jnp.invert(state.finite)
        result = optx.RESULTS.where(
            diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return converged | diverged, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del options, tags, result
        # The iteration stops once the residual at `state.anchor` is within tolerance
        # and returns the iterate one step later. That step is usually a further
        # (quadratic) improvement, but where the linearised recurrence amplifies
        # strongly it can spoil the answer: check it, and keep the better of the two.
        residual, _ = fn(y, args)
        norm = self.norm(residual / (self.atol + self.rtol * jnp.abs(y)))
        keep_last = norm <= state.residual_norm  # False for a NaN residual
        stats: dict[str, Any] = dict(
            residual_norm=state.residual_norm,
            final_residual_norm=jnp.where(keep_last, norm, state.residual_norm),
            num_newton_steps=state.num_steps,
            num_rejected=state.num_rejected,
        )
        return jnp.where(keep_last, y, state.anchor), aux, stats


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
- `linear_solver`: the Lineax solver of each Newton step's block-bidiagonal system
    (default [`deer_diffrax.AssociativeScanSolver`][]).
- `jacobian_fn`: optionally, a cheaper function `(Y, args) -> G(Y)` with the same
    block-bidiagonal Jacobian structure as the residual, whose Jacobian approximates
    the residual's (e.g. the residual of an Euler step of the same vector field). The
    blocks are then read from its linearisation, and the residual is evaluated once
    per iteration without being linearised: a quasi-Newton method with the same root.
    Default `None`: the exact Jacobian of the residual.
- `linearise_trials`: with damping, linearise each trial iterate directly and keep
    the linearisation of the last accepted one (one pass of the residual per
    iteration, and `O(T n^2)` more memory for dense blocks), instead of judging the
    trial first and then linearising the accepted point (two passes). Only safe when
    the residual can be linearised at any finite point; implicit base methods, whose
    inner solves can fail at wild trial points, need the default `False`.
"""
