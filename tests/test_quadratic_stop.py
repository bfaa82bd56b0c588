"""Exact Newton stops one iteration early once its updates shrink quadratically, and
the answer and its gradient stay those of the sequential solve."""

import json
import os
import subprocess
import sys

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optimistix as optx
import pytest
from helpers import max_relative_difference

import deer_diffrax
from deer_diffrax._newton import _quadratic_estimate, DeerNewtonState
from deer_diffrax._operator import shift_in


def _state(norms, undamped_run=3, dtype=jnp.float64):
    older, previous, update = (jnp.array(x, dtype) for x in norms)
    zero = jnp.zeros((1, 1), dtype)
    return DeerNewtonState(
        residual_norm=jnp.array(1.0, dtype),
        update_norm=update,
        previous_update_norm=previous,
        older_update_norm=older,
        undamped_run=jnp.array(undamped_run),
        finite=jnp.array(True),
        num_steps=jnp.array(3),
        num_rejected=jnp.array(0),
        damping=None,
        anchor=zero,
        anchor_blocks=zero,
    )


def test_quadratic_estimate_reads_the_rate_off_three_updates():
    # u_(k+1) = 1e-12 u_k^2 exactly: the next update would be 1e-12 * (1e4)^2.
    estimate = _quadratic_estimate(_state([1e10, 1e8, 1e4]))
    assert float(estimate) == pytest.approx(1e-4, rel=1e-6)
    # Two rates that disagree (the older pair is linear, not quadratic): no estimate.
    assert float(_quadratic_estimate(_state([1e12, 1e8, 1e4]))) == float("inf")
    # Updates that do not shrink, or a damped step among the three: no estimate.
    assert float(_quadratic_estimate(_state([1e8, 1e10, 1e4]))) == float("inf")
    assert float(_quadratic_estimate(_state([1e10, 1e8, 1e4], 2))) == float("inf")
    # In float32 the squares of large updates overflow; the estimate must not turn
    # that into a zero (a false convergence).
    big = _quadratic_estimate(_state([1e36, 1e30, 1e26], dtype=jnp.float32))
    assert float(big) > 1e20


def test_gru_float64_stops_on_the_quadratic_estimate_with_exact_gradients():
    # The reference DEER task: a GRU of hidden size 8 over 1000 random inputs. Plain
    # Newton's updates (in units of the tolerance) go ~5e10, 5e9, 8e7, 2e4: the
    # fourth iteration's iterate is already within 1e-3 of the tolerance, and the
    # fifth, which only confirmed that, is skipped.
    cell = eqx.nn.GRUCell(4, 8, key=jr.key(0), dtype=jnp.float64)
    xs = jr.normal(jr.key(1), (1000, 4))

    def step(c):
        return lambda h, x: (c(x, h), c(x, h))

    (_, ys), stats = deer_diffrax.scan(step(cell), jnp.zeros(8), xs, return_stats=True)
    _, reference = jax.lax.scan(step(cell), jnp.zeros(8), xs)
    assert int(stats.num_newton_steps) == 4
    assert float(stats.error_estimate) <= 1
    assert max_relative_difference(ys, reference) <= 1e-13

    # A differentiated solve does not stop on the prediction (the iterate its last
    # step started from would be 4e-7 away, too far for the gradient's blocks) but
    # linearises once more there: the gradient stays exact to rounding.
    def loss(scan_fn, c):
        return jnp.sum(scan_fn(step(c), jnp.zeros(8), xs)[1] ** 2)

    grad = eqx.filter_grad(lambda c: loss(deer_diffrax.scan, c))(cell)
    grad_reference = eqx.filter_grad(lambda c: loss(jax.lax.scan, c))(cell)
    assert max_relative_difference(grad, grad_reference) <= 1e-12


def test_deer_solver_float64_stops_early_and_matches_sequential():
    def pendulum(t, y, args):
        return jnp.stack([y[1], -jnp.sin(y[0]) - 0.1 * y[1]])

    def solve(solver, dt0, y0, max_steps):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(pendulum),
            solver,
            0.0,
            10.0,
            dt0,
            y0,
            max_steps=max_steps,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )

    y0 = jnp.array([1.0, 0.0])
    deer = deer_diffrax.DeerSolver(num_substeps=1000)
    sol = solve(deer, 10.0, y0, 2)
    sequential = solve(diffrax.Tsit5(), 0.01, y0, 1002)
    # 10 iterations when every stop needed an update within tolerance.
    assert deer_diffrax.diagnostics(sol).total_newton_steps == 9
    assert max_relative_difference(sol.ys, sequential.ys) <= 1e-13

    def loss(solver, dt0, max_steps):
        return lambda y: jnp.sum(solve(solver, dt0, y, max_steps).ys ** 2)

    grad = jax.grad(loss(deer, 10.0, 2))(y0)
    grad_sequential = jax.grad(loss(diffrax.Tsit5(), 0.01, 1002))(y0)
    assert max_relative_difference(grad, grad_sequential) <= 1e-12


_FLOAT32_SCAN = r"""
import json
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import deer_diffrax

assert not jax.config.jax_enable_x64
cell = eqx.nn.GRUCell(4, 32, key=jr.key(0))
xs = jr.normal(jr.key(1), (1000, 4))
step = lambda h, x: (cell(x, h), cell(x, h))
(_, ys), stats = deer_diffrax.scan(step, jnp.zeros(32), xs, return_stats=True)
_, sequential = jax.lax.scan(step, jnp.zeros(32), xs)
leaves = jax.tree_util.tree_leaves(eqx.filter(cell, eqx.is_array))
print(json.dumps(dict(
    iterations=int(stats.num_newton_steps),
    deer=ys.tolist(),
    sequential=sequential.tolist(),
    leaves=[x.tolist() for x in leaves],
    xs=xs.tolist(),
)))
"""


def test_float32_scan_that_stops_early_matches_sequential_rounding():
    # With 64-bit JAX off, as users train: a GRU of hidden size 32, where float32
    # Newton stops on the quadratic prediction (3 iterations where the plain rule
    # takes 4). Its states must be as close to the float64 recurrence as the
    # sequential float32 `lax.scan`'s are (within 10x).
    env = dict(os.environ, JAX_ENABLE_X64="0")
    out = subprocess.run(
        [sys.executable, "-c", _FLOAT32_SCAN],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.splitlines()[-1])
    template = eqx.nn.GRUCell(4, 32, key=jr.key(0), dtype=jnp.float64)
    params, static = eqx.partition(template, eqx.is_array)
    leaves = [jnp.asarray(x, jnp.float64) for x in result["leaves"]]
    cell = eqx.combine(
        jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves),
        static,
    )
    xs = jnp.asarray(result["xs"], jnp.float64)
    _, reference = jax.lax.scan(
        lambda h, x: (cell(x, h), cell(x, h)), jnp.zeros(32, jnp.float64), xs
    )
    sequential_error = max_relative_difference(
        jnp.asarray(result["sequential"], jnp.float64), reference
    )
    error = max_relative_difference(jnp.asarray(result["deer"], jnp.float64), reference)
    assert result["iterations"] == 3
    assert 0 < sequential_error < 1e-5
    assert error <= 10 * sequential_error, (error, sequential_error)


def test_relinearising_on_the_prediction_returns_the_same_iterate_with_its_blocks():
    # What a differentiated solve does: where the forward solve stops on the
    # prediction, one more step only linearises at the iterate it returned (no
    # recurrence solve), so that the gradient's blocks are the ones there.
    cell = eqx.nn.GRUCell(4, 8, key=jr.key(0), dtype=jnp.float64)
    xs = jr.normal(jr.key(1), (1000, 4))
    h0 = jnp.zeros(8)

    def residual(ys, _):
        return ys - jax.vmap(lambda h, x: cell(x, h))(shift_in(h0, ys), xs)

    def solve(newton):
        return optx.root_find(
            residual, newton, jnp.zeros((1000, 8)), max_steps=50, throw=False
        )

    forward = solve(deer_diffrax.DeerNewton(damping=False))
    relinearised = solve(
        deer_diffrax.DeerNewton(damping=False, on_prediction="relinearise")
    )
    # Ignoring the prediction, the fifth update must itself be within tolerance:
    # a whole iteration more, and a different (more accurate) iterate.
    plain = solve(deer_diffrax.DeerNewton(damping=False, on_prediction="ignore"))
    assert forward.result == optx.RESULTS.successful
    assert relinearised.result == optx.RESULTS.successful
    assert plain.result == optx.RESULTS.successful
    assert int(forward.stats["num_newton_steps"]) == 4
    assert int(relinearised.stats["num_newton_steps"]) == 5
    assert int(plain.stats["num_newton_steps"]) == 5
    assert not bool(jnp.all(plain.value == forward.value))
    assert max_relative_difference(plain.value, forward.value) <= 1e-13
    assert bool(jnp.all(relinearised.value == forward.value))
    # The blocks are d h_t / d h_(t-1) at the returned trajectory.
    previous = shift_in(h0, relinearised.value)
    expected = jax.vmap(jax.jacfwd(lambda h, x: cell(x, h)))(previous, xs)
    blocks = relinearised.stats["exact_blocks"]
    assert max_relative_difference(blocks[1:], expected[1:]) <= 1e-14
    assert float(relinearised.stats["error_estimate"]) <= 0.01


def test_unknown_prediction_mode_is_refused():
    with pytest.raises(ValueError, match="on_prediction"):
        deer_diffrax.DeerNewton(on_prediction="stop_early")
