"""Bad input on every socket of the broker, manager and agent: random and malformed frames (property-based, thousands
of cases), truncated messages, unknown commands, wrong dtype or shape, oversize messages. Nothing crashes, memory
stays flat, and a normal request right after gets the right answer."""

from __future__ import annotations

import msgpack
import numpy as np
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import BadRequestError, protocol
from cluster.demo_models import digits_split
from cluster.protocol import PREAMBLE, Command
from tests.harness import wait_for

pytestmark = pytest.mark.cluster

EXAMPLES = 1500  # per socket

KEYS = st.sampled_from(
    [
        "id",
        "model",
        "version",
        "timeout",
        "inputs",
        "outputs",
        "what",
        "agent",
        "capacity",
        "models",
        "name",
        "datatype",
        "shape",
        "event",
        "code",
        "message",
        "metadata",
        "draining",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["FP32", "INT64", "digits", "echo", "agents", "models"])
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)
HEADERS = st.dictionaries(KEYS, VALUES, max_size=8).map(lambda h: msgpack.packb(h, use_bin_type=True))
PREAMBLES = (
    st.sampled_from(list(PREAMBLE.values()))
    | st.binary(max_size=8)
    | st.sampled_from([b"MSB1\x09", b"MSB2\x02", b"MSB"])
)
ROUTES = st.binary(min_size=8, max_size=8) | st.binary(max_size=12)
RANDOM = st.lists(st.binary(max_size=64), min_size=1, max_size=6)
STRUCTURED = st.tuples(
    PREAMBLES, st.lists(ROUTES, max_size=1), HEADERS, st.lists(st.binary(max_size=48), max_size=3)
).map(lambda t: [t[0], *t[1], t[2], *t[3]])
MESSAGES = RANDOM | STRUCTURED


def fuzz(send, examples: int = EXAMPLES) -> None:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(MESSAGES)
    def run(frames):
        send(frames)

    run()


def drain(sock: zmq.Socket) -> int:
    count = 0
    while sock.poll(0):
        sock.recv_multipart()
        count += 1
    return count


def _received(sock: zmq.Socket) -> list[list[bytes]]:
    messages = []
    while sock.poll(0):
        messages.append(sock.recv_multipart())
    return messages


def dealer(ctx, address: str, identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(address)
    return sock


def rss(procs) -> dict[str, int]:
    return {p.name: psutil.Process(p.pid).memory_info().rss for p in procs}


@pytest.mark.timeout(600)  # 7,500+ messages through five sockets: about 3 minutes alone, more on a busy machine
def test_random_and_malformed_frames_on_every_socket(cluster, tmp_path):
    cluster.extra_env["CLUSTER_MAX_MESSAGE_BYTES"] = str(1024 * 1024)
    ctx = zmq.Context()
    try:
        fuzz_every_socket(cluster, ctx)
    finally:
        ctx.destroy(linger=0)  # a failed check must not leave term() waiting on open sockets


def fuzz_every_socket(cluster, ctx: zmq.Context) -> None:
    # The agent under test talks to a broker we play ourselves, so we can send it anything. It hears no beats from
    # us, so now and then it reconnects (same identity) and registers again: the new link takes over, as the broker's.
    fake_broker = ctx.socket(zmq.ROUTER)
    fake_broker.setsockopt(zmq.LINGER, 0)
    fake_broker.setsockopt(zmq.ROUTER_HANDOVER, 1)
    fake_port = fake_broker.bind_to_random_port("tcp://127.0.0.1")
    manager = cluster.start_manager()
    broker = cluster.start_broker()
    agent = cluster.start_agent("real-agent", "--models", "digits")
    fuzzed_agent = cluster.start_agent(
        "fuzzed-agent", "--models", "digits", CLUSTER_BROKER_AGENTS=f"tcp://127.0.0.1:{fake_port}"
    )
    procs = [manager, broker, agent, fuzzed_agent]
    cluster.wait_for_agents(1, model="digits")
    assert fake_broker.poll(60_000), "the fuzzed agent never sent READY"
    agent_identity = fake_broker.recv_multipart()[0]

    clients_sock = dealer(ctx, cluster.addresses.broker_clients)
    agents_sock = dealer(ctx, cluster.addresses.broker_agents, b"fuzzer")
    queries_sock = dealer(ctx, cluster.addresses.manager_queries)
    beats_sock = ctx.socket(zmq.PUB)
    beats_sock.setsockopt(zmq.LINGER, 0)
    beats_sock.connect(cluster.addresses.manager_heartbeats)
    answered = {"clients": 0, "queries": 0}

    def to_broker_clients(frames):
        clients_sock.send_multipart(frames)
        answered["clients"] += drain(clients_sock)

    def to_manager_queries(frames):
        queries_sock.send_multipart(frames)
        answered["queries"] += drain(queries_sock)

    targets = {
        "broker client socket": to_broker_clients,
        "broker agent socket": lambda f: (agents_sock.send_multipart(f), drain(agents_sock)),
        "manager heartbeat socket": lambda f: beats_sock.send_multipart(f) if f else None,
        "manager query socket": to_manager_queries,
        "agent socket": lambda f: (fake_broker.send_multipart([agent_identity, *f]), drain(fake_broker)),
    }
    probes = iter(range(1_000_000))

    def settle() -> None:
        """Wait until every component has handled everything sent so far: each socket handles its messages in
        order, so a probe answered on each socket means the fuzz messages before it were handled too."""
        n = next(probes)
        probe = dealer(ctx, cluster.addresses.broker_clients)
        probe.send_multipart(protocol.message(Command.QUERY, {"id": n, "what": "stats"}))
        assert probe.poll(10_000), "the broker's client socket did not answer a probe"
        probe.close()
        probe = dealer(ctx, cluster.addresses.broker_agents, f"probe-{n}".encode())
        probe.send_multipart(protocol.message(Command.HEARTBEAT, {}))
        assert probe.poll(10_000), "the broker's agent socket did not answer a probe"  # DISCONNECT: unknown agent
        probe.close()
        beat = {"agent": f"probe-{n}", "models": [], "capacity": 1}
        wait_for(
            lambda: (
                beats_sock.send_multipart(protocol.message(Command.HEARTBEAT, beat))
                or any(a["id"] == f"probe-{n}" for a in cluster.manager_query("agents"))
            ),
            10,
            "the manager to handle a probe heartbeat",
        )
        route = n.to_bytes(protocol.ROUTE_BYTES, "big")

        def agent_answered() -> bool:
            # Sent again each try: one sent while the agent was reconnecting went nowhere.
            fake_broker.send_multipart([agent_identity, PREAMBLE[Command.REQUEST] + route, protocol.pack({"id": n})])
            return fake_broker.poll(500) and any(len(f) > 2 and f[1][5:] == route for f in _received(fake_broker))

        wait_for(agent_answered, 10, "the fuzzed agent to answer a probe")

    # Warm up every path once, then take the memory baseline.
    for send in targets.values():
        fuzz(send, examples=200)
    settle()
    before = rss(procs)
    for send in targets.values():
        fuzz(send)
    # Hand-written cases: truncated messages, unknown commands, bad versions.
    for frames in (
        [],
        [b""],
        [PREAMBLE[Command.REQUEST]],
        [b"MSB1\xff", b"\x80"],
        [b"MSB9\x02", b"\x80"],
        [PREAMBLE[Command.REQUEST], b"\x81\xa2id"],
        [PREAMBLE[Command.REPLY], b"\x80"],
        [PREAMBLE[Command.REQUEST] + b"\0" * 7, b"\x80"],  # a route too short
        [PREAMBLE[Command.REPLY] + b"\0" * 8, b"\x80", b"t"],  # a reply nobody asked for
        [PREAMBLE[Command.HEARTBEAT] + b"\0" * 8, b"\x80"],  # a route where none belongs
    ):
        for send in targets.values():
            if frames:
                send(frames)
    # Every socket that can answer did answer bad input with an error.
    wait_for(
        lambda: answered.__setitem__("clients", answered["clients"] + drain(clients_sock)) or answered["clients"] > 100,
        5,
        "error replies from the broker",
    )
    wait_for(
        lambda: answered.__setitem__("queries", answered["queries"] + drain(queries_sock)) or answered["queries"] > 100,
        5,
        "error replies from the manager",
    )

    # Oversize: a frame over the (1 MiB here) limit gets its sender disconnected; nothing else is affected.
    big = dealer(ctx, cluster.addresses.broker_clients)
    big.send_multipart(
        protocol.message(Command.REQUEST, {"id": 1, "model": "digits", "inputs": []}, [b"\0" * (2 * 1024 * 1024)])
    )

    # Memory stayed flat, nothing crashed, nothing raised an unexpected exception.
    settle()
    after = rss(procs)
    for p in procs:
        assert p.alive(), f"{p.name} died:\n{p.log()[-3000:]}"
        assert "Traceback" not in p.log(), f"{p.name} hit an unexpected exception:\n{p.log()[-3000:]}"
        grown = (after[p.name] - before[p.name]) / 2**20
        assert grown < 25, f"{p.name} grew by {grown:.1f} MiB during fuzzing"

    # Wrong dtype, wrong shape and unknown inputs get clear errors; a normal request right after gets the right answer.
    client = cluster.client()
    _, _, x_test, y_test = digits_split()
    with pytest.raises(BadRequestError, match="datatype"):
        client.infer("digits", {"image": x_test[:1].astype(np.float64)})
    with pytest.raises(BadRequestError, match="image"):
        client.infer("digits", {"image": x_test[:1].reshape(1, 64)})
    with pytest.raises(BadRequestError, match="pixels"):
        client.infer("digits", {"pixels": x_test[:1]})
    probs = client.infer("digits", {"image": x_test[:20]}).as_numpy("probs")
    assert (probs.argmax(1) == y_test[:20]).mean() >= 0.9
