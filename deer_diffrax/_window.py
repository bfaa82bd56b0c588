"""One window of `DeerSolver`: its substep grid, the base method's one-step maps on
the flat state, the window's residual, and its error estimate."""

import functools as ft
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree, Real

from ._base_solver import restarted_step
from ._linearisation import step_values_and_blocks
from ._one_step import euler_step, one_step_map
from ._operator import shift_in, time_major
from ._ravel import real_ravel


class SubstepGrid(eqx.Module):
    """The substep times of one window.

    - `ts`: `num_substeps + 1` times from the window's start to its end. The first
        `num_active + 1` increase; the rest equal the window's end, so the inactive
        substeps have zero length (the identity map for every base method).
    - `num_active`: the substeps that advance time.
    """

    ts: Real[Array, " substeps_plus_1"]
    num_active: Int[Array, ""]


def substep_grid(t0, t1, num_substeps: int, substep_size) -> SubstepGrid:
    """The substeps of the window `[t0, t1]`, `num_substeps` of capacity.

    With a finite `substep_size` `h` and a window shorter than `num_substeps * h`,
    the window takes `ceil((t1 - t0) / h)` substeps of length `h`, the last one
    clipped at `t1`, exactly as a sequential solve with step `h` clipped at `t1`
    would, and leaves the rest of its capacity inactive. Otherwise (`h` NaN, or a
    window at least that long) the window is divided into `num_substeps` equal
    substeps.
    """
    t0 = jnp.asarray(t0)
    t1 = jnp.asarray(t1)
    dtype = jnp.result_type(t0, t1)
    t0 = t0.astype(dtype)
    t1 = t1.astype(dtype)
    k = jnp.arange(num_substeps + 1, dtype=dtype)
    length = t1 - t0
    even = t0 + length * (k / jnp.asarray(num_substeps, dtype))
    h = jnp.asarray(substep_size).astype(dtype)
    # A window a rounding error longer than a whole number of substeps takes that
    # number, not one more of length ~eps.
    needed = jnp.ceil(length / h * (1 - 64 * jnp.finfo(dtype).eps))
    partial = needed < num_substeps  # False for a NaN `h`
    num_active = jnp.where(partial, jnp.clip(needed, 1, num_substeps), num_substeps)
    clipped = jnp.where(k < num_active, t0 + k * h, t1)
    num_active = num_active.astype(jnp.int32)
    ts = jnp.where(partial, clipped, even)
    # Hit the window's end exactly, so consecutive windows share their boundary.
    return SubstepGrid(ts=ts.at[-1].set(t1), num_active=num_active)


def substep(base_solver, terms, args, unravel, y_prev, t_start, t_end):
    """One base-solver step `Phi_i(y_prev)` on the flat real state."""
    # A diverging Newton iterate must not reach the base solver: an implicit one
    # would hand NaNs to its own linear solver, which raises. Step from zero instead
    # and mark the result non-finite, which Newton's damping or failure check sees.
    finite = jnp.all(jnp.isfinite(y_prev))
    y = unravel(jnp.where(finite, y_prev, 0))
    written_out = one_step_map(base_solver, with_outputs=True)
    if written_out is not None and not terms.is_vf_expensive(t_start, t_end, y, args):
        # The same outputs as the base solver's `step`, without its stage loop.
        y_next, y_error, dense_info = written_out(terms, t_start, t_end, y, args)
        result = diffrax.RESULTS.successful
    else:
        y_next, y_error, dense_info, result = restarted_step(
            base_solver, terms, t_start, t_end, y, args
        )
        # An inactive (zero-length) substep is the identity whatever the base solver
        # (a multistep-like one would otherwise still move its carried state, a
        # user's own might divide by the step), and reports no error.
        active = t_end != t_start
        y_next = jtu.tree_map(lambda new, old: jnp.where(active, new, old), y_next, y)
        y_error = jtu.tree_map(
            lambda e: jnp.where(active, e, jnp.zeros_like(e)), y_error
        )
        result = diffrax.RESULTS.where(active, result, diffrax.RESULTS.successful)
    y_next = jnp.where(finite, real_ravel(y_next)[0], jnp.nan)
    return y_next, y_error, dense_info, result


def flat_step(step, terms, args, unravel, y_prev, t_start, t_end):
    """A step `(terms, t0, t1, y0, args) -> y1` on the flat real state."""
    return real_ravel(step(terms, t_start, t_end, unravel(y_prev), args))[0]


def transition(base_solver, terms, args, unravel, y_prev, t_start, t_end):
    """`Phi_i(y_prev)` alone: what Newton, the predictor and the fallback need."""
    step = one_step_map(base_solver)
    if step is None:
        return substep(base_solver, terms, args, unravel, y_prev, t_start, t_end)[0]
    return flat_step(step, terms, args, unravel, y_prev, t_start, t_end)


def window_residual(step, trajectory, y_start, ts):
    previous = shift_in(y_start, trajectory)
    return trajectory - jax.vmap(step)(previous, ts[:-1], ts[1:])


class WindowInputs(eqx.Module):
    """What a window's residual depends on, all of it as pytree leaves (so that
    the Newton solve's custom derivative sees every input, and no function of it
    captures a tracer of an enclosing transformation).

    - `step`: the flat substep map `(y_prev, t_start, t_end) -> Phi(y_prev)`,
        closure-converted: a vector field written as a closure over a model's
        parameters has them among its leaves.
    - `y_start`: the window's (flat) start.
    - `ts`: the substep grid.
    - `terms`, `args`: the solve's, for a surrogate linearisation.
    """

    step: Callable[[Array, Array, Array], Array]
    y_start: Array
    ts: Array
    terms: PyTree
    args: PyTree


def trajectory_residual(trajectory, inputs: WindowInputs):
    return window_residual(inputs.step, trajectory, inputs.y_start, inputs.ts)


def trajectory_residual_and_blocks(trajectory, inputs: WindowInputs, restrict):
    """`trajectory_residual` and `restrict` of each substep's exact Jacobian."""
    values, blocks = step_values_and_blocks(
        lambda y, times: inputs.step(y, *times),
        shift_in(inputs.y_start, trajectory),
        (inputs.ts[:-1], inputs.ts[1:]),
        restrict,
    )
    # Time-major blocks, as the recurrence solve reads them. Left to itself, XLA
    # (CPU, jax 0.10) lays the Jacobian of a Runge-Kutta step out component-major,
    # the way its stages' tangents come, and then converts the layout in every
    # consumer: a Tsit5 window of 4 states and 1e3-1e4 substeps (float64) ran
    # 1.6-1.9x slower wherever nothing else pinned the layout (no damping, or a
    # damping that keeps no copy of the blocks).
    return trajectory - values, time_major(blocks)


def euler_residual(unravel, trajectory, inputs: WindowInputs):
    # The surrogate of `linearise="vector_field"`: its Jacobian blocks are
    # `I + dt df/dy` at the start of each substep (for SDEs, plus the diffusion's
    # derivative times the Brownian increment), which agree with the base method's
    # blocks to first order in the substep.
    step = ft.partial(flat_step, euler_step, inputs.terms, inputs.args, unravel)
    return window_residual(step, trajectory, inputs.y_start, inputs.ts)


def worst_substep_error(errors: PyTree[Array]) -> PyTree[Array]:
    # Per entry, the error of the substep where it is largest in magnitude: the window
    # is accepted when every substep meets the tolerance a sequential solve would
    # have applied to it.
    def worst(e):
        index = jnp.argmax(jnp.abs(e), axis=0)
        return jnp.take_along_axis(e, index[None], axis=0)[0]

    return jtu.tree_map(worst, errors)
