"""The broker's side of several brokers (issue 20): it names itself (its routing id at the client's ROUTER), answers
a client's probe with READY BrokerHello (ready once past its rejoin logic, and tells the clients it said "not ready"
to when it is), and a resent request's `attempt` starts its attempt budget. In-process: the real Broker over inproc
sockets, the real client socket (make_router) and the Dispatcher."""

from __future__ import annotations

import zmq

from cluster import protocol
from cluster.broker import Broker
from cluster.client_core import make_router
from cluster.config import Addresses, Timings
from cluster.protocol import PREAMBLE, Command, Request, pack
from cluster.role_settings import BrokerSettings
from tests.test_broker_logic import client_errors, dispatcher, goodbye, ready, sent_to_agents

TIMINGS = Timings(heartbeat_interval=1.0, liveness=3, max_dispatch_attempts=3)


def recv_hello(sock: zmq.Socket) -> tuple[bytes, protocol.BrokerHello]:
    assert sock.poll(5000), "no hello from the broker"
    name, preamble, header = sock.recv_multipart()
    assert protocol.parse_preamble(preamble) == Command.READY
    return name, protocol.BrokerHello.from_wire(protocol.unpack_header(header))


def test_a_probe_gets_a_hello_with_the_brokers_name_and_incarnation_then_ready_when_it_is():
    ctx = zmq.Context()
    addresses = Addresses(
        broker_clients="inproc://h-clients", broker_agents="inproc://h-agents", manager_events="inproc://h-events"
    )
    broker = Broker(BrokerSettings(addresses=addresses, timings=TIMINGS, broker_name="b7"), ctx)
    client, monitor = make_router(ctx, addresses.broker_clients, None)
    try:
        # PROBE_ROUTER: connecting sent the broker one empty frame
        assert broker.clients.poll(5000), "the client's probe did not arrive"
        frames = broker.clients.recv_multipart(copy=False)
        assert len(frames) == 2 and len(frames[1]) == 0
        broker.process_client(frames)
        name, hello = recv_hello(client)
        peer = addresses.broker_clients.encode()
        assert name == peer and hello.broker == "b7", "the client names the connection by its address; hello: name"
        assert hello.incarnation == broker.dispatcher.incarnation.hex()
        assert not hello.ready, "just started: warming up, the manager has not said which agents to expect"
        assert list(broker.unready) == [frames[0].bytes]

        # the client addresses the broker by its address; an empty frame at any time is a probe too
        client.send_multipart([peer, b""])
        assert broker.clients.poll(5000)
        broker.process_client(broker.clients.recv_multipart(copy=False))
        assert recv_hello(client)[1].ready is False and len(broker.unready) == 1, "remembered once"

        broker.dispatcher.expect_agents([], broker.dispatcher.started + 0.1)  # the manager expects nobody back
        assert broker.dispatcher.registration.serving(broker.dispatcher.started + 0.2)
        broker.tell_ready()
        name, hello = recv_hello(client)
        assert name == peer and hello.ready and broker.unready == {}
    finally:
        client.disable_monitor()
        monitor.close(0)
        client.close(0)
        broker.close()
        ctx.term()


def test_serving_waits_for_expected_agents_or_the_warm_up():
    d = dispatcher()
    registration = d.registration
    assert not registration.serving(1.0), "warming up, no word from the manager"
    assert registration.serving(5.0), "past the warm-up window (expiry + interval)"
    d.expect_agents([ready_view("a1")], 1.0)
    assert not registration.serving(1.0) and not registration.serving(5.0), "a1 is expected back"
    ready(d, "a1", now=2.0)
    assert registration.serving(2.0), "everyone the manager named is back: ready before the warm-up ends"


def ready_view(agent: str) -> dict:
    from tests.test_broker_logic import beat

    return beat(agent).to_wire()


def test_a_resent_requests_attempt_starts_its_budget():
    d = dispatcher(max_dispatch_attempts=3)
    for agent in ("a1", "a2"):
        ready(d, agent)
    out = d.client_request(b"client", 0, "m", None, 30.0, b"header", [b"t"], 10.0, attempt=2)
    ((first, route),) = sent_to_agents(out)
    assert d.requests[route].attempts == 3, "two attempts at brokers the client lost, one here"
    failed = d.agent_message(Command.DISCONNECT, goodbye(first), 10.0)
    assert sent_to_agents(failed) == []
    assert client_errors(failed) == [
        (0, "INFERENCE_FAILED", f"model 'm': gave up after 3 agents failed (agent {first}: it said goodbye)")
    ]


def test_the_broker_passes_a_requests_attempt_to_the_dispatcher():
    ctx = zmq.Context()
    addresses = Addresses(
        broker_clients="inproc://a-clients", broker_agents="inproc://a-agents", manager_events="inproc://a-events"
    )
    broker = Broker(BrokerSettings(addresses=addresses, timings=TIMINGS), ctx)
    seen = []
    broker.dispatcher.client_request = lambda *args, **kw: seen.append(kw.get("attempt")) or []
    try:
        for attempt in (0, 2):
            header = Request(1, "m", [], 5.0, attempt=attempt).to_wire()
            broker.process_client([b"c", PREAMBLE[Command.REQUEST], pack(header)])
        assert seen == [0, 2]
        assert broker.name  # default: host:port of its clients' address
    finally:
        broker.close()
        ctx.term()
