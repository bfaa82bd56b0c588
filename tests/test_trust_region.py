"""`TrustRegion` damping: plain Newton where Newton works, windows solved where
`ShrinkBlocksDamping` fails, and the usual transformations (jit, vmap, grad) in both
Jacobian modes, for DeerSolver and `deer_diffrax.scan`."""

from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    check_scan_under_jit_vmap_and_grad,
    max_relative_difference,
    PROBLEMS,
)

import deer_diffrax
from deer_diffrax import DeerSolver, TrustRegion


def _deer(problem, t1, substeps, jacobian, damping, max_newton_steps=50, y0=None):
    return diffrax.diffeqsolve(
        problem.term,
        DeerSolver(
            num_substeps=substeps,
            jacobian=jacobian,
            damping=damping,
            max_newton_steps=max_newton_steps,
        ),
        0.0,
        t1,
        t1,
        problem.y0 if y0 is None else y0,
        args=problem.args,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        throw=False,
    )


def _sequential(problem, t1, substeps, y0=None):
    return diffrax.diffeqsolve(
        problem.term,
        diffrax.Tsit5(),
        0.0,
        t1,
        t1 / substeps,
        problem.y0 if y0 is None else y0,
        args=problem.args,
        max_steps=substeps + 1,
    )


@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
def test_plain_newton_where_newton_converges(jacobian):
    # Van der Pol in one window of 2 time units: Newton converges without damping,
    # so the trust region never comes into play: same iterates, same answer.
    problem = PROBLEMS["van_der_pol"]
    trust = _deer(problem, 2.0, 200, jacobian, TrustRegion())
    plain = _deer(problem, 2.0, 200, jacobian, False)
    assert trust.result == diffrax.RESULTS.successful
    assert max_relative_difference(trust.ys, _sequential(problem, 2.0, 200).ys) <= 1e-9
    assert int(trust.solver_state.num_rejected) == 0
    assert int(trust.solver_state.total_newton_steps) == int(
        plain.solver_state.total_newton_steps
    )
    # The same iterates; not bit for bit, as the two are different XLA programs whose
    # kernels may fuse (and so round) differently.
    assert max_relative_difference(trust.ys, plain.ys) <= 1e-14


@pytest.mark.parametrize(
    "jacobian", ["full", pytest.param("diagonal", marks=pytest.mark.slow)]
)
def test_solves_a_window_that_shrinking_the_blocks_does_not(jacobian):
    # Lotka-Volterra in one window over 20 time units: the first Newton updates
    # send the populations negative far along the window, where they blow up in
    # finite time. Shrinking every block towards a Picard sweep does not converge
    # in 200 iterations in either mode (benchmarks/hard_panel.py); the trust region
    # solves the window in pieces.
    problem = PROBLEMS["lotka_volterra"]
    y0 = jnp.array([4.0, 2.0])
    trust = _deer(problem, 20.0, 2000, jacobian, TrustRegion(), 200, y0)
    shrink = _deer(problem, 20.0, 2000, jacobian, True, 200, y0)
    assert trust.result == diffrax.RESULTS.successful
    assert int(trust.solver_state.num_rejected) > 0
    reference = _sequential(problem, 20.0, 2000, y0)
    assert max_relative_difference(trust.ys, reference.ys) <= 1e-9
    assert shrink.result != diffrax.RESULTS.successful


class _ResolvingTrustRegion(TrustRegion):
    # The generic path: after a rejection, take no step, then linearise the anchor
    # again and solve from there.
    reuses_update: ClassVar[bool] = False


def test_a_rejected_step_reuses_the_update_made_at_the_anchor():
    # A rejection only shrinks the radius, so the step from the anchor cuts the
    # update already computed there; Newton keeps that `(T, n)` update and takes
    # the step at once, where the generic path spends one more iteration per
    # rejection linearising the anchor again. The same steps otherwise: same
    # rejections, same answer.
    problem = PROBLEMS["lotka_volterra"]
    y0 = jnp.array([4.0, 2.0])
    reusing = _deer(problem, 20.0, 2000, "full", TrustRegion(), 200, y0)
    resolving = _deer(problem, 20.0, 2000, "full", _ResolvingTrustRegion(), 200, y0)
    assert reusing.result == diffrax.RESULTS.successful
    assert resolving.result == diffrax.RESULTS.successful
    rejected = int(reusing.solver_state.num_rejected)
    assert rejected > 0
    assert int(resolving.solver_state.num_rejected) == rejected
    assert int(resolving.solver_state.total_newton_steps) == (
        int(reusing.solver_state.total_newton_steps) + rejected
    )
    assert max_relative_difference(reusing.ys, resolving.ys) <= 1e-14


def test_a_step_is_cut_at_the_first_substep_beyond_the_radius():
    damping = TrustRegion()
    state = eqx.tree_at(lambda s: s.radius, damping.init(jnp.float64), jnp.array(0.5))
    start = jnp.ones((6, 2))
    blocks = jnp.zeros((6, 2))  # the update is the residual itself
    residual = jnp.array([[0.1, 0], [0.2, 0], [0.7, 0], [0.1, 0], [9, 0], [0, 0]])
    update, trial, new_state = damping.update(
        state, start, blocks, residual, deer_diffrax.AssociativeScanSolver()
    )
    # The update reported is what the step moved.
    np.testing.assert_allclose(update, start - trial)
    # Substeps 0-2 are taken (2 is the first beyond the radius, and still taken);
    # the rest continues constant at substep 2.
    expected = jnp.array([[0.9, 1], [0.8, 1], [0.3, 1], [0.3, 1], [0.3, 1], [0.3, 1]])
    np.testing.assert_allclose(trial, expected)
    assert bool(new_state.truncated)
    np.testing.assert_allclose(new_state.taken, 0.7)
    assert not bool(damping.is_undamped(new_state))
    # A rejection shrinks the radius to a quarter of the smaller of the radius and
    # the largest change the step made.
    accept, judged = damping.judge(
        new_state,
        jnp.array(False),
        jnp.array(1e9),
        jnp.array(True),
        jnp.array(1.0),
        jnp.ones((4, 2)),
    )
    assert not bool(accept)
    np.testing.assert_allclose(judged.radius, 0.5 / 4)
    # An accepted step that was cut short doubles it.
    accept, judged = damping.judge(
        new_state,
        jnp.array(False),
        jnp.array(2.0),
        jnp.array(True),
        jnp.array(1.0),
        jnp.ones((4, 2)),
    )
    assert bool(accept)
    np.testing.assert_allclose(judged.radius, 1.0)


@pytest.mark.parametrize(
    "jacobian", ["full", pytest.param("diagonal", marks=pytest.mark.slow)]
)
def test_deer_solver_under_jit_vmap_and_grad(jacobian):
    problem = PROBLEMS["van_der_pol"]
    solver = DeerSolver(num_substeps=100, jacobian=jacobian, damping=TrustRegion())

    def end_state(y0, solver):
        sol = diffrax.diffeqsolve(
            problem.term, solver, 0.0, 1.0, 1.0, y0, saveat=diffrax.SaveAt(t1=True)
        )
        return jnp.sum(sol.ys[-1] ** 2)

    y0s = jnp.array([[2.0, 0.0], [1.0, 0.5]])
    deer = jax.jit(jax.vmap(jax.value_and_grad(lambda y: end_state(y, solver))))
    # The sequential solve with dt0 = 1 / 100 on the same grid.
    sequential = jax.vmap(
        jax.value_and_grad(
            lambda y: jnp.sum(
                diffrax.diffeqsolve(
                    problem.term,
                    diffrax.Tsit5(),
                    0.0,
                    1.0,
                    0.01,
                    y,
                    saveat=diffrax.SaveAt(t1=True),
                ).ys[-1]
                ** 2
            )
        )
    )
    (value, grad), (value_ref, grad_ref) = deer(y0s), sequential(y0s)
    assert max_relative_difference(value, value_ref) <= 1e-9
    assert max_relative_difference(grad, grad_ref) <= 1e-9


@pytest.mark.parametrize(
    "jacobian", ["full", pytest.param("diagonal", marks=pytest.mark.slow)]
)
def test_scan_under_jit_vmap_and_grad(jacobian):
    check_scan_under_jit_vmap_and_grad(TrustRegion(), jacobian)


def test_damping_shorthands_still_build_their_strategies():
    shrink = deer_diffrax.ShrinkBlocksDamping
    assert isinstance(DeerSolver(damping=True).damping, shrink)
    assert isinstance(DeerSolver(damping=False).damping, deer_diffrax.NoDamping)
    assert isinstance(DeerSolver(damping=TrustRegion()).damping, TrustRegion)
