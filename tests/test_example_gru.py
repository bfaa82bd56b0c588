"""Smoke test of examples/gru_classification.py at a tiny size: training with
`deer_diffrax.scan` follows the `jax.lax.scan` run step by step."""

import importlib.util
import pathlib

import numpy as np


def _load_example():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples"
    spec = importlib.util.spec_from_file_location(
        "gru_classification", path / "gru_classification.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gru_example_losses_agree():
    example = _load_example()
    # float64 here (tests/conftest.py), so the Newton tolerance is ~2e-11 and the
    # two training runs agree far beyond the three digits the full run shows.
    results = example.main(
        length=64,
        steps=4,
        batch_size=4,
        hidden_size=4,
        test_size=8,
        verbose=False,
    )
    assert len(results["lax"]) == len(results["deer"]) == 4
    assert np.all(np.isfinite(results["deer"]))
    np.testing.assert_allclose(results["deer"], results["lax"], rtol=1e-8)
    assert results["deer_accuracy"] == results["lax_accuracy"]
    assert 1 <= results["newton_iterations"][2] <= 100
