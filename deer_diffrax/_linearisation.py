"""Where a Newton step's Jacobian blocks come from."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
from jaxtyping import Array, PyTree

from ._jacobian import AbstractJacobianMode, dense_restriction


# The most numbers of dense per-step Jacobians formed at once for a mode that keeps
# only part of them (64 MiB in float32).
_DENSE_BUDGET = 2**24


def step_values_and_blocks(
    step: Callable[[Array, Any], Array],
    previous: Array,
    per_step: Any,
    restrict: Callable[[Array], Array],
) -> tuple[Array, Array]:
    """Every step's value `step(previous[i], per_step[i])` and `restrict` of its
    exact Jacobian in the first argument: one forward-mode Jacobian per step (`n`
    JVPs, batched over the steps), with `step` evaluated once for both. What a
    `StepwiseLinearisation` of a one-step recurrence computes.

    **Arguments:**

    - `step`: the step map, `(h, p) -> h'` on flat `(n,)` states.
    - `previous`: the states the steps start from, `(T, n)`.
    - `per_step`: a pytree of the steps' other inputs, leading axis `T`.
    - `restrict`: what to keep of each dense `(n, n)` Jacobian (a Jacobian mode's
        `restrict`).

    **Returns:** the values `(T, n)` and the restricted Jacobians.
    """

    def value_and_blocks(inputs):
        h, p = inputs

        def with_value(_h):
            out = step(_h, p)
            return out, out

        jacobian, value = jax.jacfwd(with_value, has_aux=True)(h)
        return restrict(jacobian), value

    num_steps, size = previous.shape
    kept = jax.eval_shape(restrict, jax.ShapeDtypeStruct((size, size), previous.dtype))
    if kept.size < size * size and num_steps * size * size > _DENSE_BUDGET:
        # The mode keeps less than the dense Jacobians (diagonal, block-diagonal):
        # form those a batch of steps at a time, so that they never take more than
        # the budget at once, as the mode's memory promises.
        batch = max(1, _DENSE_BUDGET // (size * size))
        blocks, values = jax.lax.map(
            value_and_blocks, (previous, per_step), batch_size=batch
        )
    else:
        blocks, values = jax.vmap(value_and_blocks)((previous, per_step))
    return values, blocks


class AbstractLinearisation(eqx.Module):
    """How [`deer_diffrax.DeerNewton`][] linearises the residual `F(Y)` at an
    iterate: it returns the residual there and a linear map whose Jacobian blocks
    (read off by the [`deer_diffrax.AbstractJacobianMode`][]) are the Newton
    step's.

    Two properties matter to the iteration:

    - `exact` (class variable): the linear map is the Jacobian of `F` itself. Only
        then is an undamped full Newton update a measure of the iterate's error;
        otherwise the iteration is quasi-Newton and ends with one exact check.
    - `safe_at_trials`: the linearisation may be taken at any finite trial iterate,
        including wild ones that damping will reject. Then each trial is linearised
        once (one pass per iteration; a rejected trial costs the next iteration's
        linearisation of the last accepted iterate, or nothing for a damping that
        reuses its update); else the trial is first judged on its residual and only
        the accepted point is linearised (two passes).

    **Arguments:** none here; subclasses define their own.
    """

    exact: ClassVar[bool]
    safe_at_trials: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def linearise(
        self, fn: Callable[[Array, Any], tuple[Array, PyTree]], y: Array, args: Any
    ) -> tuple[Array, PyTree, Callable[[Array], Array]]:
        """Linearise the residual at `y`.

        **Arguments:**

        - `fn`: the residual, `(Y, args) -> (F(Y), aux)`.
        - `y`: the iterate, shape `(T, n)`.
        - `args`: passed to `fn`.

        **Returns:** `F(y)`, the aux output of `fn` at `y`, and the linear map
        `dY -> J dY` whose blocks the step uses.
        """

    def residual_and_blocks(
        self,
        fn: Callable[[Array, Any], tuple[Array, PyTree]],
        y: Array,
        args: Any,
        jacobian: AbstractJacobianMode,
        struct: jax.ShapeDtypeStruct,
    ) -> tuple[Array, PyTree, Array]:
        """The residual at `y`, the aux output of `fn`, and the Newton blocks there
        in the layout of `jacobian`. By default, `jacobian` reads the blocks off
        `linearise`; a linearisation that can produce them more directly overrides
        this."""
        residual, aux, linear_fn = self.linearise(fn, y, args)
        return residual, aux, jacobian.blocks(linear_fn, struct)

    def closure_convert(
        self, y: Array, args: Any, jacobian: AbstractJacobianMode
    ) -> "AbstractLinearisation":
        """This linearisation with any tracers that its own functions close over
        (the parameters of a model being differentiated, say) made leaves of its
        pytree, as `solve_trajectory` does for the residual: the Newton solve is a
        custom derivative, which must not capture tracers of an enclosing
        transformation. Called once per solve, with example arguments of the shapes
        its functions will be called with. By default there is nothing to convert.
        """
        del y, args, jacobian
        return self


class ResidualLinearisation(AbstractLinearisation):
    """The exact Jacobian of the residual, by `jax.linearize` (residual and
    tangent map from one pass).

    **Arguments:**

    - `safe_at_trials`: whether the residual can be linearised at any finite
        iterate. `True` for explicit one-step maps and recurrence cells; `False`
        (the default) where a substep is itself a root find (implicit base
        methods), whose own tangent solve can fail at a wild trial point.
    """

    safe_at_trials: bool = eqx.field(static=True, default=False)
    exact: ClassVar[bool] = True

    def linearise(self, fn, y, args):
        residual, linear_fn, aux = jax.linearize(
            lambda _y: fn(_y, args), y, has_aux=True
        )
        return residual, aux, linear_fn


class SurrogateLinearisation(AbstractLinearisation):
    """The Jacobian of a cheaper function with the same block-bidiagonal structure
    as the residual (for `DeerSolver(linearise="vector_field")`, the residual of an
    Euler step of the same vector field). The residual itself is only evaluated,
    so the iteration is quasi-Newton with the residual's root.

    **Arguments:**

    - `fn`: the surrogate, `(Y, args) -> G(Y)`, whose Jacobian approximates the
        residual's. It must be safe to linearise at any finite iterate.
    """

    fn: Callable[[Array, Any], Array]
    exact: ClassVar[bool] = False
    safe_at_trials: ClassVar[bool] = True

    def linearise(self, fn, y, args):
        residual, aux = fn(y, args)
        _, linear_fn = jax.linearize(lambda _y: self.fn(_y, args), y)
        return residual, aux, linear_fn

    def closure_convert(self, y, args, jacobian):
        del jacobian
        converted = eqx.filter_closure_convert(self.fn, y, args)
        return eqx.tree_at(lambda lin: lin.fn, self, converted)


class StepwiseLinearisation(AbstractLinearisation):
    """The exact Jacobian of the residual, with blocks computed step by step by a
    given function (for `deer_diffrax.scan`, `jax.jacfwd` of the cell batched over
    time), instead of probing a linearisation of the whole trajectory `n` times:
    the same blocks, without storing the linearisation (measured 2-5x faster per
    iteration for a GRU cell on CPU). Jacobian modes that can take their blocks
    from dense ones (`AbstractJacobianMode.restrict`: full,
    diagonal, block-diagonal) get them this way; the others probe the residual's
    linearisation, as [`deer_diffrax.ResidualLinearisation`][] does.

    **Arguments:**

    - `residual_and_step_blocks`: `(Y, args, restrict) -> (F(Y), blocks)`, the
        residual (without aux output) and `restrict` applied to each step's exact
        dense Jacobian `J_i`. It is called with more than one `restrict` (a
        quasi-Newton solve ends with a full step), so it is not closure-converted:
        it must take what it depends on through `args`, not close over tracers.
    - `safe_at_trials`: as for [`deer_diffrax.ResidualLinearisation`][].
    """

    residual_and_step_blocks: Callable[
        [Array, Any, Callable[[Array], Array]], tuple[Array, Array]
    ]
    safe_at_trials: bool = eqx.field(static=True, default=False)
    exact: ClassVar[bool] = True

    def linearise(self, fn, y, args):
        return ResidualLinearisation(self.safe_at_trials).linearise(fn, y, args)

    def residual_and_blocks(self, fn, y, args, jacobian, struct):
        restrict = dense_restriction(jacobian, struct.shape[-1], struct.dtype)
        if restrict is None:
            return super().residual_and_blocks(fn, y, args, jacobian, struct)
        residual, blocks = self.residual_and_step_blocks(y, args, restrict)
        return residual, None, blocks
