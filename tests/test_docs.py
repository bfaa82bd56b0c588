"""The documentation: the site builds, the public API is documented, and the code on
the pages runs."""

import html
import html.parser
import os
import pathlib
import re
import subprocess
import sys

import griffe
import pytest
import yaml

import deer_diffrax


ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC_NAMES = sorted(
    name
    for name, value in vars(deer_diffrax).items()
    if not name.startswith("_") and not isinstance(value, type(deer_diffrax))
)


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    # Built once for the tests below. --strict: a broken link, a missing heading
    # anchor or an unresolved [`deer_diffrax.X`][] cross-reference in a docstring
    # fails the build.
    site_dir = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def test_site_builds_strictly(site):
    assert (site / "api" / "solver" / "index.html").exists()


# Attributes through which a page makes the browser fetch something (links to
# other sites, <a href>, are fine: they are only followed when clicked).
_FETCHING = {
    "script": ("src",),
    "link": ("href",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "iframe": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "video": ("src", "poster"),
    "audio": ("src",),
}
_LINK_NOT_FETCHED = {"canonical", "alternate", "author", "license", "help"}
_EXTERNAL = re.compile(r"^\s*(?:https?:)?//", re.I)
_CSS_EXTERNAL = re.compile(
    r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:https?:)?//[^'")\s]*)""", re.I
)


class _ExternalResources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        rel = set((attrs.get("rel") or "").lower().split())
        if tag == "link" and rel and rel <= _LINK_NOT_FETCHED:
            return
        for name in _FETCHING.get(tag, ()):
            for url in re.split(r",\s*", attrs.get(name) or ""):
                if _EXTERNAL.match(url):
                    self.found.append(f"<{tag} {name}={url.strip()!r}>")
        self.found += _CSS_EXTERNAL.findall(attrs.get("style") or "")

    def handle_data(self, data):
        # Inline <style> blocks (and, harmlessly, text that looks like CSS).
        self.found += _CSS_EXTERNAL.findall(data)


def test_site_loads_nothing_from_the_network(site):
    # Offline, the pages must look the same: MathJax, fonts, scripts and
    # stylesheets are all served from the site (see mkdocs.yml).
    found = {}
    for page in site.rglob("*.html"):
        parser = _ExternalResources()
        parser.feed(page.read_text(encoding="utf-8"))
        if parser.found:
            found[str(page.relative_to(site))] = sorted(set(parser.found))
    for sheet in site.rglob("*.css"):
        urls = _CSS_EXTERNAL.findall(sheet.read_text(encoding="utf-8"))
        if urls:
            found[str(sheet.relative_to(site))] = sorted(set(urls))
    assert not found, found
    # The check above does see MathJax where it is loaded.
    solver_page = (site / "api" / "solver" / "index.html").read_text()
    assert "_static/mathjax/tex-svg-full.js" in solver_page


def test_site_wraps_signatures(site):
    # mkdocstrings formats separate signatures with ruff or black (docs extras) at
    # the configured line_length; without either it silently leaves them on one line.
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (mkdocstrings,) = [
        plugin["mkdocstrings"]
        for plugin in config["plugins"]
        if isinstance(plugin, dict) and "mkdocstrings" in plugin
    ]
    options = mkdocstrings["handlers"]["python"]["options"]
    line_length = options.get("line_length", 60)  # mkdocstrings' default
    page = (site / "api" / "solver" / "index.html").read_text()
    block = re.search(r'<div class="doc-signature[^"]*"[^>]*>(.*?)</div>', page, re.S)
    assert block, "No separate signature on the DeerSolver page."
    signature = html.unescape(re.sub(r"<[^>]+>", "", block.group(1))).strip()
    assert signature.startswith("DeerSolver("), signature
    lines = signature.splitlines()
    assert len(lines) > 3, signature
    assert max(map(len, lines)) <= line_length, signature


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
        # Its examples (stiff, implicit, SDE solves) take about two minutes; the
        # same features are tested in tests/test_stiff_and_sde.py.
        pytest.param("docs/stiff-and-sde.md", marks=pytest.mark.slow),
        "docs/recurrences.md",
    ],
)
def test_page_code_runs(page):
    # Blocks on a page run in order in one namespace, as a reader would paste them.
    namespace = {"__name__": "__docs__"}
    for number, block in enumerate(_python_blocks(ROOT / page)):
        exec(compile(block, f"{page}[block {number}]", "exec"), namespace)
