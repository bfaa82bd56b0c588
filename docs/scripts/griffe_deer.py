"""Griffe extension used by the API pages (see `mkdocs.yml`).

The API pages load `deer_diffrax` by importing it (`force_inspection: true`), because
several `__init__` docstrings are assigned at runtime
(`DeerSolver.__init__.__doc__ = ...`, as Diffrax does) and Equinox generates the
`__init__` of most modules, both invisible to static analysis. Importing has two
blind spots, fixed here:

- a module-level constant documented by a string literal after its assignment
    (`unit_lower_block_bidiagonal_tag`) has no runtime docstring: read it from the
    source of the package's modules (it is defined in a private one);
- a generated `__init__` carries Python's generic "Initialize self." docstring:
    drop it, so the class docstring is what appears.
"""

import ast
import functools as ft
import inspect
import pathlib

import griffe


_GENERIC_INIT_DOCSTRING = inspect.cleandoc(object.__init__.__doc__ or "")


@ft.cache
def attribute_docstrings(filepath: pathlib.Path) -> dict[str, str]:
    """Docstrings written as a string literal right after a module-level assignment,
    by the assigned name."""
    module = ast.parse(pathlib.Path(filepath).read_text(encoding="utf-8"))
    docstrings = {}
    for statement, following in zip(module.body, module.body[1:], strict=False):
        if not isinstance(statement, (ast.Assign, ast.AnnAssign)):
            continue
        if not (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            continue
        if isinstance(statement, ast.Assign):
            targets = statement.targets
        else:
            targets = [statement.target]
        for target in targets:
            if isinstance(target, ast.Name):
                docstrings[target.id] = inspect.cleandoc(following.value.value)
    return docstrings


class DeerDocstrings(griffe.Extension):
    """Fill in the docstrings that runtime inspection misses (see module docstring)."""

    def on_attribute_instance(self, *, node, attr, agent, **kwargs) -> None:
        parent = attr.parent
        if parent is None or not parent.is_module or parent.filepath is None:
            return
        filepath = parent.filepath
        if isinstance(filepath, list):  # namespace package
            return
        # The public module re-exports the constant from the private module that
        # defines and documents it.
        filepath = pathlib.Path(filepath)
        for source in [filepath, *sorted(filepath.parent.glob("*.py"))]:
            docstring = attribute_docstrings(source).get(attr.name)
            if docstring is not None:
                attr.docstring = griffe.Docstring(docstring, parent=attr)
                return

    def on_function_instance(self, *, node, func, agent, **kwargs) -> None:
        if func.name == "__init__" and func.docstring is not None:
            if inspect.cleandoc(func.docstring.value) == _GENERIC_INIT_DOCSTRING:
                func.docstring = None
