"""The manager and `cluster deploy` only list folders and copy files on the share: they must not need torch. Nor
do the broker and the edge, which never run a model: importing torch costs a process seconds and ~300 MB
(bench/cold_start.py).

Each check runs in a fresh interpreter with torch blocked (sys.modules["torch"] = None makes any `import torch`
raise ImportError), so a torch import creeping back into the share's modules fails here, naming the import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from cluster.local import LocalCluster

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK_TORCH = 'import sys\nsys.modules["torch"] = None  # any `import torch` now raises ImportError\n'


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manager_and_share_modules_import_without_torch():
    done = run_without_torch("""
        import cluster.desired, cluster.manager, cluster.manager.client, cluster.model_config, cluster.repository
        import cluster.share, cluster.broker, cluster.client, cluster.agent, cluster.statistics, edge
        from cluster import Client, AsyncClient
        from cluster.cli import app
        try:
            import cluster.agent.loaded_model
        except ImportError:
            print("torch stays on the agent's side")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch stays on the agent's side", "the agent's loader no longer needs torch?"


def test_deploy_publishes_without_torch(tmp_path):
    """`cluster deploy` with no manager running (but for the check before publishing, answered here): the version is
    published, then the manager call fails as it should, not with an ImportError. The model file is any bytes:
    publishing copies and hashes, it never loads."""
    (tmp_path / "model.pt").write_bytes(b"not really TorchScript")
    config = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    share = tmp_path / "share"
    done = run_without_torch(
        """
        from typer.testing import CliRunner
        from cluster.cli import app
        from cluster.manager.client import ManagerClient

        real_call = ManagerClient.call

        def call(self, what, timeout=5.0, data=None, **fields):  # deploy asks `rollouts` before it publishes
            return {"in_progress": 0} if what == "rollouts" else real_call(self, what, timeout, data, **fields)

        ManagerClient.call = call
        runner = CliRunner()
        usage = runner.invoke(app, ["deploy", "--help"])
        assert usage.exit_code == 0 and "--name" in usage.output, usage.output
        tmp = sys.argv[1]
        result = runner.invoke(app, [
            "deploy", f"{tmp}/model.pt", "--name", "m", "--config", f"{tmp}/config.json", "--share", f"{tmp}/share",
            "--manager", f"ipc://{tmp}/no-manager",
            "--timeout=-29.5",  # deploy waits timeout + 30 s for the manager: half a second here
        ])
        print(result.exit_code)
        print(result.output)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
    """,
        str(tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    exit_code, output = done.stdout.split("\n", 1)
    assert "published m version 1" in output, output
    assert "deploy failed: the manager at ipc://" in output and "did not answer" in output, output
    assert exit_code == "2", output
    version = share / "models" / "m" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["config.json", "manifest.json", "model.pt"]


@pytest.mark.cluster
def test_manager_broker_and_edge_processes_run_without_torch(tmp_path):
    """The real role processes, started as `cluster ROLE` with torch blocked, get to listening (every import their
    commands make at start done) and the edge answers."""
    run_cli = "from cluster.cli import main\nsys.argv[0] = 'cluster'\nmain()\n"
    (tmp_path / "share").mkdir()
    with LocalCluster(tmp_path / "share", tmp_path / "logs") as local:
        for role in ("manager", "broker", "edge"):
            argv = [sys.executable, "-c", BLOCK_TORCH + run_cli, role]
            if role == "edge":
                argv += ["--host", "127.0.0.1", "--port", "0", "--grpc-port", "-1"]
            proc = local.spawn(role, argv, role=role, ready=True)
            local.bound.update(proc.addresses)
        with urllib.request.urlopen(local.edge_url + "/v2/health/live", timeout=30) as answer:
            assert answer.status == 200
        assert not local.exited(), local.logs()
