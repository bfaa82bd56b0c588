"""Levenberg-Marquardt steps for DEER, solved as a parallel Kalman smoother.

The step minimises `|F - L dY|^2 + lambda |dY|^2`, where `L` is the unit lower
block-bidiagonal Jacobian of the residual (`(L dY)_i = dy_i - J_i dy_{i-1}`, `dy_0`
following the fixed initial state). Read as a state-space model, `dy_i = J_i dy_{i-1} +
F_i + w_i` with unit process noise and an observation `0 = dy_i + v_i` of variance
`1 / lambda`, its minimiser is the smoothed mean of a linear Gaussian model: a
filtering prefix scan whose elements carry covariances (Sarkka and
Garcia-Fernandez, "Temporal parallelization of Bayesian smoothers", 2021) and a
backward linear recurrence, both `O(log T)` deep. `lambda = 0` is Newton's step;
large `lambda` a short step along the residual's steepest descent.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from ._damping import AbstractDamping
from ._operator import BlockBidiagonalOperator
from ._scan_solve import solve_linear_recurrence


_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _mv(a: Array, x: Array) -> Array:
    return jnp.einsum("...ij,...j->...i", a, x, precision=_HIGHEST)


def _ht(a: Array) -> Array:
    return jnp.conj(jnp.swapaxes(a, -1, -2))


def _plus_identity(x: Array) -> Array:
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return x + jnp.broadcast_to(eye, x.shape)


def _solve(a: Array, b: Array) -> Array:
    """`a^{-1} b` for batches of small square `a` (`(..., n, n)`, `b` `(..., n, m)`),
    by Gauss-Jordan elimination with partial pivoting written in JAX: inside
    Newton's loop, XLA's calls into LAPACK were seen to deadlock on CPU."""
    size = a.shape[-1]
    system = jnp.concatenate([a, b], axis=-1)
    rows = jnp.broadcast_to(jnp.arange(size), a.shape[:-1])

    def eliminate(k, system):
        column = jnp.abs(system[..., :, k])
        pivot = jnp.argmax(jnp.where(rows >= k, column, -1), axis=-1)
        # Swap rows k and pivot.
        order = jnp.where(
            rows == k, pivot[..., None], jnp.where(rows == pivot[..., None], k, rows)
        )
        system = jnp.take_along_axis(system, order[..., None], axis=-2)
        row = system[..., k, :] / system[..., k, k][..., None]
        factors = jnp.where(rows == k, 0, system[..., :, k])
        system = system - factors[..., None] * row[..., None, :]
        return system.at[..., k, :].set(row)

    system = jax.lax.fori_loop(0, size, eliminate, system)
    return system[..., size:]


def _combine(earlier, later):
    # The filtering elements `(A, b, C, eta, Jm)` of two consecutive stretches of
    # time combine into the element of their union (Sarkka and Garcia-Fernandez,
    # Lemma 8): `(A, b, C)` is the stretch's conditional of its last state given the
    # state before it, `(eta, Jm)` the information it holds about that state.
    a1, b1, c1, eta1, jm1 = earlier
    a2, b2, c2, eta2, jm2 = later
    # a2 (I + c1 jm2)^{-1}, as a solve with the transposed matrix.
    a2_m = _ht(_solve(_ht(_plus_identity(_mm(c1, jm2))), _ht(a2)))
    # a1^H (I + jm2 c1)^{-1}
    a1h_n = _ht(_solve(_ht(_plus_identity(_mm(jm2, c1))), a1))
    a = _mm(a2_m, a1)
    b = _mv(a2_m, b1 + _mv(c1, eta2)) + b2
    c = _mm(_mm(a2_m, c1), _ht(a2)) + c2
    eta = _mv(a1h_n, eta2 - _mv(jm2, b1)) + eta1
    jm = _mm(_mm(a1h_n, jm2), a1) + jm1
    # Covariance and information stay Hermitian up to rounding; keep them so.
    return a, b, (c + _ht(c)) / 2, eta, (jm + _ht(jm)) / 2


def _dense_step(blocks: Array, residual: Array, lam: Array) -> Array:
    """The Levenberg-Marquardt update for dense `(T, n, n)` blocks."""
    num_steps, size = residual.shape
    dtype = residual.dtype
    eye = jnp.eye(size, dtype=dtype)
    # The first unknown follows the fixed initial state: no coupling before it.
    jac = blocks.at[0].set(0)
    # Observation gain lambda / (1 + lambda): 0 for Newton, 1 for no step.
    gain = (lam / (1 + lam)).astype(dtype)
    keep = 1 - gain
    elements = (
        keep * jac,
        keep * residual,
        jnp.broadcast_to(keep * eye, (num_steps, size, size)),
        -gain * _mv(_ht(jac), residual),
        gain * _mm(_ht(jac), jac),
    )
    _, means, covariances, _, _ = jax.lax.associative_scan(_combine, elements)
    # Smoothing: dy_i = E_i dy_{i+1} + g_i, with E_i = P_i J_{i+1}^H
    # (J_{i+1} P_i J_{i+1}^H + I)^{-1} and g_i = m_i - E_i (J_{i+1} m_i + F_{i+1}).
    nxt = jac[1:]
    p = covariances[:-1]
    predicted = _plus_identity(_mm(_mm(nxt, p), _ht(nxt)))
    gains = _ht(_solve(predicted, _mm(nxt, _ht(p))))
    offsets = means[:-1] - _mv(gains, _mv(nxt, means[:-1]) + residual[1:])
    # As a forward recurrence in reversed time; its first block is unused.
    backward_blocks = jnp.concatenate([jnp.zeros_like(gains[:1]), gains[::-1]])
    backward_rhs = jnp.concatenate([means[-1:], offsets[::-1]])
    return solve_linear_recurrence(backward_blocks, backward_rhs)[::-1]


def levenberg_marquardt_step(blocks: Array, residual: Array, lam: Array) -> Array:
    """The update `dY` minimising `|F - L dY|^2 + lam |dY|^2` (see the module).

    **Arguments:**

    - `blocks`: the `J_i` (`blocks[0]` unused), dense `(T, n, n)`, diagonal
        `(T, n)` or block-diagonal `(T, n / k, k, k)`.
    - `residual`: `F`, shape `(T, n)`.
    - `lam`: the damping parameter, a non-negative scalar.

    **Returns:** `dY`, shape `(T, n)`; the new iterate is `Y - dY`.
    """
    if blocks.ndim == 2:
        # Independent scalar problems, one per component.
        step = jax.vmap(_dense_step, in_axes=(1, 1, None), out_axes=1)
        return step(blocks[:, :, None, None], residual[:, :, None], lam)[..., 0]
    if blocks.ndim == 4:
        pieces = residual.reshape(blocks.shape[:3])
        step = jax.vmap(_dense_step, in_axes=(1, 1, None), out_axes=1)
        return step(blocks, pieces, lam).reshape(residual.shape)
    return _dense_step(blocks, residual, lam)


def linearised_residual(blocks: Array, residual: Array, update: Array) -> Array:
    """`F - L dY`: the residual at `Y - dY` predicted by the linearisation."""
    return residual - BlockBidiagonalOperator(blocks).mv(update)


# The damping parameter of the first rejection, relative to the unit diagonal of `L`.
_FIRST_DAMPING = 1e-2
# Beyond this every finite trial is accepted: the steps are then tiny, and the
# iteration must not stall.
_MAX_DAMPING = 1e10
# Below this the damping is switched off: the steps are Newton's again.
_MIN_DAMPING = 1e-6


class LevenbergMarquardtState(eqx.Module):
    """The state of [`deer_diffrax.LevenbergMarquardt`][] between Newton steps.

    **Arguments:** (built by the strategy, not by hand)

    - `damping`: the parameter `lambda` of the next step (`0`: a Newton step).
    - `growth`: the factor `lambda` grows by at the next rejection.
    - `merit`: `|F|^2` at the point the last step started from.
    - `predicted_merit`: `|F - L dY|^2` for the last step: what the linearisation
        predicted at the trial.
    """

    damping: Float[Array, ""]
    growth: Float[Array, ""]
    merit: Float[Array, ""]
    predicted_merit: Float[Array, ""]


class LevenbergMarquardt(AbstractDamping):
    """Levenberg-Marquardt steps with a self-adapting parameter (the idea of ELK,
    Gonzalez et al., 2024), solved in parallel over time.

    Each step minimises `|F - L dY|^2 + lambda |dY|^2` over the update `dY`, where
    `F` is the residual and `L` its Jacobian: a Kalman smoother, computed by a
    prefix scan (whose elements carry covariances, so each combination costs
    several block products and two small solves) and a backward linear
    recurrence, both `O(log T)` deep. A trial is accepted only if it lowers `|F|^2`, the
    merit every such step decreases for small enough steps: so, unlike
    [`deer_diffrax.ShrinkBlocksDamping`][] and [`deer_diffrax.TrustRegion`][],
    which reject only residuals that overflow or grow sharply, it also acts where
    the iterates stay bounded but Newton's updates do not settle (recurrent cells
    whose state saturates). `lambda` follows Nielsen's rule: it starts at 0 (plain
    Newton steps) and, on an accepted trial, shrinks by a factor between 3 and 1
    depending on how well the linearisation predicted the decrease (to 0 below
    `1e-6`); on a rejected one it grows by a factor that doubles with every
    rejection in a row (from `1e-2` if it was 0). Beyond `1e10` any finite trial
    is accepted. A non-finite update is discarded and `lambda` raised.

    The price: Newton's iterates may raise the merit on their way to the root (the
    exact prefix of the trajectory grows every step even when the rest moves
    wildly), and here such a step is rejected and damped, so where plain Newton
    converges this can take more iterations. A damped step does not use the Newton
    solver's `linear_solver` (its scans run on one device); an undamped one does.

    Measured (`benchmarks/hard_panel.py`'s windows, float64, 200 iterations; see
    "Choosing options"): with `jacobian="full"` it solved Lotka-Volterra over 20
    time units (85 iterations; [`deer_diffrax.TrustRegion`][] 29) and the MLP
    field (155; plain Newton 7), but not Van der Pol (`mu = 1`, `10`) or Kepler,
    which `TrustRegion` solves; on the saturating GRU and tanh RNN scans the merit
    fell at almost every step, but slowly, and none converged (nor with a fixed
    `lambda` of `0.01` to `1`, as ELK uses). With `jacobian="diagonal"` it
    solved none of the five ODE windows: a quasi-Newton step need not lower the
    merit, so the strict test stalls. Where no trial was rejected (the GRU with
    weights x4) it took the same iterations as plain Newton in both modes. Prefer
    `TrustRegion`; this strategy is the Levenberg-Marquardt reference point, and
    `deer_diffrax.levenberg_marquardt_step` its parallel solve.

    **Arguments:** none.
    """

    may_reject: ClassVar[bool] = True

    def init(self, dtype) -> LevenbergMarquardtState:
        return LevenbergMarquardtState(
            damping=jnp.array(0.0, dtype),
            growth=jnp.array(2.0, dtype),
            merit=jnp.array(jnp.inf, dtype),
            predicted_merit=jnp.array(jnp.inf, dtype),
        )

    def _raised(self, state: LevenbergMarquardtState) -> LevenbergMarquardtState:
        damping = jnp.maximum(state.damping * state.growth, _FIRST_DAMPING)
        return eqx.tree_at(
            lambda s: (s.damping, s.growth),
            state,
            (jnp.minimum(damping, 2 * _MAX_DAMPING), 2 * state.growth),
        )

    def judge(
        self, state, first, trial_norm, trial_finite, anchor_norm, trial_residual
    ):
        del trial_norm, anchor_norm
        merit = jnp.sum(jnp.abs(trial_residual) ** 2).astype(state.merit.dtype)
        decrease = state.merit - merit
        accept = trial_finite & (
            first | (decrease > 0) | (state.damping > _MAX_DAMPING)
        )
        # Nielsen's update from the gain ratio: actual over predicted decrease.
        predicted = state.merit - state.predicted_merit
        ratio = jnp.where(predicted > 0, decrease / predicted, 0)
        factor = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
        relaxed = state.damping * factor
        relaxed = jnp.where(relaxed < _MIN_DAMPING, 0, relaxed)
        accepted = eqx.tree_at(
            lambda s: (s.damping, s.growth),
            state,
            (relaxed.astype(state.damping.dtype), jnp.array(2.0, state.growth.dtype)),
        )
        judged = jax.tree.map(
            lambda a, r: jnp.where(accept, a, r), accepted, self._raised(state)
        )
        return accept, judged

    def damp(self, state, blocks):
        return blocks

    def update(self, state, start, blocks, residual, linear_solver):
        # Undamped, the step is Newton's: solved by the Newton solver's own scan,
        # exactly and more cheaply.
        update = jax.lax.cond(
            state.damping == 0,
            lambda: (
                lx.linear_solve(
                    BlockBidiagonalOperator(blocks),
                    residual,
                    linear_solver,
                    throw=False,
                ).value
            ),
            lambda: levenberg_marquardt_step(blocks, residual, state.damping),
        )
        merit = jnp.sum(jnp.abs(residual) ** 2)
        predicted = jnp.sum(jnp.abs(linearised_residual(blocks, residual, update)) ** 2)
        new_state = eqx.tree_at(
            lambda s: (s.merit, s.predicted_merit),
            state,
            (merit.astype(state.merit.dtype), predicted.astype(state.merit.dtype)),
        )
        return update, start - update, new_state

    def after_update(self, state, update_finite):
        return jax.tree.map(
            lambda kept, raised: jnp.where(update_finite, kept, raised),
            state,
            self._raised(state),
        )

    def is_undamped(self, state):
        return state.damping == 0
