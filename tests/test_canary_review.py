"""Review of issue 21's canary paths: each test pins a bug found in review (a client that got a canary's error, an
attempt miscounted, bad input from the bus that stopped a role's canary work). In-process, with the helpers of
tests/test_broker_canary.py."""

from __future__ import annotations

from cluster.desired import DesiredState, ModelDeployment
from cluster.protocol import Command, ErrorCode
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
