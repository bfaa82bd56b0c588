"""Draw the figure of the "Will DEER be fast on my problem?" page: Newton iterations
against `LLE x length` over a panel of contracting, neutral and chaotic problems.

- Random tanh RNNs `h <- tanh(g W h + x)` (hidden 8, `W` Gaussian with variance
    `1 / 8`, inputs of scale 0.1), solved by `deer_diffrax.scan` over `T` steps for
    several gains `g`: contracting for small `g`, chaotic beyond about `g = 1.5`.
- A rotation (neutral, LLE 0) and Lorenz (chaotic, LLE about 0.9), each solved by
    `DeerSolver(Tsit5)` in one window of growing length, 100 substeps per time unit.

Every solve is full Newton with `damping=True` (shrinking; scan's default) and
`max_newton_steps = 200`, in float64, from the constant initial guess; the LLE is the
one the solve reports (`ScanStats.lyapunov_exponent` per step times `T`, or
`diagnostics(sol).last_window_growth`). Failed solves are drawn at the top.

Run from the repository root (needs matplotlib):

    python docs/scripts/predictability.py

It writes `docs/figures/predictability.png` and prints the measurements as a
markdown table.

    python docs/scripts/predictability.py --lorenz-windows [--float32]

prints a second table instead: Lorenz in one window of growing length with
`DeerSolver`'s defaults (the trust region), up to 1000 Newton iterations, against
the sequential Tsit5 solve on the same grid.

    python docs/scripts/predictability.py --refusal

prints a third: Lorenz over `[0, 20]` under a `PIDController` with and without
`max_window_growth`, counting the windows refused and the Newton solves that failed.
"""

import argparse
import pathlib
import time

import diffrax
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optimistix as optx

import deer_diffrax


MAX_STEPS = 200
OUTPUT = pathlib.Path(__file__).resolve().parents[1] / "figures" / "predictability.png"


def rnn_points():
    size = 8
    key_w, key_x = jax.random.split(jax.random.key(0))
    weight = jax.random.normal(key_w, (size, size)) / jnp.sqrt(size)
    points = []
    for length in (100, 400):
        xs = 0.1 * jax.random.normal(key_x, (length, size))
        for gain in (0.5, 1.0, 1.5, 2.0, 3.0):
            cell = lambda h, x, g=gain: (jnp.tanh(g * weight @ h + x), None)
            _, stats = deer_diffrax.scan(
                cell,
                jnp.zeros(size),
                xs,
                max_newton_steps=MAX_STEPS,
                throw=False,
                return_stats=True,
            )
            ok = bool(stats.result == optx.RESULTS.successful)
            growth = float(stats.lyapunov_exponent) * length
            points.append(
                (f"RNN g={gain} T={length}", growth, int(stats.num_newton_steps), ok)
            )
    return points


def _rotation(t, y, args):
    return jnp.stack([y[1], -y[0]])


def _lorenz(t, y, args):
    x, yy, z = y[0], y[1], y[2]
    return jnp.stack([10 * (yy - x), x * (28 - z) - yy, x * yy - 8 / 3 * z])


def _on_the_attractor():
    """A Lorenz state after 10 time units from (1, 1, 1)."""
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_lorenz),
        diffrax.Tsit5(),
        0.0,
        10.0,
        0.01,
        jnp.array([1.0, 1.0, 1.0]),
    ).ys[-1]


def ode_points():
    lorenz_y0 = _on_the_attractor()
    problems = [
        ("rotation", _rotation, jnp.array([1.0, 0.0]), (2.0, 8.0)),
        ("Lorenz", _lorenz, lorenz_y0, (0.25, 0.5, 1.0, 2.0)),
    ]
    points = []
    for name, field, y0, lengths in problems:
        for length in lengths:
            solver = deer_diffrax.DeerSolver(
                diffrax.Tsit5(),
                num_substeps=int(100 * length),
                max_newton_steps=MAX_STEPS,
                damping=True,
                estimate_lyapunov=True,
            )
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                solver,
                0.0,
                length,
                length,
                y0,
                saveat=diffrax.SaveAt(t1=True, solver_state=True),
                throw=False,
            )
            diag = deer_diffrax.diagnostics(sol)
            ok = bool(sol.result == diffrax.RESULTS.successful)
            points.append(
                (
                    f"{name} L={length}",
                    diag.last_window_growth,
                    int(sol.solver_state.last_newton_steps),
                    ok,
                )
            )
    return points


def lorenz_windows():
    """Lorenz in one window of `L` time units (100 substeps per unit) with the
    default damping: iterations, growth and the distance to the sequential solve."""
    dtype = jnp.zeros(()).dtype
    eps = float(jnp.finfo(dtype).eps)
    y0 = _on_the_attractor()
    print(f"Lorenz, one window, {dtype}, DeerSolver defaults, max 1000 iterations")
    print()
    print(
        "| L | substeps | Newton iterations | converged | LLE x L | "
        "max relative difference to sequential | eps exp(LLE x L) |"
    )
    print("|---|---|---|---|---|---|---|")
    for length in (1, 2, 4, 8, 12, 16):
        substeps = 100 * length
        solver = deer_diffrax.DeerSolver(
            num_substeps=substeps, max_newton_steps=1000, estimate_lyapunov=True
        )
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_lorenz),
            solver,
            0.0,
            float(length),
            float(length),
            y0,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            throw=False,
        )
        sequential = diffrax.diffeqsolve(
            diffrax.ODETerm(_lorenz),
            diffrax.Tsit5(),
            0.0,
            float(length),
            0.01,
            y0,
            max_steps=substeps + 1,
        )
        diag = deer_diffrax.diagnostics(sol)
        ok = bool(sol.result == diffrax.RESULTS.successful)
        difference = float(
            jnp.max(jnp.abs(sol.ys[-1] - sequential.ys[-1]))
            / jnp.max(jnp.abs(sequential.ys[-1]))
        )
        growth = diag.last_window_growth
        print(
            f"| {length} | {substeps} | {diag.most_newton_steps} | "
            f"{'yes' if ok else 'no'} | {growth:.1f} | "
            f"{difference if ok else float('nan'):.1e} | "
            f"{eps * float(jnp.exp(growth)):.1e} |"
        )


def _counting(counts: dict):
    """Patch `DeerSolver` so that every refused window and every window whose
    Newton solve failed adds to `counts` (a host callback; for counting only, not
    for timing). Returns the function that undoes the patch."""
    solver_module = deer_diffrax._solver
    refused_window = solver_module._refused_window
    solve_window = solver_module.DeerSolver._solve_window

    def add(key):
        def callback():
            counts[key] += 1

        jax.debug.callback(callback)

    def counted_refusal(*args):
        add("refused")
        return refused_window(*args)

    def counted_solve(self, *args):
        out = solve_window(self, *args)
        failed = out[-1] != diffrax.RESULTS.successful
        jax.lax.cond(failed, lambda: add("failed"), lambda: None)
        return out

    solver_module._refused_window = counted_refusal
    solver_module.DeerSolver._solve_window = counted_solve

    def undo():
        solver_module._refused_window = refused_window
        solver_module.DeerSolver._solve_window = solve_window

    return undo


def refusal(caps=(None, 2.0, 3.0, 4.0, 6.0), repeats=15):
    """Lorenz over [0, 20] under a PID controller, with and without a bound on the
    predicted growth of a window."""
    term = diffrax.ODETerm(_lorenz)
    y0 = jnp.array([1.0, 1.0, 20.0])
    print(
        "| substeps per window | rtol = atol | max_window_growth | windows accepted | "
        "rejected | of them refused | Newton solves failed | substeps | "
        "Newton iterations (accepted windows) | time / unbounded | final state vs "
        "unbounded |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for substeps, tol in ((100, 1e-3), (100, 1e-6), (1000, 1e-3), (1000, 1e-6)):
        controller = diffrax.PIDController(rtol=tol, atol=tol)
        unbounded = None
        for cap in caps:
            solver = deer_diffrax.DeerSolver(
                num_substeps=substeps, estimate_lyapunov=True, max_window_growth=cap
            )

            def solve(y0, solver=solver, controller=controller):
                return diffrax.diffeqsolve(
                    term,
                    solver,
                    0.0,
                    20.0,
                    None,
                    y0,
                    stepsize_controller=controller,
                    saveat=diffrax.SaveAt(t1=True, solver_state=True),
                    max_steps=4096,
                )

            # The window's step is cached behind a `jit`: clear it around the
            # counted run so that neither run reuses the other's program.
            counts = dict(refused=0, failed=0)
            jax.clear_caches()
            undo = _counting(counts)
            try:
                jax.block_until_ready(jax.jit(solve)(y0).ys)
                jax.effects_barrier()
            finally:
                undo()
                jax.clear_caches()
            counts = dict(counts)
            solve = jax.jit(solve)
            sol = solve(y0)
            jax.block_until_ready(sol.ys)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(solve(y0).ys)
                times.append(time.perf_counter() - start)
            seconds = min(times)
            if unbounded is None:
                unbounded = (seconds, sol.ys[-1])
            diag = deer_diffrax.diagnostics(sol)
            difference = float(jnp.max(jnp.abs(sol.ys[-1] - unbounded[1])))
            print(
                f"| {substeps} | {tol:g} | {cap} | "
                f"{int(sol.stats['num_accepted_steps'])} | "
                f"{int(sol.stats['num_rejected_steps'])} | {counts['refused']} | "
                f"{counts['failed']} | {diag.total_substeps} | "
                f"{diag.total_newton_steps} | {seconds / unbounded[0]:.2f} | "
                f"{difference:.1e} |",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lorenz-windows", action="store_true")
    parser.add_argument("--refusal", action="store_true")
    parser.add_argument("--float32", action="store_true")
    options = parser.parse_args()
    jax.config.update("jax_enable_x64", not options.float32)
    if options.lorenz_windows:
        lorenz_windows()
        return
    if options.refusal:
        refusal()
        return
    points = rnn_points() + ode_points()
    print("| problem | LLE x length | Newton iterations | converged |")
    print("|---|---|---|---|")
    for name, growth, iterations, ok in points:
        print(f"| {name} | {growth:.2f} | {iterations} | {'yes' if ok else 'no'} |")
    figure, axes = plt.subplots(figsize=(6, 4))
    for marker, prefix in (("o", "RNN"), ("s", "rotation"), ("^", "Lorenz")):
        chosen = [p for p in points if p[0].startswith(prefix)]
        axes.scatter(
            [p[1] for p in chosen],
            [p[2] if p[3] else MAX_STEPS for p in chosen],
            marker=marker,
            label=prefix,
        )
    axes.axvline(0.0, color="grey", linewidth=0.8)
    axes.set_yscale("log")
    # Symmetric-log: the contracting RNNs reach -300, the interesting range is near 0.
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set_xlabel("LLE x window length (log growth of perturbations)")
    axes.set_ylabel(f"Newton iterations (failed: {MAX_STEPS})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(OUTPUT, dpi=120)


if __name__ == "__main__":
    main()
