"""`deer_diffrax.scan`: a parallel-in-time replacement for `jax.lax.scan` over a
nonlinear recurrence `(h_t, y_t) = f(h_{t-1}, x_t)` (an RNN), solved by DEER's Newton
iteration.

The carries `H = (h_1, ..., h_T)` are the root of `F(H)_t = h_t - f(h_{t-1}, x_t)[0]`,
the same unit lower block-bidiagonal residual that [`deer_diffrax.DeerSolver`][]
solves for a window of Runge--Kutta substeps; only the one-step map differs. So the
Newton root finder, the Jacobian modes, the associative-scan linear solver and the
implicit-function-theorem gradients are all shared with the ODE solver. The outputs
`y_t` take no part in the root finding: once the carries are known, they are one
parallel evaluation of `f` away.
"""

import operator
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from ._damping import AbstractDamping
from ._jacobian import AbstractJacobianMode, jacobian_mode
from ._linearisation import step_values_and_blocks, StepwiseLinearisation
from ._lyapunov import initial_direction, trajectory_growth, vector_growth
from ._newton import DeerNewton, solve_trajectory, TrajectorySolution
from ._operator import shift_in
from ._ravel import real_ravel
from ._scan_solve import AssociativeScanSolver


class ScanStats(eqx.Module):
    """Diagnostics of one [`deer_diffrax.scan`][] (batched like the carries under
    `jax.vmap`).

    - `num_newton_steps`: Newton iterations taken. Each one is a parallel evaluation
        of `f` (its carry output) and its Jacobian at every time step plus one
        associative scan.
    - `num_rejected`: trial iterates rejected by damping (`0` when Newton behaved).
    - `residual_norm`: the scaled max-norm of the residual at the returned carries,
        `max_t |h_t - f(h_{t-1}, x_t)[0]| / (atol + rtol |h_t|)`; `<= 1` means every
        step satisfies the recurrence to the Newton tolerance.
    - `error_estimate`: Newton's estimate of the error of the returned carries
        against the sequential recurrence (the size of the last exact Newton
        update), scaled by `atol + rtol |h_t|`; `<= 1` means converged.
    - `lyapunov_exponent`: the largest Lyapunov exponent of the recurrence along
        the returned carries, per step: `log |P v| / T` for the product `P` of the
        exact Jacobians `d h_t / d h_{t-1}` of all steps and a fixed unit vector
        `v`. Negative for contracting cells (Newton converges in a few iterations
        at any length); where it is positive, Newton's linearised recurrences
        amplify by about `exp(lyapunov_exponent * T)`, and long sequences need many
        iterations or fail (see the docs page "Will DEER be fast on my problem?").
    - `result`: an `optimistix.RESULTS` code: `successful`,
        `nonlinear_max_steps_reached` (not converged in `max_newton_steps`), or
        `nonlinear_divergence` / `nonfinite` (a non-finite residual, Newton update
        or iterate).
    """

    num_newton_steps: Int[Array, ""]
    num_rejected: Int[Array, ""]
    residual_norm: Float[Array, ""]
    error_estimate: Float[Array, ""]
    lyapunov_exponent: Float[Array, ""]
    result: optx.RESULTS


ScanStats.__init__.__doc__ = """**Arguments:** the fields above (built by
[`deer_diffrax.scan`][], not by users)."""


class _FlatCell(eqx.Module):
    """The carry half of `f` acting on flat real carry vectors, so that Newton sees
    `(T, n)` trajectories whatever the pytree structure (or complex dtype) of the
    carry. `f` is closure-converted: what it closes over are leaves of this module,
    which the implicit adjoint differentiates. The outputs `y` are dropped here, so
    that XLA removes their computation from the Newton iterations as dead code."""

    f: Callable
    unravel: Callable = eqx.field(static=True)

    def __call__(self, h: Array, x: PyTree) -> Array:
        return real_ravel(self.f(self.unravel(h), x)[0])[0]


def _residual(trajectory: Array, args: tuple[_FlatCell, Array, PyTree]) -> Array:
    """`F(H)_t = h_t - f(h_{t-1}, x_t)[0]`, every time step at once."""
    flat_cell, h0, xs = args
    previous = shift_in(h0, trajectory)
    return trajectory - jax.vmap(flat_cell)(previous, xs)


def _residual_and_blocks(
    trajectory: Array,
    args: tuple[_FlatCell, Array, PyTree],
    restrict: Callable[[Array], Array],
) -> tuple[Array, Array]:
    """`F(H)` and `restrict` of its exact blocks `J_t = df/dh (h_{t-1}, x_t)`."""
    flat_cell, h0, xs = args
    values, blocks = step_values_and_blocks(
        flat_cell, shift_in(h0, trajectory), xs, restrict
    )
    return trajectory - values, blocks


def _lyapunov_exponent(
    flat_cell: _FlatCell, init_flat: Array, xs: PyTree, solution: TrajectorySolution
) -> Float[Array, ""]:
    """Per step, from the product of Newton's exact Jacobians of steps `2..T` and
    the first step's Jacobian (not in Newton's blocks: `h_0` is fixed)."""
    x_first = jtu.tree_map(lambda x: x[0], xs)
    first = jax.lax.stop_gradient(
        jax.jacfwd(lambda h: flat_cell(h, x_first))(init_flat)
    )
    # `blocks[0]` couples the fixed initial state, which the residual does not
    # differentiate: Newton's product runs over the steps after the first.
    later, later_scale = trajectory_growth(solution.blocks[1:])
    product, growth = trajectory_growth(jnp.stack([first, later]))
    growth, _ = vector_growth(
        product,
        growth + later_scale,
        initial_direction(init_flat.shape[0], init_flat.dtype),
    )
    return growth / solution.value.shape[0]


def _carry_sources(
    f: Callable, init: PyTree, x_example: PyTree, y_struct: PyTree
) -> list[tuple[str, int] | None]:
    """For each leaf of the output `y` of `f(carry, x) -> (new_carry, y)`:
    `("new", j)` if it is leaf `j` of `new_carry` itself, `("previous", j)` if it
    is leaf `j` of the `carry` argument passed through, else `None`. Read off the
    traced program (the same variable), so it holds for every input. A `y` with
    a leaf that is not an array gets `None` everywhere."""
    closed, out_dynamic, _ = eqx.filter_make_jaxpr(f)(init, x_example)
    jaxpr = closed.jaxpr
    num_carry = len(jtu.tree_leaves(init))
    y_leaves = jtu.tree_leaves(out_dynamic[1])
    num_y = len(jtu.tree_leaves(y_struct))
    if len(y_leaves) != num_y or len(jaxpr.outvars) != num_carry + num_y:
        return [None] * num_y
    new_carry = jaxpr.outvars[:num_carry]
    carry_in = jaxpr.invars[:num_carry]

    def source(var):
        for kind, variables in (("new", new_carry), ("previous", carry_in)):
            for j, candidate in enumerate(variables):
                if var is candidate:
                    return kind, j
        return None

    return [source(var) for var in jaxpr.outvars[num_carry:]]


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
        # `operator.index` also takes NumPy integers, as `jax.lax.scan` does.
        try:
            valid = operator.index(length) >= 0
        except TypeError:
            valid = False
        if not valid:
            raise ValueError(
                "deer_diffrax.scan: `length` must be a non-negative int; got "
                f"{length!r}."
            )
        length = operator.index(length)
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


def _check_carry(init: PyTree) -> None:
    leaves = jtu.tree_leaves(init)
    if not leaves:
        raise ValueError("deer_diffrax.scan: the initial carry `init` has no arrays.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(
                "deer_diffrax.scan: every leaf of the carry must be floating or "
                "complex (Newton's method differentiates `f` with respect to it); "
                f"got {_describe(init)}. Integer state (a step counter, say) can "
                "usually be computed from the time index instead: pass it in `xs`."
            )


def _check_unroll(unroll: Any) -> None:
    # Accepted so that calls written for `jax.lax.scan` work unchanged, and checked
    # as `jax.lax.scan` checks it, so that they also fail the same way.
    try:
        valid = isinstance(unroll, bool) or operator.index(unroll) >= 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(
            "deer_diffrax.scan: `unroll` must be a bool or a non-negative int (it is "
            f"accepted for compatibility with `jax.lax.scan` and ignored); got "
            f"{unroll!r}."
        )


def _check_step_output(init: PyTree, out_struct: Any) -> PyTree:
    """Checks that `f` returned `(new_carry, y)` with `new_carry` shaped like `init`,
    and returns the structure of `y`."""
    if not (isinstance(out_struct, (tuple, list)) and len(out_struct) == 2):
        raise ValueError(
            "deer_diffrax.scan: `f(carry, x)` must return a pair `(new_carry, y)`, "
            f"as for `jax.lax.scan`; got {_describe(out_struct)}. (For a recurrence "
            "without per-step outputs return `(new_carry, None)`; to collect the "
            "carries return `(new_carry, new_carry)`.)"
        )
    carry_struct, y_struct = out_struct
    if _structure(init) != _structure(carry_struct):
        raise ValueError(
            "deer_diffrax.scan: the new carry that `f(carry, x)` returns (the first "
            "element of its pair `(new_carry, y)`) must have the same pytree "
            "structure, shapes and dtypes as the carry. The carry `init` is "
            f"{_describe(init)} but `f` returned the carry "
            f"{_describe(carry_struct)}. (A dtype mismatch usually means `init` and "
            "the parameters of `f` have different precisions.)"
        )
    return y_struct


def _ravel_guess(initial_guess: PyTree, init: PyTree, num_steps: int) -> Array:
    expected = jtu.tree_map(
        lambda h: jax.ShapeDtypeStruct((num_steps,) + jnp.shape(h), jnp.result_type(h)),
        init,
    )
    if _structure(initial_guess) != _structure(expected):
        raise ValueError(
            "deer_diffrax.scan: `initial_guess` must look like the stacked carries "
            f"`h_1, ..., h_T` (the carry with a leading time axis of length "
            f"{num_steps}): expected {_describe(expected)}, got "
            f"{_describe(initial_guess)}."
        )
    return jax.vmap(lambda h: real_ravel(h)[0])(initial_guess)


def _empty_scan(f, init, xs, return_stats):
    """`T = 0`: the carry is `init` and `ys` is empty, as for `jax.lax.scan`, but `f`
    is still checked against the carry."""
    x_struct = jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
    y_struct = _check_step_output(init, jax.eval_shape(f, init, x_struct))
    ys = jtu.tree_map(lambda y: jnp.zeros((0,) + y.shape, y.dtype), y_struct)
    if not return_stats:
        return init, ys
    dtype = real_ravel(init)[0].dtype
    stats = ScanStats(
        num_newton_steps=jnp.array(0),
        num_rejected=jnp.array(0),
        residual_norm=jnp.array(0.0, dtype),
        error_estimate=jnp.array(0.0, dtype),
        lyapunov_exponent=jnp.array(jnp.nan, dtype),
        result=optx.RESULTS.successful,
    )
    return (init, ys), stats


_MAX_STEPS_MESSAGE = (
    "deer_diffrax.scan: Newton's method did not converge within `max_newton_steps` "
    "iterations. Increase `max_newton_steps`; use `jacobian='full'` if you chose "
    "'diagonal' (quasi-Newton converges only linearly); pass an `initial_guess` "
    "closer to the answer (e.g. the carries of a previous call); or split the "
    "sequence into shorter chunks chained through their final carries. If "
    "`ScanStats.lyapunov_exponent` is positive the recurrence is chaotic along this "
    "sequence (perturbations grow like exp(exponent x T)) and only shorter chunks "
    "help. Pass `throw=False, return_stats=True` to get the result code and the "
    "exponent instead of this error."
)
_DIVERGENCE_MESSAGE = (
    "deer_diffrax.scan: Newton's method diverged (a non-finite residual or update). "
    "`f` may return NaN/inf for these inputs, or its linearisation is strongly "
    "expanding along the iterates (e.g. a trained RNN with unstable or bistable "
    "dynamics, linearised at the constant initial guess). Try the other `jacobian` "
    "mode (quasi-Newton, 'diagonal', often stays bounded where 'full' does not), a "
    "closer `initial_guess`, float64, shorter chunks of the sequence, or "
    "`jax.lax.scan`. Pass `throw=False, return_stats=True` to get the result code "
    "instead of this error."
)


def scan(
    f: Callable[[PyTree[Array], PyTree[Array]], tuple[PyTree[Array], PyTree[Array]]],
    init: PyTree[ArrayLike],
    xs: PyTree[ArrayLike] | None = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    jacobian: "str | AbstractJacobianMode" = "full",
    rtol: float | None = None,
    atol: float | None = None,
    max_newton_steps: int = 100,
    damping: "bool | AbstractDamping" = True,
    initial_guess: PyTree[ArrayLike] | None = None,
    throw: bool = True,
    return_stats: bool = False,
    linear_solver: lx.AbstractLinearSolver | None = None,
) -> (
    tuple[PyTree[Array], PyTree[Array]]
    | tuple[tuple[PyTree[Array], PyTree[Array]], ScanStats]
):
    """`jax.lax.scan`, solved in parallel over time (DEER: Lim et al., ICLR 2024) for
    a nonlinear recurrence such as an RNN.

    `deer_diffrax.scan(f, init, xs)` returns what `jax.lax.scan(f, init, xs)` returns,
    `(final_carry, ys)`, for a step

    ```python
    def f(carry, x):
        ...
        return new_carry, y
    ```

    It gets there differently: instead of `T` calls of `f` in a chain, it solves for
    all the carries `h_1, ..., h_T` at once with Newton's method on
    `F(H)_t = h_t - f(h_{t-1}, x_t)[0]`. Each Newton iteration evaluates `f` and its
    Jacobian at all time steps in parallel and solves the linearised recurrence with
    an associative scan (`O(log T)` depth). The root is the sequential answer, to the
    Newton tolerance. The outputs take no part in this: once the carries have
    converged, `ys` is one parallel evaluation (a `jax.vmap`) of `f` at the previous
    carries `h_0, ..., h_{T-1}` and the inputs, so each `y_t` is exactly what `f`
    returns at the converged carries, and `ys` may be any pytree (integers included,
    or `None`), unrelated to the carry. Outputs that are a leaf of the carry itself
    (a step returning `(h, h)` collects the carries) are the converged carries,
    with no evaluation at all. The carries must be floating or complex.

    Gradients (reverse or forward mode, of `final_carry` and `ys`, with respect to
    `init`, `xs` and anything `f` closes over, e.g. its parameters) reach the carries
    through the implicit function theorem: one reverse-time associative scan with the
    exact transposed Jacobian, whatever `jacobian` is; nothing is differentiated
    through the Newton iterations; the transposed Jacobian is that of the last
    Newton step, taken within tolerance of the solution. Gradients through `ys`
    then differentiate that last plain evaluation of `f`. Works under `jax.jit`
    and `jax.vmap` (a batch of sequences is a `vmap` over `init` and `xs`).

    Newton's cost per iteration is `T` evaluations of the Jacobian of `f` with
    respect to the carry (`n` JVPs each, for a carry of `n` real numbers) and, for
    `jacobian="full"`, an `O(T n^3)` scan; typical RNN cells converge in a few
    iterations. The payoff is on parallel hardware: on a CPU `jax.lax.scan` is
    usually faster.

    Newton can fail where the linearisation of `f` is strongly expanding along the
    iterates: a trained RNN that stores memory in bistable or unstable dynamics,
    linearised at the constant initial guess, can have Jacobian products that grow
    like `e^60` over a few thousand steps. Failures are never returned silently
    (see `throw`). The diagonal (quasi-Newton) mode, whose linearised recurrences
    are much less expanding, often converges where full Newton diverges; a custom
    mode that clips the diagonal entries to `[-1, 1]` cannot expand at all (see
    `examples/gru_classification.py`).

    **Arguments:**

    The first six are those of `jax.lax.scan`:

    - `f`: the step `f(carry, x) -> (new_carry, y)`, where `new_carry` has the same
        pytree structure, shapes and dtypes as `carry`. It must be differentiable in
        `carry` (forward mode); `y` need not be. An Equinox cell
        `gru(input, hidden) -> new_hidden` becomes `lambda h, x: (gru(x, h), None)`
        when only the final carry is needed, and a step returning `(h_new, h_new)`,
        with `h_new = gru(x, h)`, collects every carry in `ys`.
    - `init`: the initial carry `h_0`, a pytree of floating or complex arrays (e.g.
        an `(h, c)` tuple for an LSTM).
    - `xs`: the inputs, a pytree of arrays sharing a leading time axis of length `T`
        (`x_t` is `xs[t - 1]` for every leaf), or `None` together with `length`.
    - `length`: the number of steps `T`; needed only when `xs` has no arrays.
    - `reverse`: run from the last input to the first, as `jax.lax.scan`'s
        `reverse=True`: `ys` is in the order of `xs`, and `final_carry` is the carry
        after the step at `xs[0]`.
    - `unroll`: accepted (a bool or a non-negative int, as `jax.lax.scan` checks it)
        so that calls written for `jax.lax.scan` run unchanged, and ignored: there is
        no sequential loop to unroll.

    The rest, keyword-only, control the Newton solve:

    - `jacobian`: the Jacobian used by the Newton iterations: `"full"` (exact Newton,
        quadratic convergence, `O(T n^2)` memory; the default), `"diagonal"`
        (quasi-Newton with the exact diagonal of each step's Jacobian: `O(T n)`
        memory and scan work, linear convergence, more iterations), or a
        [`deer_diffrax.AbstractJacobianMode`][].
    - `rtol`, `atol`: a bound on the error of the returned carries against the
        sequential recurrence: Newton stops once its exact update (to first order,
        that error) is within `atol + rtol |h_t|` entrywise, and returns the updated
        carries, whose error is then about the square of it. With
        `jacobian="diagonal"` the quasi-Newton iterations stop on their own error
        estimate and one exact Newton step checks and corrects it. Default
        (`None`): `10 eps^0.75` of the carry's dtype (about `2e-11` in float64,
        `6e-5` in float32), which leaves results at the rounding level of
        `jax.lax.scan`.
    - `max_newton_steps`: the most Newton iterations allowed (default 100). In exact
        arithmetic Newton is exact after at most `T` iterations; contractive RNN
        cells need a handful with `jacobian="full"`. A differentiated scan is
        allowed one more, for the linearisation at the returned carries that its
        gradient reuses.
    - `damping`: a [`deer_diffrax.AbstractDamping`][] strategy, or `True` (the
        default, [`deer_diffrax.ShrinkBlocksDamping`][]: reject Newton iterates
        whose residual overflows or grows sharply and retry with shrunk Jacobian
        blocks, down to a Picard sweep; free when Newton behaves), `False`
        ([`deer_diffrax.NoDamping`][]) or [`deer_diffrax.TrustRegion`][] (each
        step cut at the first step whose change exceeds a self-adapting radius).
    - `initial_guess`: the carries `h_1, ..., h_T` Newton starts from, stacked along
        a leading time axis in the order of `xs` (the carry's pytree with a leading
        axis of length `T`); default (`None`) is `init` at every time step. A good
        guess (the carries from the previous training step, say) saves iterations.
        No gradient flows through it.
    - `throw`: if Newton fails (see `ScanStats.result`), raise an error at run time
        naming the cause and the remedies (`equinox.EquinoxRuntimeError`; under
        `jax.jit` it arrives wrapped in a `JaxRuntimeError`, use `equinox.filter_jit`
        for the plain one). With `throw=False` the last iterate is returned as is
        and the failure is only reported in the stats, so `return_stats=True` is
        then required.
    - `return_stats`: also return a [`deer_diffrax.ScanStats`][] with the Newton
        iteration count, the final residual, the result code and the Lyapunov
        exponent (computed only then).
    - `linear_solver`: the Lineax solver of the linearised recurrences (Newton steps
        and gradients); default [`deer_diffrax.AssociativeScanSolver`][].

    **Returns:**

    `(final_carry, ys)`, as `jax.lax.scan`: the last carry `h_T`, and the outputs
    `y_1, ..., y_T` stacked along a leading time axis (the pytree of `y`, with a
    leading axis of length `T` on every leaf). For `T = 0`, `(init, empty ys)`. With
    `return_stats=True`, the pair `((final_carry, ys), stats)`, so that
    `scan(...)[0]` is always what `jax.lax.scan` returns.

    **Raises:**

    `ValueError` at trace time if `f` does not return a pair, if its new carry
    differs from the carry in structure, shape or dtype, if the leaves of `xs`
    disagree on `T`, if the carry is not floating, or for invalid options.
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
    _check_unroll(unroll)
    mode = jacobian_mode(jacobian)
    if linear_solver is None:
        linear_solver = AssociativeScanSolver()
    _check_carry(init)
    init = jtu.tree_map(jnp.asarray, init)
    xs = jtu.tree_map(jnp.asarray, xs)
    num_steps = _sequence_length(xs, length)
    # Solve in the order the steps run; `ys` is flipped back at the end.
    if reverse:
        xs = jtu.tree_map(lambda x: jnp.flip(x, 0), xs)
        if initial_guess is not None:
            initial_guess = jtu.tree_map(lambda h: jnp.flip(h, 0), initial_guess)

    if num_steps == 0:
        return _empty_scan(f, init, xs, return_stats)

    # Closure conversion turns whatever `f` closes over (parameters being
    # differentiated, say) into array leaves of a pytree, which the implicit adjoint
    # then differentiates like any other input. Tracing it also gives the output
    # structure, checked here so a wrong `f` fails at trace time, not inside Newton.
    x_example = jtu.tree_map(lambda x: x[0], xs)
    closed_f = eqx.filter_closure_convert(f, init, x_example)
    y_struct = _check_step_output(init, closed_f.out_struct)

    init_flat, unravel = real_ravel(init)
    flat_cell = _FlatCell(closed_f, unravel)
    if initial_guess is None:
        guess = jnp.broadcast_to(init_flat, (num_steps,) + init_flat.shape)
    else:
        guess = _ravel_guess(initial_guess, init, num_steps).astype(init_flat.dtype)

    newton = DeerNewton(
        rtol=rtol,
        atol=atol,
        jacobian=mode,
        damping=damping,
        linear_solver=linear_solver,
        # `f` can be linearised at any finite carry: with damping, linearise each
        # trial once (one pass per iteration; a rejection costs an iteration).
        linearisation=StepwiseLinearisation(_residual_and_blocks, safe_at_trials=True),
    )
    solution = solve_trajectory(
        _residual, newton, guess, (flat_cell, init_flat, xs), max_newton_steps
    )
    trajectory = solution.value
    result = solution.result
    if throw:
        # One check with two messages: each check is a `cond` in the program (GRU,
        # hidden 8, T = 1e3, float32, forward, 8 alternating processes: fastest
        # 1.03 against 1.05 ms with two checks, medians 1.08 against 1.14 ms).
        failed = result != optx.RESULTS.successful
        which = jnp.where(result == optx.RESULTS.nonlinear_max_steps_reached, 0, 1)
        trajectory = eqx.branched_error_if(
            trajectory, failed, which, (_MAX_STEPS_MESSAGE, _DIVERGENCE_MESSAGE)
        )

    carries = jax.vmap(unravel)(trajectory)
    final_carry = jtu.tree_map(lambda h: h[-1], carries)
    y_leaves, y_treedef = jtu.tree_flatten(y_struct)
    if y_leaves:
        previous = jtu.tree_map(shift_in, init, carries)
        sources = _carry_sources(f, init, x_example, y_struct)
        if all(source is not None for source in sources):
            computed = [None] * len(sources)
        else:
            # The outputs at the converged carries, all steps at once. This calls
            # `f` itself (not its closure conversion), so gradients reach what `f`
            # closes over directly, and the carries through the implicit adjoint
            # above.
            ys = jax.vmap(lambda h, x: f(h, x)[1])(previous, xs)
            computed = jtu.tree_leaves(ys)
        # Outputs that are a carry leaf (`return h, h` collects the carries) are
        # read off the carries: no evaluation of `f`, and their gradient is the
        # implicit adjoint's alone. (Exactly what `f` returns there, up to the
        # Newton tolerance; and `ys[-1]` is `final_carry`, as for `jax.lax.scan`.)
        candidates = {
            "new": jtu.tree_leaves(carries),
            "previous": jtu.tree_leaves(previous),
        }
        y_leaves = [
            leaf if source is None else candidates[source[0]][source[1]]
            for leaf, source in zip(computed, sources, strict=True)
        ]
        ys = jtu.tree_unflatten(y_treedef, y_leaves)
        if reverse:
            ys = jtu.tree_map(lambda y: jnp.flip(y, 0), ys)
    else:
        # E.g. `y = None`: nothing to compute (`jax.lax.scan` returns the same
        # leafless structure).
        ys = jtu.tree_unflatten(y_treedef, [])
    if not return_stats:
        return final_carry, ys
    stats = ScanStats(
        num_newton_steps=solution.num_steps,
        num_rejected=solution.num_rejected,
        residual_norm=solution.residual_norm,
        error_estimate=solution.error_estimate,
        # Computed only here: the tree product costs about half an associative
        # scan of the blocks.
        lyapunov_exponent=_lyapunov_exponent(flat_cell, init_flat, xs, solution),
        result=result,
    )
    return (final_carry, ys), stats
