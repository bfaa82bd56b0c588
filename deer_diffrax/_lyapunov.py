"""The largest Lyapunov exponent of the linearised dynamics along a trajectory.

Newton's linear recurrences amplify errors by the products `J_j ... J_i` of the step
Jacobians, so the growth rate of those products (the largest Lyapunov exponent,
LLE) says how hard the trajectory is for DEER: negative, Newton converges in a few
iterations at any length; positive, the linearised recurrence amplifies like
`exp(LLE x length)` and a long window needs many iterations or fails.

The estimate is the growth of one long product `P = J_{T-1} ... J_1`, computed by a
balanced tree of pairwise products (depth `O(log T)`, `O(T n^3)` work, about half
an associative scan of the same blocks). Every partial product is divided by its
Frobenius norm and the logarithms of the norms are summed, so nothing overflows or
underflows however long the window. Products of normalised matrices are accurate
for the *largest* exponent (they are a power iteration; only the smaller exponents
need the re-orthogonalisation of a QR method), which is the one that matters here.
The growth of a unit vector `v` through `P` is then `log |P v|`: with `v` carried
from window to window (`v <- P v / |P v|`) the estimates of consecutive windows
add up to that of the whole trajectory, as in the classical sequential method.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Inexact


def _normalised_product(blocks: Array) -> tuple[Array, Array]:
    """`(P / s, log s)` for `P = blocks[-1] @ ... @ blocks[0]` over the leading axis,
    with the matrices in the last two axes and any axes between batched."""
    norms = jnp.sqrt(jnp.sum(jnp.abs(blocks) ** 2, axis=(-2, -1)))
    safe = jnp.where(norms > 0, norms, 1)
    blocks = blocks / safe[..., None, None]
    logs = jnp.log(norms)  # -inf for a zero block: the product is zero
    eye = jnp.broadcast_to(
        jnp.eye(blocks.shape[-1], dtype=blocks.dtype), blocks.shape[1:]
    )
    # A Python loop over the log2(T) levels of the tree, each level one batched
    # matrix product: the depth is logarithmic in T.
    while blocks.shape[0] > 1:
        if blocks.shape[0] % 2:
            blocks = jnp.concatenate([blocks, eye[None]])
            logs = jnp.concatenate([logs, jnp.zeros_like(logs[:1])])
        earlier, later = blocks[0::2], blocks[1::2]
        product = jnp.matmul(later, earlier, precision=jax.lax.Precision.HIGHEST)
        norms = jnp.sqrt(jnp.sum(jnp.abs(product) ** 2, axis=(-2, -1)))
        safe = jnp.where(norms > 0, norms, 1)
        blocks = product / safe[..., None, None]
        logs = logs[0::2] + logs[1::2] + jnp.log(norms)
    return blocks[0], logs[0]


def trajectory_growth(
    blocks: Inexact[Array, "T n n"] | Inexact[Array, "T n"] | Inexact[Array, "T m k k"],
) -> tuple[Inexact[Array, "n n"], Float[Array, ""]]:
    """The product of the step Jacobians `blocks[-1] @ ... @ blocks[0]` as a dense
    `n x n` matrix `M` of Frobenius norm about 1 and the logarithm `s` of its scale:
    the product is `exp(s) M`.

    **Arguments:**

    - `blocks`: the Jacobians in any layout of
        [`deer_diffrax.BlockBidiagonalOperator`][]: dense `(T, n, n)`, diagonal
        `(T, n)` or block-diagonal `(T, n / k, k, k)`.
    """
    if blocks.shape[0] == 0:
        size = blocks.shape[1] * (blocks.shape[2] if blocks.ndim == 4 else 1)
        return jnp.eye(size, dtype=blocks.dtype), jnp.zeros((), jnp.real(blocks).dtype)
    if blocks.ndim == 2:
        # Diagonal: every entry is its own scalar product, a sum of logarithms.
        logs = jnp.sum(jnp.log(jnp.abs(blocks)), axis=0)
        signs = jnp.prod(jnp.sign(blocks), axis=0)
        scale = jnp.max(logs)
        scale = jnp.where(jnp.isfinite(scale), scale, 0)
        return jnp.diag(signs * jnp.exp(logs - scale)), scale
    if blocks.ndim == 4:
        products, logs = _normalised_product(blocks)
        scale = jnp.max(logs)
        scale = jnp.where(jnp.isfinite(scale), scale, 0)
        weighted = products * jnp.exp(logs - scale)[:, None, None]
        return jax.scipy.linalg.block_diag(*weighted), scale
    return _normalised_product(blocks)


def vector_growth(
    product: Inexact[Array, "n n"],
    scale: Float[Array, ""],
    vector: Inexact[Array, " n"],
) -> tuple[Float[Array, ""], Inexact[Array, " n"]]:
    """`log |P v|` and `P v / |P v|` for `P = exp(scale) product` and a unit `v`."""
    image = product @ vector
    norm = jnp.sqrt(jnp.sum(jnp.abs(image) ** 2))
    # A product that annihilates `v` (a zero Jacobian) has growth -inf; restart the
    # direction rather than carry NaNs into the next window.
    finite = jnp.isfinite(norm) & (norm > 0)
    new_vector = jnp.where(finite, image / jnp.where(finite, norm, 1), vector)
    return jnp.real(scale + jnp.log(norm)), new_vector


def initial_direction(size: int, dtype) -> Array:
    """A fixed unit vector with no special alignment to coordinate axes or to the
    all-ones vector (entries spread over `[1, 2)` by the golden ratio), so that it has
    a component along the most expanding direction of any product it meets."""
    steps = jnp.arange(1, size + 1, dtype=dtype)
    entries = 1 + jnp.mod(steps * 0.6180339887498949, 1.0)
    return entries / jnp.sqrt(jnp.sum(entries**2))
