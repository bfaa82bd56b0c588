"""The largest Lyapunov exponent reported by `diagnostics` and `ScanStats`, against
known values and a sequential QR (Benettin) estimate."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deer_diffrax


def _solve(vector_field, y0, t1, window, substeps_per_unit, jacobian="full"):
    solver = deer_diffrax.DeerSolver(
        diffrax.Tsit5(),
        num_substeps=int(round(window * substeps_per_unit)),
        jacobian=jacobian,
        estimate_lyapunov=True,
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        0.0,
        t1,
        window,
        y0,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        max_steps=1000,
    )
    return deer_diffrax.diagnostics(sol)


def _sequential_qr_exponent(step, y0, xs):
    """Benettin's method: the Jacobians of `step` one after another, re-orthogonalised
    by QR; the sum of log |R_00| is the growth of the leading direction."""

    def body(carry, x):
        y, basis, growth = carry
        jacobian = jax.jacfwd(step)(y, x)
        basis, r = jnp.linalg.qr(jacobian @ basis)
        return (step(y, x), basis, growth + jnp.log(jnp.abs(r[0, 0]))), None

    eye = jnp.eye(y0.shape[0], dtype=y0.dtype)
    (_, _, growth), _ = jax.lax.scan(body, (y0, eye, 0.0), xs)
    return float(growth) / len(xs)


@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
def test_linear_system_largest_real_part(jacobian):
    # A non-normal matrix: its largest real eigenvalue part is -0.3 (a rotating,
    # decaying pair), while its symmetric part has a positive eigenvalue, so norms
    # grow at first: the estimate must see through that transient.
    matrix = jnp.array([[-0.3, 2.0, 0.0], [-2.0, -0.3, 0.8], [0.0, 0.0, -1.0]])
    expected = float(np.max(np.linalg.eigvals(np.asarray(matrix)).real))
    # Quasi-Newton needs shorter windows on rotating dynamics; the estimate reads
    # the exact Jacobians at the solution either way.
    window = 10.0 if jacobian == "full" else 1.0
    diag = _solve(
        lambda t, y, args: matrix @ y,
        jnp.array([1.0, 0.0, 1.0]),
        100.0,
        window,
        20,
        jacobian,
    )
    assert diag.num_windows == round(100 / window)
    assert abs(diag.lyapunov_exponent - expected) < 0.02


def _lorenz(t, y, args):
    x, yy, z = y[0], y[1], y[2]
    return jnp.stack([10 * (yy - x), x * (28 - z) - yy, x * yy - 8 / 3 * z])


def _on_the_attractor():
    """A Lorenz state after a burn-in of 10 time units from (1, 1, 1)."""
    term = diffrax.ODETerm(_lorenz)
    y0 = jnp.array([1.0, 1.0, 1.0])
    return diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 10.0, 0.01, y0).ys[-1]


def test_lorenz():
    # On the attractor (after a burn-in), 20 time units in windows of 0.5.
    term = diffrax.ODETerm(_lorenz)
    y0 = _on_the_attractor()
    diag = _solve(_lorenz, y0, 20.0, 0.5, 100)
    assert abs(diag.lyapunov_exponent - 0.906) < 0.2 * 0.906

    solver = diffrax.Tsit5(scan_kind="bounded")

    def step(y, t):
        state = solver.init(term, t, t + 0.01, y, None)
        return solver.step(term, t, t + 0.01, y, None, state, made_jump=True)[0]

    sequential = _sequential_qr_exponent(step, y0, jnp.arange(2000) * 0.01) / 0.01
    assert abs(diag.lyapunov_exponent - sequential) < 0.03 * abs(sequential)


def test_contracting_rnn_scan():
    key_w, key_u, key_x = jax.random.split(jax.random.key(0), 3)
    size, length = 6, 400
    weight = 0.6 * jax.random.normal(key_w, (size, size)) / jnp.sqrt(size)
    inputs = jax.random.normal(key_u, (size, 2))
    xs = jax.random.normal(key_x, (length, 2))

    def cell(h, x):
        return jnp.tanh(weight @ h + inputs @ x)

    (_, _), stats = deer_diffrax.scan(
        lambda h, x: (cell(h, x), None), jnp.zeros(size), xs, return_stats=True
    )
    sequential = _sequential_qr_exponent(cell, jnp.zeros(size), xs)
    exponent = float(stats.lyapunov_exponent)
    assert sequential < -0.3
    assert abs(exponent - sequential) < 0.02 * abs(sequential) + 0.01


def test_not_estimated_unless_asked():
    # Off by default: the diagnostics say so rather than report a number, and the
    # rest of the solve is the same as with the estimate.
    term = diffrax.ODETerm(lambda t, y, args: -y)
    solves = {}
    for estimate in (False, True):
        solver = deer_diffrax.DeerSolver(num_substeps=20, estimate_lyapunov=estimate)
        sol = diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            2.0,
            1.0,
            jnp.array([1.0, 2.0]),
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )
        solves[estimate] = (sol.ys, deer_diffrax.diagnostics(sol))
    ys_off, off = solves[False]
    ys_on, on = solves[True]
    assert off.lyapunov_exponent is None and off.last_window_growth is None
    assert "not estimated" in str(off) and "estimate_lyapunov=True" in str(off)
    # dy/dt = -y: the exponent is -1.
    assert abs(on.lyapunov_exponent + 1) < 1e-3
    assert jnp.array_equal(ys_off, ys_on)
    assert off.total_newton_steps == on.total_newton_steps
    with pytest.raises(ValueError, match="estimate_lyapunov"):
        deer_diffrax.DeerSolver(estimate_lyapunov="yes")


def test_failed_chaotic_window_gets_window_length_advice():
    # Lorenz: three windows of 0.5 converge and measure the exponent (about 0.9);
    # a last window of 5 time units cannot converge in 20 iterations, and the
    # summary says the dynamics are chaotic and which window length to use.
    solver = deer_diffrax.DeerSolver(
        num_substeps=400, max_newton_steps=20, estimate_lyapunov=True
    )
    term = diffrax.ODETerm(_lorenz)
    y0 = _on_the_attractor()
    sol = diffrax.diffeqsolve(
        term,
        solver,
        0.0,
        6.5,
        None,
        y0,
        stepsize_controller=diffrax.StepTo(jnp.array([0.0, 0.5, 1.0, 1.5, 6.5])),
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        throw=False,
    )
    assert sol.result != diffrax.RESULTS.successful
    info = deer_diffrax.diagnostics(sol)
    assert info.num_windows == 4  # the failed window's state is the one returned
    assert 0.2 < info.lyapunov_exponent < 3
    text = str(info)
    assert "dynamics are chaotic" in text
    assert f"= {2 / info.lyapunov_exponent:.3g} time units" in text


def test_window_predicted_to_grow_too_much_is_not_attempted():
    # The setting of the test above, with a bound of 3 on LLE x length: three windows
    # of 0.5 measure the exponent (about 0.9), and the last window of 5 time units,
    # predicted to grow by about 4.5, is refused without a single Newton iteration.
    term = diffrax.ODETerm(_lorenz)
    y0 = _on_the_attractor()
    window_ends = jnp.array([0.0, 0.5, 1.0, 1.5, 6.5])

    def solve(bound, ends, throw=False):
        solver = deer_diffrax.DeerSolver(
            num_substeps=400, max_newton_steps=20, max_window_growth=bound
        )
        return diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            float(ends[-1]),
            None,
            y0,
            stepsize_controller=diffrax.StepTo(ends),
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            throw=throw,
        )

    sol = solve(3.0, window_ends)
    assert sol.result == diffrax.RESULTS.nonlinear_max_steps_reached
    assert jnp.all(jnp.isnan(sol.ys))
    info = deer_diffrax.diagnostics(sol)
    assert info.last_window_refused is True
    assert info.num_windows == 3 and info.last_error_estimate == float("inf")
    assert info.last_window_growth == pytest.approx(5 * info.lyapunov_exponent)
    assert info.last_window_growth > 3.0
    # The iterations are those of the three accepted windows alone.
    first_three = deer_diffrax.diagnostics(solve(3.0, window_ends[:4]))
    assert first_three.last_window_refused is False
    assert info.total_newton_steps == first_three.total_newton_steps
    text = str(info)
    assert "not attempted" in text and "max_window_growth" in text
    # A bound above the prediction attempts the window (and it fails in 20
    # iterations, as in the test above).
    attempted = deer_diffrax.diagnostics(solve(6.0, window_ends))
    assert attempted.last_window_refused is False
    assert attempted.total_newton_steps > first_three.total_newton_steps
    with pytest.raises(Exception, match="nonlinear solver"):
        solve(3.0, window_ends, throw=True)


def test_adaptive_controller_shrinks_refused_windows():
    # Long windows of 1000 substeps on Lorenz under a PID controller: with a bound
    # of 2 on a window's predicted growth, the windows predicted to grow more (two
    # here) are rejected unattempted and shrunk; the answer is the controller's, as
    # accurate as without the bound (docs/scripts/predictability.py --refusal
    # measures where that saves the iterations of failing windows).
    term = diffrax.ODETerm(_lorenz)
    y0 = _on_the_attractor()
    controller = diffrax.PIDController(rtol=1e-8, atol=1e-8)
    reference = diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        0.0,
        4.0,
        None,
        y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=100_000,
    ).ys[-1]
    results = {}
    for bound in (None, 2.0):
        solver = deer_diffrax.DeerSolver(
            num_substeps=1000, estimate_lyapunov=True, max_window_growth=bound
        )
        sol = diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            4.0,
            None,
            y0,
            stepsize_controller=controller,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )
        results[bound] = sol
        error = jnp.max(jnp.abs(sol.ys[-1] - reference)) / jnp.max(jnp.abs(reference))
        assert error < 1e-5
    bounded = results[2.0]
    assert int(bounded.stats["num_rejected_steps"]) > 0
    assert deer_diffrax.diagnostics(bounded).last_window_refused is False
    assert deer_diffrax.diagnostics(bounded).most_newton_steps < 50


def test_bound_never_refuses_contracting_dynamics():
    # dy/dt = -y has a negative exponent: no window is refused however small the
    # bound, so values and gradients are those of the unbounded solver, also under
    # `vmap` (where the refusal's `cond` becomes a select).
    term = diffrax.ODETerm(lambda t, y, args: -args * y)

    def solve(y0, rate, bound):
        solver = deer_diffrax.DeerSolver(num_substeps=20, max_window_growth=bound)
        return diffrax.diffeqsolve(term, solver, 0.0, 3.0, 1.0, y0, args=rate).ys[-1]

    y0s = jnp.array([[1.0, 2.0], [-0.5, 3.0]])

    def outputs(bound):
        values = jax.vmap(lambda y0: solve(y0, 1.0, bound))(y0s)
        grad = jax.grad(lambda rate: jnp.sum(solve(y0s[0], rate, bound)))(1.0)
        return values, grad

    (values, grad), (expected_values, expected_grad) = outputs(1e-3), outputs(None)
    assert jnp.array_equal(values, expected_values)
    assert jnp.array_equal(grad, expected_grad)
    assert jnp.allclose(values, y0s * jnp.exp(-3.0), rtol=1e-7)


@pytest.mark.parametrize("bound", [0.0, -1.0, "2", float("nan"), True])
def test_bad_max_window_growth(bound):
    with pytest.raises(ValueError, match="max_window_growth"):
        deer_diffrax.DeerSolver(max_window_growth=bound)
