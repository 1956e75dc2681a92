"""CI keeps the tree ruff-clean: `.ci/run` runs the README's test command with --lint, which runs `ruff check .` and
`ruff format --check .` after the install (ruff comes with the test extras) and before any test; either failing
fails CI. The script runs for real, with python3 and dpkg replaced by shims that log their arguments (no install)."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import textwrap

import pytest

from tests.harness import REPO_ROOT

SHIM = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$(basename "$0") $*" >> "$SHIM_LOG"
    case "$*" in
      "-m ruff check ."*) exit "${RUFF_CHECK_STATUS:-0}" ;;
      "-m ruff format --check ."*) exit "${RUFF_FORMAT_STATUS:-0}" ;;
    esac
    exit 0
""")


def run_tests_script(tmp_path, *args: str, **statuses: int) -> tuple[int, list[str]]:
    """scripts/run-tests.sh ARGS with shims for python3 and dpkg; its exit status and the commands they saw."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name in ("python3", "dpkg"):
        (shims / name).write_text(SHIM)
        (shims / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SHIM_LOG=str(log))
    env.update({key: str(value) for key, value in statuses.items()})
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "run-tests.sh"), *args], env=env, capture_output=True, timeout=60
    )
    calls = [line for line in log.read_text().splitlines() if line.startswith("python3 ")] if log.exists() else []
    return done.returncode, calls


def test_ci_runs_the_test_script_with_lint():
    commands = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash scripts/run-tests.sh --lint" in commands, "CI no longer lints: .ci/run must run run-tests.sh --lint"


def test_lint_runs_ruff_after_the_install_and_before_the_tests(tmp_path):
    status, calls = run_tests_script(tmp_path, "--lint", "-m", "not cluster")
    assert status == 0, calls
    assert [call.split(" ")[:4] for call in calls] == [
        ["python3", "-m", "pip", "install"],
        ["python3", "-m", "ruff", "check"],
        ["python3", "-m", "ruff", "format"],
        ["python3", "-m", "pytest", "-m"],
    ], calls
    assert calls[2] == "python3 -m ruff format --check ." and calls[3] == "python3 -m pytest -m not cluster", calls


@pytest.mark.parametrize("failing", ["RUFF_CHECK_STATUS", "RUFF_FORMAT_STATUS"])
def test_a_lint_failure_fails_before_any_test(tmp_path, failing):
    status, calls = run_tests_script(tmp_path, "--lint", **{failing: 1})
    assert status != 0, f"{failing}=1 did not fail the script: {calls}"
    assert not any(" pytest" in call for call in calls), f"tests ran after a lint failure: {calls}"


def test_without_lint_the_readme_command_only_installs_and_tests(tmp_path):
    status, calls = run_tests_script(tmp_path, "-x")
    assert status == 0 and [call.split(" ")[2] for call in calls] == ["pip", "pytest"], calls
    assert calls[1] == "python3 -m pytest -x", calls


def test_ruff_comes_with_the_test_extras_pinned():
    test_extras = runpy.run_path(str(REPO_ROOT / "cluster" / "dependencies.py"))["TEST"]
    assert any(r.startswith("ruff") for r in test_extras), "ruff is not in the test extra: a fresh machine lacks it"
    for name in ("constraints.txt", "constraints.lock"):  # the pin chosen, and the lock made from it that CI uses
        pins = (REPO_ROOT / name).read_text().splitlines()
        assert any(re.fullmatch(r"ruff==[0-9.]+", line) for line in pins), f"{name} does not pin ruff"
