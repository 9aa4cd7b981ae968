"""The declared dependencies are honest: everything the library imports at module level is the
standard library, the package itself or a declared dependency (so `pip install -e .` then
`import keedit_jax` works with nothing else), a lazily imported optional package is in an
extra, and every declared dependency is imported somewhere (none is dead weight)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Declared for what the library needs but never imports by name: jaxlib is jax's backend,
# flatbuffers what jax.export serializes with.
NOT_IMPORTED = {"jaxlib", "flatbuffers"}


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of PEP 508 requirement strings, normalised."""
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def _imports() -> tuple[set[str], set[str]]:
    """Top-level module names the library imports at module level, and inside functions."""
    eager, lazy = set(), set()
    for path in (ROOT / "keedit_jax").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        nested = {id(n) for f in ast.walk(tree)
                  if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                  for n in ast.walk(f)}
        typing_only = {id(n) for f in ast.walk(tree)
                       if isinstance(f, ast.If) and ast.unparse(f.test) == "TYPE_CHECKING"
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: nothing is imported at run time
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            (lazy if id(node) in nested else eager).update(n.split(".")[0] for n in names)
    return eager - {"keedit_jax", "__future__"}, lazy - {"keedit_jax", "__future__"}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Each third-party module's distributions (its own name when it is not installed)."""
    installed = packages_distributions()
    return {m: {d.lower().replace("_", "-") for d in installed.get(m) or [m]}
            for m in modules if m not in sys.stdlib_module_names}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_module_level_import_is_declared():
    declared = _names(_project()["dependencies"])
    eager, _ = _imports()
    undeclared = {m: d for m, d in _distributions(eager).items() if not d & declared}
    assert not undeclared, f"imported at module level, not in [project] dependencies: {undeclared}"


def test_every_lazy_import_is_declared_or_in_an_extra():
    project = _project()
    known = _names(project["dependencies"]).union(
        *(_names(extra) for extra in project["optional-dependencies"].values()))
    _, lazy = _imports()
    undeclared = {m: d for m, d in _distributions(lazy).items() if not d & known}
    assert not undeclared, f"imported inside functions, in no dependency list: {undeclared}"


def test_every_declared_dependency_is_imported():
    eager, lazy = _imports()
    used = set().union(*_distributions(eager | lazy).values())
    unused = _names(_project()["dependencies"]) - used - NOT_IMPORTED
    assert not unused, f"declared but never imported by keedit_jax: {sorted(unused)}"
