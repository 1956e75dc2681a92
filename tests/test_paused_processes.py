"""Paused processes, end to end (issue 18 point 5): a process stopped with SIGSTOP (a VM stall, a long GC pause)
for longer than the expiry must, when it resumes, read what its peers sent meanwhile before it judges any of them
silent (cluster/clock.py: RunClock). Real manager, broker and 2 agents with production heartbeats (1 s, dead after
3 s); 8 closed-loop callers on `echo` (bench/frozen.py); one process gets SIGSTOP for 5 s, then SIGCONT.

Before (measured here, 8 callers): the resumed broker expired both agents as silent before reading their queued
heartbeats (in 2 runs of 3), and 4-17 requests failed with NoAgentAvailableError; a paused manager declared both
agents dead (9-17 failed); a paused agent called the broker silent and registered again. Now: no request fails (they
are slow: they wait out the pause), no agent is lost, and each process logs that it was paused.
"""

from __future__ import annotations

import pytest

from bench.frozen import closed_loop_with_freeze
from tests.harness import LocalCluster, wait_for

pytestmark = pytest.mark.cluster

PAUSE_S = 5.0  # over the 3 s expiry


def start(cluster: LocalCluster):
    manager = cluster.start_manager()
    broker = cluster.start_broker()
    cluster.start_agent("agent-0")
    cluster.start_agent("agent-1")
    cluster.wait_for_agents(2, model="echo")
    client = cluster.client(timeout=60)
    for _ in range(50):
        client.infer("echo", {"x": __import__("numpy").ones((1, 64), "float32")})
    return manager, broker, client


def test_a_paused_broker_reads_its_agents_before_judging_them(echo_cluster):
    _, broker, client = start(echo_cluster)
    figures = closed_loop_with_freeze(client, broker.pid, clients=8, before=1.0, freeze=PAUSE_S, after=1.5)
    stats = client.stats(timeout=10)
    print(figures, stats)
    assert figures["errors"] == {}, f"requests failed during a {PAUSE_S:g} s broker pause: {figures['errors']}"
    assert stats["agents_lost"] == 0, f"the resumed broker dropped agents it had not read: {stats}"
    assert figures["after_per_s"] > 0, figures
    log = broker.log()
    assert "silent for" not in log, log[-3000:]
    assert "paused" in log, "the broker says it noticed its own pause"


def test_a_paused_manager_declares_no_agent_dead(echo_cluster):
    manager, _, client = start(echo_cluster)
    figures = closed_loop_with_freeze(client, manager.pid, clients=4, before=0.5, freeze=PAUSE_S, after=1.0)
    assert figures["errors"] == {}, figures
    wait_for(lambda: "paused" in manager.log(), 10, "the manager to log its own pause")
    assert "dead: silent" not in manager.log(), manager.log()[-3000:]
    views = client.agents(timeout=10)
    assert len(views) == 2, views


def test_a_paused_agent_does_not_judge_the_broker_silent(echo_cluster):
    """The broker rightly drops the agent that did not beat for 5 s (its requests go to the other agent); the agent,
    resuming, reads the broker's queued messages instead of calling the broker silent and registering again."""
    echo_cluster.start_manager()
    echo_cluster.start_broker()
    paused = echo_cluster.start_agent("agent-0")
    echo_cluster.start_agent("agent-1")
    echo_cluster.wait_for_agents(2, model="echo")
    client = echo_cluster.client(timeout=60)
    figures = closed_loop_with_freeze(client, paused.pid, clients=4, before=0.5, freeze=PAUSE_S, after=1.0)
    assert figures["errors"] == {}, figures
    echo_cluster.wait_for_agents(2, model="echo")  # told DISCONNECT by the broker, it registered again
    assert "broker silent" not in paused.log(), paused.log()[-3000:]
    wait_for(lambda: "paused" in paused.log(), 10, "the agent to log its own pause")
