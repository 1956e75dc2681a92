"""Issue 23, item 2, at the broker: what one pass of its loop sends to one peer goes as one message (PeerSends: a
lone one as it is, two or more as one BATCH, in order, MAX_BATCH at most), failures handled as for single messages;
an agent's BATCH of answers is split and each handled as if it came alone."""

from __future__ import annotations

import errno

import pytest
import zmq

from cluster.broker import Broker, Send
from cluster.broker.sender import PeerSends, outgoing
from cluster.config import Addresses
from cluster.protocol import (
    MAX_BATCH,
    PREAMBLE,
    PREAMBLE_BYTES,
    ROUTE_BYTES,
    Command,
    Request,
    batch,
    pack,
    unbatch,
    unpack_header,
)
from cluster.role_settings import BrokerSettings
from tests.test_broker_logic import TIMINGS, beat

_REP = PREAMBLE[Command.REPLY]


def msg(peer: bytes, n: int, cmd: Command = Command.REQUEST) -> list:
    return [peer, PREAMBLE[cmd] + n.to_bytes(2, "big"), b"header-%d" % n]


class Recorder:
    """The sockets' side of PeerSends: what was sent, per call; agents in `gone` fail with EHOSTUNREACH."""

    def __init__(self, gone=()) -> None:
        self.sent: list[tuple[str, bytes, list]] = []
        self.failed: list[list] = []
        self.gone = set(gone)
        self.sends = PeerSends(self.agent, self.client, self.agent_failed)

    def agent(self, peer, messages):
        if peer in self.gone:
            raise zmq.ZMQError(errno.EHOSTUNREACH)
        self.sent.append(("agent", peer, list(messages)))

    def client(self, peer, messages):
        self.sent.append(("client", peer, list(messages)))

    def agent_failed(self, unsent, exc):
        self.failed.append(list(unsent))
        assert exc.errno == errno.EHOSTUNREACH
        self.sends.send([Send(True, [b"b", *m[1:]]) for m in unsent])  # the dispatcher's answer: another agent


def test_a_pass_sends_one_message_per_peer_in_order_and_a_lone_one_as_it_is():
    r = Recorder()
    r.sends.collecting = True
    out = [msg(b"a", 1), msg(b"c", 2, Command.REPLY), msg(b"a", 3), msg(b"b", 4), msg(b"a", 5)]
    r.sends.send([Send(m[0] != b"c", m) for m in out])
    assert r.sent == [], "nothing goes before the end of the pass"
    r.sends.flush()
    assert r.sent == [
        ("agent", b"a", [out[0], out[2], out[4]]),
        ("client", b"c", [out[1]]),
        ("agent", b"b", [out[3]]),
    ]
    assert r.sends.queues == {}
    assert outgoing(b"b", [out[3]]) is out[3], "a lone message goes as it is"
    frames = outgoing(b"a", [out[0], out[2], out[4]])
    assert frames[0] == b"a" and frames[1][:PREAMBLE_BYTES] == PREAMBLE[Command.BATCH]
    assert unbatch(frames, 1) == [out[0], out[2], out[4]], "a BATCH holds the messages, in order"
    assert r.sends.stats == {
        "batches_to_agents": 1,
        "batches_to_clients": 0,
        "batched_messages": 3,
        "batches_from_agents": 0,
    }


def test_outside_a_pass_messages_go_at_once_still_one_per_peer():
    r = Recorder()
    r.sends.send([Send(True, msg(b"a", 1)), Send(True, msg(b"a", 2))])
    assert r.sent == [("agent", b"a", [msg(b"a", 1), msg(b"a", 2)])]


@pytest.mark.parametrize("to_agent", [True, False])
def test_more_than_max_batch_for_a_peer_go_as_several_batches_in_order(to_agent):
    r = Recorder()
    r.sends.collecting = True
    out = [msg(b"a", n, Command.REQUEST if to_agent else Command.REPLY) for n in range(2 * MAX_BATCH + 2)]
    r.sends.send([Send(to_agent, m) for m in out])
    assert r.sent == [], "nothing goes before the end of the pass"
    r.sends.flush()
    assert [len(m) for _, _, m in r.sent] == [MAX_BATCH, MAX_BATCH, 2]
    assert [m for _, _, batch_ in r.sent for m in batch_] == out


def test_an_agent_that_fails_gets_all_its_batches_handed_back_at_once():
    r = Recorder(gone={b"a"})
    r.sends.collecting = True
    out = [msg(b"a", n) for n in range(MAX_BATCH + 6)]
    r.sends.send([Send(True, m) for m in out])
    r.sends.flush()
    assert r.failed == [out], "one hand-back with every message for that agent, in order"


def test_a_batch_that_fails_hands_every_message_back_and_the_answer_goes_in_the_same_flush():
    r = Recorder(gone={b"a"})
    r.sends.collecting = True
    out = [msg(b"a", 1), msg(b"x", 2), msg(b"a", 3), msg(b"a", 4)]
    r.sends.send([Send(True, m) for m in out])
    r.sends.flush()
    assert r.failed == [[out[0], out[2], out[3]]], "the failed agent's messages, all of them, in order"
    assert r.sent == [
        ("agent", b"x", [out[1]]),
        ("agent", b"b", [[b"b", *m[1:]] for m in (out[0], out[2], out[3])]),
    ], "what the dispatcher said instead went out in the same flush"
    assert r.sends.queues == {}


def test_flush_peer_sends_only_that_peers_messages_now():
    r = Recorder()
    r.sends.collecting = True
    r.sends.send([Send(False, msg(b"c", 1, Command.REPLY)), Send(True, msg(b"a", 2)), Send(False, msg(b"c", 3))])
    r.sends.flush_peer(False, b"c")
    assert r.sent == [("client", b"c", [msg(b"c", 1, Command.REPLY), msg(b"c", 3)])]
    r.sends.flush()
    assert r.sent[1:] == [("agent", b"a", [msg(b"a", 2)])]


# ---- the broker, over in-process sockets -------------------------------------------------------------------------


@pytest.fixture
def broker_and_agent():
    """A Broker (not running: the test drives its passes) with one agent, a DEALER, registered (model m,
    capacity 16), and a client DEALER."""
    ctx = zmq.Context()
    addresses = Addresses(
        broker_clients="inproc://b-clients", broker_agents="inproc://b-agents", manager_events="inproc://b-events"
    )
    broker = Broker(BrokerSettings(addresses=addresses, timings=TIMINGS), ctx)
    agent, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    agent.setsockopt(zmq.ROUTING_ID, b"a1")
    for sock, address in ((agent, addresses.broker_agents), (client, addresses.broker_clients)):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
    try:
        agent.send_multipart([PREAMBLE[Command.READY], pack(beat("a1", capacity=16).to_wire())])
        assert broker.agents_sock.poll(5000), "the agent's READY did not arrive"
        broker.drain_pass(broker.agents_sock, broker.process_agent, 3)
        assert broker.dispatcher.agents.get(b"a1") is not None
        yield broker, agent, client
    finally:
        agent.close()
        client.close()
        broker.close()
        ctx.term()


def test_requests_for_one_agent_in_one_pass_go_as_one_batch_and_its_batched_answers_reach_the_client(
    broker_and_agent,
):
    broker, agent, client = broker_and_agent
    n = 6
    for rid in range(n):
        client.send_multipart([PREAMBLE[Command.REQUEST], pack(Request(rid, "m", [], 30.0).to_wire()), b"t%d" % rid])
    assert broker.clients.poll(5000)
    broker.drain_pass(broker.clients, broker.process_client, 3)
    assert agent.poll(5000), "no request reached the agent"
    got = agent.recv_multipart()
    assert got[0][:PREAMBLE_BYTES] == PREAMBLE[Command.BATCH], f"{n} requests of one pass: one BATCH"
    requests = unbatch(got)
    assert [unpack_header(r[1])["id"] for r in requests] == list(range(n)), "in order"
    assert [r[2] for r in requests] == [b"t%d" % rid for rid in range(n)], "tensors forwarded as sent"
    assert not agent.poll(100), "a request went twice"
    assert broker.query_stats(None)["batches_to_agents"] == 1
    # The agent answers them all in one BATCH (and one bad message inside, dropped): the client gets them all.
    answers = [
        [_REP + r[0][PREAMBLE_BYTES : PREAMBLE_BYTES + ROUTE_BYTES], pack({"id": unpack_header(r[1])["id"]}), b"out"]
        for r in requests
    ]
    agent.send_multipart(batch([*answers, [PREAMBLE[Command.READY], pack({})]]))
    assert broker.agents_sock.poll(5000)
    broker.drain_pass(broker.agents_sock, broker.process_agent, 3)
    assert client.poll(5000), "no answer reached the client"
    got = client.recv_multipart()
    assert got[0][:PREAMBLE_BYTES] == PREAMBLE[Command.BATCH], "answers of one pass for one client: one BATCH"
    replies = unbatch(got)
    assert [unpack_header(r[1])["id"] for r in replies] == list(range(n))
    assert all(r[0] == _REP and r[2] == b"out" for r in replies)
    assert broker.dispatcher.agents.get(b"a1").in_flight_count == 0


def test_a_malformed_batch_from_an_agent_is_dropped(broker_and_agent):
    broker, agent, client = broker_and_agent
    agent.send_multipart([PREAMBLE[Command.BATCH] + b"\x00\x05", b"x", b"y"])  # counts that do not add up
    assert broker.agents_sock.poll(5000)
    broker.drain_pass(broker.agents_sock, broker.process_agent, 3)
    assert broker.dispatcher.agents.get(b"a1") is not None and not client.poll(100)


def test_a_clients_batch_stays_within_its_byte_bound_and_a_big_reply_goes_alone():
    """A client's pipe counts messages (CLIENT_SNDHWM): a BATCH holds at most client_bytes, so what a client that
    does not read costs the broker stays bounded (outbox.py)."""
    r = Recorder()
    r.sends = PeerSends(r.agent, r.client, r.agent_failed, client_bytes=1000)
    r.sends.collecting = True
    small = [[b"c", _REP, b"h", b"x" * 300] for _ in range(4)]
    big = [b"c", _REP, b"h", b"x" * 5000]
    r.sends.send([Send(False, m) for m in (*small, big, small[0])])
    r.sends.flush()
    assert [len(group) for _, _, group in r.sent] == [3, 1, 1, 1], "runs of at most 1000 bytes, the big one alone"
    assert [m for _, _, group in r.sent for m in group] == [*small, big, small[0]], "in order"
    assert r.sends.stats["batches_to_clients"] == 1
