"""`DeerSolver`: a Diffrax solver whose every step is a window solved in parallel."""

import functools as ft
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree

from ._interpolation import deer_interpolation_cls
from ._jacobian import AbstractJacobianMode, jacobian_mode
from ._newton import DeerNewton
from ._operator import unit_lower_block_bidiagonal_tag
from ._ravel import real_ravel
from ._scan_solve import AssociativeScanSolver


_EXPLICIT_RK_NAMES = "Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8"


class DeerState(eqx.Module):
    """Diagnostics carried by [`deer_diffrax.DeerSolver`][] from window to window
    (read them with `SaveAt(solver_state=True)` and `sol.solver_state`).

    - `num_windows`: accepted windows so far.
    - `last_newton_steps`: Newton iterations of the last accepted window.
    - `total_newton_steps`: Newton iterations summed over accepted windows.
    - `max_newton_steps`: the most Newton iterations any accepted window needed.
    - `last_residual`: scaled max-norm of the last window's final residual
        `y_i - Phi_i(y_{i-1})` (`<= 1` means within the Newton tolerance).
    """

    num_windows: Int[Array, ""]
    last_newton_steps: Int[Array, ""]
    total_newton_steps: Int[Array, ""]
    max_newton_steps: Int[Array, ""]
    last_residual: Float[Array, ""]


def _is_explicit_runge_kutta(solver) -> bool:
    return isinstance(solver, (diffrax.AbstractERK, diffrax.Euler))


def _check_terms(terms) -> None:
    is_path = lambda x: isinstance(x, diffrax.AbstractBrownianPath)
    for leaf in jtu.tree_leaves(terms, is_leaf=is_path):
        if isinstance(leaf, diffrax.UnsafeBrownianPath):
            raise ValueError(
                "DeerSolver cannot use `UnsafeBrownianPath`: its increments are not a "
                "fixed function of time, so the one-step maps are not well defined. "
                "Use `diffrax.VirtualBrownianTree` instead."
            )


def _substep(base_solver, terms, args, unravel, y_prev, t_start, t_end):
    """One base-solver step `Phi_i(y_prev)` on the flat real state."""
    y = unravel(y_prev)
    base_state = base_solver.init(terms, t_start, t_end, y, args)
    # made_jump=True: FSAL methods recompute their first stage, so each substep is a
    # function of its own starting point only.
    y_next, y_error, dense_info, _, result = base_solver.step(
        terms, t_start, t_end, y, args, base_state, made_jump=True
    )
    return real_ravel(y_next)[0], y_error, dense_info, result


def _trajectory_residual(base_solver, unravel, trajectory, inputs):
    terms, y_start, ts, args = inputs
    previous = jnp.concatenate([y_start[None], trajectory[:-1]])
    step = ft.partial(_substep, base_solver, terms, args, unravel)
    mapped, _, _, _ = jax.vmap(step)(previous, ts[:-1], ts[1:])
    return trajectory - mapped


def _worst_substep_error(errors: PyTree[Array]) -> PyTree[Array]:
    # Per entry, the error of the substep where it is largest in magnitude: the window
    # is accepted when every substep meets the tolerance a sequential solve would
    # have applied to it.
    def worst(e):
        index = jnp.argmax(jnp.abs(e), axis=0)
        return jnp.take_along_axis(e, index[None], axis=0)[0]

    return jtu.tree_map(worst, errors)


def default_tolerance(dtype) -> float:
    """The default Newton `rtol` and `atol` for a state of floating `dtype`: ten times
    `eps ** 0.75` (about 2e-11 in float64 and 6e-5 in float32), well above the
    rounding level of a residual but small enough that full Newton's last step leaves
    an error near rounding."""
    eps = float(jnp.finfo(dtype).eps)
    return 10 * eps**0.75


class DeerSolver(diffrax.AbstractAdaptiveSolver):
    """Parallel-in-time solver (DEER: Lim et al., ICLR 2024) for Diffrax.

    Each Diffrax step is a *window* `[t0, t1]` of `num_substeps` equal substeps of
    `base_solver`. Instead of taking the substeps one after another, the whole window
    trajectory `Y = (y_1, ..., y_T)` is found as the root of

    `F(Y)_i = y_i - Phi_i(y_{i-1})`,

    where `Phi_i` is one step of the base solver, by Newton's method (an Optimistix
    root find). Every Newton step is a linear recurrence
    `dy_i = J_i dy_{i-1} - F_i`, solved by an associative scan in `O(log T)` depth,
    so the work inside a window is parallel over time. The root is exactly the
    sequential solution of the same discretisation: results match
    `diffeqsolve(..., solver=base_solver)` on the same grid to the Newton tolerance.

    - `dt0 = t1 - t0` with `ConstantStepSize` puts everything in one window; smaller
        `dt0` gives sequential windows, each parallel inside (bounded memory).
    - With `PIDController` the window length adapts: the window's error estimate is,
        per state entry, the largest embedded error estimate of its substeps, and a
        window whose Newton solve fails reports an infinite error so it is rejected
        and shrunk.
    - Dense output (`SaveAt(dense=True)`, `SaveAt(ts=...)`) uses the base solver's
        interpolation on each substep.
    - Gradients through a window use the implicit function theorem (one transposed,
        reverse-time scan), never the Newton iterations.

    A window whose Newton solve does not converge in `max_newton_steps` iterations
    returns `RESULTS.nonlinear_max_steps_reached` (non-finite iterates:
    `RESULTS.nonlinear_divergence`): `diffeqsolve` raises with `throw=True`. Remedies
    are shorter windows (smaller `dt0`, or an adaptive controller), more
    `max_newton_steps`, or `jacobian="full"`.
    """

    base_solver: diffrax.AbstractSolver
    num_substeps: int = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_newton_steps: int = eqx.field(static=True)
    jacobian: AbstractJacobianMode

    def __init__(
        self,
        base_solver: diffrax.AbstractSolver = diffrax.Tsit5(),
        num_substeps: int = 100,
        rtol: float | None = None,
        atol: float | None = None,
        max_newton_steps: int = 50,
        jacobian: "str | AbstractJacobianMode" = "full",
    ):
        if isinstance(base_solver, DeerSolver) or not _is_explicit_runge_kutta(
            base_solver
        ):
            raise ValueError(
                "DeerSolver needs an explicit Runge--Kutta base solver "
                f"({_EXPLICIT_RK_NAMES}); got {type(base_solver).__name__}. "
                "Pass it as `DeerSolver(base_solver=diffrax.Tsit5())`."
            )
        if not isinstance(num_substeps, int) or num_substeps < 1:
            raise ValueError(
                f"`num_substeps` must be a positive integer; got {num_substeps!r}."
            )
        if not isinstance(max_newton_steps, int) or max_newton_steps < 1:
            raise ValueError(
                "`max_newton_steps` must be a positive integer; got "
                f"{max_newton_steps!r}."
            )
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"`{name}` must be positive; got {tol!r}.")
        if isinstance(base_solver, diffrax.AbstractRungeKutta):
            # Forward-mode autodiff (used to linearise each substep) cannot pass
            # through the checkpointed stage loop that Diffrax uses by default.
            base_solver = eqx.tree_at(
                lambda s: s.scan_kind,
                base_solver,
                "bounded",
                is_leaf=lambda x: x is None,
            )
        self.base_solver = base_solver
        self.num_substeps = num_substeps
        self.rtol = rtol
        self.atol = atol
        self.max_newton_steps = max_newton_steps
        self.jacobian = jacobian_mode(jacobian)

    @property
    def term_structure(self):
        return self.base_solver.term_structure

    @property
    def interpolation_cls(self):
        return deer_interpolation_cls(self.base_solver.interpolation_cls)

    def order(self, terms):
        return self.base_solver.order(terms)

    def strong_order(self, terms):
        return self.base_solver.strong_order(terms)

    def error_order(self, terms):
        return self.base_solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args) -> DeerState:
        del t0, t1, args
        _check_terms(terms)
        zero = jnp.array(0, dtype=jnp.int32)
        return DeerState(
            num_windows=zero,
            last_newton_steps=zero,
            total_newton_steps=zero,
            max_newton_steps=zero,
            last_residual=jnp.array(0.0),
        )

    def step(
        self,
        terms,
        t0,
        t1,
        y0,
        args,
        solver_state: DeerState,
        made_jump,
    ) -> tuple[PyTree, PyTree | None, dict[str, Any], DeerState, diffrax.RESULTS]:
        del made_jump  # every substep restarts its stages anyway
        y_start, unravel = real_ravel(y0)
        # Checked here rather than in `init`, whose output Diffrax may not keep alive.
        y_start = eqx.error_if(
            y_start,
            jnp.invert(jnp.all(jnp.isfinite(y_start))),
            "DeerSolver: the initial state y0 contains NaN or inf; pass a finite y0.",
        )
        t0 = jnp.asarray(t0)
        t1 = jnp.asarray(t1)
        fractions = jnp.arange(self.num_substeps + 1, dtype=t0.dtype) / jnp.asarray(
            self.num_substeps, dtype=t0.dtype
        )
        ts = t0 + (t1 - t0) * fractions
        ts = ts.at[-1].set(t1)

        default = default_tolerance(y_start.dtype)
        newton = DeerNewton(
            rtol=default if self.rtol is None else self.rtol,
            atol=default if self.atol is None else self.atol,
            jacobian=self.jacobian,
        )
        guess = jnp.broadcast_to(y_start, (self.num_substeps,) + y_start.shape)
        inputs = (terms, y_start, ts, args)
        solution = optx.root_find(
            ft.partial(_trajectory_residual, self.base_solver, unravel),
            newton,
            guess,
            args=inputs,
            max_steps=self.max_newton_steps,
            adjoint=optx.ImplicitAdjoint(linear_solver=AssociativeScanSolver()),
            throw=False,
            tags=frozenset({unit_lower_block_bidiagonal_tag}),
        )
        trajectory = solution.value

        # One more (parallel) pass at the converged trajectory: the end state, the
        # error estimates and the dense output are those of the base method applied
        # to it, exactly as a sequential solve would produce them.
        previous = jnp.concatenate([y_start[None], trajectory[:-1]])
        step = ft.partial(_substep, self.base_solver, terms, args, unravel)
        mapped, errors, dense_infos, base_results = jax.vmap(step)(
            previous, ts[:-1], ts[1:]
        )
        y1 = unravel(mapped[-1])

        result = diffrax.RESULTS.promote(solution.result)
        base_ok = base_results == diffrax.RESULTS.successful
        first_base_failure = jtu.tree_map(
            lambda r: r[jnp.argmin(base_ok)], base_results
        )
        result = diffrax.RESULTS.where(jnp.all(base_ok), result, first_base_failure)
        finite = jnp.all(jnp.isfinite(mapped))
        result = diffrax.RESULTS.where(
            finite, result, diffrax.RESULTS.nonlinear_divergence
        )
        ok = result == diffrax.RESULTS.successful

        if errors is None:
            y_error = None
        else:
            y_error = jtu.tree_map(
                lambda e: jnp.where(ok, e, jnp.inf), _worst_substep_error(errors)
            )

        scale = newton.atol + newton.rtol * jnp.abs(mapped)
        residual = optx.max_norm((trajectory - mapped) / scale)
        newton_steps = jnp.asarray(solution.stats["num_steps"], dtype=jnp.int32)
        new_state = DeerState(
            num_windows=solver_state.num_windows + 1,
            last_newton_steps=newton_steps,
            total_newton_steps=solver_state.total_newton_steps + newton_steps,
            max_newton_steps=jnp.maximum(solver_state.max_newton_steps, newton_steps),
            last_residual=residual.astype(solver_state.last_residual.dtype),
        )
        dense_info = dict(ts=ts, infos=dense_infos)
        return y1, y_error, dense_info, new_state, result

    def func(self, terms, t0, y0, args):
        return self.base_solver.func(terms, t0, y0, args)


DeerSolver.__init__.__doc__ = """**Arguments:**

- `base_solver`: the explicit Runge--Kutta method of each substep (`Euler`, `Heun`,
    `Midpoint`, `Ralston`, `Bosh3`, `Tsit5` (default), `Dopri5`, `Dopri8`). Its order,
    error estimate and interpolation are DeerSolver's.
- `num_substeps`: substeps per window (per Diffrax step), default 100. Longer
    windows expose more parallelism but need more Newton iterations and memory
    (`O(num_substeps n^2)` for `jacobian="full"`).
- `rtol`, `atol`: Newton tolerance on the residual of every substep,
    `|y_i - Phi_i(y_{i-1})| <= atol + rtol |y_i|`. Default (`None`):
    `10 eps^0.75` of the state's dtype (about `2e-11` for float64, `6e-5` for
    float32). These are not the ODE tolerances (those belong to the step-size
    controller).
- `max_newton_steps`: Newton iterations allowed per window before it is reported
    as failed (default 50).
- `jacobian`: `"full"` (exact Newton, default) or `"diagonal"` (quasi-Newton with
    the exact diagonal of each substep Jacobian: `O(T n)` memory and work, linear
    convergence), or an `AbstractJacobianMode`. Gradients always use the exact
    Jacobian.
"""
