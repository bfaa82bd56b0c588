"""Time one Neural ODE training step with `DeerSolver` and with sequential Diffrax.

    python benchmarks/train_step.py                       # T = 1k and 10k substeps
    python benchmarks/train_step.py --lengths 1e3,1e4,1e5 --window 10000  # GPU sizes

A training step is what `examples/neural_ode.py` runs: the loss (mean squared error
of a batch of trajectories at `--num-saves` observation times), its gradient with
respect to the MLP vector field (`eqx.filter_value_and_grad`, default
`RecursiveCheckpointAdjoint`) and an Adam update, all in one `eqx.filter_jit`.

For a sequence of `T` substeps of Tsit5 (step `--dt`, so the interval is `T dt`):

- `sequential`: `diffeqsolve(term, Tsit5(), 0, T dt, dt, y0)`, one Diffrax step per
    substep;
- `deer`: `diffeqsolve(term, DeerSolver(Tsit5(), num_substeps=W), 0, T dt, W dt, y0)`
    with `W = min(T, --window)`: `T / W` windows of `W` substeps, each solved by
    Newton's method with associative scans.

Both compute the same discrete trajectory and gradient; the table shows the
gradients' relative difference as a check (float32 by default: expect about 1e-5,
the Newton tolerance; `--float64` for about 1e-15). The vector field
`y' = tanh(mlp(y)) - y + sin(t) / 2` is contracting, so Newton converges in a few
iterations per window (column "Newton": the mean per window).

Timing: every step function is called once to compile and warm up, then `--repeats`
times on the same inputs (`block_until_ready`); the table reports the fastest, and
the last column the time of the first call (mostly compilation).

What to expect: each Newton iteration does about the arithmetic of a whole
sequential pass (more with the Jacobian probes and `n x n` block products), in a
few large array operations instead of `T` small steps. On a CPU the outcome depends
on which dominates: with a small state and a small batch, Diffrax's per-step overhead
in the sequential loop (and its checkpointed backward pass) can cost more than
DeerSolver's few Newton iterations; with more arithmetic per step DEER loses on a
CPU. Its parallelism over time pays off on a GPU/TPU.
"""

import argparse
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from _common import best_time

from deer_diffrax import DeerSolver


class Field(eqx.Module):
    """`y' = tanh(mlp(y)) - y + sin(t) / 2`: a neural vector field that is
    contracting for small weights, as a trained Neural ODE on stable data tends to
    be. The forcing keeps the state moving, so that every window, not only the
    first, needs Newton iterations (an unforced contracting field settles and later
    windows converge at once)."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jnp.tanh(self.mlp(y)) - y + 0.5 * jnp.sin(t)


def make_train_step(solver, dt0, t1, num_saves, max_steps, optimiser):
    """A jitted training step `(field, opt_state, y0s, targets) -> (field,
    opt_state, loss, grads, newton_per_window)` for the given solver and step size
    (the gradient is returned too, to check the two solvers against each other)."""
    ts = jnp.linspace(t1 / num_saves, t1, num_saves)
    deer = isinstance(solver, DeerSolver)

    def loss_fn(field, y0s, targets):
        def solve(y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                solver,
                0.0,
                t1,
                dt0,
                y0,
                saveat=diffrax.SaveAt(ts=ts, solver_state=deer),
                stepsize_controller=diffrax.ConstantStepSize(),
                max_steps=max_steps,
            )
            if deer:
                state = sol.solver_state
                newton = state.total_newton_steps / state.num_windows
            else:
                newton = jnp.array(0.0)
            return sol.ys, newton

        ys, newton = jax.vmap(solve)(y0s)
        return jnp.mean((ys - targets) ** 2), jnp.mean(newton)

    @eqx.filter_jit
    def step(field, opt_state, y0s, targets):
        (loss, newton), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            field, y0s, targets
        )
        updates, opt_state = optimiser.update(grads, opt_state)
        return eqx.apply_updates(field, updates), opt_state, loss, grads, newton

    return step


def _relative_difference(a, b):
    """max |a - b| / max |b| over the arrays of two gradients."""
    a = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    b = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    difference = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))
    return difference / max(float(jnp.max(jnp.abs(y))) for y in b)


def time_step(step, inputs, repeats):
    """The first call's time (compilation included), then the best of `repeats`
    calls, in seconds, and the output."""
    start = time.perf_counter()
    out = jax.block_until_ready(step(*inputs))
    warmup = time.perf_counter() - start
    return best_time(step, inputs, repeats)[0], warmup, out


def main(
    lengths=(1_000, 10_000),
    window=1_000,
    batch=4,
    state_size=2,
    width=32,
    depth=2,
    dt=0.01,
    num_saves=20,
    repeats=5,
    seed=0,
):
    """Print the table; return its rows as dicts."""
    kfield, ky0, ktarget = jr.split(jr.key(seed), 3)
    mlp = eqx.nn.MLP(state_size, state_size, width, depth, key=kfield)
    field = Field(mlp)
    y0s = jr.normal(ky0, (batch, state_size))
    targets = 0.1 * jr.normal(ktarget, (batch, num_saves, state_size))
    optimiser = optax.adam(1e-3)
    opt_state = optimiser.init(eqx.filter(field, eqx.is_inexact_array))
    inputs = (field, opt_state, y0s, targets)

    dtype = jnp.result_type(float)
    print(
        f"Neural ODE training step (loss + gradient + Adam), Tsit5, state size "
        f"{state_size}, MLP width {width} depth {depth}, batch {batch}, "
        f"{num_saves} saves, {dtype}, {repeats} repeats (fastest), on "
        f"{jax.devices()[0].platform.upper()}"
    )
    header = (
        f"{'T':>8}  {'windows x W':>12}  {'Newton':>6}  {'sequential':>11}  "
        f"{'DeerSolver':>11}  {'DEER/seq':>8}  {'grad rel.diff':>13}  "
        f"{'compile s (seq/deer)':>20}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for length in lengths:
        t1 = length * dt
        substeps = min(length, window)
        if length % substeps:
            raise ValueError(f"T = {length} is not a multiple of the window {window}.")
        num_windows = length // substeps
        deer = DeerSolver(diffrax.Tsit5(), num_substeps=substeps)
        # Headroom in `max_steps`: in float32, with `SaveAt(ts=...)` and the default
        # `RecursiveCheckpointAdjoint`, Diffrax 0.7's gradient was measured 2-10% off
        # when `max_steps` is within a step or two of the steps taken (T = 200:
        # 9.7% off the float64 gradient, 3e-7 with `max_steps = 256`), which would
        # make the sequential gradient a bad yardstick.
        seq_step = make_train_step(
            diffrax.Tsit5(), dt, t1, num_saves, 2 * length, optimiser
        )
        deer_step = make_train_step(
            deer, t1 / num_windows, t1, num_saves, num_windows + 1, optimiser
        )
        seq_time, seq_warmup, seq_out = time_step(seq_step, inputs, repeats)
        deer_time, deer_warmup, deer_out = time_step(deer_step, inputs, repeats)
        row = dict(
            length=length,
            num_windows=num_windows,
            substeps=substeps,
            newton=float(deer_out[4]),
            sequential_s=seq_time,
            deer_s=deer_time,
            ratio=deer_time / seq_time,
            grad_difference=_relative_difference(deer_out[3], seq_out[3]),
        )
        rows.append(row)
        print(
            f"{length:>8}  {f'{num_windows} x {substeps}':>12}  "
            f"{row['newton']:>6.1f}  {seq_time * 1e3:>8.1f} ms  "
            f"{deer_time * 1e3:>8.1f} ms  {row['ratio']:>7.2f}x  "
            f"{row['grad_difference']:>13.1e}  "
            f"{f'{seq_warmup:.1f} / {deer_warmup:.1f}':>20}"
        )
    return rows


def _lengths(text):
    return tuple(int(float(x)) for x in text.split(","))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=_lengths, default=(1_000, 10_000))
    parser.add_argument(
        "--window", type=int, default=1_000, help="substeps per DEER window"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--state-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dt", type=float, default=0.01)
    parser.add_argument("--num-saves", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true")
    args = vars(parser.parse_args())
    if args.pop("float64"):
        jax.config.update("jax_enable_x64", True)
    main(**args)
