"""Newton's method on a whole trajectory, as an Optimistix root finder."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._jacobian import AbstractJacobianMode, FullJacobian
from ._operator import BlockBidiagonalOperator
from ._scan_solve import AssociativeScanSolver


class DeerNewtonState(eqx.Module):
    """State of [`deer_diffrax.DeerNewton`][] between iterations.

    - `residual_norm`: the scaled max-norm of the residual at the iterate the last
        step started from (`inf` before the first step); `<= 1` means converged.
    - `finite`: whether every residual and update so far was finite.
    - `num_steps`: the number of Newton steps taken.
    """

    residual_norm: Float[Array, ""]
    finite: Bool[Array, ""]
    num_steps: Int[Array, ""]


class DeerNewton(optx.AbstractRootFinder):
    """Newton's method for a residual `F(Y)_i = y_i - Phi_i(y_{i-1})` over a whole
    trajectory `Y` of shape `(T, n)`, whose Jacobian is unit lower block-bidiagonal.

    Each step linearises `F` once (`jax.linearize`: residual and Jacobian from the
    same pass), reads the blocks `J_i` off the linearisation (see
    [`deer_diffrax.AbstractJacobianMode`][]) and solves the linear recurrence
    `dy_i = J_i dy_{i-1} - F_i` with [`deer_diffrax.AssociativeScanSolver`][].

    Converged means the residual is small, `|F(Y)_i| <= atol + rtol |y_i|` for every
    entry: each substep then satisfies the base method's equation to within the same
    tolerance that a sequential solve's rounding would, independently of the length
    `T` (a criterion on the Newton update would have to grow with `T`). The returned
    iterate is the one after that final step, so with full Newton it is accurate to
    about the square of the tolerance.

    Non-finite residuals or updates stop the iteration with
    `RESULTS.nonlinear_divergence`; running out of steps gives
    `RESULTS.nonlinear_max_steps_reached`.
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    jacobian: AbstractJacobianMode = FullJacobian()

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, f_struct, aux_struct, tags
        return DeerNewtonState(
            residual_norm=jnp.array(jnp.inf, dtype=y.dtype),
            finite=jnp.array(True),
            num_steps=jnp.array(0),
        )

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        residual, linear_fn, aux = jax.linearize(
            lambda _y: fn(_y, args), y, has_aux=True
        )
        blocks = self.jacobian.blocks(linear_fn, jax.ShapeDtypeStruct(y.shape, y.dtype))
        operator = BlockBidiagonalOperator(blocks)
        update = lx.linear_solve(
            operator, residual, AssociativeScanSolver(), throw=False
        ).value
        new_y = y - update
        scale = self.atol + self.rtol * jnp.abs(y)
        residual_norm = self.norm(residual / scale)
        finite = (
            state.finite
            & jnp.all(jnp.isfinite(residual))
            & jnp.all(jnp.isfinite(update))
        )
        new_state = DeerNewtonState(
            residual_norm=residual_norm.astype(state.residual_norm.dtype),
            finite=finite,
            num_steps=state.num_steps + 1,
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        converged = state.residual_norm <= 1
        diverged = jnp.invert(state.finite)
        result = optx.RESULTS.where(
            diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        return converged | diverged, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, args, options, tags, result
        stats: dict[str, Any] = dict(
            residual_norm=state.residual_norm, num_newton_steps=state.num_steps
        )
        return y, aux, stats


DeerNewton.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: the residual tolerance, `|F(Y)_i| <= atol + rtol |y_i|` entrywise.
- `norm`: how the scaled residual is reduced to a scalar (default: max-norm).
- `jacobian`: the structure of the blocks used in the Newton step (default exact,
    [`deer_diffrax.FullJacobian`][]).
"""
