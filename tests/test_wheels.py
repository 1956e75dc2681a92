"""The two distributions built from this tree (setup.py: the full install; slim/setup.py: one role's) hold the same
modules and the demo data, and ask for what README's "Install by role" says: the full one every role's packages,
the slim one only CORE unless an extra is named. Built offline from a copy of the tree (pip wheel --no-deps
--no-build-isolation, with this environment's setuptools), so the checkout is left as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest

from tests.installed import REPO_ROOT, canonical

IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, zipfile.ZipFile]:
    tree = tmp_path_factory.mktemp("tree")
    for folder in ("cluster", "edge", "slim"):
        shutil.copytree(REPO_ROOT / folder, tree / folder, symlinks=True, ignore=IGNORE)
    for name in ("setup.py", "frontend.html"):
        shutil.copy(REPO_ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            ".",
            "./slim",
        ],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    built = {path.name.split("-")[0]: zipfile.ZipFile(path) for path in out.glob("*.whl")}
    assert set(built) == {"torch_serving_cluster", "torch_serving_cluster_slim"}, sorted(built)
    return {"full": built["torch_serving_cluster"], "slim": built["torch_serving_cluster_slim"]}


def contents(wheel: zipfile.ZipFile) -> set[str]:
    return {name for name in wheel.namelist() if name.startswith(("cluster/", "edge/"))}


def requires(wheel: zipfile.ZipFile) -> dict[str, set[str]]:
    """{extra ("" for none): the canonical names it requires}, from the wheel's METADATA."""
    metadata_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    found: dict[str, set[str]] = {}
    for text in metadata.get_all("Requires-Dist") or ():
        requirement, _, marker = text.partition(";")
        extra = marker.split("extra ==")[1].strip().strip("'\"") if "extra ==" in marker else ""
        name = canonical(requirement.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip())
        found.setdefault(extra, set()).add(name)
    return found


def test_both_wheels_hold_every_module_and_the_demo_data(wheels):
    full, slim = contents(wheels["full"]), contents(wheels["slim"])
    assert full == slim, f"the wheels differ: {sorted(full ^ slim)}"
    modules = {str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.glob("cluster/**/*.py")}
    data = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "cluster" / "data").iterdir()}
    assert {"cluster/data/digits.csv.gz", "cluster/data/digits_split.json"} <= data
    assert modules | data <= full, f"not in the wheels: {sorted((modules | data) - full)}"


def test_the_full_wheel_asks_for_every_role_and_the_slim_one_for_core_alone(wheels):
    full, slim = requires(wheels["full"]), requires(wheels["slim"])
    assert {"torch", "pillow", "fastapi", "tritonclient", "httpx", "pyzmq"} <= full[""], full[""]
    assert not {"scikit-learn", "scipy"} & full[""], "the demo data needs no scikit-learn at run time"
    assert "scikit-learn" in full["test"]
    assert slim[""] == {"numpy", "pyzmq", "msgpack", "typer", "rich", "prometheus-client"}, slim[""]
    assert set(slim) == {"", "agent", "edge", "bench", "all"}, sorted(slim)
    assert "torch" in slim["agent"] and "torch" not in slim["edge"] | slim["bench"], slim
    assert slim["all"] | slim[""] == full[""], sorted((slim["all"] | slim[""]) ^ full[""])
