"""The broker: clients in on one ROUTER, agents on another, requests routed to live agents that have the model.

Shaped after the ZeroMQ Guide's Majordomo broker, with its gaps fixed:
- every request in flight is tracked (agent, start, deadline); when an agent dies (its own silence, the manager's
  word, or a failed send) its requests are re-dispatched to another agent with the model, a bounded number of times;
- "alive" and "has capacity" are separate: an agent announces its capacity and never gets more than that in flight,
  however often it heartbeats; requests wait in a bounded per-model queue for a free slot;
- requests for a model no live agent has fail at once; requests past their deadline fail with TIMEOUT;
- tensor frames are forwarded as received (zero-copy), never decoded.

One thread, one poll loop: `run()`. The routing decision is delegated to a RoutingPolicy.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from cluster import protocol
from cluster.broker.routing import RoutingPolicy, make_policy
from cluster.config import MAX_CONTROL_BYTES, Addresses, Timings
from cluster.logs import BadInputLog
from cluster.protocol import (
    PREAMBLE, Command, ErrorCode, Heartbeat, ProtocolError, agent_view, error_header, models_view, pack, require,
)
from cluster.sockets import drain, make_socket

log = logging.getLogger("cluster.broker")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate

MAX_REQUEST_TIMEOUT = 24 * 3600.0
DRAIN_BATCH = 256  # messages read from one socket before looking at the others
_EMPTY_HEADER = pack({})


@dataclass(eq=False)
class BrokerRequest:
    """One client request, from arrival until its reply (or error) has gone back to the client."""

    route: bytes  # the broker's own key for it, sent to the agent and echoed back
    client: bytes  # the client's ROUTER identity
    request_id: Any  # the client's id, echoed in errors the broker makes up itself
    model: str
    version: int | None
    header: Any  # the client's header frame, forwarded untouched
    tensors: list  # the client's tensor frames, forwarded untouched
    deadline: float
    attempts: int = 0
    agent: "AgentEntry | None" = None
    dispatched_at: float = 0.0
    done: bool = False  # answered or failed; a queued request marked done is skipped


@dataclass(eq=False)
class AgentEntry:
    """A live agent as the broker sees it."""

    agent_id: str
    identity: bytes
    capacity: int
    models: dict[str, set[int]]  # model name -> versions ready on this agent
    beat: Heartbeat  # the latest READY/HEARTBEAT (host, pid, device, ...)
    last_seen: float
    joined: float = field(default_factory=time.time)  # wall time of READY
    in_flight: dict[bytes, BrokerRequest] = field(default_factory=dict)

    @property
    def in_flight_count(self) -> int:
        return len(self.in_flight)


class Broker:
    def __init__(
        self,
        addresses: Addresses | None = None,
        timings: Timings | None = None,
        policy: str | RoutingPolicy = "round-robin",
        ctx: zmq.Context | None = None,
    ) -> None:
        self.addresses = addresses or Addresses()
        self.timings = timings or Timings()
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.clients = make_socket(self.ctx, zmq.ROUTER, bind=self.addresses.broker_clients, timings=self.timings)
        self.agents_sock = make_socket(
            self.ctx, zmq.ROUTER, bind=self.addresses.broker_agents, handover=True, timings=self.timings
        )
        self.events = make_socket(
            self.ctx,
            zmq.SUB,
            connect=self.addresses.manager_events,
            subscribe=PREAMBLE[Command.EVENT],
            max_bytes=MAX_CONTROL_BYTES,
            timings=self.timings,
        )
        self.agents: dict[bytes, AgentEntry] = {}
        self.serving: dict[str, list[AgentEntry]] = {}  # model -> agents that have it, in arrival order
        self.known_models: set[str] = set()  # every model any agent ever served: "no agent" vs "not found"
        self.metadata: dict[tuple[str, int], dict] = {}  # (model, version) -> inputs/outputs, from agents' READY
        self.requests: dict[bytes, BrokerRequest] = {}  # route -> request, from arrival until answered
        self.pending: dict[str, deque[BrokerRequest]] = {}  # model -> requests waiting for a free slot
        self.pending_count = 0
        self._routes = itertools.count(1)
        self.stats = {"requests": 0, "redispatched": 0, "timeouts": 0, "agents_lost": 0}
        self._stop = threading.Event()
        self.started = time.monotonic()

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() is called."""
        poller = zmq.Poller()
        poller.register(self.agents_sock, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        tick = min(0.1, self.timings.heartbeat_interval / 2)
        next_tick = time.monotonic()
        next_beat = next_tick
        log.info(
            "broker serving clients on %s, agents on %s, policy %s",
            self.addresses.broker_clients,
            self.addresses.broker_agents,
            self.policy.name,
        )
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000)) + 1))
                if self.agents_sock in ready:
                    drain(self.agents_sock, self.process_agent, DRAIN_BATCH, log)
                if self.clients in ready:
                    drain(self.clients, self.process_client, DRAIN_BATCH, log)
                if self.events in ready:
                    drain(self.events, self.process_event, DRAIN_BATCH, log)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick
                    self.purge_agents(now)
                    self.expire_requests(now)
                    if self.pending_count and not self.warming_up():
                        self.fail_orphaned_queues()
                    if now >= next_beat:
                        next_beat = now + self.timings.heartbeat_interval
                        self.send_heartbeats()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for sock in (self.clients, self.agents_sock, self.events):
            sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    # ---- clients ------------------------------------------------------------------------------------------------

    def process_client(self, frames: list) -> None:
        client = frames[0].bytes
        request_id = None
        try:
            if len(frames) < 3:
                raise ProtocolError("message too short: expected preamble and header")
            cmd = protocol.parse_preamble(frames[1])
            header = protocol.unpack_header(frames[2])
            request_id = header.get("id")
            if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
                request_id = None
                raise ProtocolError("header field 'id' must be an int or a string")
            if cmd == Command.REQUEST:
                self.accept_request(client, request_id, header, frames[2], frames[3:])
            elif cmd == Command.QUERY:
                self.answer_query(client, request_id, header)
            else:
                raise ProtocolError(f"clients may not send {cmd.name}")
        except ProtocolError as exc:
            bad_input.warning("bad message from client %s: %s", client.hex(), exc)
            self.send_client_error(client, request_id, ErrorCode.BAD_REQUEST, str(exc))

    def accept_request(self, client: bytes, request_id, header: dict, header_frame, tensors: list) -> None:
        model = require(header, "model", str)
        version = require(header, "version", int, optional=True)
        timeout = require(header, "timeout", (int, float), optional=True)
        if timeout is None:
            timeout = self.timings.request_timeout
        if not 0 < timeout <= MAX_REQUEST_TIMEOUT:
            raise ProtocolError(f"timeout must be between 0 and {MAX_REQUEST_TIMEOUT:.0f} seconds")
        if not self.candidates(model, version) and not self.warming_up():
            self.fail_unroutable(client, request_id, model, version)
            return
        self.stats["requests"] += 1
        request = BrokerRequest(
            route=struct.pack(">Q", next(self._routes)),
            client=client,
            request_id=request_id,
            model=model,
            version=version,
            header=header_frame,
            tensors=tensors,
            deadline=time.monotonic() + timeout,
        )
        if self.dispatch(request):
            self.requests[request.route] = request
        elif self.pending_count >= self.timings.broker_queue_limit:
            self.send_client_error(
                client, request_id, ErrorCode.OVERLOADED,
                f"model '{model}': {self.pending_count} requests already waiting; try again later", model,
            )
        else:
            self.requests[request.route] = request
            self.enqueue(request)

    def warming_up(self) -> bool:
        """Just started (or restarted): agents are still re-registering, so "no agent has it" is not known yet.
        Requests wait (within their deadline) instead of failing, so clients ride through a broker restart."""
        return time.monotonic() - self.started < self.timings.expiry + self.timings.heartbeat_interval

    def fail_unroutable(self, client: bytes, request_id, model: str, version: int | None) -> None:
        """Answer a request no live agent can take: NO_AGENT if the model was ever served, else MODEL_NOT_FOUND."""
        what = f"model '{model}'" + (f" version {version}" if version is not None else "")
        if model in self.serving:
            code, text = ErrorCode.MODEL_NOT_FOUND, f"{what} is not served by any live agent (other versions are)"
        elif model in self.known_models:
            code, text = ErrorCode.NO_AGENT, f"no live agent serves {what} right now"
        elif not self.agents:
            code, text = ErrorCode.NO_AGENT, f"no live agent is connected, so {what} cannot be served"
        else:
            code, text = ErrorCode.MODEL_NOT_FOUND, f"{what} is not served by any agent"
        self.send_client_error(client, request_id, code, text, model)

    def answer_query(self, client: bytes, request_id, header: dict) -> None:
        what = require(header, "what", str)
        if what == "agents":
            result = self.describe_agents()
        elif what == "models":
            result = self.describe_models()
        elif what == "model":
            result = self.describe_model(client, request_id, require(header, "name", str), require(header, "version", int, optional=True))
            if result is None:
                return
        elif what == "stats":
            result = dict(self.stats, agents=len(self.agents), in_flight=len(self.requests), queued=self.pending_count)
        else:
            raise ProtocolError(f"unknown query {what!r}; ask for 'agents', 'models', 'model' or 'stats'")
        self.send_client(client, [PREAMBLE[Command.REPLY], pack({"id": request_id, "result": result})])

    def describe_agents(self) -> list[dict]:
        now = time.monotonic()
        return [
            agent_view(a.beat, heartbeat_age=now - a.last_seen, joined=a.joined, capacity=a.capacity,
                       broker_in_flight=a.in_flight_count)
            for a in self.agents.values()
        ]

    def describe_models(self) -> dict:
        """Model -> {versions, agents}: what this broker routes to (an agent that refused a version no longer
        counts for it, even before its next heartbeat says so)."""
        return models_view((a.agent_id, a.models) for a in self.agents.values())

    def describe_model(self, client: bytes, request_id, name: str, version: int | None) -> dict | None:
        """Metadata of one model (newest version unless one is named), with the versions live agents serve."""
        served = self.describe_models().get(name)
        known = sorted(v for (m, v) in self.metadata if m == name)
        if version is None:
            version = max(served["versions"]) if served else (known[-1] if known else None)
        meta = self.metadata.get((name, version)) if version is not None else None
        if meta is None:
            what = f"model '{name}'" + (f" version {version}" if version is not None else "")
            self.send_client_error(client, request_id, ErrorCode.MODEL_NOT_FOUND, f"{what} is not known to the cluster", name)
            return None
        return dict(meta, versions=served["versions"] if served else [], ready=bool(served and version in served["versions"]))

    def send_client(self, client: bytes, frames: list) -> None:
        try:
            self.clients.send_multipart([client, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # client gone (EHOSTUNREACH) or not reading (EAGAIN): nothing to do
            log.debug("reply to client %s dropped: %s", client.hex(), exc)

    def send_client_error(self, client: bytes, request_id, code: ErrorCode, text: str, model: str | None = None):
        self.send_client(client, [PREAMBLE[Command.ERROR], pack(error_header(request_id, code, text, model))])

    # ---- routing ------------------------------------------------------------------------------------------------

    def candidates(self, model: str, version: int | None) -> list[AgentEntry]:
        agents = self.serving.get(model, ())
        if version is None:
            return agents
        return [a for a in agents if version in a.models.get(model, ())]

    def dispatch(self, request: BrokerRequest) -> bool:
        """Send the request to an agent the policy chooses; False if every candidate is at capacity."""
        while True:
            candidates = self.candidates(request.model, request.version)
            agent = self.policy.choose(request.model, candidates)
            if agent is None:
                return False
            try:
                self.agents_sock.send_multipart(
                    [agent.identity, PREAMBLE[Command.REQUEST], request.route, request.header, *request.tensors],
                    zmq.NOBLOCK,
                    copy=False,
                )
            except zmq.ZMQError as exc:
                self.remove_agent(agent, f"send failed ({exc})")
                continue
            request.agent = agent
            request.attempts += 1
            request.dispatched_at = time.monotonic()
            agent.in_flight[request.route] = request
            return True

    def enqueue(self, request: BrokerRequest, front: bool = False) -> None:
        queue = self.pending.setdefault(request.model, deque())
        if front:
            queue.appendleft(request)  # a re-dispatched request keeps its place ahead of newer ones
        else:
            queue.append(request)
        self.pending_count += 1

    def dispatch_pending(self, models) -> None:
        """Hand queued requests for these models to agents that have free slots now."""
        for model in models:
            queue = self.pending.get(model)
            while queue:
                request = queue[0]
                if not request.done and not self.dispatch(request):
                    break
                queue.popleft()
                self.pending_count -= 1

    def redispatch(self, request: BrokerRequest, reason: str) -> None:
        """An agent died with this request in flight: give it to another agent, within the attempt budget."""
        request.agent = None
        if request.done:
            return
        self.stats["redispatched"] += 1
        if request.attempts >= self.timings.max_dispatch_attempts:
            self.finish_with_error(
                request, ErrorCode.INFERENCE_FAILED,
                f"model '{request.model}': gave up after {request.attempts} agents failed ({reason})",
            )
        elif not self.candidates(request.model, request.version):
            self.finish_with_error(
                request, ErrorCode.NO_AGENT, f"model '{request.model}': its agent failed ({reason}) and no other live agent serves it"
            )
        elif not self.dispatch(request):
            self.enqueue(request, front=True)

    def finish_with_error(self, request: BrokerRequest, code: ErrorCode, text: str) -> None:
        request.done = True
        self.requests.pop(request.route, None)
        self.send_client_error(request.client, request.request_id, code, text, request.model)

    # ---- agents -------------------------------------------------------------------------------------------------

    def process_agent(self, frames: list) -> None:
        identity = frames[0].bytes
        if len(frames) < 3:
            bad_input.warning("short message from agent %r dropped", identity)
            return
        try:
            cmd = protocol.parse_preamble(frames[1])
        except ProtocolError as exc:
            bad_input.warning("bad message from agent %r dropped: %s", identity, exc)
            return
        agent = self.agents.get(identity)
        if cmd == Command.READY:
            self.register_agent(identity, frames[2])
            return
        if agent is None:
            # An agent we do not know (we restarted, or declared it dead): ask it to introduce itself again.
            if cmd != Command.DISCONNECT:
                self.ask_to_register(identity)
            return
        agent.last_seen = time.monotonic()
        if cmd in (Command.REPLY, Command.ERROR):
            self.complete(agent, frames)
        elif cmd == Command.HEARTBEAT:
            self.process_heartbeat(agent, frames[2])
        elif cmd == Command.DISCONNECT:
            self.remove_agent(agent, "it said goodbye")
        else:
            log.warning("agent %s sent unexpected %s; dropped", agent.agent_id, cmd.name)

    def ask_to_register(self, identity: bytes) -> None:
        try:
            self.agents_sock.send_multipart(
                [identity, PREAMBLE[Command.DISCONNECT], pack({"reason": "unknown agent; send READY"})], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass  # gone already

    def complete(self, agent: AgentEntry, frames: list) -> None:
        """An agent answered: forward the answer to the client, free the slot, feed the agent from the queue."""
        if len(frames) < 4:
            log.warning("agent %s sent a reply without route and header; dropped", agent.agent_id)
            return
        route = frames[2].bytes
        agent.in_flight.pop(route, None)
        request = self.requests.get(route)
        if request is not None and not request.done and frames[1].bytes == PREAMBLE[Command.ERROR] and self.refused(agent, request, frames[3]):
            self.redispatch(request, f"agent {agent.agent_id} no longer has it")
            self.dispatch_pending(agent.models)
            return
        self.requests.pop(route, None)
        if request is not None and not request.done:
            request.done = True
            if request.agent is not None and request.agent is not agent:
                request.agent.in_flight.pop(route, None)
            self.send_client(request.client, [frames[1], *frames[3:]])
        self.dispatch_pending(agent.models)

    def refused(self, agent: AgentEntry, request: BrokerRequest, header_frame) -> bool:
        """True if the agent answered MODEL_NOT_FOUND: it unloaded that version (a rollout) since its last beat.
        Forget that it has it, so the request can go to an agent that does (no error reaches the client)."""
        try:
            code = protocol.unpack_header(header_frame).get("code")
        except ProtocolError:
            return False
        if code != ErrorCode.MODEL_NOT_FOUND.value:
            return False
        versions = agent.models.get(request.model, set())
        gone = versions if request.version is None else versions & {request.version}
        if gone:
            self._unindex(agent)
            agent.models = {m: (vs - gone if m == request.model else vs) for m, vs in agent.models.items()}
            agent.models = {m: vs for m, vs in agent.models.items() if vs}
            self._index(agent)
        return True

    def register_agent(self, identity: bytes, header_frame) -> None:
        try:
            header = protocol.unpack_header(header_frame)
            beat = Heartbeat.from_wire(header)
            if beat.capacity < 1:
                raise ProtocolError("capacity must be at least 1")
        except ProtocolError as exc:
            bad_input.warning("bad READY from %r dropped: %s", identity, exc)
            return
        self._remember_metadata(header)
        old = self.agents.get(identity)
        if old is not None and (old.beat.pid, old.beat.started) == (beat.pid, beat.started):
            self.update_agent(old, beat)  # the same process saying READY again (it thought we were gone)
            return
        if old is not None:
            self.remove_agent(old, "it registered again (restarted)")
        models = beat.served_versions()
        agent = AgentEntry(beat.agent, identity, beat.capacity, models, beat, time.monotonic())
        self.agents[identity] = agent
        self._index(agent)
        log.info("agent %s ready: capacity %d, models %s", beat.agent, beat.capacity, self._models_text(models))
        self.dispatch_pending(models)

    def _remember_metadata(self, header: dict) -> None:
        """READY carries each model's inputs and outputs; keep them for `model` queries (the edge's metadata)."""
        for meta in header.get("metadata", None) or []:
            if isinstance(meta, dict) and isinstance(meta.get("name"), str) and isinstance(meta.get("version"), int):
                self.metadata[(meta["name"], meta["version"])] = meta

    def process_heartbeat(self, agent: AgentEntry, header_frame) -> None:
        try:
            header = protocol.unpack_header(header_frame)
            beat = Heartbeat.from_wire(header)
        except ProtocolError as exc:
            log.warning("bad HEARTBEAT from agent %s ignored: %s", agent.agent_id, exc)
            return
        self._remember_metadata(header)
        self.update_agent(agent, beat)

    def update_agent(self, agent: AgentEntry, beat: Heartbeat) -> None:
        agent.beat = beat
        if beat.capacity >= 1 and beat.capacity != agent.capacity:
            agent.capacity = beat.capacity
        models = beat.served_versions()
        if models != agent.models:
            self._unindex(agent)
            agent.models = models
            self._index(agent)
            log.info("agent %s now serves %s", agent.agent_id, self._models_text(models))
        self.dispatch_pending(agent.models)

    def remove_agent(self, agent: AgentEntry, reason: str) -> None:
        if self.agents.get(agent.identity) is not agent:
            return
        del self.agents[agent.identity]
        self._unindex(agent)
        self.stats["agents_lost"] += 1
        orphans = list(agent.in_flight.values())
        agent.in_flight.clear()
        log.warning("agent %s removed: %s; re-dispatching %d requests", agent.agent_id, reason, len(orphans))
        for request in orphans:
            self.redispatch(request, f"agent {agent.agent_id}: {reason}")

    def purge_agents(self, now: float) -> None:
        expiry = self.timings.expiry
        for agent in [a for a in self.agents.values() if now - a.last_seen > expiry]:
            self.remove_agent(agent, f"silent for {now - agent.last_seen:.1f} s")

    def send_heartbeats(self) -> None:
        for agent in list(self.agents.values()):
            try:
                self.agents_sock.send_multipart([agent.identity, PREAMBLE[Command.HEARTBEAT], _EMPTY_HEADER], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self.remove_agent(agent, f"heartbeat send failed ({exc})")

    def fail_orphaned_queues(self) -> None:
        """After warm-up: requests queued for a model no live agent has fail now rather than at their deadline.
        Also drops queued requests already answered (timed out), so the queue length counts live ones only."""
        for model, queue in list(self.pending.items()):
            for request in queue:
                if not request.done and not self.candidates(request.model, request.version):
                    request.done = True
                    self.requests.pop(request.route, None)
                    self.fail_unroutable(request.client, request.request_id, request.model, request.version)
            live = deque(r for r in queue if not r.done)
            self.pending_count -= len(queue) - len(live)
            if live:
                self.pending[model] = live
            else:
                del self.pending[model]

    def expire_requests(self, now: float) -> None:
        for request in [r for r in self.requests.values() if r.deadline < now]:
            self.stats["timeouts"] += 1
            where = f" (on agent {request.agent.agent_id})" if request.agent else " (waiting for a free agent)"
            self.finish_with_error(
                request, ErrorCode.TIMEOUT, f"model '{request.model}': no answer within the request's deadline{where}"
            )
            # The slot stays taken until the agent answers or dies: it is still working on it.

    def _index(self, agent: AgentEntry) -> None:
        for model in agent.models:
            self.serving.setdefault(model, []).append(agent)
            self.known_models.add(model)

    def _unindex(self, agent: AgentEntry) -> None:
        for model in agent.models:
            agents = self.serving.get(model)
            if agents and agent in agents:
                agents.remove(agent)
                if not agents:
                    del self.serving[model]

    @staticmethod
    def _models_text(models: dict[str, set[int]]) -> str:
        return ", ".join(f"{m} v{','.join(map(str, sorted(v)))}" for m, v in sorted(models.items())) or "none"

    # ---- the manager's registry events ----------------------------------------------------------------------

    def process_event(self, frames: list) -> None:
        try:
            if len(frames) != 2:
                raise ProtocolError("event must be preamble + header")
            protocol.parse_preamble(frames[0])
            header = protocol.unpack_header(frames[1])
            event = require(header, "event", str)
            agent_id = require(header, "agent", str, optional=True)
        except ProtocolError as exc:
            bad_input.warning("bad event from the manager dropped: %s", exc)
            return
        if event == "agent_dead" and agent_id is not None:
            agent = self.agents.get(agent_id.encode())
            if agent is not None:
                self.remove_agent(agent, "the manager declared it dead")
