"""`BlockDiagonalJacobian`: the root is the sequential solution, in `DeerSolver` and
`scan`, whether or not the Jacobian really is block diagonal."""

import diffrax
import jax
import jax.numpy as jnp
import pytest

import deer_diffrax


_SIZE = 8
_WEIGHT = jax.random.normal(jax.random.key(1), (_SIZE, _SIZE)) / jnp.sqrt(_SIZE)
# The same weights with the coupling between the two halves removed.
_BLOCK_WEIGHT = jax.scipy.linalg.block_diag(_WEIGHT[:4, :4], _WEIGHT[4:, 4:])


def _field(weight):
    return lambda t, y, args: jnp.tanh(weight @ y) - 0.5 * y


@pytest.mark.parametrize(
    "weight, mode",
    [
        (_WEIGHT, deer_diffrax.BlockDiagonalJacobian(4)),
        (_WEIGHT, deer_diffrax.BlockDiagonalJacobian(2)),
        (_BLOCK_WEIGHT, deer_diffrax.BlockDiagonalJacobian(4, structured=True)),
    ],
)
def test_deer_solver_matches_sequential(weight, mode):
    term = diffrax.ODETerm(_field(weight))
    y0 = jnp.linspace(-1.0, 1.0, _SIZE)
    saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 11))
    expected = diffrax.diffeqsolve(
        term, diffrax.Tsit5(), 0.0, 2.0, 0.01, y0, saveat=saveat
    )
    solver = deer_diffrax.DeerSolver(diffrax.Tsit5(), num_substeps=40, jacobian=mode)
    sol = diffrax.diffeqsolve(term, solver, 0.0, 2.0, 0.4, y0, saveat=saveat)
    assert jnp.max(jnp.abs(sol.ys - expected.ys)) < 1e-9


def test_structured_blocks_are_exact_and_gradients_match():
    term = diffrax.ODETerm(_field(_BLOCK_WEIGHT))
    y0 = jnp.linspace(-1.0, 1.0, _SIZE)

    def solve(y0, mode):
        solver = deer_diffrax.DeerSolver(
            diffrax.Tsit5(), num_substeps=40, jacobian=mode
        )
        return diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            2.0,
            0.4,
            y0,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )

    structured = deer_diffrax.BlockDiagonalJacobian(4, structured=True)
    block = deer_diffrax.diagnostics(solve(y0, structured))
    full = deer_diffrax.diagnostics(solve(y0, "full"))
    # Exact blocks: the same Newton iterations as full Newton.
    assert block.total_newton_steps == full.total_newton_steps
    loss = lambda y0, mode: jnp.sum(solve(y0, mode).ys ** 2)
    grad_block = jax.grad(loss)(y0, structured)
    grad_full = jax.grad(loss)(y0, "full")
    assert jnp.max(jnp.abs(grad_block - grad_full)) < 1e-12


@pytest.mark.parametrize("structured", [False, True])
def test_scan_matches_lax_scan(structured):
    weight = _BLOCK_WEIGHT if structured else _WEIGHT

    def cell(h, x):
        h = jnp.tanh(weight @ h + x)
        return h, h

    xs = jax.random.normal(jax.random.key(2), (300, _SIZE))
    mode = deer_diffrax.BlockDiagonalJacobian(4, structured=structured)
    (carry, ys), stats = deer_diffrax.scan(
        cell, jnp.zeros(_SIZE), xs, jacobian=mode, return_stats=True
    )
    expected_carry, expected_ys = jax.lax.scan(cell, jnp.zeros(_SIZE), xs)
    assert jnp.max(jnp.abs(ys - expected_ys)) < 1e-9
    assert jnp.max(jnp.abs(carry - expected_carry)) < 1e-9


def test_block_size_must_divide_state():
    with pytest.raises(ValueError, match="must divide"):
        deer_diffrax.scan(
            lambda h, x: (jnp.tanh(h + x), None),
            jnp.zeros(6),
            jnp.ones((5, 6)),
            jacobian=deer_diffrax.BlockDiagonalJacobian(4),
        )


@pytest.mark.parametrize(
    "mode",
    [
        deer_diffrax.FullJacobian(),
        deer_diffrax.DiagonalJacobian(),
        deer_diffrax.BlockDiagonalJacobian(4),
        deer_diffrax.BlockDiagonalJacobian(2),
    ],
)
def test_restrict_keeps_the_blocks_that_probing_reads(mode):
    # `restrict` of the dense step Jacobians must give exactly the blocks that the
    # mode reads off the linearised residual (what `scan` relies on).
    jacobians = jax.random.normal(jax.random.key(3), (5, _SIZE, _SIZE))

    def linear_fn(dy):  # dF_t = dy_t - J_t dy_{t-1}, with dy_{-1} = 0
        previous = jnp.concatenate([jnp.zeros((1, _SIZE)), dy[:-1]])
        return dy - jnp.einsum("tij,tj->ti", jacobians, previous)

    struct = jax.ShapeDtypeStruct((5, _SIZE), jacobians.dtype)
    probed = mode.blocks(linear_fn, struct)
    # The probes see `J_t` multiplying `dy_{t-1}`: step `t`'s block is `jacobians[t]`
    # for t >= 1 (block 0 multiplies the fixed initial state and is never used).
    restricted = mode.restrict(jacobians)
    assert restricted.shape == probed.shape
    assert jnp.max(jnp.abs(restricted[1:] - probed[1:])) < 1e-14
    assert (
        deer_diffrax.BlockDiagonalJacobian(4, structured=True).restrict(jacobians)
        is None
    )


@pytest.mark.parametrize(
    "mode", [deer_diffrax.DiagonalJacobian(), deer_diffrax.BlockDiagonalJacobian(4)]
)
def test_scan_forms_dense_jacobians_in_batches(monkeypatch, mode):
    # Quasi-Newton modes of `scan` take their blocks from the cell's dense Jacobians
    # a bounded number of steps at a time: the same solve whatever the budget.
    def cell(h, x):
        h = jnp.tanh(_WEIGHT @ h + x)
        return h, h

    xs = jax.random.normal(jax.random.key(4), (300, _SIZE))
    whole, stats = deer_diffrax.scan(
        cell, jnp.zeros(_SIZE), xs, jacobian=mode, return_stats=True
    )
    # 7 steps per batch: 43 batches, the last one short.
    monkeypatch.setattr(deer_diffrax._linearisation, "_DENSE_BUDGET", 7 * _SIZE**2)
    batched, batched_stats = deer_diffrax.scan(
        cell, jnp.zeros(_SIZE), xs, jacobian=mode, return_stats=True
    )
    expected = jax.lax.scan(cell, jnp.zeros(_SIZE), xs)[1]
    assert jnp.max(jnp.abs(batched[1] - expected)) < 1e-9
    assert jnp.max(jnp.abs(batched[1] - whole[1])) < 1e-12
    assert int(batched_stats.num_newton_steps) == int(stats.num_newton_steps)


def test_a_mode_that_overrides_blocks_alone_keeps_its_blocks_in_scan():
    # A subclass that changes `blocks` (clipping, say) but inherits `restrict` must
    # not have its blocks replaced by the parent's dense restriction: the clipping
    # shows in the iteration count, which must equal that of a mode that clips in
    # both methods (whose `restrict` scan then uses).
    traced = []

    def clip(blocks):
        return jnp.clip(blocks, -0.05, 0.05)

    class OwnBlocks(deer_diffrax.DiagonalJacobian):
        def blocks(self, linear_fn, struct):
            return clip(super().blocks(linear_fn, struct))

    class Both(OwnBlocks):
        def restrict(self, dense):
            traced.append("restrict")
            return clip(super().restrict(dense))

    # Nearly diagonal weights, so that the exact diagonal converges fast.
    weight = 0.9 * jnp.eye(_SIZE) + 0.05 * _WEIGHT

    def cell(h, x):
        h = jnp.tanh(weight @ h + 0.1 * x)
        return h, h

    xs = jax.random.normal(jax.random.key(5), (50, _SIZE))
    expected = jax.lax.scan(cell, jnp.zeros(_SIZE), xs)[1]
    steps = {}
    for name, mode in (
        ("plain", deer_diffrax.DiagonalJacobian()),
        ("own blocks", OwnBlocks()),
        ("both", Both()),
    ):
        (_, ys), stats = deer_diffrax.scan(
            cell, jnp.zeros(_SIZE), xs, jacobian=mode, return_stats=True
        )
        assert jnp.max(jnp.abs(ys - expected)) < 1e-9
        steps[name] = int(stats.num_newton_steps)
    assert traced
    assert steps["own blocks"] == steps["both"] != steps["plain"]
