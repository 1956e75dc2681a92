"""The Dispatcher's parts on their own: each takes state and returns a decision, without a Dispatcher, a socket or
a Send (the Dispatcher applies what they return; test_broker_logic drives them through it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.broker.admission import Admission
from cluster.broker.agents import AgentTable, BrokerRequest
from cluster.broker.registration import Registration
from cluster.broker.stalls import Stalls
from cluster.config import RETRY_AFTER_MIN, Timings
from cluster.protocol import Heartbeat, pack

TIMINGS = Timings(heartbeat_interval=1.0, liveness=3, broker_queue_limit=10, max_queue_wait=1.0, hedge_after=0.05)


def test_admission_says_wait_shed_or_full():
    admission = Admission(TIMINGS, {})
    assert admission.queue_refusal("m", queued=500, pending_count=0) is None, "no rate known: nothing is shed"
    admission.rates["m"] = rate = type("Rate", (), {"per_second": 100.0})()
    assert admission.queue_refusal("m", queued=50, pending_count=0) is None  # 0.51 s ahead, under its 1 s
    shed = admission.queue_refusal("m", queued=199, pending_count=0)
    assert shed.shed and shed.retry_after == pytest.approx(2.0) and "2.0 s of queue ahead" in shed.text
    full = admission.queue_refusal("m", queued=5, pending_count=10)  # 0.06 s ahead: retry_after at its floor
    assert not full.shed and "10 requests already waiting" in full.text and full.retry_after == RETRY_AFTER_MIN
    rate.per_second = None
    assert admission.queue_refusal("m", queued=5, pending_count=10).retry_after is None
    assert admission.client_refusal(load=0, congested=False) is None
    assert "not reading its replies" in admission.client_refusal(load=0, congested=True).text
    assert admission.client_refusal(load=TIMINGS.client_max_in_flight, congested=False).retry_after == 1.0


def beat(agent: str, pid: int, instance: str) -> bytes:
    return pack(Heartbeat(agent, 2, [{"name": "m", "version": 1}], pid=pid, started=1.0, instance=instance).to_wire())


def test_registration_decides_and_leaves_the_table_to_the_dispatcher():
    table = AgentTable(TIMINGS.expiry)
    registration = Registration(TIMINGS, table, None, started=0.0)
    first = registration.ready(b"a1/x", beat("a1", 1, "x"), None, 10.0)
    assert first.beat.agent == "a1" and first.old is None and not first.again and first.refusal is None
    assert len(table) == 0, "deciding adds nothing: the dispatcher does"
    live = table.add(b"a1/x", first.beat, 10.0)
    again = registration.ready(b"a1/x", beat("a1", 1, "x"), None, 11.0)
    assert again.again and again.old is live, "the same process saying READY again: update it"
    other = registration.ready(b"a1/y", beat("a1", 2, "y"), None, 11.0)
    assert other.refusal and "already in use" in other.refusal and other.probe is live and other.evict is None
    assert registration.ready(b"a1/x", b"\xc1", None, 11.0).beat is None, "malformed: dropped"


def test_stalls_say_which_requests_are_due_a_hedge():
    table = AgentTable(TIMINGS.expiry)
    agent = table.add(b"a1/x", Heartbeat("a1", 4, [{"name": "m", "version": 1}], pid=1, started=1.0), 0.0)
    stalls = Stalls(TIMINGS, {"stalls": 0})
    old, young = (BrokerRequest(bytes([i]) * 16, b"c", i, "m", None, b"", [], 99.0) for i in (1, 2))
    for request, sent in ((old, 1.0), (young, 1.04)):
        request.agent, request.sent_at, request.attempts = agent, sent, 1
        agent.add_request(request)
    assert stalls.hedges_due(table.agents.values(), 1.06) == [old], "only the one out for longer than hedge_after"
    old.hedge = agent  # it has its copy already
    assert stalls.hedges_due(table.agents.values(), 1.06) == []
    assert not stalls.stalled(agent, 5.0), "no p99 known for the model yet: no agent is judged stalled"


def test_the_parts_never_import_the_dispatcher():
    """They are called one way: the dispatcher imports them, never the reverse (they return what to do)."""
    broker = Path(__file__).resolve().parent.parent / "cluster" / "broker"
    for part in ("admission.py", "stalls.py", "registration.py", "agents.py", "sends.py", "canary.py", "copies.py"):
        assert "dispatcher import" not in (broker / part).read_text(), part


def test_no_broker_module_over_600_lines():
    broker = Path(__file__).resolve().parent.parent / "cluster" / "broker"
    sizes = {p.name: len(p.read_text().splitlines()) for p in broker.glob("*.py")}
    assert max(sizes.values()) <= 600, sizes
