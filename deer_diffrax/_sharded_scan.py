"""The linear recurrence of a Newton step with its time axis split over devices."""

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Inexact

from ._operator import dense_blocks
from ._scan_solve import (
    AbstractBidiagonalScanSolver,
    compose_affine,
    ScanState,
    shift_transposed,
)


def _default_axis_name(mesh: Mesh) -> str:
    return "time" if "time" in mesh.axis_names else mesh.axis_names[0]


def _auto_axes(mesh: Mesh) -> Mesh:
    # With explicit axes (`jax.make_mesh`'s default) shardings become part of the
    # array types, and every slice and concatenation of the time axis in the rest of
    # the library would have to respect them. Use the same devices with automatic
    # axes, and leave the layout of everything around the scan to XLA.
    if all(kind == AxisType.Auto for kind in mesh.axis_types):
        return mesh
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _check_axis(mesh: Mesh, axis_name: str) -> None:
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"The mesh has no axis named {axis_name!r}; its axes are "
            f"{mesh.axis_names}. Pass one of them as `axis_name`."
        )


def _check_mesh(num_times: int, mesh: Mesh, axis_name: str) -> int:
    _check_axis(mesh, axis_name)
    num_devices = mesh.shape[axis_name]
    if num_times % num_devices != 0:
        raise ValueError(
            f"The time axis (length {num_times}) must split evenly over the "
            f"{num_devices} devices of mesh axis {axis_name!r}: choose a length "
            f"divisible by {num_devices} (for `DeerSolver`, `num_substeps`)."
        )
    return num_devices


def _apply(a, c):
    # x_i = A_i c + b_i needs A_i c for every local prefix map A_i.
    if a.ndim == c.ndim + 1:  # diagonal blocks: (t, n) times (n,)
        return a * c
    return jnp.einsum("tij,j->ti", a, c, precision=jax.lax.Precision.HIGHEST)


def _local_recurrence(blocks, rhs, *, axis_name: str, reverse: bool):
    num_devices = jax.lax.axis_size(axis_name)
    device = jax.lax.axis_index(axis_name)
    # The block coupling the (zero) initial condition is ignored, as in the
    # single-device scan: zero it so that it cannot reach the carries (an inf there
    # would otherwise turn into 0 * inf = nan).
    unused, total = (-1, 0) if reverse else (0, -1)
    owner = num_devices - 1 if reverse else 0
    blocks = blocks.at[unused].set(jnp.where(device == owner, 0, blocks[unused]))

    # Prefix maps of this device's chunk (suffix maps when reversed), each taking the
    # state entering the chunk to the state at that time step.
    a_prefix, b_prefix = jax.lax.associative_scan(
        compose_affine, (blocks, rhs), reverse=reverse
    )
    # The map of the whole chunk, from every device.
    a_total = jax.lax.all_gather(a_prefix[total], axis_name)
    b_total = jax.lax.all_gather(b_prefix[total], axis_name)

    # The state entering each chunk: run the D chunk maps one after another from the
    # zero initial condition (D is the number of devices: small).
    def chain(c, totals):
        a, b = totals
        return _apply(a[None], c)[0] + b, c

    zero = jnp.zeros_like(b_total[0])
    _, incoming = jax.lax.scan(chain, zero, (a_total, b_total), reverse=reverse)
    return _apply(a_prefix, incoming[device]) + b_prefix


def _explicit_context() -> bool:
    # Inside `jax.set_mesh(mesh)` for a mesh with explicit axes, shardings are part of
    # the array types.
    context = jax.sharding.get_abstract_mesh()
    return not context.empty and AxisType.Explicit in context.axis_types


def _sharded_recurrence(blocks, rhs, mesh: Mesh, axis_name: str, reverse: bool):
    _check_mesh(rhs.shape[0], mesh, axis_name)
    spec = PartitionSpec(axis_name)
    local = ft.partial(_local_recurrence, axis_name=axis_name, reverse=reverse)
    # The output is not replicated over `axis_name` (each device holds its own
    # chunk), which `check_vma` cannot see through the all-gathered carries.
    shard_map = ft.partial(
        jax.shard_map, in_specs=(spec, spec), out_specs=spec, check_vma=False
    )
    if _explicit_context():
        # Move the inputs onto the time-split layout, and give the solution the
        # layout of `rhs`, whose place it takes in the caller (a loop carry, say).
        rhs_layout = jax.typeof(rhs).sharding.spec
        blocks = jax.reshard(blocks, spec)
        rhs = jax.reshard(rhs, spec)
        solution = shard_map(local, mesh=mesh)(blocks, rhs)
        return jax.reshard(solution, rhs_layout)
    return shard_map(local, mesh=_auto_axes(mesh))(blocks, rhs)


def sharded_linear_recurrence(
    blocks: Inexact[Array, "T n n"] | Inexact[Array, "T n"],
    rhs: Inexact[Array, "T n"],
    mesh: Mesh,
    axis_name: str | None = None,
) -> Inexact[Array, "T n"]:
    """Solve `x_i = J_i x_{i-1} + r_i` (with `x_{-1} = 0`) with the time axis split
    over the devices of a mesh axis.

    Computes what [`deer_diffrax.solve_linear_recurrence`][] computes. Each of the `D`
    devices takes `T / D` consecutive time steps and runs an associative scan over
    them, giving the affine map from the state entering its chunk to every state in
    it. The `D` whole-chunk maps are then all-gathered, every device chains those of
    the devices before it to find the state entering its own chunk, and applies its
    maps to it. Communication is one all-gather of `D` blocks; the rest is local.

    **Arguments:**

    - `blocks`: the `J_i`, dense `(T, n, n)` or diagonal `(T, n)`; `blocks[0]` is
        unused.
    - `rhs`: the `r_i`, shape `(T, n)`.
    - `mesh`: the `jax.sharding.Mesh` of devices to split the time axis over.
    - `axis_name`: the mesh axis to split it over (default: the axis named `"time"`
        if there is one, else the mesh's first axis). `T` must be divisible by the
        number of devices along it. Other mesh axes hold replicas.

    **Returns:** the `x_i`, shape `(T, n)`.
    """
    if axis_name is None:
        axis_name = _default_axis_name(mesh)
    return _sharded_recurrence(blocks, rhs, mesh, axis_name, reverse=False)


class ShardedScanSolver(AbstractBidiagonalScanSolver):
    """[`deer_diffrax.AssociativeScanSolver`][] with the time axis split over several
    devices: solves `(I - L) x = r` for unit lower block-bidiagonal `I - L` (and its
    transpose) with [`deer_diffrax.sharded_linear_recurrence`][].

    Pass it as `linear_solver` to [`deer_diffrax.DeerSolver`][],
    [`deer_diffrax.scan`][] or [`deer_diffrax.DeerNewton`][]; it then solves both the
    Newton steps and the implicit-function-theorem system of the gradients. It
    accepts the same operators as `AssociativeScanSolver`. The transpose solve
    (reverse-mode autodiff) runs the recurrence backwards in time, still split over
    the devices.

    The number of time steps (for `DeerSolver`, `num_substeps`) must be divisible by
    the number of devices along the mesh axis. Each device does `O(T n^3 / D)` work
    for dense blocks (`O(T n / D)` for diagonal ones), plus `O(D n^3)` to chain the
    device carries.

    **Arguments:**

    - `mesh`: the `jax.sharding.Mesh` of devices, e.g.
        `jax.sharding.Mesh(jax.devices(), ("time",))`.
    - `axis_name`: the mesh axis the time axis is split over (default: the axis named
        `"time"` if there is one, else the mesh's first axis). Other mesh axes hold
        replicas.
    """

    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(self, mesh: Mesh, axis_name: str | None = None):
        if not isinstance(mesh, Mesh):
            raise ValueError(
                "`ShardedScanSolver` needs a `jax.sharding.Mesh`, e.g. "
                "`jax.sharding.Mesh(jax.devices(), ('time',))`; got "
                f"{type(mesh).__name__}."
            )
        if axis_name is None:
            axis_name = _default_axis_name(mesh)
        _check_axis(mesh, axis_name)
        self.mesh = mesh
        self.axis_name = axis_name

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        blocks, lower = super().init(operator, options)
        if blocks.ndim == 4:
            # The sharded chaining step is written for one block per time step:
            # block-diagonal Jacobians travel in their dense form (correct, not
            # cheaper).
            blocks = dense_blocks(blocks)
        _check_mesh(blocks.shape[0], self.mesh, self.axis_name)
        # Lineax lowers `compute` inside its own primitive, where `jax.jit` cannot
        # see the mesh and would compile for one device: placing the blocks on the
        # mesh here, outside it, tells it which devices the solve runs on (under
        # `jax.set_mesh` it knows already). It also lets XLA split the computation
        # of the blocks over time.
        if not _explicit_context():
            mesh = _auto_axes(self.mesh)
            time_split = NamedSharding(mesh, PartitionSpec(self.axis_name))
            blocks = jax.lax.with_sharding_constraint(blocks, time_split)
        return blocks, lower

    def compute(self, state: ScanState, vector, options):
        del options
        blocks, lower = state
        if lower:
            solution = _sharded_recurrence(
                blocks, vector, self.mesh, self.axis_name, reverse=False
            )
        else:
            # The backward recurrence x_i = J_{i+1}^T x_{i+1} + r_i, scanned from the
            # end in place (flipping a sharded array would move it between devices).
            solution = _sharded_recurrence(
                shift_transposed(blocks),
                vector,
                self.mesh,
                self.axis_name,
                reverse=True,
            )
        return solution, lx.RESULTS.successful, {}
