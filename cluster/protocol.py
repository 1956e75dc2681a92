"""The wire protocol: every message on the bus is defined here, and only here.

A message is a list of ZeroMQ frames:

    frame 0   preamble  = TAG (b"MSB1": protocol name and version) + one command byte [+ route]
    frame 1   header    = msgpack map (string keys), at most MAX_HEADER_BYTES
    rest      tensors   = one raw frame per tensor, described in order by header["inputs"] or header["outputs"]

The route is the 16-byte request key (the broker's random incarnation + a counter: never reused by a restarted
broker) the broker attaches to broker <-> agent REQUEST, REPLY, ERROR and CANCEL: it rides at the end of the
preamble frame (one frame less per message than a frame of its own; `routed`, `parse_routed`). A REQUEST's route
(broker -> agent) is longer: the key + float64 seconds left to the request's deadline + float64 seconds it waited
in the broker's queue (REQUEST_ROUTE), so an agent can drop work whose client gave up. Every other message (and
every client <-> broker one) has the bare 5-byte preamble.

Who sends what (a ROUTER adds/strips the peer identity frame in front; it is not part of the message):

    client  -> broker   REQUEST  {id, model, version?, timeout, inputs: [meta...], outputs?: [name...], request_id?}
                                 + tensors   (request_id: the caller's name for it, e.g. the OIP id, in the logs)
                        QUERY    {id, what: "agents" | "models" | "model" | "stats", name?, version?}
                        CANCEL   {id}   (forget that request: out of the queue, or skipped by its agent; no answer)
    broker  -> client   REPLY    {id, model, version, agent, outputs: [meta...]} + tensors   (the agent's header, as is)
                        REPLY    {id, result: ...}                                            (answer to a QUERY)
                        ERROR    {id, code, message, model?}
    agent   -> broker   READY    Heartbeat + {metadata: [each model's inputs and outputs]}
                        HEARTBEAT Heartbeat (every interval and on every change of what it serves)
                        REPLY / ERROR  preamble+key, header, tensors (answers a REQUEST)
    broker  -> agent    REQUEST  preamble+request route, the client's header, tensors (forwarded, never decoded)
                        CANCEL   preamble+key, {}   (the client gave up: skip it if not started, answer CANCELLED)
                        HEARTBEAT {broker}   (its incarnation, hex: an agent answers only requests of that broker)
                        DISCONNECT {reason}   ("I do not know you, send READY again")
                        ERROR    {id: None, code: AGENT_ID_IN_USE, message}   (READY refused: another live process
                                 has that agent id; the agent stops after a grace period if it stays refused)
                        ERROR    {id: None, code: UNAUTHENTICATED | PERMISSION_DENIED, message}   (keys on: its key
                                 is not, or no longer, allowed to be an agent: revoked; the agent logs it)
    agent   -> manager  HEARTBEAT (PUB) Heartbeat: {agent, capacity, models, staged, failed, host, pid, ...}
    manager -> broker   EVENT (PUB) {event: "agent_dead", agent, instance, silent_for}   (a backup word: the broker
                        owns liveness; it drops the agent only if `instance` is its live one's)
    manager -> agent    EVENT (PUB) {event: "desired", state: {generation, models: {name: {version, staged, history}}}}
                        (on every change, when an agent joins, and every heartbeat interval)
    anyone  -> manager  QUERY {id, what: agents | models | deployments | rollouts | deploy | rollback | undeploy, ...}
                        QUERY {id, what: publish, name, file, config?, version?} + the model file's bytes (one frame)
                        QUERY {id, what: publish_check, name, file, config?}: a publish judged without its file
                        (REPLY {ok: true} or the ERROR the publish would get), asked before the file is sent
                        -> REPLY {id, result} or ERROR (deploy, rollback, publish: answered when the rollout is over;
                        a state the manager cannot save: ERROR INTERNAL naming the file and the cause, undone)

`Heartbeat` (below) is the one definition of an agent's state on the wire; `agent_view` and `models_view` build the
answers to the "agents" and "models" queries, the same way at the broker and at the manager.

A tensor meta is {name, datatype, shape}: datatype is an Open Inference Protocol name (FP32, INT64, ...), shape a
list of ints, and the tensor's frame holds exactly prod(shape) * itemsize bytes, C order. No pickle, no msgpack list
of numbers for tensor data.
"""

from __future__ import annotations

import enum
import math
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import numpy as np

from cluster.config import MAX_DIM, MAX_DIMS, MAX_HEADER_BYTES, MAX_NAME, MAX_TENSORS

TAG = b"MSB1"  # Model-Serving Bus, protocol version 1
# A route key: the broker's random incarnation (drawn at its start) + its request counter, so that a key names one
# request of one broker process and is never reused after a restart (an answer that arrives late, on the new broker's
# link, then matches nothing there instead of another client's request).
INCARNATION_BYTES = 8
ROUTE_BYTES = INCARNATION_BYTES + 8
REQUEST_ROUTE = struct.Struct(">16sdd")  # broker -> agent REQUEST: key, seconds left, seconds waited at the broker


def broker_incarnation() -> bytes:
    """A fresh random incarnation for a broker process: the first INCARNATION_BYTES of every route it makes."""
    return secrets.token_bytes(INCARNATION_BYTES)


def request_route(key: bytes, seconds_left: float, waited_s: float) -> bytes:
    """The route of a REQUEST the broker forwards (after its preamble): the agent answers with `key` alone."""
    return REQUEST_ROUTE.pack(key, seconds_left, waited_s)


def parse_request_route(frame: bytes) -> tuple[bytes, float, float]:
    """(key, seconds left, seconds waited) of a REQUEST's route; a bare key (ROUTE_BYTES) means no deadline known.
    ProtocolError for any other length or a time that is not a finite number."""
    if len(frame) == ROUTE_BYTES:
        return frame, math.inf, 0.0
    if len(frame) != REQUEST_ROUTE.size:
        raise ProtocolError("bad route")
    key, left, waited = REQUEST_ROUTE.unpack(frame)
    if not (math.isfinite(left) and math.isfinite(waited)):
        raise ProtocolError("bad route: times must be finite")
    return key, left, waited


AGENT_INSTANCE_CHARS = 16  # hex characters of an agent's instance token
MAX_AGENT_ID_BYTES = 255 - 1 - AGENT_INSTANCE_CHARS  # so that "<id>/<instance>" fits a ZeroMQ routing id


def agent_instance() -> str:
    """A fresh random instance token for an agent process (64 bits, hex)."""
    return secrets.token_hex(AGENT_INSTANCE_CHARS // 2)


def agent_identity(agent_id: str, token: str | None) -> bytes:
    """An agent's ROUTER identity at the broker: "<agent id>/<token>", one per process (None: the bare id, as
    agents without a token, and tests, connect). Two processes started with the same --id therefore hold two
    connections the broker can tell apart and answer each; only the same process reconnecting presents the same
    identity again (and takes its own connection over, ROUTER_HANDOVER). The agent's token is a secret of its own
    (agent_instance()), never its public `instance`: what `agents()` shows must not be enough to build a live
    agent's identity and, keys off, be handed its connection."""
    return agent_id.encode() if token is None else f"{agent_id}/{token}".encode()


def identity_names(identity: bytes, agent_id: str) -> bool:
    """Whether a ROUTER identity is `agent_id`'s: the bare id, or "<agent id>/<token>" (agent_identity)."""
    name = agent_id.encode()
    return identity == name or (
        len(identity) == len(name) + 1 + AGENT_INSTANCE_CHARS and identity[: len(name) + 1] == name + b"/"
    )


class Command(enum.IntEnum):
    READY = 0x01
    REQUEST = 0x02
    REPLY = 0x03
    ERROR = 0x04
    HEARTBEAT = 0x05
    DISCONNECT = 0x06
    QUERY = 0x07
    EVENT = 0x08
    CANCEL = 0x09


PREAMBLE = {cmd: TAG + bytes([cmd]) for cmd in Command}
_COMMAND_BY_PREAMBLE = {v: k for k, v in PREAMBLE.items()}


class ErrorCode(str, enum.Enum):
    """Why a request failed; the client maps each to one exception type, the edge to one HTTP status."""

    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"  # no agent has ever served this model (or this version)
    NO_AGENT = "NO_AGENT"  # the model is known but no live agent serves it now
    TIMEOUT = "TIMEOUT"  # no answer within the request's deadline
    BAD_REQUEST = "BAD_REQUEST"  # malformed message, unknown input, wrong dtype or shape
    INFERENCE_FAILED = "INFERENCE_FAILED"  # the model raised
    OVERLOADED = "OVERLOADED"  # the broker's queue is full, or the wait would pass the model's bound (retry_after)
    CANCELLED = "CANCELLED"  # the client cancelled it (an agent's answer to the broker's CANCEL; never to a client)
    UNAUTHENTICATED = "UNAUTHENTICATED"  # with keys on: the sender's key is not (or no longer) allowed
    PERMISSION_DENIED = "PERMISSION_DENIED"  # with keys on: the key's role may not do this (e.g. a client deploying)
    AGENT_ID_IN_USE = "AGENT_ID_IN_USE"  # broker -> agent: another live agent (another process) has this agent id
    INTERNAL = "INTERNAL"


# The one datatype table: every Open Inference Protocol datatype the bus carries, with its numpy dtype (item size,
# and the torch dtype of the same name, follow from it). BYTES (strings) is not a raw tensor, so it is not here.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPE_ITEMSIZE = {name: dtype.itemsize for name, dtype in DATATYPES.items()}


class ProtocolError(ValueError):
    """A message that does not follow this protocol. Receivers answer BAD_REQUEST where they can, else drop it."""


# ---------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def message(cmd: Command, header: dict, tensors: Sequence = ()) -> list:
    """Frames for a message without a route: [preamble, header, *tensors]."""
    return [PREAMBLE[cmd], pack(header), *tensors]


def routed(cmd: Command, route: bytes, header: dict | bytes, tensors: Sequence = ()) -> list:
    """Frames for broker <-> agent REQUEST/REPLY/ERROR/CANCEL: [preamble + route, header, *tensors]."""
    return [PREAMBLE[cmd] + route, header if isinstance(header, bytes) else pack(header), *tensors]


def error_header(
    request_id: Any, code: ErrorCode, text: str, model: str | None = None, retry_after: float | None = None
) -> dict:
    """An ERROR's header; `retry_after` (seconds, with OVERLOADED): when the client may try again."""
    header = {"id": request_id, "code": code.value, "message": text}
    if model is not None:
        header["model"] = model
    if retry_after is not None:
        header["retry_after"] = retry_after
    return header


# ---------------------------------------------------------------------------------------------------------------
# Decoding and validation (before anything touches the data)
# ---------------------------------------------------------------------------------------------------------------


def frame_bytes(frame) -> bytes | memoryview:
    """Bytes of a frame: bytes and memoryviews as they are, a zmq.Frame (recv with copy=False) as its buffer."""
    return getattr(frame, "buffer", frame)


def as_bytes(frame) -> bytes:
    """A small frame's bytes: bytes as they are (received copied, or tests), a zmq.Frame copied out."""
    return frame if isinstance(frame, bytes) else frame.bytes


def parse_preamble(frame) -> Command:
    """The command of a message whose first frame is `frame`; ProtocolError if the tag or command is wrong."""
    raw = frame if isinstance(frame, bytes) else bytes(frame_bytes(frame))
    cmd = _COMMAND_BY_PREAMBLE.get(raw)
    if cmd is None:
        if not raw.startswith(TAG[:3]):
            raise ProtocolError("not a bus message (bad protocol tag)")
        if raw[: len(TAG)] != TAG:
            raise ProtocolError(f"unsupported protocol version {raw[: len(TAG)]!r}, expected {TAG!r}")
        raise ProtocolError(f"unknown command {raw[len(TAG) :]!r}")
    return cmd


PREAMBLE_BYTES = len(TAG) + 1
ROUTED = frozenset({Command.REQUEST, Command.REPLY, Command.ERROR, Command.CANCEL})  # may carry a route


def parse_routed(frame) -> tuple[Command, bytes]:
    """(command, route) of a broker <-> agent message whose first frame is `frame`: the route is what follows the
    5-byte preamble (b"" when none). ProtocolError if the tag or command is wrong, or a command that never carries a
    route has bytes after it. The route's length is the receiver's to check (REQUEST_ROUTE, ROUTE_BYTES)."""
    raw = as_bytes(frame)
    cmd = parse_preamble(raw[:PREAMBLE_BYTES])
    route = raw[PREAMBLE_BYTES:]
    if route and cmd not in ROUTED:
        raise ProtocolError(f"{cmd.name} carries no route")
    return cmd, route


def unpack_header(frame) -> dict:
    """Decode a msgpack header frame into a dict, with size and type checks."""
    raw = frame_bytes(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=100_000,
            max_map_len=100_000,
            max_ext_len=0,
        )
    except (
        ValueError,
        TypeError,
        msgpack.UnpackException,
        msgpack.ExtraData,
    ) as exc:  # the types msgpack raises on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    return header


MAX_REQUEST_ID = 128  # characters of a REQUEST's request_id kept (it is only ever logged)


def request_id_of(header: Mapping) -> str | None:
    """A REQUEST's request_id for the logs: a string, cut to MAX_REQUEST_ID; None when absent or not a string."""
    value = header.get("request_id")
    return value[:MAX_REQUEST_ID] if isinstance(value, str) else None


def require(header: dict, key: str, kind: type | tuple, *, optional: bool = False) -> Any:
    """header[key], checked to be of `kind`; ProtocolError naming the key otherwise."""
    if key not in header or header[key] is None:
        if optional:
            return None
        raise ProtocolError(f"header is missing '{key}'")
    value = header[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"header field '{key}' has the wrong type ({type(value).__name__})")
    return value


def validate_tensor_metas(metas: Any, frames: Sequence, what: str = "inputs") -> list[dict]:
    """Check tensor metas against their frames: names, datatypes, shapes and byte counts.

    Returns the metas; raises ProtocolError with a message that names the offending tensor.
    """
    if not isinstance(metas, list):
        raise ProtocolError(f"'{what}' must be a list")
    if len(metas) > MAX_TENSORS:
        raise ProtocolError(f"{len(metas)} tensors is over the limit of {MAX_TENSORS}")
    if len(metas) != len(frames):
        raise ProtocolError(f"{len(metas)} {what} described but {len(frames)} tensor frames sent")
    seen = set()
    for meta, frame in zip(metas, frames):
        if not isinstance(meta, dict):
            raise ProtocolError(f"each of '{what}' must be a map")
        name = meta.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise ProtocolError(f"a tensor in '{what}' has no valid name")
        if name in seen:
            raise ProtocolError(f"tensor '{name}' appears twice")
        seen.add(name)
        datatype = meta.get("datatype")
        if datatype not in DATATYPE_ITEMSIZE:
            raise ProtocolError(f"tensor '{name}': unsupported datatype {datatype!r}")
        shape = meta.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)
        ):
            raise ProtocolError(f"tensor '{name}': shape must be a list of at most {MAX_DIMS} non-negative ints")
        expected = math.prod(shape) * DATATYPE_ITEMSIZE[datatype]
        if expected != len(frame_bytes(frame)):
            raise ProtocolError(
                f"tensor '{name}': shape {shape} of {datatype} needs {expected} bytes, "
                f"frame has {len(frame_bytes(frame))}"
            )
    return metas


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
