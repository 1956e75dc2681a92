"""Issue 23, item 2, on real processes: under load (64 requests in flight) the broker sends agents and the client
BATCHes, the agents answer in BATCHes, and every answer is the right one."""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest

pytestmark = pytest.mark.cluster

IN_FLIGHT = 64
REQUESTS = 3000


def test_under_load_requests_and_answers_go_in_batches_and_every_answer_is_right(cluster):
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agents(2)
    cluster.wait_for_agents(2, model="echo")
    client = cluster.client(timeout=60)
    inputs = [np.full((1, 64), i, np.float32) for i in range(REQUESTS)]
    window: collections.deque = collections.deque()
    wrong, deadline = [], time.monotonic() + 120
    for i in range(REQUESTS):
        window.append((i, client.submit("echo", {"x": inputs[i]}, timeout=60)))
        while len(window) >= IN_FLIGHT or (i == REQUESTS - 1 and window):
            n, future = window.popleft()
            result = future.result(timeout=max(1.0, deadline - time.monotonic()))
            if not np.array_equal(result.as_numpy("y"), inputs[n]):
                wrong.append(n)
    assert wrong == [], f"{len(wrong)} wrong answers, first for request {wrong[:5]}"
    stats = client.stats()
    assert stats["requests"] >= REQUESTS, stats
    assert stats["batches_to_agents"] > 0 and stats["batched_messages"] > 0, f"the broker sent no BATCH: {stats}"
    assert stats["batches_from_agents"] > 0, f"no agent answered with a BATCH: {stats}"
    assert stats["redispatched"] == 0 and stats["agents_lost"] == 0, stats
