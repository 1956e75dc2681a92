"""Cancellation, deadlines and `instances` end to end: real manager, broker and agent processes, a real TorchScript
model whose forward pass takes as long as the caller asks (tests/models.py Slow).

What is checked is what the agent itself counts (its heartbeat's `jobs`: executed, cancelled, expired,
peak_concurrent) and what the broker counts (`stats`), never wall-clock thresholds.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cluster.client import AsyncClient
from cluster.errors import InferenceTimeoutError
from cluster.publish import publish_version
from tests.harness import wait_for
from tests.models import SLOW_CONFIG, Slow, publish_slow, slow_rounds_per_second

pytestmark = pytest.mark.cluster


def slow_inputs(rounds: int) -> dict:
    return {"x": np.zeros((1, 1), np.float32), "n": np.array([rounds], np.int64)}


def agent_jobs(client, model: str = "slow") -> dict:
    (agent,) = client.agents(timeout=5)
    return agent.get("jobs", {}).get(model, {})


def start_slow_cluster(cluster, *agent_args: str):
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("slow-agent", "--models", "slow", *agent_args)
    cluster.wait_for_agents(1, model="slow")
    return cluster.client()


def test_fifty_cancelled_requests_are_never_run(cluster):
    """A 4 s request occupies the agent's one worker; 50 requests of ~0.2 s queue behind it (a few on the agent, the
    rest at the broker), and are cancelled: 25 by Future.cancel() on the blocking client, 25 by cancelling the
    asyncio tasks awaiting AsyncClient.infer. The agent runs none of them: after the blocker and one more request,
    it has executed exactly 2; the broker counted 50 cancels and holds no slot for them."""
    publish_slow(cluster.share)
    client = start_slow_cluster(cluster)
    per_second = slow_rounds_per_second()
    blocker = client.submit("slow", slow_inputs(int(per_second * 4)), timeout=120)
    long_rounds = int(per_second * 0.2)
    futures = [client.submit("slow", slow_inputs(long_rounds), timeout=120) for _ in range(25)]
    # All 26 at the broker before any is cancelled (the client never sends a request cancelled before it went out).
    wait_for(lambda: client.stats()["requests"] >= 26, 30, "the broker to receive the blocker and the 25 requests")
    assert all(f.cancel() for f in futures), "a request was answered while the blocker held the only worker"

    async def cancel_async_tasks():
        async with AsyncClient(cluster.addresses.broker_clients, key=cluster.member_key("client")) as aclient:
            tasks = [
                asyncio.ensure_future(aclient.infer("slow", slow_inputs(long_rounds), timeout=120)) for _ in range(25)
            ]

            async def all_arrived():
                while (await aclient.stats())["requests"] < 51:
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(all_arrived(), 30)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results
            await asyncio.sleep(0)  # the CANCELs are on their way before the socket closes (linger)
            await asyncio.wait_for(wait_cancelled(aclient), 30)

    async def wait_cancelled(aclient):
        while (await aclient.stats())["cancelled"] < 50:
            await asyncio.sleep(0.02)

    asyncio.run(cancel_async_tasks())
    assert blocker.result(timeout=120).as_numpy("y").shape == (1, 1)
    assert client.infer("slow", slow_inputs(10), timeout=60).as_numpy("y").shape == (1, 1)
    jobs = wait_for(
        lambda: (j := agent_jobs(client)) and j.get("executed", 0) >= 2 and j,
        30,
        "the agent's heartbeat to count the blocker and the last request",
    )
    assert jobs["executed"] == 2, f"the agent ran cancelled requests: {jobs}"
    # The 3 slots behind the blocker were filled before any CANCEL: the agent skipped at least those. Each CANCELLED
    # answer frees a slot the broker fills from its queue, which a later CANCEL may reach on the agent too.
    assert 3 <= jobs["cancelled"] <= 50, jobs
    stats = client.stats()
    assert stats["cancelled"] == 50 and stats["queued"] == 0, stats
    wait_for(
        lambda: client.agents(timeout=5)[0]["broker_in_flight"] == 0, 30, "the broker to free every slot on the agent"
    )


def test_requests_that_expire_while_queued_are_never_run(cluster):
    """A 3 s request holds the worker; 10 requests with a 0.5 s deadline queue behind it (3 on the agent, 7 at the
    broker) and time out. None of them is run: the agent skips the 3 it holds (counted as expired), the broker
    never sends the other 7."""
    publish_slow(cluster.share)
    client = start_slow_cluster(cluster)
    blocker = client.submit("slow", slow_inputs(int(slow_rounds_per_second() * 3)), timeout=120)
    doomed = [client.submit("slow", slow_inputs(10), timeout=0.5) for _ in range(10)]
    for future in doomed:
        with pytest.raises(InferenceTimeoutError):
            future.result(timeout=60)
    blocker.result(timeout=120)
    client.infer("slow", slow_inputs(10), timeout=60)
    jobs = wait_for(
        lambda: (j := agent_jobs(client)) and j.get("executed", 0) >= 2 and j,
        30,
        "the agent's heartbeat to count the blocker and the last request",
    )
    assert jobs["executed"] == 2 and jobs["expired"] == 3, f"expired requests were run: {jobs}"


def test_two_instances_serve_two_requests_at_once_on_one_agent(cluster):
    """A model with `instances: 2`: the agent (one configured worker) loads two copies and runs two requests of it
    at once (its own peak count says 2); its capacity counts the copies."""
    path = cluster.share / "twin.pt"
    import torch

    torch.jit.script(Slow()).save(str(path))
    publish_version(cluster.share, "twin", path, {**SLOW_CONFIG, "name": "twin", "instances": 2})
    path.unlink()
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("twin-agent", "--models", "twin", "--capacity", "1")
    cluster.wait_for_agents(1, model="twin")
    client = cluster.client()
    (agent,) = client.agents(timeout=5)
    assert agent["capacity"] == 4, f"capacity must count the 2 copies (2 each): {agent['capacity']}"
    rounds = int(slow_rounds_per_second() * 0.5)
    futures = [client.submit("twin", slow_inputs(rounds), timeout=120) for _ in range(4)]
    for future in futures:
        future.result(timeout=120)
    jobs = wait_for(
        lambda: (j := agent_jobs(client, "twin")) and j.get("executed", 0) >= 4 and j,
        30,
        "the agent's heartbeat to count the 4 requests",
    )
    assert jobs["peak_concurrent"] == 2, f"two copies should run two requests at once: {jobs}"
