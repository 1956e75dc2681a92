"""End-to-end behaviour of the bus on real processes over loopback TCP: manager, broker, agents, Python client.

Time bounds are multiples of the cluster's heartbeat interval (`cluster.heartbeat_interval`) and expiry
(`interval * liveness`, after which a silent peer is dead), each with the reason for its factor, so they follow the
configured timings instead of assuming a fast machine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

import numpy as np
import pytest
import torch

from cluster import (
    InferenceTimeoutError,
    ModelNotFoundError,
    NoAgentAvailableError,
)
from cluster.agent.loaded_model import load_model
from cluster.demo_models import digits_split
from cluster.repository import ModelRepository
from tests.harness import wait_for
from tests.models import publish_slow, slow_rounds_per_second

pytestmark = pytest.mark.cluster


def expiry_of(cluster) -> float:
    """Seconds of silence after which the broker and the manager drop an agent."""
    return cluster.heartbeat_interval * cluster.liveness


def answered_at_once_bound(cluster) -> float:
    """The longest an "at once" answer may take: one expiry. An answer the broker gives from what it already knows
    waits for no heartbeat; one that waited for its view to change (an expiry, the warm-up after a start) would take
    at least that long, and one that waited for the request's deadline 30 s."""
    return expiry_of(cluster)


def test_round_robin_splits_sequential_requests_evenly(cluster):
    """300 sequential requests over 3 agents serving digits: 100 +/- 1 each."""
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agents(3)
    cluster.wait_for_agents(3, model="digits")
    _, _, x_test, _ = digits_split()
    client = cluster.client()
    served = collections.Counter(client.infer("digits", {"image": x_test[i % 360][None]}).agent for i in range(300))
    assert len(served) == 3, served
    assert all(99 <= count <= 101 for count in served.values()), served


def test_agent_killed_mid_load_loses_nothing(cluster):
    """kill -9 one of 3 agents while 16 requests are in flight: it leaves the registry within 3 heartbeat
    intervals, its in-flight requests are re-dispatched, and every request gets its right answer."""
    publish_slow(cluster.share)
    rounds = max(1000, int(slow_rounds_per_second() * 0.02))  # ~20 ms per request, so requests sit on agents
    cluster.start_manager()
    cluster.start_broker()
    agents = cluster.start_agents(3)
    cluster.wait_for_agents(3, model="slow")
    client = cluster.client()
    victim = agents[0]
    total, in_flight_target = 400, 16
    sent = 0
    answers: dict[int, object] = {}
    errors = []
    in_flight: dict[concurrent.futures.Future, int] = {}
    kill_time = None
    gone = {}

    def watch_registries():
        while len(gone) < 2 and time.monotonic() - kill_time < 10:
            now = time.monotonic()
            if "manager" not in gone and victim.name not in {a["id"] for a in cluster.manager_query("agents")}:
                gone["manager"] = now
            if "broker" not in gone and victim.name not in cluster.agent_ids(client):
                gone["broker"] = now
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_registries)
    while len(answers) + len(errors) < total:
        while sent < total and len(in_flight) < in_flight_target:
            x = np.full((1, 8), sent, dtype=np.float32)
            in_flight[client.submit("slow", {"x": x, "n": np.array([rounds])})] = sent
            sent += 1
        done, _ = concurrent.futures.wait(in_flight, timeout=60, return_when=concurrent.futures.FIRST_COMPLETED)
        assert done, "no answer within 60 s"
        for future in done:
            i = in_flight.pop(future)
            try:
                result = future.result()
                assert result.as_numpy("y")[0, 0] == i, f"request {i} got someone else's answer"
                answers[i] = result.agent
            except Exception as exc:  # collected, so the failure message lists them all
                errors.append((i, repr(exc)))
        if kill_time is None and len(answers) >= 100:
            cluster.kill(victim)
            kill_time = time.monotonic()
            watcher.start()
    watcher.join(15)

    assert not errors, f"{len(errors)} requests failed: {errors[:5]}"
    assert sorted(answers) == list(range(total))
    # The victim's last beat was at or before the kill, so each registry drops it one expiry after the kill at the
    # latest, plus up to one check tick (half an interval or less); one more interval covers the watcher's own query
    # round trip on a loaded 2-core machine. Hence expiry + 2 intervals.
    expiry = expiry_of(cluster)
    bound = expiry + 2 * cluster.heartbeat_interval
    for where in ("manager", "broker"):
        assert where in gone, f"killed agent still listed by the {where} 10 s after the kill (expiry {expiry} s)"
        took = gone[where] - kill_time
        assert took <= bound, (
            f"the {where} dropped the killed agent {took:.2f} s after the kill; bound: expiry {expiry} s + 2 heartbeat "
            f"intervals = {bound:.2f} s"
        )
    stats = client.stats()
    assert stats["agents_lost"] == 1 and stats["redispatched"] >= 1, stats
    late = [i for i, agent in answers.items() if agent == victim.name and i > 200]
    assert not late, f"requests sent well after the kill were answered by the dead agent: {late[:5]}"


def test_failures_are_fast_and_clear(cluster):
    """Unknown model: ModelNotFoundError at once. Model whose agents died: NoAgentAvailableError at once.
    No answer within the deadline: InferenceTimeoutError naming the model, at the deadline."""
    publish_slow(cluster.share)
    cluster.start_manager()
    cluster.start_broker()
    agent = cluster.start_agent("only-agent", "--models", "slow,echo")
    cluster.wait_for_agents(1, model="slow")
    client = cluster.client()

    at_once = answered_at_once_bound(cluster)
    for model in ("no-such-model", "digits"):  # digits is in the share but no agent serves it
        start = time.monotonic()
        with pytest.raises(ModelNotFoundError, match=model):
            client.infer(model, {"x": np.zeros((1, 1), np.float32)})
        took = time.monotonic() - start
        assert took < at_once, f"ModelNotFoundError for {model!r} took {took:.2f} s; bound (1 expiry): {at_once:.2f} s"

    deadline = 0.5
    rounds = int(slow_rounds_per_second() * 3)  # a 3 s forward pass against a 0.5 s deadline
    start = time.monotonic()
    # The broker's TIMEOUT names the model and says the request was on an agent (the client's own fallback, 2 s
    # after the deadline, says "no answer from the broker" instead).
    broker_timeout = r"model 'slow': no answer within the request's deadline \(on agent"
    with pytest.raises(InferenceTimeoutError, match=broker_timeout):
        client.infer("slow", {"x": np.zeros((1, 1), np.float32), "n": np.array([rounds])}, timeout=deadline)
    elapsed = time.monotonic() - start
    # Not before the deadline, less the few ms between the client stamping the request and sending it (10% here).
    # Not later than the deadline + one expiry: the broker checks deadlines every tick (half an interval or less); the
    # rest is room for a loaded 2-core machine, the same slack the cluster gives a silent peer before it is dead.
    earliest, latest = deadline * 0.9, deadline + expiry_of(cluster)
    assert earliest <= elapsed < latest, (
        f"TIMEOUT came {elapsed:.2f} s after sending with a {deadline} s deadline; expected between {earliest:.2f} s "
        f"and {latest:.2f} s (deadline + 1 expiry)"
    )
    assert client.core.timeout == 30.0, "default deadline is 30 s"

    cluster.kill(agent)
    wait_for(lambda: not cluster.agent_ids(client), 5, "the agent to leave the broker's registry")
    start = time.monotonic()
    with pytest.raises(NoAgentAvailableError, match="echo"):
        client.infer("echo", {"x": np.zeros((1, 1), np.float32)})
    took = time.monotonic() - start
    assert took < at_once, f"NoAgentAvailableError took {took:.2f} s; bound (1 expiry): {at_once:.2f} s"


def test_any_start_order_and_restarts(cluster):
    """Agents before broker and manager; a late agent joins within one interval; manager and broker restarts need
    no agent restart; the client recovers on its own after a broker restart."""
    early = cluster.start_agents(2)
    wait_for(lambda: all(" up: " in p.log() for p in early), 60, "the early agents to load their models")
    manager = cluster.start_manager()
    broker = cluster.start_broker()
    cluster.wait_for_agents(2, timeout=10)
    client = cluster.client()
    x = np.ones((1, 4), np.float32)
    assert client.infer("echo", {"x": x}).as_numpy("y").tolist() == x.tolist()

    late = cluster.start_agent("late-agent")
    wait_for(lambda: " up: " in late.log(), 60, "the late agent to load its models")
    record = wait_for(
        lambda: next((a for a in cluster.manager_query("agents") if a["id"] == "late-agent"), None),
        5,
        "late agent in the manager",
    )
    # One interval: the agent beats as soon as it serves (and again when the manager's subscription reaches it), and
    # registers with the broker at once; waiting for its next regular beat would already use up the interval.
    interval = cluster.heartbeat_interval
    took = record["joined"] - record["serving_since"]
    assert took <= interval, f"the manager saw the late agent {took:.2f} s after it served; bound: {interval} s"
    seen = wait_for(
        lambda: next((a for a in client.agents() if a["id"] == "late-agent"), None), 5, "late agent in the broker"
    )
    took = seen["joined"] - seen["serving_since"]
    assert took <= interval, f"the broker saw the late agent {took:.2f} s after it served; bound: {interval} s"

    # Manager restart: the broker keeps serving meanwhile, and the new manager rebuilds its registry from beats.
    cluster.kill(manager)
    assert client.infer("echo", {"x": x}).agent
    cluster.start_manager()
    wait_for(
        lambda: len(cluster.manager_query("agents")) == 3,
        10,
        "the restarted manager (start-up included) to know all 3 agents",
    )

    # Broker restart: a request made while it is down is answered once it is back; agents re-register by themselves.
    cluster.kill(broker)
    pending = client.submit("echo", {"x": x * 7}, timeout=20)
    cluster.start_broker()
    assert pending.result(timeout=25).as_numpy("y").tolist() == (x * 7).tolist()
    cluster.wait_for_agents(3, timeout=10)
    assert client.infer("echo", {"x": x}).as_numpy("y").tolist() == x.tolist()


def test_busy_agent_is_not_dead_and_not_overfilled(cluster):
    """An agent in a forward pass of six expiries keeps heartbeating (never declared dead, never re-joined) and gets
    no more than its capacity."""
    publish_slow(cluster.share)
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("busy-agent", "--capacity", "1", "--models", "slow")
    cluster.wait_for_agents(1, model="slow")
    client = cluster.client()
    expiry = expiry_of(cluster)
    # A busy agent that stopped beating would be dropped one expiry into the pass. The pass is sized for 6 expiries
    # and must last at least 3 (the estimate of its speed can be off), so beats, not luck, kept the agent listed.
    # If the agent ran faster than the estimate and the pass was shorter, the look proves nothing: it is made again
    # with twice the rounds (up to three times), never counted as a pass.
    rounds = int(slow_rounds_per_second() * 6 * expiry)
    shortest_pass = 3 * expiry
    x = np.zeros((1, 1), np.float32)
    joined = set()  # (where, joined) pairs: more than one per place means the agent was dropped and came back
    for _attempt in range(3):
        started = time.monotonic()
        first = client.submit("slow", {"x": x, "n": np.array([rounds])})
        second = client.submit("slow", {"x": x + 1, "n": np.array([1])})
        observations = 0
        while not first.done():
            agents = {a["id"]: a for a in client.agents()}
            assert "busy-agent" in agents, "the busy agent was dropped by the broker"
            busy = agents["busy-agent"]
            assert busy["broker_in_flight"] <= 1, f"the broker sent the busy agent more than its capacity of 1: {busy}"
            assert busy["heartbeat_age"] < expiry, (
                f"the broker last heard from the busy agent {busy['heartbeat_age']:.2f} s ago; bound: 1 expiry "
                f"({expiry} s)"
            )
            in_manager = {a["id"]: a for a in cluster.manager_query("agents")}
            assert "busy-agent" in in_manager, "the manager declared the busy agent dead"
            assert in_manager["busy-agent"]["in_flight"] <= 1, (
                f"the busy agent reports more than 1 in flight: {in_manager}"
            )
            joined |= {("broker", busy["joined"]), ("manager", in_manager["busy-agent"]["joined"])}
            stats = client.stats()
            if first.done():  # it finished while we looked: the counts may already be past it
                break
            assert stats["in_flight"] == 2 and stats["queued"] <= 1, stats
            observations += 1
            time.sleep(cluster.heartbeat_interval / 3)
        first.result(timeout=1)
        busy_for = time.monotonic() - started
        assert second.result(timeout=5).as_numpy("y")[0, 0] == 1
        if busy_for >= shortest_pass:
            break
        rounds *= 2
    assert busy_for >= shortest_pass, (
        f"the forward pass took {busy_for:.2f} s, under 3 expiries ({shortest_pass:.2f} s), three times: too short "
        "to show anything"
    )
    # On average at least one look per heartbeat interval over those 3 expiries.
    assert observations >= 3 * cluster.liveness, (
        f"only {observations} looks at the registries during a {busy_for:.2f} s pass; wanted {3 * cluster.liveness}"
    )
    assert len(joined) == 2, f"the busy agent was dropped and re-joined: join times seen {sorted(joined)}"
    assert client.stats()["agents_lost"] == 0


def test_held_out_digits_match_the_model_run_directly(cluster, share):
    """The 360 held-out images through the cluster give the model's own predictions, >= 95% of them right."""
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agents(2)
    cluster.wait_for_agents(2, model="digits")
    _, _, x_test, y_test = digits_split()
    repository = ModelRepository(share)
    version = repository.latest_version("digits")
    model = load_model(repository, "digits", version)
    direct = model.infer({"image": torch.from_numpy(x_test)})["probs"].numpy().argmax(1)
    client = cluster.client()
    futures = [client.submit("digits", {"image": image[None]}) for image in x_test]
    results = [f.result(timeout=60) for f in futures]
    served_by = collections.Counter((r.agent, r.model, r.version) for r in results)
    expected = {(p.name, "digits", version) for p in cluster.procs if p.role == "agent"}
    assert set(served_by) == expected, f"expected answers from both agents with digits v{version}, got {served_by}"
    through_cluster = np.array([r.as_numpy("probs")[0].argmax() for r in results])
    assert (through_cluster == direct).all(), f"{(through_cluster != direct).sum()} predictions differ"
    accuracy = (through_cluster == y_test).mean()
    assert accuracy >= 0.95, accuracy
