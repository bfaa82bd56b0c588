"""The accuracy panel shared by the float64 tests and the float32 subprocess: every
parameter comes from NumPy in float32, so both precisions solve the same problem."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


TOTAL_SUBSTEPS = 1200
WINDOW_COUNTS = (1, 10, 100)
# Jacobian modes, and "lm": full Newton damped by `LevenbergMarquardt`.
MODES = ("full", "diagonal", "lm")


def _pendulum(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - 0.05 * y[1]])


def _rotation(t, y, args):
    # Two damped rotations coupled through a weak nonlinearity: what a diagonal
    # Jacobian leaves out (the rotation) is most of the dynamics.
    return args @ y + 0.1 * jnp.tanh(y[::-1])


def _van_der_pol(t, y, args):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def _lotka_volterra(t, y, args):
    return jnp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def _mlp_field(t, y, mlp):
    return 0.5 * jnp.tanh(mlp(y)) - 0.1 * y


def _mlp(size: int, seed: int) -> eqx.nn.MLP:
    mlp = eqx.nn.MLP(size, size, width_size=32, depth=2, key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if not eqx.is_array(leaf):
            return leaf
        fan_in = leaf.shape[-1] if leaf.ndim == 2 else 32
        values = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        return values.astype(np.float32)

    return jtu.tree_map(draw, mlp)


_ROTATION = np.array(
    [[-0.1, 1.0, 0, 0], [-1.0, -0.1, 0, 0], [0, 0, -0.1, 2.0], [0, 0, -2.0, -0.1]],
    dtype=np.float32,
)

# name -> (vector field, y0, t1, args)
PROBLEMS = {
    "pendulum": (_pendulum, np.array([2.5, 0.0], np.float32), 10.0, None),
    "rotation": (
        _rotation,
        np.array([1.0, 0.0, -1.0, 0.5], np.float32),
        10.0,
        _ROTATION,
    ),
    "van_der_pol": (_van_der_pol, np.array([2.0, 0.0], np.float32), 4.0, None),
    "lotka_volterra": (_lotka_volterra, np.array([4.0, 2.0], np.float32), 4.0, None),
    "mlp": (
        _mlp_field,
        np.random.default_rng(1).standard_normal(8).astype(np.float32),
        3.0,
        _mlp(8, seed=2),
    ),
}


def cast(tree, dtype):
    """Every floating leaf of `tree` as a JAX array of `dtype`."""

    def leaf(x):
        if eqx.is_array(x) and np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(x, dtype)
        return x

    return jtu.tree_map(leaf, tree)


def solve(name, dtype, windows=None, mode="full"):
    """The final state of problem `name` in `dtype`: sequential Tsit5 with
    `TOTAL_SUBSTEPS` steps (`windows=None`), or DeerSolver with that many windows
    over the same grid. Returns `(y1, successful, total Newton iterations)`."""
    from deer_diffrax import DeerSolver, diagnostics, LevenbergMarquardt

    field, y0, t1, args = PROBLEMS[name]
    y0, args = cast(y0, dtype), cast(args, dtype)
    t0, t1 = jnp.asarray(0.0, dtype), jnp.asarray(t1, dtype)
    term = diffrax.ODETerm(field)
    if windows is None:
        solver, dt0, max_steps = diffrax.Tsit5(), t1 / TOTAL_SUBSTEPS, TOTAL_SUBSTEPS
    else:
        options = (
            dict(jacobian="full", damping=LevenbergMarquardt())
            if mode == "lm"
            else dict(jacobian=mode)
        )
        solver = DeerSolver(
            num_substeps=TOTAL_SUBSTEPS // windows, max_newton_steps=100, **options
        )
        dt0, max_steps = t1 / windows, windows
    sol = diffrax.diffeqsolve(
        term,
        solver,
        t0,
        t1,
        dt0,
        y0,
        args=args,
        max_steps=max_steps + 1,
        throw=False,
        saveat=diffrax.SaveAt(t1=True, solver_state=windows is not None),
    )
    ok = bool(sol.result == diffrax.RESULTS.successful)
    iterations = None if windows is None else diagnostics(sol).total_newton_steps
    return np.asarray(sol.ys[-1], np.float64), ok, iterations
