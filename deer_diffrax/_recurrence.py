"""`deer_diffrax.scan`: a parallel-in-time replacement for `jax.lax.scan` over a
nonlinear recurrence `h_t = cell(h_{t-1}, x_t)` (an RNN), solved by DEER's Newton
iteration.

The states `H = (h_1, ..., h_T)` are the root of `F(H)_t = h_t - cell(h_{t-1}, x_t)`,
the same unit lower block-bidiagonal residual that [`deer_diffrax.DeerSolver`][]
solves for a window of Runge--Kutta substeps; only the one-step map differs. So the
Newton root finder, the Jacobian modes, the associative-scan linear solver and the
implicit-function-theorem gradients are all shared with the ODE solver.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from ._jacobian import AbstractJacobianMode, jacobian_mode
from ._newton import DeerNewton, solve_trajectory
from ._operator import shift_in
from ._ravel import real_ravel
from ._scan_solve import AssociativeScanSolver
from ._solver import default_tolerance


class ScanStats(eqx.Module):
    """Diagnostics of one [`deer_diffrax.scan`][] (batched like the states under
    `jax.vmap`).

    - `num_newton_steps`: Newton iterations taken. Each one is a parallel evaluation
        of the cell and its Jacobian at every time step plus one associative scan.
    - `num_rejected`: trial iterates rejected by damping (`0` when Newton behaved).
    - `residual_norm`: the scaled max-norm of the residual at the returned states,
        `max_t |h_t - cell(h_{t-1}, x_t)| / (atol + rtol |h_t|)`; `<= 1` means every
        step satisfies the recurrence to the Newton tolerance.
    - `error_estimate`: Newton's estimate of the error of the returned states
        against the sequential recurrence (the size of the last exact Newton
        update), scaled by `atol + rtol |h_t|`; `<= 1` means converged.
    - `result`: an `optimistix.RESULTS` code: `successful`,
        `nonlinear_max_steps_reached` (not converged in `max_newton_steps`), or
        `nonlinear_divergence` / `nonfinite` (a non-finite residual, Newton update
        or iterate).
    """

    num_newton_steps: Int[Array, ""]
    num_rejected: Int[Array, ""]
    residual_norm: Float[Array, ""]
    error_estimate: Float[Array, ""]
    result: optx.RESULTS


ScanStats.__init__.__doc__ = """**Arguments:** the fields above (built by
[`deer_diffrax.scan`][], not by users)."""


class _FlatCell(eqx.Module):
    """The cell acting on flat real state vectors, so that Newton sees `(T, n)`
    trajectories whatever the pytree structure (or complex dtype) of the carry."""

    cell: Callable
    unravel: Callable = eqx.field(static=True)

    def __call__(self, h: Array, x: PyTree) -> Array:
        return real_ravel(self.cell(self.unravel(h), x))[0]


def _residual(trajectory: Array, args: tuple[_FlatCell, Array, PyTree]) -> Array:
    """`F(H)_t = h_t - cell(h_{t-1}, x_t)`, every time step at once."""
    flat_cell, h0, xs = args
    previous = shift_in(h0, trajectory)
    return trajectory - jax.vmap(flat_cell)(previous, xs)


def _structure(tree: PyTree) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
    leaves, treedef = jtu.tree_flatten(tree)
    return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def _describe(tree: PyTree) -> str:
    return str(
        jtu.tree_map(lambda x: f"{jnp.result_type(x).name}{list(jnp.shape(x))}", tree)
    )


def _sequence_length(xs: PyTree, length: int | None) -> int:
    lengths = {
        jnp.shape(x)[0] if jnp.ndim(x) > 0 else None for x in jtu.tree_leaves(xs)
    }
    if None in lengths:
        raise ValueError(
            "deer_diffrax.scan: every leaf of `xs` needs a leading time axis; got "
            f"a scalar leaf in {_describe(xs)}."
        )
    if len(lengths) > 1:
        raise ValueError(
            "deer_diffrax.scan: the leaves of `xs` have different leading (time) "
            f"axis lengths {sorted(lengths)}; they must all be equal. Got "
            f"{_describe(xs)}."
        )
    if length is not None:
        if not isinstance(length, int) or length < 0:
            raise ValueError(
                "deer_diffrax.scan: `length` must be a non-negative int; got "
                f"{length!r}."
            )
        if lengths and lengths != {length}:
            raise ValueError(
                f"deer_diffrax.scan: `length={length}` does not match the leading "
                f"axis length {lengths.pop()} of `xs`."
            )
        return length
    if not lengths:
        raise ValueError(
            "deer_diffrax.scan: `xs` has no arrays, so pass `length` (the number of "
            "steps), as for `jax.lax.scan`."
        )
    return lengths.pop()


def _check_carry(h0: PyTree) -> None:
    leaves = jtu.tree_leaves(h0)
    if not leaves:
        raise ValueError("deer_diffrax.scan: the initial carry `h0` has no arrays.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(
                "deer_diffrax.scan: every leaf of the carry must be floating or "
                f"complex (Newton's method differentiates the cell); got "
                f"{_describe(h0)}."
            )


def _check_cell_output(h0: PyTree, out_struct: PyTree) -> None:
    if _structure(h0) != _structure(out_struct):
        raise ValueError(
            "deer_diffrax.scan: `cell(h, x)` must return the new carry, with the same "
            "pytree structure, shapes and dtypes as `h`. The carry is "
            f"{_describe(h0)} but the cell returned {_describe(out_struct)}. "
            "(Unlike `jax.lax.scan`'s `f`, the cell returns only the carry, not a "
            "`(carry, output)` pair; compute per-step outputs afterwards with "
            "`jax.vmap` over the states. A dtype mismatch usually means `h0` and the "
            "cell's parameters have different precisions.)"
        )


def _ravel_guess(initial_guess: PyTree, h0: PyTree, num_steps: int) -> Array:
    expected = jtu.tree_map(
        lambda h: jax.ShapeDtypeStruct((num_steps,) + jnp.shape(h), jnp.result_type(h)),
        h0,
    )
    if _structure(initial_guess) != _structure(expected):
        raise ValueError(
            "deer_diffrax.scan: `initial_guess` must look like the returned states "
            f"(the carry with a leading time axis of length {num_steps}): expected "
            f"{_describe(expected)}, got {_describe(initial_guess)}."
        )
    return jax.vmap(lambda h: real_ravel(h)[0])(initial_guess)


def _empty_scan(cell, h0, xs, return_stats):
    """`T = 0`: no states, but the cell is still checked against the carry."""
    x_struct = jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
    _check_cell_output(h0, jax.eval_shape(cell, h0, x_struct))
    states = jtu.tree_map(lambda h: jnp.zeros((0,) + h.shape, h.dtype), h0)
    if not return_stats:
        return states
    stats = ScanStats(
        num_newton_steps=jnp.array(0),
        num_rejected=jnp.array(0),
        residual_norm=jnp.array(0.0, real_ravel(h0)[0].dtype),
        error_estimate=jnp.array(0.0, real_ravel(h0)[0].dtype),
        result=optx.RESULTS.successful,
    )
    return states, stats


_MAX_STEPS_MESSAGE = (
    "deer_diffrax.scan: Newton's method did not converge within `max_newton_steps` "
    "iterations. Increase `max_newton_steps`; use `jacobian='full'` if you chose "
    "'diagonal' (quasi-Newton converges only linearly); pass an `initial_guess` "
    "closer to the answer (e.g. the states of a previous call); or split the "
    "sequence into shorter chunks chained through their final states. Pass "
    "`throw=False, return_stats=True` to get the result code instead of this error."
)
_DIVERGENCE_MESSAGE = (
    "deer_diffrax.scan: Newton's method diverged (a non-finite residual or update). "
    "The cell may return NaN/inf for these inputs, or its linearisation is strongly "
    "expanding along the iterates (e.g. a trained RNN with unstable or bistable "
    "dynamics, linearised at the constant initial guess). Try the other `jacobian` "
    "mode (quasi-Newton, 'diagonal', often stays bounded where 'full' does not), a "
    "closer `initial_guess`, float64, shorter chunks of the sequence, or "
    "`jax.lax.scan`. Pass `throw=False, return_stats=True` to get the result code "
    "instead of this error."
)


def scan(
    cell: Callable[[PyTree[Array], PyTree[Array]], PyTree[Array]],
    h0: PyTree[ArrayLike],
    xs: PyTree[ArrayLike],
    *,
    length: int | None = None,
    reverse: bool = False,
    jacobian: "str | AbstractJacobianMode" = "full",
    rtol: float | None = None,
    atol: float | None = None,
    max_newton_steps: int = 100,
    damping: bool = True,
    initial_guess: PyTree[ArrayLike] | None = None,
    throw: bool = True,
    return_stats: bool = False,
    linear_solver: lx.AbstractLinearSolver | None = None,
) -> PyTree[Array] | tuple[PyTree[Array], ScanStats]:
    """Run the recurrence `h_t = cell(h_{t-1}, x_t)`, `t = 1..T`, in parallel over
    time (DEER: Lim et al., ICLR 2024), returning every state.

    It computes what

    ```python
    def step(h, x):
        h = cell(h, x)
        return h, h

    _, states = jax.lax.scan(step, h0, xs)
    ```

    computes, but instead of `T` cell calls in a chain it solves for all states at
    once with Newton's method on `F(H)_t = h_t - cell(h_{t-1}, x_t)`. Each Newton
    iteration evaluates the cell and its Jacobian at all time steps in parallel and
    solves the linearised recurrence with an associative scan (`O(log T)` depth).
    The root is the sequential answer, to the Newton tolerance.

    Gradients (reverse or forward mode, with respect to `h0`, `xs` and anything the
    cell closes over, e.g. its parameters) use the implicit function theorem: one
    reverse-time associative scan with the exact transposed Jacobian, whatever
    `jacobian` is; nothing is differentiated through the Newton iterations. Works
    under `jax.jit` and `jax.vmap` (a batch of sequences is a `vmap` over `h0` and
    `xs`).

    Newton's cost per iteration is `T` evaluations of the cell's Jacobian (`n` JVPs
    each, for a carry of `n` real numbers) and, for `jacobian="full"`, an
    `O(T n^3)` scan; typical RNN cells converge in a few iterations. The payoff is on
    parallel hardware: on a CPU `jax.lax.scan` is usually faster.

    Newton can fail where the cell's linearisation is strongly expanding along the
    iterates: a trained RNN that stores memory in bistable or unstable dynamics,
    linearised at the constant initial guess, can have Jacobian products that grow
    like `e^60` over a few thousand steps. Failures are never returned silently
    (see `throw`). The diagonal (quasi-Newton) mode, whose linearised recurrences
    are much less expanding, often converges where full Newton diverges; a custom
    mode that clips the diagonal entries to `[-1, 1]` cannot expand at all (see
    `examples/gru_classification.py`).

    **Arguments:**

    - `cell`: the step `cell(h, x) -> h_new`, where `h_new` has the same pytree
        structure, shapes and dtypes as `h`. For Equinox cells, whose signature is
        `cell(input, hidden)`, pass `lambda h, x: gru(x, h)`. It must be
        differentiable in `h` (forward mode).
    - `h0`: the initial carry, a pytree of floating or complex arrays (e.g. an
        `(h, c)` tuple for an LSTM).
    - `xs`: the inputs, a pytree of arrays sharing a leading time axis of length `T`
        (`x_t` is `xs[t - 1]` for every leaf), or `None` together with `length`.
    - `length`: the number of steps `T`; needed only when `xs` has no arrays.
    - `reverse`: run from the last input to the first, as `jax.lax.scan`'s
        `reverse=True` (states are returned in the order of `xs`).
    - `jacobian`: the Jacobian used by the Newton iterations: `"full"` (exact Newton,
        quadratic convergence, `O(T n^2)` memory; the default), `"diagonal"`
        (quasi-Newton with the exact diagonal of each step's Jacobian: `O(T n)`
        memory and scan work, linear convergence, more iterations), or a
        [`deer_diffrax.AbstractJacobianMode`][].
    - `rtol`, `atol`: a bound on the error of the returned states against the
        sequential recurrence: Newton stops once its exact update (to first order,
        that error) is within `atol + rtol |h_t|` entrywise, and returns the updated
        states, whose error is then about the square of it. With
        `jacobian="diagonal"` the quasi-Newton iterations stop on their own error
        estimate and one exact Newton step checks and corrects it. Default
        (`None`): `10 eps^0.75` of the carry's dtype (about `2e-11` in float64,
        `6e-5` in float32), which leaves results at the rounding level of
        `jax.lax.scan`.
    - `max_newton_steps`: the most Newton iterations allowed (default 100). In exact
        arithmetic Newton is exact after at most `T` iterations; contractive RNN
        cells need a handful with `jacobian="full"`.
    - `damping`: reject Newton iterates whose residual overflows or grows sharply
        and retry with shrunk Jacobian blocks, down to a Picard sweep (default
        `True`; free when Newton behaves; see [`deer_diffrax.DeerNewton`][]).
    - `initial_guess`: the states Newton starts from, shaped like the returned
        states; default (`None`) is `h0` at every time step. A good guess (the
        states from the previous training step, say) saves iterations. No gradient
        flows through it.
    - `throw`: if Newton fails (see `ScanStats.result`), raise an error at run time
        naming the cause and the remedies (`equinox.EquinoxRuntimeError`; under
        `jax.jit` it arrives wrapped in a `JaxRuntimeError`, use `equinox.filter_jit`
        for the plain one). With `throw=False` the last iterate is returned as is
        and the failure is only reported in the stats, so `return_stats=True` is
        then required.
    - `return_stats`: also return a [`deer_diffrax.ScanStats`][] with the Newton
        iteration count, the final residual and the result code.
    - `linear_solver`: the Lineax solver of the linearised recurrences (Newton steps
        and gradients); default [`deer_diffrax.AssociativeScanSolver`][].

    **Returns:**

    The states `h_1, ..., h_T`: the carry's pytree with a leading time axis of
    length `T` on every leaf (`h0` itself is not included; the final carry is the
    last entry). With `return_stats=True`, a pair `(states, stats)`.

    **Raises:**

    `ValueError` at trace time if the cell's output differs from the carry in
    structure, shape or dtype, if the leaves of `xs` disagree on `T`, if the carry
    is not floating, or for invalid options.
    """
    if not isinstance(max_newton_steps, int) or max_newton_steps < 1:
        raise ValueError(
            "deer_diffrax.scan: `max_newton_steps` must be a positive int; got "
            f"{max_newton_steps!r}."
        )
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not tol > 0:
            raise ValueError(
                f"deer_diffrax.scan: `{name}` must be positive; got {tol!r}."
            )
    if not throw and not return_stats:
        raise ValueError(
            "deer_diffrax.scan: with `throw=False` a failed Newton solve is only "
            "reported in the stats, so pass `return_stats=True` as well (and check "
            "`stats.result`)."
        )
    mode = jacobian_mode(jacobian)
    if linear_solver is None:
        linear_solver = AssociativeScanSolver()
    _check_carry(h0)
    h0 = jtu.tree_map(jnp.asarray, h0)
    xs = jtu.tree_map(jnp.asarray, xs)
    num_steps = _sequence_length(xs, length)
    if reverse:
        xs = jtu.tree_map(lambda x: jnp.flip(x, 0), xs)
        if initial_guess is not None:
            initial_guess = jtu.tree_map(lambda h: jnp.flip(h, 0), initial_guess)

    if num_steps == 0:
        return _empty_scan(cell, h0, xs, return_stats)

    # Closure conversion turns whatever the cell closes over (parameters being
    # differentiated, say) into array leaves of a pytree, which the implicit adjoint
    # then differentiates like any other input. Tracing it also gives the output
    # structure, checked here so a wrong cell fails at trace time, not inside Newton.
    x_example = jtu.tree_map(lambda x: x[0], xs)
    closed_cell = eqx.filter_closure_convert(cell, h0, x_example)
    _check_cell_output(h0, closed_cell.out_struct)

    h0_flat, unravel = real_ravel(h0)
    flat_cell = _FlatCell(closed_cell, unravel)
    if initial_guess is None:
        guess = jnp.broadcast_to(h0_flat, (num_steps,) + h0_flat.shape)
    else:
        guess = _ravel_guess(initial_guess, h0, num_steps).astype(h0_flat.dtype)

    default = default_tolerance(h0_flat.dtype)
    newton = DeerNewton(
        rtol=default if rtol is None else rtol,
        atol=default if atol is None else atol,
        jacobian=mode,
        damping=damping,
        linear_solver=linear_solver,
        # A cell can be linearised at any finite carry: with damping, linearise each
        # trial once and keep the accepted linearisation (one pass per iteration).
        linearise_trials=True,
    )
    solution = solve_trajectory(
        _residual, newton, guess, (flat_cell, h0_flat, xs), max_newton_steps
    )
    trajectory = solution.value
    result = solution.result
    residual_norm = solution.residual_norm
    if throw:
        max_steps_reached = result == optx.RESULTS.nonlinear_max_steps_reached
        trajectory = eqx.error_if(trajectory, max_steps_reached, _MAX_STEPS_MESSAGE)
        failed = (result != optx.RESULTS.successful) & jnp.invert(max_steps_reached)
        trajectory = eqx.error_if(trajectory, failed, _DIVERGENCE_MESSAGE)

    states = jax.vmap(unravel)(trajectory)
    if reverse:
        states = jtu.tree_map(lambda h: jnp.flip(h, 0), states)
    if not return_stats:
        return states
    stats = ScanStats(
        num_newton_steps=solution.num_steps,
        num_rejected=solution.num_rejected,
        residual_norm=residual_norm,
        error_estimate=solution.error_estimate,
        result=result,
    )
    return states, stats
