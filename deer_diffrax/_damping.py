"""Safeguards of a Newton step: when to reject a trial iterate and how to damp."""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Bool, Float, PyTree

from ._operator import BlockBidiagonalOperator


class AbstractDamping(eqx.Module):
    """How [`deer_diffrax.DeerNewton`][] guards its steps.

    Each Newton step starts at a *trial* iterate (the previous step's result). The
    damping strategy judges the trial by its residual and either accepts it, so the
    step starts there, or rejects it, so the step restarts from the last accepted
    iterate (the *anchor*); it may then modify the Jacobian blocks of the step.
    Strategies carry their own state (e.g. a damping parameter) from step to step.

    Subclasses implement `init`, `judge`, `damp`, `after_update` and
    `is_undamped`, and set the class variable `may_reject`; one that computes its
    step differently (not as a linear recurrence with modified blocks, or not
    applied to the whole trajectory, as [`deer_diffrax.TrustRegion`][]) also
    overrides `update`. One whose steps from the same starting point all use the
    same undamped update (`damp` is the identity) and differ only in what they make
    of it may set `reuses_update = True` and define `update_from`: Newton then
    keeps that update and rebuilds a rejected trial's step from it at once, where
    otherwise (with a linearisation safe at trial points) a rejected trial takes no
    step and the next iteration linearises the anchor again.

    **Arguments:** none here; subclasses define their own parameters.
    """

    # Whether `judge` can ever reject a trial. If not, Newton keeps no anchor and
    # linearises every iterate directly.
    may_reject: ClassVar[bool]
    # Whether every step from the same anchor uses the same undamped update (`damp`
    # leaves the blocks as they are) and differs only in what `update_from` makes of
    # it. Newton then keeps that update for a rejected trial instead of spending an
    # iteration on linearising the anchor again.
    reuses_update: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, dtype) -> PyTree[Array]:
        """The strategy's state before the first step, for iterates of `dtype`."""

    @abc.abstractmethod
    def judge(
        self,
        state: PyTree[Array],
        first: Bool[Array, ""],
        trial_norm: Float[Array, ""],
        trial_finite: Bool[Array, ""],
        anchor_norm: Float[Array, ""],
        trial_residual: Array,
    ) -> tuple[Bool[Array, ""], PyTree[Array]]:
        """Accept or reject the trial iterate.

        **Arguments:**

        - `state`: the strategy's state.
        - `first`: whether this is the first step (there is no anchor yet).
        - `trial_norm`: the scaled norm of the residual at the trial iterate.
        - `trial_finite`: whether that residual is finite.
        - `anchor_norm`: the scaled residual norm at the last accepted iterate.
        - `trial_residual`: the residual at the trial iterate itself.

        **Returns:** whether the trial is accepted, and the state for this step.
        """

    @abc.abstractmethod
    def damp(self, state: PyTree[Array], blocks: Array) -> Array:
        """The Jacobian blocks this step uses, given the exact (or approximate)
        blocks at its starting point."""

    def update(
        self,
        state: PyTree[Array],
        start: Array,
        blocks: Array,
        residual: Array,
        linear_solver: lx.AbstractLinearSolver,
    ) -> tuple[Array, Array, PyTree[Array]]:
        """The step's update `dY` and the iterate it leads to (usually `Y - dY`).

        **Arguments:**

        - `state`: the strategy's state for this step.
        - `start`: the iterate `Y` the step starts from.
        - `blocks`: the Jacobian blocks at `start`.
        - `residual`: the residual there.
        - `linear_solver`: the Newton solver's Lineax solver.

        **Returns:** the update, the new iterate, and the strategy's state after
        computing them. By default, the update solves the linear recurrence
        `dy_i = B_i dy_{i-1} + F_i` with the blocks `B_i` given by `damp`, the new
        iterate is `Y - dY`, and the state is unchanged.
        """
        update = self.solve_step(state, blocks, residual, linear_solver)
        return update, start - update, state

    def solve_step(
        self,
        state: PyTree[Array],
        blocks: Array,
        residual: Array,
        linear_solver: lx.AbstractLinearSolver,
    ) -> Array:
        """The solution `dY` of the linear recurrence `dy_i = B_i dy_{i-1} + F_i`,
        with the blocks `B_i` that `damp` makes of `blocks` and `F` the residual."""
        operator = BlockBidiagonalOperator(self.damp(state, blocks))
        return lx.linear_solve(operator, residual, linear_solver, throw=False).value

    def update_from(
        self, state: PyTree[Array], start: Array, full_update: Array
    ) -> tuple[Array, Array, PyTree[Array]]:
        """For a strategy with `reuses_update`: the step's update, new iterate and
        state, given the undamped update `full_update` at `start` (the solution of
        the linear recurrence with the blocks and residual there)."""
        raise NotImplementedError(
            f"{type(self).__name__} sets `reuses_update` but does not define "
            "`update_from`."
        )

    @abc.abstractmethod
    def after_update(
        self, state: PyTree[Array], update_finite: Bool[Array, ""]
    ) -> PyTree[Array]:
        """The state after the step's update, which is discarded (the step stays at
        its starting point) if `update_finite` is `False`."""

    @abc.abstractmethod
    def is_undamped(self, state: PyTree[Array]) -> Bool[Array, ""]:
        """Whether the step taken with `state` was a plain Newton step, whose update
        then measures the error of its starting point."""


class NoDamping(AbstractDamping):
    """Plain Newton steps: every trial is accepted and the blocks are used as they
    are. A non-finite residual ends the iteration as diverged.

    **Arguments:** none.
    """

    may_reject: ClassVar[bool] = False

    def init(self, dtype) -> None:
        return None

    def judge(
        self, state, first, trial_norm, trial_finite, anchor_norm, trial_residual
    ):
        return jnp.array(True), state

    def damp(self, state, blocks):
        return blocks

    def after_update(self, state, update_finite):
        return state

    def is_undamped(self, state):
        return jnp.array(True)


_MAX_DAMPING = 1e12
# Below this the damping is switched off, so the steps are exact Newton steps again.
_MIN_DAMPING = 1e-4


class ShrinkBlocksDamping(AbstractDamping):
    """Reject a trial whose residual is non-finite or grew more than
    `max_residual_growth` times, and retry from the last accepted iterate with the
    Jacobian blocks shrunk, `J_i / (1 + lambda)`.

    `lambda` grows tenfold per rejection (from at least 1) and shrinks tenfold per
    acceptance, dropping to exactly 0 below `1e-4`, so steps return to plain Newton
    once the iteration behaves. As `lambda -> inf` the step becomes the Picard sweep
    `Y <- Phi(shift(Y))`, which cannot overshoot and makes the exact prefix of the
    trajectory at least one substep longer every iteration: the damped iteration
    interpolates between Newton's quadratic convergence and a sweep that always
    makes progress. At the largest `lambda` any finite trial is accepted; a
    non-finite one there would only be computed again, so `DeerNewton` stops as
    diverged. A non-finite update is discarded and `lambda` raised a hundredfold.

    **Arguments:**

    - `max_residual_growth`: the factor by which the scaled residual norm may grow
        from the last accepted iterate to the trial before the trial is rejected
        (default `1e3`).
    """

    max_residual_growth: float = eqx.field(static=True, default=1e3)
    may_reject: ClassVar[bool] = True

    def init(self, dtype) -> Float[Array, ""]:
        return jnp.array(0.0, dtype=dtype)

    def judge(
        self, state, first, trial_norm, trial_finite, anchor_norm, trial_residual
    ):
        growth_ok = trial_norm <= self.max_residual_growth * anchor_norm
        picard = state >= _MAX_DAMPING
        accept = trial_finite & (first | growth_ok | picard)
        relaxed = state / 10
        relaxed = jnp.where(relaxed < _MIN_DAMPING, 0, relaxed)
        raised = jnp.minimum(jnp.maximum(10 * state, 1.0), _MAX_DAMPING)
        return accept, jnp.where(accept, relaxed, raised).astype(state.dtype)

    def damp(self, state, blocks):
        return blocks / (1 + state).astype(blocks.dtype)

    def after_update(self, state, update_finite):
        # The next step re-accepts the anchor and divides lambda by 10, so raise it
        # by 100 to come back with ten times more.
        raised = jnp.minimum(jnp.maximum(100 * state, 10.0), _MAX_DAMPING)
        return jnp.where(update_finite, state, raised).astype(state.dtype)

    def is_undamped(self, state):
        return state == 0


def damping_strategy(damping: "bool | AbstractDamping") -> AbstractDamping:
    """The strategy for `damping=True` ([`deer_diffrax.ShrinkBlocksDamping`][]),
    `damping=False` ([`deer_diffrax.NoDamping`][]) or a strategy itself."""
    if isinstance(damping, AbstractDamping):
        return damping
    if isinstance(damping, bool):
        return ShrinkBlocksDamping() if damping else NoDamping()
    raise ValueError(
        f"Unknown damping {damping!r}: use True, False or a "
        "`deer_diffrax.AbstractDamping` (e.g. `ShrinkBlocksDamping()`)."
    )
