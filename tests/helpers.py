"""Shared pieces of the test suite: problems, solvers, comparisons."""

import diffrax
import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.tree_util as jtu


EXPLICIT_RK_SOLVERS = [
    diffrax.Euler,
    diffrax.Heun,
    diffrax.Midpoint,
    diffrax.Ralston,
    diffrax.Bosh3,
    diffrax.Tsit5,
    diffrax.Dopri5,
    diffrax.Dopri8,
]


def equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (loop bodies,
    branches, inner jits)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from equations(sub)


def max_relative_difference(a, b):
    """max |a - b| / max |b| over all leaves (a scale-aware relative difference)."""
    diffs = jtu.tree_leaves(jtu.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
    scales = jtu.tree_leaves(jtu.tree_map(lambda y: jnp.max(jnp.abs(y)), b))
    return float(max(diffs) / max(max(scales), 1e-300))


class Problem(eqx.Module):
    """A test ODE: vector field, initial state, interval and args."""

    name: str = eqx.field(static=True)
    vector_field: object
    y0: object
    t1: float = eqx.field(static=True)
    args: object = None

    @property
    def term(self):
        return diffrax.ODETerm(self.vector_field)


def _decay(t, y, args):
    return -0.7 * y


def _complex_linear(t, y, args):
    return args @ y


def _lotka_volterra(t, y, args):
    prey, predator = y[0], y[1]
    return jnp.stack([1.5 * prey - prey * predator, -3.0 * predator + prey * predator])


def _van_der_pol(t, y, args):
    x, v = y[0], y[1]
    return jnp.stack([v, (1 - x**2) * v - x])


def _pendulum(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - 0.05 * y[1]])


def _dict_state(t, y, args):
    return {
        "position": y["velocity"],
        "velocity": -y["position"] - 0.2 * y["velocity"],
        "scalar": -0.5 * y["scalar"] + jnp.sum(y["position"]) * 0.1,
    }


class _MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return 0.5 * jnp.tanh(self.mlp(y)) - 0.1 * y


def make_mlp_field(size=64, seed=0):
    mlp = eqx.nn.MLP(size, size, width_size=64, depth=2, key=jax.random.PRNGKey(seed))
    return _MLPField(mlp)


def problems():
    """The standard test problems: name -> Problem."""
    rotation = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
    y_mlp = jax.random.normal(jax.random.PRNGKey(1), (64,))
    out = [
        Problem("decay", _decay, jnp.array([1.0, 2.0, -0.5]), 3.0),
        Problem(
            "complex_linear", _complex_linear, jnp.array([1.0, 0.5]), 4.0, rotation
        ),
        Problem("lotka_volterra", _lotka_volterra, jnp.array([4.0, 2.0]), 4.0),
        Problem("van_der_pol", _van_der_pol, jnp.array([2.0, 0.0]), 6.0),
        Problem("pendulum", _pendulum, jnp.array([2.5, 0.0]), 40.0),
        Problem(
            "dict_state",
            _dict_state,
            {
                "position": jnp.array([1.0, -0.5]),
                "velocity": jnp.array([0.0, 0.3]),
                "scalar": jnp.array(2.0),
            },
            5.0,
        ),
        Problem("mlp64", make_mlp_field(), y_mlp, 3.0),
    ]
    return {p.name: p for p in out}


PROBLEMS = problems()


def check_scan_under_jit_vmap_and_grad(damping, jacobian):
    """`deer_diffrax.scan` with `damping` over a batch of two input sequences of a
    GRU, under `jit`, `vmap` and `grad` (with respect to the cell's weights): every
    scan succeeds, and values and gradients match `jax.lax.scan`'s to 1e-9."""
    import optimistix as optx

    import deer_diffrax

    cell = eqx.nn.GRUCell(3, 4, key=jax.random.key(0))
    cell = jtu.tree_map(lambda x: 2.0 * x if eqx.is_array(x) else x, cell)
    xs = jax.random.normal(jax.random.key(1), (2, 200, 3))
    h0 = jnp.zeros(4)

    def final(cell, xs, parallel):
        step = lambda h, x: (cell(x, h), None)
        if parallel:
            out, stats = deer_diffrax.scan(
                step,
                h0,
                xs,
                jacobian=jacobian,
                damping=damping,
                throw=False,
                return_stats=True,
            )
            return jnp.sum(out[0] ** 2), stats.result
        return jnp.sum(jax.lax.scan(step, h0, xs)[0] ** 2), None

    def value_and_grad(parallel):
        fn = eqx.filter_value_and_grad(lambda c, x: final(c, x, parallel)[0])
        return eqx.filter_jit(eqx.filter_vmap(fn, in_axes=(None, 0)))(cell, xs)

    (value, grad), (value_ref, grad_ref) = value_and_grad(True), value_and_grad(False)
    results = eqx.filter_vmap(lambda x: final(cell, x, True)[1])(xs)
    assert bool(jnp.all(results == optx.RESULTS.successful))
    assert max_relative_difference(value, value_ref) <= 1e-9
    grads = jtu.tree_leaves(eqx.filter(grad, eqx.is_array))
    grads_ref = jtu.tree_leaves(eqx.filter(grad_ref, eqx.is_array))
    assert max_relative_difference(grads, grads_ref) <= 1e-9
