"""Implicit base solvers for stiff problems, and SDEs with a fixed Brownian path."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
import pytest
from helpers import max_relative_difference

from deer_diffrax import DeerSolver


def _robertson(t, y, args):
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack(
        [
            -0.04 * y1 + 1e4 * y2 * y3,
            0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
            3e7 * y2**2,
        ]
    )


def _stiff_van_der_pol(t, y, args):
    return jnp.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])


_STIFF = {
    "robertson": (_robertson, jnp.array([1.0, 0.0, 0.0])),
    "van_der_pol_1000": (_stiff_van_der_pol, jnp.array([2.0, 0.0])),
}
# Tight inner tolerances: the one-step map is then a function of its input to
# rounding, as the comparison with the sequential solver needs.
_ROOT_FINDER = optx.Newton(rtol=1e-12, atol=1e-12)
_IMPLICIT = [
    diffrax.ImplicitEuler,
    diffrax.Kvaerno3,
    diffrax.Kvaerno4,
    diffrax.Kvaerno5,
]


# The two middle Kvaerno methods only in the slow run (CI time): ImplicitEuler and
# Kvaerno5 bracket them.
_STIFF_CASES = [
    pytest.param(
        name,
        base_cls,
        id=f"{name}-{base_cls.__name__}",
        marks=(
            pytest.mark.slow if base_cls in (diffrax.Kvaerno3, diffrax.Kvaerno4) else ()
        ),
    )
    for name in sorted(_STIFF)
    for base_cls in _IMPLICIT
]


@pytest.mark.parametrize("name, base_cls", _STIFF_CASES)
def test_stiff_matches_sequential_implicit_solver(name, base_cls):
    vector_field, y0 = _STIFF[name]
    term = diffrax.ODETerm(vector_field)
    base = base_cls(root_finder=_ROOT_FINDER)
    num_windows, num_substeps, t1 = 5, 40, 1.0
    window_ends = jnp.linspace(0.0, t1, num_windows + 1)[1:]
    deer = diffrax.diffeqsolve(
        term,
        DeerSolver(base, num_substeps=num_substeps),
        0.0,
        t1,
        t1 / num_windows,
        y0,
        saveat=diffrax.SaveAt(steps=True),
        max_steps=num_windows,
    )
    sequential = diffrax.diffeqsolve(
        term,
        base,
        0.0,
        t1,
        t1 / (num_windows * num_substeps),
        y0,
        saveat=diffrax.SaveAt(ts=window_ends),
        max_steps=num_windows * num_substeps + 1,
    )
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-8


def test_robertson_adaptive_long_time():
    # Robertson over [0, 100] with adaptive windows against a tight reference; an
    # explicit method would need ~1e6 steps here.
    term = diffrax.ODETerm(_robertson)
    y0 = jnp.array([1.0, 0.0, 0.0])
    ts = jnp.array([1.0, 10.0, 100.0])
    deer = diffrax.diffeqsolve(
        term,
        DeerSolver(diffrax.Kvaerno5(), num_substeps=20),
        0.0,
        100.0,
        1e-3,
        y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-10),
        saveat=diffrax.SaveAt(ts=ts),
        max_steps=2000,
    )
    reference = diffrax.diffeqsolve(
        term,
        diffrax.Kvaerno5(),
        0.0,
        100.0,
        1e-4,
        y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-13),
        saveat=diffrax.SaveAt(ts=ts),
        max_steps=100_000,
    )
    assert deer.result == diffrax.RESULTS.successful
    assert max_relative_difference(deer.ys, reference.ys) <= 1e-6
    # Mass is conserved by the chemistry.
    assert jnp.allclose(jnp.sum(deer.ys, axis=1), 1.0, atol=1e-9)


def test_implicit_inner_failure_is_reported():
    # An inner root finder allowed one iteration cannot solve the stiff stages.
    term = diffrax.ODETerm(_stiff_van_der_pol)
    base = diffrax.Kvaerno5(root_finder=optx.Newton(rtol=1e-14, atol=1e-14))
    base = eqx.tree_at(lambda s: s.root_find_max_steps, base, 1)
    sol = diffrax.diffeqsolve(
        term,
        DeerSolver(base, num_substeps=20),
        0.0,
        1.0,
        0.5,
        jnp.array([2.0, 0.0]),
        throw=False,
    )
    assert sol.result != diffrax.RESULTS.successful


def _sde_terms(t1=2.0, seed=0):
    def drift(t, y, args):
        return -y + jnp.sin(y[::-1])

    def diffusion(t, y, args):
        return 0.3 * jnp.diag(1 + 0.1 * y**2)

    brownian = diffrax.VirtualBrownianTree(
        0.0, t1, tol=1e-3, shape=(2,), key=jax.random.PRNGKey(seed)
    )
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian)
    )


@pytest.mark.parametrize(
    "base_cls",
    [diffrax.Euler, diffrax.Heun, diffrax.EulerHeun],
    ids=lambda c: c.__name__,
)
def test_sde_path_matches_sequential(base_cls):
    terms = _sde_terms()
    y0 = jnp.array([1.0, -0.5])
    window_ends = jnp.array([0.5, 1.0, 1.5, 2.0])
    deer = diffrax.diffeqsolve(
        terms,
        DeerSolver(base_cls(), num_substeps=100),
        0.0,
        2.0,
        0.5,
        y0,
        saveat=diffrax.SaveAt(steps=True),
        max_steps=4,
    )
    sequential = diffrax.diffeqsolve(
        terms,
        base_cls(),
        0.0,
        2.0,
        0.005,
        y0,
        saveat=diffrax.SaveAt(ts=window_ends),
        max_steps=401,
    )
    assert max_relative_difference(deer.ys, sequential.ys) <= 1e-10


def test_sde_with_non_sde_base_solver_is_rejected():
    with pytest.raises(ValueError, match="does not solve SDEs"):
        diffrax.diffeqsolve(
            _sde_terms(), DeerSolver(diffrax.Tsit5()), 0.0, 1.0, 0.5, jnp.ones(2)
        )
