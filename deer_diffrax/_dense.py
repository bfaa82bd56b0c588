"""Dense output of a `DeerSolver` solution at many times, in memory linear in their
number."""

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree

from ._interpolation import DeerInterpolationFactory


def _dense_interpolation(sol) -> diffrax.DenseInterpolation:
    if not isinstance(sol, diffrax.Solution):
        raise ValueError(
            "`deer_diffrax.evaluate` takes the `diffrax.Solution` returned by "
            f"`diffrax.diffeqsolve`; got {type(sol).__name__}."
        )
    interpolation = sol.interpolation
    if interpolation is None:
        raise ValueError(
            "The solution has no dense output: solve with "
            "`saveat=diffrax.SaveAt(dense=True)` to evaluate it at arbitrary times."
        )
    factory = getattr(interpolation, "interpolation_cls", None)
    if not (
        isinstance(interpolation, diffrax.DenseInterpolation)
        and isinstance(factory, DeerInterpolationFactory)
    ):
        name = getattr(factory, "__name__", type(factory).__name__)
        raise ValueError(
            "`deer_diffrax.evaluate` needs the dense output of a `DeerSolver` solve; "
            f"this solution's interpolation is {name}, not a DeerInterpolation. For "
            "other solvers use `jax.vmap(sol.evaluate)(ts)`."
        )
    if interpolation.ts.ndim != 1:
        raise ValueError(
            "This solution is batched (it comes from a `vmap`-ed `diffeqsolve`): "
            "map over it, e.g. `jax.vmap(lambda s: deer_diffrax.evaluate(s, ts))(sol)`."
        )
    return interpolation


def _substep_index(substep_time, num_active, num_substeps: int, t, left: bool):
    """The substep of each point `t` inside its window, as `DeerInterpolation` picks
    it: `clip(searchsorted(window_ts, t, side) - 1, 0, num_active - 1)`.

    `substep_time(k)` gathers the `k`-th substep time of each point's window (one
    scalar per point), so no window's row of times is ever materialised;
    `num_active` is each point's window's number of active substeps.
    """
    # `left`: at a substep boundary, the substep that ends there. A substep time
    # "lies before" `t` when searchsorted with that side would count it.
    if left:
        before = lambda u: u < t
    else:
        before = lambda u: u <= t
    last = num_active - 1

    # The active substeps all have the first one's length but the last (see
    # `substep_grid`), so the index follows from it; rounding can put it one off,
    # which the neighbours correct.
    start = substep_time(0)
    size = substep_time(1) - start
    fraction = (t - start) / size
    # Non-finite for out-of-bounds (NaN) times: any in-range guess will do there.
    fraction = jnp.where(jnp.isfinite(fraction), fraction, 0)
    guess = jnp.clip(jnp.floor(fraction), 0, last).astype(jnp.int32)
    index = guess + jnp.where(before(substep_time(guess + 1)), 1, 0)
    index = index - jnp.where(before(substep_time(guess)), 0, 1)
    index = jnp.clip(index, 0, last)

    # Exact when the substep times are monotone: the index's own substep starts
    # before `t` and the next one does not (up to the clipping at either end).
    correct = (index == 0) | before(substep_time(index))
    correct = correct & ((index == last) | jnp.invert(before(substep_time(index + 1))))

    def bisect():
        # Only for a guess more than one substep off, which needs substeps near the
        # resolution of the time dtype (e.g. float32, long windows, large `t`):
        # count the substep times before `t` by bisection, still one scalar a time.
        def body(_, bounds):
            low, high = bounds
            middle = jnp.minimum((low + high) // 2, num_substeps)
            go_right = before(substep_time(middle))
            searching = low < high
            low = jnp.where(searching & go_right, middle + 1, low)
            high = jnp.where(searching & jnp.invert(go_right), middle, high)
            return low, high

        low = jnp.zeros_like(index)
        high = jnp.full_like(index, num_substeps + 1)
        num_iterations = int(num_substeps + 1).bit_length() + 1
        count, _ = lax.fori_loop(0, num_iterations, body, (low, high))
        return jnp.clip(count - 1, 0, last).astype(index.dtype)

    return lax.cond(eqxi.unvmap_any(jnp.invert(correct)), bisect, lambda: index)


@eqx.filter_jit
def _evaluate(interpolation: diffrax.DenseInterpolation, ts: Array, left: bool):
    t = ts * interpolation.direction
    # Diffrax's out-of-bounds rule: NaN outside [t0, t1] and for a trivial solve.
    ts_0 = interpolation.ts[0]
    ts_1 = interpolation.ts[interpolation.ts_size - 1]
    out_of_bounds = (interpolation.ts_size <= 1) | (t < ts_0) | (t > ts_1)
    t_bounded = lax.cond(
        eqxi.unvmap_any(out_of_bounds),
        lambda t: jnp.where(out_of_bounds, jnp.nan, t),
        lambda t: t,
        t,
    )

    # The window, exactly as `DenseInterpolation._get_local_interpolation` finds it.
    side = "left" if left else "right"
    window = jnp.searchsorted(interpolation.ts, t_bounded, side=side)
    window = jnp.clip(window - 1, 0, interpolation.ts_size - 2)

    window_ts = interpolation.infos["ts"]
    num_substeps = window_ts.shape[-1] - 1
    substep_time = lambda k: window_ts[window, k]
    num_active = interpolation.infos["num_active"][window].astype(jnp.int32)
    index = _substep_index(substep_time, num_active, num_substeps, t_bounded, left)

    # Only the chosen substep's dense information is gathered: O(1) per point.
    infos = jtu.tree_map(lambda x: x[window, index], interpolation.infos["infos"])
    base_cls = interpolation.interpolation_cls.base_interpolation_cls

    def evaluate_one(t0, t1, info, t):
        return base_cls(t0=t0, t1=t1, **info).evaluate(t, left=left)

    out = jax.vmap(evaluate_one)(
        substep_time(index), substep_time(index + 1), infos, t_bounded
    )

    trivial = (t == interpolation.t0_if_trivial) & (interpolation.ts_size == 1)

    def keep(y0, y):
        where = jnp.reshape(trivial, trivial.shape + (1,) * jnp.ndim(y0))
        return jnp.where(where, y0, y)

    return jtu.tree_map(keep, interpolation.y0_if_trivial, out)


def evaluate(sol: diffrax.Solution, ts: ArrayLike, left: bool = True) -> PyTree[Array]:
    """Evaluate the dense output of a [`deer_diffrax.DeerSolver`][] solution at many
    times at once.

    The values are those of `jax.vmap(sol.evaluate)(ts)`: the window containing each
    time is found as Diffrax finds it, then the substep inside the window, and the
    base solver's interpolation is evaluated there. The difference is memory.
    `sol.evaluate` takes the whole window's dense information (`num_substeps`
    substeps) for each time before it picks the substep, so under `jax.vmap` its
    memory grows as `len(ts) * num_substeps`. Here the substep is computed from the
    window's first substep (its active substeps have that length, but the last) and
    only that substep's information is read: memory grows linearly with `len(ts)`,
    on top of the solution itself.

    **Arguments:**

    - `sol`: the `diffrax.Solution` of a `diffrax.diffeqsolve` with
        `solver=DeerSolver(...)` and `saveat=diffrax.SaveAt(dense=True)`. Not
        batched: to evaluate a `vmap`-ed solve, `vmap` this function over it.
    - `ts`: the times, an array of any shape, in the solve's own time (for a
        reverse-time solve, between `t1` and `t0`). Times outside the solved
        interval give NaN, as with `sol.evaluate`.
    - `left`: at a substep or window boundary, whether to evaluate the
        interpolation of the substep that ends there (`True`, the left limit) or of
        the one that starts there (`False`), as for `sol.evaluate`.

    **Returns:** a PyTree of the structure of the state `y0`: where `y0` has a leaf
    of shape `s`, the result has one of shape `ts.shape + s`. For a 1-dimensional
    `ts` that is what `jax.vmap(sol.evaluate)(ts)` returns.
    """
    interpolation = _dense_interpolation(sol)
    ts = jnp.asarray(ts)
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(interpolation.ts.dtype)
    out = _evaluate(interpolation, ts.reshape(-1), bool(left))
    return jtu.tree_map(lambda y: y.reshape(ts.shape + y.shape[1:]), out)
