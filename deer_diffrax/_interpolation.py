"""Dense output of a DEER window: the base interpolation, substep by substep."""

import functools as ft
from typing import ClassVar

import diffrax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree, Real


RealScalarLike = float | int | ArrayLike


class DeerInterpolation(diffrax.AbstractLocalInterpolation):
    """Interpolates inside one DEER window by locating the substep that contains
    `t` and evaluating the base solver's own local interpolation there, so dense
    output matches the sequential solver's.

    Use [`deer_diffrax.DeerSolver`][]'s `interpolation_cls`, which fixes the base
    interpolation class; this class is not built by hand.

    **Arguments:**

    - `t0`, `t1`: the window's start and end.
    - `ts`: the substep times, `num_substeps + 1` of them.
    - `infos`: the base solver's dense information of every substep, stacked along
        a leading axis.
    """

    t0: RealScalarLike
    t1: RealScalarLike
    ts: Real[Array, " substeps_plus_1"]
    infos: PyTree[Array]

    base_interpolation_cls: ClassVar[type[diffrax.AbstractLocalInterpolation]]

    def evaluate(
        self, t0: RealScalarLike, t1: RealScalarLike | None = None, left: bool = True
    ) -> PyTree[Array]:
        if t1 is not None:
            return jtu.tree_map(
                lambda a, b: a - b,
                self.evaluate(t1, left=left),
                self.evaluate(t0, left=left),
            )
        num_substeps = self.ts.shape[0] - 1
        # `left`: at a substep boundary, take the substep that ends there.
        side = "left" if left else "right"
        index = jnp.searchsorted(self.ts, t0, side=side) - 1
        index = jnp.clip(index, 0, num_substeps - 1)
        info = jtu.tree_map(lambda x: x[index], self.infos)
        local = self.base_interpolation_cls(
            t0=self.ts[index], t1=self.ts[index + 1], **info
        )
        return local.evaluate(t0, left=left)


@ft.cache
def deer_interpolation_cls(base_cls) -> type[DeerInterpolation]:
    """The `DeerInterpolation` subclass that delegates to `base_cls` (one class per
    base interpolation, so that Diffrax sees a stable, hashable class)."""
    return type(
        f"DeerInterpolation_{base_cls.__name__}",
        (DeerInterpolation,),
        {"base_interpolation_cls": base_cls, "__module__": __name__},
    )
