"""constraints.lock (scripts/lock.py) pins every package the full install and the tests bring, inside the ranges
cluster/dependencies.py asks for, and the installs that CI and the image run use it; the README's first command
keeps constraints.txt. Regenerating the lock needs the package index (python3 scripts/lock.py --check); these checks
read files and this environment's metadata only."""

from __future__ import annotations

import re
import runpy

from packaging.version import Version

from tests.installed import REPO_ROOT, canonical, closure, every_requirement

LOCK = REPO_ROOT / "constraints.lock"
PIN = re.compile(r"([a-z0-9][a-z0-9-]*)==([0-9][0-9A-Za-z.!]*)")


def pins() -> dict[str, str]:
    found = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if line.startswith("#") or not line.strip():
            continue
        match = PIN.fullmatch(line)
        assert match, f"constraints.lock line {number} is not `name==version` (canonical name): {line!r}"
        assert match[1] not in found, f"constraints.lock pins {match[1]} twice"
        found[match[1]] = match[2]
    return found


def test_every_requirement_is_pinned_inside_its_range():
    locked = pins()
    wrong = {}
    for requirement in every_requirement():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = locked.get(canonical(requirement.name))
        if version is None or not requirement.specifier.contains(Version(version), prereleases=True):
            wrong[str(requirement)] = version
    assert not wrong, f"constraints.lock misses or contradicts these (run python3 scripts/lock.py): {wrong}"


def test_everything_the_install_pulls_in_here_is_pinned():
    """The closure of the full install and the tests' extra, from the installed metadata: no package unpinned."""
    unpinned = closure(every_requirement()) - set(pins()) - {"torch-serving-cluster"}
    assert not unpinned, f"installed with the package but not in constraints.lock: {sorted(unpinned)}"


def test_torch_is_pinned_alike_in_the_lock_constraints_txt_and_the_containerfile():
    lock = pins()["torch"]
    constraints = re.search(r"^torch==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    containerfile = re.search(r'^ARG TORCH_SPEC="torch==(\S+)"$', (REPO_ROOT / "Containerfile").read_text(), re.M)
    assert constraints and containerfile, "constraints.txt or the Containerfile no longer pins torch as expected"
    assert lock == constraints[1] == containerfile[1], (lock, constraints[1], containerfile[1])


def test_ci_and_the_image_install_with_the_lock_and_the_readme_keeps_its_command():
    assert "pip install -q -c constraints.lock -e '.[test]'" in (REPO_ROOT / "scripts" / "run-tests.sh").read_text()
    containerfile = (REPO_ROOT / "Containerfile").read_text()
    assert "PIP_CONSTRAINT=/src/constraints.lock pip install" in containerfile
    assert "COPY setup.py constraints.txt constraints.lock" in containerfile
    readme = (REPO_ROOT / "README.md").read_text()
    assert "    python3 -m pip install -c constraints.txt . && python3 -m cluster up\n" in readme


def test_render_pins_public_versions_sorted_without_the_package_itself():
    lock = runpy.run_path(str(REPO_ROOT / "scripts" / "lock.py"))
    report = {
        "install": [
            {"metadata": {"name": "Torch", "version": "2.13.0+cpu"}},
            {"metadata": {"name": "torch-serving-cluster", "version": "0.1.0"}},
            {"metadata": {"name": "prometheus_client", "version": "0.26.0"}},
            {"metadata": {"name": "Jinja2", "version": "3.1.6"}},
        ]
    }
    text = lock["render"](report, "3.11.7", "Linux", "x86_64")
    assert text.startswith("# ") and "python3 scripts/lock.py" in text and "3.11.7 (Linux x86_64)" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == ["jinja2==3.1.6", "prometheus-client==0.26.0", "torch==2.13.0"]


def test_check_compares_the_pins_not_the_header_that_names_the_interpreter():
    """`lock.py --check` on another patch release or machine: the same pins are current; another pin is not."""
    lock = runpy.run_path(str(REPO_ROOT / "scripts" / "lock.py"))
    report = {"install": [{"metadata": {"name": "numpy", "version": "2.4.6"}}]}
    made_here = lock["render"](report, "3.11.7", "Linux", "x86_64")
    assert lock["same_pins"](made_here, lock["render"](report, "3.11.9", "Linux", "x86_64"))
    newer = {"install": [{"metadata": {"name": "numpy", "version": "2.4.7"}}]}
    assert not lock["same_pins"](made_here, lock["render"](newer, "3.11.7", "Linux", "x86_64"))
    assert not lock["same_pins"]("", made_here)
