"""Agents with several brokers, in-process: the capacity share each broker is told (links.py), and the broker's side of
ERROR BUSY (an agent past its real capacity because its share shrank): the request goes back to the head of its
queue without counting an attempt, never reaches the client, and the agent gets nothing more until its next beat."""

from __future__ import annotations

import zmq

from cluster.agent.links import BrokerLinks, capacity_share, share_of
from cluster.config import Timings
from cluster.protocol import ErrorCode
from tests.test_broker_logic import answer, client_errors, dispatcher, heartbeat, ready, request, sent_to_agents

# ---- the capacity shares (agent) ------------------------------------------------------------------------------------


def test_a_capacity_is_split_evenly_the_first_links_get_the_rest_and_no_share_is_zero():
    assert [share_of(4, i, 2) for i in range(2)] == [2, 2]
    assert [share_of(5, i, 2) for i in range(2)] == [3, 2]
    assert [share_of(7, i, 3) for i in range(3)] == [3, 2, 2]
    assert [share_of(1, i, 2) for i in range(2)] == [1, 1], "a share of 0 becomes 1 (over-committed: BUSY protects)"
    assert capacity_share(4, {"m": 4, "n": 3}, 1, 2) == (2, {"m": 2, "n": 1})
    assert capacity_share(4, {"m": 4}, 0, 1) == (4, {"m": 4}), "one broker: the whole capacity"


def links(addresses: str) -> BrokerLinks:
    """The agent's links, not opened (no socket): their `connected` is set by hand."""
    return BrokerLinks(zmq.Context.instance(), addresses, b"a1/secret", "a1", Timings(), lambda link: [])


def test_the_connected_links_share_the_capacity_in_address_order_and_a_change_is_noticed_once():
    agent = links("tcp://b2:5556, tcp://b1:5556")
    b1, b2 = agent.links
    assert (b1.address, b2.address) == ("tcp://b1:5556", "tcp://b2:5556"), "links are kept in address order"
    assert agent.changed() is False, "nothing connected yet: nothing to tell"
    b2.connected = True
    assert agent.changed() is True and agent.changed() is False
    assert agent.share(b2, 5, {"m": 5}) == (5, {"m": 5}), "the only connected broker gets the whole capacity"
    assert agent.share(b1, 5, {"m": 5}) == (3, {"m": 3}), "a link saying READY counts itself in"
    b1.connected = True
    assert agent.changed() is True
    assert [agent.share(link, 5, {"m": 5}) for link in (b1, b2)] == [(3, {"m": 3}), (2, {"m": 2})]
    beat = {"agent": "a1", "capacity": 5, "model_capacity": {"m": 5}}
    assert agent.status(b2, beat) == {"agent": "a1", "capacity": 2, "model_capacity": {"m": 2}}
    b1.silent = True  # not heard for an expiry (frozen): its share goes to b2
    assert agent.changed() is True and agent.share(b2, 5, {}) == (5, {})
    b1.silent = False
    assert agent.changed() is True and agent.share(b2, 5, {}) == (2, {})
    b1.refused_since = 1.0  # it refuses our id: it does not share
    assert agent.changed() is True and agent.status(b2, beat) is beat, "alone again: the whole beat, as is"
    assert not agent.refused(), "one broker refusing is not every broker"
    b2.refused_since = 1.0
    assert agent.refused()


# ---- BUSY (broker) ------------------------------------------------------------------------------------------------


def test_busy_puts_the_request_back_at_the_head_without_an_attempt_and_the_agent_is_full_until_its_next_beat():
    d = dispatcher()
    ready(d, "a1", capacity=2)
    routes = [route for rid in range(2) for _, route in sent_to_agents(request(d, rid))]
    assert request(d, 2) == [], "a1 full: request 2 waits"
    out = answer(d, "a1", routes[1], code=ErrorCode.BUSY)
    assert out == [] and client_errors(out) == [], "BUSY never reaches the client"
    busy = d.requests[routes[1]]
    assert list(d.pending["m"])[0] is busy and d.pending_count == 2, "back at the head, before request 2"
    assert busy.attempts == 0 and busy.agent is None and d.stats["busy"] == 1
    out = answer(d, "a1", routes[0])
    assert sent_to_agents(out) == [] and [s.frames[0] for s in out] == [b"client"], "a1 is full until it beats"
    out = heartbeat(d, "a1", T_BEAT, capacity=1)
    assert sent_to_agents(out) == [("a1", routes[1])], "its beat: the head of the queue goes first"
    assert busy.attempts == 1 and d.pending_count == 1


def test_busy_sends_the_request_to_another_agent_with_room_at_once():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    ready(d, "a2", capacity=1)
    ((agent, route),) = sent_to_agents(request(d, 0))
    other = "a2" if agent == "a1" else "a1"
    assert sent_to_agents(answer(d, agent, route, code=ErrorCode.BUSY)) == [(other, route)]
    assert d.requests[route].attempts == 1


def test_busy_as_often_as_it_takes_never_uses_up_the_attempt_budget():
    d = dispatcher(max_dispatch_attempts=2)
    ready(d, "a1", capacity=1)
    ((_, route),) = sent_to_agents(request(d, 0))
    for n in range(5):  # more BUSYs than attempts allowed
        assert answer(d, "a1", route, code=ErrorCode.BUSY) == []
        assert sent_to_agents(heartbeat(d, "a1", T_BEAT + n)) == [("a1", route)]
    assert d.requests[route].attempts == 1 and d.stats["busy"] == 5 and d.stats["redispatched"] == 0
    out = answer(d, "a1", route)
    assert [s.frames[0] for s in out] == [b"client"] and client_errors(out) == []


def test_busy_for_a_request_already_given_up_frees_the_slot_and_sends_nothing():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    ((_, route),) = sent_to_agents(request(d, 0, timeout=1.0))
    assert [e[1] for e in client_errors(d.tick(T_BEAT))] == ["TIMEOUT"]
    assert answer(d, "a1", route, code=ErrorCode.BUSY, now=T_BEAT) == []
    assert d.agents.get_by_id("a1").in_flight_count == 0 and d.stats["busy"] == 1


T_BEAT = 12.0  # a time after the requests (sent at T = 10), before anyone's expiry


# ---- BUSY (agent) ---------------------------------------------------------------------------------------------------


def test_the_agent_answers_busy_past_its_capacity_on_the_requests_link_and_beats_once_it_has_room(share, tmp_path):
    """An agent of capacity 1 (its workers not started: what it takes, it holds): a second request is answered ERROR
    BUSY at once, on the link it came from, with its route; when the first is answered, it beats at once (the broker
    that heard BUSY sends it nothing until then)."""
    import numpy as np

    from cluster import protocol
    from cluster.agent.agent import Agent
    from cluster.codec import encode_tensors
    from cluster.protocol import PREAMBLE, Command, ErrorCode, pack
    from cluster.role_settings import AgentSettings

    ctx = zmq.Context.instance()
    agent = Agent(AgentSettings(share=str(share), agent_id="a1", torch_threads=0, capacity=1, models="echo"))
    agent.load_models()
    agent.status()  # what a beat announces is what the agent holds at most
    link = agent.links.first
    link.sock, broker = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    broker.bind(f"inproc://busy-{id(agent)}")
    link.sock.connect(f"inproc://busy-{id(agent)}")
    link.connected, link.monitor = True, ctx.socket(zmq.PAIR)  # (a monitor that never says anything)
    agent.results, workers = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    agent.results.bind(f"inproc://busy-results-{id(agent)}")
    workers.connect(f"inproc://busy-results-{id(agent)}")
    agent.beats = ctx.socket(zmq.PUB)
    try:
        metas, tensors = encode_tensors({"x": np.zeros((1, 2), np.float32)})
        header = pack(protocol.Request(7, "echo", metas, 30.0).to_wire())
        incarnation = b"i" * protocol.INCARNATION_BYTES
        routes = [incarnation + n.to_bytes(protocol.ROUTE_BYTES - protocol.INCARNATION_BYTES, "big") for n in (1, 2)]
        for route in routes:
            route_frame = protocol.request_route(route, 30.0, 0.0)
            agent.accept_request([PREAMBLE[Command.REQUEST] + route_frame, header, *tensors], route_frame, link)
        link.flush()  # (the end of the loop's pass: its answers go)
        assert agent.in_flight == 1 and agent.model_held == {"echo": 1}, "the first is held, the second is not"
        assert broker.poll(2000), "no answer to the second request"
        busy = broker.recv_multipart()
        assert busy[0] == PREAMBLE[Command.ERROR] + routes[1], "BUSY carries the request's route"
        assert protocol.unpack_header(busy[1])["code"] == ErrorCode.BUSY.value
        assert agent.status().jobs["echo"]["busy"] == 1 and agent.owed_beat == "echo"
        link.broker_is(incarnation)
        workers.send_multipart([PREAMBLE[Command.REPLY] + routes[0], pack({"id": 7})])
        assert agent.results.poll(2000)
        agent.forward_results()  # the answer goes out, and a beat right after it: there is room again
        sent = [broker.recv_multipart() for _ in range(2) if broker.poll(2000)]
        assert [frames[0] for frames in sent] == [PREAMBLE[Command.REPLY] + routes[0], PREAMBLE[Command.HEARTBEAT]]
        assert agent.in_flight == 0 and agent.model_held == {"echo": 0} and agent.owed_beat is None
        assert protocol.unpack_header(sent[1][1])["jobs"]["echo"]["peak_held"] == 1
    finally:
        for sock in (link.sock, link.monitor, broker, agent.results, workers, agent.beats):
            sock.close(linger=0)
        agent.pool.stop(timeout=1.0)
        agent.loader.stop(timeout=1.0)
