"""Review of issue 21's canary paths: each test pins a bug found in review (a client that got a canary's error, an
attempt miscounted, bad input from the bus that stopped a role's canary work). In-process, with the helpers of
tests/test_broker_canary.py."""

from __future__ import annotations

import pytest

from cluster.desired import DesiredState, ModelDeployment
from cluster.protocol import Command, ErrorCode
from tests.harness import wait_for
from tests.test_broker_canary import ask, both, canary_dispatcher, desired, fail, reply, requests_sent, to_client
from tests.test_broker_logic import T


def test_a_hedge_after_the_breaker_tripped_never_lets_the_canarys_failure_reach_the_client():
    """A canary request in flight when the breaker trips is due a hedge: the hedge must not switch the request's
    version under its canary copy (its failure would then count as the stable version's and go to the client)."""
    d = canary_dispatcher(hedge_after=0.05)
    both(d, a1=[1, 2], a2=[1, 2])
    d.canary.update(desired((100,), breaker_consecutive=1))
    ((slow_agent, slow, version),) = requests_sent(ask(d, 0))
    assert version == 2
    ((agent, route, _),) = requests_sent(ask(d, 1))
    out = fail(d, agent, route)  # the breaker trips; request 1 runs again on v1
    assert d.canary.runs["m"].tripped
    for a, r, _ in requests_sent(out):
        reply(d, a, r)
    requests_sent(d.tick(T + 0.2))  # request 0 is due a hedge
    out = fail(d, slow_agent, slow, now=T + 0.3)  # its canary copy fails
    assert [h["code"] for cmd, h in to_client(out) if cmd == Command.ERROR] == [], "the canary's error reached it"
    v2 = d.canary.runs["m"].counts[2]
    assert v2.errors == 2, "the canary copy's failure counts against the canary"
    assert d.canary.runs["m"].counts.get(1) is None or d.canary.runs["m"].counts[1].errors == 0


def test_agents_dropping_the_canary_after_an_abort_cost_its_requests_no_attempts():
    """A request drawn for the canary meets agents that unloaded it (the run was aborted): each answers
    MODEL_NOT_FOUND; the request goes on to the stable version and is answered, not failed for lack of attempts."""
    d = canary_dispatcher()
    both(d, capacity=1, a1=[1, 2], a2=[1, 2], a3=[1, 2])
    d.canary.update(desired((100,)))
    ((agent, route, version),) = requests_sent(ask(d, 0))
    assert version == 2
    d.canary.update(DesiredState({"m": ModelDeployment(1)}, generation=2))  # aborted: agents unload v2
    for _ in range(3):
        out = fail(d, agent, route, code=ErrorCode.MODEL_NOT_FOUND)
        assert to_client(out) == [], f"the client got {to_client(out)}"
        ((agent, again, version),) = requests_sent(out)
        assert again == route
        if version == 1:
            break
    assert version == 1, "once no agent has the canary, the stable version runs it"
    assert [cmd for cmd, _ in to_client(reply(d, agent, route))] == [Command.REPLY]


def test_a_criterion_that_is_not_finite_is_refused_and_never_stops_the_manager(tmp_path):
    """Infinity passes JSON and msgpack: as a whole-number criterion it raised OverflowError (not ValueError) from
    Criteria.from_wire, which the manager's tick did not catch (a hand-edited deployments.json stopped the manager's
    loop) and a QUERY canary answered INTERNAL."""
    from cluster.canary.judge import Criteria
    from cluster.manager.canaries import parse_options
    from cluster.manager.deployments import CommandError
    from tests.test_manager_canaries import T0, running, setup

    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError):
            Criteria.from_wire({"min_requests": bad})
        with pytest.raises(ValueError):
            Criteria.from_wire({"latency_ratio": bad})
        with pytest.raises(CommandError) as refused:
            parse_options({"criteria": {"min_requests": bad}})
        assert refused.value.code == ErrorCode.BAD_REQUEST
    c, judge = setup(tmp_path)
    canary = running(c)
    canary.criteria = {"min_requests": float("inf")}  # as read back from a hand-edited deployments.json
    c.tick(T0 + 5)  # judged by the defaults, logged
    assert judge.criteria[-1] == Criteria()


def test_a_desired_state_with_odd_decisions_still_moves_the_brokers_split():
    """A decision whose fields are not plain values (a hand-edited state) must not stop the broker following the
    desired state: the step change after it still applies."""
    d = canary_dispatcher()
    both(d)
    d.canary.update(desired((10, 50, 100)))
    state = desired((10, 50, 100), step=1)
    state.models["m"].canary.decisions = [{"at": [1, 2], "step": {"x": 1}, "decision": "pass"}]
    d.canary.update(state)
    assert d.canary.runs["m"].weight == 50


def test_one_malformed_model_digest_does_not_drop_the_others(tmp_path):
    """The manager checks each model's digest on its own: a 'steps' that is no list is that model's error only."""
    from cluster.canary.digest import ModelDigest, StepDigest, VersionDigest
    from cluster.protocol import CanaryDigest
    from tests.test_manager_canaries import T0, running, setup

    with pytest.raises(ValueError):
        ModelDigest.from_wire({"canary": "x", "steps": 5})
    c, _ = setup(tmp_path)
    canary = running(c)
    good = ModelDigest(canary.id, {0: StepDigest({2: VersionDigest(ok=3)})}).to_wire()
    event = CanaryDigest("b1", "inc", 1, {"a-bad-one": {"canary": canary.id, "steps": 5}, "m": good})
    c.digest(event, T0 + 2)
    assert ("b1", "inc") in c.runs["m"].digests


def test_a_mirror_that_fails_where_the_stable_version_failed_too_is_no_drift():
    """A client's bad input fails both copies: the mirror's error counts against the shadow version only where the
    stable answer was ok, whichever answers first (it was counted whenever the mirror answered first)."""
    from tests.test_broker_canary import shadow_dispatcher

    d = shadow_dispatcher(a1=[1, 2], a2=[1, 2])
    for rid, mirror_first in ((0, True), (1, False)):
        (stable, mirror) = requests_sent(ask(d, rid))
        for agent, route, _ in (mirror, stable) if mirror_first else (stable, mirror):
            fail(d, agent, route, code=ErrorCode.BAD_REQUEST)
    (stable, mirror) = requests_sent(ask(d, 2))  # the mirror fails, the stable version answers: an error
    fail(d, mirror[0], mirror[1])
    reply(d, stable[0], stable[1])
    shadow = d.canary.runs["m"].digest.step(0).shadow
    assert (shadow.sent, shadow.errors, shadow.pairs) == (3, 1, 0) and d.canary.pairs == []


def test_the_comparison_queue_is_bounded_in_bytes_not_only_in_pairs(monkeypatch):
    """Pairs wait for the comparison thread with both answers' frames: 256 pairs of large outputs (say 4 MB each) were
    2 GB held by the broker. Past a byte budget a pair is dropped (counted), one pair always fits."""
    import threading

    from cluster.broker.shadow import ShadowComparer
    from cluster.protocol import PREAMBLE, pack
    from tests.test_broker_canary import shadow_dispatcher

    d = shadow_dispatcher(a1=[1, 2], a2=[1, 2])
    gate, seen = threading.Event(), []

    def fake_compare(stable, mirrored, into, criteria):
        gate.wait(10)
        seen.append(len(stable[1]))

    monkeypatch.setattr("cluster.canary.compare.compare", fake_compare)
    comparer = ShadowComparer(d.canary)
    comparer.max_bytes = 3_000_000  # a pair here is 2 MB of outputs
    d.canary.on_pair = comparer.submit
    big = b"x" * 1_000_000

    def answer(agent, route):
        header = pack({"id": "r", "model": "m", "outputs": [], "batch_size": 1, "queue_us": 0})
        d.agent_message(Command.REPLY, [agent.encode(), PREAMBLE[Command.REPLY] + route, header, big], T)

    try:
        for rid in range(2):  # the first is in the thread's hands (waiting at the gate): no room for the second
            (stable, mirror) = requests_sent(ask(d, rid))
            answer(mirror[0], mirror[1])
            answer(stable[0], stable[1])
        assert d.canary.not_compared["queue full"] == 1, "the second pair must not be held"
        gate.set()
        wait_for(lambda: seen == [len(big)] and not comparer.queued_bytes, 10, "the big pair compared and let go")
        assert seen == [len(big)] and comparer.queued_bytes == 0
        (stable, mirror) = requests_sent(ask(d, 2))  # room again
        answer(mirror[0], mirror[1])
        answer(stable[0], stable[1])
        assert d.canary.not_compared["queue full"] == 1
    finally:
        gate.set()
        comparer.stop()
