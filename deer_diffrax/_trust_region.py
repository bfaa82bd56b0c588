"""A trust region in time for DEER's Newton steps: a step is taken only as far along
the trajectory as its update stays within a radius adapted from step to step."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._damping import AbstractDamping


# Above this the radius is infinite again: the steps are plain Newton steps.
_MAX_RADIUS = 1e6
# The smallest radius. There any finite trial is accepted: the step still extends the
# exact prefix by one substep (see `TrustRegion`), so the iteration keeps moving.
_MIN_RADIUS = 1e-6
# A rejection sets the radius to a quarter of the largest change the rejected step
# made, and to at most this.
_MAX_SHRUNK_RADIUS = 1.0


class TrustRegionState(eqx.Module):
    """The state of [`deer_diffrax.TrustRegion`][] between Newton steps.

    **Arguments:** (built by the strategy, not by hand)

    - `radius`: the largest change per substep a step may make, relative to the
        size of the state (`inf`: no limit).
    - `taken`: the largest relative change per substep the last step made.
    - `truncated`: whether the last step was cut short by the radius.
    """

    radius: Float[Array, ""]
    taken: Float[Array, ""]
    truncated: Bool[Array, ""]


class TrustRegion(AbstractDamping):
    """A trust region in time: each Newton step moves the trajectory only as far as
    its update stays small, and starts the rest afresh.

    The step first computes the undamped update `dY` (Newton's, or the quasi-Newton
    one for approximate Jacobian modes) with the same associative scan. Newton's
    system is causal: the update of substep `i` depends only on substeps `<= i`, so
    the trajectory is exact on a prefix that grows every iteration, and where the
    linearised recurrence amplifies, the update goes wrong from some substep on and
    the iterate there overflows. So the trial keeps `Y - dY` up to and including the
    first substep `c` whose change `max_j |dy_cj|` exceeds `radius` times the size of
    the state (the max-norm of the first unknown), and continues constant at
    `y_c` beyond it: the rest of the window restarts from a constant guess, as a
    new window would. Substep `c` itself is always kept, so the exact prefix still
    grows by at least one substep per step.

    The radius adapts by itself: it starts infinite (plain Newton steps); a trial
    whose residual is non-finite or grew more than `max_residual_growth` times is
    rejected and the radius becomes a quarter of the smaller of the radius and the
    largest change the rejected step made (at most `1`); every accepted step that
    was cut short doubles it, and beyond `1e6` it is infinite again. At the smallest
    radius, `1e-6`, any finite trial is accepted. A non-finite update is discarded
    and the radius shrunk the same way. So on problems where plain Newton never
    produces a rejected trial the iterations are exactly Newton's, and elsewhere the
    window is solved in growing pieces without a hand-tuned parameter.

    Compared with [`deer_diffrax.ShrinkBlocksDamping`][], which shrinks every block
    of the trajectory towards a Picard sweep, this keeps exact Newton steps on the
    part of the trajectory where they are trustworthy. It costs no extra function
    evaluation: the cut and the splice are elementwise operations on the update.

    **Arguments:**

    - `max_residual_growth`: the factor by which the scaled residual norm may grow
        from the last accepted iterate to the trial before the trial is rejected
        (default `1e3`).
    """

    max_residual_growth: float = eqx.field(static=True, default=1e3)
    may_reject: ClassVar[bool] = True
    # A rejection only shrinks the radius: the step from the anchor cuts the same
    # update shorter.
    reuses_update: ClassVar[bool] = True

    def init(self, dtype) -> TrustRegionState:
        return TrustRegionState(
            radius=jnp.array(jnp.inf, dtype),
            taken=jnp.array(jnp.inf, dtype),
            truncated=jnp.array(False),
        )

    def _shrunk(self, state: TrustRegionState) -> Float[Array, ""]:
        radius = jnp.minimum(state.radius, state.taken)
        radius = jnp.minimum(radius, 4 * _MAX_SHRUNK_RADIUS) / 4
        return jnp.maximum(radius, _MIN_RADIUS).astype(state.radius.dtype)

    def judge(
        self, state, first, trial_norm, trial_finite, anchor_norm, trial_residual
    ):
        growth_ok = trial_norm <= self.max_residual_growth * anchor_norm
        smallest = state.radius <= _MIN_RADIUS
        accept = trial_finite & (first | growth_ok | smallest)
        grown = jnp.where(state.radius * 2 > _MAX_RADIUS, jnp.inf, 2 * state.radius)
        accepted = jnp.where(state.truncated, grown, state.radius)
        radius = jnp.where(accept, accepted, self._shrunk(state))
        return accept, eqx.tree_at(lambda s: s.radius, state, radius)

    def damp(self, state, blocks):
        return blocks

    def update(self, state, start, blocks, residual, linear_solver):
        update = self.solve_step(state, blocks, residual, linear_solver)
        return self.update_from(state, start, update)

    def update_from(self, state, start, update):
        # The size of the state: the first unknown is always within a substep of
        # the fixed initial state, and `dy_0` is that substep's exact change.
        scale = jnp.maximum(jnp.max(jnp.abs(start[0])), jnp.max(jnp.abs(update[0])))
        scale = jnp.where(scale > 0, scale, 1)
        change = jnp.max(jnp.abs(update), axis=1) / scale
        change = jnp.where(jnp.isfinite(change), change, jnp.inf)
        num_steps = start.shape[0]
        index = jnp.arange(num_steps)
        cut = jnp.min(jnp.where(change > state.radius, index, num_steps))
        keep = index <= cut
        # Built from the kept part directly rather than as `start - dY`: where the
        # start is wild (`1e37`, say) the subtraction would lose the new values.
        stepped = start - update
        last = stepped[jnp.minimum(cut, num_steps - 1)]
        trial = jnp.where(keep[:, None], stepped, last)
        new_state = TrustRegionState(
            radius=state.radius,
            taken=jnp.max(jnp.where(keep & jnp.isfinite(change), change, 0)).astype(
                state.taken.dtype
            ),
            truncated=cut < num_steps - 1,
        )
        # What the step moved, for the iteration's error estimates: a quasi-Newton
        # rate estimated from the full update of a cut step would be meaningless.
        return start - trial, trial, new_state

    def after_update(self, state, update_finite):
        radius = jnp.where(update_finite, state.radius, self._shrunk(state))
        return eqx.tree_at(lambda s: s.radius, state, radius)

    def is_undamped(self, state):
        return jnp.invert(state.truncated)
