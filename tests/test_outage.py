"""A long outage of the broker or the manager under the production timings (heartbeat 1 s, liveness 3, reconnect 1 s
doubling to 32 s), with real processes (issue 11, point 2). The measuring is bench/outage.py's (`python3 -m
bench.outage` prints the same figures).

Broker: four closed-loop client threads on `echo`, kill -9, down 10 s (30 s with CLUSTER_SLOW=1: it adds 35 s),
restart on the same addresses. Requests in flight during the outage wait in the client (their deadline is 90 s) and
are re-sent on the new connection; none may fail, and none sent after the restart may get NoAgentAvailableError.
Every agent must be registered again, and the throughput back, within BACK_BOUND_S of the new broker listening.
Manager: down 20 s, then every agent in its registry within BACK_BOUND_S.
"""

from __future__ import annotations

import os
import time

import pytest

from bench.outage import broker_outage, manager_outage, production_cluster, write_echo_share
from tests.harness import wait_for

pytestmark = pytest.mark.cluster

AGENTS = 2
# Expected: about 1 s (a socket tries a peer that is down every link_retry_max = 1 s, plus ZeroMQ's jitter of up to
# a quarter of that; READY goes on the handshake). Before the fix: 1.3 to 7 s, later the longer the outage.
BACK_BOUND_S = 3.0


@pytest.fixture(scope="module")
def outage_cluster(tmp_path_factory):
    """One cluster for the module (starting agents costs seconds): manager, broker, 2 agents serving echo."""
    root = tmp_path_factory.mktemp("outage")
    cluster = production_cluster(write_echo_share(root / "share"), root / "logs")
    procs = {"manager": cluster.start_manager(), "broker": cluster.start_broker()}
    cluster.start_agents(AGENTS)
    cluster.wait_for_agents(AGENTS, timeout=60, model="echo")
    yield cluster, procs
    cluster.stop_all()


def check_broker_outage(outage_cluster, outage_s: float) -> None:
    cluster, procs = outage_cluster
    result, procs["broker"] = broker_outage(cluster, procs["broker"], AGENTS, outage_s)
    print(result.line())
    what = f"{result.line()}\n{cluster.logs()}"
    assert "NoAgentAvailableError" not in result.errors_after_back, f"NoAgentAvailableError after the restart: {what}"
    assert not result.errors_before_back, f"requests in flight during the outage failed: {what}"
    assert not result.errors_after_back, f"requests sent after the restart failed: {what}"
    assert result.answered_before_back >= 1, f"the requests waiting during the outage were not answered: {what}"
    assert result.registered_s is not None and result.registered_s <= BACK_BOUND_S, (
        f"every agent registered {result.registered_s} s after the new broker listened; bound {BACK_BOUND_S} s: {what}"
    )
    assert result.full_throughput_s is not None and result.full_throughput_s <= BACK_BOUND_S, (
        f"full throughput {result.full_throughput_s} s after the new broker listened; bound {BACK_BOUND_S} s: {what}"
    )


def test_broker_down_10_s_under_load(outage_cluster):
    check_broker_outage(outage_cluster, 10.0)


@pytest.mark.skipif(os.environ.get("CLUSTER_SLOW") != "1", reason="35 s more: run with CLUSTER_SLOW=1")
def test_broker_down_30_s_under_load(outage_cluster):
    check_broker_outage(outage_cluster, 30.0)


def test_manager_down_20_s_agents_back_promptly(outage_cluster):
    cluster, procs = outage_cluster
    took, procs["manager"] = manager_outage(cluster, procs["manager"], AGENTS, 20.0)
    print(f"manager down 20 s: every agent back in its registry {took} s after it listened")
    assert took is not None and took <= BACK_BOUND_S, (
        f"every agent was in the restarted manager's registry {took} s after it listened; bound {BACK_BOUND_S} s\n"
        f"{cluster.logs()}"
    )


def test_keys_on_a_restarted_broker_asks_the_manager_and_gets_its_agent_back(tmp_path):
    """With CURVE: the broker's start-up QUERY {what: agents} is answered (the server key may ask it), and the agent
    registers within the bound once the handshake with the new broker succeeds."""
    with production_cluster(write_echo_share(tmp_path / "share"), tmp_path / "logs", keys=tmp_path / "keys") as cluster:
        cluster.start_manager()
        broker = cluster.start_broker()
        (agent,) = cluster.start_agents(1)
        cluster.wait_for_agents(1, timeout=60, model="echo")
        cluster.kill(broker)
        # The outage lasts until the agent has seen its broker go (it must then register with the new one).
        wait_for(
            lambda: "lost the connection to the broker" in agent.log(),
            10,
            f"the agent to see the outage\n{cluster.logs()}",
        )
        broker = cluster.restart(broker)
        back = time.monotonic()
        client = cluster.client()
        wait_for(lambda: len(client.agents(timeout=1)) == 1, 10, f"the agent back in the broker\n{cluster.logs()}")
        took = time.monotonic() - back
        assert took <= BACK_BOUND_S, f"the agent registered {took:.2f} s after the broker listened\n{cluster.logs()}"
        wait_for(lambda: "the manager hears" in broker.log(), 5, f"the manager's answer\n{cluster.logs()}")
        assert "did not say which agents" not in broker.log(), cluster.logs()
