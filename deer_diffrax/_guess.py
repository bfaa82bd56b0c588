"""Initial guesses for the Newton iteration over a window."""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
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


class AbstractInitialGuess(eqx.Module):
    """Where Newton's method starts in each window of a [`deer_diffrax.DeerSolver`][].

    Subclass it and implement `__call__` for a guess of your own.

    **Arguments:** None.
    """

    # Set to `True` by guesses that read the previous window's trajectory, which
    # the solver then keeps in its state.
    needs_previous: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(
        self,
        transition: Callable[[Array, Array, Array], Array],
        y_start: Float[Array, " n"],
        ts: Float[Array, " T_plus_1"],
        previous: tuple[Array, Array] | None,
        ravel: Callable[..., Array],
    ) -> Float[Array, "T n"]:
        """The guessed trajectory.

        **Arguments:**

        - `transition`: one substep of the base method on the flat state,
            `(y, t_start, t_end) -> y_next`.
        - `y_start`: the window's initial state (flat, real).
        - `ts`: the substep times, `T + 1` of them.
        - `previous`: `(trajectory, initial state)` of the previous window, if
            `needs_previous`, else `None`.
        - `ravel`: turns a state of the user's pytree structure into a flat one.

        **Returns:** the states at `ts[1:]`, shape `(T, n)`.
        """


class ConstantGuess(AbstractInitialGuess):
    """The window's initial state at every substep: safe, and needs nothing else.

    **Arguments:** None.
    """

    def __call__(self, transition, y_start, ts, previous, ravel):
        return constant_guess(y_start, ts.shape[0] - 1)


class PreviousWindowGuess(AbstractInitialGuess):
    """The previous window's trajectory, translated to the new initial state (good
    when consecutive windows look alike: slow drift, a steady state). The first
    window starts from the constant guess.

    **Arguments:** None.
    """

    needs_previous: ClassVar[bool] = True

    def __call__(self, transition, y_start, ts, previous, ravel):
        trajectory, start = previous
        return previous_window_guess(trajectory, start, y_start)


class PredictorGuess(AbstractInitialGuess):
    """A coarse sequential pass of the base method, `stride` substeps per coarse
    step, interpolated onto the substeps: `T / stride` sequential steps buy a start
    near the trajectory.

    **Arguments:**

    - `stride`: substeps per coarse step (default 10).
    """

    stride: int = eqx.field(static=True, default=10)

    def __check_init__(self):
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(
                f"PredictorGuess: `stride` must be a positive integer; got "
                f"{self.stride!r}."
            )

    def __call__(self, transition, y_start, ts, previous, ravel):
        return predictor_guess(transition, y_start, ts, self.stride)


class PathGuess(AbstractInitialGuess):
    """A function of time `path(t) -> y`, for example the `evaluate` method of a
    coarser solution, evaluated at the substep end times.

    **Arguments:**

    - `path`: the function `t -> y` (`y` shaped like the solver's state).
    """

    path: Callable

    def __call__(self, transition, y_start, ts, previous, ravel):
        return trajectory_guess(self.path, ts, ravel)


_NAMED_GUESSES = {
    "constant": ConstantGuess,
    "previous": PreviousWindowGuess,
    "predictor": PredictorGuess,
}


def initial_guess_strategy(
    guess: "str | Callable | AbstractInitialGuess", predictor_stride: int = 10
) -> AbstractInitialGuess:
    """Turn the shorthands `"constant"`, `"previous"`, `"predictor"` or a function
    `t -> y` into an initial-guess object."""
    if isinstance(guess, AbstractInitialGuess):
        return guess
    if isinstance(guess, str):
        if guess == "predictor":
            return PredictorGuess(predictor_stride)
        if guess in _NAMED_GUESSES:
            return _NAMED_GUESSES[guess]()
    elif callable(guess):
        return PathGuess(guess)
    raise ValueError(
        f"Unknown initial_guess {guess!r}: use one of {tuple(_NAMED_GUESSES)}, a "
        "function `t -> y` (for example `sol.evaluate` of a coarse solve), or an "
        "`deer_diffrax.AbstractInitialGuess`."
    )
