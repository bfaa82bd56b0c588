"""What a window does when its Newton solve fails."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool


class AbstractFallback(eqx.Module):
    """What [`deer_diffrax.DeerSolver`][] does with a window whose Newton solve
    failed (not converged, or diverged).

    **Arguments:** none here; subclasses define their own.
    """

    @abc.abstractmethod
    def __call__(
        self,
        failed: Bool[Array, ""],
        trajectory: Array,
        sequential: Callable[[], Array],
    ) -> tuple[Array, Bool[Array, ""]]:
        """Finish the window.

        **Arguments:**

        - `failed`: whether Newton failed.
        - `trajectory`: Newton's trajectory, shape `(T, n)`.
        - `sequential`: computes the window's trajectory one substep at a time.

        **Returns:** the window's trajectory, and whether the fallback produced it
        (the window is then successful).
        """


class NoFallback(AbstractFallback):
    """A failed window is reported: `diffeqsolve` raises with `throw=True`, an
    adaptive controller rejects and shrinks the window.

    **Arguments:** none.
    """

    def __call__(self, failed, trajectory, sequential):
        del failed, sequential
        return trajectory, jnp.array(False)


class SequentialFallback(AbstractFallback):
    """A failed window is finished by the base solver one substep at a time, so
    the solve always succeeds; `DeerState.num_fallbacks` counts such windows.

    Under `jax.vmap` the choice becomes a `select`, so the sequential pass runs for
    every batch member: the price of the guarantee.

    **Arguments:** none.
    """

    def __call__(self, failed, trajectory, sequential):
        trajectory = jax.lax.cond(failed, sequential, lambda: trajectory)
        return trajectory, failed


def fallback_strategy(fallback: "str | None | AbstractFallback") -> AbstractFallback:
    """The strategy for `fallback=None` ([`deer_diffrax.NoFallback`][]),
    `fallback="sequential"` ([`deer_diffrax.SequentialFallback`][]) or a strategy
    itself."""
    if isinstance(fallback, AbstractFallback):
        return fallback
    if fallback is None:
        return NoFallback()
    if fallback == "sequential":
        return SequentialFallback()
    raise ValueError(
        f"Unknown fallback {fallback!r}: use None, 'sequential' or a "
        "`deer_diffrax.AbstractFallback`."
    )
