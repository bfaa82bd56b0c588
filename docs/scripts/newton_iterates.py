"""Draw the figure of the "How it works" page: DEER's Newton iterates on Van der Pol.

One window of `NUM_SUBSTEPS` Tsit5 substeps over `[0, T1]` is solved by Newton's
method from the constant guess `y_i = y_0`, as `DeerSolver` does inside one Diffrax
step. Each iterate is written out exactly as on the page,

    y_i^{k+1} = J_i y_{i-1}^{k+1} + b_i,
    J_i = dPhi_i/dy (y_{i-1}^k),   b_i = Phi_i(y_{i-1}^k) - J_i y_{i-1}^k,

with the linear recurrence solved by `deer_diffrax.solve_linear_recurrence` (an
associative scan). This is undamped Newton with exact Jacobians; `DeerSolver`
additionally checks each iterate (damping) and stops at its tolerance. The reference
is the sequential Tsit5 solve on the same grid, the root of the Newton system.

Run from the repository root (needs matplotlib, e.g. `pip install -e ".[examples]"`):

    python docs/scripts/newton_iterates.py

It writes `docs/figures/newton_iterates.png`.
"""

import pathlib

import diffrax
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import deer_diffrax


jax.config.update("jax_enable_x64", True)

MU = 1.0
T1 = 4.0
NUM_SUBSTEPS = 400
NUM_ITERATES = 7
OUTPUT = pathlib.Path(__file__).resolve().parents[1] / "figures" / "newton_iterates.png"


def van_der_pol(t, y, args):
    x, v = y
    return jnp.stack([v, args * (1 - x**2) * v - x])


# "bounded" stage loop: Newton linearises each substep with forward-mode autodiff.
BASE_SOLVER = diffrax.Tsit5(scan_kind="bounded")
TERM = diffrax.ODETerm(van_der_pol)


def substep(y, t_start, t_end):
    """One Tsit5 step, `Phi_i(y)`, from `t_start` to `t_end`."""
    state = BASE_SOLVER.init(TERM, t_start, t_end, y, MU)
    # made_jump=True: recompute the first stage, so the step depends on `y` only.
    y_next, *_ = BASE_SOLVER.step(TERM, t_start, t_end, y, MU, state, made_jump=True)
    return y_next


@jax.jit
def newton_step(trajectory, y0, ts):
    """One Newton step: linearise every substep at the current iterate (in parallel),
    then solve the linear recurrence for the next iterate (an associative scan)."""
    previous = jnp.concatenate([y0[None], trajectory[:-1]])
    mapped = jax.vmap(substep)(previous, ts[:-1], ts[1:])
    blocks = jax.vmap(jax.jacfwd(substep))(previous, ts[:-1], ts[1:])
    offsets = mapped - jnp.einsum("tij,tj->ti", blocks, previous)
    # The first substep starts from the fixed y0: its offset is Phi_0(y0) itself, and
    # `solve_linear_recurrence` ignores blocks[0].
    offsets = offsets.at[0].set(mapped[0])
    return deer_diffrax.solve_linear_recurrence(blocks, offsets)


@jax.jit
def sequential(y0, ts):
    """The same Tsit5 steps taken one after another (the root of `F`)."""

    def body(y, t_pair):
        y_next = substep(y, *t_pair)
        return y_next, y_next

    _, trajectory = jax.lax.scan(body, y0, (ts[:-1], ts[1:]))
    return trajectory


def main():
    y0 = jnp.array([2.0, 0.0])
    ts = jnp.linspace(0.0, T1, NUM_SUBSTEPS + 1)
    reference = sequential(y0, ts)
    iterates = [jnp.broadcast_to(y0, reference.shape)]  # the constant guess
    for _ in range(NUM_ITERATES):
        iterates.append(newton_step(iterates[-1], y0, ts))
    errors = [jnp.max(jnp.abs(it - reference), axis=1) for it in iterates]
    for k, error in enumerate(errors):
        print(f"iterate {k}: max error {float(jnp.max(error)):.2e}")

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.cm.viridis(jnp.linspace(0.0, 0.9, len(iterates)))
    times = ts[1:]
    left.plot(times, reference[:, 0], color="black", lw=4, alpha=0.25)
    for k, (iterate, colour) in enumerate(zip(iterates, colours, strict=True)):
        left.plot(times, iterate[:, 0], color=colour, lw=1.4, label=f"$k = {k}$")
    left.plot([], [], color="black", lw=4, alpha=0.25, label="sequential Tsit5")
    left.set_ylim(-3.5, 3.5)
    left.set_xlabel("$t$")
    left.set_ylabel("$x(t)$")
    left.set_title("Newton iterates $Y^k$ (first component)")
    left.legend(loc="lower left", fontsize=8, ncol=2)

    tiny = 1e-17  # floor for the log scale where an iterate is exact
    for error, colour in zip(errors, colours, strict=True):
        right.semilogy(times, jnp.maximum(error, tiny), color=colour, lw=1.4)
    right.set_ylim(tiny, 1e3)
    right.set_xlabel("$t$")
    right.set_ylabel(r"$\|y^k_i - y_i\|_\infty$")
    right.set_title("Distance to the sequential solution")

    figure.suptitle(
        f"Van der Pol ($\\mu = {MU:g}$), one window of {NUM_SUBSTEPS} Tsit5 "
        f"substeps on $[0, {T1:g}]$, constant initial guess"
    )
    figure.tight_layout()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUTPUT, dpi=110)
    print(f"wrote {OUTPUT.name}")


if __name__ == "__main__":
    main()
