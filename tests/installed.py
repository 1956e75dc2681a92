"""What an install brings, read from this environment's installed metadata: the distributions that a list of
requirements pulls in (with their own requirements, transitively), and the modules the others provide. The
packaging tests use it, and tests/role_only/sitecustomize.py blocks a role process's imports with it."""

from __future__ import annotations

import importlib.metadata
import re
import runpy
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parent.parent
OWN_MODULES = {"cluster", "edge"}
ROLE_EXTRAS = {"manager": (), "broker": (), "client": (), "edge": ("edge",), "agent": ("agent",), "bench": ("bench",)}


def canonical(name: str) -> str:
    """PEP 503's normalised name (what pip compares)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def dependencies() -> dict:
    """cluster/dependencies.py's names (CORE, ROLES, TEST, every_role), read as setup.py reads them."""
    return runpy.run_path(str(REPO_ROOT / "cluster" / "dependencies.py"))


def every_requirement() -> list[Requirement]:
    """The full install's requirements and the test extra's."""
    deps = dependencies()
    return [Requirement(text) for text in deps["every_role"]() + deps["TEST"]]


def role_requirements(role: str) -> list[Requirement]:
    """What the slim install of one role asks for: CORE and the role's extras."""
    deps = dependencies()
    texts = list(deps["CORE"]) + [text for extra in ROLE_EXTRAS[role] for text in deps["ROLES"][extra]]
    return [Requirement(text) for text in texts]


def closure(requirements: list[Requirement]) -> set[str]:
    """The distributions pip installs for these requirements (with their extras and markers, on this platform), as
    far as they are installed here (canonical names)."""
    seen: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in requirements if r.marker is None or r.marker.evaluate()]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in done:
            continue
        done.add((canonical(name), extras))
        seen.add(canonical(name))
        try:
            requires = importlib.metadata.requires(name) or ()
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def modules_outside(allowed: set[str]) -> set[str]:
    """Top-level modules installed here that no distribution in `allowed` provides (the standard library and the
    cluster's own packages excepted)."""
    blocked = set()
    for module, providers in importlib.metadata.packages_distributions().items():
        if module in OWN_MODULES or module in sys.stdlib_module_names:
            continue
        if not any(canonical(d) in allowed for d in providers):
            blocked.add(module)
    return blocked
