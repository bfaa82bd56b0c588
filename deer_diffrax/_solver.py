"""`DeerSolver`: a Diffrax solver whose every step is a window solved in parallel."""

import functools as ft
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Real

from ._base_solver import (
    check_base_solver,
    check_terms,
    initial_base_state,
    window_step_solver,
)
from ._damping import AbstractDamping, damping_strategy
from ._fallback import AbstractFallback, fallback_strategy
from ._guess import (
    AbstractInitialGuess,
    constant_guess,
    initial_guess_strategy,
    sequential_trajectory,
)
from ._interpolation import DeerInterpolationFactory
from ._jacobian import AbstractJacobianMode, DiagonalJacobian, jacobian_mode
from ._linearisation import StepwiseLinearisation, SurrogateLinearisation
from ._lyapunov import initial_direction, trajectory_growth, vector_growth
from ._newton import DeerNewton, solve_trajectory
from ._one_step import one_step_map
from ._operator import shift_in
from ._ravel import real_ravel
from ._scan_solve import AssociativeScanSolver
from ._trust_region import TrustRegion
from ._window import (
    euler_residual,
    substep,
    substep_grid,
    SubstepGrid,
    trajectory_residual,
    trajectory_residual_and_blocks,
    transition,
    WindowInputs,
    worst_substep_error,
)


class DeerState(eqx.Module):
    """Diagnostics carried by [`deer_diffrax.DeerSolver`][] from window to window
    (read them with `SaveAt(solver_state=True)` and `sol.solver_state`, or with
    [`deer_diffrax.diagnostics`][]). Rejected windows (adaptive step sizes) are not
    counted: Diffrax keeps the state of the last accepted window.

    **Arguments:** (built by `DeerSolver.init`, not by hand)

    - `num_windows`: accepted windows so far.
    - `last_newton_steps`: Newton iterations of the last accepted window.
    - `total_newton_steps`: Newton iterations summed over accepted windows.
    - `most_newton_steps`: the most Newton iterations any accepted window needed.
    - `newton_steps_histogram`: entry `k` counts the accepted windows that took `k`
        Newton iterations (length `DeerSolver.max_newton_steps + 1`).
    - `last_residual`: scaled max-norm of the last window's final residual
        `y_i - Phi_i(y_{i-1})` (near rounding level once converged).
    - `last_error_estimate`: Newton's estimate of the last window's error against
        the sequential solution of its substeps (the size of its last exact Newton
        update), scaled by the tolerance; `<= 1` means converged.
    - `num_rejected`: trial iterates rejected by damping, over all windows.
    - `num_fallbacks`: windows finished by the sequential fallback.
    - `total_substeps`: base-method substeps taken (active substeps, over all
        accepted windows): the number of steps a sequential solve on the same grid
        would take.
    - `substep_size`: the substep length the next window keeps if it is shorter
        than its capacity: that of the last window, if it used its whole capacity;
        NaN otherwise (the next window is divided evenly).
    - `lyapunov_growth`, `lyapunov_time`: the logarithm of the growth of a unit
        vector carried through the Jacobians of all substeps of the accepted
        windows, and the time they span; their ratio estimates the largest
        Lyapunov exponent of the dynamics along the solution (see
        [`deer_diffrax.diagnostics`][]). `None` unless the solver was built with
        `estimate_lyapunov=True`, as are the next two.
    - `lyapunov_direction`: that vector, normalised, after the last accepted window.
    - `last_window_growth`: the logarithm of the (Frobenius) norm of the product of
        the substep Jacobians of the last window, at its final iterate:
        `LLE x window length` for that window, whether or not Newton converged.
    - `window_refused`: whether the last window was refused unattempted because
        its predicted growth exceeded `DeerSolver.max_window_growth` (then
        `last_window_growth` is that prediction); `None` unless the solver was
        built with `max_window_growth`.
    - `previous`: the last window's trajectory and initial state, kept only for
        `initial_guess="previous"` (else `None`).
    - `base_state`: the base solver's own state after the last window, for a base
        solver that carries state between steps (`ReversibleHeun`,
        `LeapfrogMidpoint`, ...), whose windows solve for it along with `y`;
        `None` for the others, which restart every substep.
    """

    num_windows: Int[Array, ""]
    last_newton_steps: Int[Array, ""]
    total_newton_steps: Int[Array, ""]
    most_newton_steps: Int[Array, ""]
    newton_steps_histogram: Int[Array, " max_newton_steps_plus_1"]
    last_residual: Float[Array, ""]
    last_error_estimate: Float[Array, ""]
    num_rejected: Int[Array, ""]
    num_fallbacks: Int[Array, ""]
    total_substeps: Int[Array, ""]
    substep_size: Real[Array, ""]
    lyapunov_growth: Float[Array, ""] | None
    lyapunov_time: Real[Array, ""] | None
    lyapunov_direction: Float[Array, " n"] | None
    last_window_growth: Float[Array, ""] | None
    window_refused: Bool[Array, ""] | None
    previous: tuple[Array, Array] | None
    base_state: PyTree | None


# The Lyapunov fields of a `DeerState` whose solver does not estimate the exponent.
_NO_LYAPUNOV = dict(
    lyapunov_growth=None,
    lyapunov_time=None,
    lyapunov_direction=None,
    last_window_growth=None,
)


def _nan_floats_as_arrays(args: PyTree) -> PyTree:
    # Python floats in `args` are static to the root finder's closure conversion,
    # which then checks that they compare equal to themselves: NaN does not. Other
    # Python scalars stay static, as Diffrax leaves them.
    is_nan = lambda x: isinstance(x, float) and x != x
    return jtu.tree_map(lambda x: jnp.asarray(x) if is_nan(x) else x, args)


def _unknowns(y: PyTree, base_state: PyTree | None) -> PyTree:
    return y if base_state is None else (y, base_state)


def _split_unknowns(unknowns: PyTree, base_state: PyTree | None):
    return (unknowns, None) if base_state is None else unknowns


def _next_substep_size(grid: SubstepGrid, dtype) -> Real[Array, ""]:
    # Only a window that used its whole capacity sets the substep length that a
    # shorter one after it keeps (the end of the solve, a jump or `dtmax`, a short
    # `StepTo` interval, a retry after rejection). After a shorter window, the next
    # is divided evenly again: an adaptive controller that keeps proposing windows
    # shorter than the capacity then sees its error fall as the window shrinks, as
    # it expects, instead of stalling at a fixed substep length.
    full = grid.num_active == grid.ts.shape[0] - 1
    size = grid.ts[1] - grid.ts[0]
    return jnp.where(full, size, jnp.nan).astype(dtype)


def _predicted_window_growth(
    solver_state: DeerState, t0: Real[Array, ""], t1: Real[Array, ""]
) -> Float[Array, ""]:
    """`LLE x window length` predicted for the window `[t0, t1]` from the exponent
    estimated over the accepted windows so far: NaN before the first (nothing
    known), and never above zero for contracting dynamics."""
    time = solver_state.lyapunov_time
    known = time > 0
    exponent = solver_state.lyapunov_growth / jnp.where(known, time, 1).astype(
        solver_state.lyapunov_growth.dtype
    )
    length = jnp.abs(t1 - t0).astype(exponent.dtype)
    return jnp.where(known, exponent * length, jnp.nan)


def _refused_window(
    out_struct: PyTree, solver_state: DeerState, growth: Float[Array, ""]
) -> tuple:
    """`step`'s outputs for a window refused unattempted: reported as a window whose
    Newton solve failed (every output NaN, an infinite error estimate, so that an
    adaptive controller shrinks it), with the state of the last accepted window
    marked as refused."""
    y1, y_error, dense_info, new_state, result = out_struct
    nan = lambda s: jnp.full(s.shape, jnp.nan if _inexact(s) else 0, s.dtype)
    inf = lambda s: jnp.full(s.shape, jnp.inf, s.dtype)
    state = eqx.tree_at(
        lambda s: (s.last_error_estimate, s.last_window_growth, s.window_refused),
        solver_state,
        (
            jnp.array(jnp.inf, solver_state.last_error_estimate.dtype),
            growth.astype(solver_state.last_window_growth.dtype),
            jnp.array(True),
        ),
    )
    state = jtu.tree_map(lambda x, s: jnp.asarray(x, s.dtype), state, new_state)
    failed = jtu.tree_map(
        lambda x, s: jnp.asarray(x, s.dtype),
        diffrax.RESULTS.nonlinear_max_steps_reached,
        result,
    )
    return (
        jtu.tree_map(nan, y1),
        jtu.tree_map(inf, y_error),
        jtu.tree_map(nan, dense_info),
        state,
        failed,
    )


def _inexact(x: Array | jax.ShapeDtypeStruct) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


class DeerSolver(diffrax.AbstractAdaptiveSolver, diffrax.AbstractWrappedSolver):
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
        `dt0` gives sequential windows, each parallel inside (bounded memory). The
        substep is `dt0 / num_substeps`: the same grid as the base solver with that
        `dt0`, when `dt0` divides `t1 - t0`.
    - `num_substeps` is a window's capacity. A window shorter than the one before it
        (the last one at `t1`, one clipped by `jump_ts` or `dtmax`, a short `StepTo`
        interval) keeps the previous window's substep length, the last substep
        clipped at its end as a sequential solve clips its last step, and leaves the
        rest of its capacity inactive (zero-length substeps, which change nothing).
    - A base solver that carries state between steps (`ReversibleHeun`,
        `LeapfrogMidpoint`) has it solved for too: `Y` is then the sequence of pairs
        `(y_i, s_i)` of state and solver state, `Phi_i` the base solver's step on a
        pair, and the pair at a window's end starts the next window.
    - With `PIDController` the window length adapts: the window's error estimate is,
        per state entry, the largest embedded error estimate of its substeps, and a
        window whose Newton solve fails reports an infinite error so it is rejected
        and shrunk.
    - Dense output (`SaveAt(dense=True)`, `SaveAt(ts=...)`) uses the base solver's
        interpolation on each substep.
    - Gradients through a window use the implicit function theorem (one transposed,
        reverse-time scan with the exact Jacobian), never the Newton iterations.

    A window whose Newton solve does not converge in `max_newton_steps` iterations
    returns `RESULTS.nonlinear_max_steps_reached` (non-finite iterates:
    `RESULTS.nonlinear_divergence`): `diffeqsolve` raises with `throw=True`, and an
    adaptive controller rejects the window and shrinks it. Remedies are shorter
    windows (smaller `dt0`, or an adaptive controller), more `max_newton_steps`,
    `jacobian="full"`, a better `initial_guess`, or `fallback="sequential"`
    (see [`deer_diffrax.diagnostics`][] for what the windows did).
    """

    base_solver: diffrax.AbstractSolver
    num_substeps: int = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_newton_steps: int = eqx.field(static=True)
    jacobian: AbstractJacobianMode
    damping: AbstractDamping
    initial_guess: AbstractInitialGuess
    fallback: AbstractFallback
    linear_solver: lx.AbstractLinearSolver
    linearise: str = eqx.field(static=True)
    estimate_lyapunov: bool = eqx.field(static=True)
    max_window_growth: float | None = eqx.field(static=True)

    def __init__(
        self,
        base_solver: diffrax.AbstractSolver | None = None,
        num_substeps: int = 100,
        rtol: float | None = None,
        atol: float | None = None,
        max_newton_steps: int = 50,
        jacobian: "str | AbstractJacobianMode" = "full",
        damping: "bool | AbstractDamping | None" = None,
        initial_guess: "str | Callable | AbstractInitialGuess" = "constant",
        predictor_stride: int = 10,
        fallback: "str | None | AbstractFallback" = None,
        linear_solver: lx.AbstractLinearSolver | None = None,
        linearise: str = "auto",
        estimate_lyapunov: bool = False,
        max_window_growth: float | None = None,
    ):
        if base_solver is None:
            base_solver = diffrax.Tsit5()
        check_base_solver(base_solver, DeerSolver)
        for name, value in (
            ("num_substeps", num_substeps),
            ("max_newton_steps", max_newton_steps),
            ("predictor_stride", predictor_stride),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"`{name}` must be positive; got {tol!r}.")
        self.base_solver = base_solver
        self.num_substeps = num_substeps
        self.rtol = rtol
        self.atol = atol
        self.max_newton_steps = max_newton_steps
        self.jacobian = jacobian_mode(jacobian)
        self.damping = damping_strategy(TrustRegion() if damping is None else damping)
        self.initial_guess = initial_guess_strategy(initial_guess, predictor_stride)
        self.fallback = fallback_strategy(fallback)
        if linear_solver is None:
            linear_solver = AssociativeScanSolver()
        if not isinstance(linear_solver, lx.AbstractLinearSolver):
            raise ValueError(
                "`linear_solver` must be a Lineax solver for block-bidiagonal "
                "systems (e.g. `deer_diffrax.AssociativeScanSolver()`); got "
                f"{linear_solver!r}."
            )
        self.linear_solver = linear_solver
        if linearise not in ("auto", "step", "vector_field"):
            raise ValueError(
                f"Unknown linearise={linearise!r}: use 'auto', 'step' (exact blocks) "
                "or 'vector_field' (cheap blocks from the vector field's Jacobian)."
            )
        explicit = one_step_map(base_solver) is not None
        if linearise == "vector_field" and not explicit:
            raise ValueError(
                "linearise='vector_field' approximates each substep's Jacobian by an "
                "explicit Euler step's, which only suits explicit base solvers (Euler "
                "or explicit Runge-Kutta); for "
                f"{type(base_solver).__name__} use linearise='step'."
            )
        if linearise == "auto":
            # The diagonal mode is approximate anyway, and with the Euler blocks it
            # needs the same iterations (measured on five test problems) at a
            # fraction of the cost per iteration.
            cheap = explicit and isinstance(self.jacobian, DiagonalJacobian)
            linearise = "vector_field" if cheap else "step"
        self.linearise = linearise
        if not isinstance(estimate_lyapunov, bool):
            raise ValueError(
                f"`estimate_lyapunov` must be True or False; got {estimate_lyapunov!r}."
            )
        if max_window_growth is not None and not (
            isinstance(max_window_growth, (int, float))
            and not isinstance(max_window_growth, bool)
            and max_window_growth > 0
        ):
            raise ValueError(
                "`max_window_growth` must be a positive number (a bound on "
                f"`LLE x window length`) or None; got {max_window_growth!r}."
            )
        self.max_window_growth = max_window_growth
        # The refusal reads the exponent estimated over the accepted windows.
        self.estimate_lyapunov = estimate_lyapunov or max_window_growth is not None

    # As a wrapped solver, Diffrax's `isinstance` checks (implicit? Ito? SDE-safe
    # with adaptive steps?) see the base solver, and an implicit base solver's root
    # finder gets the step-size controller's tolerances exactly as on its own.
    @property
    def solver(self):
        return self.base_solver

    @property
    def root_finder(self):
        return self.base_solver.root_finder

    @property
    def scan_kind(self):
        # Read by Diffrax's `DirectAdjoint`/`ForwardMode` for Runge-Kutta solvers
        # (which the wrapped `isinstance` makes us look like): not `None`, so they
        # leave the solver alone; `step` makes the base's stage loop
        # forward-differentiable itself.
        return "bounded"

    @property
    def term_structure(self):
        return self.base_solver.term_structure

    @property
    def term_compatible_contr_kwargs(self):
        # E.g. stochastic Runge-Kutta bases ask the Brownian motion for Levy areas.
        return self.base_solver.term_compatible_contr_kwargs

    @property
    def interpolation_cls(self):
        return DeerInterpolationFactory(self.base_solver.interpolation_cls)

    def order(self, terms):
        return self.base_solver.order(terms)

    def strong_order(self, terms):
        return self.base_solver.strong_order(terms)

    def error_order(self, terms):
        return self.base_solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args) -> DeerState:
        check_terms(terms, self.base_solver)
        # The first window is divided evenly: its first substep is where a sequential
        # solve on the same grid would start.
        first_substep_end = t0 + (t1 - t0) / self.num_substeps
        base_state = initial_base_state(
            self.base_solver, terms, t0, first_substep_end, y0, args
        )
        zero = jnp.array(0, dtype=jnp.int32)
        # The Newton unknowns: the state, and the base solver's state if it carries
        # one between steps.
        y_start, _ = real_ravel(_unknowns(y0, base_state))
        time_dtype = jnp.result_type(t0, t1)
        if self.estimate_lyapunov:
            lyapunov = dict(
                lyapunov_growth=jnp.array(0.0, dtype=y_start.dtype),
                lyapunov_time=jnp.array(0.0, dtype=time_dtype),
                lyapunov_direction=initial_direction(y_start.shape[0], y_start.dtype),
                last_window_growth=jnp.array(0.0, dtype=y_start.dtype),
            )
        else:
            lyapunov = _NO_LYAPUNOV
        refused = None if self.max_window_growth is None else jnp.array(False)
        if self.initial_guess.needs_previous:
            previous = (constant_guess(y_start, self.num_substeps), y_start)
        else:
            previous = None
        return DeerState(
            num_windows=zero,
            last_newton_steps=zero,
            total_newton_steps=zero,
            most_newton_steps=zero,
            newton_steps_histogram=jnp.zeros(
                self.max_newton_steps + 1, dtype=jnp.int32
            ),
            last_residual=jnp.array(0.0),
            last_error_estimate=jnp.array(0.0),
            num_rejected=zero,
            num_fallbacks=zero,
            total_substeps=zero,
            substep_size=jnp.array(jnp.nan, dtype=time_dtype),
            window_refused=refused,
            previous=previous,
            base_state=base_state,
            **lyapunov,
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
        # Diffrax traces a solver's `step` two or three times per solve (its loop
        # first evaluates the body's output structure, and `SaveAt(dense=True)`
        # evaluates `step`'s); behind a `jit` the window's Newton solve is traced
        # once and reused (lowering time on a CPU, T = 1e3: 1.5 s -> 0.9 s).
        # `made_jump` becomes an array so that every call has the same signature.
        return _jitted_step(
            self, terms, t0, t1, y0, args, solver_state, jnp.asarray(made_jump)
        )

    def _step(self, terms, t0, t1, y0, args, solver_state: DeerState, made_jump):
        """`step`'s work, traced once behind `_jitted_step`."""
        attempt = ft.partial(
            self._solve_window, terms, t0, t1, y0, args, solver_state, made_jump
        )
        if self.max_window_growth is None:
            return attempt()
        growth = _predicted_window_growth(solver_state, t0, t1)
        # Skipping the Newton solve is the point of a refusal, hence a `cond` (under
        # `vmap` it becomes a select and both branches run: the answer is the same).
        return jax.lax.cond(
            growth > self.max_window_growth,
            ft.partial(_refused_window, jax.eval_shape(attempt), solver_state, growth),
            attempt,
        )

    def _solve_window(
        self, terms, t0, t1, y0, args, solver_state: DeerState, made_jump
    ):
        """Solve one window by Newton: `step`'s outputs."""
        # The Newton unknowns: the state, and the base solver's own state if it
        # carries one between steps.
        y_start, unravel = real_ravel(_unknowns(y0, solver_state.base_state))
        # Checked here rather than in `init`, whose output Diffrax may not keep alive.
        y_start = eqx.error_if(
            y_start,
            jnp.invert(jnp.all(jnp.isfinite(real_ravel(y0)[0]))),
            "DeerSolver: the initial state y0 contains NaN or inf; pass a finite y0.",
        )
        grid = substep_grid(t0, t1, self.num_substeps, solver_state.substep_size)
        ts = grid.ts
        args = _nan_floats_as_arrays(args)
        # Restartable bases restart every substep (`made_jump` is moot); one that
        # carries state is told of a jump at the window's first substep.
        base_solver = window_step_solver(
            self.base_solver, solver_state.base_state, t0, made_jump
        )
        substep_outputs = ft.partial(substep, base_solver, terms, args, unravel)
        substep_state = ft.partial(transition, base_solver, terms, args, unravel)

        if self.linearise == "vector_field":
            linearisation = SurrogateLinearisation(ft.partial(euler_residual, unravel))
        else:
            # Explicit substeps can be linearised anywhere; an implicit one's stage
            # solve may fail at a wild trial point.
            explicit = one_step_map(self.base_solver) is not None
            # The exact blocks substep by substep (`jax.jacfwd` of the base step),
            # rather than `n` probes of the whole window's linearisation: measured
            # 3.0-3.2x faster at n = 32 (Tsit5, 1e4 substeps, float32 on a CPU).
            linearisation = StepwiseLinearisation(
                trajectory_residual_and_blocks, safe_at_trials=explicit
            )
        newton = DeerNewton(
            rtol=self.rtol,
            atol=self.atol,
            jacobian=self.jacobian,
            damping=self.damping,
            linear_solver=self.linear_solver,
            linearisation=linearisation,
        )
        guess = self.initial_guess(
            substep_state,
            y_start,
            ts,
            solver_state.previous,
            # A guess of `y` alone keeps the base solver's state where it starts.
            lambda y: real_ravel(_unknowns(y, solver_state.base_state))[0],
        )
        inputs = WindowInputs(
            step=eqx.filter_closure_convert(substep_state, y_start, ts[0], ts[1]),
            y_start=y_start,
            ts=ts,
            terms=terms,
            args=args,
        )
        solution = solve_trajectory(
            trajectory_residual, newton, guess, inputs, self.max_newton_steps
        )
        trajectory = solution.value
        newton_failed = solution.result != optx.RESULTS.successful
        trajectory, fell_back = self.fallback(
            newton_failed,
            trajectory,
            lambda: sequential_trajectory(substep_state, y_start, ts),
        )
        result = diffrax.RESULTS.where(
            fell_back,
            diffrax.RESULTS.successful,
            diffrax.RESULTS.promote(solution.result),
        )
        num_fallbacks = fell_back.astype(jnp.int32)

        # One more (parallel) pass at the converged trajectory: the end state, the
        # error estimates and the dense output are those of the base method applied
        # to it, exactly as a sequential solve would produce them.
        previous = shift_in(y_start, trajectory)
        mapped, errors, dense_infos, base_results = jax.vmap(substep_outputs)(
            previous, ts[:-1], ts[1:]
        )

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
        # A failed window must not be read as an answer: Diffrax still saves its end
        # state, evaluates events on it and may search its dense output for an event
        # time (a terminating event even replaces the failure code with
        # `event_occurred`). So everything it returns is NaN. Its derivatives are
        # zero, not NaN: an adaptive controller rejects the window and Diffrax
        # discards it with a `where`, whose zero cotangent a multiplication by NaN
        # would turn into a NaN gradient of the whole solve.
        poison = lambda x: jnp.where(ok, x, jnp.nan) if _inexact(x) else x
        mapped = poison(mapped)
        dense_infos = jtu.tree_map(poison, dense_infos)
        y1, base_state = _split_unknowns(unravel(mapped[-1]), solver_state.base_state)

        if errors is None:
            y_error = None
        else:
            y_error = jtu.tree_map(
                lambda e: jnp.where(ok, e, jnp.inf), worst_substep_error(errors)
            )

        if self.estimate_lyapunov:
            lyapunov = self._lyapunov_update(
                solver_state,
                solution.blocks,
                substep_state,
                y_start,
                ts,
                ok & jnp.invert(fell_back),
            )
        else:
            lyapunov = _NO_LYAPUNOV
        residual = newton.scaled_norm(trajectory - mapped, mapped)
        newton_steps = solution.num_steps
        rejected = solution.num_rejected
        new_state = DeerState(
            num_windows=solver_state.num_windows + 1,
            last_newton_steps=newton_steps,
            total_newton_steps=solver_state.total_newton_steps + newton_steps,
            most_newton_steps=jnp.maximum(solver_state.most_newton_steps, newton_steps),
            # A differentiated solve may take one step more than allowed (see
            # `solve_trajectory`): counted with the last entry.
            newton_steps_histogram=solver_state.newton_steps_histogram.at[
                jnp.minimum(newton_steps, self.max_newton_steps)
            ].add(1),
            last_residual=residual.astype(solver_state.last_residual.dtype),
            last_error_estimate=solution.error_estimate.astype(
                solver_state.last_error_estimate.dtype
            ),
            num_rejected=solver_state.num_rejected + rejected,
            num_fallbacks=solver_state.num_fallbacks + num_fallbacks,
            total_substeps=solver_state.total_substeps + grid.num_active,
            substep_size=_next_substep_size(grid, solver_state.substep_size.dtype),
            window_refused=(
                None if self.max_window_growth is None else jnp.array(False)
            ),
            previous=None if solver_state.previous is None else (trajectory, y_start),
            base_state=base_state,
            **lyapunov,
        )
        # The count travels as a time (Diffrax pads dense information with inf,
        # which an integer cannot hold).
        num_active = grid.num_active.astype(ts.dtype)
        dense_info = dict(ts=ts, num_active=num_active, infos=dense_infos)
        return y1, y_error, dense_info, new_state, result

    def _lyapunov_update(
        self,
        solver_state: DeerState,
        blocks: Array,
        substep_state: Callable,
        y_start: Array,
        ts: Array,
        counts: Array,
    ) -> dict[str, Array]:
        """The `DeerState` fields of the Lyapunov estimate after this window, from
        Newton's exact blocks of substeps `2..T` and the first substep's Jacobian.
        Only a window that `counts` (solved by Newton) adds to the estimate."""
        # The first substep's Jacobian is not in Newton's blocks (its start is
        # fixed): one small forward-mode Jacobian completes the window's product.
        first_jacobian = jax.lax.stop_gradient(
            jax.jacfwd(lambda y: substep_state(y, ts[0], ts[1]))(y_start)
        )
        later, later_scale = trajectory_growth(blocks[1:])
        window_product, window_growth = trajectory_growth(
            jnp.stack([first_jacobian, later])
        )
        window_growth = window_growth + later_scale
        direction_growth, direction = vector_growth(
            window_product, window_growth, solver_state.lyapunov_direction
        )
        # Only windows that Newton solved count: a failed window's iterate is not
        # the solution (nor are its blocks those of a fallback's trajectory), and a
        # NaN would spoil every later estimate.
        counts = counts & jnp.isfinite(direction_growth)
        growth = solver_state.lyapunov_growth
        time = solver_state.lyapunov_time
        old_direction = solver_state.lyapunov_direction
        return dict(
            lyapunov_growth=growth
            + jnp.where(counts, direction_growth, 0).astype(growth.dtype),
            lyapunov_time=time
            + jnp.where(counts, jnp.abs(ts[-1] - ts[0]), 0).astype(time.dtype),
            lyapunov_direction=jnp.where(counts, direction, old_direction).astype(
                old_direction.dtype
            ),
            last_window_growth=window_growth.astype(
                solver_state.last_window_growth.dtype
            ),
        )

    def func(self, terms, t0, y0, args):
        return self.base_solver.func(terms, t0, y0, args)


DeerSolver.__init__.__doc__ = """**Arguments:**

- `base_solver`: the method of each substep: any Diffrax solver whose step is a
    fixed function of its start, its own solver state and the driving path.
    Explicit Runge-Kutta (`Tsit5`, the default (`None`), `Euler`, `Heun`,
    `Dopri5`, ...), implicit and IMEX Runge-Kutta (`ImplicitEuler`, `Kvaerno3/4/5`,
    `KenCarp3/4/5`, for stiff problems), `SemiImplicitEuler`, SDE solvers on a
    `VirtualBrownianTree` (`Euler`, `Heun`, `EulerHeun`, Milstein, the stochastic
    Runge-Kutta `SPaRK`, `ShARK`, `GeneralShARK`, `SRA1`, `SEA`, `SlowRK`, the
    underdamped Langevin `ALIGN`, `ShOULD`, `QUICSORT`) and a
    `diffrax.AbstractSolver` of your own are restarted at every substep.
    Solvers that carry state between steps (`ReversibleHeun`, `LeapfrogMidpoint`,
    or your own whose `init` returns a state) have that state solved for with `y`
    (it must be floating point). Its order, error estimate and interpolation are
    DeerSolver's.
- `num_substeps`: substeps per window (per Diffrax step), default 100. Longer
    windows expose more parallelism but need more Newton iterations and memory
    (`O(num_substeps n^2)` for `jacobian="full"`).
- `rtol`, `atol`: a bound on the error of each window's trajectory against the
    sequential solution of the same substeps, `atol + rtol |y_i|` entrywise: Newton
    stops once its exact update (to first order, that error) is within it, and
    returns the updated trajectory, whose error is then about the square of it.
    With `jacobian="diagonal"` the quasi-Newton iterations stop on their own error
    estimate and one exact Newton step checks and corrects it. Default (`None`):
    `10 eps^0.75` of the state's dtype (about `2e-11` for float64, `6e-5` for
    float32), which leaves results at the rounding level of the sequential solve.
    These are not the ODE tolerances (those belong to the step-size controller).
- `max_newton_steps`: Newton iterations allowed per window before it is reported
    as failed (default 50). A differentiated solve is allowed one more, for the
    linearisation at the returned trajectory that its gradient reuses.
- `jacobian`: `"full"` (exact Newton, default) or `"diagonal"` (quasi-Newton with
    the diagonal of each substep Jacobian: `O(T n)` memory and work, linear
    convergence; see `linearise` for where the diagonal comes from), or an
    `AbstractJacobianMode`. Gradients always use the exact Jacobian.
- `damping`: how Newton guards its steps, a [`deer_diffrax.AbstractDamping`][] or
    a shorthand. Default (`None`): [`deer_diffrax.TrustRegion`][] (reject iterates whose
    residual overflows or grows sharply, and cut each later step at the first
    substep whose change exceeds a self-adapting radius, restarting the rest of the
    window; exactly Newton's iterations while no trial is rejected). `True` for
    [`deer_diffrax.ShrinkBlocksDamping`][] (retry rejected steps with shrunk
    Jacobian blocks, down to a Picard sweep), `False` for
    [`deer_diffrax.NoDamping`][] (plain Newton). The trust region solves long
    windows that shrinking does not, and where Newton needs damping it takes fewer
    iterations (see the docs' "Choosing options").
- `initial_guess`: where Newton starts in each window, a
    [`deer_diffrax.AbstractInitialGuess`][] or a shorthand for one: `"constant"`
    ([`deer_diffrax.ConstantGuess`][], the window's initial state at every
    substep; default), `"previous"` ([`deer_diffrax.PreviousWindowGuess`][], the
    previous window's trajectory translated to the new initial state),
    `"predictor"` ([`deer_diffrax.PredictorGuess`][], a coarse sequential pass of
    the base method interpolated onto the substeps), or a function `t -> y`
    ([`deer_diffrax.PathGuess`][], e.g. the `evaluate` method of a coarser
    solution).
- `predictor_stride`: substeps per coarse step of the `"predictor"` shorthand
    (default 10); `PredictorGuess(stride)` says it directly.
- `fallback`: what a window whose Newton solve fails does, a
    [`deer_diffrax.AbstractFallback`][] or a shorthand: `None` (default,
    [`deer_diffrax.NoFallback`][]: the failure is reported) or `"sequential"`
    ([`deer_diffrax.SequentialFallback`][]: the window is finished by the base
    solver one substep at a time; `DeerState.num_fallbacks` records it).
- `linear_solver`: the Lineax solver of the block-bidiagonal system of every Newton
    step and of the implicit-function-theorem solve for gradients (default
    [`deer_diffrax.AssociativeScanSolver`][]).
- `linearise`: where the Newton blocks `J_i` come from. `"step"`: the exact
    Jacobian of each base-method substep (`n` Jacobian-vector products of the whole
    substep per iteration). `"vector_field"`: the Jacobian of an Euler step of the
    same terms, `I + dt df/dy` at the start of each substep, which agrees with the
    exact one to first order in `dt`: `n` products of the vector field alone, so an
    iteration costs about one evaluation of the residual. Newton then converges
    linearly rather than quadratically, but to the same root (the residual is
    always the base method's). Explicit base solvers only. `"auto"` (default):
    `"vector_field"` for `jacobian="diagonal"` with an explicit base solver (same
    iteration counts, several times cheaper), else `"step"`. Gradients always use
    the exact Jacobian.
- `estimate_lyapunov`: also estimate the largest Lyapunov exponent of the dynamics
    along the solution from Newton's exact Jacobian blocks, read with
    [`deer_diffrax.diagnostics`][] (default `False`: the estimate costs a tree
    product of every window's blocks, about half an associative scan, and
    `diagnostics` then reports it as not estimated).
- `max_window_growth`: a bound on `LLE x window length`, or `None` (default: no
    window is refused). When set, a window whose length times the exponent
    estimated over the accepted windows so far exceeds it is not attempted: it is
    reported as a window whose Newton solve failed, without spending the
    iterations, so an adaptive step-size controller shrinks it at once (and a
    constant step fails, as it would have after `max_newton_steps`). For chaotic
    dynamics, where long windows cost many iterations or fail; implies
    `estimate_lyapunov=True`. Not a default because the exponent alone does not
    predict Newton's iterations: a linear system converges in one iteration at any
    growth, and strongly driven recurrences can be hard at negative exponents (see
    the docs page "Will DEER be fast on my problem?").
"""


@eqx.filter_jit
def _jitted_step(solver, terms, t0, t1, y0, args, solver_state, made_jump):
    """`DeerSolver.step`, cached as one traced function (see there)."""
    return solver._step(terms, t0, t1, y0, args, solver_state, made_jump)
