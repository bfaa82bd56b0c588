"""Dense output of a DEER window: the base interpolation, substep by substep."""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree, Real


RealScalarLike = float | int | ArrayLike


class DeerInterpolation(diffrax.AbstractLocalInterpolation):
    """Interpolates inside one DEER window by locating the substep that contains
    `t` and evaluating the base solver's own local interpolation there, so dense
    output matches the sequential solver's.

    Built by Diffrax through [`deer_diffrax.DeerSolver`][]'s `interpolation_cls`
    (a [`deer_diffrax.DeerInterpolationFactory`][]), not by hand.

    **Arguments:**

    - `t0`, `t1`: the window's start and end.
    - `ts`: the substep times, `num_substeps + 1` of them (the inactive substeps at
        the end have zero length).
    - `num_active`: the substeps that advance time (a whole number, stored in the
        times' dtype).
    - `infos`: the base solver's dense information of every substep, stacked along
        a leading axis.
    - `base_interpolation_cls`: the base solver's local interpolation class.
    """

    t0: RealScalarLike
    t1: RealScalarLike
    ts: Real[Array, " substeps_plus_1"]
    num_active: Real[Array, ""]
    infos: PyTree[Array]
    base_interpolation_cls: type[diffrax.AbstractLocalInterpolation] = eqx.field(
        static=True
    )

    def evaluate(
        self, t0: RealScalarLike, t1: RealScalarLike | None = None, left: bool = True
    ) -> PyTree[Array]:
        if t1 is not None:
            return jtu.tree_map(
                lambda a, b: a - b,
                self.evaluate(t1, left=left),
                self.evaluate(t0, left=left),
            )
        # `left`: at a substep boundary, take the substep that ends there. Never an
        # inactive (zero-length) substep.
        side = "left" if left else "right"
        index = jnp.searchsorted(self.ts, t0, side=side) - 1
        index = jnp.clip(index, 0, self.num_active.astype(index.dtype) - 1)
        info = jtu.tree_map(lambda x: x[index], self.infos)
        local = self.base_interpolation_cls(
            t0=self.ts[index], t1=self.ts[index + 1], **info
        )
        return local.evaluate(t0, left=left)


class DeerInterpolationFactory(eqx.Module):
    """What Diffrax calls to build a [`deer_diffrax.DeerInterpolation`][] for each
    window (`DeerSolver.interpolation_cls`). A module rather than a class made on the
    fly, so that solutions with dense output pickle and compare equal.

    **Arguments:**

    - `base_interpolation_cls`: the base solver's local interpolation class.
    """

    base_interpolation_cls: type[diffrax.AbstractLocalInterpolation] = eqx.field(
        static=True
    )

    def __call__(self, *, t0, t1, ts, num_active, infos) -> DeerInterpolation:
        return DeerInterpolation(
            t0=t0,
            t1=t1,
            ts=ts,
            num_active=num_active,
            infos=infos,
            base_interpolation_cls=self.base_interpolation_cls,
        )
