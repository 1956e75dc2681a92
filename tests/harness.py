"""Start real cluster processes (manager, broker, agents) on loopback TCP for end-to-end tests, and stop them by pid.

    with LocalCluster(share, tmp_path, heartbeat_interval=0.3) as cluster:
        cluster.start_manager(); cluster.start_broker(); cluster.start_agents(3)
        cluster.wait_for_agents(3)
        with cluster.client() as client: ...

Each process runs `python -m cluster <role>` with its own log file; a failing test prints the logs. Ports are picked
free on 127.0.0.1 for each cluster, so tests never meet a cluster that another test (or a user) is running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from cluster import Client
from cluster.config import Addresses
from cluster.manager.client import ManagerClient

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll `condition` until it returns something truthy; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition may fail while things start up
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


@dataclass
class Proc:
    role: str
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class LocalCluster:
    share: Path
    workdir: Path
    heartbeat_interval: float = 0.3
    liveness: int = 3
    extra_env: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(5)]
        self.addresses = Addresses(*(f"tcp://127.0.0.1:{p}" for p in ports))
        self.procs: list[Proc] = []
        self._clients: list[Client] = []

    # ---- environment shared by every process --------------------------------------------------------------------

    def env(self, **extra) -> dict:
        a = self.addresses
        env = dict(
            os.environ,
            CLUSTER_BROKER_CLIENTS=a.broker_clients,
            CLUSTER_BROKER_AGENTS=a.broker_agents,
            CLUSTER_MANAGER_HEARTBEATS=a.manager_heartbeats,
            CLUSTER_MANAGER_EVENTS=a.manager_events,
            CLUSTER_MANAGER_QUERIES=a.manager_queries,
            CLUSTER_SHARE=str(self.share),
            CLUSTER_HEARTBEAT_INTERVAL=str(self.heartbeat_interval),
            CLUSTER_LIVENESS=str(self.liveness),
            CLUSTER_RECONNECT_INITIAL="0.1",
            CLUSTER_RECONNECT_MAX="1.0",
            CLUSTER_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # ---- processes ----------------------------------------------------------------------------------------------

    def start(self, role: str, *args: str, name: str | None = None, **env) -> Proc:
        name = name or f"{role}-{len(self.procs)}"
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", "cluster", role, *args],
            env=self.env(**env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        log_file.close()
        proc = Proc(role, name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_manager(self, **env) -> Proc:
        return self.start("manager", name=f"manager-{len(self.procs)}", **env)

    def start_broker(self, *args: str, **env) -> Proc:
        return self.start("broker", *args, name=f"broker-{len(self.procs)}", **env)

    def start_agent(self, agent_id: str | None = None, *args: str, **env) -> Proc:
        agent_id = agent_id or f"agent-{len(self.procs)}"
        return self.start("agent", "--id", agent_id, *args, name=agent_id, **env)

    def start_agents(self, n: int, *args: str, **env) -> list[Proc]:
        return [self.start_agent(None, *args, **env) for _ in range(n)]

    def kill(self, proc: Proc) -> None:
        """kill -9, by pid."""
        if proc.alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def stop(self, proc: Proc, timeout: float = 10.0) -> int:
        """SIGTERM by pid, wait, SIGKILL if it does not go; returns the exit status."""
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        for proc in reversed(self.procs):
            self.stop(proc)

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} (pid {p.pid}, exit {p.popen.returncode}) -----\n{p.log()[-6000:]}" for p in self.procs)

    # ---- talking to it ------------------------------------------------------------------------------------------

    def client(self, timeout: float | None = None) -> Client:
        client = Client(self.addresses.broker_clients, timeout=timeout)
        self._clients.append(client)
        return client

    def agent_ids(self, client: Client) -> set[str]:
        return {a["id"] for a in client.agents(timeout=2)}

    def wait_for_agents(self, n: int, timeout: float = 60.0, model: str | None = None) -> list[dict]:
        """Wait until the broker lists n live agents (serving `model`, if given)."""
        client = self.client()

        def enough():
            agents = client.agents(timeout=2)
            if model is not None:
                agents = [a for a in agents if any(m["name"] == model for m in a.get("models", []))]
            return agents if len(agents) >= n else None

        try:
            return wait_for(enough, timeout, f"{n} live agents")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def manager_query(self, what: str, timeout: float = 2.0):
        """Ask the manager directly (its ROUTER query socket)."""
        return ManagerClient(self.addresses.manager_queries).call(what, timeout=timeout)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


# ---- the HTTP edge ---------------------------------------------------------------------------------------------


@dataclass
class EdgeProcess:
    popen: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid (uvicorn shuts down gracefully), SIGKILL if it does not go."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def start_edge(broker: str, workdir: Path, *args: str, timeout: float = 30.0) -> EdgeProcess:
    """`python -m edge` on a free 127.0.0.1 port, waited on until /v2/health/live answers."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"edge-{port}.log"
    with open(log_path, "ab") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", "edge", "--host", "127.0.0.1", "--port", str(port), "--broker", broker, "--log-level", "warning", *args],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    edge = EdgeProcess(popen, port, log_path)

    def live():
        if not edge.alive():
            raise AssertionError(f"the edge exited with {popen.returncode}:\n{edge.log()}")
        return httpx.get(edge.url + "/v2/health/live", timeout=1).status_code == 200

    try:
        wait_for(live, timeout, "the edge to listen")
    except BaseException:
        edge.stop()
        raise
    return edge
