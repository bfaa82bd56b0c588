"""Initial guesses for the Newton iteration over a window."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def constant_guess(y_start: Float[Array, " n"], num_substeps: int) -> Array:
    """Every substep at the window's initial state: safe, and needs nothing else."""
    return jnp.broadcast_to(y_start, (num_substeps,) + y_start.shape)


def previous_window_guess(
    previous: Float[Array, "T n"],
    previous_start: Float[Array, " n"],
    y_start: Float[Array, " n"],
) -> Array:
    """The previous window's trajectory, translated to start at `y_start`.

    Good when consecutive windows look alike (slow drift, a steady state); the
    first window has no predecessor and `previous` is then the constant guess.
    """
    return previous - previous_start[None] + y_start[None]


def sequential_trajectory(
    substep: Callable[[Array, Array, Array], Array],
    y_start: Float[Array, " n"],
    ts: Float[Array, " T_plus_1"],
) -> Array:
    """The states after each interval of `ts`, stepping `substep(y, t0, t1)` one
    interval after another (a `lax.scan`: sequential in time)."""

    def body(y, t_pair):
        y_next = substep(y, t_pair[0], t_pair[1])
        return y_next, y_next

    _, trajectory = jax.lax.scan(body, y_start, jnp.stack([ts[:-1], ts[1:]], axis=1))
    return trajectory


def predictor_guess(
    substep: Callable[[Array, Array, Array], Array],
    y_start: Float[Array, " n"],
    ts: Float[Array, " T_plus_1"],
    stride: int,
) -> Array:
    """A coarse sequential pass with the base method, `stride` substeps per coarse
    step, linearly interpolated onto the substep grid.

    Costs `T / stride` sequential steps; in exchange Newton starts near the
    trajectory and typically needs few iterations even on long windows.
    """
    num_substeps = ts.shape[0] - 1
    num_coarse = max(1, -(-num_substeps // stride))
    coarse_ts = jnp.linspace(ts[0], ts[-1], num_coarse + 1)
    coarse = sequential_trajectory(substep, y_start, coarse_ts)
    coarse = jnp.concatenate([y_start[None], coarse])
    # Interpolate in the state's dtype (times may be float32 under a float64 state).
    coarse_ts = coarse_ts.astype(coarse.dtype)
    targets = ts[1:].astype(coarse.dtype)
    interpolate = lambda column: jnp.interp(targets, coarse_ts, column)
    return jax.vmap(interpolate, in_axes=1, out_axes=1)(coarse)


def trajectory_guess(
    path: Callable, ts: Float[Array, " T_plus_1"], ravel: Callable[..., Array]
) -> Array:
    """A user-supplied guess `path(t) -> y` (e.g. `sol.evaluate` of a coarse solve),
    evaluated at the substep end times."""
    return jax.vmap(lambda t: ravel(path(t)))(ts[1:])
