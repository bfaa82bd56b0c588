"""Run by `test_accuracy.py` in a process of its own with 64-bit JAX off, as users
train: prints, as JSON, the float32 final states of sequential Tsit5 and of
DeerSolver in every layout of the accuracy panel."""

import json
import os
import sys

import jax
import jax.numpy as jnp


sys.path.insert(0, os.path.dirname(__file__))
from _accuracy_problems import MODES, PROBLEMS, solve, WINDOW_COUNTS  # noqa: E402


def main():
    assert not jax.config.jax_enable_x64
    # The layouts to run, as `[[name, windows, mode], ...]` (default: all).
    chosen = os.environ.get("DEER_ACCURACY_LAYOUTS")
    chosen = None if chosen is None else {tuple(x) for x in json.loads(chosen)}
    out = {}
    for name in PROBLEMS:
        if chosen is not None and not any(layout[0] == name for layout in chosen):
            continue
        y, ok, _ = solve(name, jnp.float32)
        out[f"{name}/sequential"] = dict(y=y.tolist(), ok=ok)
        for windows in WINDOW_COUNTS:
            for mode in MODES:
                if chosen is not None and (name, windows, mode) not in chosen:
                    continue
                y, ok, its = solve(name, jnp.float32, windows, mode)
                out[f"{name}/{windows}/{mode}"] = dict(y=y.tolist(), ok=ok, its=its)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
