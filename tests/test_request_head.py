"""The REQUEST head (issue 23, point 1): a client's REQUEST carries what the broker routes by (id, timeout, version,
attempt, model) in a fixed binary head after its preamble, and the broker routes it by that alone, never decoding the
msgpack header it forwards (the agent reads that one). A REQUEST with the bare preamble still goes the old way.

In process: the head's layout and checks (protocol), the client's frames (ClientCore), and the broker's intake
(Broker.process_client over in-process sockets, its sends collected). The `cluster` test runs a real broker and a
real Client, with a header no broker could decode: only the head can route it."""

from __future__ import annotations

import contextlib
import math
import struct
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import protocol
from cluster.broker import Broker, Send
from cluster.client_core import ClientCore
from cluster.config import MAX_NAME, MAX_REQUEST_TIMEOUT_S, Addresses, Timings
from cluster.protocol import PREAMBLE, PREAMBLE_BYTES, ROUTE_BYTES, Command, Heartbeat, ProtocolError, pack
from cluster.role_settings import BrokerSettings
from tests.harness import wait_for

TIMINGS = Timings(heartbeat_interval=1.0, liveness=3, max_dispatch_attempts=3, request_timeout=42.0)
LAYOUT = struct.Struct(">QdIH")  # the documented layout, written here again: the wire must not drift from it
NOT_MSGPACK = b"\xc1 no broker can decode this"  # 0xc1 is never used in msgpack


def head(rid=7, timeout=2.5, version=0, attempt=0, model: bytes = b"m") -> bytes:
    """A REQUEST's first frame with a head, built by hand from the documented layout."""
    return PREAMBLE[Command.REQUEST] + LAYOUT.pack(rid, timeout, version, attempt) + model


# ---- the head: protocol ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        (7, 2.5, None, 0, "m"),
        (2**64 - 1, MAX_REQUEST_TIMEOUT_S, 2**32 - 1, protocol.MAX_ATTEMPT, "x" * MAX_NAME),
        (1, 0.001, 3, 2, "modèle-ü"),
        (5, None, None, 0, "echo"),  # no timeout: the broker's default
    ],
)
def test_a_head_round_trips_and_is_the_documented_layout(fields):
    rid, timeout, version, attempt, model = fields
    frame = protocol.request_head(rid, timeout, version, attempt, model.encode())
    assert frame == head(rid, timeout or 0.0, version or 0, attempt, model.encode())
    assert protocol.has_request_head(frame) and protocol.request_head_id(frame) == rid
    assert protocol.parse_request_head(frame) == (rid, model, version, timeout, attempt)
    assert protocol.REQUEST_HEAD.size == LAYOUT.size and protocol.REQUEST_HEAD_END == PREAMBLE_BYTES + LAYOUT.size


BAD_HEADS = {  # name -> (first frame, what the error must name)
    "truncated: preamble + 1 byte": (head()[: PREAMBLE_BYTES + 1], "too short"),
    "truncated: no model": (head(model=b""), "model"),
    "truncated: half the id": (head()[: PREAMBLE_BYTES + 4], "too short"),
    "model not utf-8": (head(model=b"\xff\xfe"), "utf-8"),
    "model cut inside a character": (head(model="é".encode()[:1]), "utf-8"),
    "model too long": (head(model=b"x" * (MAX_NAME + 1)), "model"),
    "timeout negative": (head(timeout=-1.0), "timeout"),
    "timeout NaN": (head(timeout=math.nan), "timeout"),
    "timeout infinite": (head(timeout=math.inf), "timeout"),
    "timeout too big": (head(timeout=MAX_REQUEST_TIMEOUT_S + 1), "timeout"),
    "attempt too big": (head(attempt=protocol.MAX_ATTEMPT + 1), "attempt"),
    "attempt at the uint16 limit": (head(attempt=2**16 - 1), "attempt"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADS))
def test_every_malformed_head_is_a_protocol_error_naming_the_field(case):
    frame, named = BAD_HEADS[case]
    with pytest.raises(ProtocolError, match=named):
        protocol.parse_request_head(frame)
    full = len(frame) >= protocol.REQUEST_HEAD_END
    assert protocol.request_head_id(frame) == (7 if full else None), "the id, where the head holds one"


def test_timeout_zero_means_the_brokers_default_and_the_bare_preamble_is_no_head():
    assert protocol.parse_request_head(head(timeout=0.0))[3] is None
    assert protocol.parse_request_head(head(timeout=-0.0))[3] is None
    assert not protocol.has_request_head(PREAMBLE[Command.REQUEST])
    assert not protocol.has_request_head(PREAMBLE[Command.QUERY] + b"xx")


def test_head_name_leaves_what_no_head_can_express_to_the_bare_preamble():
    assert protocol.head_name("echo", None) == b"echo" and protocol.head_name("e", 2**32 - 1) == b"e"
    assert protocol.head_name("x" * (MAX_NAME + 1), None) is None
    assert protocol.head_name("echo", 0) is None and protocol.head_name("echo", -1) is None
    assert protocol.head_name("echo", 2**32) is None
    with pytest.raises(UnicodeEncodeError):
        protocol.head_name("\ud800", None)


# ---- the client builds it -------------------------------------------------------------------------------------------


def two_broker_core() -> ClientCore:
    core = ClientCore(5.0, max_attempts=3)
    core.on_hello(b"b1", protocol.BrokerHello("b1", "aa"))
    core.on_hello(b"b2", protocol.BrokerHello("b2", "bb"))
    return core


def test_the_client_sends_every_request_with_a_head_and_a_resend_updates_timeout_and_attempt_in_both():
    core = two_broker_core()
    x = np.zeros((1, 4), np.float32)
    call = core.infer_call("echo", {"x": x}, 2, 5.0, None, None, "trace-1")
    frames = call.frames()
    header = protocol.unpack_header(frames[1])
    rid, model, version, timeout, attempt = protocol.parse_request_head(frames[0])
    assert (rid, model, version, attempt) == (call.request_id, "echo", 2, 0) and header["request_id"] == "trace-1"
    assert timeout == header["timeout"] and 0 < timeout <= 5.0
    assert bytes(frames[2]) == x.tobytes()
    call.deadline -= 1.0  # a second passes: what is left of the deadline is less
    first = call.broker
    core.broker_lost(first)  # sent again elsewhere: the attempt counts, the timeout is what is left
    assert call.broker not in (None, first)
    again = call.frames()
    header = protocol.unpack_header(again[1])
    _, _, _, timeout2, attempt2 = protocol.parse_request_head(again[0])
    assert attempt2 == header["attempt"] == 1 and timeout2 == header["timeout"] < timeout


@pytest.mark.parametrize("model, version", [("x" * (MAX_NAME + 1), None), ("echo", 0)])
def test_a_request_no_head_can_express_goes_with_the_bare_preamble(model, version):
    """The broker then answers it from its header as it always did (a name no model has: not found)."""
    core = two_broker_core()
    call = core.infer_call(model, {"x": np.zeros(2, np.float32)}, version, None, None, None)
    frames = call.frames()
    assert frames[0] == PREAMBLE[Command.REQUEST]
    assert protocol.Request.from_wire(protocol.unpack_header(frames[1])).model == model


# ---- the broker routes by it ----------------------------------------------------------------------------------------


@pytest.fixture
def broker():
    with in_process_broker("head") as broker:
        yield broker


@contextlib.contextmanager
def in_process_broker(name: str):
    """A Broker over in-process sockets, one agent serving model "m" (capacity 8), its sends collected."""
    ctx = zmq.Context()
    addresses = Addresses(
        broker_clients=f"inproc://{name}-c", broker_agents=f"inproc://{name}-a", manager_events=f"inproc://{name}-e"
    )
    broker = Broker(BrokerSettings(addresses=addresses, timings=TIMINGS), ctx)
    broker.sent = []
    broker.deliver = broker.sent.extend
    beat = Heartbeat("a1", 8, [{"name": "m", "version": 1}, {"name": "m", "version": 2}], pid=1, started=1.0)
    broker.dispatcher.agent_message(
        Command.READY, [b"a1", PREAMBLE[Command.READY], pack(beat.to_wire())], time.monotonic()
    )
    try:
        yield broker
    finally:
        broker.close()
        ctx.term()


def to_agent(sent: list[Send]) -> list:
    out = [s.frames for s in sent if s.to_agent]
    assert len(out) == 1, f"expected one REQUEST to an agent, the broker sent {sent}"
    return out[0]


def client_errors(sent: list[Send]) -> list[tuple]:
    return [
        (h["id"], h["code"], h["message"])
        for h in (protocol.unpack_header(s.frames[2]) for s in sent if not s.to_agent)
    ]


def test_a_head_request_is_routed_by_its_head_and_its_header_forwarded_undecoded(broker):
    """The header is not msgpack at all: only the head can have routed it; it reaches the agent byte for byte."""
    tensor = np.arange(4, dtype=np.float32).tobytes()
    before = time.monotonic()
    broker.process_client([b"client", head(rid=11, timeout=3.0, version=2, attempt=1), NOT_MSGPACK, tensor])
    frames = to_agent(broker.sent)
    assert frames[0] == b"a1" and frames[2] == NOT_MSGPACK and frames[3] == tensor
    assert frames[1][:PREAMBLE_BYTES] == PREAMBLE[Command.REQUEST]
    key, left, _ = protocol.parse_request_route(frames[1][PREAMBLE_BYTES:])
    request = broker.dispatcher.requests[key]
    assert (request.request_id, request.model, request.version, request.attempts) == (11, "m", 2, 2)
    assert 2.5 < left <= 3.0 and before + 2.5 < request.deadline <= time.monotonic() + 3.0
    assert broker.dispatcher.by_client[(b"client", 11)] == key, "a CANCEL with the head's id finds it"
    assert request.trace is None, "no request_id to be read from a header that is not msgpack: none, no crash"


def test_the_hot_path_never_decodes_a_header_but_a_log_line_reads_the_request_id(broker, monkeypatch):
    from cluster.broker.agents import TRACE_IN_HEADER

    core = two_broker_core()
    call = core.infer_call("m", {"x": np.zeros(2, np.float32)}, None, None, None, None, "trace-7")
    decoded = []
    real = msgpack.unpackb
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **kw: decoded.append(1) or real(*a, **kw))
    for _ in range(3):
        broker.process_client([b"client", *call.frames()])
    assert len([s for s in broker.sent if s.to_agent]) == 3 and not decoded, "a header was decoded"
    request = next(iter(broker.dispatcher.requests.values()))
    assert request._trace is TRACE_IN_HEADER, "not read while routing"
    assert request.trace == "trace-7" and len(decoded) == 1, "read when asked, once"
    assert request.trace == "trace-7" and len(decoded) == 1


def test_timeout_zero_in_a_head_is_the_brokers_default(broker):
    broker.process_client([b"client", head(timeout=0.0), NOT_MSGPACK])
    key, left, _ = protocol.parse_request_route(to_agent(broker.sent)[1][PREAMBLE_BYTES:])
    assert TIMINGS.request_timeout - 1 < left <= TIMINGS.request_timeout


def test_where_head_and_header_disagree_the_head_routes(broker):
    """A hand-made client: its header names a model no agent has; the head's model is routed (the agent then runs
    what the header says, and answers that client only)."""
    header = pack(protocol.Request(99, "not-served", [], 1.0).to_wire())
    broker.process_client([b"client", head(rid=5, model=b"m"), header])
    frames = to_agent(broker.sent)
    assert frames[0] == b"a1" and frames[2] == header


@pytest.mark.parametrize("case", sorted(BAD_HEADS))
def test_a_bad_head_gets_bad_request_naming_the_field_never_a_crash(broker, case):
    frame, named = BAD_HEADS[case]
    broker.process_client([b"client", frame, NOT_MSGPACK, b"tensor"])
    errors = client_errors(broker.sent)
    assert len(errors) == 1 and not [s for s in broker.sent if s.to_agent], broker.sent
    rid, code, message = errors[0]
    assert code == "BAD_REQUEST" and named in message, errors
    assert rid == (7 if len(frame) >= PREAMBLE_BYTES + LAYOUT.size else None), "the head's id, where it holds one"
    assert not broker.dispatcher.requests


def test_the_bare_preamble_still_goes_the_old_way(broker):
    header = pack(protocol.Request(3, "m", [], 2.0, version=1, request_id="old", attempt=1).to_wire())
    broker.process_client([b"client", PREAMBLE[Command.REQUEST], header, b"t"])
    frames = to_agent(broker.sent)
    request = next(iter(broker.dispatcher.requests.values()))
    assert frames[2] == header and (request.request_id, request.version, request.attempts) == (3, 1, 2)
    assert request.trace == "old"
    broker.sent.clear()
    broker.process_client([b"client", PREAMBLE[Command.REQUEST], NOT_MSGPACK])
    [(rid, code, message)] = client_errors(broker.sent)
    assert (rid, code) == (None, "BAD_REQUEST") and "msgpack" in message, message


@pytest.mark.parametrize("allowed", [True, False])
def test_keys_on_a_head_request_is_refused_or_allowed_as_any_request(broker, allowed):
    """The allow-list is asked first (a received frame's key: none over inproc, so the key None stands for it)."""

    class Allow:
        roles = {None: "client"} if allowed else {}

    broker.allow = Allow()
    broker.process_client([b"client", head(rid=9), NOT_MSGPACK])
    if allowed:
        assert to_agent(broker.sent)[2] == NOT_MSGPACK
    else:
        assert [(rid, code) for rid, code, _ in client_errors(broker.sent)] == [(9, "UNAUTHENTICATED")]
        assert not broker.dispatcher.requests
    broker.sent.clear()
    broker.process_client([b"client", head(rid=9, attempt=5000), NOT_MSGPACK])  # refused before it is judged
    assert client_errors(broker.sent)[0][1] == ("BAD_REQUEST" if allowed else "UNAUTHENTICATED")


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    after=st.binary(max_size=64) | st.builds(lambda rest: LAYOUT.pack(1, 1.0, 0, 0)[:-2] + rest, st.binary(max_size=8)),
    header=st.binary(max_size=16),
    tensors=st.lists(st.binary(max_size=8), max_size=2),
)
def test_random_heads_are_routed_or_refused_never_a_crash(after, header, tensors):
    """Anything after a REQUEST's preamble: routed (a valid head) or BAD_REQUEST, one answer, never an exception."""
    with in_process_broker("fuzz") as broker:
        broker.process_client([b"client", PREAMBLE[Command.REQUEST] + after, header, *tensors])
        if not after:
            return  # the bare preamble: the old way (its header judged)
        try:
            protocol.parse_request_head(PREAMBLE[Command.REQUEST] + after)
        except ProtocolError:
            assert [e[1] for e in client_errors(broker.sent)] == ["BAD_REQUEST"], broker.sent
            return
        queued = broker.dispatcher.pending_count  # (a model no agent serves waits in the warm-up window)
        assert len(broker.sent) + queued == 1 and (queued or broker.sent[0].to_agent), broker.sent


# ---- real processes -------------------------------------------------------------------------------------------------


class FakeAgent:
    """A DEALER registered at the broker as agent "fake" serving echo v1, answering in the test's thread: each REQUEST
    (alone, or in a BATCH) gets a REPLY with the id found in its header (msgpack, or NOT_MSGPACK + the id), its tensor
    echoed."""

    def __init__(self, ctx, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"fake/0123456789abcdef")
        self.sock.connect(address)
        self.beat = {"agent": "fake", "capacity": 64, "models": [{"name": "echo", "version": 1}]}
        self.sock.send_multipart(protocol.message(Command.READY, dict(self.beat, metadata=[])))
        self.next_beat = 0.0
        self.headers: list[bytes] = []

    def serve(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if time.monotonic() >= self.next_beat:
                self.next_beat = time.monotonic() + 0.2
                self.sock.send_multipart(protocol.message(Command.HEARTBEAT, self.beat))
            if not self.sock.poll(20):
                continue
            received = self.sock.recv_multipart()
            batched = received[0][:PREAMBLE_BYTES] == PREAMBLE[Command.BATCH]  # several under load
            for frames in protocol.unbatch(received) if batched else [received]:
                self.handle(frames)

    def handle(self, frames: list) -> None:
        cmd, route = protocol.parse_routed(frames[0])
        if cmd == Command.DISCONNECT:
            self.sock.send_multipart(protocol.message(Command.READY, dict(self.beat, metadata=[])))
        if cmd != Command.REQUEST:
            return
        key = route[:ROUTE_BYTES]
        self.headers.append(frames[1])
        if frames[1].startswith(NOT_MSGPACK):
            rid = int(frames[1][len(NOT_MSGPACK) :])
        else:
            rid = protocol.unpack_header(frames[1])["id"]
        meta = {"name": "x", "datatype": "FP32", "shape": [1, len(frames[2]) // 4]}
        reply = {"id": rid, "model": "echo", "version": 1, "agent": "fake", "outputs": [meta]}
        self.sock.send_multipart(protocol.routed(Command.REPLY, key, reply, frames[2:]))


def serve_until_done(agent: FakeAgent, futures: list, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        agent.serve(0.05)


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_real_broker_routes_a_real_clients_requests_by_their_head(echo_cluster, monkeypatch):
    """A real broker process and a real Client, whose header frame is replaced by bytes that are not msgpack (the id
    after them, for the fake agent to answer with): every request still reaches the agent, its header as sent, and
    every answer comes back. The same Client's ordinary requests too."""
    from cluster import client_core

    cluster = echo_cluster
    cluster.start_manager()
    cluster.start_broker()
    client = cluster.client(timeout=30)
    ctx = zmq.Context()
    agent = FakeAgent(ctx, cluster.addresses.broker_agents)
    try:
        wait_for(lambda: agent.serve(0.1) or "fake" in cluster.agent_ids(client), 20, "the fake agent to register")
        plain = [client.submit("echo", {"x": np.full((1, 4), i, np.float32)}) for i in range(5)]
        serve_until_done(agent, plain)  # (sent: their frames were built before the patch below)
        frames = client_core.Call.frames

        def undecodable(call):
            out = frames(call)
            out[1] = NOT_MSGPACK + str(call.request_id).encode()
            return out

        monkeypatch.setattr(client_core.Call, "frames", undecodable)
        odd = [client.submit("echo", {"x": np.full((1, 4), 10 + i, np.float32)}) for i in range(5)]
        serve_until_done(agent, odd)
        unanswered = [i for i, f in enumerate(plain + odd) if not f.done()]
        assert not unanswered, f"requests {unanswered} (5+: header not msgpack) never answered: not routed by the head"
        results = [f.result(timeout=1).as_numpy("x")[0, 0] for f in plain + odd]
        assert results == [float(i) for i in range(5)] + [10.0 + i for i in range(5)]
        assert sum(h.startswith(NOT_MSGPACK) for h in agent.headers) == 5, "forwarded as the client sent them"
    finally:
        agent.sock.close()
        ctx.term()


def test_a_clients_batch_is_handled_message_by_message(broker):
    """An AsyncClient sends the requests of one loop step as one BATCH: each is routed by its head as if it came
    alone (a bad one answered BAD_REQUEST in its place), and a BATCH malformed as a whole gets BAD_REQUEST."""
    good = [[head(rid=i), NOT_MSGPACK, b"t"] for i in (1, 2)]
    bad = [head(rid=3, model=b""), NOT_MSGPACK]
    broker.process_client([b"client", *protocol.batch([good[0], bad, good[1]])])
    assert [s.frames[2] for s in broker.sent if s.to_agent] == [NOT_MSGPACK, NOT_MSGPACK]
    assert sorted(r.request_id for r in broker.dispatcher.requests.values()) == [1, 2]
    [(rid, code, _)] = client_errors(broker.sent)
    assert (rid, code) == (3, "BAD_REQUEST")
    broker.sent.clear()
    broker.process_client([b"client", PREAMBLE[Command.BATCH] + b"\x00\x09", head(rid=4), NOT_MSGPACK])
    [(rid, code, message)] = client_errors(broker.sent)
    assert (rid, code) == (None, "BAD_REQUEST") and "BATCH" in message, message
