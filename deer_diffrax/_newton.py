"""Newton's method on a whole trajectory, as an Optimistix root finder."""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._damping import AbstractDamping, damping_strategy, ShrinkBlocksDamping
from ._jacobian import AbstractJacobianMode, FullJacobian
from ._linearisation import AbstractLinearisation, ResidualLinearisation
from ._operator import (
    BlockBidiagonalOperator,
    time_major,
    unit_lower_block_bidiagonal_tag,
)
from ._scan_solve import AssociativeScanSolver


class DeerNewtonState(eqx.Module):
    """State of [`deer_diffrax.DeerNewton`][] between iterations.

    **Arguments:** (built by `DeerNewton.init`, not by hand)

    - `residual_norm`: the scaled max-norm of the residual at the last accepted
        iterate (`inf` before the first step); `<= 1` means converged.
    - `update_norm`, `previous_update_norm`, `older_update_norm`: scaled max-norms
        of the last three Newton updates, from which the iteration estimates its
        remaining error (linear rate for quasi-Newton modes, quadratic for exact
        Newton).
    - `undamped_run`: how many of the last steps in a row were undamped and
        accepted (the updates of such a run are those of plain Newton).
    - `finite`: `False` once the iteration has produced a non-finite residual that
        damping cannot recover from, or a rejected trial that damping would only
        repeat.
    - `num_steps`: the number of Newton steps taken.
    - `num_rejected`: how many trial iterates damping rejected.
    - `damping`: the state of the damping strategy (for
        [`deer_diffrax.ShrinkBlocksDamping`][], the parameter `lambda` of the last
        step; a [`deer_diffrax.TrustRegionState`][] for
        [`deer_diffrax.TrustRegion`][]; `None` for [`deer_diffrax.NoDamping`][]).
    - `anchor`: the iterate the last step started from (with damping: the last
        accepted one), at which `residual_norm` was measured; a rejected trial falls
        back to it, and it is returned if the final step made things worse.
    - `anchor_blocks`: the (undamped) Jacobian blocks of the last step, after the
        last step the exact linearisation that `postprocess` returns for the
        implicit gradient (and the Lyapunov estimate) of the solution. Where damping
        linearises each trial directly, the blocks of the last trial, which are
        the anchor's whenever the solve ends converged (its last step was
        accepted); where it judges the trial first, the accepted point's.
    - `anchor_update`: with a strategy that rebuilds a rejected step from the
        anchor's update (`AbstractDamping.reuses_update`, and a linearisation safe
        at trial points), the undamped update computed at `anchor`; else `None`.
    - `retrying`: with a linearisation safe at trial points and a strategy that
        does not reuse the anchor's update, whether the last step rejected its
        trial: it then took no step, and this step linearises the anchor again and
        takes the damped step from there, as the strategy decided when it
        rejected; else `None`.
    """

    residual_norm: Float[Array, ""]
    update_norm: Float[Array, ""]
    previous_update_norm: Float[Array, ""]
    older_update_norm: Float[Array, ""]
    undamped_run: Int[Array, ""]
    finite: Bool[Array, ""]
    num_steps: Int[Array, ""]
    num_rejected: Int[Array, ""]
    damping: PyTree[Array]
    anchor: Array
    anchor_blocks: Array
    anchor_update: Array | None = None
    retrying: Bool[Array, ""] | None = None


# The largest linear convergence rate a quasi-Newton error estimate assumes: at the
# rounding floor successive updates no longer shrink, and a larger cap would turn
# that noise into a large error estimate. A slower true rate is caught by the exact
# Newton step that ends every quasi-Newton solve.
_MAX_RATE = 0.5
# A quasi-Newton iteration stops once its estimated error is this fraction of the
# tolerance (as simplified Newton iterations in implicit Runge-Kutta codes do): the
# estimate sees only what the approximate blocks see, and the margin keeps the final
# exact check from failing on an estimate that was slightly optimistic.
_LINEAR_SAFETY = 0.1
# Exact Newton may stop one step early when three undamped updates in a row shrink
# quadratically, `|dY_k| ~ K |dY_(k-1)|^2`, with `K` read off both pairs alike (to
# within this factor): the iterate after the last update then has an error of about
# `K |dY_k|^2`, and it stops if that is this fraction of the tolerance. Measured on
# a GRU scan (hidden 8, float64) the prediction was 1.7e-3 of the tolerance where the
# next update came out at 7.5e-4.
_QUADRATIC_AGREEMENT = 10.0
_QUADRATIC_SAFETY = 0.01


def default_tolerance(dtype) -> float:
    """The default Newton `rtol` and `atol` for a trajectory of floating `dtype`: ten
    times `eps ** 0.75` (about 2e-11 in float64 and 6e-5 in float32), well above the
    rounding level of a residual but small enough that full Newton's last step leaves
    an error near rounding."""
    eps = float(jnp.finfo(dtype).eps)
    return 10 * eps**0.75


def _quadratic_estimate(state: DeerNewtonState) -> Float[Array, ""]:
    """The error after the last update if the last three were plain Newton updates
    converging quadratically, `K u_k^2` for updates `u` with `K` the larger of
    `u_k / u_(k-1)^2` and `u_(k-1) / u_(k-2)^2`; `inf` where that pattern is not
    seen (fewer than three undamped steps in a row, updates not shrinking, or the
    two estimates of `K` more than `_QUADRATIC_AGREEMENT` apart). In logarithms, so
    that no square overflows."""
    older, previous, update = (
        state.older_update_norm,
        state.previous_update_norm,
        state.update_norm,
    )
    usable = (
        (state.undamped_run >= 3)
        & jnp.isfinite(older)
        & (update > 0)
        & (update < previous)
        & (previous < older)
    )
    # Placeholders where not usable, so the logarithms stay finite.
    older, previous, update = (
        jnp.where(usable, x, 1) for x in (older, previous, update)
    )
    log_k_now = jnp.log(update) - 2 * jnp.log(previous)
    log_k_before = jnp.log(previous) - 2 * jnp.log(older)
    agree = jnp.abs(log_k_now - log_k_before) <= jnp.log(_QUADRATIC_AGREEMENT)
    log_estimate = jnp.maximum(log_k_now, log_k_before) + 2 * jnp.log(update)
    return jnp.where(usable & agree, jnp.exp(log_estimate), jnp.inf)


class DeerNewton(optx.AbstractRootFinder):
    """Newton's method for a residual `F(Y)_i = y_i - Phi_i(y_{i-1})` over a whole
    trajectory `Y` of shape `(T, n)`, whose Jacobian is unit lower block-bidiagonal.

    Each step linearises `F` once (`jax.linearize`: residual and Jacobian from the
    same pass), reads the blocks `J_i` off the linearisation (see
    [`deer_diffrax.AbstractJacobianMode`][]) and solves the linear recurrence
    `dy_i = J_i dy_{i-1} - F_i` with [`deer_diffrax.AssociativeScanSolver`][].

    Converged means the error of the returned trajectory against the root is within
    tolerance, `atol + rtol |y_i|` entrywise. An exact Newton update is, to first
    order, the error of the iterate it started from: with exact blocks the iteration
    stops once an undamped update is within tolerance and returns the updated
    iterate, whose error is about the square of it. A criterion on the residual
    would not do: errors within the residual tolerance at every substep accumulate
    along the trajectory (measured: float32 results hundreds of times further from
    the root than the rounding of a sequential solve). Exact Newton also stops one
    step earlier when its last three undamped updates shrink quadratically at one
    rate and predict an error of 1% of the tolerance after the last of them. With
    approximate blocks (quasi-Newton, a surrogate linearisation) the iteration stops
    once its linear-rate estimate of the error is a tenth of the tolerance, and
    `postprocess` finishes with one exact Newton step, whose update checks that
    estimate with the full coupling and whose correction squares the error; its
    size is returned as the statistic `error_estimate` (see `solve_trajectory`,
    which fails the solve when it exceeds 1).

    **Damping.** Far from the solution the linearised recurrence can amplify
    exponentially and the next iterate overflows (Van der Pol or Lotka-Volterra
    over long windows). A damping strategy ([`deer_diffrax.AbstractDamping`][];
    by default [`deer_diffrax.ShrinkBlocksDamping`][]) judges each trial iterate by
    its residual, rejects the bad ones (the step then restarts from the last
    accepted iterate) and damps the step. On problems where Newton works no trial
    is rejected. Where the linearisation is safe at trial points (explicit base
    solvers, recurrence cells; see [`deer_diffrax.AbstractLinearisation`][]) each
    trial is linearised directly, and a rejected trial takes no step: the next
    step linearises the anchor again and takes the damped step from there (or, for
    a strategy that reuses the anchor's update, rebuilds it from that update at
    once). So damping costs nothing per iteration where no trial is rejected, and
    one more iteration per rejection; otherwise it costs one more residual
    evaluation per iteration (the trial is judged before the accepted point is
    linearised).

    Non-finite residuals that damping cannot recover from stop the iteration with
    `RESULTS.nonlinear_divergence`; running out of steps gives
    `RESULTS.nonlinear_max_steps_reached`.
    """

    rtol: float | None = eqx.field(static=True, default=None)
    atol: float | None = eqx.field(static=True, default=None)
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    jacobian: AbstractJacobianMode = FullJacobian()
    damping: AbstractDamping = eqx.field(
        default=ShrinkBlocksDamping(), converter=damping_strategy
    )
    linear_solver: lx.AbstractLinearSolver = AssociativeScanSolver()
    linearisation: AbstractLinearisation = ResidualLinearisation()
    on_prediction: Literal["stop", "relinearise", "ignore"] = eqx.field(
        static=True, default="stop"
    )

    def __check_init__(self):
        if self.on_prediction not in ("stop", "relinearise", "ignore"):
            raise ValueError(
                "`on_prediction` must be 'stop', 'relinearise' or 'ignore'; got "
                f"{self.on_prediction!r}."
            )

    @property
    def _exact(self) -> bool:
        return self.jacobian.exact and self.linearisation.exact

    def scaled_norm(self, x: Array, at: Array) -> Float[Array, ""]:
        """The norm of `x` in units of the tolerance at `at`:
        `norm(x / (atol + rtol |at|))`, with the default tolerance of `at`'s dtype
        where `rtol` or `atol` is `None`. A trajectory is converged when its error
        has a scaled norm of at most 1."""
        return self._norm_in(x, self._tolerance_at(at))

    def _tolerance_at(self, at: Array) -> Array:
        """`atol + rtol |at|` entrywise: the unit of `scaled_norm` at `at`."""
        default = default_tolerance(at.dtype)
        rtol = default if self.rtol is None else self.rtol
        atol = default if self.atol is None else self.atol
        return atol + rtol * jnp.abs(at)

    def _norm_in(self, x: Array, tolerance: Array) -> Float[Array, ""]:
        return jnp.real(self.norm(x / tolerance))

    def _linearises_trials(self) -> bool:
        # With damping, a rejected trial's step restarts from the last accepted
        # iterate. Where the residual may be linearised anywhere, each step
        # linearises its trial once (residual and blocks from one pass); otherwise
        # it evaluates the trial, then linearises the accepted point (two passes).
        return self.damping.may_reject and self.linearisation.safe_at_trials

    def _reuses_anchor_update(self) -> bool:
        # A strategy whose rejected steps differ only in how they use the anchor's
        # undamped update keeps that update, `(T, n)`, and rebuilds a rejected
        # step from it at once.
        return self._linearises_trials() and self.damping.reuses_update

    def _retries_anchor(self) -> bool:
        # Any other strategy needs the anchor's residual and blocks after a
        # rejection. Keeping them would mean selecting them against the trial's,
        # `(T, n, n)`, in every step, and carrying them: measured on a GRU scan
        # (hidden 8, T = 1e5, float32 and float64) that made the forward solve
        # 13-27% slower than undamped Newton, with no trial ever rejected. Instead a
        # rejected trial takes no step, and the next step linearises the anchor
        # again.
        return self._linearises_trials() and not self.damping.reuses_update

    def _linearise(self, fn, y, args, struct):
        """The residual at `y`, the aux, and the Jacobian blocks there."""
        residual, aux, blocks = self.linearisation.residual_and_blocks(
            fn, y, args, self.jacobian, struct
        )
        if self.on_prediction == "relinearise":
            # A differentiated solve hands its last blocks to the implicit gradient,
            # whose transposed recurrence reads them time-major. Left free, XLA (CPU)
            # lays a GRU cell's Jacobian out for the forward solve and transposes it
            # there: pinned, `jax.value_and_grad` of a GRU scan (hidden 8) took
            # 10.5 against 12.2-12.7 ms at T = 1e4 (float32) and 294-332 against
            # 364 ms at T = 1e5 (float64). The forward solve is left to XLA, whose
            # own layout measured faster there.
            blocks = time_major(blocks)
        return residual, aux, blocks

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del options, f_struct, aux_struct, tags
        struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
        # The layout of the blocks depends on the Jacobian mode alone: read it off an
        # identity map rather than tracing a linearisation of the residual.
        shape = jax.eval_shape(lambda: self.jacobian.blocks(lambda v: v, struct))
        anchor_blocks = jnp.zeros(shape.shape, shape.dtype)
        reuse = self._reuses_anchor_update()
        return DeerNewtonState(
            residual_norm=jnp.array(jnp.inf, dtype=y.dtype),
            update_norm=jnp.array(jnp.inf, dtype=y.dtype),
            previous_update_norm=jnp.array(jnp.inf, dtype=y.dtype),
            older_update_norm=jnp.array(jnp.inf, dtype=y.dtype),
            undamped_run=jnp.array(0),
            finite=jnp.array(True),
            num_steps=jnp.array(0),
            num_rejected=jnp.array(0),
            damping=self.damping.init(y.dtype),
            anchor=y,
            anchor_blocks=anchor_blocks,
            anchor_update=jnp.zeros_like(y) if reuse else None,
            retrying=jnp.array(False) if self._retries_anchor() else None,
        )

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
        first = state.num_steps == 0

        def norm_in(x, tolerance):
            return self._norm_in(x, tolerance).astype(state.residual_norm.dtype)

        direct = self._linearises_trials()
        reuse = self._reuses_anchor_update()
        retry = self._retries_anchor()
        may_reject = self.damping.may_reject
        if direct or not may_reject:
            trial_residual, aux, trial_blocks = self._linearise(fn, y, args, struct)
        else:
            # Judge the trial on its residual alone, and linearise only the accepted
            # point: linearising a wild trial can fail outright (an implicit base
            # solver's own tangent solve raises on the NaNs of its failed stage
            # solve).
            trial_residual, aux = fn(y, args)
        trial_tolerance = self._tolerance_at(y)
        trial_norm = norm_in(trial_residual, trial_tolerance)
        trial_finite = jnp.all(jnp.isfinite(trial_residual))
        accept, damping = self.damping.judge(
            state.damping,
            first,
            trial_norm,
            trial_finite,
            state.residual_norm,
            trial_residual,
        )
        if retry:
            # The trial is the anchor again, after a rejection: the strategy has
            # already decided how to damp this step.
            accept = accept | state.retrying
            damping = jtu.tree_map(
                lambda old, new: jnp.where(state.retrying, old, new),
                state.damping,
                damping,
            )

        if may_reject:
            anchor = jnp.where(accept, y, state.anchor)
            # The same values as `_tolerance_at(anchor)`, but selected rather than
            # recomputed from the selected anchor: XLA then reduces both norms of
            # the step plainly, where otherwise each fused its own tolerance into a
            # slower reduction (measured on a GRU scan, hidden 8, T = 1e4, float32:
            # damping cost 22-33% over none before, 4-9% after).
            anchor_tolerance = jnp.where(
                accept, trial_tolerance, self._tolerance_at(state.anchor)
            )
            residual_norm = jnp.where(accept, trial_norm, state.residual_norm)
            # Only a non-finite starting residual is beyond rescue, or a rejection
            # that leaves the strategy's state as it was: the step is a function of
            # the anchor and that state alone, so every later step would compute the
            # same trial and reject it again (shrinking at its largest lambda, with a
            # non-finite trial). Stop there, rather than spend the iterations left.
            repeats = jnp.invert(accept) & eqx.tree_equal(damping, state.damping)
            still_finite = (
                state.finite & (trial_finite | jnp.invert(first)) & jnp.invert(repeats)
            )
            num_rejected = state.num_rejected + jnp.where(accept, 0, 1)
            if direct:
                # The anchor's when accepted; a rejected step does not use them (it
                # rebuilds its update from the anchor's, or takes no step).
                residual, blocks = trial_residual, trial_blocks
            else:
                residual, aux, blocks = self._linearise(fn, anchor, args, struct)
        else:
            anchor = y
            anchor_tolerance = trial_tolerance
            residual_norm = trial_norm
            still_finite = state.finite & trial_finite
            num_rejected = state.num_rejected
            residual, blocks = trial_residual, trial_blocks

        def damped_update():
            if not reuse:
                out = self.damping.update(
                    damping, anchor, blocks, residual, self.linear_solver
                )
                return out + (None,)
            fresh = self.damping.solve_step(
                damping, blocks, residual, self.linear_solver
            )
            # At a rejected trial the solve above is discarded: the step restarts
            # from the update it made at the anchor.
            full = jnp.where(accept, fresh, state.anchor_update)
            return self.damping.update_from(damping, anchor, full) + (full,)

        prediction = self._relinearisation_prediction(state)
        if prediction is None:
            update, new_y, damping, anchor_update = damped_update()
        else:
            refresh, predicted = prediction
            if may_reject:
                refresh = refresh & accept
            # The previous step's update predicted an error within 1% of the
            # tolerance: this step only linearises there (above), for the blocks
            # that the implicit gradient reuses, and skips the recurrence solve.
            update, new_y, damping, anchor_update = jax.lax.cond(
                refresh,
                lambda: (
                    jnp.zeros_like(anchor),
                    anchor,
                    damping,
                    jnp.zeros_like(anchor) if reuse else None,
                ),
                damped_update,
            )
        update_norm = norm_in(update, anchor_tolerance)
        if prediction is not None:
            # The error of the returned iterate is the one predicted.
            update_norm = jnp.where(
                refresh, predicted.astype(update_norm.dtype), update_norm
            )
        if retry:
            # A rejected trial: no step (the update made from its blocks is
            # discarded); the next step starts again from the anchor. Skipping that
            # solve under a `lax.cond` instead cost every step of a GRU scan (hidden
            # 8, float32) 20-25% at T = 1e4 and 1e5, with no trial rejected: more
            # than a wasted solve per rejection.
            new_y = jnp.where(accept, new_y, anchor)
            update_norm = jnp.where(accept, update_norm, jnp.inf)
        update_finite = jnp.all(jnp.isfinite(new_y))
        damping = self.damping.after_update(damping, update_finite)
        undamped = self.damping.is_undamped(damping) & update_finite
        if may_reject:
            undamped = undamped & accept
            # A non-finite trial would stop Optimistix's loop before the next step
            # could reject it: reject it here, staying at the anchor.
            new_y = jnp.where(update_finite, new_y, anchor)
            num_rejected = num_rejected + jnp.where(update_finite, 0, 1)
            update_norm = jnp.where(update_finite, update_norm, jnp.inf)
        else:
            still_finite = still_finite & jnp.all(jnp.isfinite(update))
        undamped_run = jnp.where(undamped, state.undamped_run + 1, 0)
        new_state = DeerNewtonState(
            residual_norm=residual_norm,
            update_norm=update_norm,
            previous_update_norm=state.update_norm,
            older_update_norm=state.previous_update_norm,
            undamped_run=undamped_run,
            finite=still_finite,
            num_steps=state.num_steps + 1,
            num_rejected=num_rejected,
            damping=damping,
            anchor=anchor,
            anchor_blocks=blocks,
            anchor_update=anchor_update,
            retrying=jnp.invert(accept) if retry else None,
        )
        return new_y, new_state, aux

    def _relinearisation_prediction(
        self, state: DeerNewtonState
    ) -> tuple[Bool[Array, ""], Float[Array, ""]] | None:
        """With `on_prediction="relinearise"` (and exact blocks): whether this step
        starts from an iterate whose error the last updates predict to be within
        `_QUADRATIC_SAFETY` of the tolerance (where `"stop"` would have stopped),
        and that predicted error; `None` when never."""
        if not (self._exact and self.on_prediction == "relinearise"):
            return None
        undamped = self.damping.is_undamped(state.damping)
        predicted = _quadratic_estimate(state)
        refresh = (
            undamped & (state.num_steps > 0) & (predicted / _QUADRATIC_SAFETY <= 1)
        )
        return refresh, predicted

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        converged = self._error_estimate(state) <= 1
        diverged = jnp.invert(state.finite)
        result = optx.RESULTS.where(
            diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return converged | diverged, result

    def _error_estimate(self, state: DeerNewtonState) -> Float[Array, ""]:
        """The scaled error of the iterate after the last step, as estimated from
        the last updates.

        An undamped exact Newton update is, to first order, the error of the point it
        started from, and the updated point is far more accurate (quadratic
        convergence); so its size is a safe bound in exact mode, and so is the
        error that three updates in a row predict when they shrink quadratically at
        one rate, with a margin of 100 (`_quadratic_estimate`). A quasi-Newton step
        contracts the error only linearly, by a rate `theta` estimated from the
        ratio of the last two updates, and leaves an error of about
        `theta / (1 - theta)` times the last update; the solve's final exact step
        checks that estimate.
        """
        update = state.update_norm
        previous = state.previous_update_norm
        known = jnp.isfinite(previous) & (previous > 0)
        rate = jnp.where(known, update / jnp.where(known, previous, 1), _MAX_RATE)
        rate = jnp.clip(rate, 0, _MAX_RATE)
        linear = update * rate / (1 - rate) / _LINEAR_SAFETY
        # A damped step is not judged by its rate: on strongly amplifying dynamics a
        # heavily damped (Picard-like) iteration can take tiny steps far from the
        # root, and a step cut short by a trust region says nothing of the rest of
        # the trajectory. Only an undamped exact update measures the error, and
        # only undamped quasi-Newton steps have the rate the estimate assumes.
        undamped = self.damping.is_undamped(state.damping)
        if self._exact and self.on_prediction == "stop":
            quadratic = _quadratic_estimate(state) / _QUADRATIC_SAFETY
            chosen = jnp.minimum(update, quadratic)
        elif self._exact:
            chosen = update
        else:
            chosen = linear
        estimate = jnp.where(undamped, chosen, jnp.inf)
        return jnp.where(jnp.isfinite(estimate), estimate, jnp.inf)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del options, tags, result
        struct = jax.ShapeDtypeStruct(y.shape, y.dtype)
        if self._exact:
            # The last step was an exact Newton step whose update was within
            # tolerance (or predicted an updated iterate within 1% of it), so the
            # returned iterate is the updated one. Where the linearised recurrence
            # amplifies strongly that step can still spoil it:
            # keep the point it started from if the step made the residual both worse
            # and larger than the tolerance (or non-finite).
            residual, _ = fn(y, args)
            norm = self.scaled_norm(residual, y)
            keep_last = norm <= jnp.maximum(state.residual_norm, 1)  # False for NaN
            value = jnp.where(keep_last, y, state.anchor)
            final_residual = jnp.where(keep_last, norm, state.residual_norm)
            error = self._error_estimate(state)
            num_steps = state.num_steps
            # The exact blocks at the point the last step started from, within
            # tolerance of the solution (to first order the solution's, for its
            # gradient and its Lyapunov exponent); after a stop on the quadratic
            # prediction, within the last update of it. A differentiated solve
            # does not stop there: it takes one more step that only linearises at
            # the predicted iterate (`on_prediction="relinearise"`), whose blocks
            # these then are.
            exact_blocks = state.anchor_blocks
        else:
            # A quasi-Newton estimate of the error is blind to what its blocks
            # leave out (the coupling between components, for diagonal blocks), so
            # the solve ends with one exact Newton step. Its update is the error of
            # the quasi-Newton iterate to first order, a check that sees everything;
            # applying it squares that error.
            start = jnp.where(jnp.all(jnp.isfinite(y)), y, state.anchor)
            # The exact blocks, the cheapest way the linearisation offers them (a
            # surrogate's are not the residual's: then by probing the residual).
            exact = (
                self.linearisation
                if self.linearisation.exact
                else ResidualLinearisation()
            )
            residual, _, blocks = exact.residual_and_blocks(
                fn, start, args, FullJacobian(), struct
            )
            update = lx.linear_solve(
                BlockBidiagonalOperator(blocks),
                residual,
                self.linear_solver,
                throw=False,
            ).value
            value = start - update
            finite = jnp.all(jnp.isfinite(value))
            value = jnp.where(finite, value, start)
            error = jnp.where(finite, self.scaled_norm(update, start), jnp.inf)
            final_residual = self.scaled_norm(residual, start)
            num_steps = state.num_steps + 1
            exact_blocks = blocks
        stats: dict[str, Any] = dict(
            final_residual_norm=final_residual,
            error_estimate=error,
            num_newton_steps=num_steps,
            num_rejected=state.num_rejected,
            exact_blocks=exact_blocks,
        )
        return value, aux, stats


DeerNewton.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: the tolerance on the error of the returned trajectory against the
    root, `atol + rtol |y_i|` entrywise (see above). Default (`None`):
    `10 eps^0.75` of the trajectory's dtype.
- `norm`: how the scaled residual is reduced to a scalar (default: max-norm).
- `jacobian`: the structure of the blocks used in the Newton step (default exact,
    [`deer_diffrax.FullJacobian`][]).
- `damping`: a [`deer_diffrax.AbstractDamping`][], or `True` for
    [`deer_diffrax.ShrinkBlocksDamping`][] (the default: reject trial iterates
    whose residual is non-finite or grew too much, and retry from the last accepted
    iterate with shrunk Jacobian blocks) and `False` for
    [`deer_diffrax.NoDamping`][] (plain Newton); [`deer_diffrax.TrustRegion`][]
    keeps exact steps on the prefix of the trajectory where they are trusted.
- `linear_solver`: the Lineax solver of each Newton step's block-bidiagonal system
    (default [`deer_diffrax.AssociativeScanSolver`][]).
- `linearisation`: where the blocks come from, an
    [`deer_diffrax.AbstractLinearisation`][]: the exact Jacobian of the residual
    ([`deer_diffrax.ResidualLinearisation`][], the default, not assumed safe at
    trial points), the exact blocks computed step by step
    ([`deer_diffrax.StepwiseLinearisation`][]), or the Jacobian of a cheaper
    surrogate ([`deer_diffrax.SurrogateLinearisation`][]: quasi-Newton with the same
    root).
- `on_prediction`: what exact Newton does once three undamped updates in a row
    predict, by their quadratic rate, an error of 1% of the tolerance. `"stop"`
    (default): return the predicted iterate. `"relinearise"`: take one last step
    that only linearises at the predicted iterate (its residual and exact blocks,
    no recurrence solve) and return it, so that the blocks a gradient reuses are
    those of the returned iterate, at half an iteration's cost; a differentiated
    solve always does this (see `solve_trajectory`). `"ignore"`: go on until an
    update is itself within tolerance.
"""


class TrajectorySolution(eqx.Module):
    """What [`deer_diffrax.DeerNewton`][] found for one trajectory (see
    `solve_trajectory`).

    - `value`: the trajectory, `(T, n)`.
    - `result`: an `optimistix.RESULTS` code.
    - `num_steps`, `num_rejected`: Newton steps taken, trial iterates rejected.
    - `residual_norm`, `error_estimate`: the scaled residual at `value` and Newton's
        estimate of its error against the root (`<= 1`: converged).
    - `blocks`: the exact Jacobian blocks `J_i` of the last exact Newton step,
        taken within tolerance of `value` (no gradient flows through them).
    """

    value: Array
    result: optx.RESULTS
    num_steps: Int[Array, ""]
    num_rejected: Int[Array, ""]
    residual_norm: Float[Array, ""]
    error_estimate: Float[Array, ""]
    blocks: Array


class _FiniteOutputSolver(lx.AbstractLinearSolver):
    """Delegates to `solver`, but never hands Lineax a non-finite solution.

    Lineax solves the transposed system of a reverse-mode pass with `throw=True`,
    and raises on any non-finite solution. The gradient of a failed solve must be
    NaN instead (as its value is), which `solve_trajectory` arranges separately;
    here the non-finite entries only need to get past Lineax.
    """

    solver: lx.AbstractLinearSolver

    def init(self, operator, options):
        return self.solver.init(operator, options)

    def compute(self, state, vector, options):
        solution, result, stats = self.solver.compute(state, vector, options)
        solution = jtu.tree_map(lambda x: jnp.where(jnp.isfinite(x), x, 0), solution)
        return solution, result, stats

    def transpose(self, state, options):
        state, options = self.solver.transpose(state, options)
        return state, options

    def conj(self, state, options):
        return self.solver.conj(state, options)

    def assume_full_rank(self):
        return self.solver.assume_full_rank()


@jax.custom_jvp
def _scale_tangent(x: Array, factor: Array) -> Array:
    """`x`, whose tangent is multiplied by `factor` (not differentiated)."""
    del factor
    return x


@_scale_tangent.defjvp
def _scale_tangent_jvp(primals, tangents):
    x, factor = primals
    t_x, _ = tangents
    return x, t_x * factor


def _is_none(x: Any) -> bool:
    return x is None


def _typed_scalar_as_array(x: Any) -> Any:
    # JAX's typed Python scalars (subclasses of `int`, `float`, `complex` that carry
    # a `dtype`); plain Python scalars stay static.
    typed = isinstance(x, (int, float, complex)) and hasattr(x, "dtype")
    return jnp.asarray(x) if typed and not isinstance(x, bool) else x


@eqx.filter_custom_jvp
def _find_root(residual_fn, guess, args, newton, *, max_steps):
    """The Newton solve: the root, the Optimistix result and the statistics of
    `DeerNewton.postprocess` (exact blocks included). Differentiated by
    `_find_root_jvp`, never through the iterations. `newton` is an argument, not a
    keyword, because its linearisation may hold tracers (see `solve_trajectory`);
    their tangents are not used."""
    # A Python scalar that was traced when the residual was closure-converted (the
    # `1.0` of `jax.grad(f)(1.0)`, closed over by a cell) can arrive here as one of
    # JAX's typed Python scalars, which the conversion takes for static: make it an
    # array again.
    args = jtu.tree_map(_typed_scalar_as_array, args)
    solution = optx.root_find(
        residual_fn,
        newton,
        guess,
        args=args,
        max_steps=max_steps,
        # Never differentiated (`_find_root_jvp` is the derivative), so the cheapest
        # loop: a plain while loop.
        adjoint=optx.ImplicitAdjoint(),
        throw=False,
        tags=frozenset({unit_lower_block_bidiagonal_tag}),
    )
    stats = {key: solution.stats[key] for key in _STAT_KEYS}
    return solution.value, solution.result, stats


_STAT_KEYS = (
    "final_residual_norm",
    "error_estimate",
    "num_newton_steps",
    "num_rejected",
    "exact_blocks",
)


@_find_root.def_jvp
def _find_root_jvp(primals, tangents, *, max_steps):
    # The implicit function theorem: at the root `F(Y, p) = 0`, so
    # `dY = -(dF/dY)^{-1} (dF/dp) dp`. `dF/dY` is the unit lower block-bidiagonal
    # matrix of the blocks that the last exact Newton step built, within tolerance
    # of the root (as the reference DEER implementation does), instead of `n`
    # probes of the residual's linearisation at the root: that would cost another
    # Jacobian evaluation, about a whole Newton iteration. `dF/dp dp` is one
    # forward-mode pass of the residual at the root, which reverse mode transposes
    # into one vector-Jacobian product; the solve is transposed into the
    # reverse-time scan. The initial guess gets no derivative.
    residual_fn, guess, args, newton = primals
    t_residual_fn, _, t_args, _ = tangents
    # The blocks must be those of a point within tolerance of the root: after a
    # stop on the quadratic prediction, the last step's would be a whole update
    # away (4e-7 relative on a float64 GRU, gradients then off by 2e-9). So where
    # the forward solve would stop on the prediction, a differentiated one takes
    # one more step that linearises at the predicted iterate and skips the
    # recurrence solve: half an iteration, inside the loop body that already holds
    # the linearisation (linearising at the root after the loop instead put a
    # second copy of it into every gradient program: +28% compile time).
    # That step is one more than the undifferentiated solve takes, so it is
    # allowed one more: a window that converges on its last allowed iteration
    # must not fail only when differentiated (the gradient would silently lose it
    # where a `where` discards the failed window, as Diffrax does a rejected step).
    newton = dataclasses.replace(newton, on_prediction="relinearise")
    out = _find_root(residual_fn, guess, args, newton, max_steps=max_steps + 1)
    root, _, stats = out
    inputs, t_inputs = (residual_fn, args), (t_residual_fn, t_args)
    no_tangent = jtu.tree_map(_is_none, t_inputs, is_leaf=_is_none)
    nondiff, diff = eqx.partition(inputs, no_tangent, is_leaf=_is_none)

    def residual_at_root(_diff):
        _residual_fn, _args = eqx.combine(_diff, nondiff)
        return _residual_fn(root, _args)

    _, t_residual = jax.jvp(residual_at_root, (diff,), (t_inputs,))
    operator = BlockBidiagonalOperator(jax.lax.stop_gradient(stats["exact_blocks"]))
    t_root = -lx.linear_solve(
        operator,
        t_residual,
        _FiniteOutputSolver(newton.linear_solver),
        throw=False,
    ).value
    # No derivative for the result code and the statistics.
    return out, (t_root,) + jtu.tree_map(lambda _: None, out[1:])


def solve_trajectory(
    residual_fn: Callable[[Array, Any], Array],
    newton: DeerNewton,
    guess: Array,
    args: Any,
    max_steps: int,
) -> TrajectorySolution:
    """Find the root of a unit lower block-bidiagonal residual `F(Y)` with `newton`,
    differentiably (implicit function theorem, through `newton.linear_solver`, with
    the exact blocks of the last Newton step).

    Never raises, forward or backward: failures are in `result`, and the derivative
    of a failed solve is NaN. A solve that is differentiated does not stop on the
    quadratic prediction: it linearises once more at the predicted iterate
    (`DeerNewton.on_prediction="relinearise"`), so that the blocks its gradient
    reuses are those of the returned point, within tolerance of the root; it is
    allowed `max_steps + 1` steps for that, so that it converges wherever the
    undifferentiated solve does. A
    solve counts as successful only if the error estimate of the returned
    trajectory is within tolerance (after a quasi-Newton solve, the one given by its
    final exact Newton step).

    **Arguments:**

    - `residual_fn`: `(Y, args) -> F(Y)` on `(T, n)` trajectories.
    - `newton`: the root finder.
    - `guess`: where Newton starts (not differentiated).
    - `args`: passed to `residual_fn`; differentiated.
    - `max_steps`: the most Newton steps.

    **Returns:** a `TrajectorySolution`.
    """
    # Whatever `residual_fn` closes over becomes an input of the custom derivative.
    residual_fn = eqx.filter_closure_convert(residual_fn, guess, args)
    # So does whatever the linearisation's own functions close over; they are
    # only evaluated inside the solve, never differentiated.
    linearisation = newton.linearisation.closure_convert(guess, args, newton.jacobian)
    newton = eqx.tree_at(lambda nw: nw.linearisation, newton, linearisation)
    value, result, stats = _find_root(
        residual_fn, guess, args, newton, max_steps=max_steps
    )
    error = stats["error_estimate"]
    residual = stats["final_residual_norm"]
    successful = result == optx.RESULTS.successful
    result = optx.RESULTS.where(
        successful & ~(error <= 1),
        optx.RESULTS.nonlinear_max_steps_reached,
        result,
    )
    result = optx.RESULTS.where(
        (result == optx.RESULTS.successful) & ~jnp.isfinite(residual),
        optx.RESULTS.nonlinear_divergence,
        result,
    )
    # A failed solve has no meaningful derivative: make it NaN, like a failed
    # sequential solve's, rather than whatever the adjoint solve made of it.
    nan_if_failed = jax.lax.stop_gradient(
        jnp.where(result == optx.RESULTS.successful, 1, jnp.nan).astype(value.dtype)
    )
    return TrajectorySolution(
        value=_scale_tangent(value, nan_if_failed),
        result=result,
        num_steps=jnp.asarray(stats["num_newton_steps"], dtype=jnp.int32),
        num_rejected=jnp.asarray(stats["num_rejected"], dtype=jnp.int32),
        residual_norm=residual,
        error_estimate=error,
        blocks=jax.lax.stop_gradient(stats["exact_blocks"]),
    )
