"""`ShardedScanSolver` and `sharded_linear_recurrence`: the time axis split over
devices, against the single-device solvers.

The multi-device checks live in `_sharded_checks.py` and run in one fresh process on
4 forced CPU host devices (the device count is fixed when JAX starts, and this
process has started it already). Each test below asserts on one of its results.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import pytest
from helpers import max_relative_difference

import deer_diffrax


CHECKS = pathlib.Path(__file__).with_name("_sharded_checks.py")
RTOL = 1e-10  # linear solves: both are exact up to rounding (observed ~5e-16)


@pytest.fixture(scope="module")
def results():
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4".strip(),
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
    }
    process = subprocess.run(
        [sys.executable, str(CHECKS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-5000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def _result(results, name):
    result = results[name]
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize(
    "blocks", ["dense_real", "dense_complex", "diagonal_real", "diagonal_complex"]
)
def test_recurrence(results, blocks):
    # T = 64 on 4 devices; blocks[0] is NaN for the scans and must be ignored.
    result = _result(results, "recurrence_vs_single_device")
    assert result[blocks] <= RTOL
    assert result[blocks + "_vs_dense"] <= RTOL
    assert result[blocks + "_dtype_kept"]
    assert result[blocks + "_split_over_time"]


@pytest.mark.parametrize("blocks", ["dense_complex", "diagonal_real"])
def test_transpose_solve(results, blocks):
    result = _result(results, "transpose_solve")
    assert result[blocks] <= RTOL
    assert result[blocks + "_vs_dense"] <= RTOL


@pytest.mark.parametrize("where", ["recurrence", "solver"])
def test_length_not_divisible_by_devices(results, where):
    message = _result(results, "bad_length")[where]
    assert "length 30" in message and "4 devices" in message


def test_deer_solver(results):
    # Damped pendulum, 4 windows of 64 Tsit5 substeps.
    result = _result(results, "deer_solver")
    assert result["solution_vs_single_device"] <= 1e-9
    assert result["solution_vs_sequential"] <= 1e-9
    assert result["grad_y0_vs_single_device"] <= 1e-8
    assert result["grad_args_vs_single_device"] <= 1e-8


def test_deer_solver_under_vmap(results):
    assert _result(results, "deer_solver_under_vmap")["batch_vs_sequential"] <= 1e-9


def test_recurrent_scan(results):
    result = _result(results, "recurrent_scan")
    assert result["states"] <= 1e-9
    assert result["grad_h0"] <= 1e-8


def test_two_dimensional_mesh(results):
    result = _result(results, "two_dimensional_mesh")
    assert result["axis_name"] == "time"
    assert result["forward"] <= RTOL


@pytest.mark.parametrize("direction", ["lower", "upper"])
def test_inside_set_mesh(results, direction):
    assert _result(results, "inside_set_mesh")[direction] <= RTOL


# In this process: a mesh of one device.


def _one_device_mesh(name="time"):
    return jax.sharding.Mesh(jax.devices()[:1], (name,))


@pytest.mark.parametrize("diagonal, lower", [(False, True), (True, False)])
def test_one_device_mesh(diagonal, lower):
    kb, kr = jr.split(jr.key(0))
    shape = (37, 3) if diagonal else (37, 3, 3)
    operator = deer_diffrax.BlockBidiagonalOperator(
        0.5 * jr.normal(kb, shape), lower=lower
    )
    rhs = jr.normal(kr, (37, 3))
    solver = deer_diffrax.ShardedScanSolver(_one_device_mesh())
    sharded = lx.linear_solve(operator, rhs, solver).value
    single = lx.linear_solve(operator, rhs, deer_diffrax.AssociativeScanSolver()).value
    assert max_relative_difference(sharded, single) <= RTOL
    if lower:
        recurrence = jax.jit(deer_diffrax.sharded_linear_recurrence, static_argnums=2)
        direct = recurrence(operator.blocks, rhs, _one_device_mesh())
        assert max_relative_difference(direct, single) <= RTOL


def test_default_axis_name():
    assert deer_diffrax.ShardedScanSolver(_one_device_mesh("x")).axis_name == "x"


def test_bad_arguments():
    with pytest.raises(ValueError, match="no axis named 'time'"):
        deer_diffrax.ShardedScanSolver(_one_device_mesh("x"), axis_name="time")
    with pytest.raises(ValueError, match="needs a `jax.sharding.Mesh`"):
        deer_diffrax.ShardedScanSolver(jax.devices())
    operator = lx.MatrixLinearOperator(jnp.eye(4))
    with pytest.raises(ValueError, match="unit block-bidiagonal"):
        lx.linear_solve(
            operator, jnp.ones(4), deer_diffrax.ShardedScanSolver(_one_device_mesh())
        )
