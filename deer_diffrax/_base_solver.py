"""The base solver of a `DeerSolver`: which Diffrax solvers can be one, and how each
becomes the one-step map whose trajectory a window solves for.

Newton's method needs every substep to be a fixed function of what it starts from.
Three kinds of solver meet that:

- *restartable* ones, whose step depends only on its start and the (fixed) driving
    path once it is told that it starts afresh (`made_jump=True`): Runge-Kutta
    methods (their first-same-as-last stage is then recomputed), Euler, Milstein,
    the stochastic Runge-Kutta family, `SemiImplicitEuler` and the underdamped
    Langevin solvers (whose state only caches coefficients and a gradient that a
    fresh start recomputes). Each substep starts from a fresh `init`.
- solvers that *carry state* between steps (`ReversibleHeun`, `LeapfrogMidpoint`, and
    any other solver whose `init` returns a state): the state becomes part of the
    Newton unknowns, so the window solves for the pairs `(y_i, state_i)` and the
    result is the sequential solve's, state included.
- nothing else: a state that is not floating point (a step counter, a flag, a random
    key) cannot be solved for by Newton's method, and a Brownian motion that is not a
    fixed function of time gives no fixed map at all. These are refused, with advice.
"""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Real


_RESTARTABLE = (
    diffrax.AbstractRungeKutta,
    diffrax.Euler,
    diffrax.ImplicitEuler,
    diffrax.EulerHeun,
    diffrax.ItoMilstein,
    diffrax.StratonovichMilstein,
    diffrax.AbstractSRK,
    diffrax.SemiImplicitEuler,
    diffrax.AbstractFosterLangevinSRK,
)
_CARRIES_STATE = (diffrax.ReversibleHeun, diffrax.LeapfrogMidpoint)
_SDE_SOLVERS = (diffrax.AbstractItoSolver, diffrax.AbstractStratonovichSolver)

_ODE_ADVICE = (
    "For an ODE, a one-step base such as `diffrax.Tsit5()` (non-stiff) or "
    "`diffrax.Kvaerno5()` (stiff) works."
)
_SDE_ADVICE = (
    "For an SDE, use an SDE base solver such as `diffrax.EulerHeun()`, "
    "`diffrax.Heun()`, `diffrax.SPaRK()` or `diffrax.ShARK()` with a "
    "`diffrax.VirtualBrownianTree` (SPaRK and ShARK need "
    "`levy_area=diffrax.SpaceTimeLevyArea`)."
)


def _advice(sde: bool) -> str:
    return _SDE_ADVICE if sde else _ODE_ADVICE


def _brownian_paths(terms) -> list:
    is_path = lambda x: isinstance(x, diffrax.AbstractBrownianPath)
    return [x for x in jtu.tree_leaves(terms, is_leaf=is_path) if is_path(x)]


def check_base_solver(solver, outer_cls: type) -> None:
    """Refuse, at construction, what can never be a base solver."""
    if isinstance(solver, type):
        raise ValueError(
            f"DeerSolver needs a base solver instance; got the class "
            f"{solver.__name__}. Pass `DeerSolver({solver.__name__}())`."
        )
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(
            "DeerSolver needs a Diffrax solver as its base (any "
            f"`diffrax.AbstractSolver`); got {solver!r}. {_ODE_ADVICE} "
            f"{_SDE_ADVICE}"
        )
    if isinstance(solver, outer_cls):
        # (`isinstance` also sees through Diffrax's wrapped solvers.)
        raise ValueError(
            "DeerSolver cannot be the base of another DeerSolver: its step is a "
            "whole window, not one step. Give the inner base solver directly, "
            "with the substeps you want per window: "
            "`DeerSolver(base_solver, num_substeps=...)`."
        )


def check_terms(terms, solver) -> None:
    """Refuse terms that give no fixed one-step map for `solver`."""
    paths = _brownian_paths(terms)
    for path in paths:
        if isinstance(path, diffrax.UnsafeBrownianPath):
            raise ValueError(
                "DeerSolver cannot use `UnsafeBrownianPath`: its increments are not "
                "a fixed function of time, so a window's substeps are not fixed maps "
                "that Newton's method can solve for. Use "
                "`diffrax.VirtualBrownianTree(t0, t1, tol, shape, key)` (with the "
                "`levy_area` your base solver needs) instead."
            )
    if paths and not isinstance(solver, _SDE_SOLVERS):
        raise ValueError(
            f"The base solver {type(solver).__name__} does not solve SDEs (the "
            f"terms contain a Brownian motion). {_SDE_ADVICE}"
        )


def _is_floating(leaf) -> bool:
    try:
        return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    except TypeError:
        return False


def initial_base_state(solver, terms, t0, t1, y0, args) -> PyTree | None:
    """The base solver's state at the start of the solve, if it carries one between
    steps (else `None`: each substep is then restarted).

    `t1` is the end of the first substep: the step a sequential solve on the same
    grid would start with.
    """
    if isinstance(solver, _RESTARTABLE):
        return None
    state = solver.init(terms, t0, t1, y0, args)
    if not jtu.tree_leaves(state):
        return None
    if not isinstance(solver, _CARRIES_STATE):
        # A solver of the user's own: carrying its state is exact whatever it holds
        # (a cache, the previous step), so long as Newton can solve for it.
        paths_and_leaves = jtu.tree_flatten_with_path(state)[0]
        bad = [
            (jtu.keystr(path), leaf)
            for path, leaf in paths_and_leaves
            if not _is_floating(leaf)
        ]
        if bad:
            where, leaf = bad[0]
            kind = getattr(leaf, "dtype", type(leaf).__name__)
            raise ValueError(
                f"DeerSolver cannot use {type(solver).__name__} as its base: its "
                f"solver state carries a non-floating value (`state{where}`, "
                f"{kind}) from step to step. Newton's method solves for the state "
                "along with `y`, which needs real or complex numbers; a counter, a "
                "flag or a random key makes the step something other than a fixed "
                "map of its start. Keep only floating-point arrays in the state (or "
                "return `None` from `init` if each step can start afresh). "
                f"{_advice(bool(_brownian_paths(terms)))}"
            )
    return jtu.tree_map(jnp.asarray, state)


def restarted_step(solver, terms, t0, t1, y0, args):
    """One step of `solver` from a fresh state: `(y1, y_error, dense_info, result)`."""
    state = solver.init(terms, t0, t1, y0, args)
    # Told `made_jump=True`, first-same-as-last Runge-Kutta methods recompute their
    # first stage instead of trusting a cache. The underdamped Langevin solvers' fresh
    # state already holds that gradient (and those without one cannot take the flag).
    made_jump = not isinstance(solver, diffrax.AbstractFosterLangevinSRK)
    y1, y_error, dense_info, _, result = solver.step(
        terms, t0, t1, y0, args, state, made_jump
    )
    return y1, y_error, dense_info, result


def forward_differentiable(solver):
    """The solver with stage loops that forward-mode autodiff can pass through.

    Each substep is linearised by forward-mode autodiff, which cannot pass through
    the checkpointed stage loops that Diffrax's Runge-Kutta and stochastic
    Runge-Kutta solvers use by default. Done at trace time rather than in
    `DeerSolver.__init__`, so that the solver holds no string leaf and passes
    through `jax.jit` like Diffrax's own solvers.
    """
    # `type(...)` rather than `isinstance`: the latter sees through wrapped solvers
    # (`HalfSolver`), whose own fields differ.
    if isinstance(solver, diffrax.HalfSolver):
        inner = forward_differentiable(solver.solver)
        return eqx.tree_at(lambda s: s.solver, solver, inner)
    if issubclass(type(solver), diffrax.AbstractRungeKutta):
        kind = "bounded"
    elif issubclass(type(solver), diffrax.AbstractSRK):
        kind = "lax"
    else:
        return solver
    return eqx.tree_at(lambda s: s.scan_kind, solver, kind, is_leaf=lambda x: x is None)


class CarriedStateStep(eqx.Module):
    """A base solver that carries state between steps, as a restartable map of the
    pair `(y, state)`: what a window's Newton unknowns are for such a solver.

    **Arguments:**

    - `solver`: the base solver.
    - `jump_time`: the window's start if the window starts after a jump (Diffrax's
        `made_jump`), else NaN: the one substep told `made_jump=True`, as in a
        sequential solve.
    """

    solver: diffrax.AbstractSolver
    jump_time: Real[Array, ""]

    def init(self, terms, t0, t1, y0, args) -> None:
        del terms, t0, t1, y0, args
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        y, state = y0
        y1, y_error, dense_info, state1, result = self.solver.step(
            terms, t0, t1, y, args, state, t0 == self.jump_time
        )
        state1 = jtu.tree_map(
            lambda new, old: jnp.asarray(new, dtype=old.dtype), state1, state
        )
        return (y1, state1), y_error, dense_info, None, result


def window_step_solver(solver, base_state: PyTree | None, t0, made_jump):
    """What each substep of a window steps with: the (forward-differentiable) base
    solver, restarted at every substep, or for a solver that carries state, the
    map of `(y, state)` pairs."""
    solver = forward_differentiable(solver)
    if base_state is None:
        return solver
    t0 = jnp.asarray(t0)
    jump_time = jnp.where(made_jump, t0, jnp.nan).astype(t0.dtype)
    return CarriedStateStep(solver, jump_time)
