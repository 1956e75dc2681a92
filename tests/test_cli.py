"""The `cluster` command: `cluster up` starts everything and stops all of it (no orphans); `cluster status`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from cluster.config import Addresses
from cluster.local import read_ready_file
from tests.harness import LocalCluster, wait_for


def _start_up(local: LocalCluster, share, log_path, ready_path) -> subprocess.Popen:
    """`cluster up` on ports the OS picks (--any-ports); it says which in `ready_path`."""
    return subprocess.Popen(
        [sys.executable, "-m", "cluster", "up", "--agents", "2", "--share", str(share)]
        + ["--any-ports", "--ready-file", str(ready_path)],
        env=local.env(),
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _gone(pids) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_cluster_up_serves_and_stops_everything(share, tmp_path, how):
    log_path, ready_path = tmp_path / "up.log", tmp_path / "up.ready.json"
    up = _start_up(LocalCluster(share, tmp_path), share, log_path, ready_path)
    try:
        ready = wait_for(lambda: read_ready_file(ready_path) or up.poll() is not None, 120, "cluster up to be ready")
        assert up.poll() is None, log_path.read_text()
        edge_port = int(ready["addresses"].pop("edge").rsplit(":", 1)[1])
        local = LocalCluster(share, tmp_path, addresses=Addresses(**ready["addresses"]))
        local.wait_for_agents(2, model="digits")
        children = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        assert len(children) == 5, f"expected manager, broker, 2 agents and the edge, got {children}"
        page = wait_for(lambda: httpx.get(f"http://127.0.0.1:{edge_port}/", timeout=2), 30, "the edge to serve the page")
        assert page.status_code == 200 and "<canvas" in page.text
        out = subprocess.run(
            [sys.executable, "-m", "cluster", "status", "--timeout", "5"], env=local.env(), capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "digits" in out.stdout and "echo" in out.stdout and "Agents (2)" in out.stdout, out.stdout
        text = log_path.read_text()
        assert local.addresses.broker_clients in text and f"http://127.0.0.1:{edge_port}/" in text, text
        local.stop_all()  # closes the test's client
        os.kill(up.pid, how)
        up.wait(20)
        if how != signal.SIGKILL:
            assert up.returncode == 0, log_path.read_text()
        wait_for(lambda: _gone(children), 15, "every process `cluster up` started to exit")
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait(10)
        for proc in psutil.Process().children(recursive=True):
            if proc.pid != os.getpid() and "cluster" in " ".join(proc.cmdline()):
                proc.kill()


def test_status_says_clearly_when_the_broker_is_down(tmp_path, share):
    local = LocalCluster(share, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "status", "--timeout", "0.5"], env=local.env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "cannot reach the broker" in out.stderr


def test_every_command_documents_its_options():
    for command in ("manager", "broker", "agent", "edge", "up", "status", "deploy", "rollback", "undeploy", "models", "bench"):
        out = subprocess.run([sys.executable, "-m", "cluster", command, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "CLUSTER_" in out.stdout or command in ("up", "status", "rollback", "undeploy"), f"`{command} --help` names no environment variables"
