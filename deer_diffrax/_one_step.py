"""The one-step maps `Phi_i` that the Newton iteration evaluates over a whole window.

Newton needs only `y_{i-1} -> y_i` of each substep, many times per window; the error
estimate and dense-output coefficients of the base method are needed once, at the
converged trajectory. Diffrax's Runge-Kutta `step` computes everything and runs its
stages in a loop with buffers, which keeps XLA from fusing across stages and makes
forward-mode linearisation slow. For explicit Runge-Kutta methods (and Euler) the map
is therefore written out here, stage by stage, straight from the Butcher tableau; it
performs the same arithmetic as the base method's step, so the root of Newton's
residual is still the sequential trajectory (to rounding).
"""

from collections.abc import Callable, Sequence

import diffrax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree


def _combine(y: PyTree, coefficients: Sequence[float], ks: Sequence[PyTree]) -> PyTree:
    # y + sum_j a_j k_j, skipping the zero entries of the tableau (Dopri8 has many).
    pairs = [(float(a), k) for a, k in zip(coefficients, ks, strict=True) if a != 0]
    if not pairs:
        return y

    def leaf(y_leaf, *k_leaves):
        total = pairs[0][0] * k_leaves[0]
        for (a, _), k_leaf in zip(pairs[1:], k_leaves[1:], strict=True):
            total = total + a * k_leaf
        return y_leaf + total

    return jtu.tree_map(leaf, y, *[k for _, k in pairs])


def _explicit_rk_stages(tableau, terms, t0, t1, y0, args) -> list[PyTree]:
    control = terms.contr(t0, t1)
    dt = t1 - t0
    ks = [terms.vf_prod(t0, y0, args, control)]
    for c_i, a_i in zip(tableau.c, tableau.a_lower, strict=True):
        y_i = _combine(y0, a_i, ks)
        # As Diffrax does: a stage at the end of the step sits exactly on `t1`.
        t_i = t1 if c_i == 1 else t0 + float(c_i) * dt
        ks.append(terms.vf_prod(t_i, y_i, args, control))
    return ks


def euler_step(terms, t0, t1, y0, args):
    """One Euler step of `terms`: `y0 + vf_prod(t0, y0, args, contr(t0, t1))`."""
    control = terms.contr(t0, t1)
    return _combine(y0, [1.0], [terms.vf_prod(t0, y0, args, control)])


def one_step_map(
    base_solver: diffrax.AbstractSolver, with_outputs: bool = False
) -> Callable[..., PyTree] | None:
    """The base method's step `(terms, t0, t1, y0, args) -> y1` written out, or
    `None` where the base solver's own `step` must be used (implicit methods, whose
    stages are root finds, and other solvers).

    With `with_outputs=True` the function returns `(y1, y_error, dense_info)` as the
    base solver's `step` would (`y_error` is `None` for Euler), for an ODE term or any
    term whose vector field is cheap to contract (Diffrax then stores the stages as
    vector field-control products, as here).
    """
    if isinstance(base_solver, diffrax.AbstractERK):
        tableau = base_solver.tableau
        if tableau.c1 != 0 or len(tableau.c) != len(tableau.a_lower):
            return None

        def step(terms, t0, t1, y0, args):
            ks = _explicit_rk_stages(tableau, terms, t0, t1, y0, args)
            y1 = _combine(y0, tableau.b_sol, ks)
            if not with_outputs:
                return y1
            zero = jtu.tree_map(jnp.zeros_like, y0)
            y_error = _combine(zero, tableau.b_error, ks)
            stacked = jtu.tree_map(lambda *k: jnp.stack(k), *ks)
            return y1, y_error, dict(y0=y0, y1=y1, k=stacked)

        return step
    if type(base_solver) is diffrax.Euler:
        if not with_outputs:
            return euler_step

        def step_with_outputs(terms, t0, t1, y0, args):
            y1 = euler_step(terms, t0, t1, y0, args)
            return y1, None, dict(y0=y0, y1=y1)

        return step_with_outputs
    return None
