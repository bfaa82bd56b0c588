"""The quickstart runs and shows what it claims."""

import importlib.util
import pathlib


def _load_example(name):
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    quickstart = _load_example("quickstart")
    difference, state = quickstart.main(t1=4.0, num_windows=2, num_substeps=50)
    out = capsys.readouterr().out
    assert difference <= 1e-9
    assert 1 <= int(state.most_newton_steps) <= 10
    for text in [
        "relative difference",
        "Newton iterations",
        "DeerSolver time",
        "sequential Tsit5 time",
    ]:
        assert text in out
