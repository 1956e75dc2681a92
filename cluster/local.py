"""The whole cluster as processes on this machine: `cluster up`, the end-to-end tests and the benchmarks start and
stop their processes here, and nowhere else.

    with LocalCluster(share, workdir) as local:          # every port picked by the OS
        local.start_manager(); local.start_broker(); local.start_agents(2); local.start_edge()
        local.wait_for_agents(2)
        with local.client() as client: ...

Each role runs as `python -m cluster <role>` (the same `cluster` package as this process) with its own log file
in `workdir`. Stopping is by pid: SIGTERM, then SIGKILL after a deadline; `stop_all` stops the edge first, then the
agents (so they drain through a live broker), then the broker and the manager.
One process (`Proc`: its log, stopping it by pid) is cluster/process.py's; port-0 addresses and which ports are
taken, cluster/ports.py's; the ready file and serving HTTP, cluster/serving.py's.

Ports: nobody guesses a free port. The roles that bind (manager, broker, edge) are started with `--ready-file PATH`
and addresses whose port may be 0; once every socket is bound, the role writes a ready file (below) with the
addresses it really got. LocalCluster reads it before it returns, and hands those addresses to every role started
after it. A role started again (after `kill` or `stop`) binds the addresses it got the first time, so its peers
reconnect where they were. A role started before a role it connects to (an agent before the broker) would not know
where to connect: LocalCluster then starts the missing role once, reads its ready file and stops it ("reserving" its
addresses); the real start later binds the same ones. Between those two starts the port is free, as it is during
any restart.

Several brokers: each start_broker() while every broker started so far runs adds one, with ports of its own (those of
`addresses` for the first; the i-th entry of a comma list there, else port 0 on the same host) and `--name broker-<i>`
(CLUSTER_BROKER_NAME; i: its index among the brokers); start_broker() when a broker is down (killed, stopped, exited,
or only reserved) starts that one again, on its ports. `addresses.broker_clients` and `broker_agents` are then comma
lists of every broker's addresses, in the brokers' order, for the roles and clients started after (each broker gets
only its own); `brokers` and `broker_addresses(i)` give one broker's.

The ready file: JSON written to a temporary file and renamed into place (a reader sees all of it or nothing):
    {"role": "broker", "pid": 4242, "addresses": {"broker_clients": "tcp://127.0.0.1:41807", "broker_agents": ...}}
Address keys are the field names of `config.Addresses`, plus "edge" (an http:// URL) for the edge.

Keys (`keys=DIR`): the bus runs with CURVE. DIR is made a key directory if it is not one (cluster.keys
.make_cluster_keys: server, admin, client, edge); the manager and the broker get DIR/server.key, each agent a key of
its own (DIR/<name>.key, role agent, created when it first starts), the edge DIR/edge.key, `client()` DIR/client.key
and `manager_query` DIR/admin.key (all through CLUSTER_KEY, which a start's own env may override).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cluster
from cluster.config import ADDRESS_SEPARATOR, DEFAULT_HOST, Addresses, address_list
from cluster.ports import (  # noqa: F401 (re-exported, as the serving names below)
    ADDRESS_FIELDS,
    any_port,
    any_port_addresses,
    is_any_port,
    ports_in_use,
)
from cluster.process import STOP_TIMEOUT, Proc, StartError
from cluster.serving import (  # noqa: F401 (re-exported: the CLI, tests and benchmarks import them from here)
    http_url,
    listening_socket,
    read_ready_file,
    serve_http,
    write_ready_file,
)
from cluster.settings import environment, to_env

if TYPE_CHECKING:
    from cluster.supervisor import Supervisor

log = logging.getLogger("cluster.local")

PACKAGE_ROOT = Path(cluster.__file__).resolve().parent.parent  # children import the `cluster` found here
READY_TIMEOUT = 60.0  # seconds a role may take to bind its sockets (the manager imports torch on a busy machine)
ROLES = ("manager", "broker", "agent", "edge")
STOP_ORDER = ("edge", "agent", "broker", "manager")  # front to back, so that in-flight work can finish
NO_STAND_IN = ("manager", "broker", "edge")  # roles the cluster has one of: without it, it cannot serve

# What each binding role reports in its ready file, and which addresses each role needs before it starts.
BINDS = {
    "manager": ("manager_heartbeats", "manager_events", "manager_queries"),
    "broker": ("broker_clients", "broker_agents"),
    "edge": ("edge",),
}
NEEDS = {
    "broker": ("manager_events", "manager_heartbeats"),
    "agent": ("broker_agents", "manager_heartbeats"),
    "edge": ("broker_clients",),
}
OWNER = {key: role for role, keys in BINDS.items() for key in keys}


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, so that no process is orphaned (Linux PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class BrokerSlot:
    """One of the cluster's brokers: its name (--name) and where it listens (what it reported once started, else
    what it was asked to bind), and its latest process (None: never started)."""

    index: int
    name: str
    clients: str
    agents: str
    proc: Proc | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()


# ---- the cluster ------------------------------------------------------------------------------------------------


class LocalCluster:
    """Start, restart and stop the cluster's role processes on this machine; remember where each one listens.

    share: the model share (CLUSTER_SHARE of every process; None: not set). workdir: log and ready files.
    heartbeat_interval, liveness, reconnect (initial, max seconds), log_level: given to every process through
    CLUSTER_* variables (None: not set, the process's own default or environment decides); the defaults suit tests.
    extra_env: more variables for every process (may change between starts). addresses: where to bind (default:
    127.0.0.1, port 0). edge_host, edge_port: where the edge listens (port 0: any). inherit_output: the processes
    write to this process's stdout/stderr instead of log files. die_with_parent: they get SIGTERM when this
    process dies (Linux).
    """

    def __init__(
        self,
        share: str | Path | None,
        workdir: str | Path,
        heartbeat_interval: float | None = 0.3,
        liveness: int | None = 3,
        extra_env: dict | None = None,
        *,
        addresses: Addresses | None = None,
        edge_host: str = DEFAULT_HOST,
        edge_port: int = 0,
        edge_grpc_port: int | None = None,
        reconnect: tuple[float, float] | None = (0.1, 1.0),
        log_level: str | None = "INFO",
        inherit_output: bool = False,
        die_with_parent: bool = False,
        keys: str | Path | None = None,
    ) -> None:
        self.keys = None if keys is None else Path(keys)
        if self.keys is not None and not (self.keys / "members.json").exists():
            from cluster.keys import make_cluster_keys

            make_cluster_keys(self.keys, agents=0)
        self.share = share
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.extra_env = dict(extra_env or {})
        self.requested = addresses or any_port_addresses()
        self.edge_host = edge_host
        self.edge_port = edge_port
        self.edge_grpc_port = edge_grpc_port
        self.reconnect = reconnect
        self.log_level = log_level
        self.inherit_output = inherit_output
        self.die_with_parent = die_with_parent
        self.bound: dict[str, str] = {}  # address key -> the address a role reported in its ready file
        self.procs: list[Proc] = []  # every process started, in order (killed and stopped ones too)
        self.brokers: list[BrokerSlot] = []  # every broker, in order (its index is its place here)
        self._broker_of: dict[str, BrokerSlot] = {}  # process name -> the broker it runs
        self._clients: list = []

    # ---- where things are -------------------------------------------------------------------------------------

    @property
    def addresses(self) -> Addresses:
        """The cluster's addresses: those the roles reported where known, else those asked for."""
        return replace(self.requested, **{k: v for k, v in self.bound.items() if k in ADDRESS_FIELDS})

    @property
    def edge_url(self) -> str | None:
        """The edge's http://host:port once an edge has reported it."""
        return self.bound.get("edge")

    @property
    def grpc_address(self) -> str | None:
        """The edge's gRPC host:port (for tritonclient.grpc) once an edge with gRPC has reported it."""
        return self.bound.get("grpc")

    def _known(self, key: str) -> bool:
        return not any(is_any_port(a) for a in address_list(getattr(self.addresses, key)))

    def broker_addresses(self, index: int) -> Addresses:
        """The cluster's addresses with only broker `index`'s (e.g. a Client of that broker alone)."""
        slot = self.brokers[index]
        return replace(self.addresses, broker_clients=slot.clients, broker_agents=slot.agents)

    @property
    def broker_procs(self) -> list[Proc | None]:
        """Each broker's latest process, in the brokers' order."""
        return [slot.proc for slot in self.brokers]

    def _broker_slot(self, name: str) -> BrokerSlot:
        """The broker a start of process `name` runs: the one that name ran before (a restart), else the first one
        down, else a new one."""
        slot = self._broker_of.get(name) or next((b for b in self.brokers if not b.running()), None)
        if slot is None:
            i = len(self.brokers)

            def requested(key: str) -> str:
                wanted = address_list(getattr(self.requested, key))
                return wanted[i] if i < len(wanted) else any_port(wanted[0])

            slot = BrokerSlot(i, f"broker-{i}", requested("broker_clients"), requested("broker_agents"))
            self.brokers.append(slot)
        self._broker_of[name] = slot
        return slot

    def _broker_started(self, slot: BrokerSlot, proc: Proc) -> None:
        """Remember where a broker listens; the cluster's broker addresses become the list of every broker's."""
        slot.clients = proc.addresses.get("broker_clients", slot.clients)
        slot.agents = proc.addresses.get("broker_agents", slot.agents)
        self.bound["broker_clients"] = ADDRESS_SEPARATOR.join(b.clients for b in self.brokers)
        self.bound["broker_agents"] = ADDRESS_SEPARATOR.join(b.agents for b in self.brokers)

    def env(self, **extra) -> dict:
        """The environment of every process: this one's plus the cluster's CLUSTER_* settings, then `extra`."""
        env = dict(environment(), **to_env(self.addresses), PYTHONUNBUFFERED="1")
        optional = {
            "CLUSTER_SHARE": self.share,
            "CLUSTER_HEARTBEAT_INTERVAL": self.heartbeat_interval,
            "CLUSTER_LIVENESS": self.liveness,
            "CLUSTER_RECONNECT_INITIAL": self.reconnect and self.reconnect[0],
            "CLUSTER_RECONNECT_MAX": self.reconnect and self.reconnect[1],
            "CLUSTER_LOG_LEVEL": self.log_level,
        }
        env.update({k: str(v) for k, v in optional.items() if v is not None})
        env.update({k: str(v) for k, v in self.extra_env.items()})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def role_key(self, role: str, name: str) -> Path:
        """Keys on: the key file a role process presents (an agent's is created on its first start)."""
        if role in ("manager", "broker"):
            return self.keys / "server.key"
        if role == "edge":
            return self.keys / "edge.key"
        path = self.keys / f"{name}.key"
        if not path.exists():
            from cluster.keys import add

            add(self.keys, name, "agent")
        return path

    def member_key(self, name: str) -> str | None:
        """Keys on: DIR/<name>.key (e.g. "client", "admin"); None with keys off."""
        return None if self.keys is None else str(self.keys / f"{name}.key")

    # ---- starting -----------------------------------------------------------------------------------------------

    def start(self, role: str, *args: str, name: str | None = None, timeout: float = READY_TIMEOUT, **env) -> Proc:
        """Start `python -m cluster <role> *args` (env: more CLUSTER_* variables for this process); for a role that
        binds, return once it has reported its addresses."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
        for key in NEEDS.get(role, ()):
            if not self._known(key):
                self._reserve(OWNER[key], needed_by=role)
        argv = [sys.executable, "-m", "cluster", role, *args]
        if role == "edge":
            argv += ["--host", self.edge_host, "--port", str(self._edge_port()), "--grpc-port", self._grpc_port()]
        name = name or f"{role}-{len(self.procs)}"
        if self.keys is not None and "CLUSTER_KEY" not in env:
            env["CLUSTER_KEY"] = str(self.role_key(role, name))
        own = {}  # a broker binds its own addresses (the others' are in the list every other role gets)
        slot = self._broker_slot(name) if role == "broker" else None
        if slot is not None:
            own = {"CLUSTER_BROKER_CLIENTS": slot.clients, "CLUSTER_BROKER_AGENTS": slot.agents}
            own["CLUSTER_BROKER_NAME"] = slot.name
        try:
            proc = self.spawn(name, argv, role=role, ready=role in BINDS, timeout=timeout, **{**own, **env})
        except StartError as exc:
            if slot is not None:
                slot.proc = exc.proc
            raise
        proc.args, proc.env = tuple(args), {k: str(v) for k, v in env.items()}
        if slot is not None:
            slot.proc = proc
            self._broker_started(slot, proc)
        else:
            self.bound.update(proc.addresses)
        return proc

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        role: str = "other",
        ready: bool = False,
        timeout: float = READY_TIMEOUT,
        **env,
    ) -> Proc:
        """Start any command as one of this cluster's processes: the cluster's environment (plus `env`), its own log
        file, stopped by stop_all (roles other than the cluster's last). ready=True: the command takes
        `--ready-file PATH` (appended here) and spawn returns once it wrote it; its addresses are in proc.addresses."""
        ready_path = None
        if ready:
            ready_path = self.workdir / f"{name}.ready.json"
            ready_path.unlink(missing_ok=True)
            argv = [*argv, "--ready-file", str(ready_path)]
        proc_env = self.env(**env)
        proc_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), proc_env.get("PYTHONPATH")) if p)
        log_path = None if self.inherit_output else self.workdir / f"{name}.log"
        output = None if log_path is None else open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                argv,
                env=proc_env,
                stdout=output,
                stderr=None if output is None else subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent and sys.platform.startswith("linux") else None,
            )
        finally:
            if output is not None:
                output.close()
        proc = Proc(role, name, tuple(argv), popen, log_path, env={k: str(v) for k, v in env.items()})
        self.procs.append(proc)
        if ready_path is not None:
            proc.addresses = self._wait_ready(proc, ready_path, timeout)["addresses"]
        return proc

    def _grpc_port(self) -> str:
        """The edge's --grpc-port: the port it got the first time on a restart; 0 (off) without edge_grpc_port;
        -1 (any free port) for edge_grpc_port 0."""
        if self.edge_grpc_port is None:
            return "0"
        if self.grpc_address:
            return self.grpc_address.rsplit(":", 1)[1]
        return str(self.edge_grpc_port or -1)

    def _edge_port(self) -> int:
        return int(self.edge_url.rsplit(":", 1)[1]) if self.edge_url else self.edge_port

    def _wait_ready(self, proc: Proc, path: Path, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ready = read_ready_file(path)
            if ready is not None:
                return ready
            if not proc.alive():
                why = f"exited with status {proc.returncode} before it was ready"
                raise StartError(f"{proc.name} (pid {proc.pid}) {why}\n{self._tail(proc)}", proc)
            if time.monotonic() > deadline:
                proc.kill()
                raise StartError(
                    f"{proc.name} (pid {proc.pid}) was not ready after {timeout} s\n{self._tail(proc)}", proc
                )
            time.sleep(0.02)

    def _reserve(self, role: str, needed_by: str) -> None:
        """Start `role` once to learn the addresses it binds, then stop it: a later start binds the same ones."""
        log.info("starting the %s once to learn its addresses (the %s starts before it)", role, needed_by)
        self.start(role, name=f"{role}-{len(self.procs)}-reserve").stop()

    def start_manager(self, **env) -> Proc:
        return self.start("manager", name=f"manager-{len(self.procs)}", **env)

    def start_broker(self, *args: str, **env) -> Proc:
        """A broker: a new one while every broker runs, else the first one down again (on its ports); see above."""
        return self.start("broker", *args, name=f"broker-{len(self.procs)}", **env)

    def start_agent(self, agent_id: str | None = None, *args: str, **env) -> Proc:
        """An agent (id `agent_id`, default agent-N). Does not wait: wait_for_agents says when agents serve."""
        agent_id = agent_id or f"agent-{len(self.procs)}"
        return self.start("agent", "--id", agent_id, *args, name=agent_id, **env)

    def start_agents(self, n: int, *args: str, **env) -> list[Proc]:
        return [self.start_agent(None, *args, **env) for _ in range(n)]

    def start_edge(self, *args: str, name: str | None = None, timeout: float = READY_TIMEOUT, **env) -> Proc:
        """The HTTP edge on edge_host:edge_port (the port it got the first time, on a restart), connected to the
        cluster's broker; returns once it serves (its `url` and `port` say where)."""
        return self.start("edge", *args, name=name or f"edge-{len(self.procs)}", timeout=timeout, **env)

    def restart(self, proc: Proc, timeout: float = STOP_TIMEOUT) -> Proc:
        """Stop `proc` if it still runs, then start its role again, with the same name, arguments and addresses."""
        if proc.role not in ROLES:
            raise ValueError(f"{proc.name} is not a cluster role; spawn it again instead")
        proc.stop(timeout)
        return self.start(proc.role, *proc.args, name=proc.name, **proc.env)

    # ---- stopping -----------------------------------------------------------------------------------------------

    def kill(self, proc: Proc) -> None:
        """kill -9, by pid."""
        proc.kill()

    def stop(self, proc: Proc, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by pid, wait, SIGKILL if it does not go; returns the exit status."""
        return proc.stop(timeout)

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """Close our clients, then stop every process: the edge, then the agents (they drain through the broker),
        then the broker and the manager; each group gets SIGTERM together and `timeout` s before SIGKILL."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        order = {role: i for i, role in enumerate(STOP_ORDER)}
        for rank in sorted({order.get(p.role, len(order)) for p in self.procs}):
            group = [p for p in self.procs if order.get(p.role, len(order)) == rank and p.alive()]
            for proc in group:
                proc.terminate()
            deadline = time.monotonic() + timeout
            for proc in group:
                proc.wait(deadline - time.monotonic())

    def exited(self) -> list[Proc]:
        """Processes that exited although nobody stopped them."""
        return [p for p in self.procs if not p.retired and not p.alive()]

    def running(self) -> dict[str, Proc]:
        """The cluster's role processes that nobody stopped, by name (the latest start of each name)."""
        return {p.name: p for p in self.procs if p.role in ROLES and not p.retired}

    # ---- supervising ----------------------------------------------------------------------------------------------

    def supervise(
        self,
        supervisor: Supervisor | None = None,
        *,
        no_stand_in: tuple[str, ...] = NO_STAND_IN,
        say: Callable[[int, str], None] = log.log,
        on_restart: Callable[[dict[str, Proc]], None] | None = None,
        poll: float = 0.1,
    ) -> Proc:
        """Keep the role processes running, as systemd's Restart=on-failure (cluster/supervisor.py decides): a process
        that fails is reported with its exit status or signal and started again after a backoff, with the same name,
        arguments and addresses (so its peers reconnect where they were); the others keep serving. Runs until a role
        with no stand-in (`no_stand_in`: the manager, the broker, the edge) is given up on (a crash loop) or exits
        cleanly without being asked, and no other process of that role is left (one of several brokers given up on
        leaves the others serving): returns that process. An agent given up on, or that exits cleanly, is left
        down. `say(level, line)` reports each exit and restart (logging levels: ERROR for a crash loop, WARNING
        for an exit, INFO for a restart); `on_restart(running)` is called after each restart. Restarting a
        role that binds waits (up to READY_TIMEOUT) for its ready file; meanwhile other exits wait their turn."""
        from cluster.supervisor import CLEAN, RESTART, Supervisor

        supervisor = supervisor or Supervisor()
        current = self.running()
        for name, proc in current.items():
            supervisor.started(name, proc.started_at)
        done: set[str] = set()  # given up on, or exited cleanly: not coming back

        def others(proc: Proc) -> list[str]:
            """The other processes of its role that run or will be restarted."""
            return [n for n, p in current.items() if p.role == proc.role and n != proc.name and n not in done]

        def exited(proc: Proc, note: str = "exited") -> Proc | None:
            """Feed one exit to the supervisor and report what it decided; the process if it ends supervision."""
            proc.retired = True  # handled: exited() no longer lists it
            d = supervisor.exited(proc.name, time.monotonic(), proc.returncode)
            what = f"{proc.name} (pid {proc.pid}, the {proc.role}) {note}: {d.how} after {d.uptime:.1f} s up"
            if d.action != RESTART:
                done.add(proc.name)
            alone = proc.role in no_stand_in and not others(proc)
            window = f"{supervisor.policy.crash_window:g} s"
            if d.action == RESTART:
                say(logging.WARNING, f"{what}; restarting it in {d.delay:g} s (restart {d.restarts} within {window})")
            elif d.action == CLEAN:
                say(
                    logging.WARNING,
                    f"{what}, a clean exit that cluster up did not ask for; "
                    + (f"the cluster has no other {proc.role}" if alone else "not restarting it (only failures are)"),
                )
            else:
                say(
                    logging.ERROR,
                    f"CRASH LOOP: {what}, after {d.restarts} restarts within {window}; GIVING UP on {proc.name}; "
                    + (f"the cluster cannot serve without its {proc.role}" if alone else "the others keep serving"),
                )
            return proc if alone and d.action != RESTART else None

        while True:
            for proc in self.exited():
                if current.get(proc.name) is proc and (fatal := exited(proc)) is not None:
                    return fatal
                proc.retired = True
            for name in supervisor.due(time.monotonic()):
                old = current[name]
                try:
                    current[name] = self.restart(old)
                    supervisor.started(name, current[name].started_at)
                except StartError as exc:
                    current[name] = exc.proc
                    supervisor.started(name, exc.proc.started_at)
                    late = "was not ready after" in str(exc)  # and _wait_ready killed it
                    note = f"was not ready {READY_TIMEOUT:g} s after a restart" if late else "failed to start again"
                    if (fatal := exited(exc.proc, note=note)) is not None:
                        return fatal
                    continue
                say(logging.INFO, f"{name} restarted: pid {current[name].pid} (was {old.pid})")
                if on_restart is not None:
                    on_restart(dict(current))
            time.sleep(poll)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # ---- what happened ------------------------------------------------------------------------------------------

    @staticmethod
    def _tail(proc: Proc, n: int = 6000) -> str:
        return proc.log()[-n:]

    def logs(self) -> str:
        return "\n".join(
            f"----- {p.name} (pid {p.pid}, exit {p.returncode}) -----\n{self._tail(p)}"
            for p in self.procs
            if p.log_path is not None
        )

    # ---- talking to it ------------------------------------------------------------------------------------------

    def client(self, timeout: float | None = None):
        """A bus Client of this cluster's broker, closed by stop_all."""
        from cluster.client import Client

        client = Client(self.addresses.broker_clients, timeout=timeout, key=self.member_key("client"))
        self._clients.append(client)
        return client

    def agent_ids(self, client) -> set[str]:
        return {a["id"] for a in client.agents(timeout=2)}

    def wait_for_agents(self, n: int, timeout: float = 60.0, model: str | None = None) -> list[dict]:
        """Wait until the broker lists n live agents (serving `model`, if given); TimeoutError with the logs if not."""
        client = self.client()

        def enough():
            agents = client.agents(timeout=2)
            if model is not None:
                agents = [a for a in agents if any(m["name"] == model for m in a.get("models", []))]
            return agents if len(agents) >= n else None

        return wait_until(
            enough, timeout, f"{n} live agents" + (f" serving {model}" if model else ""), describe=self.logs
        )

    def manager_query(self, what: str, timeout: float = 2.0):
        """Ask the manager directly (its ROUTER query socket)."""
        from cluster.manager.client import ManagerClient

        return ManagerClient(self.addresses.manager_queries, key=self.member_key("admin")).call(what, timeout=timeout)


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.02,
    describe: Callable[[], str] | None = None,
):
    """Poll `condition` until it returns something truthy, and return that; TimeoutError naming `what` at the
    deadline (with the last error the condition raised, and `describe()`, e.g. the logs)."""
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
            message = f"timed out after {timeout} s waiting for {what}" + (
                f" (last error: {last_error!r})" if last_error else ""
            )
            raise TimeoutError(message + (f"\n{describe()}" if describe else ""))
        time.sleep(interval)
