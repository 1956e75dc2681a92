"""An answer reaches only the client that asked (issue 18, points 2 and 8): routes are unique across broker
incarnations, a reply is accepted only from the agent (or hedge copy) the request was sent to, an agent never sends
an answer for a broker link that is gone on a new one, a second connection claiming a live agent's identity gets
nothing, and a revoked agent is told why it is refused.

The in-process tests drive the Dispatcher (no sockets); the `cluster` ones run real processes."""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time

import numpy as np
import pytest
import zmq

from cluster import keys, protocol
from cluster.broker import Dispatcher
from cluster.broker.routing import RoundRobin
from cluster.config import Timings
from cluster.protocol import PREAMBLE, PREAMBLE_BYTES, ROUTE_BYTES, Command, Heartbeat, pack, unpack_header
from tests.harness import LocalCluster, wait_for
from tests.models import publish_slow, slow_rounds_per_second

T = 10.0  # past the warm-up window of a dispatcher started at 0


# ---- in process: the Dispatcher ------------------------------------------------------------------------------------


def dispatcher() -> Dispatcher:
    return Dispatcher(Timings(heartbeat_interval=1.0, liveness=3), RoundRobin(), now=0.0)


def ready(d: Dispatcher, agent: str, capacity: int = 4) -> None:
    beat = Heartbeat(agent, capacity, [{"name": "m", "version": 1}], pid=1, started=1.0)
    assert d.agent_message(Command.READY, [agent.encode(), PREAMBLE[Command.READY], pack(beat.to_wire())], T) == []


def routes_sent(out) -> list[tuple[str, bytes]]:
    """(agent, route key) of each REQUEST in `out`."""
    return [
        (s.peer.decode(), s.frames[1][PREAMBLE_BYTES : PREAMBLE_BYTES + ROUTE_BYTES])
        for s in out
        if s.to_agent and s.command == Command.REQUEST
    ]


def reply(d: Dispatcher, agent: str, route: bytes, data: bytes = b"output", now: float = T):
    frames = [agent.encode(), PREAMBLE[Command.REPLY] + route, pack({"id": "x"}), data]
    return d.agent_message(Command.REPLY, frames, now)


def to_clients(out) -> list[tuple[bytes, list]]:
    return [(s.peer, s.frames[2:]) for s in out if not s.to_agent]


def test_routes_differ_between_broker_incarnations():
    """Two dispatchers (a broker and the one started after it) give their first requests different routes, and an
    answer for the first one's route is not taken by the second, even from the agent that holds the second's
    request: the scenario of a broker restart, where the agent answers late on the new link."""
    old, new = dispatcher(), dispatcher()
    for d in (old, new):
        ready(d, "a1")
    ((_, old_route),) = routes_sent(old.client_request(b"first-client", 1, "m", None, 30.0, b"h", [b"t"], T))
    ((_, new_route),) = routes_sent(new.client_request(b"fresh-client", 1, "m", None, 30.0, b"h", [b"t"], T))
    assert len(old_route) == len(new_route) == ROUTE_BYTES
    assert old_route != new_route, "two broker incarnations gave their first requests the same route"
    more = {routes_sent(new.client_request(b"c", i, "m", None, 30.0, b"h", [b"t"], T))[0][1] for i in range(2, 5)}
    assert old_route not in more and len(more) == 3
    # The old request's answer, arriving on the new broker: dropped; the fresh client gets nothing from it ...
    assert to_clients(reply(new, "a1", old_route, b"first-client's tensor")) == []
    assert new.requests[new_route].done is False and new_route in new.agents.get(b"a1").in_flight
    # ... and its own answer when it comes.
    assert to_clients(reply(new, "a1", new_route, b"its own")) == [(b"fresh-client", [pack({"id": "x"}), b"its own"])]


def test_a_reply_from_an_agent_that_was_not_sent_the_request_is_dropped():
    d = dispatcher()
    ready(d, "a1", capacity=1)
    ready(d, "rogue", capacity=1)
    ((holder, route),) = routes_sent(d.client_request(b"victim", 7, "m", None, 30.0, b"h", [b"t"], T))
    assert holder == "a1"
    # The other agent answers the route it was never given (as REPLY, then as ERROR): nothing reaches the client,
    # the request stays in flight at its agent, and a1's slot stays taken.
    assert to_clients(reply(d, "rogue", route, b"forged")) == []
    error = [b"rogue", PREAMBLE[Command.ERROR] + route, pack({"id": 7, "code": "MODEL_NOT_FOUND", "message": "no"})]
    assert d.agent_message(Command.ERROR, error, T) == []
    assert d.requests[route].done is False and d.requests[route].agent is d.agents.get(b"a1")
    assert route in d.agents.get(b"a1").in_flight and d.agents.get(b"rogue").in_flight == {}
    # A route nobody was given at all (guessed): dropped too.
    assert to_clients(reply(d, "rogue", b"\x00" * ROUTE_BYTES)) == []
    # The agent that has it answers: the client gets that answer.
    assert to_clients(reply(d, "a1", route, b"real")) == [(b"victim", [pack({"id": "x"}), b"real"])]


def test_hedge_copies_may_both_answer_only_the_first_reaches_the_client():
    d = Dispatcher(Timings(heartbeat_interval=1.0, liveness=3, hedge_after=0.05), RoundRobin(), now=0.0)
    ready(d, "a1", capacity=1)
    ready(d, "a2", capacity=1)
    ((first, route),) = routes_sent(d.client_request(b"c", 1, "m", None, 30.0, b"h", [b"t"], T))
    ((second, hedged),) = routes_sent(d.tick(T + 0.1))
    assert hedged == route and {first, second} == {"a1", "a2"}
    assert to_clients(reply(d, second, route, b"hedge", now=T + 0.2)) == [(b"c", [pack({"id": "x"}), b"hedge"])]
    assert to_clients(reply(d, first, route, b"late", now=T + 0.3)) == []
    assert all(a.in_flight == {} for a in d.agents.agents.values()), "both slots are free after both answered"


def test_keys_on_another_agents_valid_key_answers_nothing_and_a_revoked_agent_is_dropped_and_told(tmp_path):
    directory = tmp_path / "keys"
    keys.make_cluster_keys(directory, agents=2)
    key = {n: m["public"] for n, m in keys.list_members(directory).items()}
    allow = keys.AllowList(directory)
    d = Dispatcher(Timings(heartbeat_interval=1.0, liveness=3), RoundRobin(), now=0.0, allow=allow)
    for agent, member in (("a1", "agent-1"), ("a2", "agent-2")):
        beat = pack(Heartbeat(agent, 1, [{"name": "m", "version": 1}], pid=1, started=1.0).to_wire())
        assert d.agent_message(Command.READY, [agent.encode(), PREAMBLE[Command.READY], beat], T, key[member]) == []
    ((holder, route),) = routes_sent(d.client_request(b"victim", 1, "m", None, 30.0, b"h", [b"t"], T))
    other, other_key = ("a2", key["agent-2"]) if holder == "a1" else ("a1", key["agent-1"])
    forged = [other.encode(), PREAMBLE[Command.REPLY] + route, pack({"id": 1}), b"forged"]
    assert d.agent_message(Command.REPLY, forged, T, other_key) == [], "a valid agent key answered another's request"
    assert d.requests[route].done is False
    # The holder's key is revoked: its next beat is answered with why, it is dropped, its request goes elsewhere.
    keys.revoke(directory, "agent-1" if holder == "a1" else "agent-2")
    allow.refresh(force=True)
    holder_key = key["agent-1" if holder == "a1" else "agent-2"]
    beat = pack(Heartbeat(holder, 1, [{"name": "m", "version": 1}], pid=1, started=1.0).to_wire())
    out = d.agent_message(Command.HEARTBEAT, [holder.encode(), PREAMBLE[Command.HEARTBEAT], beat], T + 0.1, holder_key)
    told = [unpack_header(s.frames[2]) for s in out if s.to_agent and s.command == Command.ERROR]
    assert [t["code"] for t in told] == ["UNAUTHENTICATED"] and "revoked" in told[0]["message"], told
    assert routes_sent(out) == [(other, route)] and d.agents.get(holder.encode()) is None


# ---- real processes ------------------------------------------------------------------------------------------------

SLOW_META = [{"name": "x", "datatype": "FP32", "shape": [1, 1]}, {"name": "n", "datatype": "INT64", "shape": [1]}]


def slow_inputs(x: float, rounds: int) -> dict:
    return {"x": np.full((1, 1), x, np.float32), "n": np.array([rounds], np.int64)}


def agent_view(client, agent_id: str) -> dict | None:
    return next((a for a in client.agents(timeout=2) if a["id"] == agent_id), None)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_an_answer_from_before_a_broker_restart_never_reaches_a_fresh_client(cluster):
    """A client sends a slow request and leaves; the broker is killed and started again on the same port while the
    agent works on it; a fresh client's request (queued on that agent behind the slow one) must get its own answer,
    never the earlier client's tensor, although the agent finishes the earlier one first."""
    publish_slow(cluster.share)
    cluster.start_manager()
    broker = cluster.start_broker()
    agent = cluster.start_agent("slow-agent", "--models", "slow")
    cluster.wait_for_agents(1, model="slow")
    rounds = int(slow_rounds_per_second() * 10)  # about 10 s on an idle machine: more than a broker restart

    ctx = zmq.Context()
    try:
        first = ctx.socket(zmq.DEALER)  # a client that sends a request and goes away
        first.setsockopt(zmq.LINGER, 1000)
        first.connect(cluster.addresses.broker_clients)
        header = {"id": 1, "model": "slow", "timeout": 120, "inputs": SLOW_META}
        x, n = slow_inputs(111.0, rounds).values()
        first.send_multipart(protocol.message(Command.REQUEST, header, [x.tobytes(), n.tobytes()]))
        first.close()
        watcher = cluster.client()
        wait_for(lambda: (agent_view(watcher, "slow-agent") or {}).get("in_flight", 0) >= 1, 10, "the slow request")
        watcher.close()
    finally:
        ctx.term()

    cluster.kill(broker)
    cluster.start_broker()
    watcher = cluster.client()
    view = wait_for(lambda: agent_view(watcher, "slow-agent"), 30, "the agent to register with the new broker")
    assert view["in_flight"] >= 1, "the slow request ended before the broker restarted: the test shows nothing"
    fresh = cluster.client()  # its first request has id 1, as the earlier client's had
    result = fresh.infer("slow", slow_inputs(222.0, 1), timeout=60)
    assert result.as_numpy("y").tolist() == [[222.0]], (
        f"the fresh client got {result.as_numpy('y').tolist()}, not its own answer [[222.0]] (111 is the tensor of "
        "the client that asked before the broker restart)"
    )
    wait_for(lambda: "no longer connected to" in agent.log(), 10, "the agent to log the stale answer it dropped")


class RogueAgent(threading.Thread):
    """A registered agent (keys off) that serves `model` with capacity 1. For each request it is given, it forges
    answers (-2) for the next `forge` routes (same incarnation, counter + k: given to the other agent, or waiting in
    the broker's queue), then holds its own request for `hold` seconds and answers it (-1). While it holds one it is
    given no other, so every forged answer is for a request it does not hold."""

    def __init__(self, ctx, address: str, model: str, version: int, forge: int = 100, hold: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"rogue/0123456789abcdef")
        self.sock.connect(address)
        self.beat = {"agent": "rogue", "capacity": 1, "models": [{"name": model, "version": version}]}
        self.model, self.version, self.forge, self.hold = model, version, forge, hold
        self.given = self.forged = 0
        self.held: tuple[bytes, object, float] | None = None
        self.stop = threading.Event()

    def answer(self, route: bytes, request_id, value: float) -> None:
        header = {"id": request_id, "model": self.model, "version": self.version, "agent": "rogue"}
        header["outputs"] = [{"name": "y", "datatype": "FP32", "shape": [1, 1]}]
        self.sock.send_multipart(protocol.routed(Command.REPLY, route, header, [np.float32([[value]]).tobytes()]))

    def run(self) -> None:
        self.sock.send_multipart(protocol.message(Command.READY, dict(self.beat, metadata=[])))
        next_beat = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + 0.1
                self.sock.send_multipart(protocol.message(Command.HEARTBEAT, self.beat))
            if self.held is not None and time.monotonic() > self.held[2]:
                self.answer(self.held[0], self.held[1], -1.0)
                self.held = None
            if not self.sock.poll(20):
                continue
            frames = self.sock.recv_multipart()
            cmd, route = protocol.parse_routed(frames[0])
            if cmd == Command.DISCONNECT:
                self.sock.send_multipart(protocol.message(Command.READY, dict(self.beat, metadata=[])))
            if cmd != Command.REQUEST:
                continue
            key, _, _ = protocol.parse_request_route(route)
            request_id = unpack_header(frames[1])["id"]
            self.given += 1
            prefix, (counter,) = key[:-8], struct.unpack(">Q", key[-8:])
            for k in range(1, self.forge + 1):
                self.answer(prefix + struct.pack(">Q", counter + k), request_id + k, -2.0)
                self.forged += 1
            self.held = (key, request_id, time.monotonic() + self.hold)


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_rogue_agent_cannot_answer_requests_it_was_not_given(cluster):
    """Keys off: a process registers as an agent for the model and, from the routes it is given, forges answers for
    the routes given to the real agent. None of them is accepted: every request not sent to the rogue gets the real
    agent's answer."""
    version = publish_slow(cluster.share)
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("honest", "--models", "slow", "--capacity", "1")
    cluster.wait_for_agents(1, model="slow")
    client = cluster.client()
    ctx = zmq.Context()
    rogue = RogueAgent(ctx, cluster.addresses.broker_agents, "slow", version)
    rogue.start()
    try:
        wait_for(lambda: agent_view(client, "rogue"), 10, "the rogue to register")
        rounds = max(1000, int(slow_rounds_per_second() * 0.02))  # ~20 ms each: requests wait in the broker's queue
        futures = {i: client.submit("slow", slow_inputs(float(i), rounds), timeout=60) for i in range(100)}
        answers = {i: f.result(timeout=90).as_numpy("y")[0, 0] for i, f in futures.items()}
    finally:
        rogue.stop.set()
        rogue.join(5)
        rogue.sock.close()
        ctx.term()
    forged = sorted(i for i, y in answers.items() if y == -2.0)
    wrong = sorted(i for i, y in answers.items() if y not in (float(i), -1.0, -2.0))
    assert rogue.given >= 1 and rogue.forged >= 30, f"the rogue was given {rogue.given} requests: it tried nothing"
    assert not forged, f"{len(forged)} of {len(answers)} requests got the rogue's forged answer: {forged[:10]}"
    assert not wrong, f"requests answered with another request's tensor: {wrong[:10]}"
    assert sum(1 for i, y in answers.items() if y == float(i)) >= len(answers) - rogue.given


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_copy_of_a_live_agents_identity_gets_no_requests(cluster):
    """Keys off: a process builds an agent's connection identity from what `agents()` shows (its id and instance),
    connects with it and says READY as that agent. It gets no request; the real agent keeps serving them all."""
    cluster.start_manager()
    cluster.start_broker()
    victim = cluster.start_agent("victim", "--models", "echo")
    cluster.wait_for_agents(1, model="echo")
    client = cluster.client()
    view = agent_view(client, "victim")
    ctx = zmq.Context()
    copycat = ctx.socket(zmq.DEALER)
    copycat.setsockopt(zmq.LINGER, 0)
    copycat.setsockopt(zmq.ROUTING_ID, protocol.agent_identity(view["id"], view["instance"]))
    copycat.connect(cluster.addresses.broker_agents)
    beat = {k: view[k] for k in Heartbeat.__dataclass_fields__ if k in view}
    got: list[list[bytes]] = []
    try:
        copycat.send_multipart(protocol.message(Command.READY, dict(beat, metadata=[])))
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        served, failed = [], 0
        until = time.monotonic() + 5.0
        while time.monotonic() < until:
            copycat.send_multipart(protocol.message(Command.HEARTBEAT, beat))
            try:
                result = client.infer("echo", {"x": x}, timeout=1)
                served.append((result.agent, result.as_numpy("y").tolist() == x.tolist()))
            except Exception:  # noqa: BLE001  (a request the copycat took is never answered)
                failed += 1
            while copycat.poll(0):
                got.append(copycat.recv_multipart())
                if got[-1][0] == PREAMBLE[Command.DISCONNECT]:  # "send READY": it does, as the agent would
                    copycat.send_multipart(protocol.message(Command.READY, dict(beat, metadata=[])))
    finally:
        copycat.close()
        ctx.term()
    requests = [f for f in got if f[0][:PREAMBLE_BYTES] == PREAMBLE[Command.REQUEST]]
    refused = [unpack_header(f[1]).get("code") for f in got if f[0][:PREAMBLE_BYTES] == PREAMBLE[Command.ERROR]]
    what = f"copycat got {len(requests)} requests, refused {refused[:1]}; client: {failed} failed, {len(served)} served"
    assert not requests and failed == 0, what
    assert "AGENT_ID_IN_USE" in refused, what
    assert served and set(served) == {("victim", True)}, (what, served[:5])
    assert [(a["id"], a["pid"]) for a in client.agents()] == [("victim", victim.pid)]
    assert "registering again" not in victim.log(), "the real agent lost its connection:\n" + victim.log()


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_revoked_agent_is_told_why_it_is_refused(share, tmp_path):
    """Keys on: an agent whose key is revoked while it runs logs that the broker refuses its key, and so does one
    started again with that key (refused at the handshake)."""
    cluster = LocalCluster(share, tmp_path / "logs", keys=tmp_path / "keys")
    try:
        cluster.start_manager()
        cluster.start_broker()
        agent = cluster.start_agent("doomed", "--models", "echo")
        cluster.wait_for_agents(1, model="echo")
        key_file = cluster.keys / "doomed.key"
        kept = tmp_path / "doomed.key"
        shutil.copyfile(key_file, kept)
        keys.revoke(cluster.keys, "doomed")
        told = "the broker refuses this agent's key"
        wait_for(lambda: told in agent.log(), 10, f"the running agent to log {told!r}")
        line = next(line for line in agent.log().splitlines() if told in line)
        assert "revoked" in line and "allow-list" in line, line
        cluster.stop(agent)
        shutil.copyfile(kept, key_file)  # the file is back, but the key is not on the allow-list any more
        os.chmod(key_file, 0o600)
        seen = len(agent.log())  # the restarted agent appends to the same log file
        again = cluster.restart(agent)
        wait_for(lambda: told in again.log()[seen:], 60, f"the restarted agent to log {told!r}")
        line = next(line for line in again.log()[seen:].splitlines() if told in line)
        assert "handshake" in line and "revoked" in line, line
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def test_an_error_from_the_broker_with_a_code_of_any_type_is_dropped_not_a_crash(tmp_path):
    """The agent reads an ERROR's code from the wire: a map or a list there (the fuzz test's find: `code in
    frozenset` raised TypeError and the agent exited) is an unexpected ERROR, dropped; the agent runs on."""
    from cluster.agent.agent import Agent
    from cluster.role_settings import AgentSettings

    (tmp_path / "models").mkdir()
    agent = Agent(AgentSettings(share=str(tmp_path), agent_id="a1", torch_threads=0))
    for code in ({"x": 1}, [1, 2], 7, None, b"UNAUTHENTICATED"):
        agent.broker_error([PREAMBLE[Command.ERROR], protocol.pack({"code": code, "message": "m"})])
    agent.broker_error([PREAMBLE[Command.ERROR], b"\x93\x01\x02\x03"])  # not a map at all
    assert agent.exit_code == 0 and not agent._stop.is_set()
