"""The wire protocol (the cluster.protocol package): every message on the bus is defined in it, and only there. This
module, frames.py: the frame layout (preamble, route, header limits, tensor metas, commands, error codes, datatypes)
and, below, who sends what. messages.py: one class per message header with to_wire()/from_wire() (Request, Reply,
Error, Cancel, Query and its What, Answer, BrokerBeat, Disconnect, the events AgentDead and Desired, Heartbeat): the
sender builds through the class and every receiver parses through the same one.

A message is a list of ZeroMQ frames:

    frame 0   preamble  = TAG (b"MSB1": protocol name and version) + one command byte [+ route]
    frame 1   header    = msgpack map (string keys), at most MAX_HEADER_BYTES
    rest      tensors   = one raw frame per tensor, described in order by header["inputs"] or header["outputs"]

The route is the 16-byte request key (the broker's random incarnation + a counter: never reused by a restarted
broker) the broker attaches to broker <-> agent REQUEST, REPLY, ERROR and CANCEL: it rides at the end of the
preamble frame (one frame less per message than a frame of its own; `routed`, `parse_routed`). A REQUEST's route
(broker -> agent) is longer: the key + float64 seconds left to the request's deadline + float64 seconds it waited
in the broker's queue (REQUEST_ROUTE), so an agent can drop work whose client gave up.

A client's REQUEST carries what the broker routes by in a head after its preamble (`request_head`,
`parse_request_head`), so that the broker's hot path is a struct unpack, a table lookup and a send, never a msgpack
decode of the header it forwards:

    frame 0   TAG + REQUEST + REQUEST_HEAD (>QdIH: id uint64, timeout float64 seconds (0: the broker's default),
              version uint32 (0: the model's default), attempt uint16) + the model name (utf-8, the rest, 1 to
              MAX_NAME bytes)

The msgpack header keeps every field too (the agent reads it, the broker forwards it as received). A REQUEST with
the bare preamble (an older or hand-written client) is still taken: the broker then reads the header. Where a
hand-made client's header and head disagree, the broker routes (model, version, deadline, attempt budget, the id
of its errors and of a CANCEL) by the head, and the agent runs what the header says and answers with the header's
id: such a client can only confuse itself, the answer goes to it alone. Every other message has the bare 5-byte
preamble.

Who sends what (a ROUTER adds/strips the peer identity frame in front; it is not part of the message):

    client  -> broker   (probe) one empty frame   (ZMQ_PROBE_ROUTER, on each new connection: "who are you?")
                        REQUEST  preamble + head, Request {id, model, version?, timeout, inputs: [meta...],
                                 outputs?: [name...], request_id?, attempt?} + tensors   (request_id: the caller's
                                 name for it, in the logs; attempt: dispatches it already had at brokers the client
                                 lost; the head: the same id, timeout, version, attempt and model, see above)
                        QUERY    Query {id, what: agents | models | model | stats | statistics, name?, version?}
                        CANCEL   Cancel {id}   (forget that request: out of the queue, or skipped by its agent; no
                                 answer)
    broker  -> client   READY    BrokerHello {broker, incarnation, ready}   (answers a probe; again with ready true
                                 once it is past its rejoin window: clients prefer ready brokers)
                        REPLY    Reply {id, model, version, agent, outputs: [meta...], batch_size, queue_us}
                                 + tensors   (the agent's header, as is)
                        REPLY    Answer {id, result}   (answer to a QUERY)
                        ERROR    Error {id, code, message, model?, retry_after?}
    agent   -> broker   READY    Heartbeat + {metadata: [each model's inputs and outputs]}
                        HEARTBEAT Heartbeat (every interval and on every change of what it serves)
                        REPLY / ERROR  preamble+key, Reply / Error, tensors (answers a REQUEST; ERROR BUSY: no free
                                 slot, the broker queues it again without counting an attempt)
                        DISCONNECT Disconnect {reason}   (it is stopping)
    broker  -> agent    REQUEST  preamble+request route, the client's header, tensors (forwarded, never re-encoded)
                        CANCEL   preamble+key, {}   (the client gave up: skip it if not started, answer CANCELLED)
                        HEARTBEAT BrokerBeat {broker}   (its incarnation, hex: an agent answers only requests of
                                 that broker)
                        DISCONNECT Disconnect {reason}   ("I do not know you, send READY again")
                        ERROR    Error {id: None, code: AGENT_ID_IN_USE, message}   (READY refused: another live
                                 process has that agent id; the agent stops after a grace period if it stays refused)
                        ERROR    Error {id: None, code: UNAUTHENTICATED | PERMISSION_DENIED, message}   (keys on: its
                                 key is not, or no longer, allowed to be an agent: revoked; the agent logs it)
    agent   -> manager  HEARTBEAT (PUB) Heartbeat: {agent, capacity, models, staged, failed, host, pid, ...}
    manager -> broker   EVENT (PUB) AgentDead {event: "agent_dead", agent, instance, silent_for}   (a backup word:
                        the broker owns liveness; it drops the agent only if `instance` is its live one's)
    manager -> agents,  EVENT (PUB) Desired {event: "desired", state: {generation, models: {name: {version, staged,
               broker   history}}}}   (on every change, when an agent joins, and every heartbeat interval)
    broker  -> manager  QUERY Query {id, what: agents}   (at start: which agents to wait for; the Answer carries
                        `desired`)
                        EVENT (PUB, connected to the manager's heartbeat address) BrokerReport {event:
                        "broker_report", broker, incarnation, seq, agents, load}   (every interval: the agents it
                        routes to and its load, also at once when those agents change; the manager's view is
                        the union of every live broker's)
    anyone  -> manager  QUERY Query {id, what: agents | models | deployments | rollouts | brokers | deploy |
                        rollback | undeploy, ...}
                        QUERY {id, what: publish, name, file, config?, version?} + the model file's bytes (one frame)
                        QUERY {id, what: publish_check, name, file, config?}: a publish judged without its file
                        (REPLY {ok: true} or the ERROR the publish would get), asked before the file is sent
                        -> REPLY Answer {id, result} or ERROR (deploy, rollback, publish: answered when the rollout
                        is over; a state the manager cannot save: ERROR INTERNAL naming the file and the cause, undone)

BATCH (any of the above between broker and agent, broker -> client REPLY / ERROR, and an AsyncClient's messages of
one event-loop step to a broker): several messages to one peer in one (`batch`, `unbatch`): TAG + BATCH + each
message's frame count (uint16), then their frames. A sender batches only what already waits to go to that peer, so
nothing waits longer at low load; the receiver handles each message as if it came alone.

`Heartbeat` is the one definition of an agent's state on the wire; `agent_view` and `models_view` build the
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
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from cluster.config import MAX_DIM, MAX_DIMS, MAX_HEADER_BYTES, MAX_NAME, MAX_REQUEST_TIMEOUT_S, MAX_TENSORS

TAG = b"MSB1"  # Model-Serving Bus, protocol version 1
# A route key: the broker's random incarnation (drawn at its start) + its request counter, so that a key names one
# request of one broker process and is never reused after a restart (an answer that arrives late, on the new broker's
# link, then matches nothing there instead of another client's request).
INCARNATION_BYTES = 8
ROUTE_BYTES = INCARNATION_BYTES + 8
REQUEST_ROUTE = struct.Struct(">16sdd")  # broker -> agent REQUEST: key, seconds left, seconds waited at the broker
REQUEST_ROUTE_RUN = struct.Struct(">16sddi")  # ... and the version to run (a canary split's draw), for unpinned ones
REQUEST_HEAD = struct.Struct(">QdIH")  # client -> broker REQUEST, after the preamble: id, timeout, version, attempt
MAX_ATTEMPT = 1000  # a request's `attempt` past this is malformed (the budget is a handful)


def broker_incarnation() -> bytes:
    """A fresh random incarnation for a broker process: the first INCARNATION_BYTES of every route it makes."""
    return secrets.token_bytes(INCARNATION_BYTES)


def request_route(key: bytes, seconds_left: float, waited_s: float, run_version: int | None = None) -> bytes:
    """The route of a REQUEST the broker forwards (after its preamble): the agent answers with `key` alone.
    `run_version`: the version the agent runs for a request that names none (the broker's canary split draws it);
    None: the model's default version."""
    if run_version is None:
        return REQUEST_ROUTE.pack(key, seconds_left, waited_s)
    return REQUEST_ROUTE_RUN.pack(key, seconds_left, waited_s, run_version)


def parse_request_route(frame: bytes) -> tuple[bytes, float, float]:
    """(key, seconds left, seconds waited) of a REQUEST's route; a bare key (ROUTE_BYTES) means no deadline known.
    ProtocolError for any other length or a time that is not a finite number."""
    if len(frame) == ROUTE_BYTES:
        return frame, math.inf, 0.0
    if len(frame) == REQUEST_ROUTE_RUN.size:
        frame = frame[: REQUEST_ROUTE.size]
    elif len(frame) != REQUEST_ROUTE.size:
        raise ProtocolError("bad route")
    key, left, waited = REQUEST_ROUTE.unpack(frame)
    if not (math.isfinite(left) and math.isfinite(waited)):
        raise ProtocolError("bad route: times must be finite")
    return key, left, waited


def run_version_of(frame: bytes) -> int | None:
    """The version a REQUEST's route tells the agent to run when the request names none (None: its default).
    ProtocolError for a version below 1."""
    if len(frame) != REQUEST_ROUTE_RUN.size:
        return None
    version = REQUEST_ROUTE_RUN.unpack(frame)[3]
    if version < 1:
        raise ProtocolError("bad route: the version to run must be >= 1")
    return version


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
    BATCH = 0x0A  # several messages in one (batch(), unbatch()): one send and one wake-up for a busy path


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
    BUSY = "BUSY"  # agent -> broker: no free slot here now (its share changed under the broker): queue it again
    INTERNAL = "INTERNAL"


# The one datatype table: every Open Inference Protocol datatype the bus carries, with its numpy dtype (item size,
# and the torch dtype of the same name, follow from it). BYTES (strings, encoded images) is not a raw tensor: in
# numpy an object array of `bytes`, on the bus Triton's layout (each element a 4-byte little-endian length, then its
# bytes, row-major), so it has no item size.
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
    "BYTES": np.dtype(object),
}
DATATYPE_ITEMSIZE = {name: dtype.itemsize for name, dtype in DATATYPES.items() if name != "BYTES"}
NUMERIC_DATATYPES = tuple(DATATYPE_ITEMSIZE)  # the raw tensors: every datatype but BYTES
_LENGTH = struct.Struct("<I")


def split_bytes(raw, count: int, what: str) -> list[bytes]:
    """The `count` elements of a BYTES frame (Triton's layout: each a 4-byte little-endian length, then its bytes),
    copied out as bytes; ProtocolError when a length runs past the frame, or the frame holds more or fewer."""
    data = raw if isinstance(raw, bytes) else bytes(raw)
    items: list[bytes] = []
    at, end = 0, len(data)
    unpack = _LENGTH.unpack_from
    for i in range(count):
        if at + 4 > end:
            raise ProtocolError(f"{what}: BYTES element {i} of {count}: its length runs past the end ({end} bytes)")
        (size,) = unpack(data, at)
        at += 4
        if size > end - at:
            raise ProtocolError(f"{what}: BYTES element {i} of {count} says {size} bytes, {end - at} are left")
        items.append(data[at : at + size])
        at += size
    if at != end:
        raise ProtocolError(f"{what}: {end - at} bytes after the {count} BYTES elements the shape holds")
    return items


def join_bytes(items) -> bytes:
    """A BYTES frame from an iterable of bytes-like elements (row-major)."""
    parts = []
    for item in items:
        parts.append(_LENGTH.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


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


# ---------------------------------------------------------------------------------------------------------------
# Decoding and validation (before anything touches the data)
# ---------------------------------------------------------------------------------------------------------------


MAX_BATCH = 64  # messages in one BATCH
_BATCH_COUNT = struct.Struct(">H")


def batch(messages: Sequence[list]) -> list:
    """One BATCH message holding `messages` (each a list of frames: preamble [+ route], header, tensors):
    [TAG + BATCH + one big-endian uint16 per message (its frame count), then every message's frames in order]. The
    sender batches only what is already waiting to go to one peer (never waits to fill one), at most MAX_BATCH; a
    lone message goes as it is. Any peer identity frame goes in front of the result, as for any message."""
    if not 0 < len(messages) <= MAX_BATCH:
        raise ValueError(f"a BATCH holds 1 to {MAX_BATCH} messages, not {len(messages)}")
    counts = b"".join(_BATCH_COUNT.pack(len(m)) for m in messages)
    frames = [PREAMBLE[Command.BATCH] + counts]
    for m in messages:
        frames.extend(m)
    return frames


def unbatch(frames: Sequence, start: int = 0) -> list[list]:
    """The messages of a BATCH whose preamble is frames[start] (frames before it, a ROUTER's peer identity, are put
    in front of each message): [[*frames[:start], preamble, header, ...], ...]. ProtocolError when the counts do not
    add up to the frames that follow, a message has fewer than 2 frames, there are more than MAX_BATCH, or one is a
    BATCH itself. What each message is (its command) is the receiver's to check."""
    raw = as_bytes(frames[start])
    counts = raw[PREAMBLE_BYTES:]
    if raw[:PREAMBLE_BYTES] != PREAMBLE[Command.BATCH] or not counts or len(counts) % 2:
        raise ProtocolError("bad BATCH preamble")
    n = len(counts) // 2
    if n > MAX_BATCH:
        raise ProtocolError(f"a BATCH of {n} messages is over the limit of {MAX_BATCH}")
    prefix = list(frames[:start])
    at = start + 1
    out = []
    for (count,) in _BATCH_COUNT.iter_unpack(counts):
        if count < 2 or at + count > len(frames):
            raise ProtocolError("BATCH counts do not match its frames")
        message = prefix + list(frames[at : at + count])
        if as_bytes(message[start])[:PREAMBLE_BYTES] == PREAMBLE[Command.BATCH]:
            raise ProtocolError("a BATCH inside a BATCH")
        out.append(message)
        at += count
    if at != len(frames):
        raise ProtocolError(f"{len(frames) - at} frames after the BATCH's messages")
    return out


def is_batch(frame) -> bool:
    """Whether a message whose first frame is `frame` is a BATCH."""
    return frame_bytes(frame)[:PREAMBLE_BYTES] == PREAMBLE[Command.BATCH]


def as_one(messages: list[list]) -> list:
    """The one message that carries `messages` (each [preamble, header, ...], no peer identity): a lone one as it
    is, two or more as a BATCH."""
    return messages[0] if len(messages) == 1 else batch(messages)


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
REQUEST_HEAD_END = PREAMBLE_BYTES + REQUEST_HEAD.size  # where a REQUEST head's model name begins
_REQUEST = PREAMBLE[Command.REQUEST]
_head_unpack = REQUEST_HEAD.unpack_from
_MAX_HEAD_VERSION = 2**32 - 1  # uint32


def request_head(request_id: int, timeout: float | None, version: int | None, attempt: int, model: bytes) -> bytes:
    """Frame 0 of a client's REQUEST: preamble + REQUEST_HEAD + the model name (`model`: its utf-8 bytes). timeout
    None: the broker's default; version None: the model's default. struct.error for a field out of its range."""
    return _REQUEST + REQUEST_HEAD.pack(request_id, timeout or 0.0, version or 0, attempt) + model


def head_name(model: str, version: int | None) -> bytes | None:
    """A model name as a REQUEST head carries it (utf-8), or None for a request no head can express (a name over
    MAX_NAME bytes, a version outside 1 to 2**32 - 1): the client sends that one with the bare preamble, and the
    broker answers it from its header as it always did. UnicodeEncodeError for a name that is not valid unicode."""
    name = model.encode()
    if len(name) > MAX_NAME or (version is not None and not 0 < version <= _MAX_HEAD_VERSION):
        return None
    return name


def has_request_head(frame: bytes) -> bool:
    """Whether a client's first frame is a REQUEST with a head (anything after its preamble; parse_request_head
    judges it), not the bare preamble of the old form."""
    return len(frame) > PREAMBLE_BYTES and frame[:PREAMBLE_BYTES] == _REQUEST


def request_head_id(frame: bytes) -> int | None:
    """The id in a REQUEST head, for the answer to one that is otherwise malformed (None: too short to hold one)."""
    return _head_unpack(frame, PREAMBLE_BYTES)[0] if len(frame) >= REQUEST_HEAD_END else None


def parse_request_head(frame: bytes) -> tuple[int, str, int | None, float | None, int]:
    """(id, model, version, timeout, attempt) of a client's REQUEST head (frame 0, preamble included), checked as
    Request.from_wire checks the header's fields: timeout 0 < t <= MAX_REQUEST_TIMEOUT_S (0 on the wire: None, the
    broker's default), attempt <= MAX_ATTEMPT, the model name utf-8 of 1 to MAX_NAME bytes; version 0 is None.
    ProtocolError naming the field otherwise."""
    if len(frame) < REQUEST_HEAD_END:
        raise ProtocolError(f"REQUEST head of {len(frame)} bytes is too short: {REQUEST_HEAD_END} and a model name")
    request_id, timeout, version, attempt = _head_unpack(frame, PREAMBLE_BYTES)
    name = frame[REQUEST_HEAD_END:]
    if not 0 < len(name) <= MAX_NAME:
        raise ProtocolError(f"REQUEST head field 'model' must be 1 to {MAX_NAME} bytes, not {len(name)}")
    try:
        model = name.decode()
    except UnicodeDecodeError:
        raise ProtocolError("REQUEST head field 'model' is not valid utf-8") from None
    if not 0.0 < timeout <= MAX_REQUEST_TIMEOUT_S:  # NaN fails both
        if timeout != 0.0:
            raise ProtocolError(
                f"REQUEST head field 'timeout' must be between 0 and {MAX_REQUEST_TIMEOUT_S:.0f} seconds"
            )
        timeout = None
    if attempt > MAX_ATTEMPT:
        raise ProtocolError(f"REQUEST head field 'attempt' must be between 0 and {MAX_ATTEMPT}")
    return request_id, model, version or None, timeout, attempt


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


def header_request_id(frame) -> str | None:
    """The request_id in a REQUEST's header frame, read only when a log line needs it (a REQUEST with a head is
    routed without decoding its header); None when absent, not a string, or the header unreadable."""
    try:
        return request_id_of(unpack_header(frame))
    except ProtocolError:
        return None


def require(header: Mapping, key: str, kind: type | tuple, *, optional: bool = False) -> Any:
    """header[key], checked to be of `kind`; ProtocolError naming the key otherwise."""
    return check_field(key, header.get(key), kind, optional=optional)


def check_field(key: str, value: Any, kind: type | tuple, *, optional: bool = False) -> Any:
    """A header field's value, checked to be of `kind` (None: absent); ProtocolError naming the key otherwise."""
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"header is missing '{key}'")
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
        if type(datatype) is not str or datatype not in DATATYPES:
            raise ProtocolError(f"tensor '{name}': unsupported datatype {datatype!r}")
        shape = meta.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)
        ):
            raise ProtocolError(f"tensor '{name}': shape must be a list of at most {MAX_DIMS} non-negative ints")
        if datatype == "BYTES":  # each element takes 4 bytes at least; every length is checked where it is decoded
            count, size = math.prod(shape), len(frame_bytes(frame))
            if count * 4 > size or (count == 0 and size):
                raise ProtocolError(
                    f"tensor '{name}': shape {shape} of BYTES needs {count} length-prefixed elements, "
                    f"the frame has {size} bytes"
                )
            continue
        expected = math.prod(shape) * DATATYPE_ITEMSIZE[datatype]
        if expected != len(frame_bytes(frame)):
            raise ProtocolError(
                f"tensor '{name}': shape {shape} of {datatype} needs {expected} bytes, "
                f"frame has {len(frame_bytes(frame))}"
            )
    return metas
