"""Two agents started with the same --id (issue 11, point 4), on real processes: the second is refused by the
broker (ERROR AGENT_ID_IN_USE), says so in its log and exits non-zero; the first keeps its id, keeps serving and is
credited with every answer, for several seconds after. In-process tests of the logic are in test_broker_logic.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cluster.agent.agent import EXIT_AGENT_ID_IN_USE
from tests.harness import wait_for

pytestmark = pytest.mark.cluster

X = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}


@pytest.mark.timeout(180)
def test_a_second_agent_with_the_same_id_exits_and_the_first_keeps_serving(cluster):
    cluster.start_manager()
    broker = cluster.start_broker()
    first = cluster.start("agent", "--id", "twin", "--models", "echo", name="twin-first")
    cluster.wait_for_agents(1, model="echo")
    client = cluster.client()
    assert client.infer("echo", X).agent == "twin"
    (live,) = client.agents()
    assert live["pid"] == first.pid

    second = cluster.start("agent", "--id", "twin", "--models", "echo", name="twin-second")
    second.retired = True  # it is meant to exit
    # It loads its models (a torch import: seconds), is refused, and gives up after its grace period.
    wait_for(lambda: not second.alive(), 60, "the second agent with the same id to exit")
    assert second.returncode == EXIT_AGENT_ID_IN_USE, f"exit status {second.returncode}\n{second.log()}"
    assert "AGENT_ID_IN_USE" in second.log() and "agent id 'twin' is already in use" in second.log(), second.log()
    assert "exiting" in second.log(), second.log()
    assert "READY from b'twin/" in broker.log() and "is already in use by a live agent" in broker.log(), broker.log()

    # The first keeps serving, credited with every answer, for several seconds (a few expiries) after.
    expiry = cluster.heartbeat_interval * cluster.liveness
    until = time.monotonic() + max(5.0, 4 * expiry)
    served = 0
    while time.monotonic() < until:
        result = client.infer("echo", X, timeout=5)
        assert result.agent == "twin" and result.as_numpy("y").tolist() == X["x"].tolist()
        served += 1
        agents = client.agents()
        assert [(a["id"], a["pid"]) for a in agents] == [("twin", first.pid)], agents
    assert served > 10 and first.alive()
    assert "registering again" not in first.log(), "the first agent lost the broker:\n" + first.log()
    manager_view = cluster.manager_query("agents")
    assert [(a["id"], a["pid"]) for a in manager_view] == [("twin", first.pid)], manager_view


@pytest.mark.timeout(180)
def test_an_agent_killed_and_started_again_with_its_id_comes_back(cluster):
    """The restart the refusal must not block: kill -9, then the same id again, served within a few intervals."""
    cluster.start_manager()
    cluster.start_broker()
    agent = cluster.start_agent("phoenix", "--models", "echo")
    cluster.wait_for_agents(1, model="echo")
    client = cluster.client()
    assert client.infer("echo", X).agent == "phoenix"
    cluster.kill(agent)
    again = cluster.restart(agent)

    def served_by_it():
        try:
            result = client.infer("echo", X, timeout=2)
        except Exception:
            return False
        return result.agent == "phoenix" and [a["pid"] for a in client.agents()] == [again.pid]

    wait_for(served_by_it, 60, "the restarted agent to serve again under its id")
    assert again.alive(), again.log()
