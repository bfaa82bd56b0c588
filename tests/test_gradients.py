"""Differentiating through DeerSolver, against sequential Diffrax on the same grid.

DeerSolver's windows are solved by Newton's method, but the trajectory it returns is
the sequential base solver's trajectory on the same grid (to the Newton tolerance), so
every exact derivative of a loss (reverse mode, forward mode, any Diffrax adjoint
that differentiates the discretisation) must equal the sequential one to about the
same relative precision. Inside a window the derivative comes from the implicit
function theorem (one transposed scan), never from the Newton iterations; the last
tests check that the cost of the backward pass does not depend on them.

To keep compilation (the bulk of the runtime on a CPU) down, the problem is small and
the sequential reference gradient is computed once and shared by the tests.
"""

import functools as ft

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optimistix as optx
import pytest
from helpers import equations, max_relative_difference

from deer_diffrax import (
    DeerNewton,
    DeerSolver,
    unit_lower_block_bidiagonal_tag,
)


# Exact derivatives of the same discretisation: DEER's only deviation from the
# sequential solve is the Newton tolerance (its last full Newton step leaves an error
# near rounding), so 1e-8 leaves ample room and still catches any real mistake.
_EXACT_RTOL = 1e-8

_T1 = 1.0
_NUM_WINDOWS = 2
_NUM_SUBSTEPS = 16
_WINDOW = _T1 / _NUM_WINDOWS
# The sequential grid: the same substeps, one Diffrax step each.
_DT = _WINDOW / _NUM_SUBSTEPS
# Save times both between grid points (interpolated) and on window boundaries.
_TS = jnp.array([0.1, 0.35, 0.5, 0.8, 1.0])


class _Field(eqx.Module):
    """A small neural vector field with two differentiable scalar arguments."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return args["gain"] * jnp.tanh(self.mlp(y)) - args["decay"] * y


def _make_inputs():
    mlp = eqx.nn.MLP(2, 2, width_size=8, depth=1, activation=jnp.tanh, key=jr.key(0))
    field = _Field(mlp)
    y0 = jnp.array([0.8, -0.4])
    args = {"gain": jnp.array(1.3), "decay": jnp.array(0.2)}
    return field, y0, args


_FIELD, _Y0, _ARGS = _make_inputs()
# The field's arrays (what jax.grad differentiates) and the rest (activation, shapes).
_PARAMS, _STATIC = eqx.partition(_FIELD, eqx.is_inexact_array)


_DEER = DeerSolver(diffrax.Tsit5(), num_substeps=_NUM_SUBSTEPS)
_SEQUENTIAL = diffrax.Tsit5()


def _solve(field, y0, args, solver, adjoint, saveat):
    """Solve on the shared grid: DeerSolver steps are windows, sequential steps are
    substeps."""
    deer = isinstance(solver, DeerSolver)
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        0.0,
        _T1,
        _WINDOW if deer else _DT,
        y0,
        args=args,
        saveat=saveat,
        adjoint=adjoint,
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=_NUM_WINDOWS if deer else _NUM_WINDOWS * _NUM_SUBSTEPS,
    )


def _objective(ys):
    # Nonlinear in the states, so every save time and component contributes.
    return jnp.sum(ys**2) + jnp.sum(jnp.sin(3 * ys))


def _field_loss(inputs, solver=_DEER, adjoint=None):
    """A loss through `SaveAt(ts=...)` of `inputs = (field, y0, args)`."""
    field, y0, args = inputs
    if adjoint is None:
        adjoint = diffrax.RecursiveCheckpointAdjoint()
    sol = _solve(field, y0, args, solver, adjoint, diffrax.SaveAt(ts=_TS))
    return _objective(sol.ys)


def _loss(params, y0, args, **kwargs):
    """The same loss as a function of arrays only, for `jax.grad` and friends."""
    return _field_loss((eqx.combine(params, _STATIC), y0, args), **kwargs)


_ARGNUMS = (0, 1, 2)  # params, y0, args


@jax.jit
def _sequential_value_and_grad(params, y0, args):
    return jax.value_and_grad(ft.partial(_loss, solver=_SEQUENTIAL), _ARGNUMS)(
        params, y0, args
    )


@ft.cache
def _reference():
    """The sequential (exact, discrete) loss and gradient at the shared inputs."""
    return _sequential_value_and_grad(_PARAMS, _Y0, _ARGS)


class _NeuralODE(eqx.Module):
    """A model as users write it for training: the solver is part of the model."""

    field: _Field
    solver: diffrax.AbstractSolver

    def __call__(self, y0, args):
        adjoint = diffrax.RecursiveCheckpointAdjoint()
        saveat = diffrax.SaveAt(ts=_TS)
        return _solve(self.field, y0, args, self.solver, adjoint, saveat).ys


def _model_loss(inputs):
    model, y0, args = inputs
    return _objective(model(y0, args))


@ft.cache
def _deer_value_and_grads():
    """DeerSolver's loss and gradient under the default adjoint, by
    `eqx.filter_value_and_grad` of an Equinox model (computed once, shared by
    several tests). Returns the value, the model's gradient (`None` at non-array
    leaves) and the gradient in the structure of `(_PARAMS, _Y0, _ARGS)`."""
    inputs = (_NeuralODE(_FIELD, _DEER), _Y0, _ARGS)
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_model_loss))
    value, (model_grads, y0_grad, args_grad) = value_and_grad(inputs)
    return value, model_grads, (model_grads.field, y0_grad, args_grad)


def _assert_grads_match(grads, expected, rtol=_EXACT_RTOL):
    """Compare each of (params, y0, args) on its own scale, and make sure none is a
    trivially zero gradient."""
    for name, got, want in zip(("params", "y0", "args"), grads, expected, strict=True):
        assert max(float(jnp.max(jnp.abs(x))) for x in jtu.tree_leaves(want)) > 1e-3
        difference = max_relative_difference(got, want)
        assert difference <= rtol, f"{name}: relative difference {difference:.2e}"


def _tree_dot(a, b):
    return sum(jtu.tree_leaves(jtu.tree_map(jnp.vdot, a, b)))


def _random_like(tree, key):
    leaves, treedef = jtu.tree_flatten(tree)
    keys = jr.split(key, len(leaves))
    samples = [jr.normal(keys[i], x.shape, x.dtype) for i, x in enumerate(leaves)]
    return jtu.tree_unflatten(treedef, samples)


# ---------------------------------------------------------------------------------
# Reverse mode: every exact adjoint equals the sequential gradient.
# ---------------------------------------------------------------------------------


def test_recursive_checkpoint_adjoint_matches_sequential():
    # The default adjoint, with respect to the MLP's parameters, the initial state
    # and the args at once.
    _assert_grads_match(_deer_value_and_grads()[2], _reference()[1])


def test_direct_adjoint_matches_sequential():
    loss = ft.partial(_loss, adjoint=diffrax.DirectAdjoint())
    grads = jax.jit(jax.grad(loss, _ARGNUMS))(_PARAMS, _Y0, _ARGS)
    _assert_grads_match(grads, _reference()[1])


def test_backsolve_adjoint():
    # BacksolveAdjoint integrates the continuous adjoint ODE backwards in time, here
    # with DeerSolver again (the same windows of the same substeps). Its gradient is
    # only an approximation of the exact derivative of the discretisation (to the
    # truncation error of the backward solve), so the reference is sequential Tsit5
    # under BacksolveAdjoint on the same grid: the same backward discretisation,
    # which DEER must reproduce to the Newton tolerance, like a forward solve.
    # (Loss of the final state only: with `SaveAt(ts=...)` Backsolve runs one backward
    # solve per interval, which costs more compilation without testing more.)
    adjoint = diffrax.BacksolveAdjoint()

    def loss(params, y0, args, solver):
        field = eqx.combine(params, _STATIC)
        sol = _solve(field, y0, args, solver, adjoint, diffrax.SaveAt(t1=True))
        return _objective(sol.ys)

    grad = lambda solver: jax.jit(jax.grad(ft.partial(loss, solver=solver), _ARGNUMS))
    grads = grad(_DEER)(_PARAMS, _Y0, _ARGS)
    _assert_grads_match(grads, grad(_SEQUENTIAL)(_PARAMS, _Y0, _ARGS))


# ---------------------------------------------------------------------------------
# Forward mode.
# ---------------------------------------------------------------------------------


def test_forward_mode_jvp():
    # A directional derivative along a random tangent in (params, y0, args), which
    # must be <sequential gradient, tangent>.
    tangents = _random_like((_PARAMS, _Y0, _ARGS), jr.key(1))
    loss = ft.partial(_loss, adjoint=diffrax.ForwardMode())

    @jax.jit
    def jvp(primals, tangents):
        return jax.jvp(lambda p: loss(*p), (primals,), (tangents,))

    value, derivative = jvp((_PARAMS, _Y0, _ARGS), tangents)
    ref_value, ref_grads = _reference()
    expected = _tree_dot(ref_grads, tangents)
    assert abs(float(value - ref_value)) <= _EXACT_RTOL * abs(float(ref_value))
    assert abs(float(derivative - expected)) <= _EXACT_RTOL * abs(float(expected))


def test_forward_mode_jacfwd():
    # `jax.jacfwd` pushes one tangent per input entry (a vmapped jvp), so for a
    # scalar loss it is the gradient, computed entirely in forward mode.
    loss = ft.partial(_loss, adjoint=diffrax.ForwardMode())
    grads = jax.jit(jax.jacfwd(loss, _ARGNUMS))(_PARAMS, _Y0, _ARGS)
    _assert_grads_match(grads, _reference()[1])


# ---------------------------------------------------------------------------------
# Independent check, and the other ways a loss can read the solution.
# ---------------------------------------------------------------------------------


def test_central_finite_differences():
    # Independent of any autodiff rule: central differences of DeerSolver's own loss
    # along random directions in (params, y0, args). Step 1e-5 balances truncation
    # (~h^2 ~ 1e-10) against rounding and Newton-tolerance noise in the loss
    # (~1e-15 / h ~ 1e-10); a wrong gradient is off by O(1).
    loss = jax.jit(_loss)
    grads = _deer_value_and_grads()[2]
    primals = (_PARAMS, _Y0, _ARGS)
    step = 1e-5
    for seed in range(3):
        direction = _random_like(primals, jr.key(10 + seed))
        plus = jtu.tree_map(lambda x, v: x + step * v, primals, direction)
        minus = jtu.tree_map(lambda x, v: x - step * v, primals, direction)
        difference = (loss(*plus) - loss(*minus)) / (2 * step)
        expected = _tree_dot(grads, direction)
        assert abs(float(difference - expected)) <= 1e-6 * abs(float(expected))


def test_dense_output_gradient():
    # A parallel way to read many times: `SaveAt(dense=True)` and a vmapped
    # `sol.evaluate` (`deer_diffrax.evaluate` is the linear-memory one; its gradient
    # is checked against this in test_dense.py). It evaluates the same local
    # interpolants that `SaveAt(ts=...)` saves, so its gradient must equal the
    # sequential `SaveAt(ts=...)` gradient.
    # Differentiated with `eqx.filter_grad` with respect to the Equinox vector field
    # (and y0 and args) directly.
    def loss(inputs):
        field, y0, args = inputs
        adjoint = diffrax.RecursiveCheckpointAdjoint()
        sol = _solve(field, y0, args, _DEER, adjoint, diffrax.SaveAt(dense=True))
        return _objective(jax.vmap(sol.evaluate)(_TS))

    grads = eqx.filter_jit(eqx.filter_grad(loss))((_FIELD, _Y0, _ARGS))
    _assert_grads_match(grads, _reference()[1])


# ---------------------------------------------------------------------------------
# Transformations: jit, vmap of grad, grad of vmap, Equinox filtered transforms.
# ---------------------------------------------------------------------------------


_Y0_BATCH = jnp.array([[0.8, -0.4], [-0.5, 0.6], [0.2, 1.0]])


def _sequential_grads_per_member():
    # The (already compiled) sequential gradient, one batch member at a time.
    return [_sequential_value_and_grad(_PARAMS, y0, _ARGS)[1] for y0 in _Y0_BATCH]


def test_jit_vmap_of_grad():
    batched = jax.jit(jax.vmap(jax.grad(_loss, _ARGNUMS), in_axes=(None, 0, None)))
    grads = batched(_PARAMS, _Y0_BATCH, _ARGS)
    for i, expected in enumerate(_sequential_grads_per_member()):
        member = jtu.tree_map(lambda g, i=i: g[i], grads)
        _assert_grads_match(member, expected)


# Slow run only (CI time): test_jit_vmap_of_grad covers grad with vmap.
@pytest.mark.slow
def test_grad_of_vmap():
    def mean_loss(params, y0s, args):
        losses = jax.vmap(_loss, in_axes=(None, 0, None))(params, y0s, args)
        return jnp.mean(losses)

    params_grad, y0s_grad, args_grad = jax.jit(jax.grad(mean_loss, _ARGNUMS))(
        _PARAMS, _Y0_BATCH, _ARGS
    )
    per_member = _sequential_grads_per_member()
    size = len(per_member)
    mean = lambda *trees: jtu.tree_map(lambda *xs: sum(xs) / size, *trees)
    expected_y0s = jnp.stack([g[1] for g in per_member]) / size
    _assert_grads_match(
        (params_grad, y0s_grad, args_grad),
        (
            mean(*[g[0] for g in per_member]),
            expected_y0s,
            mean(*[g[2] for g in per_member]),
        ),
    )


def test_equinox_filter_value_and_grad():
    # The model's gradient has the model's structure: the MLP's arrays get
    # gradients, the solver (no arrays) none.
    value, model_grads, _ = _deer_value_and_grads()
    ref_value = _reference()[0]
    assert abs(float(value - ref_value)) <= _EXACT_RTOL * abs(float(ref_value))
    assert isinstance(model_grads, _NeuralODE)
    assert jtu.tree_leaves(model_grads.solver) == []
    assert isinstance(model_grads.field.mlp, eqx.nn.MLP)


@pytest.mark.parametrize(
    "base, options",
    [
        (diffrax.Tsit5(), {}),
        (diffrax.Tsit5(), {"jacobian": "diagonal"}),
        (diffrax.Tsit5(), {"linearise": "vector_field"}),
        (diffrax.ReversibleHeun(), {}),
    ],
    ids=["full", "diagonal", "vector-field", "carried-state"],
)
def test_grad_of_a_field_that_closes_over_the_parameters(base, options):
    # Users write `ODETerm(lambda t, y, args: model(y))`: the parameters are then
    # tracers hidden in a closure, not leaves of `terms`. Every function the Newton
    # solve evaluates (the residual and its linearisation's own) must capture them
    # properly, or the solve leaks them out of its custom derivative.
    y0 = jnp.array([0.8, -0.4])

    def loss(params, solver, dt):
        term = diffrax.ODETerm(
            lambda t, y, args: eqx.combine(params, _STATIC)(t, y, _ARGS)
        )
        sol = diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            _T1,
            dt,
            y0,
            saveat=diffrax.SaveAt(ts=_TS),
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=_NUM_WINDOWS * _NUM_SUBSTEPS,
        )
        return _objective(sol.ys)

    deer = DeerSolver(base, num_substeps=_NUM_SUBSTEPS, **options)
    got = jax.jit(jax.grad(ft.partial(loss, solver=deer, dt=_WINDOW)))(_PARAMS)
    want = jax.jit(jax.grad(ft.partial(loss, solver=base, dt=_DT)))(_PARAMS)
    assert max(float(jnp.max(jnp.abs(x))) for x in jtu.tree_leaves(want)) > 1e-3
    assert max_relative_difference(got, want) <= _EXACT_RTOL


# ---------------------------------------------------------------------------------
# The backward pass does not depend on the Newton iterations.
# ---------------------------------------------------------------------------------


def _num_equations(jaxpr) -> int:
    """Equations in a jaxpr, counting those of nested sub-jaxprs."""
    return sum(1 for _ in equations(jaxpr))


def _compiled_with_sizes(fn, *args):
    """Compile once; return the executable, its temporary memory in bytes and the
    number of equations of its jaxpr."""
    traced = jax.jit(fn).trace(*args)
    compiled = traced.lower().compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    return compiled, temp_bytes, _num_equations(traced.jaxpr.jaxpr)


# One long window of Euler substeps, so that anything stored per Newton iteration
# (the trajectory and its (T, n, n) Jacobian blocks) would be a large part of the
# memory. The window is short enough for Newton to converge in three iterations.
_LONG_WINDOW_SUBSTEPS = 400
_LONG_WINDOW = 0.25


def _long_window_grad(max_newton_steps):
    solver = DeerSolver(
        diffrax.Euler(),
        num_substeps=_LONG_WINDOW_SUBSTEPS,
        max_newton_steps=max_newton_steps,
    )

    def loss(params, y0, args):
        field = eqx.combine(params, _STATIC)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            0.0,
            _LONG_WINDOW,
            _LONG_WINDOW,
            y0,
            args=args,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            # One window. (Diffrax's default `max_steps=4096` would give it that
            # many checkpoints of the solver state, in which the histogram of Newton
            # counts, `max_newton_steps + 1` entries, adds a size difference that
            # has nothing to do with the backward pass.)
            max_steps=1,
        )
        return jnp.sum(sol.ys**2), sol.solver_state.most_newton_steps

    return jax.grad(loss, _ARGNUMS, has_aux=True)


# Slow run only (CI time): a cost property, not a correctness one.
@pytest.mark.slow
def test_backward_pass_independent_of_newton_iterations():
    inputs = (_PARAMS, _Y0, _ARGS)
    few, memory_few, size_few = _compiled_with_sizes(_long_window_grad(4), *inputs)
    many, memory_many, size_many = _compiled_with_sizes(_long_window_grad(30), *inputs)
    # Both converge, in the same (at most four) iterations, to the same gradient.
    grads_few, steps_few = few(*inputs)
    grads_many, steps_many = many(*inputs)
    assert int(steps_few) <= 4 and int(steps_many) == int(steps_few)
    assert max_relative_difference(grads_few, grads_many) <= _EXACT_RTOL
    # Differentiating through the iterations would store up to ten times as many
    # iterates (see the control below); the implicit gradient stores none. A few
    # bytes may differ: the solver state's histogram of Newton counts has
    # `max_newton_steps + 1` entries.
    assert memory_many <= 1.05 * memory_few, (memory_few, memory_many)
    assert size_many == size_few


@pytest.mark.slow
def test_memory_measure_detects_backprop_through_iterations():
    # Control for the test above: the same measurement grows with the iteration cap
    # when a root find *is* differentiated through its iterations (Optimistix's
    # RecursiveCheckpointAdjoint with a checkpoint per step). Same Newton solver, on
    # an explicit Euler trajectory residual of the same length.
    num_times = _LONG_WINDOW_SUBSTEPS
    dt = _LONG_WINDOW / num_times
    matrix = jnp.array([[0.1, 1.0], [-1.0, 0.1]])

    def residual(trajectory, inputs):
        y0, matrix = inputs
        previous = jnp.concatenate([y0[None], trajectory[:-1]])
        slopes = jnp.tanh(previous @ matrix.T) - 0.1 * previous
        return trajectory - (previous + dt * slopes)

    def grad_fn(max_steps):
        def loss(y0, matrix):
            guess = jnp.broadcast_to(y0, (num_times,) + y0.shape)
            sol = optx.root_find(
                residual,
                DeerNewton(rtol=1e-10, atol=1e-10),
                guess,
                args=(y0, matrix),
                max_steps=max_steps,
                adjoint=optx.RecursiveCheckpointAdjoint(checkpoints=max_steps),
                tags=frozenset({unit_lower_block_bidiagonal_tag}),
            )
            return jnp.sum(sol.value[-1] ** 2)

        return jax.grad(loss, (0, 1))

    _, stored_few, _ = _compiled_with_sizes(grad_fn(3), _Y0, matrix)
    _, stored_many, _ = _compiled_with_sizes(grad_fn(30), _Y0, matrix)
    assert stored_many >= 2 * stored_few, (stored_few, stored_many)


def _lorenz(t, y, sigma):
    x, v, z = y[0], y[1], y[2]
    return jnp.stack([sigma * (v - x), x * (28 - z) - v, x * v - 8 / 3 * z])


_LORENZ_Y0 = jnp.array([-7.0, -2.0, 30.0])


def _lorenz_sequential_grad(t1: float, num_steps: int) -> jax.Array:
    """d(sum of the state at t1)/d(sigma) by sequential Tsit5 on a uniform grid."""

    def loss(sigma):
        ts = jnp.linspace(0.0, t1, num_steps + 1)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_lorenz),
            diffrax.Tsit5(),
            0.0,
            t1,
            None,
            _LORENZ_Y0,
            args=sigma,
            stepsize_controller=diffrax.StepTo(ts=ts),
        )
        return jnp.sum(sol.ys[-1])

    return jax.grad(loss)(10.0)


@pytest.mark.parametrize(
    "adjoint", [diffrax.RecursiveCheckpointAdjoint(), diffrax.DirectAdjoint()]
)
def test_window_converging_on_its_last_allowed_iteration_keeps_its_gradient(adjoint):
    # A differentiated Newton solve linearises once more where the undifferentiated
    # one stops on the quadratic prediction, so it is allowed one more iteration: a
    # window that converges on its last allowed iteration has the same derivative as
    # with room to spare (it used to fail only when differentiated: NaN, or nothing
    # where a discarded window's cotangent is zero).
    t1 = 0.31

    def solve(sigma, max_newton_steps):
        solver = DeerSolver(num_substeps=400, max_newton_steps=max_newton_steps)
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_lorenz),
            solver,
            0.0,
            t1,
            t1,
            _LORENZ_Y0,
            args=sigma,
            adjoint=adjoint,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )

    needed = int(solve(10.0, 50).solver_state.last_newton_steps)
    grads = {
        cap: jax.grad(lambda sigma, cap=cap: jnp.sum(solve(sigma, cap).ys))(10.0)
        for cap in (needed, needed + 5)
    }
    assert jnp.isfinite(grads[needed])
    assert abs(grads[needed] - grads[needed + 5]) <= 1e-10 * abs(grads[needed + 5])
    expected = _lorenz_sequential_grad(t1, 400)
    assert abs(grads[needed] - expected) <= _EXACT_RTOL * abs(expected)


@pytest.mark.parametrize("max_window_growth", [None, 1.0])
def test_windows_rejected_for_failing_add_nothing_to_the_gradient(max_window_growth):
    # Under a PID controller, windows whose Newton solve fails in 10 iterations (or
    # that are refused for their predicted growth) are rejected and shrunk; Diffrax
    # discards them with a `where`, so they must contribute nothing, not NaN (as
    # they once did: a failed window's outputs were NaN through a multiplication).
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)

    def solve(sigma, max_newton_steps):
        solver = DeerSolver(
            num_substeps=400,
            max_newton_steps=max_newton_steps,
            max_window_growth=max_window_growth,
        )
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_lorenz),
            solver,
            0.0,
            2.0,
            None,
            _LORENZ_Y0,
            args=sigma,
            stepsize_controller=controller,
        )

    # Without a bound and with 50 iterations allowed no window is rejected: the
    # rejections at 10 are Newton failures.
    if max_window_growth is None:
        assert int(solve(10.0, 50).stats["num_rejected_steps"]) == 0
    assert int(solve(10.0, 10).stats["num_rejected_steps"]) > 0
    grad = jax.grad(lambda sigma: jnp.sum(solve(sigma, 10).ys))(10.0)
    # DEER's windows are a different grid from the sequential reference's, both
    # far finer than their error needs.
    expected = _lorenz_sequential_grad(2.0, 2000)
    assert abs(grad - expected) <= 1e-6 * abs(expected)
