"""The documentation: the site builds, the public API is documented, and the code on
the pages runs."""

import os
import pathlib
import re
import subprocess
import sys

import griffe
import pytest

import deer_diffrax


ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC_NAMES = sorted(
    name
    for name, value in vars(deer_diffrax).items()
    if not name.startswith("_") and not isinstance(value, type(deer_diffrax))
)


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def test_site_builds_strictly(tmp_path):
    # --strict: a broken link, a missing heading anchor or an unresolved
    # [`deer_diffrax.X`][] cross-reference in a docstring fails the build.
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "solver" / "index.html").exists()


@pytest.fixture(scope="module")
def api():
    # The same view of the package that the API pages render (see mkdocs.yml).
    extension = f"{ROOT / 'docs' / 'scripts' / 'griffe_deer.py'}:DeerDocstrings"
    return griffe.load(
        "deer_diffrax",
        force_inspection=True,
        extensions=griffe.load_extensions(extension),
    )


def _docstring(obj) -> str:
    if obj is None or obj.docstring is None:
        return ""
    text = obj.docstring.value.strip()
    # Dataclasses (hence Equinox modules) without a docstring get their signature.
    if text.startswith(f"{obj.name}("):
        return ""
    return text


def test_public_names_are_found():
    assert {"DeerSolver", "DeerState", "DeerNewton"} <= set(PUBLIC_NAMES)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_has_docstring(api, name):
    obj = api[name].final_target if api[name].is_alias else api[name]
    assert _docstring(obj), f"deer_diffrax.{name} has no docstring."


@pytest.mark.parametrize(
    "name", [n for n in PUBLIC_NAMES if isinstance(getattr(deer_diffrax, n), type)]
)
def test_public_class_documents_arguments(api, name):
    cls = api[name].final_target if api[name].is_alias else api[name]
    init = cls.members.get("__init__")
    texts = [_docstring(cls), _docstring(init)]
    assert any("**Arguments:**" in text for text in texts), (
        f"Neither deer_diffrax.{name} nor its __init__ has an **Arguments:** section."
    )


def test_readme_and_index_show_the_same_example():
    readme = _python_blocks(ROOT / "README.md")
    index = _python_blocks(ROOT / "docs" / "index.md")
    assert readme and readme == index


@pytest.mark.parametrize(
    "page",
    [
        "docs/index.md",
        "docs/getting-started.md",
        "docs/faq.md",
        "docs/stiff-and-sde.md",
        "docs/recurrences.md",
    ],
)
def test_page_code_runs(page):
    # Blocks on a page run in order in one namespace, as a reader would paste them.
    namespace = {"__name__": "__docs__"}
    for number, block in enumerate(_python_blocks(ROOT / page)):
        exec(compile(block, f"{page}[block {number}]", "exec"), namespace)
