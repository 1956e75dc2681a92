"""The agent: hosts models on one machine and answers inference requests from the broker.

Threads:
- the I/O thread (`run`) owns every socket: a DEALER to the broker (READY, HEARTBEAT, answers), an XPUB to the
  manager (HEARTBEAT every interval, and at once when a manager subscribes), and an inproc PULL for answers coming
  back from the workers. It validates each request before it reaches a model.
- inference workers (runner.WorkerPool) run the models.

The agent trusts nothing it receives: a malformed request gets an ERROR answer (or is dropped, with a log line, when
it cannot even be answered), never a crash. A socket monitor on the broker DEALER says when the connection is up:
READY goes the moment a connection (a first one, or one after the broker restarted) completes its handshake, so a
restarted broker has every agent back within about `link_retry_max` (how often the socket tries a broker that is
down) of listening, whatever the outage lasted. While the connection is down the agent sends the broker nothing but
answers (no heartbeats: they would pile up and each make the new broker ask for READY again). If a connected broker
goes silent for `liveness` intervals, the agent sends READY again, backing off from `reconnect_initial` to
`reconnect_max` with jitter.

With a key (`key`, an agent member's key file): its three bus sockets connect with CURVE, presenting that key; the
broker and the manager then accept its READY and heartbeats (role agent), and bind its id to that key.

One agent id, one live process: each agent draws a random instance token at start (public: its heartbeats carry it)
and connects to the broker as "<id>/<token>" (protocol.agent_identity) with a second, secret token, so that a
process that copies what `agents()` shows cannot present its identity and be handed its connection. If another live
process already holds the id, the broker answers READY with ERROR AGENT_ID_IN_USE: the agent logs it as an error,
stops beating to the manager, and tries again each interval for `duplicate_grace` seconds (a restarted agent whose
predecessor crashed gets in once the broker has dropped the predecessor); still refused then, it stops with
`exit_code` EXIT_AGENT_ID_IN_USE (`cluster agent` exits with it). An agent whose broker stays silent for two
expiries also opens a fresh connection, so a link the broker no longer reads (taken over, half-open) cannot keep it
out for good. An agent not connected to any broker (down, or a wrong address) says so in its log, backing off from
one expiry to AGENT_LINK_WARN_MAX_S.

An answer goes only to the broker that asked: a route starts with its broker's random incarnation, and the broker
says its incarnation in its heartbeats. When the link drops (the broker restarted, or the network), answers that
finish meanwhile are held until the broker on the new link is known (its first heartbeat or request), then sent if
it is the same broker, dropped (with a log line) if not: they would otherwise reach the new broker, answering
requests it never gave. With keys on, a key the broker refuses (revoked, or not on the allow-list) is logged as such:
the broker's ERROR UNAUTHENTICATED on a live link, or the CURVE handshake refused on a new one.

Recovery by restart: a model call that never returns (past max(hang_factor x its request's deadline, hang_min)), or
resident memory past `max_memory`, makes the agent stop taking work, say why (heartbeat `drain_reason`, an error in
its log), finish its other requests within the drain timeout and exit with EXIT_HUNG or EXIT_MEMORY: its supervisor
(`cluster up`, Kubernetes) restarts it, and the broker re-dispatches what it still held. Stopping never waits on an
inference thread past the drain timeout (they are daemons; `cluster agent` ends with os._exit if one is stuck, and a
watchdog thread ends a process whose I/O loop itself is stuck).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import resource
import socket
import sys
import threading
import time

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster import protocol
from cluster.agent.loader import ModelLoader, load_versions
from cluster.agent.models import ModelTable
from cluster.agent.runner import INLINE_BUDGET_S, Job, WorkerPool
from cluster.auth import BusSecurity
from cluster.clock import RunClock, pardon
from cluster.config import (
    AGENT_COLD_POLL_S,
    AGENT_DRAIN_TIMEOUT_S,
    AGENT_LINK_WARN_MAX_S,
    AGENT_REFUSED_LOG_S,
    MAX_CONTROL_BYTES,
    Addresses,
    Timings,
)
from cluster.desired import DEPLOYMENTS_FILE, DesiredState, newest_versions
from cluster.logs import BadInputLog
from cluster.model_config import InputError
from cluster.protocol import (
    PREAMBLE,
    Command,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    error_header,
    message,
    require,
    routed,
)
from cluster.share import ShareError, open_share
from cluster.sockets import has_message, make_socket, recv_frames, send_frames

log = logging.getLogger("cluster.agent")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate
stale = BadInputLog(log)  # answers dropped because the broker they were for is gone

_instance_ids = itertools.count()
# What the broker DEALER's monitor reports: a handshake that succeeded (with CURVE too: the connection is usable; it
# is the only event that means so) and a connection that dropped.
BROKER_LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
REFUSED_KEY_CODES = frozenset({ErrorCode.UNAUTHENTICATED.value, ErrorCode.PERMISSION_DENIED.value})
_INCARNATION = slice(protocol.PREAMBLE_BYTES, protocol.PREAMBLE_BYTES + protocol.INCARNATION_BYTES)  # of an answer
DRAIN_BATCH = 256  # messages read from one socket per loop pass before the others are served
EXIT_AGENT_ID_IN_USE = 3  # `cluster agent`'s exit status when the broker keeps refusing its id (another has it)
EXIT_HUNG = 4  # ... when a model call never returned (past the hang bound): restart me
EXIT_MEMORY = 5  # ... when its resident memory passed --max-memory: restart me


def resident_bytes() -> int:
    """This process's resident memory (RSS) now; the peak where /proc is missing (not Linux)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def default_agent_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{next(_instance_ids)}"


class Agent:
    def __init__(
        self,
        share: str,
        addresses: Addresses | None = None,
        timings: Timings | None = None,
        agent_id: str | None = None,
        capacity: int = 4,
        workers: int = 1,
        device: str = "cpu",
        model_names: list[str] | None = None,
        ctx: zmq.Context | None = None,
        cache_dir: str | None = None,
        torch_threads: int | None = None,
        key: str | None = None,
        max_memory_mib: float = 0,
    ) -> None:
        self.security = BusSecurity.load(key)  # None: the bus in the clear
        self.share = open_share(share, cache_dir)  # a folder, or nfs:// mirrored into cache_dir
        self.addresses = addresses or Addresses()
        self.timings = timings or Timings()
        self.agent_id = agent_id or default_agent_id()
        if not 0 < len(self.agent_id.encode()) <= protocol.MAX_AGENT_ID_BYTES:
            raise ValueError(f"agent id must be 1 to {protocol.MAX_AGENT_ID_BYTES} bytes")
        self.instance = protocol.agent_instance()  # this process's token: tells it from another with the same id
        self.identity = protocol.agent_identity(self.agent_id, protocol.agent_instance())  # secret: never published
        self._broker_incarnation: bytes | None = None  # the broker on the current link (None: not known yet)
        self._broker_beat = b""  # the header of its latest heartbeat (parsed again only when it changes)
        self._held: list[list] = []  # answers finished after the link dropped, until the broker on it is known
        self._key_refused_logged = -AGENT_REFUSED_LOG_S
        self.exit_code = 0
        self.max_memory = int(max_memory_mib * 1024 * 1024) or None  # bytes; None: no limit
        self.rss = resident_bytes()
        self.drain_reason: str | None = None  # why it drains to exit on its own (hung call, memory); None: it is not
        self._restart_code = 0  # the exit status it drains towards (EXIT_HUNG, EXIT_MEMORY)
        self.threads_stuck = False  # close() left inference threads running (a hung call): exit with os._exit
        self._loop_turned: float | None = None  # the I/O loop's last pass (the watchdog's view; None: not running)
        self._refused_since: float | None = None  # the broker refuses our id (AGENT_ID_IN_USE) since then
        self.duplicate_grace = self.timings.expiry + 2 * self.timings.heartbeat_interval
        self.capacity = capacity
        self.device = device
        self.model_names = model_names
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.table = ModelTable()  # what this agent serves, has staged, and failed to load
        self._metadata_sent: set[tuple[str, int]] = set()  # (model, version) whose metadata the broker has
        self.desired = DesiredState()  # what the manager (or, at start, the share) says to serve
        self.loading: set[tuple[str, int]] = set()
        self.in_flight = 0
        self.draining = False
        self.started = time.time()
        self.serving_since: float | None = None
        self._started_mono = time.monotonic()
        self._stop = threading.Event()
        self._results_addr = f"inproc://agent-results-{id(self)}"
        self._loads_addr = f"inproc://agent-loads-{id(self)}"
        if torch_threads:
            torch.set_num_threads(torch_threads)  # this thread (inline runs, start-up loads) ...
        self.pool = WorkerPool(self.ctx, self._results_addr, self.agent_id, workers, torch_threads)  # ... and workers
        self.pool.hang_bound = (self.timings.hang_factor, self.timings.hang_min)
        self.inline = os.environ.get("CLUSTER_AGENT_INLINE", "1") != "0"  # see runner.INLINE_MAX_S
        self._inline_until = 0.0
        self.loader = ModelLoader(self.ctx, self._loads_addr, self.share, device)

    # ---- models -------------------------------------------------------------------------------------------------

    def initial_desired_state(self) -> DesiredState:
        """What to serve before the manager says anything: the share's deployments.json, else each model's newest
        version (what a manager starting on that share would decide too)."""
        try:
            desired = DesiredState.from_wire(json.loads(self.share.read_text(DEPLOYMENTS_FILE)))
        except (ShareError, ValueError):
            try:
                desired = newest_versions(self.share)
            except ShareError as exc:
                desired = DesiredState()
                log.error("agent %s cannot read the share: %s", self.agent_id, exc)
        return self.filtered(desired)

    def filtered(self, desired: DesiredState) -> DesiredState:
        """Only the models this agent was told to serve (--models), if it was told."""
        if self.model_names is None:
            return desired
        return DesiredState({n: d for n, d in desired.models.items() if n in self.model_names}, desired.generation)

    def load_models(self) -> None:
        """At start, before announcing anything: load (fetch, verify, warm up) every desired version, LOAD_THREADS at
        once."""
        self.desired = self.initial_desired_state()
        wanted = self.table.plan(self.desired, self.loading)
        for name, version, outcome in load_versions(self.share, wanted, self.device):
            if isinstance(outcome, str):
                self.table.add_failed(name, version, outcome)
                log.error("agent %s could not load %s v%d: %s", self.agent_id, name, version, outcome)
            else:
                self.table.add_loaded(name, version, outcome)
                log.info("agent %s loaded %s v%d", self.agent_id, name, version)
        self.table.converge(self.desired)

    def apply_desired(self, desired: DesiredState) -> None:
        """The manager published a desired state: start loads, switch, unload."""
        desired = self.filtered(desired)
        if desired.to_wire()["models"] == self.desired.to_wire()["models"]:
            return
        self.desired = desired
        for name, version in self.table.plan(desired, self.loading):
            log.info("agent %s loading %s v%d", self.agent_id, name, version)
            self.loading.add((name, version))
            self.loader.submit(name, version)
        self.models_changed(self.table.converge(desired))

    def finish_loads(self) -> None:
        while self.loads.poll(0):
            self.loads.recv()
        while not self.loader.done.empty():
            name, version, outcome = self.loader.done.get()
            self.loading.discard((name, version))
            if isinstance(outcome, str):
                log.error("agent %s could not load %s v%d: %s", self.agent_id, name, version, outcome)
                self.table.add_failed(name, version, outcome)
            else:
                log.info("agent %s loaded and warmed up %s v%d", self.agent_id, name, version)
                self.table.add_loaded(name, version, outcome)
                self.ensure_instance_threads()
            self.table.converge(self.desired)
            self.models_changed(True)

    def models_changed(self, changed: bool) -> None:
        """Tell the broker and the manager at once, rather than at the next beat."""
        if changed:
            log.info("agent %s now: %s", self.agent_id, self.table.describe())
            self.send_heartbeat()

    def effective_capacity(self) -> int:
        """Requests the broker may keep here at once: the configured capacity, or enough to keep every copy of the
        most demanding model busy with two batches each (one running, one filling; a batch of one when it does not
        batch), whichever is more."""
        needs = [
            2 * max(m.config.max_batch_size, 1) * m.config.instances
            for m in self.table.loaded_models()
            if m.config.max_batch_size > 1 or m.config.instances > 1
        ]
        return max([self.capacity, *needs])

    def model_capacity(self) -> dict[str, int]:
        """Requests of each model the broker may keep here at once (within `effective_capacity` in all): two batches
        for every copy of that model (a batch of one when it does not batch), or the configured capacity if more.
        Sized per model, so a model that does not batch is not given the slots a batching one needs: the broker
        then cannot pile up dozens of one model's requests on an agent that may stop making progress."""
        sizes: dict[str, int] = {}
        for m in self.table.loaded_models():
            need = max(self.capacity, 2 * max(m.config.max_batch_size, 1) * m.config.instances)
            sizes[m.name] = max(sizes.get(m.name, 0), need)
        return sizes

    def ensure_instance_threads(self) -> None:
        """An inference thread for every execution slot of every model loaded (its `instances`, WorkerPool.slots): a
        slow model then queues only behind itself, never in front of another model."""
        self.pool.ensure_threads(sum(self.pool.slots(m) for m in self.table.loaded_models()) or 1)

    def status(self) -> Heartbeat:
        """The heartbeat: what the broker routes by and the manager's registry and `cluster status` show."""
        served = self.table.describe()
        return Heartbeat(
            agent=self.agent_id,
            capacity=self.effective_capacity(),
            models=[] if self.draining else served["models"],
            staged=served["staged"],
            failed=served["failed"],
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.device,
            in_flight=self.in_flight,
            batching=self.pool.describe(),
            draining=self.draining,
            uptime=round(time.monotonic() - self._started_mono, 3),
            started=self.started,
            instance=self.instance,
            serving_since=self.serving_since,  # wall time the agent connected, models loaded
            interval=self.timings.heartbeat_interval,
            serves_only=self.model_names,  # None: every deployed model
            jobs=self.pool.describe_jobs(),
            stats=self.pool.describe_stats(),
            model_capacity=self.model_capacity(),
            rss=self.rss,
            max_memory=self.max_memory,
            drain_reason=self.drain_reason,
        )

    # ---- the I/O loop -------------------------------------------------------------------------------------------

    def run(self, drain_timeout: float = AGENT_DRAIN_TIMEOUT_S) -> None:
        """Load models, connect, serve until stop(); then drain what is in flight and say goodbye."""
        self.load_models()
        self.results = self.ctx.socket(zmq.PULL)
        self.results.bind(self._results_addr)
        self.loads = self.ctx.socket(zmq.PULL)
        self.loads.bind(self._loads_addr)
        self.ensure_instance_threads()
        self.pool.start()
        self.loader.start()
        curve = self.security.client() if self.security is not None else None
        self.events = make_socket(
            self.ctx,
            zmq.SUB,
            connect=self.addresses.manager_events,
            subscribe=PREAMBLE[Command.EVENT],
            max_bytes=MAX_CONTROL_BYTES,
            timings=self.timings,
            curve=curve,
        )
        self._curve = curve
        self.broker = self.connect_broker()
        self.beats = make_socket(
            self.ctx,
            zmq.XPUB,
            connect=self.addresses.manager_heartbeats,
            max_bytes=MAX_CONTROL_BYTES,
            hwm=100,
            timings=self.timings,
            curve=curve,
        )
        self.beats.setsockopt(
            zmq.XPUB_VERBOSE, 1
        )  # hear every subscription, so a restarted manager gets a beat at once
        self.serving_since = time.time()
        # The hot sockets (requests in, answers from the workers) are what the loop waits on; the others are looked
        # at every AGENT_COLD_POLL_S: every socket in a zmq_poll costs a mailbox check (a poll and a getpid syscall
        # in libzmq) before and after each wait, and those four rarely have anything.
        self._poller = poller = zmq.Poller()
        for sock in (self.broker, self.results):
            poller.register(sock, zmq.POLLIN)
        self._cold = cold = zmq.Poller()
        for sock in (self.broker_monitor, self.beats, self.loads, self.events):
            cold.register(sock, zmq.POLLIN)
        next_cold = now = time.monotonic()
        interval = self.timings.heartbeat_interval
        next_beat = now
        self._broker_heard = now
        self.clock = RunClock(self.timings.pause_bound, now, f"agent {self.agent_id}", log)  # our own stalls
        self._ready_backoff = self.timings.reconnect_initial
        self._next_ready = now + self.timings.expiry
        drain_deadline = None
        self.drain_timeout = drain_timeout
        self._loop_turned = now
        log.info(
            "agent %s up: broker %s, manager %s",
            self.agent_id,
            self.addresses.broker_agents,
            self.addresses.manager_heartbeats,
        )
        try:
            while True:
                if self.exit_code:
                    break  # refused by the broker: nothing was ever routed here
                if self._stop.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + drain_timeout
                    self.draining = True
                    self.send_heartbeat()  # the broker stops routing here at once
                if drain_deadline is not None and (
                    self.in_flight <= self.pool.stuck_jobs(time.monotonic()) or time.monotonic() > drain_deadline
                ):
                    break  # what is left never ends (a hung call): the broker re-dispatches it when we are gone
                self._loop_turned = time.monotonic()
                wake = min(next_beat, next_cold)
                ready = dict(poller.poll(max(0, int((wake - time.monotonic()) * 1000)) + 1))
                self._inline_until = time.monotonic() + INLINE_BUDGET_S
                if self.results in ready:
                    self.forward_results()
                if self.broker in ready:
                    self.process_broker()
                now = time.monotonic()
                # Looked at with the `now` check_broker judges by: a stall anywhere in this pass (we did not run)
                # is known first; what the broker sent meanwhile is unread, not missing.
                lost = self.clock.look(now)
                if lost:
                    self._broker_heard = pardon(self._broker_heard, lost, now)
                if now >= next_cold:
                    next_cold = now + AGENT_COLD_POLL_S
                    cold_ready = dict(cold.poll(0))
                    if self.broker_monitor in cold_ready:
                        self.process_broker_link()
                    if self.beats in cold_ready:
                        self.process_subscriptions()
                    if self.loads in cold_ready:
                        self.finish_loads()
                    if self.events in cold_ready:
                        self.process_events()
                if now >= next_beat:
                    next_beat = now + interval
                    self.check_health(now)
                    self.send_heartbeat()
                    self.check_broker(now)
                    self.warn_unconnected(now)
        finally:
            self.exit_code = self.exit_code or self._restart_code
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        try:
            self.broker.send_multipart(message(Command.DISCONNECT, {"reason": "agent stopping"}), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.threads_stuck = not self.pool.stop(timeout=2.0)  # a hung call's thread never ends: not waited on
        self.loader.stop(timeout=2.0)  # (a warm-up that never returns, likewise)
        self.threads_stuck |= any(thread.is_alive() for thread in self.loader.threads)
        self.close_broker_monitor()
        for sock in (self.broker, self.beats, self.results, self.loads, self.events):
            sock.close(linger=100)
        if self.threads_stuck:
            log.error(
                "agent %s: inference threads still running at exit (a model call that never returned)", self.agent_id
            )
        elif self._own_ctx:
            self.ctx.term()  # (with a thread stuck holding its socket, term would wait for it forever)

    def check_health(self, now: float) -> None:
        """Each beat: note the resident memory; a model call past its hang bound, or memory past `max_memory`, makes
        the agent drain and exit for its supervisor to restart it (restart())."""
        self.rss = resident_bytes()
        hung = self.pool.hung(now)
        if hung is not None:
            name, running = hung
            self.restart(
                EXIT_HUNG,
                f"a call of model '{name}' has run for {running:.1f} s and never returned (bound: "
                f"{self.timings.hang_factor:g} x its request's deadline, at least {self.timings.hang_min:g} s)",
            )
        elif self.max_memory is not None and self.rss > self.max_memory:
            self.restart(
                EXIT_MEMORY,
                f"resident memory {self.rss / 2**20:.0f} MiB is past its limit of {self.max_memory / 2**20:.0f} MiB "
                "(--max-memory)",
            )

    def restart(self, code: int, reason: str) -> None:
        """Stop taking work, say why (heartbeat `drain_reason`, log), finish what can be finished within the drain
        timeout and exit with `code`: a thread cannot be cancelled, nor memory a model leaked given back, so a fresh
        process is the recovery."""
        if self._restart_code:
            return
        self._restart_code, self.drain_reason = code, reason
        log.error(
            "agent %s: %s; draining and exiting (status %d) for its supervisor to restart it",
            self.agent_id,
            reason,
            code,
        )
        self._stop.set()

    def start_watchdog(self) -> None:
        """For a process (`cluster agent`): a thread that ends it with os._exit when stopping takes longer than the
        drain timeout and a margin, or when the I/O loop itself stopped turning for the hang bound (a model run inline
        that never returned): then nothing else would."""

        def watch() -> None:
            stop_seen = None
            woke = resumed = time.monotonic()
            while True:
                time.sleep(0.5)
                now = time.monotonic()
                if now - woke > 2.0:  # the process was paused (SIGSTOP, a VM stall): that time is no one's fault
                    resumed = now
                    stop_seen = None if stop_seen is None else stop_seen + (now - woke)
                woke = now
                if self._stop.is_set() and stop_seen is None:
                    stop_seen = now
                drain = getattr(self, "drain_timeout", AGENT_DRAIN_TIMEOUT_S)
                turned = None if self._loop_turned is None else max(self._loop_turned, resumed)
                stuck_loop = (
                    turned is not None
                    and self.timings.hang_factor > 0
                    and now - turned > max(self.timings.hang_min, 2 * self.timings.expiry)
                )
                late_stop = stop_seen is not None and now - stop_seen > drain + 5.0
                if stuck_loop or late_stop:
                    why = "stopping took too long" if late_stop else "its I/O loop is stuck (a model run inline hung)"
                    log.error("agent %s: %s; exiting now", self.agent_id, why)
                    logging.shutdown()
                    os._exit(self.exit_code or self._restart_code or EXIT_HUNG)

        threading.Thread(target=watch, name="agent-watchdog", daemon=True).start()

    def warn_unconnected(self, now: float) -> None:
        """While no broker connection is up (the broker is down, or the address is wrong), warn in the log, backing
        off from one expiry to AGENT_LINK_WARN_MAX_S: an agent that says nothing looks fine when it serves no one."""
        if self.broker_connected:
            self._link_warn_backoff = self.timings.expiry
            self._next_link_warn = None
            return
        since = self._broker_down_since if self._broker_down_since is not None else self._link_since
        if self._next_link_warn is None:
            self._next_link_warn = since + self._link_warn_backoff
        if now < self._next_link_warn:
            return
        log.warning(
            "agent %s: not connected to the broker at %s for %.0f s (is it running, and is the address right?); "
            "still trying",
            self.agent_id,
            self.addresses.broker_agents,
            now - since,
        )
        self._link_warn_backoff = min(2 * self._link_warn_backoff, AGENT_LINK_WARN_MAX_S)
        self._next_link_warn = now + self._link_warn_backoff

    def connect_broker(self) -> zmq.Socket:
        """The DEALER to the broker, with its monitor (`broker_monitor`, attached before connecting so that the first
        handshake is seen too): READY goes when the handshake succeeds (process_broker_link)."""
        monitors = []
        sock = make_socket(
            self.ctx,
            zmq.DEALER,
            connect=self.addresses.broker_agents,
            identity=self.identity,
            timings=self.timings,
            curve=self._curve,
            before_connect=lambda s: monitors.append(s.get_monitor_socket(BROKER_LINK_EVENTS)),
        )
        self.broker_monitor = monitors[0]
        self.broker_connected = False  # the monitor's view: a handshake succeeded and the link has not dropped since
        self._broker_down_since: float | None = None
        self._link_since = time.monotonic()  # warn_unconnected counts from here
        if not hasattr(self, "_link_warn_backoff"):
            self._link_warn_backoff = self.timings.expiry
            self._next_link_warn: float | None = None
        return sock

    def close_broker_monitor(self) -> None:
        try:
            self.broker.disable_monitor()
        except zmq.ZMQError:
            pass
        self.broker_monitor.close(linger=0)

    def reconnect_broker(self) -> None:
        """A fresh connection to the broker (same identity): the old one may be a link the broker no longer reads
        (handed over, or half-open after a network blip), where READY would wait forever."""
        self._link_gone()
        self._poller.unregister(self.broker)
        self._cold.unregister(self.broker_monitor)
        self.close_broker_monitor()
        self.broker.close(linger=0)
        self.broker = self.connect_broker()
        self._poller.register(self.broker, zmq.POLLIN)
        self._cold.register(self.broker_monitor, zmq.POLLIN)

    def process_broker_link(self) -> None:
        """The broker DEALER's monitor: on a handshake that succeeded (the first connection, or one after the broker
        restarted or the network came back), READY at once; on a drop, note it (no beats to the broker until the
        link is back, and no READY backoff: the socket itself tries again every `link_retry_max` at most)."""
        for _ in range(100):
            try:
                event = parse_monitor_message(self.broker_monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError, IndexError):
                continue
            now = time.monotonic()
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._broker_down_since is not None:
                    log.info(
                        "agent %s: connected to the broker again after %.1f s; registering",
                        self.agent_id,
                        now - self._broker_down_since,
                    )
                self.broker_connected, self._broker_down_since = True, None
                self._broker_heard = now  # give it an expiry to answer before check_broker says READY again
                self._ready_backoff = self.timings.reconnect_initial
                self._next_ready = now + self.timings.expiry
                self.register()
            elif event == zmq.EVENT_DISCONNECTED:
                self._link_gone()
                if self.broker_connected:
                    log.warning(
                        "agent %s: lost the connection to the broker; registering again when it is back", self.agent_id
                    )
                    self.broker_connected, self._broker_down_since = False, now
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.key_refused("at the handshake", "its key was revoked, or is not on the cluster's allow-list")

    def _link_gone(self) -> None:
        """The link to the broker dropped: the broker at the other end of the next one is not known until it
        speaks, and answers finished meanwhile wait for it (forward_results)."""
        self._broker_incarnation = None
        self._broker_beat = b""

    def broker_is(self, incarnation: bytes) -> None:
        """The broker on the link is `incarnation` (from its heartbeat or a request's route): answers held since
        the link dropped go to it if they are its own, and are dropped if they were another broker's."""
        if incarnation == self._broker_incarnation:
            return
        self._broker_incarnation = incarnation
        held, self._held = self._held, []
        for frames in held:
            if frames[0][_INCARNATION] == incarnation:
                send_frames(self.broker, frames, 0)
            else:
                self.drop_stale(frames)

    def drop_stale(self, frames: list) -> None:
        stale.warning(
            "agent %s: dropped the answer to request %s: the broker that sent it is no longer connected to this agent "
            "(it restarted); answers go only to the broker that asked",
            self.agent_id,
            frames[0][protocol.PREAMBLE_BYTES :].hex(),
        )

    def key_refused(self, how: str, why: str) -> None:
        """The broker refuses our key (keys on): an error in the log, at most every AGENT_REFUSED_LOG_S."""
        now = time.monotonic()
        if now - self._key_refused_logged < AGENT_REFUSED_LOG_S:
            return
        self._key_refused_logged = now
        log.error(
            "agent %s: the broker refuses this agent's key %s: %s. It gets no requests until an admin allows the key "
            "again (cluster keys add ... --role agent, and give it the new key file); still trying",
            self.agent_id,
            how,
            why,
        )

    def register(self) -> None:
        """READY to the broker: who we are, what we serve (with each model's metadata), how much we take at once."""
        ready = self.status().to_wire()
        ready["metadata"] = self._metadata(self.table.loaded_models())
        self._metadata_sent = {(m.name, m.version) for m in self.table.loaded_models()}
        self.broker.send_multipart(message(Command.READY, ready))

    def _metadata(self, models) -> list[dict]:
        """Each model's inputs and outputs, for the broker's `model` queries (the edge's metadata and readiness), and
        its whole config (the edge's model configuration extension)."""
        return [
            dict(
                m.config.metadata(),
                version=m.version,
                max_queue_wait_ms=m.config.max_queue_wait_ms,
                config=m.config.to_dict(),
            )
            for m in models
        ]

    def send_heartbeat(self) -> None:
        status = self.status().to_wire()
        beat = message(Command.HEARTBEAT, status)
        try:
            if self._refused_since is None:  # refused (another process has our id): the manager keeps the live one
                self.beats.send_multipart(beat, zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB semantics: a missed beat is tolerated by the manager
        # A model loaded since READY (a deploy of a new model or version): its metadata rides on the broker's beat.
        new = [m for m in self.table.loaded_models() if (m.name, m.version) not in self._metadata_sent]
        if not self.broker_connected:
            return  # queued, it would reach the next broker as a beat from an unknown agent (READY goes on connect)
        if new:
            beat = message(Command.HEARTBEAT, dict(status, metadata=self._metadata(new)))
        try:
            self.broker.send_multipart(beat, zmq.NOBLOCK)
            self._metadata_sent.update((m.name, m.version) for m in new)
        except zmq.Again:
            pass  # broker unreachable and our queue to it is full: check_broker re-registers later

    def check_broker(self, now: float) -> None:
        """A connected broker has been silent too long: send READY again, backing off (with jitter) while it stays
        silent. A broker that is down is not asked: READY goes when the connection is back (process_broker_link)."""
        if not self.broker_connected:
            return
        if now - self._broker_heard <= self.timings.expiry or now < self._next_ready:
            return
        silent = now - self._broker_heard
        log.warning("agent %s: broker silent for %.1f s; registering again", self.agent_id, silent)
        if silent > 2 * self.timings.expiry:
            self.reconnect_broker()
        self.register()
        self._next_ready = now + self._ready_backoff * random.uniform(0.8, 1.2)
        self._ready_backoff = min(self._ready_backoff * 2, self.timings.reconnect_max)

    def process_events(self) -> None:
        """The manager's events: only the desired state concerns agents."""
        for _ in range(100):
            try:
                frames = self.events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 2:
                    raise ProtocolError("event must be preamble + header")
                header = protocol.unpack_header(frames[1])
                if header.get("event") == "desired":
                    self.apply_desired(DesiredState.from_wire(header.get("state")))
            except (ProtocolError, ValueError) as exc:
                bad_input.warning("agent %s: bad event from the manager dropped: %s", self.agent_id, exc)

    def process_subscriptions(self) -> None:
        for _ in range(100):
            try:
                frame = self.beats.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] == b"\x01":  # a manager (re)subscribed: beat now rather than at the next interval
                self.send_heartbeat()

    def forward_results(self) -> None:
        """The workers' answers, to the broker that sent their requests: one that finished after the link dropped
        waits until the broker on the new link is known (broker_is), one for another broker is dropped."""
        if has_message(self.broker_monitor):
            self.process_broker_link()  # a link that just dropped: its answers must not go out on the next one
        for n in range(DRAIN_BATCH):
            if n and not has_message(self.results):
                return
            try:
                frames = recv_frames(self.results, 2)
            except zmq.Again:
                return
            self.in_flight -= 1
            if frames[0][_INCARNATION] == self._broker_incarnation:
                send_frames(self.broker, frames, 0)
            elif self._broker_incarnation is None:
                self._held.append(frames)
            else:
                self.drop_stale(frames)

    def process_broker(self) -> None:
        for n in range(DRAIN_BATCH):
            if n and not has_message(self.broker):
                return
            try:
                frames = recv_frames(self.broker, 2)
            except zmq.Again:
                return
            self._broker_heard = time.monotonic()
            self._ready_backoff = self.timings.reconnect_initial
            try:
                cmd, route = protocol.parse_routed(frames[0])
            except ProtocolError as exc:
                bad_input.warning("agent %s: bad message from the broker dropped: %s", self.agent_id, exc)
                continue
            if cmd in (Command.REQUEST, Command.HEARTBEAT):
                self._refused_since = None  # the broker routes to us and beats us: we are registered
            if cmd == Command.REQUEST:
                if len(route) >= protocol.ROUTE_BYTES and route[: protocol.INCARNATION_BYTES] != (
                    self._broker_incarnation
                ):
                    self.broker_is(route[: protocol.INCARNATION_BYTES])
                self.accept_request(frames, route)
            elif cmd == Command.HEARTBEAT:
                if len(frames) > 1 and frames[1] != self._broker_beat:
                    self.broker_beat(frames[1])
            elif cmd == Command.CANCEL:
                self.cancel_request(route)
            elif cmd == Command.DISCONNECT:
                log.info("agent %s: broker asked us to register again", self.agent_id)
                self.register()
            elif cmd == Command.ERROR:
                self.broker_error(frames)
            else:
                bad_input.warning("agent %s: unexpected %s from the broker dropped", self.agent_id, cmd.name)

    def broker_beat(self, header_frame: bytes) -> None:
        """A broker heartbeat with a header other than the last one: it names the broker's incarnation."""
        self._broker_beat = header_frame
        try:
            incarnation = bytes.fromhex(protocol.unpack_header(header_frame).get("broker") or "")
        except (ProtocolError, TypeError, ValueError):
            incarnation = b""
        if len(incarnation) == protocol.INCARNATION_BYTES:
            self.broker_is(incarnation)

    def broker_error(self, frames: list) -> None:
        """The broker's ERROR to us (not about a request): AGENT_ID_IN_USE refuses our READY, another live process
        has our id. Logged as an error each time; past the grace period, the agent stops with a non-zero status."""
        try:
            header = protocol.unpack_header(frames[1]) if len(frames) == 2 else {}
        except ProtocolError:
            header = {}
        code = header.get("code")
        code = code if isinstance(code, str) else None  # from the wire: anything (a map is not even hashable)
        if code in REFUSED_KEY_CODES:
            self.key_refused(f"({code})", str(header.get("message"))[:1000])
            return
        if code != ErrorCode.AGENT_ID_IN_USE.value:
            bad_input.warning("agent %s: unexpected ERROR from the broker dropped", self.agent_id)
            return
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
        text = str(header.get("message"))[:1000]
        if now - self._refused_since >= self.duplicate_grace:
            log.error(
                "agent %s: the broker refused this agent for %.1f s: %s; exiting (status %d)",
                self.agent_id,
                now - self._refused_since,
                text,
                EXIT_AGENT_ID_IN_USE,
            )
            self.exit_code = EXIT_AGENT_ID_IN_USE
            self._stop.set()
        else:
            log.error(
                "agent %s: the broker refused this agent (AGENT_ID_IN_USE): %s; trying again for %.1f s more",
                self.agent_id,
                text,
                self.duplicate_grace - (now - self._refused_since),
            )

    def accept_request(self, frames: list, route_frame: bytes) -> None:
        """Validate a REQUEST ([preamble + route, header, *tensors]) and run it inline or queue it for a worker;
        answer ERROR at once if it cannot be served."""
        if len(frames) < 2 or len(route_frame) < protocol.ROUTE_BYTES:
            bad_input.warning("agent %s: REQUEST without route and header dropped", self.agent_id)
            return
        route = route_frame[: protocol.ROUTE_BYTES]  # answers carry the broker's key alone
        request_id = name = None
        try:
            route, seconds_left, broker_wait_s = protocol.parse_request_route(route_frame)
            header = protocol.unpack_header(frames[1])
            request_id = header.get("id") if isinstance(header.get("id"), (int, str)) else None
            name = require(header, "model", str)
            version = require(header, "version", int, optional=True)
            model = self.table.lookup(name, version)
            if model is None or self.draining:
                what = f"model '{name}'" + (f" version {version}" if version is not None else "")
                self.answer_error(
                    route, request_id, ErrorCode.MODEL_NOT_FOUND, f"{what} is not loaded on agent {self.agent_id}", name
                )
                return
            tensors = frames[2:]
            metas = protocol.validate_tensor_metas(require(header, "inputs", list), tensors)
            model.config.check_inputs(metas)
            outputs = require(header, "outputs", list, optional=True)
            if outputs is not None:
                known = {spec.name for spec in model.config.outputs}
                unknown = [o for o in outputs if not isinstance(o, str) or o not in known]
                if unknown:
                    raise InputError(f"model '{name}' has no output {unknown[0]!r}; it has {sorted(known)}")
        except (ProtocolError, InputError) as exc:
            self.answer_error(route, request_id, ErrorCode.BAD_REQUEST, str(exc), name)
            return
        job = Job(route, request_id, model, metas, list(tensors), outputs, trace=protocol.request_id_of(header))
        job.deadline, job.broker_wait_s = job.queued_at + seconds_left, broker_wait_s
        if job.deadline < job.queued_at:  # expired on its way here
            send_frames(self.broker, self.pool.skip(job, "TIMEOUT"), 0)
            return
        # A measured-fast model runs here under load too (jobs queued for the workers keep their place there), for at
        # most INLINE_BUDGET_S per loop pass, so heartbeats stay on time; past the budget, requests go to the workers.
        if self.inline and time.monotonic() < self._inline_until and self.pool.fast_enough_inline(model):
            send_frames(self.broker, self.pool.run_timed(job), 0)
            return
        self.in_flight += 1
        self.pool.submit(job)

    def cancel_request(self, route: bytes) -> None:
        """The broker's CANCEL: the client gave up. A job not started yet is taken out of the queue and answered
        ERROR CANCELLED (so the broker frees its slot); one that runs already finishes (its answer is dropped)."""
        if len(route) != protocol.ROUTE_BYTES:
            bad_input.warning("agent %s: CANCEL without a valid route dropped", self.agent_id)
            return
        job = self.pool.cancel(route)
        if job is not None:
            self.in_flight -= 1
            send_frames(self.broker, self.pool.skip(job, "CANCELED"), 0)

    def answer_error(self, route: bytes, request_id, code: ErrorCode, text: str, model: str | None) -> None:
        send_frames(self.broker, routed(Command.ERROR, route, error_header(request_id, code, text, model)), 0)
