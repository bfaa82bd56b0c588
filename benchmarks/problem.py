"""The benchmark problem (a contracting forced system integrated with Tsit5 on a
constant grid) and the solvers that compute its trajectory: sequential Diffrax, two
`jax.lax.scan` loops and DeerSolver."""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from deer_diffrax import DeerSolver


STEP_SIZE = 0.01  # time units per Tsit5 step: t1 = T * STEP_SIZE


# The ODE problem and the three solvers


def vector_field(t, y, args):
    """`y' = -y + 0.5 tanh(W y) + 0.5 sin(w t)`: contracting (W orthogonal)."""
    weight, freq = args
    return -y + 0.5 * jnp.tanh(weight @ y) + 0.5 * jnp.sin(freq * t)


TERM = diffrax.ODETerm(vector_field)


def make_problem(size: int, batch: int, dtype, seed: int = 0):
    """Parameters `(W, w)` and a batch of initial conditions `y0s` (batch, n)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(size, size)))
    weight = q * np.sign(np.diag(r))  # a random orthogonal matrix
    freq = 0.5 + rng.uniform(size=size)
    y0s = rng.normal(size=(batch, size))
    params = (jnp.asarray(weight, dtype), jnp.asarray(freq, dtype))
    return params, jnp.asarray(y0s, dtype)


def time_grid(num_steps: int, dtype):
    """`t0, t1` and the grid `t_k = t0 + (t1 - t0) k / T`, computed as Diffrax's
    `ConstantStepSize` does."""
    t0 = jnp.asarray(0.0, dtype)
    t1 = jnp.asarray(num_steps * STEP_SIZE, dtype)
    fractions = jnp.arange(num_steps + 1, dtype=dtype) / jnp.asarray(num_steps, dtype)
    ts = (t0 + (t1 - t0) * fractions).at[-1].set(t1)
    return t0, t1, ts


def solve_sequential(y0, params, num_steps: int):
    """Sequential Diffrax: `num_steps` Tsit5 steps, final state only."""
    t0, t1, _ = time_grid(num_steps, y0.dtype)
    sol = diffrax.diffeqsolve(
        TERM,
        diffrax.Tsit5(),
        t0,
        t1,
        (t1 - t0) / num_steps,
        y0,
        params,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=num_steps + 1,
    )
    return sol.ys[-1], jnp.asarray(sol.stats["num_steps"])


def solve_scan(y0, params, num_steps: int):
    """A hand-written `jax.lax.scan` over `Tsit5().step` on the same grid (first same
    as last: the state carries the last stage, as Diffrax does)."""
    solver = diffrax.Tsit5()
    _, _, ts = time_grid(num_steps, y0.dtype)
    state = solver.init(TERM, ts[0], ts[1], y0, params)

    def body(carry, times):
        y, state = carry
        t_start, t_end = times
        y, _, _, state, _ = solver.step(
            TERM, t_start, t_end, y, params, state, made_jump=False
        )
        return (y, state), None

    (y1, _), _ = jax.lax.scan(body, (y0, state), (ts[:-1], ts[1:]))
    return y1, jnp.asarray(num_steps)


def solve_scan_unrolled(y0, params, num_steps: int):
    """The leanest sequential baseline: `jax.lax.scan` over a Tsit5 step written out
    stage by stage (Diffrax's step runs its stages in an inner loop, which costs a
    lot per step on a GPU). Same tableau and grid; equal up to rounding."""
    tableau = diffrax.Tsit5.tableau
    dtype = y0.dtype
    _, _, ts = time_grid(num_steps, dtype)
    # Stages 1..6 give y1 (b_sol's last entry, the first-same-as-last stage, is 0).
    num_stages = int(np.count_nonzero(np.asarray(tableau.b_sol))) + 1
    b_sol = [float(b) for b in tableau.b_sol[: num_stages - 1]]
    b_sol += [0.0] * (num_stages - len(b_sol))

    def body(y, times):
        t_start, t_end = times
        dt = t_end - t_start
        ks = [vector_field(t_start, y, params)]
        for c, a in zip(tableau.c[: num_stages - 1], tableau.a_lower, strict=False):
            increment = sum(float(a_j) * k for a_j, k in zip(a, ks, strict=True))
            ks.append(vector_field(t_start + float(c) * dt, y + dt * increment, params))
        y = y + dt * sum(b * k for b, k in zip(b_sol, ks, strict=True) if b != 0)
        return y, None

    y1, _ = jax.lax.scan(body, y0, (ts[:-1], ts[1:]))
    return y1, jnp.asarray(num_steps)


def solve_deer(y0, params, num_steps: int, mode: str, windows: int, options=None):
    """DeerSolver: `windows` Diffrax steps of `num_steps // windows` parallel
    substeps each. Returns the final state and `(newton_iterations, ok)`."""
    t0, t1, _ = time_grid(num_steps, y0.dtype)
    solver = DeerSolver(
        diffrax.Tsit5(),
        num_substeps=num_steps // windows,
        jacobian=mode,
        **(options or {}),
    )
    sol = diffrax.diffeqsolve(
        TERM,
        solver,
        t0,
        t1,
        (t1 - t0) / windows,
        y0,
        params,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=windows + 1,
        throw=False,
    )
    ok = sol.result == diffrax.RESULTS.successful
    return sol.ys[-1], (sol.solver_state.total_newton_steps, ok)


def batched(solve: Callable, batch: int) -> Callable:
    """Batch 1: the plain solve of `y0s[0]`; otherwise `jax.vmap` over `y0s`."""
    if batch == 1:
        return lambda y0s, params: jax.tree.map(
            lambda x: x[None], solve(y0s[0], params)
        )
    return jax.vmap(solve, in_axes=(0, None))


def forward(solve: Callable, batch: int) -> Callable:
    """`(y0s, params) -> (final states, stats)`."""
    return batched(solve, batch)


def forward_backward(solve: Callable, batch: int) -> Callable:
    """`(y0s, params) -> ((loss, stats), gradients)` of `mean_b sum(y_b(t1)^2)`."""
    solve_all = batched(solve, batch)

    def loss(params, y0s):
        final, stats = solve_all(y0s, params)
        return jnp.mean(jnp.sum(final**2, axis=-1)), stats

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return lambda y0s, params: grad(params, y0s)


def split_output(output, pass_: str):
    """(the values compared between solvers, the solver's stats)."""
    if pass_ == "fwd":
        final, stats = output
        return final, stats
    (loss, stats), grads = output
    return grads, stats


# --------------------------------------------------------------------------------------
