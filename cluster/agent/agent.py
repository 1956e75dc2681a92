"""The agent: hosts models on one machine and answers inference requests from the broker.

Threads:
- the I/O thread (`run`) owns every socket: a DEALER to each broker (READY, HEARTBEAT, answers; links.py), an
  XPUB to the manager (HEARTBEAT every interval, and at once when a manager subscribes), and an inproc PULL for
  answers coming back from the workers. It validates each request before it reaches a model.
- inference workers (runner.WorkerPool) run the models.

The agent trusts nothing it receives: a malformed request gets an ERROR answer (or is dropped, with a log line, when
it cannot even be answered), never a crash. How it keeps its link to the broker (READY on connect, refused ids and
keys, answers only to the broker that asked) is in link.py; how it splits its capacity over several brokers in
links.py; how it recovers by restart (a hung call, memory past `max_memory`, the watchdog) in recovery.py.

Past its real capacity (in all, or a model's: a broker's share changed under it), a REQUEST is answered ERROR BUSY
at once, not run: the broker queues it again without counting an attempt.

With a key (`key`, an agent member's key file): its three bus sockets connect with CURVE, presenting that key; the
broker and the manager then accept its READY and heartbeats (role agent), and bind its id to that key.

One agent id, one live process: each agent draws a random instance token at start (public: its heartbeats carry it)
and connects to the broker as "<id>/<token>" (protocol.agent_identity) with a second, secret token, so that a
process that copies what `agents()` shows cannot present its identity and be handed its connection.

Stopping never waits on an inference thread past the drain timeout (they are daemons; `cluster agent` ends with
os._exit if one is stuck, and a watchdog thread ends a process whose I/O loop itself is stuck).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time

import torch
import zmq

from cluster import protocol
from cluster.agent.link import INCARNATION, BrokerLink
from cluster.agent.links import BrokerLinks
from cluster.agent.loader import ModelLoader, load_versions
from cluster.agent.memory import memory_budget
from cluster.agent.models import ModelTable
from cluster.agent.recovery import EXIT_AGENT_ID_IN_USE, EXIT_HUNG, EXIT_MEMORY, Recovery, resident_bytes
from cluster.agent.runner import INLINE_BUDGET_S, Job, WorkerPool
from cluster.auth import BusSecurity
from cluster.clock import RunClock
from cluster.config import AGENT_COLD_POLL_S, AGENT_DRAIN_TIMEOUT_S, MAX_CONTROL_BYTES
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
    routed,
)
from cluster.role_settings import AgentSettings
from cluster.share import ShareError, open_share
from cluster.sockets import drain, has_message, make_socket

__all__ = ["EXIT_AGENT_ID_IN_USE", "EXIT_HUNG", "EXIT_MEMORY", "Agent", "default_agent_id", "resident_bytes"]

log = logging.getLogger("cluster.agent")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate

_instance_ids = itertools.count()
DRAIN_BATCH = 256  # messages read from one socket per loop pass before the others are served
COLD_BATCH = 100  # ... from one of the cold sockets (the manager's, the link's monitor)
ROUTE = slice(protocol.PREAMBLE_BYTES, protocol.PREAMBLE_BYTES + protocol.ROUTE_BYTES)  # an answer's request key


def default_agent_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{next(_instance_ids)}"


class Agent:
    def __init__(self, settings: AgentSettings, ctx: zmq.Context | None = None) -> None:
        self.settings = settings
        self.security = BusSecurity.load(settings.key)  # None: the bus in the clear
        self.share = open_share(settings.share, settings.share_cache)  # a folder, or nfs:// mirrored into the cache
        self.addresses = settings.addresses
        self.timings = settings.timings
        self.agent_id = settings.agent_id or default_agent_id()
        if not 0 < len(self.agent_id.encode()) <= protocol.MAX_AGENT_ID_BYTES:
            raise ValueError(f"agent id must be 1 to {protocol.MAX_AGENT_ID_BYTES} bytes")
        self.instance = protocol.agent_instance()  # this process's token: tells it from another with the same id
        self.exit_code = 0
        self.threads_stuck = False  # close() left inference threads running (a hung call): exit with os._exit
        self.capacity = settings.capacity
        self.device = settings.device
        self.model_names = settings.model_names
        self.memory_budget = memory_budget(settings.memory_budget, settings.device)  # bytes placement may fill
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.table = ModelTable()  # what this agent serves, has staged, and failed to load
        self.desired = DesiredState()  # what the manager (or, at start, the share) says to serve
        self.loading: set[tuple[str, int]] = set()
        self.in_flight = 0  # requests held (queued for or run by the workers)
        self.model_held: dict[str, int] = {}  # ... of each model
        self.held_routes: dict[bytes, str] = {}  # route -> its model, while held
        self.limits: tuple[int, dict[str, int]] = (self.capacity, {})  # (effective_capacity, model_capacity)
        self.held_stats: dict[str, dict[str, int]] = {}  # model -> {peak_held, busy}, in the beat's `jobs`
        self.owed_beat: str | None = None  # answered BUSY for it: a beat as soon as there is room (brokers wait for it)
        self.draining = False
        self.started = time.time()
        self.serving_since: float | None = None
        self._started_mono = time.monotonic()
        self._stop = threading.Event()
        self.recovery = Recovery(self.agent_id, self.timings, settings.max_memory, self._stop)  # hung calls, memory
        identity = protocol.agent_identity(self.agent_id, protocol.agent_instance())  # secret: never published
        self.links = BrokerLinks(
            self.ctx, self.addresses.broker_agents, identity, self.agent_id, self.timings, self.ready_message
        )
        self.links.handle(self.from_broker)
        self._results_addr = f"inproc://agent-results-{id(self)}"
        self._loads_addr = f"inproc://agent-loads-{id(self)}"
        torch_threads = settings.torch_threads or None  # 0: torch's default
        if torch_threads:
            torch.set_num_threads(torch_threads)  # this thread (inline runs, start-up loads) ...
        # ... and the workers
        self.pool = WorkerPool(self.ctx, self._results_addr, self.agent_id, settings.workers, torch_threads)
        self.pool.hang_bound = (self.timings.hang_factor, self.timings.hang_min)
        self.inline = settings.agent_inline  # see runner.INLINE_MAX_S
        self._inline_until = 0.0
        self.loader = ModelLoader(self.ctx, self._loads_addr, self.share, settings.device)
        # The I/O thread's sockets (opened by run(), in that thread: a ZeroMQ socket belongs to one) and pollers.
        self.results: zmq.Socket | None = None  # the workers' answers (inproc PULL)
        self.loads: zmq.Socket | None = None  # the loader's "a load finished" (inproc PULL)
        self.events: zmq.Socket | None = None  # the manager's events (SUB)
        self.beats: zmq.Socket | None = None  # heartbeats to the manager (XPUB: hears its subscriptions)
        self._poller = zmq.Poller()  # the hot sockets: requests in, answers from the workers
        self._cold = zmq.Poller()  # the others, looked at every AGENT_COLD_POLL_S
        self.clock: RunClock | None = None  # our own stalls (run() starts it)

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
        """Only the models placed on this agent (`replicas`), and those it was told to serve (--models)."""
        return desired.for_agent(self.agent_id, self.model_names)

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
        """Requests the broker may keep here at once (ModelTable.capacity_needs)."""
        return self.table.capacity_needs(self.capacity)[0]

    def model_capacity(self) -> dict[str, int]:
        """Requests of each model the broker may keep here at once (ModelTable.capacity_needs)."""
        return self.table.capacity_needs(self.capacity)[1]

    def ensure_instance_threads(self) -> None:
        """An inference thread for every execution slot of every model loaded (its `instances`, WorkerPool.slots): a
        slow model then queues only behind itself, never in front of another model."""
        self.pool.ensure_threads(sum(self.pool.slots(m) for m in self.table.loaded_models()) or 1)

    def status(self) -> Heartbeat:
        """The heartbeat: what the broker routes by and the manager's registry and `cluster status` show (the whole
        capacity; each broker is told its share, `links.status`); past what it says, requests get BUSY."""
        served = self.table.describe()
        self.limits = (self.effective_capacity(), self.model_capacity())
        jobs = self.pool.describe_jobs()
        for name, counts in self.held_stats.items():
            jobs.setdefault(name, {}).update(counts)
        return Heartbeat(
            agent=self.agent_id,
            capacity=self.limits[0],
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
            jobs=jobs,
            stats=self.pool.describe_stats(),
            model_capacity=self.limits[1],
            rss=self.recovery.rss,
            max_memory=self.recovery.max_memory,
            drain_reason=self.recovery.drain_reason,
            model_info=self.table.model_info(),
            memory_budget=self.memory_budget,
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
        self.links.open(curve, self._poller, self._cold)  # the broker DEALERs (hot) and their monitors (cold)
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
        poller, cold = self._poller, self._cold
        poller.register(self.results, zmq.POLLIN)
        for sock in (self.beats, self.loads, self.events):
            cold.register(sock, zmq.POLLIN)
        links, recovery = self.links, self.recovery
        next_cold = now = time.monotonic()
        interval = self.timings.heartbeat_interval
        next_beat = now
        self.clock = RunClock(self.timings.pause_bound, now, f"agent {self.agent_id}", log)  # our own stalls
        drain_deadline = None
        recovery.drain_timeout = drain_timeout
        recovery.loop_turned = now
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
                recovery.loop_turned = time.monotonic()
                wake = min(next_beat, next_cold)
                ready = dict(poller.poll(max(0, int((wake - time.monotonic()) * 1000)) + 1))
                self._inline_until = time.monotonic() + INLINE_BUDGET_S
                if self.results in ready:
                    self.forward_results()
                for link in links.links:
                    if link.sock in ready:
                        drain(link.sock, link.receive, DRAIN_BATCH, log, 2)
                    link.flush()  # this pass's answers: one message per link
                now = time.monotonic()
                # Looked at with the `now` links.check judges by: a stall anywhere in this pass (we did not run)
                # is known first; what the broker sent meanwhile is unread, not missing.
                lost = self.clock.look(now)
                if lost:
                    links.pardon(lost, now)
                if now >= next_cold:
                    next_cold = now + AGENT_COLD_POLL_S
                    cold_ready = dict(cold.poll(0))
                    self.link_events(cold_ready)
                    if self.beats in cold_ready:
                        drain(self.beats, self.manager_subscribed, COLD_BATCH, log, 1)
                    if self.loads in cold_ready:
                        self.finish_loads()
                    if self.events in cold_ready:
                        drain(self.events, self.manager_event, COLD_BATCH, log, 2)
                if now >= next_beat:
                    next_beat = now + interval
                    recovery.check(self.pool.hung(now))
                    links.check(now)  # (a broker silent, or refusing us, or back: this beat tells the new shares)
                    links.changed()
                    self.send_heartbeat()
                for link in links.links:  # what the part after the drain made (answers a link held while down)
                    if link.out:
                        link.flush()
        finally:
            self.exit_code = self.exit_code or recovery.code
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.links.goodbye()
        self.threads_stuck = not self.pool.stop(timeout=2.0)  # a hung call's thread never ends: not waited on
        self.loader.stop(timeout=2.0)  # (a warm-up that never returns, likewise)
        self.threads_stuck |= any(thread.is_alive() for thread in self.loader.threads)
        self.links.close()
        for sock in (self.beats, self.results, self.loads, self.events):
            sock.close(linger=100)
        if self.threads_stuck:
            log.error(
                "agent %s: inference threads still running at exit (a model call that never returned)", self.agent_id
            )
        elif self._own_ctx:
            self.ctx.term()  # (with a thread stuck holding its socket, term would wait for it forever)

    def start_watchdog(self) -> None:
        """For a process (`cluster agent`): ends it when stopping hangs or the I/O loop is stuck (recovery.py)."""
        self.recovery.start_watchdog(lambda: self.exit_code)

    # ---- what goes out ------------------------------------------------------------------------------------------

    def ready_message(self, link: BrokerLink) -> list:
        """READY to a broker: who we are, what we serve (with each model's metadata), how much it may give us at once
        (its share of our capacity)."""
        ready = self.links.status(link, self.status().to_wire())
        ready["metadata"] = self._metadata(self.table.loaded_models())
        link.metadata_sent = {(m.name, m.version) for m in self.table.loaded_models()}
        return message(Command.READY, ready)

    def _metadata(self, models) -> list[dict]:
        """Each model's inputs, outputs and config, for the broker's `model` queries (LoadedModel.metadata)."""
        return [m.metadata() for m in models]

    def send_heartbeat(self) -> None:
        """The beat: the whole capacity to the manager, each connected broker its share."""
        status = self.status().to_wire()
        try:
            if not self.links.refused():  # refused (another process has our id): the manager keeps the live one
                self.beats.send_multipart(message(Command.HEARTBEAT, status), zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB semantics: a missed beat is tolerated by the manager
        loaded = self.table.loaded_models()
        for link in self.links:
            if not link.connected:
                continue
            beat = self.links.status(link, status)
            # A model loaded since READY (a deploy of a new model or version): its metadata rides on the beat.
            new = [m for m in loaded if (m.name, m.version) not in link.metadata_sent]
            if new:
                beat = dict(beat, metadata=self._metadata(new))
            if link.send_beat(message(Command.HEARTBEAT, beat)):
                link.metadata_sent.update((m.name, m.version) for m in new)

    def link_events(self, ready: dict) -> None:
        """The links' monitors (those in `ready`, a poll's answer): a link up or down; then, if the links that
        share the capacity changed, every broker hears its new share at once."""
        for link in self.links:
            if link.monitor in ready:
                link.process_events()
        if self.links.changed():
            self.send_heartbeat()

    def forward_results(self) -> None:
        """The workers' answers, to the broker that sent their requests: one that finished after its link dropped
        waits until the broker on the new link is known, one for a broker no link has is dropped (AnswerRoutes)."""
        monitors = {link.monitor: zmq.POLLIN for link in self.links if has_message(link.monitor)}
        if monitors:
            self.link_events(monitors)  # a link that just dropped: its answers must not go out on the next one
        drain(self.results, self.forward_result, DRAIN_BATCH, log, 2)
        if self.owed_beat is not None and self.has_room(self.owed_beat):
            self.owed_beat = None
            self.send_heartbeat()

    def forward_result(self, frames: list) -> None:
        self.in_flight -= 1
        head = frames[0]
        name = self.held_routes.pop(head[ROUTE], None)
        if name is not None:
            self.model_held[name] -= 1
        link = self.links.routes.by_incarnation.get(head[INCARNATION])
        if link is not None:  # the common case: the hot path
            link.answer(frames)
        else:
            self.links.answer(frames)

    # ---- what comes in ------------------------------------------------------------------------------------------

    def manager_event(self, frames: list) -> None:
        """The manager's events: only the desired state concerns agents."""
        try:
            if len(frames) != 2:
                raise ProtocolError("event must be preamble + header")
            event = protocol.parse_event(protocol.unpack_header(frames[1]))
            if isinstance(event, protocol.Desired):
                self.apply_desired(DesiredState.from_wire(event.state))
        except (ProtocolError, ValueError) as exc:
            bad_input.warning("agent %s: bad event from the manager dropped: %s", self.agent_id, exc)

    def manager_subscribed(self, frames: list) -> None:
        if frames[0][:1] == b"\x01":  # a manager (re)subscribed: beat now rather than at the next interval
            self.send_heartbeat()

    def from_broker(self, frames: list, link: BrokerLink) -> None:
        try:
            cmd, route = protocol.parse_routed(frames[0])
        except ProtocolError as exc:
            link.heard(False)
            bad_input.warning("agent %s: bad message from the broker dropped: %s", self.agent_id, exc)
            return
        link.heard(cmd == Command.REQUEST or cmd == Command.HEARTBEAT)  # those two: the broker has us registered
        if cmd == Command.REQUEST:
            if len(route) >= protocol.ROUTE_BYTES and route[: protocol.INCARNATION_BYTES] != link.incarnation:
                link.broker_is(route[: protocol.INCARNATION_BYTES])
            self.accept_request(frames, route, link)
        elif cmd == Command.HEARTBEAT:
            if len(frames) > 1 and frames[1] != link.beat:
                link.broker_beat(frames[1])
        elif cmd == Command.CANCEL:
            self.cancel_request(route, link)
        elif cmd == Command.DISCONNECT:
            log.info("agent %s: broker asked us to register again", self.agent_id)
            link.register()
        elif cmd == Command.ERROR:
            self.broker_error(frames, link)
        else:
            bad_input.warning("agent %s: unexpected %s from the broker dropped", self.agent_id, cmd.name)

    def broker_error(self, frames: list, link: BrokerLink | None = None) -> None:
        """A broker's ERROR to us (not about a request): a refused key is logged; our id refused past the grace
        period (another live process has it) stops the agent with EXIT_AGENT_ID_IN_USE (BrokerLink.broker_error)."""
        if (link or self.links.first).broker_error(frames):
            self.exit_code = EXIT_AGENT_ID_IN_USE
            self._stop.set()

    def accept_request(self, frames: list, route_frame: bytes, link: BrokerLink) -> None:
        """Validate a REQUEST ([preamble + route, header, *tensors]) from `link`'s broker and run it inline or queue
        it for a worker; answer ERROR at once (on that link) if it cannot be served, BUSY past our capacity."""
        if len(frames) < 2 or len(route_frame) < protocol.ROUTE_BYTES:
            return bad_input.warning("agent %s: REQUEST without route and header dropped", self.agent_id)
        route = route_frame[: protocol.ROUTE_BYTES]  # answers carry the broker's key alone
        request_id = name = None
        try:
            route, seconds_left, broker_wait_s = protocol.parse_request_route(route_frame)
            header = protocol.unpack_header(frames[1])
            request_id = protocol.message_id(header)  # for the answer, should the rest be wrong
            request = protocol.Request.from_wire(header)
            name, version = request.model, request.version
            version = protocol.run_version_of(route_frame) if version is None else version  # (a canary split's)
            model = self.table.lookup(name, version)
            if model is None or self.draining:
                what = f"model '{name}'" + (f" version {version}" if version is not None else "")
                text = f"{what} is not loaded on agent {self.agent_id}"
                self.answer_error(link, route, request_id, ErrorCode.MODEL_NOT_FOUND, text, name)
                return
            if not self.has_room(name):
                self.busy(link, route, request_id, name)
                return
            tensors = frames[2:]
            metas = request.input_metas(tensors)
            model.config.check_inputs(metas)
            outputs = request.output_names()
            if outputs is not None:
                known = {spec.name for spec in model.config.outputs}
                unknown = [o for o in outputs if not isinstance(o, str) or o not in known]
                if unknown:
                    raise InputError(f"model '{name}' has no output {unknown[0]!r}; it has {sorted(known)}")
        except (ProtocolError, InputError) as exc:
            self.answer_error(link, route, request_id, ErrorCode.BAD_REQUEST, str(exc), name)
            return
        job = Job(route, request_id, model, metas, list(tensors), outputs, trace=request.request_id)
        job.deadline, job.broker_wait_s = job.queued_at + seconds_left, broker_wait_s
        if job.deadline < job.queued_at:  # expired on its way here
            link.answer(self.pool.skip(job, "TIMEOUT"))
            return
        # A measured-fast model runs here under load too (jobs queued for the workers keep their place there), for at
        # most INLINE_BUDGET_S per loop pass, so heartbeats stay on time; past the budget, requests go to the workers.
        if self.inline and time.monotonic() < self._inline_until and self.pool.fast_enough_inline(model):
            link.answer(self.pool.run_timed(job))
            return
        self.in_flight += 1
        if route not in self.held_routes:  # (a route held twice: a broker re-sent it; counted once per model)
            self.held_routes[route] = name
            held = self.model_held[name] = self.model_held.get(name, 0) + 1
            stats = self.held_stats.setdefault(name, {"peak_held": 0, "busy": 0})
            stats["peak_held"] = max(stats["peak_held"], held)
        self.pool.submit(job)

    def has_room(self, name: str) -> bool:
        """One more request of model `name` stays within the capacity we announced, in all and for that model."""
        return self.in_flight < self.limits[0] and self.model_held.get(name, 0) < self.limits[1].get(name, 1 << 30)

    def busy(self, link: BrokerLink, route: bytes, request_id, name: str) -> None:
        """ERROR BUSY: this request would take us past our capacity (a broker's share changed under it)."""
        self.owed_beat = name
        self.held_stats.setdefault(name, {"peak_held": 0, "busy": 0})["busy"] += 1
        text = f"agent {self.agent_id} is at its capacity ({self.in_flight} requests held)"
        self.answer_error(link, route, request_id, ErrorCode.BUSY, text, name)

    def cancel_request(self, route: bytes, link: BrokerLink) -> None:
        """The broker's CANCEL: the client gave up. A job not started yet is taken out of the queue and answered
        ERROR CANCELLED (so the broker frees its slot); one that runs already finishes (its answer is dropped)."""
        if len(route) != protocol.ROUTE_BYTES:
            bad_input.warning("agent %s: CANCEL without a valid route dropped", self.agent_id)
            return
        job = self.pool.cancel(route)
        if job is not None:
            self.in_flight -= 1
            name = self.held_routes.pop(route, None)
            if name is not None:
                self.model_held[name] -= 1
            link.answer(self.pool.skip(job, "CANCELED"))

    def answer_error(self, link: BrokerLink, route: bytes, request_id, code: ErrorCode, text: str, model) -> None:
        link.answer(routed(Command.ERROR, route, error_header(request_id, code, text, model)))
