"""The edge sits above the cluster's client, protocol and config, never above its CLI, harness or agent (issue 19
point 4): `python -m edge` does not import the CLI, and no module under edge/ imports cluster.cli, cluster.local or
cluster.agent. In-process but for one subprocess (sys.modules of a fresh `python -m edge --help`)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import typer

from tests.harness import REPO_ROOT

ABOVE_THE_EDGE = ("cluster.cli", "cluster.local", "cluster.agent")


def _imports(path: Path) -> list[str]:
    """Every module `path` imports (`from cluster import cli` counts as cluster.cli)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def test_no_module_under_edge_imports_the_cli_the_harness_or_the_agent():
    wrong = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in sorted((REPO_ROOT / "edge").rglob("*.py"))
        for name in _imports(path)
        if any(name == top or name.startswith(top + ".") for top in ABOVE_THE_EDGE)
    ]
    assert not wrong, "the edge reaches up: " + "; ".join(wrong)


def test_python_m_edge_does_not_import_the_cli():
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['edge', '--help']\n"
        "try:\n"
        "    runpy.run_module('edge', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        f"above = {ABOVE_THE_EDGE!r}\n"
        "print('LOADED', sorted(m for m in sys.modules if any(m == t or m.startswith(t + '.') for t in above)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--grpc-port" in done.stdout, "python -m edge --help did not show the edge's options"
    loaded = done.stdout.rsplit("LOADED", 1)[1].strip()
    assert loaded == "[]", f"python -m edge --help imported {loaded}"


def _options(command) -> dict[str, tuple]:
    return {
        p.name: (tuple(p.opts), p.envvar, str(p.default), getattr(p, "help", None), p.multiple) for p in command.params
    }


def test_python_m_edge_takes_the_same_options_as_cluster_edge():
    """Until both read one settings object, the two definitions are kept in step here."""
    from cluster.cli import app
    from edge.command import command

    cluster_edge = typer.main.get_command(app).commands["edge"]
    assert _options(command()) == _options(cluster_edge)
    assert command().help == cluster_edge.help
