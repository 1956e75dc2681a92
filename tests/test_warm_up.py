"""Right after the broker starts (issue 18 point 3): requests for deployed models wait for their agents to register
again, but a model the manager does not want served fails at once with MODEL_NOT_FOUND, as it does later, instead
of waiting out the warm-up window. In process: the Dispatcher, and the real Broker and Manager over inproc sockets.
The real-process measure is test_an_unknown_model_fails_fast_after_a_broker_restart below."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from cluster.broker import Broker
from cluster.config import Addresses
from cluster.errors import ModelNotFoundError
from cluster.role_settings import BrokerSettings, ManagerSettings
from tests.harness import LocalCluster, wait_for
from tests.test_broker_logic import TIMINGS, beat, client_errors, dispatcher, ready, request, sent_to_agents


def test_in_the_warm_up_an_undeployed_model_fails_at_once_and_a_deployed_one_waits():
    d = dispatcher()
    d.agents.deployed = {"m"}  # the manager's desired state, heard at start-up
    assert d.warming_up(1.0)
    assert client_errors(request(d, 0, model="nowhere", now=1.0)) == [
        (0, "MODEL_NOT_FOUND", "model 'nowhere' is not deployed")
    ]
    assert request(d, 1, model="m", now=1.0) == [] and d.pending_count == 1, "m is deployed: it waits for its agents"
    assert d.tick(1.5) == [] and d.pending_count == 1
    ((agent, route),) = sent_to_agents(ready(d, "a1", now=2.0))
    assert agent == "a1" and d.requests[route].request_id == 1


def test_before_the_desired_state_is_known_unknown_models_wait_then_fail_when_it_comes():
    """Not heard from the manager yet: any model may be one an agent is about to bring back, so it waits (in the
    warm-up window only, as before); the desired state, once it comes, fails the ones it does not list at once."""
    d = dispatcher()
    assert request(d, 0, model="nowhere", now=0.5) == [] and request(d, 1, model="m", now=0.5) == []
    assert d.tick(1.0) == [] and d.pending_count == 2
    d.agents.deployed = {"m"}
    assert client_errors(d.tick(1.1)) == [(0, "MODEL_NOT_FOUND", "model 'nowhere' is not deployed")]
    assert d.pending_count == 1, "m still waits"
    # Never heard: held at most the warm-up window, then MODEL_NOT_FOUND as before.
    late = dispatcher()
    request(late, 0, model="nowhere", now=0.5)
    ready(late, "a1", now=2.0)
    assert late.tick(3.9) == []
    assert [e[:2] for e in client_errors(late.tick(4.1))] == [(0, "MODEL_NOT_FOUND")]


def test_an_undeployed_model_is_not_held_for_an_expected_agent():
    d = dispatcher()
    d.agents.deployed = {"n"}
    registry_view = [dict(beat("a1", instance="i1").to_wire(), id="a1")]
    d.expect_agents(registry_view, 0.5)
    assert set(d.expected) == {"a1"}
    assert not d.holding("m", None, 5.0), "a1 served m, but the manager no longer wants it"
    assert [e[1] for e in client_errors(request(d, 0, now=5.0))] == ["MODEL_NOT_FOUND"]


def test_the_manager_tells_a_starting_broker_its_desired_state(tmp_path, demo_share):
    """Over in-process sockets: the real Manager's answer to the Broker's start-up QUERY {what: agents} carries the
    desired state, so the broker knows it before the first `desired` event (published once an interval)."""
    import shutil

    from cluster.manager.manager import Manager

    share = tmp_path / "share"
    shutil.copytree(demo_share, share)
    ctx = zmq.Context()
    addresses = Addresses(
        broker_clients="inproc://w-clients",
        broker_agents="inproc://w-agents",
        manager_events="inproc://w-events",
        manager_heartbeats="inproc://w-beats",
        manager_queries="inproc://w-queries",
    )
    manager = Manager(ManagerSettings(share=str(share), addresses=addresses, timings=TIMINGS), ctx)
    broker = Broker(BrokerSettings(addresses=addresses, timings=TIMINGS), ctx)
    try:
        assert broker.dispatcher.agents.deployed is None
        broker.ask_manager_for_agents()
        assert manager.queries.poll(5000), "the broker's QUERY did not reach the manager"
        manager.process_query(manager.queries.recv_multipart(copy=False))
        assert broker.manager.poll(5000), "the manager did not answer the broker"
        broker.process_manager_answer(broker.manager.recv_multipart(copy=False))
        assert broker.dispatcher.agents.deployed == set(manager.deployments.desired.models)
        assert broker.dispatcher.agents.deployed, "the demo share's models are deployed"
    finally:
        broker.close()
        manager.close()
        ctx.term()


@pytest.mark.cluster
def test_an_unknown_model_fails_fast_after_a_broker_restart(tmp_path, demo_share):
    """Real processes, production heartbeats (1 s; warm-up window 4 s): right after the broker restarts, a request
    for a model that is not deployed fails with MODEL_NOT_FOUND well inside the warm-up window (it waited it out:
    2.1-3.5 s), while one for a deployed model is answered once its agent is back."""
    import shutil

    share = tmp_path / "share"
    shutil.copytree(demo_share, share)
    cluster = LocalCluster(share, tmp_path / "logs", heartbeat_interval=1.0)
    try:
        cluster.start_manager()
        broker = cluster.start_broker()
        cluster.start_agents(1)
        cluster.wait_for_agents(1, model="echo")
        cluster.restart(broker)
        with cluster.client(timeout=30) as client:
            x = np.ones((1, 4), np.float32)
            wait_for(lambda: client.models(timeout=5) is not None, 10, "the client to reach the new broker")
            started = time.monotonic()
            with pytest.raises(ModelNotFoundError) as info:
                client.infer("no-such-model", {"x": x}, timeout=20)
            took = time.monotonic() - started
            print(f"unknown model right after a broker restart: MODEL_NOT_FOUND in {took * 1e3:.1f} ms ({info.value})")
            assert took < 1.5, f"an unknown model waited {took:.2f} s (the warm-up window is 4 s)"
            assert client.infer("echo", {"x": x}, timeout=20) is not None
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def test_metadata_of_a_model_never_served_says_not_deployed_and_not_that_it_was_undeployed():
    from cluster.broker.agents import UnknownModel

    d = dispatcher()
    d.agents.deployed = {"m"}
    with pytest.raises(UnknownModel, match=r"^model 'nowhere' is not deployed$"):
        d.agents.describe_model("nowhere", None)
    d.agents.known_models.add("gone")  # served once, then undeployed
    with pytest.raises(UnknownModel, match=r"is not deployed \(it was undeployed\)"):
        d.agents.describe_model("gone", None)
