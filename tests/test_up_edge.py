"""`cluster up` as issue 18 found it: `--secure` gives the edge what its repository routes need (an admin token it
makes and prints, an admin key for the manager), SIGINT stops an `up` that was started with SIGINT ignored (a
script's `&`), and `--threads` (default: the cores shared out between the agents) reaches every agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from cluster import config
from cluster.cli import app
from cluster.config import Addresses
from cluster.local import read_ready_file
from tests.harness import LocalCluster, all_gone, wait_for


def _start_up(share, tmp_path, *more: str, ignore_sigint: bool = False) -> tuple[subprocess.Popen, object, object]:
    log_path, ready_path = tmp_path / "up.log", tmp_path / "up.ready.json"
    up = subprocess.Popen(
        [sys.executable, "-m", "cluster", "up", "--share", str(share), "--any-ports", "--ready-file", str(ready_path)]
        + list(more),
        env=LocalCluster(share, tmp_path).env(),
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # as `cluster up &` in a non-interactive shell: the child inherits SIGINT ignored
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
    )
    return up, log_path, ready_path


def _kill(up: subprocess.Popen) -> None:
    if up.poll() is None:
        for child in psutil.Process(up.pid).children(recursive=True):
            child.kill()
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)


@pytest.mark.cluster
def test_sigint_stops_a_cluster_up_started_with_sigint_ignored(share, tmp_path):
    up, log_path, ready_path = _start_up(share, tmp_path, "--agents", "1", "--edge-port", "0", ignore_sigint=True)
    try:
        wait_for(lambda: read_ready_file(ready_path) or up.poll() is not None, 120, "cluster up to be ready")
        assert up.poll() is None, log_path.read_text()
        children = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        assert len(children) == 3, f"expected manager, broker and 1 agent, got {children}"
        os.kill(up.pid, signal.SIGINT)
        try:
            status = up.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGINT did not stop `cluster up` in 30 s:\n{log_path.read_text()}") from None
        assert status == 0, log_path.read_text()
        assert "cluster stopped" in log_path.read_text()
        wait_for(lambda: all_gone(children), 15, "every process `cluster up` started to exit")
    finally:
        _kill(up)


@pytest.mark.cluster
def test_cluster_up_secure_lets_the_printed_admin_token_load_and_unload_through_the_edge(share, tmp_path):
    keys = tmp_path / "keys"
    up, log_path, ready_path = _start_up(
        share, tmp_path, "--agents", "1", "--grpc-port", "0", "--secure", "--keys", str(keys)
    )
    try:
        ready = wait_for(lambda: read_ready_file(ready_path) or up.poll() is not None, 120, "cluster up to be ready")
        assert up.poll() is None, log_path.read_text()
        edge = ready["addresses"].pop("edge")
        banner = log_path.read_text()
        admin_file = keys / "edge.admin-token"
        assert str(admin_file) in banner, f"the banner should say where the edge's admin token is:\n{banner}"
        assert oct(admin_file.stat().st_mode & 0o777) == "0o600"
        admin, user = admin_file.read_text().strip(), (keys / "edge.token").read_text().strip()
        assert admin and admin != user
        local = LocalCluster(share, tmp_path, addresses=Addresses(**ready["addresses"]), keys=keys)
        local.wait_for_agents(1, model="echo")

        def post(path: str, token: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.post(f"{edge}/v2/repository/models/echo/{path}", headers=headers, json={}, timeout=120)

        assert post("unload", None).status_code == 401
        assert post("unload", user).status_code == 403, "the user token must not change the cluster"
        response = post("unload", admin)
        assert response.status_code == 200, (
            f"unload with the printed admin token: {response.status_code} {response.text}"
        )
        with local.client() as client:
            wait_for(lambda: "echo" not in client.models(), 30, "echo to be unloaded")
        response = post("load", admin)
        assert response.status_code == 200, f"load with the printed admin token: {response.status_code} {response.text}"
        infer = httpx.post(
            f"{edge}/v2/models/echo/infer",
            headers={"Authorization": f"Bearer {user}"},
            json={"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
            timeout=30,
        )
        assert infer.status_code == 200 and infer.json()["outputs"][0]["data"] == [1.0, 2.0], infer.text
        local.stop_all()
        os.kill(up.pid, signal.SIGTERM)
        assert up.wait(30) == 0, log_path.read_text()
    finally:
        _kill(up)


def test_up_threads_default_shares_the_cores_between_the_agents():
    assert config.up_torch_threads(2, cores=8) == 4
    assert config.up_torch_threads(3, cores=8) == 2
    assert config.up_torch_threads(4, cores=2) == 1, "at least one thread"
    assert config.up_torch_threads(0, cores=4) == 4
    assert config.up_torch_threads(1) == config.usable_cores() >= 1


class _FakeLocal:
    """LocalCluster for `up` in-process: records what it is asked to start, then stops as Ctrl-C would."""

    started: list[tuple] = []

    def __init__(self, *args, **kwargs) -> None:
        self.addresses, self.edge_url, self.grpc_address = Addresses(), None, None

    def start_manager(self):
        self.started.append(("manager",))

    def start_broker(self):
        self.started.append(("broker",))

    def start(self, role, *args, name=None):
        self.started.append((role, *args))

    def start_edge(self, *args):
        self.started.append(("edge", *args))

    def running(self):
        return {}

    def supervise(self, *args, **kwargs):
        raise KeyboardInterrupt

    def stop_all(self):
        pass


@pytest.mark.parametrize(("args", "threads"), [(["--agents", "2"], "4"), (["--agents", "3", "--threads", "1"], "1")])
def test_up_gives_every_agent_its_threads(share, monkeypatch, args, threads):
    import cluster.local

    monkeypatch.delenv("CLUSTER_TORCH_THREADS", raising=False)
    monkeypatch.setattr(cluster.local, "LocalCluster", _FakeLocal)
    monkeypatch.setattr(config, "usable_cores", lambda: 8)
    _FakeLocal.started = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        out = CliRunner().invoke(app, ["up", "--share", str(share), "--any-ports", "--edge-port", "0", *args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert out.exit_code == 0, out.output
    agents = [s for s in _FakeLocal.started if s[0] == "agent"]
    assert agents and all(s[1:3] == ("--threads", threads) for s in agents), _FakeLocal.started
    # ... and its share of the host's RAM as its placement budget
    from cluster.sizes import host_memory

    budget = str(host_memory() // len(agents))
    assert all(s[3:] == ("--memory-budget", budget) for s in agents), _FakeLocal.started
    assert f"{threads} torch threads each" in out.output, out.output


def test_the_kubernetes_edge_gets_what_its_repository_routes_need():
    """deploy/kubernetes/edge.yaml: admin tokens and an admin key for the manager, as `cluster up --secure` gives."""
    import yaml

    from tests.harness import REPO_ROOT

    text = (REPO_ROOT / "deploy" / "kubernetes" / "edge.yaml").read_text()
    deployment = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args, env = container["args"], {e["name"]: e.get("value") for e in container["env"]}
    assert args[args.index("--admin-token-file") + 1].startswith("/etc/cluster/keys/"), args
    assert env.get("CLUSTER_EDGE_MANAGER_KEY", "").startswith("/etc/cluster/keys/"), env
    assert "admin" in text and "load" in text, "the manifest should say what the edge may do"
