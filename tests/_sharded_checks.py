"""Checks of the time-sharded solver on several devices, run by `test_sharding.py` in
a fresh process: the number of host devices must be forced before JAX starts, and
the test session has started it already.

Run as `XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_ENABLE_X64=1
python tests/_sharded_checks.py`; it prints one JSON object mapping each check's name
to its measurements (relative differences to the single-device result), or to
`{"error": traceback}`.
"""

import json
import sys
import time
import traceback

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np

import deer_diffrax


NUM_DEVICES = 4
T = 64
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def relative(a, b):
    """max |a - b| / max |b| over all leaves."""
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
    scales = jax.tree.leaves(jax.tree.map(lambda y: jnp.max(jnp.abs(y)), b))
    return float(max(diffs) / max(max(scales), 1e-300))


def time_mesh():
    return jax.sharding.Mesh(jax.devices(), ("time",))


def random_system(key, num_times, size, diagonal, complex_):
    kb, kr, kbi, kri = jr.split(key, 4)
    shape = (num_times, size) if diagonal else (num_times, size, size)
    # Blocks of norm about 0.9: products over the whole time axis neither vanish
    # nor overflow, so every block matters.
    scale = 0.9 if diagonal else 0.9 / jnp.sqrt(size)
    blocks = scale * jr.normal(kb, shape)
    rhs = jr.normal(kr, (num_times, size))
    if complex_:
        blocks = (blocks + 1j * scale * jr.normal(kbi, shape)) / jnp.sqrt(2)
        rhs = rhs + 1j * jr.normal(kri, (num_times, size))
    return blocks, rhs


@check
def recurrence_vs_single_device():
    mesh = time_mesh()

    @jax.jit
    def solve(blocks, rhs):
        sharded = deer_diffrax.sharded_linear_recurrence(blocks, rhs, mesh)
        return sharded, deer_diffrax.solve_linear_recurrence(blocks, rhs)

    out = {}
    for diagonal in (False, True):
        for complex_ in (False, True):
            key = jr.key(10 * diagonal + complex_)
            blocks, rhs = random_system(key, T, 3, diagonal, complex_)
            name = ("diagonal" if diagonal else "dense") + (
                "_complex" if complex_ else "_real"
            )
            # blocks[0] is unused: a NaN there must not reach the solution.
            sharded, expected = solve(blocks.at[0].set(jnp.nan), rhs)
            out[name] = relative(sharded, expected)
            out[name + "_dtype_kept"] = sharded.dtype == rhs.dtype
            out[name + "_split_over_time"] = sharded.sharding.spec[0] == "time"
            operator = deer_diffrax.BlockBidiagonalOperator(blocks)
            dense = jnp.linalg.solve(operator.as_matrix(), rhs.reshape(-1))
            out[name + "_vs_dense"] = relative(sharded.reshape(-1), dense)
    return out


@check
def transpose_solve():
    # The backward recurrence of reverse-mode autodiff, against the single-device
    # solver and against a dense solve.
    mesh = time_mesh()
    out = {}
    for diagonal, complex_ in ((False, True), (True, False)):
        if True:
            blocks, rhs = random_system(jr.key(5), T, 3, diagonal, complex_)
            name = ("diagonal" if diagonal else "dense") + (
                "_complex" if complex_ else "_real"
            )
            operator = deer_diffrax.BlockBidiagonalOperator(blocks).transpose()
            sharded = lx.linear_solve(
                operator, rhs, deer_diffrax.ShardedScanSolver(mesh)
            ).value
            single = lx.linear_solve(
                operator, rhs, deer_diffrax.AssociativeScanSolver()
            ).value
            dense = jnp.linalg.solve(operator.as_matrix(), rhs.reshape(-1))
            out[name] = relative(sharded, single)
            out[name + "_vs_dense"] = relative(sharded.reshape(-1), dense)
    return out


@check
def bad_length():
    mesh = time_mesh()
    blocks, rhs = random_system(jr.key(0), 30, 2, diagonal=False, complex_=False)
    messages = {}
    try:
        deer_diffrax.sharded_linear_recurrence(blocks, rhs, mesh)
    except ValueError as error:
        messages["recurrence"] = str(error)
    try:
        lx.linear_solve(
            deer_diffrax.BlockBidiagonalOperator(blocks),
            rhs,
            deer_diffrax.ShardedScanSolver(mesh),
        )
    except ValueError as error:
        messages["solver"] = str(error)
    return messages


def _pendulum(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - args * y[1]])


_WINDOW = 1.0
_SUBSTEPS = 64
_WINDOW_ENDS = jnp.arange(1, 5) * _WINDOW


def _solve(solver, y0, args, t1=4 * _WINDOW, dt0=_WINDOW):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_pendulum),
        solver,
        t0=0.0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(ts=_WINDOW_ENDS),
        max_steps=1000,
    ).ys


def _deer(linear_solver=None, **kwargs):
    return deer_diffrax.DeerSolver(
        diffrax.Tsit5(),
        num_substeps=_SUBSTEPS,
        linear_solver=linear_solver,
        **kwargs,
    )


Y0 = jnp.array([2.5, 0.0])
DAMPING = 0.1


@check
def deer_solver():
    # The solution and its gradients with respect to y0 and args, from one
    # compilation per solver.
    def loss(y0, args, solver):
        ys = _solve(solver, y0, args)
        return jnp.sum(ys[-1] ** 2) + jnp.sum(jnp.sin(ys[:, 0])), ys

    value_and_grad = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2
    )
    (_, single), single_grads = value_and_grad(Y0, DAMPING, _deer())
    sharded_solver = _deer(deer_diffrax.ShardedScanSolver(time_mesh()))
    (_, sharded), sharded_grads = value_and_grad(Y0, DAMPING, sharded_solver)
    sequential = _solve(diffrax.Tsit5(), Y0, DAMPING, dt0=_WINDOW / _SUBSTEPS)
    return {
        "solution_vs_single_device": relative(sharded, single),
        "solution_vs_sequential": relative(sharded, sequential),
        "grad_y0_vs_single_device": relative(sharded_grads[0], single_grads[0]),
        "grad_args_vs_single_device": relative(sharded_grads[1], single_grads[1]),
    }


@check
def deer_solver_under_vmap():
    # Also with the explicit axes that `jax.make_mesh` gives by default.
    mesh = jax.make_mesh((NUM_DEVICES,), ("time",))
    y0s = jnp.stack([Y0, jnp.array([1.0, 0.5]), jnp.array([-2.0, 1.0])])
    solve = lambda solver, dt0: jax.vmap(
        lambda y0: _solve(solver, y0, DAMPING, dt0=dt0)
    )(y0s)
    sequential = solve(diffrax.Tsit5(), _WINDOW / _SUBSTEPS)
    sharded = solve(_deer(deer_diffrax.ShardedScanSolver(mesh)), _WINDOW)
    return {"batch_vs_sequential": relative(sharded, sequential)}


@check
def recurrent_scan():
    size, num_inputs = 4, 2
    kw, ku, kx, kh = jr.split(jr.key(7), 4)
    w = 0.8 * jr.normal(kw, (size, size)) / jnp.sqrt(size)
    u = jr.normal(ku, (size, num_inputs))
    xs = jr.normal(kx, (2 * T, num_inputs))
    h0 = 0.5 * jr.normal(kh, (size,))

    def cell(h, x):
        return jnp.tanh(w @ h + u @ x)

    def step(h, x):
        h = cell(h, x)
        return h, h

    solver = deer_diffrax.ShardedScanSolver(time_mesh())

    def loss(h0, scan):
        states = scan(h0)
        return jnp.sum(jnp.cos(states)), states

    value_and_grad = jax.value_and_grad(loss, has_aux=True)
    (_, expected), grad_expected = value_and_grad(
        h0, lambda h: jax.lax.scan(step, h, xs)[1]
    )
    (_, states), grad_sharded = value_and_grad(
        h0, lambda h: deer_diffrax.scan(step, h, xs, linear_solver=solver)[1]
    )
    return {
        "states": relative(states, expected),
        "grad_h0": relative(grad_sharded, grad_expected),
    }


@check
def two_dimensional_mesh():
    # A ("batch", "time") mesh: the time axis is split over "time" (chosen by
    # default) and replicated over "batch".
    devices = np.array(jax.devices()).reshape(2, NUM_DEVICES // 2)
    mesh = jax.sharding.Mesh(devices, ("batch", "time"))
    blocks, rhs = random_system(jr.key(9), T, 3, diagonal=False, complex_=False)
    solver = deer_diffrax.ShardedScanSolver(mesh)
    operator = deer_diffrax.BlockBidiagonalOperator(blocks)
    expected = jax.jit(deer_diffrax.solve_linear_recurrence)(blocks, rhs)
    return {
        "axis_name": solver.axis_name,
        "forward": relative(lx.linear_solve(operator, rhs, solver).value, expected),
    }


@check
def inside_set_mesh():
    # Inside `jax.set_mesh` with explicit axes, shardings are part of array types.
    mesh = jax.make_mesh((NUM_DEVICES,), ("time",))
    blocks, rhs = random_system(jr.key(11), T, 3, diagonal=False, complex_=False)
    out = {}
    with jax.set_mesh(mesh):
        for lower in (True, False):
            operator = deer_diffrax.BlockBidiagonalOperator(blocks, lower=lower)
            sharded = lx.linear_solve(
                operator, rhs, deer_diffrax.ShardedScanSolver(mesh)
            ).value
            single = lx.linear_solve(
                operator, rhs, deer_diffrax.AssociativeScanSolver()
            ).value
            out["lower" if lower else "upper"] = relative(sharded, single)
    return out


def main(names):
    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    assert jnp.zeros(()).dtype == jnp.float64
    results = {}
    for name in names or CHECKS:
        start = time.process_time()
        try:
            results[name] = CHECKS[name]()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["cpu_seconds"] = time.process_time() - start
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
