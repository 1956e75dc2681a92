"""Unit tests of the broker's logic without sockets: the Dispatcher (dispatch, capacity, queues, deadlines,
re-dispatch, version pinning, refusals, warm-up) over the AgentTable (register, heartbeat, remove, expire). Every
event is fed by hand with an explicit clock, and every test checks exactly what the broker would send. The last test
drives `Broker.deliver` over in-process sockets, for a send that fails."""

from __future__ import annotations

import errno
import random

import pytest
import zmq

from cluster.broker import Broker, Dispatcher, Send
from cluster.broker.agents import UnknownModel
from cluster.broker.routing import RoundRobin
from cluster.config import Addresses, Timings
from cluster.manager.registry import Registry
from cluster.protocol import (
    PREAMBLE,
    PREAMBLE_BYTES,
    REQUEST_ROUTE,
    ROUTE_BYTES,
    Command,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    agent_identity,
    error_header,
    pack,
    unbatch,
    unpack_header,
)
from cluster.role_settings import BrokerSettings, ManagerSettings

TIMINGS = Timings(heartbeat_interval=1.0, liveness=3, max_dispatch_attempts=3, broker_queue_limit=100)
T = 10.0  # a time past the warm-up window (expiry + interval = 4 s after the start at 0)
HEADER = b"client-header"  # stands for the client's header frame: the dispatcher must pass it on untouched
TENSOR = b"tensor-bytes"


def dispatcher(**timings) -> Dispatcher:
    t = Timings(**{**TIMINGS.__dict__, **timings})
    return Dispatcher(t, RoundRobin(), now=0.0)


def beat(agent: str, models=(("m", 1),), capacity: int = 2, pid: int = 100, **fields) -> Heartbeat:
    return Heartbeat(agent, capacity, [{"name": n, "version": v} for n, v in models], pid=pid, started=1.0, **fields)


def ready(d: Dispatcher, agent: str, now: float = T, **kw) -> list[Send]:
    return d.agent_message(
        Command.READY, [agent.encode(), PREAMBLE[Command.READY], pack(beat(agent, **kw).to_wire())], now
    )


def heartbeat(d: Dispatcher, agent: str, now: float, **kw) -> list[Send]:
    frames = [agent.encode(), PREAMBLE[Command.HEARTBEAT], pack(beat(agent, **kw).to_wire())]
    return d.agent_message(Command.HEARTBEAT, frames, now)


def goodbye(agent: str) -> list:
    return [agent.encode(), PREAMBLE[Command.DISCONNECT], pack({})]


def request(
    d: Dispatcher,
    rid: int,
    model: str = "m",
    version: int | None = None,
    timeout: float = 30.0,
    now: float = T,
    client: bytes = b"client",
) -> list[Send]:
    return d.client_request(client, rid, model, version, timeout, HEADER, [TENSOR], now)


def answer(
    d: Dispatcher, agent: str, route: bytes, now: float = T, code: ErrorCode | None = None, rid: object = "from-agent"
) -> list[Send]:
    """The agent's REPLY (or ERROR with `code`) to the request sent with `route`."""
    if code is None:
        cmd, header = Command.REPLY, pack({"id": rid})
    else:
        cmd, header = Command.ERROR, pack(error_header(rid, code, "agent says no"))
    return d.agent_message(cmd, [agent.encode(), PREAMBLE[cmd] + route, header, b"output"], now)


def sent_to_agents(out: list[Send]) -> list[tuple[str, bytes]]:
    """(agent, route key) of each REQUEST in `out` (the key the agent answers with; the route adds times)."""
    return [(s.peer.decode(), route_key(s)) for s in out if s.to_agent and s.command == Command.REQUEST]


def route_key(send: Send) -> bytes:
    """The route key a message to an agent carries after its preamble."""
    return send.frames[1][PREAMBLE_BYTES : PREAMBLE_BYTES + ROUTE_BYTES]


def client_errors(out: list[Send]) -> list[tuple[object, str, str]]:
    """(request id, code, message) of each ERROR to a client in `out`."""
    errors = []
    for s in out:
        if not s.to_agent and s.command == Command.ERROR:
            header = unpack_header(s.frames[2])
            errors.append((header["id"], header["code"], header["message"]))
    return errors


def in_flight(d: Dispatcher) -> dict[str, int]:
    return {a.agent_id: a.in_flight_count for a in d.agents.agents.values()}


# ---- dispatch, capacity, queues --------------------------------------------------------------------------------


def test_round_robin_within_capacity_and_frames_forwarded_untouched():
    d = dispatcher()
    assert ready(d, "a1") == [] and ready(d, "a2") == []
    out = [s for rid in range(4) for s in request(d, rid)]
    assert [agent for agent, _ in sent_to_agents(out)] == ["a1", "a2", "a1", "a2"]
    assert in_flight(d) == {"a1": 2, "a2": 2}
    first = out[0].frames
    assert first[1][:PREAMBLE_BYTES] == PREAMBLE[Command.REQUEST], "the route rides in the preamble frame"
    assert len(first[1]) == PREAMBLE_BYTES + REQUEST_ROUTE.size
    assert first[2] is HEADER and first[3] is TENSOR, "the client's frames must be forwarded as the same objects"
    # Everyone full: the fifth waits, nothing is sent, no agent goes over its capacity.
    assert request(d, 4) == []
    assert in_flight(d) == {"a1": 2, "a2": 2} and d.pending_count == 1
    assert d.counts() == {
        "requests": 5,
        "redispatched": 0,
        "timeouts": 0,
        "agents_lost": 0,
        "cancelled": 0,
        "shed": 0,
        "client_refused": 0,
        "client_replies_dropped": 0,
        "stalls": 0,
        "hedged": 0,
        "hedge_wins": 0,
        "busy": 0,
        "agents": 2,
        "in_flight": 5,
        "queued": 1,
    }  # in_flight counts every request not answered yet


def test_queue_drains_in_order_as_replies_free_slots():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    ((_, route0),) = sent_to_agents(request(d, 0))
    assert request(d, 1) == [] and request(d, 2) == []
    out = answer(d, "a1", route0)
    reply = [s for s in out if not s.to_agent]
    assert len(reply) == 1 and reply[0].frames[0] == b"client" and reply[0].frames[1] == PREAMBLE[Command.REPLY]
    assert reply[0].frames[2:] == [pack({"id": "from-agent"}), b"output"], "the agent's answer minus the route"
    ((agent, route1),) = sent_to_agents(out)
    assert agent == "a1" and d.requests[route1].request_id == 1, "the oldest queued request goes first"
    assert in_flight(d) == {"a1": 1} and d.pending_count == 1


def test_full_queue_answers_overloaded():
    d = dispatcher(broker_queue_limit=1)
    ready(d, "a1", capacity=1)
    request(d, 0)
    assert request(d, 1) == []
    assert client_errors(request(d, 2)) == [(2, "OVERLOADED", "model 'm': 1 requests already waiting; try again later")]
    assert d.pending_count == 1 and len(d.requests) == 2


def test_deadline_fails_requests_in_flight_and_queued_with_timeout():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    heartbeat(d, "a1", T + 2.5, capacity=1)
    ((_, route0),) = sent_to_agents(request(d, 0, timeout=3))
    request(d, 1, timeout=3)
    assert d.tick(T + 2.9) == []
    errors = client_errors(d.tick(T + 3.1))
    assert errors == [
        (0, "TIMEOUT", "model 'm': no answer within the request's deadline (on agent a1)"),
        (1, "TIMEOUT", "model 'm': no answer within the request's deadline (waiting for a free agent)"),
    ]
    assert d.stats["timeouts"] == 2 and d.requests == {}
    # The agent is still working on the first one: its slot stays taken until it answers; the late answer is dropped.
    assert in_flight(d) == {"a1": 1}
    assert answer(d, "a1", route0, T + 3.2) == [] and in_flight(d) == {"a1": 0}


# ---- agents dying: re-dispatch -----------------------------------------------------------------------------------


def test_silent_agent_expires_and_its_requests_go_to_another_agent():
    d = dispatcher()
    ready(d, "a1", now=T)
    ready(d, "a2", now=T)
    ((_, route),) = sent_to_agents(request(d, 0))  # round robin: a1
    heartbeat(d, "a2", T + 2.0)
    assert d.tick(T + 3.0) == [], "silent for exactly the expiry is still alive"
    out = d.tick(T + 3.5)
    assert sent_to_agents(out) == [("a2", route)], "same route, so a late answer from a1 still matches"
    assert set(in_flight(d)) == {"a2"} and d.stats["redispatched"] == 1 and d.stats["agents_lost"] == 1
    assert d.requests[route].attempts == 2
    assert [s.frames[1] for s in answer(d, "a2", route, T + 3.6)] == [PREAMBLE[Command.REPLY]]


def test_gives_up_after_max_attempts():
    d = dispatcher(max_dispatch_attempts=2)
    for agent in ("a1", "a2", "a3"):
        ready(d, agent)
    ((first, route),) = sent_to_agents(request(d, 0))
    ((second, again),) = sent_to_agents(d.agent_message(Command.DISCONNECT, goodbye(first), T))
    assert second != first and again == route
    out = d.agent_message(Command.DISCONNECT, goodbye(second), T)
    assert client_errors(out) == [
        (0, "INFERENCE_FAILED", f"model 'm': gave up after 2 agents failed (agent {second}: it said goodbye)")
    ]
    assert sent_to_agents(out) == [] and d.requests == {}


def test_no_other_agent_with_the_model_answers_no_agent():
    d = dispatcher()
    ready(d, "a1")
    ready(d, "a2", models=[("other", 1)])
    request(d, 0)
    out = d.agent_message(Command.DISCONNECT, goodbye("a1"), T)
    assert client_errors(out) == [
        (0, "NO_AGENT", "model 'm': its agent failed (agent a1: it said goodbye) and no other live agent serves it")
    ]


def test_redispatched_request_waits_at_the_head_of_the_queue():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    ready(d, "a2", capacity=1)
    ((_, r0),) = sent_to_agents(request(d, 0))
    ((_, r1),) = sent_to_agents(request(d, 1))
    request(d, 2)  # queued
    assert sent_to_agents(d.agent_declared_dead("a1")) == [], "a2 is full: the orphan waits"
    ((_, r2),) = sent_to_agents(answer(d, "a2", r1))
    assert r2 == r0, "the re-dispatched request goes before the one that was already waiting"


# ---- versions, refusals, unroutable requests -----------------------------------------------------------------------


def test_a_pinned_version_goes_only_to_agents_with_it():
    d = dispatcher()
    ready(d, "a1", models=[("m", 1)], capacity=10)
    ready(d, "a2", models=[("m", 1), ("m", 2)], capacity=10)
    assert {a for rid in range(4) for a, _ in sent_to_agents(request(d, rid, version=2))} == {"a2"}
    assert {a for rid in range(4) for a, _ in sent_to_agents(request(d, 10 + rid))} == {"a1", "a2"}
    assert client_errors(request(d, 99, version=3)) == [
        (99, "MODEL_NOT_FOUND", "model 'm' version 3 is not served by any live agent (other versions are)")
    ]


def test_an_agent_that_dropped_the_version_is_forgotten_for_it_and_the_request_goes_elsewhere():
    d = dispatcher()
    ready(d, "a1", models=[("m", 1), ("m", 2)])
    ready(d, "a2", models=[("m", 2)])
    ((agent, route),) = sent_to_agents(request(d, 0, version=2))
    assert agent == "a1"
    out = answer(d, "a1", route, code=ErrorCode.MODEL_NOT_FOUND)
    assert client_errors(out) == [], "the client never hears of the refusal"
    assert sent_to_agents(out) == [("a2", route)]
    assert d.agents.describe_models() == {"m": {"versions": [1, 2], "agents": ["a1", "a2"]}}
    assert d.agents.get(b"a1").models == {"m": {1}}, "a1 keeps the version it did not refuse"
    assert {a for rid in range(3) for a, _ in sent_to_agents(request(d, 1 + rid, version=2))} == {"a2"}
    # Any other error from the agent goes to the client as it is.
    ((_, route),) = sent_to_agents(request(d, 9, version=1))
    out = answer(d, "a1", route, code=ErrorCode.BAD_REQUEST)
    assert [unpack_header(s.frames[2])["code"] for s in out if not s.to_agent] == ["BAD_REQUEST"]


def test_unroutable_requests_say_no_agent_or_model_not_found():
    d = dispatcher()
    assert client_errors(request(d, 0)) == [
        (0, "NO_AGENT", "no live agent is connected, so model 'm' cannot be served")
    ]
    ready(d, "a1", models=[("x", 1)])
    assert client_errors(request(d, 1)) == [(1, "MODEL_NOT_FOUND", "model 'm' is not served by any agent")]
    ready(d, "a2", models=[("m", 1)])
    d.agent_declared_dead("a2")
    assert client_errors(request(d, 2)) == [(2, "NO_AGENT", "no live agent serves model 'm' right now")]


def test_during_warm_up_unroutable_requests_wait_for_agents_to_register():
    d = dispatcher()
    assert d.warming_up(3.9) and not d.warming_up(4.0)
    assert request(d, 0, now=1.0) == [] and request(d, 1, model="nowhere", now=1.0) == []
    assert d.tick(2.0) == [], "still warming up: nothing fails yet"
    ((agent, route),) = sent_to_agents(ready(d, "a1", now=2.5))
    assert agent == "a1" and d.requests[route].request_id == 0
    heartbeat(d, "a1", 4.0)
    assert client_errors(d.tick(4.5)) == [(1, "MODEL_NOT_FOUND", "model 'nowhere' is not served by any agent")]
    assert d.pending_count == 0


# ---- after a restart: holding requests for the agents the manager knows (expect_agents) ----------------------------


def manager_knows(d: Dispatcher, *beats: Heartbeat, now: float = 0.5) -> None:
    """Feed `d` the manager's answer to QUERY {what: agents}, as its Registry makes it from these agents' beats."""
    registry = Registry(expiry=3.0)
    for b in beats:
        registry.observe(b, now)
    assert d.expect_agents(registry.describe_agents(now), now) == []


def test_requests_for_an_expected_agent_wait_past_the_warm_up_until_it_registers():
    d = dispatcher()
    manager_knows(d, beat("a1", instance="i1"), beat("a2", models=[("n", 1)], instance="i2"))
    assert set(d.expected) == {"a1", "a2"}
    assert request(d, 0, now=5.0) == [], "after the warm-up, m waits: a1 serves it and is expected back"
    assert d.holding("m", None, 5.0) and d.holding("m", 1, 5.0) and not d.holding("m", 2, 5.0)
    assert d.tick(6.0) == [] and d.pending_count == 1
    # Nobody expected serves 'other', nor version 2 of m: those fail at once, as they would without a manager.
    assert client_errors(request(d, 1, model="other", now=6.0))[0][1] in ("NO_AGENT", "MODEL_NOT_FOUND")
    assert [e[1] for e in client_errors(request(d, 2, version=2, now=6.0))] == ["NO_AGENT"]
    ((agent, route),) = sent_to_agents(ready(d, "a1", now=6.5, instance="i1"))
    assert agent == "a1" and d.requests[route].request_id == 0 and set(d.expected) == {"a2"}
    assert client_errors(d.tick(7.0)) == [] and d.pending_count == 0


def test_held_requests_fail_once_the_expected_agent_is_declared_dead():
    d = dispatcher()
    manager_knows(d, beat("a1", instance="i1"))
    assert request(d, 0, now=5.0) == []
    d.agent_declared_dead("a1", "i0")  # another instance (an earlier process) died: a1 is still expected
    assert d.tick(5.5) == [] and set(d.expected) == {"a1"}
    d.agent_declared_dead("a1", "i1")
    assert client_errors(d.tick(5.6)) == [(0, "NO_AGENT", "no live agent is connected, so model 'm' cannot be served")]
    assert [e[1] for e in client_errors(request(d, 1, now=5.7))] == ["NO_AGENT"], "no longer held"


def test_held_requests_keep_their_deadline_and_the_rejoin_window_ends():
    d = dispatcher(rejoin_window=8.0)
    manager_knows(d, beat("a1"))
    assert request(d, 0, timeout=2.0, now=5.0) == [] and request(d, 1, timeout=30.0, now=5.0) == []
    assert [e[:2] for e in client_errors(d.tick(7.1))] == [(0, "TIMEOUT")], "held within its own deadline"
    assert d.tick(7.9) == []
    assert [e[:2] for e in client_errors(d.tick(8.0))] == [(1, "NO_AGENT")], "the rejoin window is over"
    assert d.expected == {} and d.pending_count == 0


def test_expect_agents_skips_registered_draining_and_late_answers():
    d = dispatcher()
    ready(d, "a1", now=0.2)
    manager_knows(d, beat("a1"), beat("a2", draining=True), beat("a3", models=()), now=0.5)
    assert d.expected == {}, "registered already, draining, or serving nothing: nothing to wait for"
    assert d.expect_agents([{"agent": 5}, "junk", {"id": "x"}], 0.6) == [] and d.expected == {}
    late = dispatcher(rejoin_window=3.0)
    manager_knows(late, beat("a1"), now=3.0)
    assert late.expected == {}, "an answer after the rejoin window changes nothing"


def test_a_request_whose_agent_dies_waits_for_an_expected_agent_that_serves_it():
    d = dispatcher()
    manager_knows(d, beat("a2"))
    ready(d, "a1", now=1.0)
    ((_, route),) = sent_to_agents(request(d, 0, now=5.0))
    out = d.agent_message(Command.DISCONNECT, goodbye("a1"), 5.5)
    assert client_errors(out) == [] and d.pending_count == 1, "a2 is expected back: the request waits for it"
    ((agent, new_route),) = sent_to_agents(ready(d, "a2", now=6.0))
    assert agent == "a2" and d.requests[new_route].request_id == 0


def test_broker_asks_the_manager_which_agents_to_expect_at_start():
    """Over in-process sockets, the real Manager answering the real Broker's start-up QUERY {what: agents}."""
    from cluster.desired import DesiredState
    from cluster.manager.manager import Manager

    ctx = zmq.Context()
    addresses = Addresses(
        broker_clients="inproc://r-clients",
        broker_agents="inproc://r-agents",
        manager_events="inproc://r-events",
        manager_heartbeats="inproc://r-beats",
        manager_queries="inproc://r-queries",
    )
    manager = Manager(ManagerSettings(addresses=addresses, timings=TIMINGS), ctx)
    broker = Broker(BrokerSettings(addresses=addresses, timings=TIMINGS), ctx)
    try:
        manager.registry.observe(beat("a1", instance="i1"), manager.registry.expiry)
        manager.deployments.desired = DesiredState.from_wire({"models": {"m": {"version": 1}}})  # m is deployed
        broker.ask_manager_for_agents()
        assert manager.queries.poll(5000), "the broker's QUERY did not reach the manager"
        manager.process_query(manager.queries.recv_multipart(copy=False))
        assert broker.manager.poll(5000), "the manager did not answer the broker"
        broker.process_manager_answer(broker.manager.recv_multipart(copy=False))
        assert set(broker.dispatcher.expected) == {"a1"}
        assert broker.dispatcher.holding("m", None, broker.dispatcher.started + 5)
    finally:
        broker.close()
        manager.close()
        ctx.term()


# ---- the agent table -------------------------------------------------------------------------------------------------


def test_ready_again_from_the_same_process_keeps_its_requests_but_a_restart_does_not():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    ready(d, "a2", capacity=1)
    ((_, route),) = sent_to_agents(request(d, 0))
    assert ready(d, "a1", capacity=2) == []
    entry = d.agents.get(b"a1")
    assert entry.capacity == 2 and route in entry.in_flight and d.stats["agents_lost"] == 0
    out = ready(d, "a1", pid=200, capacity=2)  # the agent restarted: its old requests are lost with the process
    assert sent_to_agents(out) == [("a2", route)]
    assert d.agents.get(b"a1") is not entry and d.agents.get(b"a1").in_flight == {}
    assert d.stats["agents_lost"] == 1 and d.stats["redispatched"] == 1


def test_heartbeats_update_what_an_agent_serves_and_feed_it_the_queue():
    d = dispatcher()
    ready(d, "a1", models=[("m", 1)], capacity=1)
    request(d, 0)
    assert request(d, 1) == [] and request(d, 2, model="n", now=T) != []  # n: not served, answered at once
    ((_, route),) = sent_to_agents(heartbeat(d, "a1", T + 1, models=[("m", 1)], capacity=2))
    assert d.requests[route].request_id == 1
    heartbeat(d, "a1", T + 2, models=[("n", 1)], capacity=2)
    assert d.agents.describe_models() == {"n": {"versions": [1], "agents": ["a1"]}}
    assert client_errors(request(d, 3)) == [(3, "NO_AGENT", "no live agent serves model 'm' right now")]


def test_unknown_agents_are_asked_to_register():
    d = dispatcher()
    out = d.agent_message(Command.HEARTBEAT, [b"ghost", PREAMBLE[Command.HEARTBEAT], pack({})], T)
    assert [(s.to_agent, s.peer, s.command) for s in out] == [(True, b"ghost", Command.DISCONNECT)]
    assert unpack_header(out[0].frames[2]) == {"reason": "unknown agent; send READY"}
    assert d.agent_message(Command.DISCONNECT, [b"ghost", PREAMBLE[Command.DISCONNECT], pack({})], T) == []
    assert ready(d, "bad", capacity=0) == [] and d.agents.get(b"bad") is None


# ---- one live agent per id (issue 11, point 4) -------------------------------------------------------------------


def ready_as(d: Dispatcher, agent: str, instance: str, now: float = T, pid: int = 100, **kw) -> list[Send]:
    """READY from the process `instance` of agent `agent`, on its own connection ("<agent>/<instance>")."""
    identity = agent_identity(agent, instance)
    header = pack(beat(agent, pid=pid, instance=instance, host="h", **kw).to_wire())
    return d.agent_message(Command.READY, [identity, PREAMBLE[Command.READY], header], now)


def refusals(out: list[Send]) -> list[tuple[bytes, str, str]]:
    """(peer, code, message) of each ERROR to an agent in `out`."""
    return [
        (s.peer, unpack_header(s.frames[2])["code"], unpack_header(s.frames[2])["message"])
        for s in out
        if s.to_agent and s.command == Command.ERROR
    ]


def test_a_second_process_with_a_live_agents_id_is_refused_and_the_first_keeps_serving():
    d = dispatcher()
    assert ready_as(d, "a1", "first", capacity=1) == []
    first = d.agents.get_by_id("a1")
    ((_, route),) = sent_to_agents(request(d, 0))
    out = ready_as(d, "a1", "second", pid=200, capacity=4)
    ((peer, code, text),) = refusals(out)
    assert peer == b"a1/second" and code == "AGENT_ID_IN_USE"
    assert "agent id 'a1' is already in use by a live agent (host h, pid 100, instance first" in text
    assert "refusing this agent (host h, pid 200, instance second)" in text and "--id" in text
    # The live one is probed (a HEARTBEAT: if its connection were gone the send would fail and drop it) ...
    assert [(s.peer, s.command) for s in out if s.command != Command.ERROR] == [(b"a1/first", Command.HEARTBEAT)]
    # ... and keeps its id, its request, its capacity; the newcomer is not routed anything.
    assert d.agents.get_by_id("a1") is first and len(d.agents) == 1 and d.agents.get(b"a1/second") is None
    assert first.capacity == 1 and route in first.in_flight and d.stats["agents_lost"] == 0
    # Its answers keep being credited to it, and the newcomer's beats are answered "send READY" (refused again).
    assert [s.frames[0] for s in answer(d, "a1/first", route)] == [b"client"]
    assert [s.command for s in heartbeat(d, "a1/second", T + 1)] == [Command.DISCONNECT]
    assert [agent for agent, _ in sent_to_agents(request(d, 1))] == ["a1/first"]


def test_a_refused_id_is_free_again_once_the_live_agent_leaves_or_expires():
    d = dispatcher()
    ready_as(d, "a1", "first")
    assert refusals(ready_as(d, "a1", "second"))
    d.agent_message(Command.DISCONNECT, [b"a1/first", PREAMBLE[Command.DISCONNECT], pack({})], T)
    assert ready_as(d, "a1", "second") == [] and d.agents.get_by_id("a1").identity == b"a1/second"
    # Expiry: a crashed predecessor (no DISCONNECT) holds its id until it is silent for one expiry.
    ready_as(d, "a2", "old", now=T)
    assert refusals(ready_as(d, "a2", "new", now=T + 2.0))
    d.agent_message(Command.HEARTBEAT, [b"a1/second", PREAMBLE[Command.HEARTBEAT], pack(beat("a1").to_wire())], T + 3.5)
    d.tick(T + 3.5)  # a2/old silent for 3.5 s > expiry 3 s
    assert d.agents.get_by_id("a2") is None
    assert ready_as(d, "a2", "new", now=T + 3.6) == [] and d.agents.get_by_id("a2").identity == b"a2/new"


def test_a_failed_probe_of_the_live_agent_lets_the_restarted_one_in_at_its_next_ready():
    """kill -9 and start again: the old connection is gone, so the probe fails (EHOSTUNREACH) and the old agent
    is removed at once (its requests re-dispatched); the newcomer's next READY (one interval later) gets in."""
    d = dispatcher()
    ready_as(d, "a1", "old", capacity=1)
    ready(d, "a2", capacity=1)
    ((agent, route),) = sent_to_agents(request(d, 0))
    assert agent == "a1/old"
    out = ready_as(d, "a1", "new")
    probe = [s.frames for s in out if s.command == Command.HEARTBEAT]
    assert probe == [[b"a1/old", PREAMBLE[Command.HEARTBEAT], d.heartbeat_header]]
    assert sent_to_agents(d.send_failed(probe, OSError(errno.EHOSTUNREACH, "Host unreachable"))) == [("a2", route)]
    assert ready_as(d, "a1", "new", now=T + 1) == [] and d.agents.get_by_id("a1").identity == b"a1/new"


def test_the_same_process_registering_again_is_not_a_duplicate():
    d = dispatcher()
    ready_as(d, "a1", "one", capacity=1)
    ((_, route),) = sent_to_agents(request(d, 0))
    entry = d.agents.get_by_id("a1")
    assert ready_as(d, "a1", "one", capacity=3, now=T + 1) == []  # it thought the broker was gone
    assert d.agents.get_by_id("a1") is entry and entry.capacity == 3 and route in entry.in_flight


def test_a_take_over_of_a_live_identity_drops_neither_silently():
    """Another process presenting a live agent's own identity (ROUTER_HANDOVER gives it the connection): the
    newcomer is refused on that connection, the first agent's requests go elsewhere (its link is gone), and the id
    is held for the first one's instance while it reconnects: a newcomer cannot take it meanwhile."""
    d = dispatcher()
    ready_as(d, "a1", "first", capacity=1)
    ready(d, "a2", capacity=1)
    ((agent, route),) = sent_to_agents(request(d, 0))
    assert agent == "a1/first"
    header = pack(beat("a1", pid=666, instance="thief", host="h").to_wire())
    out = d.agent_message(Command.READY, [b"a1/first", PREAMBLE[Command.READY], header], T)
    ((peer, code, text),) = refusals(out)
    assert peer == b"a1/first" and code == "AGENT_ID_IN_USE" and "took over" in text
    assert sent_to_agents(out) == [("a2", route)] and d.agents.get_by_id("a1") is None
    assert refusals(ready_as(d, "a1", "thief", now=T + 1))
    assert refusals(ready_as(d, "a1", "third", now=T + 1))
    assert ready_as(d, "a1", "first", now=T + 2) == [] and d.agents.get_by_id("a1").identity == b"a1/first"


def test_an_agent_dead_word_for_another_instance_leaves_the_live_one():
    d = dispatcher()
    ready_as(d, "a1", "new")
    assert d.agent_declared_dead("a1", "old") == [] and d.agents.get_by_id("a1") is not None
    d.agent_declared_dead("a1", "new")
    assert d.agents.get_by_id("a1") is None


def test_manager_registry_keeps_the_live_instance_of_an_id():
    registry = Registry(expiry=3.0)
    first = Heartbeat("a1", 4, [{"name": "m", "version": 1}], pid=1, instance="first")
    second = Heartbeat("a1", 4, [{"name": "n", "version": 1}], pid=2, instance="second")
    assert registry.observe(first, now=0.0)[0]["event"] == "agent_joined"
    assert registry.observe(second, now=1.0) == []
    assert registry.agents["a1"].beat is first and registry.describe_models() == {
        "m": {"versions": [1], "agents": ["a1"]}
    }
    registry.observe(first, now=2.0)
    assert registry.expire(now=5.5)[0] == {"event": "agent_dead", "agent": "a1", "instance": "first", "silent_for": 3.5}
    assert registry.observe(second, now=5.6)[0]["event"] == "agent_joined"  # a restart: in after one expiry


def test_manager_declaring_an_agent_dead_removes_it():
    d = dispatcher()
    ready(d, "a1")
    ready(d, "a2")
    ((_, route),) = sent_to_agents(request(d, 0))
    assert d.agent_declared_dead("nobody") == []
    assert sent_to_agents(d.agent_declared_dead("a1")) == [("a2", route)]
    assert set(in_flight(d)) == {"a2"}
    # Alive after all: its next message is answered with "send READY", and READY brings it back.
    assert [s.command for s in heartbeat(d, "a1", T + 1)] == [Command.DISCONNECT]
    ready(d, "a1", now=T + 1)
    assert set(in_flight(d)) == {"a1", "a2"}


def test_views_and_metadata():
    d = dispatcher()
    meta = {"name": "m", "version": 1, "inputs": [{"name": "x"}], "outputs": []}
    frames = [b"a1", PREAMBLE[Command.READY], pack(dict(beat("a1").to_wire(), metadata=[meta, "junk"]))]
    d.agent_message(Command.READY, frames, T)
    request(d, 0)
    (view,) = d.agents.describe_agents(T + 0.5)
    assert (view["id"], view["heartbeat_age"], view["capacity"], view["broker_in_flight"]) == ("a1", 0.5, 2, 1)
    assert d.agents.describe_model("m", None) == dict(meta, versions=[1], ready=True)
    with pytest.raises(UnknownModel, match="model 'm' version 7 is not known to the cluster"):
        d.agents.describe_model("m", 7)


# ---- sends that fail ---------------------------------------------------------------------------------------------


def test_a_failed_send_takes_the_request_back_and_removes_the_agent():
    d = dispatcher()
    ready(d, "a1")
    ready(d, "a2")
    out = request(d, 0)
    ((agent, route),) = sent_to_agents(out)
    assert agent == "a1"
    retry = d.send_failed([out[0].frames], zmq.ZMQError(errno.EHOSTUNREACH))
    assert sent_to_agents(retry) == [("a2", route)]
    assert d.agents.get(b"a1") is None and d.stats["agents_lost"] == 1
    assert d.requests[route].attempts == 1 and d.stats["redispatched"] == 0, "a send that never left is no attempt"


def test_a_failed_send_with_nowhere_else_to_go_queues_the_request():
    d = dispatcher()
    ready(d, "a1")
    out = request(d, 0)
    assert d.send_failed([out[0].frames], zmq.ZMQError(errno.EHOSTUNREACH)) == []
    assert d.pending_count == 1
    assert client_errors(d.tick(T + 0.1)) == [(0, "NO_AGENT", "no live agent serves model 'm' right now")]


def test_a_failed_heartbeat_removes_the_agent():
    d = dispatcher()
    ready(d, "a1")
    request(d, 0)
    beats = d.heartbeats()
    assert [(s.peer, s.command) for s in beats] == [(b"a1", Command.HEARTBEAT)]
    out = d.send_failed([beats[0].frames], zmq.ZMQError(errno.EHOSTUNREACH))
    ((_, code, message),) = client_errors(out)
    assert code == "NO_AGENT" and "(agent a1: heartbeat send failed (" in message
    # A DISCONNECT to an unknown agent that cannot be sent needs nothing done.
    assert d.send_failed([[b"ghost", PREAMBLE[Command.DISCONNECT], b""]], zmq.ZMQError(errno.EHOSTUNREACH)) == []


@pytest.mark.parametrize("hedge_after", [0.0, 0.03])
def test_random_events_never_overfill_an_agent_and_answer_every_request_once(hedge_after):
    rng = random.Random(8)
    d = dispatcher(broker_queue_limit=5, max_dispatch_attempts=2, hedge_after=hedge_after)
    agents = {"a1": 1, "a2": 2, "a3": 3}  # id -> capacity
    answers: dict[int, int] = {}
    now, next_id = T, 0

    def count(out):
        for s in out:
            if not s.to_agent:
                rid = unpack_header(s.frames[2])["id"]
                answers[rid] = answers.get(rid, 0) + 1

    for agent, capacity in agents.items():
        ready(d, agent, capacity=capacity)
    for _ in range(3000):
        now += 0.01
        live = [a.agent_id for a in d.agents.agents.values()]
        for agent in live:
            d.agents.get(agent.encode()).last_seen = now  # all alive unless a step below removes one
        roll = rng.random()
        if roll < 0.45:
            count(request(d, next_id, timeout=rng.choice([0.05, 5.0]), now=now))
            next_id += 1
        elif roll < 0.85 and live:
            entry = d.agents.get(rng.choice(live).encode())
            if entry.in_flight:
                route = rng.choice(list(entry.in_flight))
                code = rng.choice([None, None, None, None, ErrorCode.MODEL_NOT_FOUND])
                rid = d.requests[route].request_id if route in d.requests else "late"
                count(answer(d, entry.agent_id, route, now, code, rid))
        elif roll < 0.88 and live:
            count(d.agent_declared_dead(rng.choice(live)))
        elif roll < 0.95:
            agent = rng.choice(list(agents))
            if d.agents.get(agent.encode()) is not None and rng.random() < 0.7:
                count(heartbeat(d, agent, now, capacity=agents[agent]))  # it serves m v1 again
            else:
                count(ready(d, agent, capacity=agents[agent], pid=rng.choice([1, 2]), now=now))
        else:
            count(d.tick(now))
        for entry in d.agents.agents.values():
            assert entry.in_flight_count <= entry.capacity, f"{entry.agent_id} holds more than its capacity"
            assert sum(entry.model_in_flight.values()) == entry.in_flight_count
        assert d.pending_count == sum(len(q) for q in d.pending.values())
    count(d.tick(now + 100))  # every agent silent and every deadline past: whatever is left fails now
    assert d.requests == {}
    assert "late" not in answers, "an answer to a request already failed reached its client"
    assert set(answers) == set(range(next_id)), "some request never got an answer"
    assert max(answers.values()) == 1, "some request was answered twice"


def test_broker_deliver_hands_a_failed_send_back_to_the_dispatcher():
    """Over real in-process sockets: a1 never connected, so sends to it fail (ROUTER_MANDATORY); its requests,
    sent and still to be sent, end up at a2, and nothing is lost or sent twice."""
    ctx = zmq.Context()
    addresses = Addresses(
        broker_clients="inproc://clients", broker_agents="inproc://agents", manager_events="inproc://events"
    )
    broker = Broker(BrokerSettings(addresses=addresses, timings=TIMINGS), ctx)
    a2 = ctx.socket(zmq.DEALER)
    a2.setsockopt(zmq.ROUTING_ID, b"a2")
    a2.setsockopt(zmq.LINGER, 0)
    a2.connect(addresses.broker_agents)
    try:
        d = broker.dispatcher
        ready(d, "a1", capacity=2)
        a2.send_multipart([PREAMBLE[Command.READY], pack(beat("a2", capacity=4).to_wire())])
        assert broker.agents_sock.poll(5000), "a2's READY did not arrive"
        broker.process_agent(broker.agents_sock.recv_multipart(copy=False))
        assert set(in_flight(d)) == {"a1", "a2"}
        now = d.started + 10
        outbox = [s for rid in range(4) for s in request(d, rid, now=now)]  # a1, a2, a1, a2
        broker.deliver(outbox)
        routes = []
        while len(routes) < 4:  # (several to one agent go as one BATCH)
            assert a2.poll(5000), f"a2 got only {len(routes)} of the 4 requests"
            got = a2.recv_multipart()
            for frames in unbatch(got) if got[0][:PREAMBLE_BYTES] == PREAMBLE[Command.BATCH] else [got]:
                assert frames[0][:PREAMBLE_BYTES] == PREAMBLE[Command.REQUEST] and frames[1:] == [HEADER, TENSOR]
                routes.append(frames[0])
        assert len(set(routes)) == 4 and not a2.poll(100), "a request was sent twice"
        assert d.agents.get(b"a1") is None and in_flight(d) == {"a2": 4}
        assert all(r.attempts == 1 for r in d.requests.values()) and d.stats["redispatched"] == 0
    finally:
        a2.close()
        broker.close()
        ctx.term()


# ---- clients that do not read their replies (issue 11, point 3) ------------------------------------------------------


def test_a_client_gets_overloaded_past_its_requests_in_flight_and_when_congested():
    d = dispatcher(client_max_in_flight=2)
    ready(d, "a1", capacity=1)
    assert len(sent_to_agents(request(d, 0))) == 1 and request(d, 1) == []  # one at the agent, one queued
    ((rid, code, text),) = client_errors(request(d, 2))
    assert (rid, code) == (2, "OVERLOADED") and "this client has 2 requests in flight" in text
    assert sent_to_agents(request(d, 0, client=b"other")) == [] and d.pending_count == 2  # others are not bound
    route = next(iter(d.agents.get(b"a1").in_flight))
    answer(d, "a1", route)  # request 0 answered: client is back under its bound
    assert client_errors(request(d, 3)) == [] and d.client_load == {b"client": 2, b"other": 1}
    out = d.client_request(b"slow", 5, "m", None, 30.0, HEADER, [TENSOR], T, congested=True)
    ((_, code, text),) = client_errors(out)
    assert code == "OVERLOADED" and "not reading its replies" in text
    assert d.stats["client_refused"] == 2


def test_dropping_a_client_cancels_its_queued_and_running_requests():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    ((_, route),) = sent_to_agents(request(d, 0))
    request(d, 1)
    request(d, 2, client=b"other")
    out = d.drop_client(b"client", T)
    assert [(s.peer, s.command, route_key(s)) for s in out] == [(b"a1", Command.CANCEL, route)]
    assert d.pending_count == 1 and d.client_load == {b"other": 1} and d.stats["cancelled"] == 2


def test_client_outbox_holds_within_the_budget_and_sends_in_order_as_the_pipe_drains():
    from cluster.broker.outbox import ClientOutbox

    box = ClientOutbox(budget=100, grace=1.0)
    assert not box.congested(b"c")
    assert box.hold(b"c", [b"c", b"x" * 40], T) and box.hold(b"c", [b"c", b"y" * 40], T)
    assert not box.hold(b"c", [b"c", b"z" * 40], T) and b"c" in box.over_budget  # 123 > 100: dropped
    assert box.congested(b"c") and box.held_bytes[b"c"] == 82
    sent, room = [], [1]

    def send(frames):
        if not room[0]:
            raise zmq.Again()
        room[0] -= 1
        sent.append(frames[1][:1])

    assert box.flush(send, T) == ([], []) and sent == [b"x"] and box.held_bytes[b"c"] == 41
    room[0] = 5
    assert box.flush(send, T) == ([b"c"], []) and sent == [b"x", b"y"] and not box.congested(b"c")
    box.hold(b"gone", [b"gone", b"q"], T)

    def unreachable(frames):
        raise zmq.ZMQError(errno.EHOSTUNREACH)

    assert box.flush(unreachable, T) == ([], [b"gone"]) and box.held == {} and box.total_bytes == 0


def test_a_full_pipe_is_not_a_stall_until_the_client_takes_nothing_for_the_grace_period():
    """A reading client behind a burst fills its pipe for a moment: its requests are still served. Only a client whose
    pipe took nothing of what is held for `grace` seconds (or one past its budget) is refused."""
    from cluster.broker.outbox import ClientOutbox

    box = ClientOutbox(budget=1000, grace=1.0)
    full = [True]

    def send(frames):
        if full[0]:
            raise zmq.Again()

    assert not box.stalled(b"c", T)  # nothing held
    box.hold(b"c", [b"c", b"x"], T)
    assert box.congested(b"c") and not box.stalled(b"c", T + 0.9)  # held, but not for the grace period yet
    assert box.stalled(b"c", T + 1.0)  # its pipe took nothing for 1 s: not reading
    box.hold(b"c", [b"c", b"y"], T + 1.0)
    full[0] = False
    box.flush(send, T + 1.5)  # the pipe takes both now
    assert not box.congested(b"c") and not box.stalled(b"c", T + 10)
    # Progress resets the clock: a client that takes a reply now and then is reading, however slowly.
    box.hold(b"d", [b"d", b"1"], T)
    box.hold(b"d", [b"d", b"2"], T)
    room = [1]

    def one_at_a_time(frames):
        if not room[0]:
            raise zmq.Again()
        room[0] -= 1

    box.flush(one_at_a_time, T + 0.8)
    assert box.congested(b"d") and not box.stalled(b"d", T + 1.5) and box.stalled(b"d", T + 1.8)
    # Past its budget it is stalled at once.
    box.hold(b"e", [b"e", b"z" * 2000], T)
    assert b"e" in box.over_budget and box.stalled(b"e", T)


# ---- capacity per model, stalled agents, hedging (issue 11.5) ------------------------------------------------------


def test_capacity_per_model_and_in_all_and_an_agent_without_it_gets_one_capacity():
    d = dispatcher()
    ready(d, "a1", models=[("m", 1), ("b", 1)], capacity=5, model_capacity={"m": 2, "b": 4})
    out = [s for rid in range(3) for s in request(d, rid)]
    assert len(sent_to_agents(out)) == 2 and d.pending_count == 1, "a third 'm' waits: 2 is m's capacity here"
    out = [s for rid in range(10, 15) for s in request(d, rid, model="b")]
    assert len(sent_to_agents(out)) == 3, "b has slots of its own, within the agent's 5 in all"
    entry = d.agents.get(b"a1")
    assert entry.in_flight_count == 5 and entry.model_in_flight == {"m": 2, "b": 3}
    assert [a["stalled"] for a in d.agents.describe_agents(T)] == [False]
    # Answers free the model's own slots; the waiting 'm' goes first (it was queued before the 'b's).
    route = next(r for r, q in entry.in_flight.items() if q.model == "m")
    assert [q.request_id for q in (d.requests[r] for _, r in sent_to_agents(answer(d, "a1", route)))] == [2]
    # An agent from before model_capacity: `capacity` for every model (and in all), as before.
    d = dispatcher()
    ready(d, "old", models=[("m", 1), ("b", 1)], capacity=3)
    out = [s for rid in range(2) for s in request(d, rid)] + [
        s for rid in range(5, 7) for s in request(d, rid, model="b")
    ]
    assert len(sent_to_agents(out)) == 3 and d.agents.get(b"old").model_capacity == {}
    # A heartbeat changes it; a malformed one is refused.
    heartbeat(d, "old", T + 1, models=[("m", 1), ("b", 1)], capacity=3, model_capacity={"m": 1})
    assert d.agents.get(b"old").model_capacity == {"m": 1}
    with pytest.raises(ProtocolError, match="model_capacity"):
        Heartbeat.from_wire({"agent": "a", "capacity": 2, "models": [], "model_capacity": {"m": 0}})


def warm_service_times(d: Dispatcher, now: float, n: int = 20, seconds: float = 0.01) -> float:
    """n requests answered `seconds` after they were sent (the model's p99 becomes `seconds`); returns the clock."""
    for rid in range(1000, 1000 + n):
        ((agent, route),) = sent_to_agents(request(d, rid, now=now))
        answer(d, agent, route, now + seconds)
        now += 2 * seconds
    return now


def test_a_stalled_agent_gets_no_new_requests_until_it_answers_and_keeps_what_it_has():
    d = dispatcher()
    ready(d, "a1", capacity=8)
    ready(d, "a2", capacity=8)
    assert d.stall_threshold("m") is None, "nothing known of the model yet: no agent is judged"
    now = warm_service_times(d, T)
    assert d.stall_threshold("m") == pytest.approx(0.1), "max(4 x 10 ms, the 100 ms floor)"
    ((frozen, route),) = sent_to_agents(request(d, 1, now=now))
    other = "a2" if frozen == "a1" else "a1"
    ((_, route2),) = sent_to_agents(request(d, 2, now=now + 0.05))
    answer(d, other, route2, now + 0.06)  # the other agent keeps answering
    assert [a for a, _ in sent_to_agents(request(d, 3, now=now + 0.06))] == [frozen], "60 ms: not stalled yet"
    assert d.tick(now + 0.09) == [] and d.stats["stalls"] == 0
    # 200 ms without an answer, holding a request older than the threshold: stalled. Everything goes elsewhere.
    out = [s for rid in range(4, 8) for s in request(d, rid, now=now + 0.2)]
    assert [a for a, _ in sent_to_agents(out)] == [other] * 4
    assert d.stats["stalls"] == 1 and d.agents.get(frozen.encode()).stalled_since == now + 0.2
    assert {a["id"]: a["stalled"] for a in d.agents.describe_agents(now + 0.2)} == {frozen: True, other: False}
    # It stays alive with its requests: nothing is re-dispatched (no hedging), the tick sends nothing.
    assert d.tick(now + 0.5) == [] and d.agents.get(frozen.encode()).in_flight_count == 2
    # It answers (late: not a service time): eligible again at once.
    out = answer(d, frozen, route, now + 1.0)
    assert [s.frames[1] for s in out if not s.to_agent] == [PREAMBLE[Command.REPLY]]
    assert d.service["m"].samples[-1] < 0.1, "the 1 s answer of a stalled agent is left out of the p99"
    assert d.agents.get(frozen.encode()).stalled_since is None
    assert [a for a, _ in sent_to_agents(request(d, 8, now=now + 1.0))] == [frozen], "(the other, unanswering, is now)"


def test_an_agent_that_keeps_answering_is_not_stalled_however_old_its_oldest_request():
    d = dispatcher()
    ready(d, "a1", capacity=4)
    now = warm_service_times(d, T)
    routes = [r for rid in range(4) for _, r in sent_to_agents(request(d, rid, now=now))]
    for i, route in enumerate(routes[1:]):  # it answers every 80 ms (under the 100 ms threshold), not the oldest
        t = now + 0.08 * (i + 1)
        answer(d, "a1", route, t)
        assert len(sent_to_agents(request(d, 10 + i, now=t))) == 1, "still fed"
        assert not d.stalled(d.agents.get(b"a1"), t + 0.01)
    assert d.stats["stalls"] == 0


def test_stalls_are_judged_per_model_so_a_hung_model_does_not_take_its_agent_off_other_models():
    """Issue 18.6/18.7: an agent whose call of one model never returns is stalled for that model only; it keeps
    getting (and answering) the other models' requests, and a model it answers is never judged by another's age."""
    d = dispatcher()
    two = [("slow", 1), ("echo", 1)]
    ready(d, "a1", capacity=8, models=two)
    ready(d, "a2", capacity=8, models=two)
    now = T
    for rid in range(40):  # both models' p99 known: echo 10 ms (threshold: the 100 ms floor), slow 100 ms (400 ms)
        model, took = ("echo", 0.01) if rid % 2 else ("slow", 0.1)
        ((agent, route),) = sent_to_agents(request(d, 1000 + rid, model=model, now=now))
        answer(d, agent, route, now + took)
        now += 0.2
    assert d.stall_threshold("slow") == pytest.approx(0.4) and d.stall_threshold("echo") == pytest.approx(0.1)
    # A slow request that never returns: the round robin's next pick gets it.
    ((hung, _),) = sent_to_agents(request(d, 1, model="slow", now=now))
    other = "a2" if hung == "a1" else "a1"
    # 1 s on, the hung agent answered nothing at all (echo was idle): not stalled for echo, which it may take ...
    assert d.tick(now + 1.0) == [] and d.stats["stalls"] == 1
    out = [s for rid in range(2, 6) for s in request(d, rid, model="echo", now=now + 1.0)]
    assert sorted(a for a, _ in sent_to_agents(out)) == sorted([hung, other] * 2), "echo still goes to both"
    entry = d.agents.get(hung.encode())
    assert entry.stalled_models.keys() == {"slow"}, "stalled for the hung model, and only for it"
    # ... and answers it: echo answers do not end its stall for slow, and slow requests keep going elsewhere.
    for agent, route in sent_to_agents(out):
        answer(d, agent, route, now + 1.01)
    out = [s for rid in range(6, 10) for s in request(d, rid, model="slow", now=now + 1.1)]
    assert [a for a, _ in sent_to_agents(out)] == [other] * 4, "the hung agent gets no slow requests"
    out = [s for rid in range(10, 14) for s in request(d, rid, model="echo", now=now + 1.1)]
    assert hung in [a for a, _ in sent_to_agents(out)], "but still gets echo"
    assert d.stalled(entry, now + 1.2, "slow") and not d.stalled(entry, now + 1.2, "echo")
    views = {a["id"]: a for a in d.agents.describe_agents(now + 1.2)}
    assert views[hung]["stalled"] and views[hung]["stalled_models"] == ["slow"]
    assert views[other]["stalled_models"] == []


def test_hedging_sends_a_stuck_request_to_a_second_agent_and_the_first_answer_wins():
    d = dispatcher(hedge_after=0.2)
    ready(d, "a1", capacity=4)
    ready(d, "a2", capacity=4)
    ((first, route),) = sent_to_agents(request(d, 0))
    second = "a2" if first == "a1" else "a1"
    assert d.tick(T + 0.1) == []
    out = d.tick(T + 0.25)
    assert sent_to_agents(out) == [(second, route)], "the same route key: either answer matches"
    assert d.stats["hedged"] == 1 and d.requests[route].attempts == 2
    assert d.tick(T + 0.5) == [], "hedged once"
    out = answer(d, second, route, T + 0.6)
    assert [s.frames[1] for s in out if not s.to_agent] == [PREAMBLE[Command.REPLY]]
    assert [(s.peer, s.frames[1]) for s in out if s.to_agent] == [(first.encode(), PREAMBLE[Command.CANCEL] + route)]
    assert d.stats["hedge_wins"] == 1 and d.requests == {}
    assert in_flight(d) == {first: 1, second: 0}, "the first copy's slot stays taken until its agent answers"
    assert answer(d, first, route, T + 0.9) == [] and in_flight(d) == {first: 0, second: 0}, "late answer dropped"
    # The first copy answering first cancels the hedge instead.
    ((first, route),) = sent_to_agents(request(d, 1, now=T + 1))
    ((second, _),) = sent_to_agents(d.tick(T + 1.3))
    out = answer(d, first, route, T + 1.4)
    assert [(s.peer.decode(), s.command) for s in out if s.to_agent] == [(second, Command.CANCEL)]
    assert d.stats["hedge_wins"] == 1 and len([s for s in out if not s.to_agent]) == 1


def test_hedging_off_by_default_and_within_the_attempt_budget_and_free_slots():
    d = dispatcher()
    ready(d, "a1")
    ready(d, "a2")
    request(d, 0)
    assert d.tick(T + 2.0) == [] and d.stats["hedged"] == 0, "off by default"
    d = dispatcher(hedge_after=0.2, max_dispatch_attempts=1)
    ready(d, "a1")
    ready(d, "a2")
    request(d, 0)
    assert d.tick(T + 1.0) == [], "one attempt allowed: no second copy"
    d = dispatcher(hedge_after=0.2)
    ready(d, "a1", capacity=1)
    ready(d, "a2", capacity=1)
    ((_, r1),) = sent_to_agents(request(d, 0))
    ((a2, r2),) = sent_to_agents(request(d, 1))
    assert d.tick(T + 0.3) == [], "no agent has a free slot: nothing hedged (yet)"
    answer(d, a2, r2, T + 0.35)
    assert sent_to_agents(d.tick(T + 0.4)) == [(a2, r1)], "a slot freed: the stuck one is hedged now"


def test_a_hedged_request_survives_either_agent_dying_and_a_cancel_reaches_both():
    d = dispatcher(hedge_after=0.2)
    for agent in ("a1", "a2", "a3", "a4"):
        ready(d, agent, capacity=4)
    ((first, route),) = sent_to_agents(request(d, 0))
    ((second, _),) = sent_to_agents(d.tick(T + 0.3))
    # The first agent dies: its copy is dropped, nothing re-dispatched, the hedge carries on and answers.
    out = d.agent_message(Command.DISCONNECT, goodbye(first), T + 0.4)
    assert sent_to_agents(out) == [] and d.stats["redispatched"] == 0
    assert d.requests[route].agent.agent_id == second and d.requests[route].hedge is None
    out = answer(d, second, route, T + 0.5)
    assert [s.frames[1] for s in out if not s.to_agent] == [PREAMBLE[Command.REPLY]] and d.requests == {}
    # The hedge's agent dies instead: the first copy carries on.
    ((first, route),) = sent_to_agents(request(d, 1, now=T + 1))
    ((second, _),) = sent_to_agents(d.tick(T + 1.3))
    assert sent_to_agents(d.agent_message(Command.DISCONNECT, goodbye(second), T + 1.4)) == []
    assert d.requests[route].agent.agent_id == first and d.requests[route].hedge is None
    assert [s.frames[1] for s in answer(d, first, route, T + 1.5) if not s.to_agent] == [PREAMBLE[Command.REPLY]]
    # A cancel reaches both copies.
    ((first, route),) = sent_to_agents(request(d, 2, now=T + 2))
    ((second, _),) = sent_to_agents(d.tick(T + 2.3))
    out = d.client_cancel(b"client", 2, T + 2.4)
    assert sorted(s.peer.decode() for s in out if s.command == Command.CANCEL) == sorted([first, second])
    assert d.stats["cancelled"] == 1 and d.requests == {}


def test_a_hedge_copy_that_fails_to_send_leaves_the_first_copy_alone():
    d = dispatcher(hedge_after=0.2)
    ready(d, "a1", capacity=4)
    ready(d, "a2", capacity=4)
    ((first, route),) = sent_to_agents(request(d, 0))
    out = d.tick(T + 0.3)
    ((second, _),) = sent_to_agents(out)
    retry = d.send_failed([out[0].frames], zmq.ZMQError(errno.EHOSTUNREACH))
    assert sent_to_agents(retry) == [] and d.pending_count == 0
    request_ = d.requests[route]
    assert request_.agent.agent_id == first and request_.hedge is None and request_.attempts == 1
    assert d.agents.get(second.encode()) is None


def test_an_undeployed_model_is_not_found_where_a_model_whose_agents_died_has_no_agent():
    """The manager's desired state tells the two apart: undeploy is on purpose (MODEL_NOT_FOUND, 404 at the edge),
    losing every agent is an outage (NO_AGENT, 503); the model's metadata says the same (UnknownModel, 404)."""
    d = dispatcher()
    ready(d, "a", models=(("m", 1), ("gone", 1)), now=0.0)
    d.agent_message(Command.DISCONNECT, goodbye("a"), T)
    assert d.agents.why_unroutable("gone", None)[0] == ErrorCode.NO_AGENT  # desired state not known yet: as before
    d.agents.deployed = {"m"}  # the manager's desired state: m deployed, gone undeployed
    code, text = d.agents.why_unroutable("gone", None)
    assert code == ErrorCode.MODEL_NOT_FOUND and "not deployed" in text, text
    assert d.agents.why_unroutable("m", None)[0] == ErrorCode.NO_AGENT
    [sent] = request(d, 1, model="gone")
    assert unpack_header(sent.frames[2])["code"] == ErrorCode.MODEL_NOT_FOUND.value
    with pytest.raises(UnknownModel, match="not deployed"):
        d.agents.describe_model("gone", None)
