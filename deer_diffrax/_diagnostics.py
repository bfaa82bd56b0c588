"""Readable Newton diagnostics of a DeerSolver solve."""

import diffrax
import equinox as eqx
import numpy as np

from ._solver import DeerState


class DeerDiagnostics(eqx.Module):
    """What the Newton solves of a [`deer_diffrax.DeerSolver`][] run did, over its
    accepted windows (host-side numbers; `print` it for a summary).

    **Arguments:** (built by [`deer_diffrax.diagnostics`][])

    - `num_windows`: accepted windows.
    - `total_substeps`: base-method substeps taken over the accepted windows (their
        active substeps): the steps a sequential solve on the same grid would take.
    - `total_newton_steps`, `mean_newton_steps`, `most_newton_steps`: Newton
        iterations summed over windows, their mean, and the most any window
        needed.
    - `newton_steps_histogram`: `{iterations: number of windows}`, non-zero entries.
    - `last_error_estimate`: Newton's estimate of the last window's error against
        the sequential solution, as a fraction of the tolerance (`<= 1`: converged).
    - `last_residual`: the last window's final scaled residual.
    - `num_rejected`: trial iterates rejected by damping.
    - `num_fallbacks`: windows finished by the sequential fallback.
    - `lyapunov_exponent`: the largest Lyapunov exponent of the dynamics along the
        solution, per unit time: the growth rate of a perturbation carried through
        the exact Jacobians of every substep of the accepted windows (NaN before
        the first window; `None` if the solver was not asked for it: build it
        with `DeerSolver(..., estimate_lyapunov=True)`). Negative: perturbations
        decay and Newton converges in a few iterations at any window length.
        Positive: a window of length `L` amplifies them by about
        `exp(lyapunov_exponent * L)`, and Newton needs more iterations the larger
        that is (see the docs page "Will DEER be fast on my problem?").
    - `last_window_growth`: `LLE x window length` of the last window (the
        logarithm of the norm of the product of its substep Jacobians, at its final
        iterate, converged or not); `None` when `lyapunov_exponent` is. For a
        refused window, the growth predicted for it.
    - `last_window_refused`: whether the last window was refused unattempted by
        `DeerSolver(..., max_window_growth=...)` (a constant step that fails there;
        under an adaptive controller refused windows are shrunk and only the
        accepted ones are reported); `None` without `max_window_growth`.
    """

    num_windows: int
    total_substeps: int
    total_newton_steps: int
    mean_newton_steps: float
    most_newton_steps: int
    newton_steps_histogram: dict[int, int]
    last_error_estimate: float
    last_residual: float
    num_rejected: int
    num_fallbacks: int
    lyapunov_exponent: float | None
    last_window_growth: float | None
    last_window_refused: bool | None = None

    def __str__(self):
        histogram = ", ".join(
            f"{k}: {v}" for k, v in sorted(self.newton_steps_histogram.items())
        )
        if self.lyapunov_exponent is None:
            lyapunov = (
                "largest Lyapunov exponent not estimated (build the solver with "
                "`DeerSolver(..., estimate_lyapunov=True)` to get it)."
            )
        else:
            lyapunov = (
                f"largest Lyapunov exponent {self.lyapunov_exponent:.3g} per unit time."
            )
        return (
            f"DeerSolver: {self.num_windows} windows ({self.total_substeps} "
            "substeps), Newton iterations per window "
            f"mean {self.mean_newton_steps:.2f} / max {self.most_newton_steps} "
            f"(iterations: windows = {{{histogram}}}); last error estimate "
            f"{self.last_error_estimate:.2e} of tolerance; {self.num_rejected} "
            f"damping rejections; {self.num_fallbacks} sequential fallbacks; "
            + lyapunov
            + (self._failure_advice() if not self.last_error_estimate <= 1 else "")
        )

    def _failure_advice(self) -> str:
        exponent = self.lyapunov_exponent
        if self.last_window_refused:
            return (
                " The last window was not attempted: at the Lyapunov exponent "
                f"estimated so far ({exponent:.3g} per unit time) its predicted "
                f"growth LLE x length = {self.last_window_growth:.3g} exceeds "
                "`max_window_growth`. The dynamics are chaotic there: use windows "
                f"shorter than max_window_growth / {exponent:.3g} time units "
                "(a smaller `dt0`, or an adaptive controller, which shrinks a "
                "refused window), or raise `max_window_growth`."
            )
        if exponent is not None and exponent > 0:
            # Measured on Lorenz with the default trust region: about 12 iterations
            # per time unit of window, and ~10 at LLE x L = 2 (docs: "Will DEER be
            # fast on my problem?").
            return (
                " The last window did not converge, and the dynamics are chaotic: "
                f"perturbations grow like exp({exponent:.3g} t), so Newton's "
                "iterations grow with the window's length. Windows of about "
                f"2 / {exponent:.3g} = {2 / exponent:.3g} time units keep them to "
                "tens: pass a smaller `dt0` (or fewer `num_substeps` per window at "
                "the same substep), or an adaptive controller, which shrinks a "
                "window that fails."
            )
        return (
            " The last window did not converge; where the Lyapunov exponent is "
            "positive the dynamics are chaotic and shorter windows (smaller "
            "`dt0` or `num_substeps`, or an adaptive controller) are the remedy; "
            "otherwise a better `initial_guess`, `fallback='sequential'` or more "
            "`max_newton_steps`."
        )


def diagnostics(solution_or_state: "diffrax.Solution | DeerState") -> DeerDiagnostics:
    """Summarise the Newton solves of a `DeerSolver` run.

    **Arguments:**

    - `solution_or_state`: the `diffrax.Solution` of a solve made with
        `saveat=diffrax.SaveAt(..., solver_state=True)`, or its `DeerState`
        (`sol.solver_state`). Not batched: index a `vmap`-ed solution first.

    **Returns:** a [`deer_diffrax.DeerDiagnostics`][].
    """
    state = solution_or_state
    if isinstance(state, diffrax.Solution):
        state = state.solver_state
        if state is None:
            raise ValueError(
                "The solution carries no solver state: solve with "
                "`saveat=diffrax.SaveAt(..., solver_state=True)` to read diagnostics."
            )
    if not isinstance(state, DeerState):
        raise TypeError(
            "`diagnostics` needs a solution computed with `DeerSolver` (or its "
            f"`DeerState`); got {type(state).__name__}."
        )
    if np.ndim(state.num_windows) != 0:
        raise ValueError(
            "These diagnostics are batched (from `vmap`); index one solve first, "
            "e.g. `jax.tree_util.tree_map(lambda x: x[0], sol.solver_state)`."
        )
    windows = int(state.num_windows)
    total = int(state.total_newton_steps)
    histogram = np.asarray(state.newton_steps_histogram)
    if state.lyapunov_growth is None:
        lyapunov_exponent = last_window_growth = None
    elif float(state.lyapunov_time) != 0:
        lyapunov_exponent = float(state.lyapunov_growth / state.lyapunov_time)
        last_window_growth = float(state.last_window_growth)
    else:
        lyapunov_exponent = float("nan")
        last_window_growth = float(state.last_window_growth)
    return DeerDiagnostics(
        num_windows=windows,
        total_substeps=int(state.total_substeps),
        total_newton_steps=total,
        mean_newton_steps=total / max(windows, 1),
        most_newton_steps=int(state.most_newton_steps),
        newton_steps_histogram={
            int(k): int(v) for k, v in enumerate(histogram) if v != 0
        },
        last_error_estimate=float(state.last_error_estimate),
        last_residual=float(state.last_residual),
        num_rejected=int(state.num_rejected),
        num_fallbacks=int(state.num_fallbacks),
        lyapunov_exponent=lyapunov_exponent,
        last_window_growth=last_window_growth,
        last_window_refused=(
            None if state.window_refused is None else bool(state.window_refused)
        ),
    )
