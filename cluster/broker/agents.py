"""The broker's table of live agents, without any I/O: who is connected, what each serves, and who can take a request.

An agent is keyed by its ROUTER identity ("<agent id>/<instance>", one per agent process: protocol.agent_identity),
and indexed by its agent id too, which at most one live agent holds (the Dispatcher refuses a second). The table
keeps an index model -> agents that serve it, in arrival order (a routing policy's candidates), remembers every
model any agent ever served (so an unroutable request can be told NO_AGENT rather than MODEL_NOT_FOUND) and the
inputs/outputs agents announced in READY (the `model` query). It never decides what to do with requests; the
Dispatcher does, and calls it. `BrokerRequest` (one request as the broker tracks it) lives here too, beside
`AgentEntry`: each points at the other, and every part of the broker below the Dispatcher uses both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cluster.protocol import ErrorCode, Heartbeat, agent_view, header_request_id, models_view

log = logging.getLogger("cluster.broker")
TRACE_IN_HEADER: Any = object()  # a BrokerRequest's trace not read yet: its header frame holds it (see `trace`)


@dataclass(eq=False)
class AgentEntry:
    """A live agent as the broker sees it."""

    agent_id: str
    identity: bytes
    capacity: int
    models: dict[str, set[int]]  # model name -> versions ready on this agent
    beat: Heartbeat  # the latest READY/HEARTBEAT (host, pid, device, ...)
    last_seen: float  # the broker's clock (monotonic), when any message from it last arrived
    joined: float = field(default_factory=time.time)  # wall time of READY
    # route -> request sent to it, unanswered, oldest first (a dict keeps insertion order: the first is the oldest)
    in_flight: dict[bytes, BrokerRequest] = field(default_factory=dict)
    key: str | None = None  # keys on: the public key it registered with (only that key may speak for it)
    model_capacity: dict[str, int] = field(default_factory=dict)  # per model, from its beat; absent: `capacity`
    model_in_flight: dict[str, int] = field(default_factory=dict)  # model -> how many of `in_flight` are of it
    last_answer: float = 0.0  # the broker's clock when it last answered a request (or joined)
    stalled_since: float | None = None  # when the broker found it stalled (see Dispatcher.stalled); None: it is not
    stall_ended: float = 0.0  # when it last answered after a stall (what it answers late is no service time)
    # Stalls are judged per model (an agent busy with a slow model is not stalled for its others): model -> since
    # when it is stalled for that model (`stalled_since` is the earliest, None when no model is), when it last
    # answered a request of each model, and when each model's stall last ended.
    stalled_models: dict[str, float] = field(default_factory=dict)
    model_last_answer: dict[str, float] = field(default_factory=dict)
    model_stall_ended: dict[str, float] = field(default_factory=dict)
    full: bool = False  # it answered BUSY (its share of its capacity shrank): no new requests until its next beat

    @property
    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def has_room(self, model: str) -> bool:
        """Whether it may take one more request of `model`: under its capacity for that model and in all."""
        return (
            len(self.in_flight) < self.capacity
            and self.model_in_flight.get(model, 0) < self.model_capacity.get(model, self.capacity)
            and not self.full
        )

    def add_request(self, request: BrokerRequest) -> None:
        self.in_flight[request.route] = request
        self.model_in_flight[request.model] = self.model_in_flight.get(request.model, 0) + 1

    def pop_request(self, route: bytes) -> BrokerRequest | None:
        """Its slot for `route` is free (answered, or taken back); the request, None if it did not hold it."""
        request = self.in_flight.pop(route, None)
        if request is not None:
            left = self.model_in_flight.get(request.model, 0) - 1
            if left > 0:
                self.model_in_flight[request.model] = left
            else:
                self.model_in_flight.pop(request.model, None)
        return request


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
    arrived: float = 0.0  # the broker's clock when it came in (what it waited is told to the agent)
    attempts: int = 0  # agents it was sent to (a hedge copy counts)
    agent: AgentEntry | None = None  # where it is in flight now
    sent_at: float = 0.0  # when it was sent to `agent`
    hedge: AgentEntry | None = None  # hedging: where its second copy is in flight, if it has one
    hedged_at: float = 0.0  # when that copy was sent
    queued: bool = False  # it has waited in the queue (a request taken back after a failed send returns there)
    done: bool = False  # answered or failed; a queued request marked done is skipped
    _trace: Any = None  # see `trace`; TRACE_IN_HEADER: not read yet
    # A model under canary (cluster/broker/canary.py): the version drawn to run it (told the agent in the route;
    # None: the agent's default), the run that counts its answers, its shadow pair; `mirror`: it is a shadow copy
    run_version: int | None = None
    canary: Any = None
    pair: Any = None
    mirror: bool = False

    @property
    def trace(self) -> str | None:
        """The caller's request_id (the OIP id, say): in every log line about it. A request routed by its head
        (protocol.parse_request_head) has it only in its header: read from there the first time a log line asks."""
        trace = self._trace
        if trace is TRACE_IN_HEADER:
            trace = self._trace = header_request_id(self.header)
        return trace

    @trace.setter
    def trace(self, value) -> None:
        self._trace = value

    def log_extra(self) -> dict:
        """`extra=` for a log line about this request: its request_id (JSON logs carry it as a field)."""
        return {"request_id": self.trace, "model": self.model}

    def sent_to(self, agent: AgentEntry) -> float | None:
        """When the copy that `agent` holds was sent to it (None: it holds none this request knows of)."""
        if self.agent is agent:
            return self.sent_at
        if self.hedge is agent:
            return self.hedged_at
        return None

    def drop_copy(self, agent: AgentEntry) -> bool:
        """Its copy at `agent` is gone (the agent died, dropped the model, or the send failed): True if it has
        another copy in flight (a hedge), which then is the only one; False if it had no other."""
        if self.hedge is None:
            return False
        if self.hedge is agent:
            self.hedge = None
            return True
        if self.agent is agent:
            self.agent, self.sent_at = self.hedge, self.hedged_at
            self.hedge = None
            return True
        return False


class UnknownModel(LookupError):
    """No metadata for that model (or version); the message says which, as the client sees it."""


def model_label(model: str, version: int | None) -> str:
    """ "model 'm'" or "model 'm' version 2", as error messages name a request's model."""
    return f"model '{model}'" + (f" version {version}" if version is not None else "")


class AgentTable:
    def __init__(self, expiry: float) -> None:
        self.expiry = expiry  # seconds of silence after which an agent counts as dead
        self.agents: dict[bytes, AgentEntry] = {}  # identity -> agent
        self.by_id: dict[str, AgentEntry] = {}  # agent id -> the live agent that holds it
        self.serving: dict[str, list[AgentEntry]] = {}  # model -> agents that have it, in arrival order
        self.known_models: set[str] = set()  # every model any agent ever served: "no agent" vs "not found"
        self.metadata: dict[tuple[str, int], dict] = {}  # (model, version) -> inputs/outputs, from agents' READY
        self.max_queue_wait_ms: dict[str, int] = {}  # model -> its config's queueing bound (load shedding), from READY
        # The models the manager wants served (deployed or staging), from its `desired` events; None until one came.
        # A model it no longer wants (undeployed) is "not found" (404 at the edge), where one whose agents are all
        # gone is "no agent" (503): the first is on purpose, the second is an outage.
        self.deployed: set[str] | None = None

    def get(self, identity: bytes) -> AgentEntry | None:
        return self.agents.get(identity)

    def get_by_id(self, agent_id: str) -> AgentEntry | None:
        return self.by_id.get(agent_id)

    def __len__(self) -> int:
        return len(self.agents)

    # ---- changes ----------------------------------------------------------------------------------------------

    @staticmethod
    def same_process(agent: AgentEntry, beat: Heartbeat) -> bool:
        """Whether `beat` comes from the process already registered (it said READY again because it thought the
        broker was gone), rather than from a restarted agent, or another process, with the same id: the instance
        token each agent process draws at random, where both carry one; else pid and start time."""
        if agent.beat.instance is not None and beat.instance is not None:
            return agent.beat.instance == beat.instance
        return (agent.beat.pid, agent.beat.started, agent.beat.instance) == (beat.pid, beat.started, beat.instance)

    def add(self, identity: bytes, beat: Heartbeat, now: float, key: str | None = None) -> AgentEntry:
        """A new agent (the caller has removed any earlier one with this identity); `key`: the key it registered
        with (keys on)."""
        models = beat.served_versions()
        agent = AgentEntry(beat.agent, identity, beat.capacity, models, beat, now, key=key, last_answer=now)
        agent.model_capacity = dict(beat.model_capacity)
        self.agents[identity] = agent
        self.by_id[beat.agent] = agent
        self._index(agent)
        log.info("agent %s ready: capacity %d, models %s", beat.agent, beat.capacity, _models_text(models))
        return agent

    def update(self, agent: AgentEntry, beat: Heartbeat) -> None:
        """A newer state of a registered agent: its capacity and served versions follow the beat."""
        agent.beat = beat
        agent.full = False  # (after a BUSY: the beat says what it takes now)
        if beat.capacity >= 1 and beat.capacity != agent.capacity:
            agent.capacity = beat.capacity
        if beat.model_capacity != agent.model_capacity:
            agent.model_capacity = dict(beat.model_capacity)
        models = beat.served_versions()
        if models != agent.models:
            self._unindex(agent)
            agent.models = models
            self._index(agent)
            log.info("agent %s now serves %s", agent.agent_id, _models_text(models))

    def remove(self, agent: AgentEntry) -> list[BrokerRequest] | None:
        """Drop the agent; returns the requests it had in flight (its slots are freed), None if it was not here
        (removed already, or replaced by a restarted agent with the same identity)."""
        if self.agents.get(agent.identity) is not agent:
            return None
        del self.agents[agent.identity]
        if self.by_id.get(agent.agent_id) is agent:
            del self.by_id[agent.agent_id]
        self._unindex(agent)
        orphans = list(agent.in_flight.values())
        agent.in_flight.clear()
        agent.model_in_flight.clear()
        return orphans

    def forget_versions(self, agent: AgentEntry, model: str, version: int | None) -> None:
        """The agent said it no longer has `model` (that version, or any when None): it unloaded it (a rollout)
        since its last beat. Stop routing it there until a beat says otherwise."""
        versions = agent.models.get(model, set())
        gone = versions if version is None else versions & {version}
        if gone:
            self._unindex(agent)
            agent.models = {m: (vs - gone if m == model else vs) for m, vs in agent.models.items()}
            agent.models = {m: vs for m, vs in agent.models.items() if vs}
            self._index(agent)

    def remember_metadata(self, metadata) -> None:
        """READY carries each model's inputs and outputs; keep them for `model` queries (the edge's metadata), and
        its `max_queue_wait_ms` (the latest announced wins: versions of one model share one queue)."""
        for meta in metadata or []:
            if isinstance(meta, dict) and isinstance(meta.get("name"), str) and isinstance(meta.get("version"), int):
                meta = dict(meta)
                bound = meta.pop("max_queue_wait_ms", None)  # the broker's own business, not the model's metadata
                if isinstance(bound, int) and not isinstance(bound, bool) and bound >= 0:
                    self.max_queue_wait_ms[meta["name"]] = bound
                self.metadata[(meta["name"], meta["version"])] = meta

    def silent(self, now: float) -> list[AgentEntry]:
        """Agents not heard from for longer than the expiry: dead, as far as routing is concerned."""
        return [a for a in self.agents.values() if now - a.last_seen > self.expiry]

    # ---- routing ----------------------------------------------------------------------------------------------

    def serves(self, model: str, version: int) -> bool:
        """Some live agent serves that version of the model."""
        return any(version in a.models.get(model, ()) for a in self.serving.get(model, ()))

    def candidates(self, model: str, version: int | None) -> list[AgentEntry]:
        """Live agents that serve the model (that version, when one is named), in arrival order."""
        agents = self.serving.get(model, ())
        if version is None:
            return agents
        return [a for a in agents if version in a.models.get(model, ())]

    def why_unroutable(self, model: str, version: int | None) -> tuple[ErrorCode, str]:
        """The error for a request no live agent can take: NO_AGENT if the model was ever served, else
        MODEL_NOT_FOUND (also when other versions of it are served now)."""
        what = model_label(model, version)
        if model in self.serving:
            return ErrorCode.MODEL_NOT_FOUND, f"{what} is not served by any live agent (other versions are)"
        if model in self.known_models and self.undeployed(model):
            return ErrorCode.MODEL_NOT_FOUND, f"{what} is not deployed (it was undeployed)"
        if model in self.known_models:
            return ErrorCode.NO_AGENT, f"no live agent serves {what} right now"
        if self.undeployed(model):  # never served here, and the manager does not want it: unknown, not an outage
            return ErrorCode.MODEL_NOT_FOUND, f"{what} is not deployed"
        if not self.agents:
            return ErrorCode.NO_AGENT, f"no live agent is connected, so {what} cannot be served"
        return ErrorCode.MODEL_NOT_FOUND, f"{what} is not served by any agent"

    def undeployed(self, model: str) -> bool:
        """The manager's desired state is known and does not want `model` served."""
        return self.deployed is not None and model not in self.deployed

    # ---- views (answers to QUERY) -----------------------------------------------------------------------------

    def describe_agents(self, now: float) -> list[dict]:
        return [
            agent_view(
                a.beat,
                heartbeat_age=now - a.last_seen,
                joined=a.joined,
                capacity=a.capacity,
                broker_in_flight=a.in_flight_count,
                stalled=a.stalled_since is not None,
                stalled_models=sorted(a.stalled_models),
            )
            for a in self.agents.values()
        ]

    def describe_models(self) -> dict:
        """Model -> {versions, agents}: what this broker routes to (an agent that refused a version no longer
        counts for it, even before its next heartbeat says so)."""
        return models_view((a.agent_id, a.models) for a in self.agents.values())

    def describe_statistics(self, name: str | None = None, version: str | None = None) -> dict:
        """Agent id -> {model: {version: Triton's model_stats entry + "failures"}}, from each live agent's latest
        heartbeat (`stats`), limited to one model (and version) if named. Only live agents appear: an agent that
        left takes its counts with it, so sums over this drop when an agent goes. UnknownModel for a model no agent
        ever served."""
        if name is not None and name not in self.known_models:
            raise UnknownModel(f"{model_label(name, None)} is not known to the cluster")
        described = {}
        for agent in self.agents.values():
            models = agent.beat.stats if isinstance(agent.beat.stats, dict) else {}
            if name is not None:
                models = {name: models[name]} if isinstance(models.get(name), dict) else {}
            if version is not None:
                models = {m: {version: v[version]} for m, v in models.items() if version in v}
            described[agent.agent_id] = models
        return described

    def describe_model(self, name: str, version: int | None) -> dict:
        """Metadata of one model (newest version unless one is named), with the versions live agents serve.
        UnknownModel if no agent ever announced it."""
        served = self.describe_models().get(name)
        if not served and self.undeployed(name):
            was = " (it was undeployed)" if name in self.known_models else ""  # never served here: just not deployed
            raise UnknownModel(f"{model_label(name, version)} is not deployed{was}")
        known = sorted(v for (m, v) in self.metadata if m == name)
        if version is None:
            version = max(served["versions"]) if served else (known[-1] if known else None)
        meta = self.metadata.get((name, version)) if version is not None else None
        if meta is None:
            raise UnknownModel(f"{model_label(name, version)} is not known to the cluster")
        return dict(
            meta, versions=served["versions"] if served else [], ready=bool(served and version in served["versions"])
        )

    # ---- the index --------------------------------------------------------------------------------------------

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


def _models_text(models: dict[str, Iterable[int]]) -> str:
    return ", ".join(f"{m} v{','.join(map(str, sorted(v)))}" for m, v in sorted(models.items())) or "none"
