"""The message classes of cluster/protocol/messages.py, in-process: each round-trips through to_wire/from_wire, builds
the same header bytes as before it existed (old and new processes mix on one bus), and refuses bad fields with a
ProtocolError that names the field. The broker and the agent parse a REQUEST through the same class, so one header
gets one verdict in both."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import errors, protocol
from cluster.protocol import (
    MAX_REQUEST_ID,
    MAX_REQUEST_TIMEOUT_S,
    AgentDead,
    Answer,
    BrokerBeat,
    Cancel,
    Desired,
    Disconnect,
    Error,
    ErrorCode,
    ProtocolError,
    Query,
    Reply,
    Request,
    What,
    parse_event,
)

META = {"name": "x", "datatype": "FP32", "shape": [2]}
FRAME = np.zeros(2, np.float32).tobytes()


def wire(header: dict) -> dict:
    """Through msgpack and the receivers' decoder, as on the bus."""
    return protocol.unpack_header(protocol.pack(header))


def test_request_round_trips_and_keeps_the_old_header_bytes():
    request = Request(7, "echo", [META], 1.5, version=2, outputs=["y"], request_id="r-1")
    assert Request.from_wire(wire(request.to_wire())) == request
    # the header the client built as a dict before this class, key for key and in the same order
    old = {"id": 7, "model": "echo", "timeout": 1.5, "inputs": [META], "version": 2, "outputs": ["y"]}
    old["request_id"] = "r-1"
    assert protocol.pack(request.to_wire()) == protocol.pack(old)
    bare = Request(1, "echo", [META], 3.0)
    assert protocol.pack(bare.to_wire()) == protocol.pack({"id": 1, "model": "echo", "timeout": 3.0, "inputs": [META]})
    assert Request.from_wire(wire(bare.to_wire())) == bare


def test_request_cuts_its_request_id_and_reads_the_tensors_it_describes():
    request = Request(1, "echo", [META], 1.0, request_id="x" * 1000)
    assert Request.from_wire(wire(request.to_wire())).request_id == "x" * MAX_REQUEST_ID
    assert request.input_metas([FRAME]) == [META]
    assert request.output_names() is None
    assert Request(1, "m", [META], outputs=["y"]).output_names() == ["y"]


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ({"model": "m", "inputs": []}, "'id' must be an int or a string"),
        ({"id": True, "model": "m"}, "'id' must be an int or a string"),
        ({"id": {"a": 1}, "model": "m"}, "'id' must be an int or a string"),
        ({"id": 1}, "missing 'model'"),
        ({"id": 1, "model": 5}, "'model' has the wrong type"),
        ({"id": 1, "model": "m", "version": "2"}, "'version' has the wrong type"),
        ({"id": 1, "model": "m", "version": True}, "'version' has the wrong type"),
        ({"id": 1, "model": "m", "timeout": "soon"}, "'timeout' has the wrong type"),
        ({"id": 1, "model": "m", "timeout": 0}, "timeout must be between"),
        ({"id": 1, "model": "m", "timeout": -1.0}, "timeout must be between"),
        ({"id": 1, "model": "m", "timeout": math.nan}, "timeout must be between"),
        ({"id": 1, "model": "m", "timeout": MAX_REQUEST_TIMEOUT_S + 1}, "timeout must be between"),
    ],
)
def test_request_refuses_bad_fields_naming_them(header, says):
    with pytest.raises(ProtocolError, match=says):
        Request.from_wire(header)


def test_request_tensors_and_outputs_are_checked_where_they_are_read():
    """The broker routes without reading the tensors; the agent checks them against their frames."""
    no_inputs = Request.from_wire({"id": 1, "model": "m"})  # routable: the agent answers BAD_REQUEST
    with pytest.raises(ProtocolError, match="missing 'inputs'"):
        no_inputs.input_metas([])
    with pytest.raises(ProtocolError, match="'inputs' has the wrong type"):
        Request.from_wire({"id": 1, "model": "m", "inputs": "x"}).input_metas([])
    with pytest.raises(ProtocolError, match="needs 8 bytes, frame has 3"):
        Request(1, "m", [META]).input_metas([b"abc"])
    with pytest.raises(ProtocolError, match="1 inputs described but 0 tensor frames"):
        Request(1, "m", [META]).input_metas([])
    with pytest.raises(ProtocolError, match="'outputs' has the wrong type"):
        Request.from_wire({"id": 1, "model": "m", "outputs": "y"}).output_names()


def test_reply_round_trips_and_checks_its_outputs_against_the_frames():
    reply = Reply(3, "echo", 1, "a1", [META], batch_size=4, queue_us=120)
    assert Reply.from_wire(wire(reply.to_wire()), [FRAME]) == reply
    assert list(reply.to_wire()) == ["id", "model", "version", "agent", "outputs", "batch_size", "queue_us"]
    with pytest.raises(ProtocolError, match="0 outputs described but 1 tensor frames"):
        Reply.from_wire(wire(dict(reply.to_wire(), outputs=[])), [FRAME])
    with pytest.raises(ProtocolError, match="'outputs' must be a list"):
        Reply.from_wire({"id": 3}, [])
    assert Reply.from_wire(dict(reply.to_wire(), queue_us="soon"), [FRAME]).queue_us is None


def test_error_round_trips_and_is_read_leniently():
    error = Error(5, ErrorCode.OVERLOADED, "queue full", "echo", retry_after=0.25)
    assert Error.from_wire(wire(error.to_wire())) == error
    assert wire(protocol.error_header(5, ErrorCode.NO_AGENT, "none")) == {
        "id": 5,
        "code": "NO_AGENT",
        "message": "none",
    }
    # an answer is never refused: what a newer peer (or a broken one) says still becomes an error
    assert Error.from_wire({"id": 1, "code": "SOMETHING_NEW", "message": "x"}).code == "SOMETHING_NEW"
    odd = Error.from_wire({"code": {"a": 1}, "model": 3, "retry_after": -1})
    assert (odd.code, odd.message, odd.model, odd.retry_after) == (None, "unknown error", None, None)
    assert type(errors.error_from_header({"code": {"a": 1}})) is errors.ClusterError
    overloaded = errors.error_from_header(error.to_wire())
    assert isinstance(overloaded, errors.OverloadedError) and overloaded.retry_after == 0.25


def test_cancel_round_trips_and_refuses_a_bad_id():
    assert Cancel.from_wire(wire(Cancel(9).to_wire())) == Cancel(9)
    assert protocol.pack(Cancel(9).to_wire()) == protocol.pack({"id": 9})
    with pytest.raises(ProtocolError, match="'id'"):
        Cancel.from_wire({"id": None})


BROKER = (What.AGENTS, What.MODELS, What.MODEL, What.STATS, What.STATISTICS)


def test_query_round_trips_with_what_an_enum_on_the_wire_as_its_string():
    query = Query(4, What.MODEL, {"name": "echo", "version": None})
    assert query.to_wire() == {"id": 4, "what": "model", "name": "echo"}  # None fields are left out, as before
    assert type(msgpack.unpackb(protocol.pack(query.to_wire()))["what"]) is str
    parsed = Query.from_wire(wire(query.to_wire()), BROKER)
    assert (parsed.id, parsed.what, parsed.fields) == (4, What.MODEL, {"name": "echo"})
    assert parsed.what is What.MODEL
    anonymous = Query(None, What.AGENTS).to_wire()
    assert protocol.pack(anonymous) == protocol.pack({"what": "agents"})  # no id: none on the wire


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ({"id": 1}, "missing 'what'"),
        ({"id": 1, "what": 3}, "'what' has the wrong type"),
        ({"id": 1, "what": "everything"}, "unknown query 'everything'; ask for agents, models, model, stats"),
        ({"id": 1, "what": "deploy"}, "unknown query 'deploy'"),  # the manager's, not the broker's
    ],
)
def test_query_refuses_what_the_role_does_not_answer(header, says):
    with pytest.raises(ProtocolError, match=says):
        Query.from_wire(header, BROKER)


def test_answer_round_trips():
    assert Answer.from_wire(wire(Answer(1, {"a": [1]}).to_wire())) == Answer(1, {"a": [1]})
    assert Answer(1, [], desired={"models": {}}).to_wire() == {"id": 1, "result": [], "desired": {"models": {}}}


def test_broker_beat_and_disconnect_round_trip():
    beat = BrokerBeat(bytes(range(8)).hex())
    assert BrokerBeat.from_wire(wire(beat.to_wire())).incarnation() == bytes(range(8))
    with pytest.raises(ProtocolError, match="'broker' is not hex"):
        BrokerBeat("zz").incarnation()
    with pytest.raises(ProtocolError, match="missing 'broker'"):
        BrokerBeat.from_wire({})
    assert Disconnect.from_wire(wire(Disconnect("agent stopping").to_wire())) == Disconnect("agent stopping")


def test_events_round_trip_and_unknown_ones_are_ignored():
    dead = AgentDead("a1", "f00d", 12.5)
    assert dead.to_wire() == {"event": "agent_dead", "agent": "a1", "instance": "f00d", "silent_for": 12.5}
    assert parse_event(wire(dead.to_wire())) == dead
    desired = Desired({"generation": 3, "models": {}})
    assert parse_event(wire(desired.to_wire())) == desired
    assert parse_event({"event": "from_a_newer_manager"}) is None
    with pytest.raises(ProtocolError, match="missing 'agent'"):
        parse_event({"event": "agent_dead"})
    with pytest.raises(ProtocolError, match="missing 'event'"):
        parse_event({"agent": "a1"})


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "model", "version", "timeout", "inputs", "outputs", "request_id", "what", "event"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers())),
    )
)
def test_any_header_is_parsed_or_refused_with_a_protocol_error(header):
    """Whatever a peer sends, every class answers with a message or a ProtocolError, never another exception."""
    for parse in (
        Request.from_wire,
        Cancel.from_wire,
        BrokerBeat.from_wire,
        Disconnect.from_wire,
        parse_event,
        lambda h: Query.from_wire(h, list(What)),
        lambda h: Request.from_wire(h).input_metas([]),
        lambda h: Request.from_wire(h).output_names(),
    ):
        try:
            parse(header)
        except ProtocolError:
            pass
    Error.from_wire(header)  # lenient: never raises
    Answer.from_wire(header)


def test_each_role_answers_its_queries_from_one_table():
    """QUERY `what` is dispatched through one table per role (the agent answers none): together they answer every
    What, the broker exactly the ones its clients ask."""
    from cluster.broker.broker import Broker
    from cluster.manager.manager import Manager

    assert set(Broker.QUERIES) == set(BROKER)
    assert set(Broker.QUERIES) | set(Manager.QUERIES) == set(What)
    assert all(callable(handler) for handler in Broker.QUERIES.values())


def test_the_client_builds_what_the_broker_and_the_agent_parse():
    from cluster.broker.broker import Broker
    from cluster.client_core import ClientCore

    core = ClientCore(5.0)
    core.on_hello(b"b1", protocol.BrokerHello("b1", "aa"))  # a broker to send to
    call = core.infer_call("echo", {"x": np.zeros(2, np.float32)}, 3, None, ["y"], None, "trace-1")
    frames = call.frames()
    request = Request.from_wire(protocol.unpack_header(frames[1]))
    head = protocol.parse_request_head(frames[0])  # what the broker routes by: the header's fields, the same
    assert head == (call.request_id, "echo", 3, request.timeout, request.attempt), head
    assert (request.id, request.model, request.version, request.outputs, request.request_id) == (
        call.request_id,
        "echo",
        3,
        ["y"],
        "trace-1",
    )
    assert request.input_metas(frames[2:]) == [META] and 0 < request.timeout <= 5.0
    cancel = core.cancel_message(call)  # to the call's broker: its name, then the message
    assert cancel[0] == b"b1" and Cancel.from_wire(protocol.unpack_header(cancel[2])) == Cancel(call.request_id)
    query = core.query_call(What.MODEL, None, None, name="echo", version=None).frames()
    parsed = Query.from_wire(protocol.unpack_header(query[1]), Broker.QUERIES)
    assert (parsed.what, parsed.fields) == (What.MODEL, {"name": "echo"})
