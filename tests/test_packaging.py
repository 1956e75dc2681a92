"""setup.py installs what the tests import: the README's test command works on a fresh machine (issue 18: the
edge's TLS tests needed `cryptography`, which only a machine that happened to have it could run)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import runpy
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parent.parent
OWN = {"cluster", "edge", "tests", "bench", "nfs", "conftest", "harness", "models", "edge_http", "nfs_server"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> list[Requirement]:
    """Every requirement of the full install and its test extra (cluster/dependencies.py, which setup.py reads)."""
    dependencies = runpy.run_path(str(REPO_ROOT / "cluster" / "dependencies.py"))
    return [Requirement(text) for text in dependencies["every_role"]() + dependencies["TEST"]]


def _installed_closure(requirements: list[Requirement]) -> set[str]:
    """The distributions pip installs for these requirements (with their extras), as far as they are installed here."""
    seen: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in requirements if r.marker is None or r.marker.evaluate()]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (_norm(name), extras) in done:
            continue
        done.add((_norm(name), extras))
        seen.add(_norm(name))
        try:
            requires = importlib.metadata.requires(name) or ()
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*extras, ""))
            if wanted:
                todo.append((req.name, frozenset(req.extras)))
    return seen


def _imported_top_modules() -> set[str]:
    modules = set()
    for path in (REPO_ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - OWN - set(sys.stdlib_module_names)


def test_every_module_the_tests_import_is_installed_by_setup_py():
    installed = _installed_closure(_requirements())
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_top_modules()):
        dists = {_norm(d) for d in providers.get(module, ())}
        if dists and not dists & installed:  # (a module not installed here fails its own tests loudly)
            missing[module] = sorted(dists)
    assert not missing, (
        f"the tests import modules that setup.py does not install (add them to extras 'test'): {missing}"
    )
