"""A process's own stalls (issue 18 point 5), in process: the RunClock, and the broker's Dispatcher and the manager's
Registry judging peers only over time they ran. The real-process counterpart is tests/test_paused_processes.py."""

from __future__ import annotations

import logging

import pytest

from cluster.clock import RunClock, pardon
from cluster.config import Timings
from cluster.manager.registry import Registry
from tests.test_broker_logic import (
    T,
    answer,
    beat,
    client_errors,
    dispatcher,
    ready,
    request,
    sent_to_agents,
    warm_service_times,
)


def test_run_clock_counts_only_the_excess_of_a_long_pass():
    clock = RunClock(0.5, now=0.0)
    assert clock.look(0.1) == 0.0 and clock.look(0.6) == 0.0, "passes within the bound are no stall"
    assert clock.look(5.6) == pytest.approx(4.5), "a 5 s gap: 4.5 s not run (the bound still counts)"
    assert clock.look(5.7) == 0.0
    # A loop whose every pass is slow still counts `bound` of each: peers can still expire.
    assert clock.look(6.5) == pytest.approx(0.3)
    assert clock.stalls == 2 and clock.lost == pytest.approx(4.8)
    with pytest.raises(ValueError):
        RunClock(0.0, now=0.0)


def test_run_clock_logs_long_stalls_only(caplog):
    log = logging.getLogger("test.clock")
    clock = RunClock(0.1, now=0.0, name="broker", log=log)
    with caplog.at_level(logging.WARNING, logger="test.clock"):
        clock.look(0.3)  # 0.3 s gap: a busy host, not worth a line
        clock.look(5.3)
    assert [r.getMessage() for r in caplog.records] == [
        "broker paused (did not run) for 5.0 s: reading what waits before judging any peer silent"
    ]


def test_pardon_never_moves_a_peer_past_now():
    assert pardon(1.0, 4.0, now=10.0) == 5.0
    assert pardon(9.0, 4.0, now=10.0) == 10.0
    assert pardon(float("-inf"), 4.0, now=10.0) == float("-inf")


def test_pause_bound_is_under_half_an_interval():
    assert Timings().pause_bound == 0.5
    assert Timings(heartbeat_interval=0.2).pause_bound == pytest.approx(0.1)


def test_a_paused_broker_does_not_expire_agents_for_the_time_it_did_not_run():
    """The broker's last tick at T; it is stopped 5 s (over the 3 s expiry); on resuming, its RunClock says 4.5 s
    were not run. Agents heard just before the pause are not silent, and their requests stay where they are."""
    d = dispatcher()
    ready(d, "a1", now=T)
    ready(d, "a2", now=T - 0.5)
    ((agent, route),) = sent_to_agents(request(d, 0, now=T))
    assert d.tick(T) == []
    resumed = T + 5.0
    d.paused(4.5, resumed)
    assert client_errors(d.tick(resumed)) == [] and len(d.agents) == 2, "nobody expired on resuming"
    assert d.stats["agents_lost"] == 0 and not d.stalled(d.agents.get_by_id(agent), resumed)
    assert not d.stalled(d.agents.get_by_id(agent), resumed + 0.05), "its answers wait unread: no stall yet"
    assert d.stats["stalls"] == 0
    assert d.requests[route].agent.agent_id == agent, "its request stays at its agent"
    # What they sent while the broker was stopped is read next: a1's answer arrives and the client gets it.
    assert [s.to_agent for s in answer(d, agent, route, now=resumed + 0.01)] == [False]
    # Silence while the broker ran still counts: a2, heard 0.5 s before the pause, has 1 s counted on resuming (that
    # 0.5 s and the RunClock's bound) and expires 2 s later.
    assert d.tick(resumed + 1.9) == [] and len(d.agents) == 2
    d.tick(resumed + 2.1)
    assert d.agents.get_by_id("a2") is None and d.stats["agents_lost"] == 1


def test_without_the_pause_the_same_gap_expires_both():
    """The contrast (what happened before): the same 5 s gap with no pause noticed expires both agents."""
    d = dispatcher()
    ready(d, "a1", now=T)
    ready(d, "a2", now=T)
    d.tick(T + 5.0)
    assert len(d.agents) == 0 and d.stats["agents_lost"] == 2


def test_a_paused_manager_declares_no_agent_dead():
    registry = Registry(expiry=3.0)
    registry.observe(beat("a1"), now=1.0)
    registry.paused(4.5, now=6.0)
    assert registry.expire(now=6.0) == [], "a1 beat 0.5 s before the pause: not silent"
    assert [e["agent"] for e in registry.expire(now=8.6)] == ["a1"], "silence after the resume still counts"


def test_after_a_pause_an_agent_is_not_judged_stalled_before_its_waiting_answers_are_read():
    """Stall thresholds (here the 100 ms floor) are far finer than the RunClock's bound: on resuming, an agent holding
    a request sent before the pause is judged on what happens from now on, not on the pause."""
    d = dispatcher()
    ready(d, "a1", now=T)
    now = warm_service_times(d, T)
    assert d.stall_threshold("m") == pytest.approx(0.1)
    ((agent, route),) = sent_to_agents(request(d, 0, now=now))
    resumed = now + 5.0
    d.paused(4.5, resumed)
    d.tick(resumed)
    assert not d.stalled(d.agents.get_by_id(agent), resumed + 0.05) and d.stats["stalls"] == 0
    assert [s.to_agent for s in answer(d, agent, route, now=resumed + 0.06)] == [False], "its answer, read now"
    # Without news for longer than the threshold after the resume, it is judged as before.
    request(d, 1, now=resumed + 0.06)
    assert d.stalled(d.agents.get_by_id(agent), resumed + 0.3)
