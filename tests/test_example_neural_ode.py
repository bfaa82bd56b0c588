"""Smoke test of `examples/neural_ode.py` at a tiny size."""

import importlib.util
import pathlib


_EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "neural_ode.py"


def _load_example():
    # `examples/` is not a package: load the script as a module by its path.
    spec = importlib.util.spec_from_file_location("neural_ode_example", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_neural_ode_example_tiny(tmp_path, capsys):
    example = _load_example()
    output = tmp_path / "fit.png"
    losses = example.main(
        steps=4,
        dataset_size=8,
        batch_size=4,
        num_times=6,
        t1=1.0,
        num_windows=2,
        num_substeps=8,
        width=8,
        depth=1,
        print_every=2,
        output=str(output),
    )
    # Same parameters, same batches, same discrete gradients: after several Adam
    # steps the two trained models still agree to far below any visible difference
    # (float64; measured about 1e-15).
    deer, sequential = losses["deer"], losses["sequential"]
    assert abs(deer - sequential) <= 1e-8 * abs(sequential)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"DeerSolver : {deer:.12e}" in printed
    assert f"sequential : {sequential:.12e}" in printed
