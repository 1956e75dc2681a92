"""The client's sans-IO part: `ClientCore` encodes requests, matches answers to calls, notices deadlines and keeps
the brokers (which are live, ready, and hold which calls); `Call` is one request waiting, `InferResult` one answer.
`Client` (client.py) and `AsyncClient` (async_client.py) are thin adapters over it that own the socket (pyzmq's
zmq/auth layout).

Several brokers (the Guide's Freelance model 3): the socket is a ROUTER connected to every broker address, and a
broker is addressed by its address (the routing id the client gives each connection, ZMQ_CONNECT_ROUTING_ID); it
says its name in a READY BrokerHello when the client probes it (ZMQ_PROBE_ROUTER on the first connection, the
adapters on every later one). A new call goes to the live broker with the fewest of this
client's calls outstanding (ready ones first: a broker still in its rejoin window only when no other is live), and
remembers it. A broker is lost when the socket monitor reports its connection dropped (`peer_for` the endpoint), a
send to it finds it gone (EHOSTUNREACH), or it says hello with a new incarnation (it restarted): every call
outstanding there is sent again at once to another broker (`resend`), with what is left of its deadline and its
attempt count + 1 (one attempt budget across brokers).
With no live broker, calls wait here (`Call.broker` None) until one says hello, or fail at their deadline."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from cluster import protocol
from cluster.auth import HANDSHAKE_EVENTS, BusSecurity, HandshakeVerdict
from cluster.codec import decode_tensors, encode_tensors
from cluster.config import (
    CLIENT_LINK_HEARTBEAT_S,
    CLIENT_LINK_TIMEOUT_S,
    MAX_DIM,
    MAX_DIMS,
    MAX_NAME,
    MAX_TENSORS,
    Timings,
    address_list,
    limits,
)
from cluster.errors import (
    AuthenticationError,
    BadRequestError,
    ClusterError,
    InferenceFailedError,
    InferenceTimeoutError,
    error_from_header,
)
from cluster.protocol import Command, ErrorCode, ProtocolError, frame_bytes
from cluster.role_settings import ClientSettings
from cluster.settings import from_env
from cluster.sockets import make_socket

_REQUEST = protocol.PREAMBLE[Command.REQUEST]
DEADLINE_GRACE = 2.0  # the broker answers TIMEOUT at the deadline; the client gives up on its own a little later


@dataclass
class InferResult:
    """The answer to one inference request."""

    model: str
    version: int
    agent: str  # id of the agent that served it
    outputs: dict[str, np.ndarray]  # read-only views over the received bytes
    id: Any = None
    batch_size: int | None = None  # requests in the forward pass that served this one (dynamic batching)
    queue_seconds: float | None = None  # how long it waited in the agent for a worker or a batch

    def as_numpy(self, name: str) -> np.ndarray:
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r}; outputs are {sorted(self.outputs)}") from None


@dataclass(eq=False)
class Call:
    """One request waiting for its answer."""

    request_id: int
    message: protocol.Request | protocol.Query
    tensors: list
    deadline: float  # monotonic
    future: Any  # concurrent.futures.Future or asyncio.Future
    model: str | None = None
    broker: bytes | None = None  # the name of the broker it goes to (None: waiting for a live one)
    sent: bool = False  # it went to `broker` (a resend clears it)
    no_agent_at: set | None = None  # brokers that answered it NO_AGENT (it tries the others)
    head: bytes | None = None  # a REQUEST's model name for its head (protocol.head_name; None: the bare preamble)

    @property
    def command(self) -> Command:
        return Command.REQUEST if isinstance(self.message, protocol.Request) else Command.QUERY

    def frames(self) -> list:
        """The message, with the timeout brought down to what is left of the deadline (matters on a resend): a
        REQUEST with its head (what the broker routes by: protocol.request_head) and its header (what the agent
        reads), both with that timeout and the attempt count."""
        message = self.message
        if type(message) is not protocol.Request:
            return protocol.message(Command.QUERY, message.to_wire())
        message.timeout = timeout = max(0.001, self.deadline - DEADLINE_GRACE - time.monotonic())
        if self.head is None or message.attempt > protocol.MAX_ATTEMPT:  # the broker reads the header (and says why)
            first = _REQUEST
        else:
            first = protocol.request_head(message.id, timeout, message.version, message.attempt, self.head)
        return [first, protocol.pack(message.to_wire()), *self.tensors]

    def wire(self) -> list:
        """What the client's ROUTER sends: the broker's name, then the message."""
        return [self.broker, *self.frames()]


@dataclass(eq=False)
class BrokerState:
    """A broker this client has heard from (a READY BrokerHello)."""

    name: bytes  # its routing id at the client's ROUTER: the address the client connected to
    incarnation: str
    ready: bool
    live: bool = True
    calls: set[int] = field(default_factory=set)  # ids of this client's calls outstanding there
    label: str = ""  # the name it says in its hello

    def describe(self) -> dict:
        return {
            "name": self.label or self.name.decode(errors="replace"),
            "address": self.name.decode(errors="replace"),
            "incarnation": self.incarnation,
            "ready": self.ready,
            "live": self.live,
            "outstanding": len(self.calls),
        }


class ClientCore:
    """Everything a client does except I/O."""

    def __init__(self, timeout: float, address: str = "", keyed: bool = False, max_attempts: int | None = None):
        self.timeout = timeout
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self.address = address
        self.addresses = address_list(address) if address else []
        self.keyed = keyed  # this client presents a key
        self.refused: AuthenticationError | None = None  # the last handshake failed: calls fail at once
        self._handshakes = HandshakeVerdict("broker")
        # the broker's attempt budget, across brokers: a call lost with this many attempts fails here
        self.max_attempts = Timings().max_dispatch_attempts if max_attempts is None else max_attempts
        self.brokers: dict[bytes, BrokerState] = {}  # name -> what we know of it
        self.live: list[BrokerState] = []  # the live ones (the hot path chooses among these)
        self.resend: list[Call] = []  # calls to send now (to call.broker): lost elsewhere, or were waiting
        self.up: set[str] = set()  # endpoints whose connection is up (the monitor's view)
        self._turn = 0  # ties between brokers rotate
        self._unready_probed = 0.0

    @classmethod
    def for_client(cls, address: str | None, timeout: float | None, keyed: bool) -> ClientCore:
        """The core of a Client or AsyncClient: the address and timeout given, else CLUSTER_BROKER_CLIENTS and
        CLUSTER_REQUEST_TIMEOUT (ClientSettings, read once), else their defaults; the attempt budget across brokers
        is CLUSTER_MAX_DISPATCH_ATTEMPTS (the brokers' own)."""
        defaults = from_env(ClientSettings)
        address = address or defaults.addresses.broker_clients
        timeout = defaults.timings.request_timeout if timeout is None else timeout
        try:
            address_list(address)
        except ValueError as exc:
            raise BadRequestError(f"no broker address: {exc}") from None
        return cls(timeout, address, keyed, defaults.timings.max_dispatch_attempts)

    # ---- brokers ------------------------------------------------------------------------------------------------

    def _choose(self, avoid: set | None = None) -> BrokerState | None:
        """Where a new call goes: the live broker with the fewest of our calls outstanding, ready ones first (ties
        rotate), none of `avoid`; None if no broker is live."""
        live = self.live
        if avoid:
            live = [b for b in live if b.name not in avoid]
        if len(live) == 1:
            return live[0]
        if not live:
            return None
        ready = [b for b in live if b.ready] or live
        self._turn += 1
        n = len(ready)
        return min((ready[(self._turn + i) % n] for i in range(n)), key=lambda b: len(b.calls))

    def _place(self, call: Call) -> bool:
        """Give `call` a broker (False: none is live; it waits for one, call.broker None)."""
        broker = self._choose()
        if broker is None:
            call.broker = None
            return False
        call.broker, call.sent = broker.name, False
        broker.calls.add(call.request_id)
        return True

    def _forget(self, call: Call) -> None:
        broker = self.brokers.get(call.broker) if call.broker is not None else None
        if broker is not None:
            broker.calls.discard(call.request_id)

    def _update_live(self) -> None:
        self.live = [b for b in self.brokers.values() if b.live]

    def on_hello(self, name: bytes, hello: protocol.BrokerHello) -> list[tuple[Call, ClusterError]]:
        """A broker said who it is (answering a probe). A new incarnation of a known one restarted: what was
        outstanding there is lost (sent again elsewhere). Calls waiting for a broker go to it. Returns calls failed
        (attempt budget spent)."""
        failed: list = []
        broker = self.brokers.get(name)
        if broker is not None and broker.incarnation != hello.incarnation and broker.live:
            failed = self.broker_lost(name)
        if broker is None:
            broker = self.brokers[name] = BrokerState(name, hello.incarnation, hello.ready)
        was_live = broker.live
        broker.incarnation, broker.ready, broker.live = hello.incarnation, hello.ready, True
        broker.label = hello.broker
        if not was_live or len(self.live) != sum(b.live for b in self.brokers.values()):
            self._update_live()
        waiting = [c for c in self.calls.values() if c.broker is None]
        for call in waiting:
            if self._place(call):
                self.resend.append(call)
        return failed

    def broker_lost(self, name: bytes) -> list[tuple[Call, ClusterError]]:
        """The broker is gone (a send found no connection, or it restarted): every call outstanding there is sent
        again to another live broker (or waits for one), its attempt count + 1. Returns the calls that had spent
        their attempt budget, with their error."""
        broker = self.brokers.get(name)
        if broker is None or not broker.live:
            return []
        broker.live = False
        self._update_live()
        lost = [self.calls[i] for i in broker.calls if i in self.calls]
        broker.calls.clear()
        failed = []
        for call in sorted(lost, key=lambda c: c.request_id):
            if isinstance(call.message, protocol.Request):
                call.message.attempt += 1
                if call.message.attempt >= self.max_attempts:
                    del self.calls[call.request_id]
                    call.broker = None
                    text = (
                        f"model '{call.model}': gave up after {call.message.attempt} attempts failed "
                        "(the brokers it was sent to were lost)"
                    )
                    failed.append((call, InferenceFailedError(text, call.model)))
                    continue
            if self._place(call):
                self.resend.append(call)
        return failed

    def take_resend(self) -> list[Call]:
        """The calls to send now (each to its call.broker), still waiting."""
        out, self.resend = self.resend, []
        return [c for c in out if c.broker is not None and self.calls.get(c.request_id) is c]

    def on_connection(self, event: int, endpoint: str) -> None:
        """The monitor's connected/disconnected view, per address."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up.add(endpoint)
        elif event == zmq.EVENT_DISCONNECTED:
            self.up.discard(endpoint)

    def peer_for(self, endpoint: str) -> bytes | None:
        """The routing id of the broker a monitor event's endpoint is the connection of (None if not one of ours).
        libzmq names a connection by the address given to connect, but after a reconnect by the address resolved
        (tcp://localhost:5555 becomes tcp://127.0.0.1:5555): then by the port, and if several share it, by host."""
        if endpoint in self.addresses:
            return endpoint.encode()
        host, _, port = endpoint.rpartition(":")
        same_port = [a for a in self.addresses if a.rpartition(":")[2] == port]
        if len(same_port) == 1:
            return same_port[0].encode()
        ip = host.rpartition("/")[2].strip("[]")
        for address in same_port:
            name = address.rpartition(":")[0].rpartition("/")[2].strip("[]")
            try:
                if ip in {info[4][0] for info in socket.getaddrinfo(name, None)}:
                    return address.encode()
            except OSError:
                continue
        return None

    def wants_news(self) -> bool:
        """A broker may have news for us (a hello: one not live or not ready yet), so read even with no call waiting."""
        live = self.live
        return len(live) < len(self.addresses) or not all(b.ready for b in live)

    def unready_due(self, now: float) -> list[bytes]:
        """Live brokers that said "not ready", to probe again (at most every UNREADY_PROBE_S): the broker tells us
        when it is ready, and this covers that word being lost."""
        if now < self._unready_probed + UNREADY_PROBE_S:
            return []
        self._unready_probed = now
        return [b.name for b in self.live if not b.ready]

    def suspect(self) -> bool:
        """Fewer connections up than brokers we believe live: one of them is gone and the socket has not said
        which yet (a disconnect is reported a moment before the ROUTER forgets the peer); check them."""
        return len(self.live) > len(self.up)

    def describe_brokers(self) -> list[dict]:
        return [b.describe() for b in self.brokers.values()]

    def on_handshake(self, event: int) -> list[tuple[Call, ClusterError]]:
        """A monitor event. A conclusive handshake failure fails every waiting call (and, until a handshake succeeds,
        every new one) with AuthenticationError; a successful one clears that."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refused = None
        why = self._handshakes.on_event(event)
        if why is None or self.live:  # another broker serves us: a failure at one address is that address's (a cut
            return []  # link, a broker restarting, one broker's wrong key), not a refusal of this client's key
        if not self.keyed:
            why += "; it runs with keys: pass key= (a key file from `cluster keys add`)"
        self.refused = AuthenticationError(f"{why} (broker {self.address})")
        return [(call, self.refused) for call in self.fail_all()]

    def infer_call(
        self, model: str, inputs: Mapping[str, Any], version, timeout, outputs, future, request_id: str | None = None
    ) -> Call:
        if not isinstance(model, str) or not model:
            raise BadRequestError("model must be a non-empty string")
        if not isinstance(inputs, Mapping) or not inputs:
            raise BadRequestError("inputs must be a non-empty mapping of name -> array or tensor")
        try:
            metas, tensors = encode_tensors(inputs)
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"inputs cannot be sent: {exc}", model) from None
        size = sum(map(len, tensors))
        if size > limits().max_message_bytes:
            limit = limits().max_message_bytes
            raise BadRequestError(f"request of {size} bytes is over the bus limit of {limit} bytes", model)
        timeout = self.timeout if timeout is None else float(timeout)
        version = None if version is None else int(version)
        if outputs is not None:
            outputs = list(outputs)
            if not all(type(name) is str for name in outputs):
                raise BadRequestError("outputs must be a list of output names (strings)", model)
        try:
            head = protocol.head_name(model, version)
        except UnicodeEncodeError:
            raise BadRequestError("model must be a valid unicode string", model) from None
        request = protocol.Request(
            next(self._ids),
            model,
            metas,
            timeout,
            version,
            outputs,
            None
            if request_id is None
            else str(request_id),  # the caller's name for it, in the broker's and agent's logs
        )
        deadline = time.monotonic() + timeout + DEADLINE_GRACE
        call = Call(request.id, request, tensors, deadline, future, model, head=head)
        self.calls[call.request_id] = call
        self._place(call)
        return call

    def query_call(self, what: protocol.What, timeout, future, **fields) -> Call:
        timeout = Timings().query_timeout if timeout is None else float(timeout)
        query = protocol.Query(next(self._ids), protocol.What(what), fields)
        call = Call(query.id, query, [], time.monotonic() + timeout, future)
        self.calls[call.request_id] = call
        self._place(call)
        return call

    @staticmethod
    def messages(frames: list) -> list[list]:
        """The messages in what the socket received ([name, preamble, ...]): itself, or a BATCH's messages, each
        with the broker's name in front (a malformed BATCH: none)."""
        if len(frames) < 2 or not protocol.is_batch(frames[1]):
            return [frames]
        try:
            return protocol.unbatch(frames, 1)
        except ProtocolError:
            return []

    def on_message(self, frames: list) -> tuple[Call | None, Any]:
        """Match a message from a broker ([name, preamble, header, tensors...]) to its call: (call, InferResult |
        query result | ClusterError). (None, None) if unknown, and for a hello (on_hello: see `resend`); a hello
        that finds calls out of attempts gives (None, [(call, error)...])."""
        try:
            cmd = protocol.parse_preamble(frames[1])
            header = protocol.unpack_header(frames[2])
        except (ProtocolError, IndexError):
            return None, None
        if cmd == Command.READY:
            try:
                hello = protocol.BrokerHello.from_wire(header)
            except ProtocolError:
                return None, None
            failed = self.on_hello(bytes(frames[0]), hello)
            return None, failed or None
        call = self.calls.pop(header.get("id"), None) if isinstance(header.get("id"), int) else None
        if call is None:
            return None, None  # a late or duplicate answer
        self._forget(call)
        if cmd == Command.ERROR:
            error = error_from_header(header)
            if error.code == ErrorCode.NO_AGENT and self._elsewhere(call):
                return None, None  # another broker may have agents for it (this one lost its own: a cut link)
            return call, error
        if "result" in header:
            return call, protocol.Answer.from_wire(header).result
        # An inference answer: read straight into InferResult (no protocol.Reply in between: one object less per
        # answer); the outputs are checked against their frames as Reply.from_wire checks them.
        try:
            outputs = read_outputs(header.get("outputs"), frames[3:])
            queue_us = header.get("queue_us")
            return call, InferResult(
                header.get("model"),
                header.get("version"),
                header.get("agent"),
                outputs,
                call.request_id,
                header.get("batch_size"),
                queue_us / 1e6 if isinstance(queue_us, (int, float)) and not isinstance(queue_us, bool) else None,
            )
        except (ProtocolError, TypeError, ValueError) as exc:  # the call is out of `calls`: it must get an outcome
            return call, ClusterError(f"malformed answer from the cluster: {exc}", call.model)

    def _elsewhere(self, call: Call) -> bool:
        """A broker answered `call` NO_AGENT: send it to a live broker that has not (no attempt counted: no agent
        ran it). False if every live broker has: the answer stands."""
        if call.no_agent_at is None:
            call.no_agent_at = set()
        if call.broker is not None:
            call.no_agent_at.add(call.broker)
        broker = self._choose(call.no_agent_at)
        if broker is None:
            return False
        self.calls[call.request_id] = call
        call.broker, call.sent = broker.name, False
        broker.calls.add(call.request_id)
        self.resend.append(call)
        return True

    def expired(self, now: float) -> list[tuple[Call, ClusterError]]:
        out = []
        for call in [c for c in self.calls.values() if c.deadline < now]:
            del self.calls[call.request_id]
            self._forget(call)
            what = f"model '{call.model}'" if call.model else "query"
            why = "no answer from the broker" if call.broker is not None else "no broker reachable"
            out.append((call, InferenceTimeoutError(f"{what}: {why} within the deadline (is it running?)", call.model)))
        return out

    def cancel(self, call: Call) -> None:
        if self.calls.pop(call.request_id, None) is not None:
            self._forget(call)

    def fail_all(self) -> list[Call]:
        """Every call still waiting, forgotten (the client closes)."""
        calls = list(self.calls.values())
        self.calls.clear()
        for broker in self.brokers.values():
            broker.calls.clear()
        return calls

    def cancel_message(self, call: Call) -> list | None:
        """The caller gave up on `call`: forget it, and the CANCEL frames that tell its broker (None if the call was
        not waiting any more, is a query, or was not sent anywhere: nothing to cancel)."""
        if self.calls.pop(call.request_id, None) is None:
            return None
        self._forget(call)
        if call.command != Command.REQUEST or call.broker is None:
            return None
        return [call.broker, *protocol.message(Command.CANCEL, protocol.Cancel(call.request_id).to_wire())]


_NUMPY = {name: np.dtype(dtype) for name, dtype in protocol.DATATYPES.items() if name != "BYTES"}


def read_outputs(metas: Any, frames: list) -> dict[str, np.ndarray]:
    """An answer's outputs: protocol.validate_tensor_metas then codec.decode_tensors, in one pass and with fewer
    lookups for the usual answer (fixed-size datatypes, all well formed). Anything else (BYTES, any fault) goes the
    careful way, which says what is wrong (ProtocolError)."""
    if type(metas) is list and len(metas) == len(frames) and len(metas) <= MAX_TENSORS:
        out: dict[str, np.ndarray] = {}
        for meta, frame in zip(metas, frames):
            if type(meta) is not dict:
                break
            name, shape, dtype = meta.get("name"), meta.get("shape"), _NUMPY.get(meta.get("datatype"))
            if dtype is None or type(name) is not str or not name or len(name) > MAX_NAME or name in out:
                break
            if type(shape) is not list or len(shape) > MAX_DIMS:
                break
            size = dtype.itemsize
            for dim in shape:
                if type(dim) is not int or not 0 <= dim < MAX_DIM:
                    break
                size *= dim
            else:
                raw = frame_bytes(frame)
                if size == len(raw):
                    out[name] = np.frombuffer(raw, dtype).reshape(shape)
                    continue
            break
        else:
            return out
    return decode_tensors(protocol.validate_tensor_metas(metas, frames, "outputs"), frames)


# Clients reconnect fast (a restarted broker is one, not hundreds of agents) and may queue many requests.
CLIENT_TIMINGS = Timings(reconnect_initial=0.1, reconnect_max=2.0)


CLIENT_EVENTS = HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED  # what the client's socket monitor reports
CHECK_INTERVAL = 0.005  # seconds between checks of the brokers while a disconnect has not been placed yet
CHECK_WINDOW = 1.0  # ... for at most this long after the disconnect
UNREADY_PROBE_S = 1.0  # a live broker that said "not ready" is asked again this often (its "ready" may be lost)


def make_router(ctx: zmq.Context, address: str, security: BusSecurity | None) -> tuple:
    """The client's socket (a ROUTER connected to every broker in `address`, a comma list) and its monitor socket
    (attached before connecting: the first handshake's outcome counts, a refused key most of all).

    Each connection's routing id is its address (CONNECT_ROUTING_ID): the monitor's events name the connection, so a
    dropped one is the lost broker at once. ROUTER_MANDATORY: a send to an address not connected raises
    EHOSTUNREACH; PROBE_ROUTER: the first connection sends the broker an empty frame, which it answers with its hello
    (the adapters probe again on every later handshake); ZMTP heartbeats: a broker that froze or vanished without a
    reset is disconnected within CLIENT_LINK_TIMEOUT_S.
    Not IMMEDIATE: with it libzmq 4.3.5 ends a dropped connection's pipe at once, also in the middle of a message
    the ROUTER already began reading (ZMQ_EVENTS, a poll), and aborts the process (`!_more`, fq.cpp:80; see
    bench/zmq_router_abort.py). Without it the pipe outlives the connection: what is sent to a broker after its
    connection dropped waits for it to come back (it is sent again elsewhere anyway)."""
    curve = security.client() if security is not None else None
    monitors = []

    def before_connect(sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.PROBE_ROUTER, 1)
        monitors.append(sock.get_monitor_socket(CLIENT_EVENTS))

    sock = make_socket(
        ctx,
        zmq.ROUTER,
        connect=[],
        hwm=100_000,
        linger=0,
        timings=CLIENT_TIMINGS,
        curve=curve,
        heartbeat=(CLIENT_LINK_HEARTBEAT_S, CLIENT_LINK_TIMEOUT_S),
        before_connect=before_connect,
    )
    for one in address_list(address):
        sock.setsockopt(zmq.CONNECT_ROUTING_ID, one.encode())
        sock.connect(one)
    return sock, monitors[0]


def resolve_all(done) -> None:
    for future, outcome in done:
        resolve(future, outcome)


def resolve(future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
