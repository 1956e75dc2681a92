"""Put this folder first on PYTHONPATH, and set CLUSTER_TEST_ONLY_PACKAGES_OF=ROLE (manager, broker, client, edge,
agent): the interpreter then refuses to import any installed module that the role's slim install
(`pip install './slim[ROLE]'`, cluster/dependencies.py) would not bring, as if those packages were not installed. A
role process run this way shows the role needs nothing else, without building a venv per role
(tests/test_role_packages.py). Python imports `sitecustomize` at start-up, before the command runs."""

import os
import sys


def _install(role: str) -> None:
    import importlib.abc

    before = set(sys.modules)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(tests))
    try:
        from tests.installed import closure, modules_outside, role_requirements

        blocked = modules_outside(closure(role_requirements(role)))
    finally:
        sys.path.remove(os.path.dirname(tests))
    for name in set(sys.modules) - before:  # what working that out imported (packaging, tests) goes again
        if name.split(".")[0] in blocked or name.split(".")[0] == "tests":
            del sys.modules[name]

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (not in the {role} install)", name=name)
            return None

    sys.meta_path.insert(0, Refuse())


if os.environ.get("CLUSTER_TEST_ONLY_PACKAGES_OF"):
    _install(os.environ["CLUSTER_TEST_ONLY_PACKAGES_OF"])
