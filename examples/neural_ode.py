"""Train a Neural ODE on 2-D spiral trajectories, with `DeerSolver` and with
sequential Diffrax, and compare the two training runs.

The data are spirals: trajectories of `y' = A tanh(2 y) / 2` (`A` a decaying
rotation; near the origin this is the linear spiral `y' = A y`, further out the
rotation slows down) from random initial states on a ring. The model is
`y' = f_theta(y)` with `f_theta` an `eqx.nn.MLP`; the loss is the mean squared error
between the observed and the predicted trajectories at the observation times, and
training is Adam on minibatches (optax).

`train(solver, dt0, ...)` takes the solver as an argument. `main()` trains the same
model from the same initial parameters, on the same minibatches, twice:

- with `DeerSolver()` (Tsit5 substeps), one Diffrax step being a window of
    `num_substeps` substeps solved in parallel by Newton's method;
- with sequential `diffrax.Tsit5()` on the same grid, `dt0 = window / num_substeps`.

DeerSolver computes the sequential trajectory of the same discretisation (to its
Newton tolerance, in float64 about rounding level) and its gradient through the
implicit function theorem, so both runs take the same optimiser steps and the two
loss curves agree to many digits; the final losses are printed side by side.

On a CPU the DeerSolver run is *slower*: each Newton iteration does the work of a
sequential solve, and that work is only fast when it runs in parallel (GPU/TPU).

    python examples/neural_ode.py                       # default run, a few minutes
    python examples/neural_ode.py --steps 5 --dataset-size 8 --batch-size 4 \
        --num-times 8 --num-substeps 10 --width 8 --output tiny.png   # smoke run
"""

import argparse
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from deer_diffrax import DeerSolver


# DeerSolver's default Newton tolerance follows the dtype (about 2e-11 in float64):
# in float64 both runs agree to near rounding, so their loss curves coincide.
jax.config.update("jax_enable_x64", True)


# The true dynamics: a decaying rotation, saturated by a tanh.
_SPIRAL = jnp.array([[-0.3, 1.5], [-1.5, -0.3]])


def spiral(t, y, args):
    return 0.5 * _SPIRAL @ jnp.tanh(2 * y)


def make_dataset(
    key: PRNGKeyArray, dataset_size: int, ts: Float[Array, " times"]
) -> Float[Array, "dataset times 2"]:
    """Trajectories of the spiral from initial states on the ring
    `0.5 <= |y0| <= 1.5`, observed at `ts`, from an accurate adaptive solve."""
    kradius, kangle = jr.split(key)
    radius = jr.uniform(kradius, (dataset_size,), minval=0.5, maxval=1.5)
    angle = jr.uniform(kangle, (dataset_size,), maxval=2 * jnp.pi)
    y0 = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)

    def solve(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(spiral),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            None,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
            max_steps=100_000,
        )
        return sol.ys

    return jax.jit(jax.vmap(solve))(y0)


class NeuralODE(eqx.Module):
    """`y' = mlp(y)`, solved by the solver it is given on a constant grid `dt0`.

    The solver is a field of the model: it has no arrays, so Equinox's filtered
    transformations treat it as static, and the same training code runs with
    either solver.
    """

    mlp: eqx.nn.MLP
    solver: diffrax.AbstractSolver
    dt0: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(self, solver, dt0, max_steps, width, depth, *, key):
        self.mlp = eqx.nn.MLP(
            in_size=2,
            out_size=2,
            width_size=width,
            depth=depth,
            activation=jnp.tanh,
            key=key,
        )
        self.solver = solver
        self.dt0 = dt0
        self.max_steps = max_steps

    def __call__(self, ts: Float[Array, " times"], y0: Float[Array, "2"]):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: self.mlp(y)),
            self.solver,
            ts[0],
            ts[-1],
            self.dt0,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            # Constant steps: for DeerSolver one step is one window, so both
            # solvers integrate on exactly the same grid of substeps.
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=self.max_steps,
        )
        return sol.ys


def minibatches(key: PRNGKeyArray, dataset_size: int, batch_size: int):
    """Indices of random minibatches, a new permutation every epoch (forever)."""
    while True:
        key, subkey = jr.split(key)
        permutation = np.asarray(jr.permutation(subkey, dataset_size))
        for start in range(0, dataset_size - batch_size + 1, batch_size):
            yield permutation[start : start + batch_size]


def train(
    solver: diffrax.AbstractSolver,
    dt0: float,
    ts: Float[Array, " times"],
    ys: Float[Array, "dataset times 2"],
    *,
    steps: int = 200,
    batch_size: int = 16,
    learning_rate: float = 1e-2,
    width: int = 32,
    depth: int = 2,
    seed: int = 0,
) -> tuple[NeuralODE, list[float], float]:
    """Fit a `NeuralODE` integrated by `solver` (on a constant grid of step `dt0`)
    to the trajectories `ys` observed at `ts`.

    The seed fixes the initial parameters and the minibatch order, so two calls that
    differ only in the solver see the same parameters and batches.

    **Returns:** the trained model, the loss at every step (before that step's
    update) and the mean time per step after the first (compilation) step.
    """
    model_key, loader_key = jr.split(jr.key(seed))
    # One spare step in case rounding splits off a last, tiny step.
    max_steps = int(np.ceil(float(ts[-1] - ts[0]) / dt0)) + 1
    model = NeuralODE(solver, dt0, max_steps, width, depth, key=model_key)
    # Decaying the learning rate lets the last steps settle instead of jittering
    # around the minimum at the initial rate.
    optimiser = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, ys_batch):
        predictions = jax.vmap(model, in_axes=(None, 0))(ts, ys_batch[:, 0])
        return jnp.mean((predictions - ys_batch) ** 2)

    @eqx.filter_jit
    def step(model, opt_state, ys_batch):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, ys_batch)
        updates, opt_state = optimiser.update(grads, opt_state)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss

    losses = []
    batches = minibatches(loader_key, ys.shape[0], batch_size)
    start = time.perf_counter()
    for i in range(steps):
        model, opt_state, loss = step(model, opt_state, ys[next(batches)])
        losses.append(float(loss))  # also waits for the step to finish
        if i == 0:
            start = time.perf_counter()
    time_per_step = (time.perf_counter() - start) / max(steps - 1, 1)
    return model, losses, time_per_step


@eqx.filter_jit
def predict(model, ts, y0s):
    """The model's trajectories at `ts` from each of the initial states `y0s`."""
    return jax.vmap(model, in_axes=(None, 0))(ts, y0s)


def plot(path, ts, ys, predictions, num_shown=4):
    """Observed trajectories (dots) and predicted ones from the same initial states
    (lines), one panel per model (`predictions`: title -> trajectories)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    fig = Figure(figsize=(5 * len(predictions), 5))
    for i, (title, predicted) in enumerate(predictions.items()):
        ax = fig.add_subplot(1, len(predictions), i + 1)
        for j in range(num_shown):
            (line,) = ax.plot(ys[j, :, 0], ys[j, :, 1], ".", markersize=4)
            ax.plot(predicted[j, :, 0], predicted[j, :, 1], "-", color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("$y_1$")
        ax.set_ylabel("$y_2$")
        ax.set_aspect("equal")
    fig.suptitle("Neural ODE fit: data (dots) and model (lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(
    steps: int = 200,
    dataset_size: int = 256,
    batch_size: int = 16,
    num_times: int = 40,
    t1: float = 5.0,
    num_windows: int = 2,
    num_substeps: int = 100,
    width: int = 32,
    depth: int = 2,
    learning_rate: float = 1e-2,
    seed: int = 0,
    print_every: int = 20,
    output: str = "neural_ode.png",
) -> dict[str, float]:
    """Train with DeerSolver and with sequential Tsit5 on the same grid, print both
    loss curves and save a plot of the fitted trajectories to `output`.

    **Returns:** the final loss of each run (mean squared error of the trained model
    on the whole dataset), keyed `"deer"` and `"sequential"`.
    """
    ts = jnp.linspace(0.0, t1, num_times)
    ys = make_dataset(jr.key(seed + 1), dataset_size, ts)
    window = t1 / num_windows
    deer = DeerSolver(diffrax.Tsit5(), num_substeps=num_substeps)
    common = dict(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        width=width,
        depth=depth,
        seed=seed,
    )
    print(
        f"{dataset_size} spirals on [0, {t1}], {num_times} observations each; "
        f"{num_windows} windows x {num_substeps} Tsit5 substeps "
        f"(sequential dt = {window / num_substeps:g})"
    )
    deer_model, deer_losses, deer_time = train(deer, window, ts, ys, **common)
    seq_model, seq_losses, seq_time = train(
        diffrax.Tsit5(), window / num_substeps, ts, ys, **common
    )

    # The fitted models on the whole dataset: the final loss of each run.
    predictions = {
        "DeerSolver": predict(deer_model, ts, ys[:, 0]),
        "sequential Tsit5": predict(seq_model, ts, ys[:, 0]),
    }
    final = {k: float(jnp.mean((v - ys) ** 2)) for k, v in predictions.items()}

    print(f"{'step':>6}  {'DeerSolver':>14}  {'sequential':>14}  {'rel. diff':>9}")
    for i in sorted({*range(0, steps, print_every), steps - 1}):
        a, b = deer_losses[i], seq_losses[i]
        print(f"{i:>6}  {a:>14.8e}  {b:>14.8e}  {abs(a - b) / abs(b):>9.1e}")
    print("(minibatch loss before each step's update)")
    print(f"final loss on all {dataset_size} trajectories:")
    print(f"  DeerSolver : {final['DeerSolver']:.12e}")
    print(f"  sequential : {final['sequential Tsit5']:.12e}")
    print(
        f"time per training step: DeerSolver {deer_time * 1e3:.1f} ms, sequential "
        f"{seq_time * 1e3:.1f} ms on {jax.devices()[0].platform.upper()}"
    )

    plot(output, ts, ys, predictions)
    print(f"saved {output}")
    return {"deer": final["DeerSolver"], "sequential": final["sequential Tsit5"]}


def _parse_args():
    # One flag per parameter of `main`, with its default and type.
    defaults = main.__defaults__
    names = main.__code__.co_varnames[: main.__code__.co_argcount]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in zip(names, defaults, strict=True):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(default), default=default
        )
    return parser.parse_args()


if __name__ == "__main__":
    main(**vars(_parse_args()))
