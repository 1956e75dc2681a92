"""setup.py installs what the tests import: the README's test command works on a fresh machine (issue 18: the
edge's TLS tests needed `cryptography`, which only a machine that happened to have it could run)."""

from __future__ import annotations

import ast
import importlib.metadata
import sys

from tests.installed import REPO_ROOT, canonical, closure, every_requirement

OWN = {"cluster", "edge", "tests", "bench", "nfs", "conftest", "harness", "models", "edge_http", "nfs_server"}


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
    installed = closure(every_requirement())
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_top_modules()):
        dists = {canonical(d) for d in providers.get(module, ())}
        if dists and not dists & installed:  # (a module not installed here fails its own tests loudly)
            missing[module] = sorted(dists)
    assert not missing, (
        f"the tests import modules that setup.py does not install (add them to extras 'test'): {missing}"
    )
