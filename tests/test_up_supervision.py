"""`cluster up` supervises its processes: kill -9 an agent under load (no request fails, a new agent serves), then the
broker, then the manager, then the edge: each comes back as a new process on the same addresses and the cluster
serves again. The restart decisions themselves are tested in-process in test_supervisor_logic.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import psutil
import pytest

from cluster import Client
from cluster.config import Addresses
from cluster.local import read_ready_file
from tests.harness import LocalCluster, wait_for

IN_FLIGHT = 16


class Load:
    """IN_FLIGHT threads calling client.infer("echo") in a loop; every outcome recorded with its start time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.outcomes: list[tuple[float, float, str | None, str | None]] = []  # (start, end, agent, error)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(IN_FLIGHT)]

    def _run(self, i: int) -> None:
        x = np.full((1, 16), i, np.float32)
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                result = self.client.infer("echo", {"x": x}, timeout=15)
                assert np.array_equal(result.as_numpy("y"), x), "echo answered something else"
                outcome = (start, time.monotonic(), result.agent, None)
            except Exception as exc:  # recorded, judged by the test
                outcome = (start, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)  # a broker that is down answers at once: do not spin
            with self.lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(20)

    def since(self, t: float) -> list[tuple[float, float, str | None, str | None]]:
        with self.lock:
            return [o for o in self.outcomes if o[0] >= t]

    def failures(self, start: float, end: float = float("inf")) -> list[str]:
        with self.lock:
            return [o[3] for o in self.outcomes if o[3] is not None and start <= o[1] <= end]

    def served_since(self, t: float, n: int, agent: str | None = None) -> bool:
        """At least n requests sent after t succeeded (by `agent`, if given)."""
        return sum(1 for o in self.since(t) if o[3] is None and (agent is None or o[2] == agent)) >= n


def _children(ready_path) -> dict[str, dict]:
    return (read_ready_file(ready_path) or {}).get("children", {})


def _pid_of(ready_path, role: str) -> int:
    pids = [c["pid"] for c in _children(ready_path).values() if c["role"] == role]
    assert len(pids) == 1, f"expected one {role} in the ready file, got {_children(ready_path)}"
    return pids[0]


def _new_pid(ready_path, role: str, old: int):
    """The role's pid in the ready file once it is another one, and that process runs; else None."""
    pid = _pid_of(ready_path, role)
    return pid if pid != old and psutil.pid_exists(pid) else None


def _start_up(share, tmp_path, *args: str, **env) -> tuple[subprocess.Popen, object, Callable[[], str]]:
    """`cluster up --any-ports` with `args`, the test's quick timings (heartbeats every 0.3 s, reconnects from 0.1 s)
    and `env`: (the process, its ready file's path, a function that returns its output's end for failure messages)."""
    log_path, ready_path = tmp_path / "up.log", tmp_path / "up.ready.json"
    up = subprocess.Popen(
        [sys.executable, "-m", "cluster", "up", "--share", str(share), "--grpc-port", "0", *args]
        + ["--any-ports", "--ready-file", str(ready_path)],
        env=LocalCluster(share, tmp_path).env(**env),
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def log() -> str:
        return f"\n----- cluster up's output -----\n{log_path.read_text(errors='replace')[-12000:]}"

    return up, ready_path, log


def _stop(up: subprocess.Popen) -> None:
    if up.poll() is None:
        os.kill(up.pid, signal.SIGKILL)  # its children get SIGTERM (they die with their parent)
        up.wait(10)


@pytest.mark.cluster
def test_cluster_up_restarts_what_dies_and_keeps_serving(share, tmp_path):
    up, ready_path, log = _start_up(share, tmp_path, "--agents", "2")
    try:
        ready = wait_for(lambda: read_ready_file(ready_path) or up.poll() is not None, 120, "cluster up to be ready")
        assert up.poll() is None, log()
        edge_url = ready["addresses"].pop("edge")
        children = ready["children"]
        assert sorted(c["role"] for c in children.values()) == ["agent", "agent", "broker", "edge", "manager"], children
        assert {c["pid"] for c in children.values()} == {p.pid for p in psutil.Process(up.pid).children()}, children
        local = LocalCluster(share, tmp_path / "test", addresses=Addresses(**ready["addresses"]))
        local.wait_for_agents(2, model="echo", timeout=60)
        client = local.client(timeout=15)

        with Load(client) as load:
            # -- an agent, under IN_FLIGHT requests: no request fails, a new agent (new pid) serves -------------------
            wait_for(lambda: load.served_since(0, 2 * IN_FLIGHT), 30, "the load to get going" + log())
            agents = client.agents(timeout=5)
            victim = agents[0]
            old_pids = {a["pid"] for a in agents}
            assert old_pids <= {c["pid"] for c in children.values()}, "the agents are not cluster up's children"
            killed = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)

            def new_agent():
                now = client.agents(timeout=2)
                fresh = [a for a in now if a["pid"] not in old_pids]
                return fresh[0] if fresh and len(now) == 2 else None

            fresh = wait_for(new_agent, 20, f"a new agent after kill -9 of {victim['id']}" + log())
            wait_for(lambda: load.served_since(killed, 5, agent=fresh["id"]), 15, f"{fresh['id']} to serve" + log())
            assert fresh["pid"] == _pid_of_name(ready_path, fresh["pid"]), "the ready file lists the new agent"
            failed = load.failures(0)
            assert not failed, f"{len(failed)} requests failed when an agent died: {failed[:5]}" + log()
            print(f"agent replaced and serving {time.monotonic() - killed:.1f} s after kill -9")

            # -- the broker, then the manager: each comes back (new pid, same addresses), clients recover --------------
            for role in ("broker", "manager"):
                old = _pid_of(ready_path, role)
                killed = time.monotonic()
                os.kill(old, signal.SIGKILL)
                new = wait_for(lambda role=role, old=old: _new_pid(ready_path, role, old), 30, f"a new {role}" + log())
                back = time.monotonic()
                wait_for(
                    lambda back=back: load.served_since(back, 2 * IN_FLIGHT),
                    20,
                    f"requests to succeed again after the {role} restarted (last failures: "
                    f"{load.failures(killed)[-3:]})" + log(),
                )
                assert new in {p.pid for p in psutil.Process(up.pid).children()}
                if role == "manager":  # the manager is not on the requests' path
                    failed = load.failures(killed)
                    assert not failed, f"requests failed while the manager was down: {failed[:5]}" + log()
                print(
                    f"{role} back {back - killed:.1f} s after kill -9, serving {time.monotonic() - killed:.1f} s "
                    f"after; {len(load.failures(killed))} requests failed meanwhile"
                )
        # the restarted manager rebuilt its registry from the agents' heartbeats
        wait_for(lambda: len(local.manager_query("agents")) == 2, 15, "the new manager to see 2 agents" + log())

        # -- the edge (without the load, which only slows its start): comes back on the same port ------------------
        old = _pid_of(ready_path, "edge")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: _new_pid(ready_path, "edge", old), 30, "a new edge" + log())
        body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        response = httpx.post(f"{edge_url}/v2/models/echo/infer", json=body, timeout=10)
        assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [1, 2, 3], response.text

        assert up.poll() is None, "cluster up exited" + log()
        text = log()
        for role in ("agent", "broker", "manager", "edge"):
            assert f"the {role}) exited: killed by SIGKILL" in text, f"the {role}'s death was not reported" + log()
        assert text.count("restarting it in 0.5 s") == 4, text
        local.stop_all()
        os.kill(up.pid, signal.SIGTERM)
        assert up.wait(30) == 0, log()
    finally:
        _stop(up)


def _pid_of_name(ready_path, pid: int) -> int | None:
    return next((c["pid"] for c in _children(ready_path).values() if c["pid"] == pid), None)


@pytest.mark.cluster
def test_cluster_up_gives_up_on_a_crash_looping_broker_and_stops_everything(share, tmp_path):
    """The broker dies and cannot start again (its port is taken): after 2 quick restarts cluster up reports the crash
    loop, says the cluster cannot serve without its broker, stops every process and exits with status 1."""
    policy = {"CLUSTER_RESTART_BACKOFF_INITIAL": 0.5, "CLUSTER_RESTART_BACKOFF_MAX": 0.5}
    up, ready_path, log = _start_up(share, tmp_path, "--agents", "0", CLUSTER_RESTART_CRASH_RESTARTS=2, **policy)
    squatter = None
    try:
        ready = wait_for(lambda: read_ready_file(ready_path) or up.poll() is not None, 120, "cluster up to be ready")
        assert up.poll() is None, log()
        children = [c["pid"] for c in ready["children"].values()]
        broker = _pid_of(ready_path, "broker")
        host, port = ready["addresses"]["broker_agents"].removeprefix("tcp://").rsplit(":", 1)
        os.kill(broker, signal.SIGKILL)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wait_for(lambda: squatter.bind((host, int(port))) or True, 2, f"the dead broker's port {port} to be free")
        squatter.listen()
        assert up.wait(60) == 1, log()
        text = log()
        assert f"broker-1 (pid {broker}, the broker) exited: killed by SIGKILL" in text, text
        assert text.count("failed to start again: exit status 1") == 2, text  # both restarts
        assert "CRASH LOOP: broker-1" in text and "GIVING UP on broker-1" in text, text
        assert "the cluster cannot serve without its broker" in text and "stopping everything" in text, text
        wait_for(lambda: not any(psutil.pid_exists(p) and _alive(p) for p in children), 15, "every child to exit")
    finally:
        if squatter is not None:
            squatter.close()
        _stop(up)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
