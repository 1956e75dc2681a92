"""ClientCore's brokers (issue 20), without I/O: which broker a call goes to, what a lost broker's calls become, and
hellos. The sockets' side (probes, EHOSTUNREACH, heartbeats) is in test_brokers_cluster.py with real processes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cluster import protocol
from cluster.client_core import ClientCore
from cluster.errors import InferenceFailedError, InferenceTimeoutError
from cluster.protocol import BrokerHello, Command

X = {"x": np.ones(2, np.float32)}


def hello(core: ClientCore, name: bytes, incarnation: str = "aa", ready: bool = True):
    frames = [name, *protocol.message(Command.READY, BrokerHello(name.decode(), incarnation, ready).to_wire())]
    return core.on_message(frames)


def core_with(*names: bytes, max_attempts: int = 3) -> ClientCore:
    core = ClientCore(30.0, ",".join(f"tcp://127.0.0.1:{5000 + i}" for i in range(len(names))), False, max_attempts)
    for name in names:
        hello(core, name)
    return core


def call(core: ClientCore, timeout: float | None = None):
    return core.infer_call("echo", X, None, timeout, None, None)


def attempt_of(c) -> int:
    return protocol.unpack_header(c.wire()[2]).get("attempt", 0)


def test_new_calls_go_to_the_broker_with_fewest_outstanding():
    core = core_with(b"b1", b"b2")
    first = [call(core) for _ in range(4)]
    assert sorted(c.broker for c in first) == [b"b1", b"b1", b"b2", b"b2"]
    for c in first:  # answer those at b1: b1 now holds none, b2 two
        if c.broker == b"b1":
            core.cancel(c)
    assert [call(core).broker for _ in range(2)] == [b"b1", b"b1"]
    assert {b["name"]: b["outstanding"] for b in core.describe_brokers()} == {"b1": 2, "b2": 2}
    assert call(core).wire()[0] in (b"b1", b"b2")  # the name frame addresses the ROUTER's peer


def test_ready_brokers_are_preferred_and_a_warming_one_is_used_when_alone():
    core = core_with(b"b1")
    hello(core, b"b2", ready=False)
    assert {call(core).broker for _ in range(6)} == {b"b1"}, "a broker in its rejoin window waits for ready ones"
    core.broker_lost(b"b1")
    assert call(core).broker == b"b2", "with no ready broker, a live one still in its window takes calls"
    assert core.unready_due(100.0) == [b"b2"] and core.unready_due(100.5) == [], "asked again, at most every 1 s"
    hello(core, b"b2", ready=True)
    assert [b["ready"] for b in core.describe_brokers() if b["name"] == "b2"] == [True]
    assert core.unready_due(200.0) == []


def test_a_lost_broker_has_every_outstanding_call_resent_with_attempt_plus_one_and_the_remaining_deadline():
    core = core_with(b"b1", b"b2")
    calls = [call(core, timeout=10) for _ in range(6)]
    at_b1 = [c for c in calls if c.broker == b"b1"]
    for c in calls:
        c.sent = True
        c.deadline -= 0.05  # as if sent 50 ms ago
    assert core.broker_lost(b"b1") == []
    resend = core.take_resend()
    assert resend == at_b1 and all(c.broker == b"b2" and not c.sent for c in resend)
    for c in resend:
        header = protocol.unpack_header(c.wire()[2])
        assert header["attempt"] == 1
        assert header["timeout"] < 10 - 0.04, "the resend carries what is left of the deadline"
    assert [attempt_of(c) for c in calls if c not in at_b1] == [0, 0, 0]
    assert core.take_resend() == [], "each once"
    assert {b["name"]: (b["live"], b["outstanding"]) for b in core.describe_brokers()} == {
        "b1": (False, 0),
        "b2": (True, 6),
    }


def test_queries_are_resent_too_without_an_attempt():
    core = core_with(b"b1")
    query = core.query_call(protocol.What.AGENTS, None, None)
    hello(core, b"b2")
    core.broker_lost(b"b1")
    assert core.take_resend() == [query] and query.broker == b"b2"
    assert "attempt" not in protocol.unpack_header(query.wire()[2])


def test_a_new_incarnation_is_a_restart_and_resends_what_was_outstanding_there():
    core = core_with(b"b1")
    c = call(core)
    hello(core, b"b1", "aa")  # the same incarnation again (an answer to a check): nothing lost
    assert core.take_resend() == []
    hello(core, b"b1", "bb")
    assert core.take_resend() == [c] and c.broker == b"b1" and attempt_of(c) == 1


def test_calls_wait_for_a_hello_when_no_broker_is_live():
    core = core_with()  # nobody said hello yet
    c = call(core)
    assert c.broker is None and core.take_resend() == []
    _, failed = hello(core, b"b1")
    assert failed is None
    assert core.take_resend() == [c] and c.broker == b"b1"
    core.broker_lost(b"b1")  # lost with nowhere to go: waits again
    assert c.broker is None and core.take_resend() == [] and core.calls == {c.request_id: c}
    hello(core, b"b1", "cc")
    assert core.take_resend() == [c] and attempt_of(c) == 1


def test_a_call_waiting_for_a_broker_fails_at_its_deadline():
    core = core_with()
    c = call(core, timeout=0.01)
    [(expired, error)] = core.expired(time.monotonic() + 10)
    assert expired is c and isinstance(error, InferenceTimeoutError) and "no broker reachable" in str(error)


def test_cancel_goes_to_the_calls_broker():
    core = core_with(b"b1", b"b2")
    calls = [call(core) for _ in range(2)]
    for c in calls:
        frames = core.cancel_message(c)
        assert frames[0] == c.broker and protocol.parse_preamble(frames[1]) == Command.CANCEL
    assert all(b["outstanding"] == 0 for b in core.describe_brokers())
    empty = core_with()
    waiting = call(empty)
    assert empty.cancel_message(waiting) is None and empty.calls == {}, "a call never sent has nothing to cancel"


def test_the_attempt_budget_is_global_and_a_call_out_of_it_fails_at_the_client():
    core = core_with(b"b1", b"b2", b"b3", max_attempts=3)
    c = call(core)
    first = c.broker
    assert core.broker_lost(first) == []
    second = core.take_resend()[0].broker
    assert core.broker_lost(second) == []
    third = core.take_resend()[0].broker
    assert attempt_of(c) == 2 and len({first, second, third}) == 3
    [(failed, error)] = core.broker_lost(third)
    assert failed is c and isinstance(error, InferenceFailedError)
    assert "gave up after 3 attempts" in str(error) and core.calls == {}
    assert core.take_resend() == []


def test_answers_come_from_any_broker_and_a_duplicate_is_dropped():
    core = core_with(b"b1", b"b2")
    c = call(core)
    reply = {"id": c.request_id, "model": "echo", "version": 1, "agent": "a", "outputs": []}
    other = b"b2" if c.broker == b"b1" else b"b1"
    got, result = core.on_message([other, *protocol.message(Command.REPLY, reply)])
    assert got is c and result.agent == "a"
    assert core.on_message([c.broker, *protocol.message(Command.REPLY, reply)]) == (None, None)
    assert all(b["outstanding"] == 0 for b in core.describe_brokers())


def test_suspect_while_fewer_connections_are_up_than_live_brokers():
    import zmq

    core = core_with(b"b1", b"b2")
    for endpoint in ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"):
        core.on_connection(zmq.EVENT_HANDSHAKE_SUCCEEDED, endpoint)
    assert not core.suspect() and not core.wants_news()
    core.on_connection(zmq.EVENT_DISCONNECTED, "tcp://127.0.0.1:5001")
    assert core.suspect()
    core.broker_lost(b"b2")
    assert not core.suspect() and core.wants_news()


def test_a_broker_is_addressed_by_its_address_and_described_by_its_name():
    core = ClientCore(30.0, "tcp://127.0.0.1:5000,tcp://localhost:5001", False)
    frames = [b"tcp://localhost:5001", *protocol.message(Command.READY, BrokerHello("b2", "aa").to_wire())]
    core.on_message(frames)
    assert core.describe_brokers() == [
        {
            "name": "b2",
            "address": "tcp://localhost:5001",
            "incarnation": "aa",
            "ready": True,
            "live": True,
            "outstanding": 0,
        }
    ]
    assert call(core).wire()[0] == b"tcp://localhost:5001"


def test_a_monitor_endpoint_names_its_broker_also_after_a_reconnect_resolved_the_host():
    core = ClientCore(30.0, "tcp://127.0.0.1:5000,tcp://localhost:5001,tcp://localhost:5000", False)
    assert core.peer_for("tcp://127.0.0.1:5000") == b"tcp://127.0.0.1:5000"  # as given to connect
    assert core.peer_for("tcp://localhost:5001") == b"tcp://localhost:5001"
    assert core.peer_for("tcp://127.0.0.1:5001") == b"tcp://localhost:5001"  # resolved: the only one on its port
    assert core.peer_for("tcp://10.9.8.7:5000") is None  # two on that port, neither host is that address
    assert core.peer_for("tcp://127.0.0.1:6000") is None


@pytest.mark.parametrize("bad", ["", " , "])
def test_a_client_without_a_broker_address_is_a_clear_error(bad):
    from cluster.errors import BadRequestError

    with pytest.raises(BadRequestError, match="no broker address"):
        ClientCore.for_client(bad or ",", 1.0, False)


def no_agent(core: ClientCore, c, broker: bytes):
    header = protocol.error_header(c.request_id, protocol.ErrorCode.NO_AGENT, "no live agent serves 'echo'", "echo")
    return core.on_message([broker, *protocol.message(Command.ERROR, header)])


def test_no_agent_at_one_broker_tries_the_others_before_it_stands():
    """A broker that lost its agents (its link was cut, they have not registered again yet) answers NO_AGENT while
    the other broker has them: the call goes there (no attempt counted: no agent ran it). Only when every live
    broker says so does the caller get NoAgentAvailableError."""
    core = core_with(b"b1", b"b2")
    c = call(core)
    first = c.broker
    assert no_agent(core, c, first) == (None, None), "not the caller's answer yet"
    (again,) = core.take_resend()
    assert again is c and c.broker != first and attempt_of(c) == 0
    answered, error = no_agent(core, c, c.broker)
    assert answered is c and error.code == protocol.ErrorCode.NO_AGENT, "every broker said so: it stands"
    assert core.calls == {} and core.take_resend() == []
    single = core_with(b"b1")
    c = call(single)
    assert no_agent(single, c, b"b1")[0] is c, "with one broker, NO_AGENT is the answer at once"
