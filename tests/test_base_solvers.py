"""Any Diffrax solver as the base: stochastic Runge-Kutta, underdamped Langevin,
`SemiImplicitEuler`, solvers that carry state between steps and a user's own, each
against its sequential solve on the same grid; and clear refusals of what cannot be
a fixed one-step map."""

from typing import ClassVar

import diffrax
import jax
import jax.numpy as jnp
import optimistix as optx
import pytest
from helpers import max_relative_difference

import deer_diffrax
from deer_diffrax import DeerSolver
from deer_diffrax._window import substep_grid


# Windows of 0.3 with 12 substeps of 0.025, then a last window of 0.1: a third of its
# length, 4 active substeps and 8 inactive ones, on the sequential solve's own grid.
_NUM_SUBSTEPS = 12
_WINDOW = 0.3
_T1 = 0.7
_WINDOW_ENDS = jnp.array([0.3, 0.6, 0.7])
_NUM_SEQUENTIAL_STEPS = 28


def _deer_grid():
    # The substep times DeerSolver takes (equal up to rounding to `0.025 k`), for the
    # sequential solve to step on exactly: the Brownian path magnifies rounding.
    first = substep_grid(0.0, 0.3, _NUM_SUBSTEPS, jnp.nan).ts
    second = substep_grid(0.3, 0.6, _NUM_SUBSTEPS, jnp.nan).ts
    last = substep_grid(0.6, 0.7, _NUM_SUBSTEPS, second[1] - second[0])
    assert int(last.num_active) == 4
    return jnp.concatenate([first, second[1:], last.ts[1:5]])


def _compare(terms, base, y0, args=None):
    """Max relative difference of DeerSolver(base) and base over the windows, and the
    base-method substeps DeerSolver took."""
    deer = diffrax.diffeqsolve(
        terms,
        DeerSolver(base, num_substeps=_NUM_SUBSTEPS),
        0.0,
        _T1,
        None,
        y0,
        args=args,
        stepsize_controller=diffrax.StepTo(jnp.array([0.0, 0.3, 0.6, 0.7])),
        saveat=diffrax.SaveAt(steps=True, solver_state=True),
        max_steps=3,
    )
    sequential = diffrax.diffeqsolve(
        terms,
        base,
        0.0,
        _T1,
        None,
        y0,
        args=args,
        stepsize_controller=diffrax.StepTo(_deer_grid()),
        saveat=diffrax.SaveAt(ts=_WINDOW_ENDS),
    )
    assert deer.result == diffrax.RESULTS.successful
    difference = max_relative_difference(deer.ys, sequential.ys)
    return difference, deer_diffrax.diagnostics(deer).total_substeps


def _brownian(levy_area, shape=(2,), seed=0):
    return diffrax.VirtualBrownianTree(
        0.0,
        _T1,
        tol=1e-4,
        shape=shape,
        key=jax.random.PRNGKey(seed),
        levy_area=levy_area,
    )


def _general_noise_sde(levy_area):
    drift = lambda t, y, args: -y + jnp.sin(y[::-1])
    diffusion = lambda t, y, args: 0.3 * jnp.diag(1 + 0.1 * y**2)
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, _brownian(levy_area))
    )


def _additive_noise_sde(levy_area):
    drift = lambda t, y, args: -y + jnp.sin(y[::-1])
    diffusion = lambda t, y, args: 0.3 * (1 + 0.5 * t) * jnp.eye(2)
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, _brownian(levy_area))
    )


_Y0 = jnp.array([1.0, -0.5])

# (solver, noise, Levy area it needs, slow); the default run keeps one.
_SRK_CASES = [
    (diffrax.SPaRK, _general_noise_sde, diffrax.SpaceTimeLevyArea, False),
    (diffrax.ShARK, _additive_noise_sde, diffrax.SpaceTimeLevyArea, True),
    (diffrax.GeneralShARK, _general_noise_sde, diffrax.SpaceTimeLevyArea, True),
    (diffrax.SlowRK, _general_noise_sde, diffrax.SpaceTimeLevyArea, True),
    (diffrax.SRA1, _additive_noise_sde, diffrax.SpaceTimeLevyArea, True),
    (diffrax.SEA, _additive_noise_sde, diffrax.SpaceTimeLevyArea, True),
    (diffrax.StratonovichMilstein, _general_noise_sde, diffrax.BrownianIncrement, True),
    (diffrax.ItoMilstein, _general_noise_sde, diffrax.BrownianIncrement, True),
]


@pytest.mark.parametrize(
    "solver_cls, make_terms, levy_area",
    [
        pytest.param(
            cls, terms, levy, id=cls.__name__, marks=pytest.mark.slow if slow else ()
        )
        for cls, terms, levy, slow in _SRK_CASES
    ],
)
def test_stochastic_runge_kutta_matches_sequential(solver_cls, make_terms, levy_area):
    difference, substeps = _compare(make_terms(levy_area), solver_cls(), _Y0)
    assert difference <= 1e-9
    assert substeps == _NUM_SEQUENTIAL_STEPS


def _langevin_terms(levy_area):
    gamma, u = jnp.array([1.5, 0.8]), 1.0
    grad_f = lambda x, args: x + 0.3 * x**3
    drift = diffrax.UnderdampedLangevinDriftTerm(gamma, u, grad_f)
    diffusion = diffrax.UnderdampedLangevinDiffusionTerm(
        gamma, u, _brownian(levy_area, seed=1)
    )
    return diffrax.MultiTerm(drift, diffusion)


@pytest.mark.parametrize(
    "solver_cls, levy_area",
    [
        pytest.param(diffrax.ALIGN, diffrax.SpaceTimeLevyArea, marks=pytest.mark.slow),
        pytest.param(
            diffrax.ShOULD, diffrax.SpaceTimeTimeLevyArea, marks=pytest.mark.slow
        ),
        (diffrax.QUICSORT, diffrax.SpaceTimeTimeLevyArea),
    ],
    ids=lambda x: x.__name__,
)
def test_underdamped_langevin_matches_sequential(solver_cls, levy_area):
    # Restarted every substep: their state caches step-size coefficients (which a
    # sequential solve reuses while the step is unchanged to 1e-10, hence agreement
    # to about 1e-12 rather than rounding) and a gradient (recomputed).
    y0 = (jnp.array([1.0, -0.5]), jnp.array([0.0, 0.3]))
    difference, substeps = _compare(_langevin_terms(levy_area), solver_cls(0.01), y0)
    assert difference <= 1e-9
    assert substeps == _NUM_SEQUENTIAL_STEPS


def test_semi_implicit_euler_matches_sequential():
    # Tuple terms and a tuple state (position, momentum).
    terms = (
        diffrax.ODETerm(lambda t, p, args: p),
        diffrax.ODETerm(lambda t, q, args: -jnp.sin(q) - 0.1 * q**3),
    )
    y0 = (jnp.array([2.5, 1.0]), jnp.array([0.0, -0.3]))
    difference, _ = _compare(terms, diffrax.SemiImplicitEuler(), y0)
    assert difference <= 1e-9


@pytest.mark.slow
def test_imex_runge_kutta_matches_sequential():
    # KenCarp3: the first term explicit, the second implicit.
    explicit = lambda t, y, args: jnp.stack([y[1], jnp.zeros_like(y[0])])
    implicit = lambda t, y, args: jnp.stack([0 * y[0], -jnp.sin(y[0]) - y[1]])
    terms = diffrax.MultiTerm(diffrax.ODETerm(explicit), diffrax.ODETerm(implicit))
    base = diffrax.KenCarp3(root_finder=optx.Newton(rtol=1e-12, atol=1e-12))
    difference, _ = _compare(terms, base, jnp.array([2.5, 0.0]))
    assert difference <= 1e-9


def _pendulum(t, y, args):
    return jnp.stack([y[1], -args * jnp.sin(y[0]) - 0.05 * y[1]])


_PENDULUM = diffrax.ODETerm(_pendulum)
_PENDULUM_Y0 = jnp.array([2.5, 0.0])


@pytest.mark.parametrize(
    "base", [diffrax.ReversibleHeun(), diffrax.LeapfrogMidpoint()], ids=type
)
def test_carried_state_matches_sequential(base):
    # The state the solver carries (ReversibleHeun's second trajectory and vector
    # field, LeapfrogMidpoint's previous point) is solved for with `y`, handed from
    # window to window, and held through the inactive substeps of the last one.
    difference, substeps = _compare(_PENDULUM, base, _PENDULUM_Y0, args=1.3)
    assert difference <= 1e-9
    assert substeps == _NUM_SEQUENTIAL_STEPS


@pytest.mark.slow
def test_carried_state_on_an_sde_matches_sequential():
    terms = _general_noise_sde(diffrax.BrownianIncrement)
    difference, _ = _compare(terms, diffrax.ReversibleHeun(), _Y0)
    assert difference <= 1e-9


def test_carried_state_is_in_the_solver_state():
    sol = diffrax.diffeqsolve(
        _PENDULUM,
        DeerSolver(diffrax.ReversibleHeun(), num_substeps=_NUM_SUBSTEPS),
        0.0,
        0.6,
        _WINDOW,
        _PENDULUM_Y0,
        args=1.3,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    yhat, vf = sol.solver_state.base_state
    assert yhat.shape == vf.shape == _PENDULUM_Y0.shape
    # The carried vector field is evaluated at the carried second trajectory.
    assert jnp.allclose(vf, _pendulum(0.6, yhat, 1.3), rtol=1e-12, atol=1e-12)
    assert deer_diffrax.diagnostics(sol).total_substeps == 24


# Two windows for the gradients, and the sequential solve on their substeps.
_GRADIENT_WINDOWS = diffrax.StepTo(jnp.array([0.0, 0.3, 0.6]))
_GRADIENT_GRID = diffrax.StepTo(_deer_grid()[: 2 * _NUM_SUBSTEPS + 1])


def _gradients(terms, base, y0, scale, final_loss=lambda y: jnp.sum(y**2)):
    # Gradients of `final_loss` of the end state with respect to `y0` and `scale`
    # (passed as `args`): through DeerSolver's two windows, and through the
    # sequential solve on their substeps.
    def loss(solver, controller, y0, scale):
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            0.6,
            None,
            y0,
            args=scale,
            stepsize_controller=controller,
        )
        return final_loss(jax.tree_util.tree_map(lambda y: y[-1], sol.ys))

    grad = jax.jit(jax.grad(loss, argnums=(2, 3)))
    deer = DeerSolver(base, num_substeps=_NUM_SUBSTEPS)
    deer_grad = grad(deer, _GRADIENT_WINDOWS, y0, scale)
    sequential_grad = grad(base, _GRADIENT_GRID, y0, scale)
    return deer_grad, sequential_grad


def test_gradient_with_carried_state_matches_sequential():
    grads = _gradients(_PENDULUM, diffrax.LeapfrogMidpoint(), _PENDULUM_Y0, 1.3)
    assert max_relative_difference(*grads) <= 1e-9


@pytest.mark.slow
def test_gradient_with_stochastic_runge_kutta_matches_sequential():
    drift = lambda t, y, args: -args * y + jnp.sin(y[::-1])
    diffusion = lambda t, y, args: 0.3 * jnp.eye(2)
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(drift),
        diffrax.ControlTerm(diffusion, _brownian(diffrax.SpaceTimeLevyArea)),
    )
    grads = _gradients(terms, diffrax.ShARK(), _Y0, jnp.array(1.1))
    assert max_relative_difference(*grads) <= 1e-9


# Slow: compiling reverse mode through both solves took about 2 CPU-minutes.
@pytest.mark.slow
@pytest.mark.parametrize(
    "solver_cls, levy_area",
    [
        (diffrax.QUICSORT, diffrax.SpaceTimeTimeLevyArea),
        (diffrax.ALIGN, diffrax.SpaceTimeLevyArea),
    ],
    ids=lambda x: x.__name__,
)
def test_gradient_with_underdamped_langevin_matches_sequential(solver_cls, levy_area):
    # Through the implicit-function-theorem solve of each window, with the Langevin
    # solver restarted every substep, against reverse-mode through the sequential
    # solve on the same substeps: gradients with respect to the initial position and
    # velocity and to a parameter of the potential.
    gamma, u = jnp.array([1.5, 0.8]), 1.0
    grad_f = lambda x, args: args * x + 0.3 * x**3
    terms = diffrax.MultiTerm(
        diffrax.UnderdampedLangevinDriftTerm(gamma, u, grad_f),
        diffrax.UnderdampedLangevinDiffusionTerm(
            gamma, u, _brownian(levy_area, seed=2)
        ),
    )
    y0 = (jnp.array([1.0, -0.5]), jnp.array([0.0, 0.3]))
    deer_grad, sequential_grad = _gradients(
        terms,
        solver_cls(0.01),
        y0,
        jnp.array(1.2),
        final_loss=lambda y: jnp.sum(jnp.sin(y[0])) + jnp.sum(y[1] ** 2),
    )
    assert all(
        jnp.all(jnp.abs(g) > 1e-3) for g in jax.tree_util.tree_leaves(sequential_grad)
    )
    assert max_relative_difference(deer_grad, sequential_grad) <= 1e-7


class _CrankNicolson(diffrax.AbstractSolver):
    """A user's own implicit solver (the trapezoidal rule), restarted each step."""

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        half_step = 0.5 * (t1 - t0)
        f0 = terms.vf(t0, y0, args)

        def residual(y1, _):
            return y1 - y0 - half_step * (f0 + terms.vf(t1, y1, args))

        root = optx.root_find(
            residual, optx.Newton(rtol=1e-13, atol=1e-13), y0, throw=False
        )
        y1 = root.value
        result = diffrax.RESULTS.promote(root.result)
        return y1, None, dict(y0=y0, y1=y1), None, result

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class _AdamsBashforth2(diffrax.AbstractSolver):
    """A user's own two-step method (for constant steps): it carries the previous
    vector field, so DeerSolver solves for it along with `y`."""

    term_structure: ClassVar = diffrax.ODETerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        # The first step is an Euler step.
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        f0 = terms.vf(t0, y0, args)
        y1 = y0 + (t1 - t0) * (1.5 * f0 - 0.5 * solver_state)
        return y1, None, dict(y0=y0, y1=y1), f0, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


@pytest.mark.parametrize("base", [_CrankNicolson(), _AdamsBashforth2()], ids=type)
def test_users_own_solver_matches_sequential(base):
    difference, substeps = _compare(_PENDULUM, base, _PENDULUM_Y0, args=1.3)
    assert difference <= 1e-9
    assert substeps == _NUM_SEQUENTIAL_STEPS


class _CountingEuler(diffrax.AbstractItoSolver):
    """Euler that counts its steps: an integer state Newton cannot solve for."""

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def init(self, terms, t0, t1, y0, args):
        return jnp.array(0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1 = y0 + terms.vf_prod(t0, y0, args, terms.contr(t0, t1))
        dense_info = dict(y0=y0, y1=y1)
        return y1, None, dense_info, solver_state + 1, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def test_integer_solver_state_is_refused_with_ode_advice():
    with pytest.raises(ValueError, match="non-floating") as info:
        diffrax.diffeqsolve(
            _PENDULUM, DeerSolver(_CountingEuler()), 0.0, 1.0, 0.5, _PENDULUM_Y0, 1.3
        )
    assert "Tsit5" in str(info.value) and "SPaRK" not in str(info.value)


def test_integer_solver_state_is_refused_with_sde_advice():
    terms = _general_noise_sde(diffrax.BrownianIncrement)
    with pytest.raises(ValueError, match="non-floating") as info:
        diffrax.diffeqsolve(terms, DeerSolver(_CountingEuler()), 0.0, 0.6, 0.3, _Y0)
    message = str(info.value)
    assert "VirtualBrownianTree" in message and "Tsit5" not in message


def test_ode_base_on_an_sde_gets_sde_advice():
    terms = _general_noise_sde(diffrax.SpaceTimeLevyArea)
    with pytest.raises(ValueError, match="does not solve SDEs") as info:
        diffrax.diffeqsolve(terms, DeerSolver(diffrax.Tsit5()), 0.0, 0.6, 0.3, _Y0)
    message = str(info.value)
    assert "SPaRK" in message and "VirtualBrownianTree" in message
