"""Flatten a pytree state into one real vector, and back."""

from collections.abc import Callable

import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


def real_ravel(tree: PyTree[Array]) -> tuple[Array, Callable[[Array], PyTree[Array]]]:
    """Flatten `tree` into a single real vector.

    A complex state is stored as its real parts followed by its imaginary parts, so
    that Newton works with real Jacobians: a vector field of a complex state need
    not be holomorphic (`|y|^2 y`, say), and then its derivative is only real-linear.

    **Arguments:**

    - `tree`: a pytree of arrays (the ODE state).

    **Returns:** `(vector, unravel)`, where `unravel(vector)` rebuilds the pytree.
    """
    flat, unravel = jfu.ravel_pytree(tree)
    if not jnp.iscomplexobj(flat):
        return flat, unravel
    size = flat.shape[0]

    def unravel_complex(vector):
        return unravel(lax.complex(vector[:size], vector[size:]))

    return jnp.concatenate([flat.real, flat.imag]), unravel_complex
