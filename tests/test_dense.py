"""`deer_diffrax.evaluate`: the dense output of a DeerSolver solution at many times,
against `jax.vmap(sol.evaluate)` and a sequential solve, and its memory."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_difference

import deer_diffrax
from deer_diffrax import DeerSolver
from deer_diffrax._dense import _substep_index
from deer_diffrax._window import substep_grid


T0, T1, DT0, NUM_SUBSTEPS = 0.0, 10.0, 2.5, 50


def _pendulum(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - 0.05 * y[1]])


def _oscillator(t, y, args):
    return {
        "position": y["velocity"],
        "velocity": -y["position"] - 0.2 * y["velocity"],
        "scalar": -0.5 * y["scalar"] + 0.1 * jnp.sum(y["position"]),
    }


Y0 = jnp.array([2.5, 0.0])
DICT_Y0 = {
    "position": jnp.array([1.0, -0.5]),
    "velocity": jnp.array([0.0, 0.3]),
    "scalar": jnp.array(2.0),
}


def _solve(
    t0=T0,
    t1=T1,
    dt0=DT0,
    base=None,
    num_substeps=NUM_SUBSTEPS,
    field=_pendulum,
    y0=Y0,
    controller=None,
    max_steps=8,
):
    # Times as arrays, not Python floats (static to `diffeqsolve`'s jit): solves
    # that differ only in their interval share one compilation.
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        DeerSolver(diffrax.Tsit5() if base is None else base, num_substeps),
        jnp.asarray(t0),
        jnp.asarray(t1),
        jnp.asarray(dt0),
        y0,
        saveat=diffrax.SaveAt(dense=True),
        stepsize_controller=(
            diffrax.ConstantStepSize() if controller is None else controller
        ),
        max_steps=max_steps,
    )


def _solved_times(sol) -> tuple[np.ndarray, np.ndarray]:
    """Every window boundary and every substep time of `sol`, in its own time."""
    interpolation = sol.interpolation
    num_windows = int(interpolation.ts_size) - 1
    direction = float(interpolation.direction)
    windows = np.asarray(interpolation.ts[: num_windows + 1]) * direction
    substeps = np.asarray(interpolation.infos["ts"][:num_windows]) * direction
    return windows, substeps.ravel()


def _test_times(sol, num_random=100) -> jnp.ndarray:
    """Random times, every substep and window boundary, and both ends."""
    windows, substeps = _solved_times(sol)
    low, high = sorted((float(sol.t0), float(sol.t1)))
    rng = np.random.default_rng(0)
    random = rng.uniform(low, high, num_random)
    return jnp.asarray(np.concatenate([random, substeps, windows, [low, high]]))


def _vmap_evaluate(sol, ts, left):
    return jax.vmap(lambda t: sol.evaluate(t, left=left))(ts)


def _max_abs_difference(a, b) -> float:
    leaves = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
    )
    return float(max(leaves))


@pytest.fixture(scope="module")
def pendulum():
    return _solve()


@pytest.mark.parametrize("left", [True, False])
def test_matches_diffrax_evaluate(pendulum, left):
    sol = pendulum
    assert int(sol.interpolation.ts_size) - 1 == 4  # four windows
    ts = _test_times(sol)
    ours = deer_diffrax.evaluate(sol, ts, left=left)
    theirs = _vmap_evaluate(sol, ts, left)
    assert ours.shape == theirs.shape == (ts.shape[0], 2)
    assert bool(jnp.all(jnp.isfinite(ours)))
    assert _max_abs_difference(ours, theirs) <= 1e-12


def test_shapes_follow_ts(pendulum):
    sol = pendulum
    assert deer_diffrax.evaluate(sol, 1.25).shape == (2,)
    # Any shape of times, integers included.
    grid = jnp.arange(10).reshape(2, 5)
    out = deer_diffrax.evaluate(sol, grid)
    assert out.shape == (2, 5, 2)
    expected = _vmap_evaluate(sol, jnp.arange(10.0), True).reshape(2, 5, 2)
    assert _max_abs_difference(out, expected) <= 1e-12


def test_matches_sequential_dense_output(pendulum):
    sol = pendulum
    sequential = diffrax.diffeqsolve(
        diffrax.ODETerm(_pendulum),
        diffrax.Tsit5(),
        T0,
        T1,
        DT0 / NUM_SUBSTEPS,
        Y0,
        saveat=diffrax.SaveAt(dense=True),
        max_steps=4 * NUM_SUBSTEPS + 8,
    )
    ts = _test_times(sol)
    for left in (True, False):
        ours = deer_diffrax.evaluate(sol, ts, left=left)
        theirs = _vmap_evaluate(sequential, ts, left)
        assert max_relative_difference(ours, theirs) <= 1e-9


@pytest.mark.parametrize(
    "case", ["adaptive_dopri5_dict_state", "euler", "reverse_time"]
)
def test_variants_match_diffrax_evaluate(case):
    if case == "adaptive_dopri5_dict_state":
        # Windows of different lengths, another interpolation class, a PyTree state
        # (one solve for all three: compilation is what costs time here).
        controller = diffrax.PIDController(rtol=1e-8, atol=1e-10)
        sol = _solve(
            dt0=0.5,
            base=diffrax.Dopri5(),
            num_substeps=20,
            field=_oscillator,
            y0=DICT_Y0,
            controller=controller,
            max_steps=32,
        )
        windows, _ = _solved_times(sol)
        lengths = np.diff(windows)
        assert len(lengths) >= 3 and np.ptp(lengths) > 0.1
    elif case == "euler":
        sol = _solve(base=diffrax.Euler(), num_substeps=20)
    else:
        sol = _solve(t0=T1, t1=T0, dt0=-DT0)
        assert int(sol.interpolation.direction) == -1
    ts = _test_times(sol)
    for left in (True, False):
        ours = deer_diffrax.evaluate(sol, ts, left=left)
        theirs = _vmap_evaluate(sol, ts, left)
        assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(
            theirs
        )
        for a, b in zip(
            jax.tree_util.tree_leaves(ours),
            jax.tree_util.tree_leaves(theirs),
            strict=True,
        ):
            assert a.shape == b.shape and a.shape[0] == ts.shape[0]
            assert bool(jnp.all(jnp.isfinite(a)))
        assert _max_abs_difference(ours, theirs) <= 1e-12


def test_out_of_bounds_is_nan(pendulum):
    sol = pendulum
    ts = jnp.array([-1.0, -1e-9, 0.0, 5.0, 10.0, 10.0 + 1e-9, 11.0, jnp.inf, jnp.nan])
    ours = deer_diffrax.evaluate(sol, ts)
    theirs = _vmap_evaluate(sol, ts, True)
    outside = np.array([1, 1, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    assert np.array_equal(np.isnan(np.asarray(ours)).all(axis=1), outside)
    assert np.array_equal(np.isnan(np.asarray(ours)), np.isnan(np.asarray(theirs)))
    inside = ~outside
    assert _max_abs_difference(ours[inside], theirs[inside]) <= 1e-12


def test_trivial_solve():
    # t0 == t1: no window; y0 at t0 and NaN elsewhere, as Diffrax.
    sol = _solve(t0=1.0, t1=1.0, dt0=0.5)
    ts = jnp.array([1.0, 0.5, 2.0])
    ours = deer_diffrax.evaluate(sol, ts)
    theirs = _vmap_evaluate(sol, ts, True)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(Y0))
    assert bool(jnp.all(jnp.isnan(ours[1:]))) and bool(jnp.all(jnp.isnan(theirs[1:])))
    assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))


def test_rejects_other_solutions(pendulum):
    tsit5 = diffrax.diffeqsolve(
        diffrax.ODETerm(_pendulum),
        diffrax.Tsit5(),
        T0,
        1.0,
        0.1,
        Y0,
        saveat=diffrax.SaveAt(dense=True),
    )
    with pytest.raises(ValueError, match=r"DeerSolver.*jax\.vmap\(sol\.evaluate\)"):
        deer_diffrax.evaluate(tsit5, jnp.array([0.5]))
    no_dense = eqx.tree_at(lambda s: s.interpolation, pendulum, None)
    with pytest.raises(ValueError, match=r"SaveAt\(dense=True\)"):
        deer_diffrax.evaluate(no_dense, jnp.array([0.5]))
    with pytest.raises(ValueError, match="diffrax.Solution"):
        deer_diffrax.evaluate(pendulum.interpolation, jnp.array([0.5]))


def test_substep_index_on_degenerate_grids():
    # The arithmetic guess is at most one off on a grid of equal substeps; on a grid
    # with ties (float32, substeps finer than its resolution at large t) or uneven
    # times it can be far off, and the bisection fallback must still reproduce
    # DeerInterpolation's searchsorted exactly.
    rng = np.random.default_rng(1)
    uneven = np.sort(rng.uniform(0.0, 1.0, 301) ** 3)
    uneven[[0, -1]] = 0.0, 1.0
    uneven[100:110] = uneven[100]  # a run of ties
    fine = substep_grid(jnp.float32(1000.0), jnp.float32(1001.0), 100_000, jnp.nan)
    # A window shorter than its capacity: 13 active substeps of 0.1, the rest empty.
    clipped = substep_grid(jnp.float64(2.0), jnp.float64(3.25), 20, 0.1)
    assert int(clipped.num_active) == 13
    rows = [
        (jnp.asarray(uneven), uneven.shape[0] - 1),
        (fine.ts, int(fine.num_active)),
        (clipped.ts, int(clipped.num_active)),
    ]
    for row, num_active in rows:
        num_substeps = row.shape[0] - 1
        points = np.concatenate(
            [np.asarray(row), rng.uniform(float(row[0]), float(row[-1]), 2000)]
        )
        ts = jnp.asarray(points, dtype=row.dtype)

        @jax.jit
        def both_sides(ts, row=row, num_substeps=num_substeps, num_active=num_active):
            substep_time = lambda k: row[k]
            return [
                _substep_index(substep_time, num_active, num_substeps, ts, left)
                for left in (True, False)
            ]

        for left, got in zip((True, False), both_sides(ts), strict=True):
            expected = jnp.searchsorted(row, ts, side="left" if left else "right")
            expected = jnp.clip(expected - 1, 0, num_active - 1)
            assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_memory_is_linear_in_points():
    # One window of 2000 substeps, evaluated at 2000 points. `vmap(sol.evaluate)`
    # reads the window's 2000 substep times for every point (XLA then gathers only
    # the chosen substep's information): 32 MB of temporaries in float64.
    # `evaluate` reads a few scalars and one substep's information per point:
    # 0.38 MB with Tsit5 and a 2-dimensional state.
    num_substeps = num_points = 2000
    # Compiling needs shapes only: trace the solve without running it, and pass the
    # solution as an argument.
    sol = eqx.filter_eval_shape(
        _solve, t1=1.0, dt0=1.0, num_substeps=num_substeps, max_steps=1
    )
    arrays, static = eqx.partition(sol, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    ts = jax.ShapeDtypeStruct((num_points,), jnp.float64)

    def temp_bytes(evaluate):
        f = lambda arrays, ts: evaluate(eqx.combine(arrays, static), ts)
        compiled = jax.jit(f).lower(arrays, ts).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = temp_bytes(deer_diffrax.evaluate)
    theirs = temp_bytes(lambda sol, ts: jax.vmap(sol.evaluate)(ts))
    print(f"temp bytes: evaluate {ours}, vmap(sol.evaluate) {theirs}")
    assert ours * 10 <= theirs
    assert ours <= 1_000_000


def test_gradient_matches_diffrax_evaluate():
    ts = jnp.linspace(0.1, 4.9, 23)

    def loss(y0, evaluate):
        # Euler: the cheapest solve to differentiate (compile time).
        sol = _solve(t1=5.0, y0=y0, base=diffrax.Euler(), num_substeps=10)
        return jnp.sum(evaluate(sol, ts) ** 2)

    ours = lambda y0: loss(y0, deer_diffrax.evaluate)
    theirs = lambda y0: loss(y0, lambda sol, ts: jax.vmap(sol.evaluate)(ts))
    # One program for both: compiled once.
    both = jax.jit(lambda y0: (jax.grad(ours)(y0), jax.grad(theirs)(y0)))
    grad_ours, grad_theirs = both(Y0)
    assert bool(jnp.all(jnp.isfinite(grad_ours)))
    assert bool(jnp.all(grad_ours != 0))
    assert max_relative_difference(grad_ours, grad_theirs) <= 1e-10
