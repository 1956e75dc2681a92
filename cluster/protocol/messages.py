"""One class per message header, each with `to_wire()` (the header map) and `from_wire(header)` (checked:
ProtocolError naming the field). The sender builds through the class, every receiver parses through the same one, so
a field has one rule everywhere. The frame layout they ride in is frames.py's; the table of who sends what is in
the package's docstring.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.config import MAX_REQUEST_TIMEOUT_S
from cluster.protocol.frames import (
    MAX_ATTEMPT,
    MAX_REQUEST_ID,
    ErrorCode,
    ProtocolError,
    check_field,
    request_id_of,
    require,
    validate_tensor_metas,
)


def message_id(header: Mapping) -> int | str | None:
    """A message's `id` when it is an int or a string (what its answer carries back), else None."""
    value = header.get("id")
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _id(header: Mapping) -> int | str:
    value = message_id(header)
    if value is None:
        raise ProtocolError("header field 'id' must be an int or a string")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Inference: REQUEST, its REPLY, ERROR, CANCEL
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """REQUEST, client -> broker -> agent: run `model` on the tensor frames after the header. The client builds it;
    the broker reads what it routes by and forwards the header frame as received (never re-encoded); the agent
    reads the same fields, then checks the tensors (`input_metas`) and the outputs asked for (`output_names`)."""

    id: int | str
    model: str
    inputs: Any  # [tensor meta], one per tensor frame: checked against the frames by input_metas (the agent)
    timeout: float | None = None  # seconds the client gives it; None: the broker's default
    version: int | None = None  # None: the model's default version
    outputs: Any = None  # names of the outputs wanted (None: all), checked by output_names (the agent)
    request_id: str | None = None  # the caller's name for it (e.g. the OIP id), in the broker's and agent's logs
    # dispatches it already had at brokers the client lost since (a resend): the broker's attempt budget
    # (max_dispatch_attempts) counts from here, so it is one budget across brokers
    attempt: int = 0

    def to_wire(self) -> dict:
        header = {"id": self.id, "model": self.model, "timeout": self.timeout, "inputs": self.inputs}
        if self.attempt:
            header["attempt"] = self.attempt
        if self.version is not None:
            header["version"] = self.version
        if self.outputs is not None:
            header["outputs"] = self.outputs
        if self.request_id is not None:
            header["request_id"] = self.request_id[:MAX_REQUEST_ID]
        return header

    @classmethod
    def from_wire(cls, header: Mapping) -> Request:
        """What routing needs, checked; `inputs` and `outputs` are kept as sent, for the agent to check. (The broker
        parses every request with this: the plain types are let through first, the checks name the field.)"""
        get = header.get
        request_id, model, version, timeout, trace = get("id"), get("model"), get("version"), get("timeout"), None
        if type(request_id) is not int and type(request_id) is not str:
            request_id = _id(header)
        if type(model) is not str:
            model = check_field("model", model, str)
        if version is not None and type(version) is not int:
            version = check_field("version", version, int)
        if timeout is not None:
            if type(timeout) is not float and type(timeout) is not int:
                timeout = check_field("timeout", timeout, (int, float))
            if not 0 < timeout <= MAX_REQUEST_TIMEOUT_S:
                raise ProtocolError(f"timeout must be between 0 and {MAX_REQUEST_TIMEOUT_S:.0f} seconds")
        if "request_id" in header:
            trace = request_id_of(header)
        attempt = get("attempt") or 0
        if type(attempt) is not int:
            attempt = check_field("attempt", attempt, int)
        if not 0 <= attempt <= MAX_ATTEMPT:
            raise ProtocolError(f"attempt must be between 0 and {MAX_ATTEMPT}")
        return cls(request_id, model, get("inputs"), timeout, version, get("outputs"), trace, attempt)

    def input_metas(self, tensors: Sequence) -> list[dict]:
        """The inputs' metas, checked against their tensor frames (ProtocolError naming the tensor)."""
        return validate_tensor_metas(check_field("inputs", self.inputs, list), tensors)

    def output_names(self) -> list | None:
        """The outputs asked for (None: all); that each names an output of the model is the model's to check."""
        return check_field("outputs", self.outputs, list, optional=True)


@dataclass(slots=True)
class Reply:
    """REPLY to a REQUEST, agent -> broker -> client (the broker forwards the agent's header as is): the metas of
    the output tensor frames after the header."""

    id: int | str | None
    model: str
    version: int
    agent: str  # the agent that ran it
    outputs: list  # [tensor meta], one per tensor frame
    batch_size: int | None = None  # requests in the forward pass that served this one
    queue_us: int | None = None  # microseconds it waited in the agent for a worker or a batch to fill

    def to_wire(self) -> dict:
        return {  # by hand, not asdict(): it deep-copies the metas, on the hot path
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "agent": self.agent,
            "outputs": self.outputs,
            "batch_size": self.batch_size,
            "queue_us": self.queue_us,
        }

    @classmethod
    def from_wire(cls, header: Mapping, tensors: Sequence) -> Reply:
        """The client's reading: the outputs are checked against their frames; the rest is informational."""
        metas = validate_tensor_metas(header.get("outputs"), tensors, "outputs")
        queue_us = header.get("queue_us")
        return cls(
            message_id(header),
            header.get("model"),
            header.get("version"),
            header.get("agent"),
            metas,
            header.get("batch_size"),
            queue_us if isinstance(queue_us, (int, float)) and not isinstance(queue_us, bool) else None,
        )


@dataclass
class Error:
    """ERROR: a request or query failed (any -> its asker), or, with `id` None, a word to an agent about itself
    (AGENT_ID_IN_USE, a refused key). `retry_after` (seconds, with OVERLOADED): when the client may try again."""

    id: Any
    code: ErrorCode | str | None  # from the wire: a code this side does not know (a newer peer's) stays a string
    message: str
    model: str | None = None
    retry_after: float | None = None

    def to_wire(self) -> dict:
        header = {"id": self.id, "code": getattr(self.code, "value", self.code), "message": self.message}
        if self.model is not None:
            header["model"] = self.model
        if self.retry_after is not None:
            header["retry_after"] = self.retry_after
        return header

    @classmethod
    def from_wire(cls, header: Mapping) -> Error:
        """Lenient (an answer is never refused): an unknown code stays a string (not a string: None), a model of
        the wrong type is None, no message is "unknown error", a retry_after that is not a number >= 0 is None."""
        code = header.get("code")
        try:
            code = ErrorCode(code)
        except ValueError:
            code = code if isinstance(code, str) else None
        model = header.get("model")
        retry_after = header.get("retry_after")
        if not (isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool) and retry_after >= 0):
            retry_after = None
        message = header.get("message")
        return cls(
            header.get("id"),
            code,
            "unknown error" if message is None else str(message),
            model if isinstance(model, str) else None,
            None if retry_after is None else float(retry_after),
        )


def error_header(
    request_id: Any, code: ErrorCode, text: str, model: str | None = None, retry_after: float | None = None
) -> dict:
    """An ERROR's header (Error(...).to_wire(), for the many places that answer one)."""
    return Error(request_id, code, text, model, retry_after).to_wire()


@dataclass
class Cancel:
    """CANCEL, client -> broker: forget request `id` (out of the queue, or skipped by its agent; no answer). The
    broker's CANCEL to an agent names the request by its route and carries an empty header."""

    id: int | str

    def to_wire(self) -> dict:
        return {"id": self.id}

    @classmethod
    def from_wire(cls, header: Mapping) -> Cancel:
        return cls(_id(header))


# ---------------------------------------------------------------------------------------------------------------
# QUERY and its answer
# ---------------------------------------------------------------------------------------------------------------


class What(enum.StrEnum):
    """A QUERY's `what`. Each role answers the ones in its handler table (the broker's `Broker.QUERIES`, the
    manager's `Manager.QUERIES`); Query.from_wire refuses the others."""

    AGENTS = "agents"  # broker and manager: the live agents (the manager's answer also carries `desired`)
    MODELS = "models"  # broker and manager: model -> {versions, agents}
    MODEL = "model"  # broker: one model's metadata {name, version?}
    STATS = "stats"  # broker: its counters
    STATISTICS = "statistics"  # broker: Triton's per-model statistics {name?, version?}
    DEPLOYMENTS = "deployments"  # manager: the desired state and what each agent has
    ROLLOUTS = "rollouts"  # manager: rollout counts
    DEPLOY = "deploy"  # manager: {name, version, ...}, answered when the rollout is over
    ROLLBACK = "rollback"  # manager: {name}
    UNDEPLOY = "undeploy"  # manager: {name}
    PUBLISH = "publish"  # manager: {name, file, config?, version?} + the model file (one frame)
    PUBLISH_CHECK = "publish_check"  # manager: a publish judged without its file
    BROKERS = "brokers"  # manager: the live brokers [{name, incarnation, seq, gaps, heard_age, agents, load}]
    CANARY = "canary"  # manager: {name, version, steps, step_seconds, shadow, shadow_only, retry, criteria}: start one
    PROMOTE = "promote"  # manager: {name}: make the canary the stable version now
    ABORT = "abort"  # manager: {name}: end the canary now; the stable version serves everything


@dataclass
class Query:
    """QUERY, anyone -> broker or manager: `what` and its fields (name, version, ...: the handler reads those it
    needs, with `require`). Answered REPLY (Answer) or ERROR."""

    id: int | str | None
    what: What  # (built by a client: also a plain string, which the asked role may not answer)
    fields: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        what = getattr(self.what, "value", self.what)  # a plain string too: a client may ask what this side lacks
        header = {"what": what} if self.id is None else {"id": self.id, "what": what}
        return header | {k: v for k, v in self.fields.items() if v is not None}

    @classmethod
    def from_wire(cls, header: Mapping, answers: Iterable[What]) -> Query:
        """A query this role answers (`answers`: its handler table's keys); ProtocolError naming the ones it does
        answer otherwise."""
        what = require(header, "what", str)
        if what not in answers:  # a What is equal to its string
            raise ProtocolError(f"unknown query {what!r}; ask for {', '.join(w.value for w in answers)}")
        fields = {k: v for k, v in header.items() if k != "id" and k != "what"}
        return cls(message_id(header), What(what), fields)


@dataclass
class Answer:
    """REPLY to a QUERY: {id, result}; the manager's answer to `agents` also carries its `desired` state (a
    starting broker fails requests for models not deployed at once)."""

    id: Any
    result: Any
    desired: dict | None = None

    def to_wire(self) -> dict:
        header = {"id": self.id, "result": self.result}
        if self.desired is not None:
            header["desired"] = self.desired
        return header

    @classmethod
    def from_wire(cls, header: Mapping) -> Answer:
        return cls(header.get("id"), header.get("result"), header.get("desired"))


# ---------------------------------------------------------------------------------------------------------------
# The broker's words to an agent, and the manager's events
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BrokerBeat:
    """HEARTBEAT, broker -> agent: its incarnation (hex), so that an agent answers only that broker's requests."""

    broker: str

    def to_wire(self) -> dict:
        return {"broker": self.broker}

    @classmethod
    def from_wire(cls, header: Mapping) -> BrokerBeat:
        return cls(require(header, "broker", str))

    def incarnation(self) -> bytes:
        """The incarnation's bytes; ProtocolError if it is not hex."""
        try:
            return bytes.fromhex(self.broker)
        except ValueError:
            raise ProtocolError("header field 'broker' is not hex") from None


@dataclass
class BrokerHello:
    """READY, broker -> client: the answer to a client's probe (the empty message ZMQ_PROBE_ROUTER sends on every new
    connection). `broker` is the broker's name, which is also its routing id at the client's ROUTER (the client
    addresses it by that); `incarnation` (hex) changes when the broker restarts (what was outstanding at the old one
    is lost: the client sends it again); `ready` false while it is in its rejoin window (agents still registering):
    a client uses it only if no ready broker is there, and is told again with `ready` true when it is."""

    broker: str
    incarnation: str
    ready: bool = True

    def to_wire(self) -> dict:
        return {"broker": self.broker, "incarnation": self.incarnation, "ready": self.ready}

    @classmethod
    def from_wire(cls, header: Mapping) -> BrokerHello:
        return cls(
            require(header, "broker", str),
            require(header, "incarnation", str),
            require(header, "ready", bool, optional=True) is not False,
        )


@dataclass
class Disconnect:
    """DISCONNECT, broker -> agent ("I do not know you, send READY again") and agent -> broker (it is stopping)."""

    reason: str

    def to_wire(self) -> dict:
        return {"reason": self.reason}

    @classmethod
    def from_wire(cls, header: Mapping) -> Disconnect:
        return cls(require(header, "reason", str, optional=True) or "")


# ---------------------------------------------------------------------------------------------------------------
# The heartbeat: what an agent says about itself (READY and HEARTBEAT to the broker, HEARTBEAT on PUB to the manager)
# ---------------------------------------------------------------------------------------------------------------


def _model_entries(value: Any, key: str, *more: str) -> list[dict]:
    """A list of {name, version, ...} maps, checked: the part of a beat that routing and rollouts rely on."""
    if not isinstance(value, list):
        raise ProtocolError(f"header field '{key}' has the wrong type ({type(value).__name__})")
    for entry in value:
        if not isinstance(entry, dict):
            raise ProtocolError(f"each of '{key}' must be a map")
        require(entry, "name", str)
        require(entry, "version", int)
        for extra in more:
            require(entry, extra, (str, bool), optional=True)
    return value


_NUMBER = (int, float)
_INFORMATIONAL = {  # Heartbeat fields nothing decides on: kept when of the right type, else left at their default
    "host": (str,),
    "pid": (int,),
    "device": (str,),
    "in_flight": (int,),
    "batching": (dict,),
    "draining": (bool,),
    "uptime": _NUMBER,
    "started": _NUMBER,
    "instance": (str,),
    "serving_since": _NUMBER,
    "interval": _NUMBER,
    "serves_only": (list,),
    "jobs": (dict,),
    "stats": (dict,),
    "rss": (int,),
    "max_memory": (int,),
    "drain_reason": (str,),
    "memory_budget": (int,),
    "model_info": (dict,),
}


@dataclass
class Heartbeat:
    """An agent's state, sent every heartbeat interval and on every change. The one definition of its fields: the
    agent builds it, the broker routes by it, the manager's registry and rollouts read it, `cluster status` and
    the edge's /agents show it. READY is a Heartbeat plus `metadata` (each model's inputs and outputs)."""

    agent: str  # the agent's id (also its ROUTER identity at the broker)
    capacity: int  # requests the broker may keep in flight here, all models together
    models: list[dict]  # served: [{name, version, default}]; `default` marks what unversioned requests get
    staged: list[dict] = field(default_factory=list)  # loaded and warm, not served yet: [{name, version}]
    failed: list[dict] = field(default_factory=list)  # could not be loaded: [{name, version, error}]
    host: str | None = None
    pid: int | None = None
    device: str | None = None
    in_flight: int = 0  # requests the agent is working on
    batching: dict = field(default_factory=dict)  # per model: batch size and queue wait statistics
    draining: bool = False  # stopping: finishing what it has, taking nothing new
    uptime: float = 0.0  # seconds since the agent started
    started: float | None = None  # wall time the process started (with pid: tells a restart from a re-READY)
    instance: str | None = None  # random per agent process (agent_instance()): tells two processes with one id apart
    serving_since: float | None = None  # wall time it connected, models loaded
    interval: float | None = None  # its heartbeat interval, seconds
    serves_only: list[str] | None = None  # started with --models: only these take part in rollouts; None: all
    jobs: dict = field(default_factory=dict)  # per model: {executed, cancelled, expired, peak_concurrent}
    stats: dict = field(default_factory=dict)  # {model: {version: Triton's model_stats entry + "failures"}}
    # requests of each model the broker may keep in flight here ({model: n}, each also within `capacity`); a model
    # not named (or an agent that sends none, from before this field) gets `capacity`
    model_capacity: dict = field(default_factory=dict)
    rss: int | None = None  # resident memory of the agent process, bytes
    max_memory: int | None = None  # its limit (--max-memory), bytes: past it, it drains and exits to be restarted
    drain_reason: str | None = None  # why it is draining when it is not asked to (a hung model call, memory)
    memory_budget: int | None = None  # bytes of models it may hold (--memory-budget): what placement fills
    # per loaded version, what runs and what it cost: {model: {"<version>": {"runs": "aoti" | "exported" |
    # "torchscript", "runs_why": why not compiled (or ""), "warmup_s": seconds, "warmup_sizes": [batch sizes],
    # "memory": bytes}}}
    model_info: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, header: Mapping) -> Heartbeat:
        """Parse a READY/HEARTBEAT header; ProtocolError naming the field if what routing or rollouts rely on is
        malformed. Other fields are informational: a wrong type is dropped to its default, unknown keys ignored."""
        agent = require(header, "agent", str)
        capacity = require(header, "capacity", int)
        models = _model_entries(require(header, "models", list), "models", "default")
        beat = cls(agent, capacity, models)
        model_capacity = header.get("model_capacity") or {}
        if not isinstance(model_capacity, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in model_capacity.items()
        ):
            raise ProtocolError("'model_capacity' must map model names to integers >= 1")
        beat.model_capacity = model_capacity
        beat.staged = _model_entries(header.get("staged") or [], "staged")
        beat.failed = _model_entries(header.get("failed") or [], "failed", "error")
        for name, kind in _INFORMATIONAL.items():
            value = header.get(name)
            if isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind):
                setattr(beat, name, value)
        return beat

    def served_versions(self) -> dict[str, set[int]]:
        """model -> the versions this agent serves."""
        served: dict[str, set[int]] = {}
        for entry in self.models:
            served.setdefault(entry["name"], set()).add(entry["version"])
        return served

    def takes_part_in(self, model: str) -> bool:
        """Whether this agent serves `model` when it is deployed (agents started with --models serve only those)."""
        return self.serves_only is None or model in self.serves_only


# ---------------------------------------------------------------------------------------------------------------
# The cluster views: the answers to QUERY {what: "agents"} and {what: "models"}, built the same way by the broker
# (its live agents, what `cluster status` and the edge show) and the manager (its registry)
# ---------------------------------------------------------------------------------------------------------------


def agent_view(beat: Heartbeat, *, heartbeat_age: float, joined: float, **extra) -> dict:
    """One entry of the `agents` answer: the agent's latest heartbeat, its id, seconds since it was last heard
    from, the wall time it joined, and what the asker adds (the broker: `broker_in_flight`, its exact count)."""
    view = beat.to_wire()
    view.update(id=beat.agent, heartbeat_age=round(heartbeat_age, 3), joined=joined, **extra)
    return view


def models_view(served: Iterable[tuple[str, Mapping[str, Iterable[int]]]]) -> dict[str, dict]:
    """The `models` answer from (agent id, model -> versions it serves) pairs: model -> {versions, agents}."""
    models: dict[str, dict] = {}
    for agent_id, versions_by_model in served:
        for name, versions in versions_by_model.items():
            model = models.setdefault(name, {"versions": set(), "agents": []})
            model["versions"].update(versions)
            if agent_id not in model["agents"]:
                model["agents"].append(agent_id)
    return {name: {"versions": sorted(m["versions"]), "agents": m["agents"]} for name, m in models.items()}
