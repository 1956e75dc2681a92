"""A client that sends 5,000 requests for 256 KiB replies and reads none (issue 11, point 3), on real processes: the
broker's RSS grows by well under 100 MiB (at most CLIENT_SNDHWM replies in ZeroMQ's pipe plus the client's reply
budget), a normal client keeps being served meanwhile, and after the greedy client leaves the broker's RSS comes back
down. bench/slow_reader.py prints the same figures (and those of the unchanged broker, run on its commit)."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest
import zmq

from bench.slow_reader import greedy_dealer, send_requests
from cluster import protocol
from tests.harness import wait_for
from tests.models import publish_big

pytestmark = pytest.mark.cluster
MiB = 2**20


@pytest.mark.timeout(300)
def test_a_client_that_reads_nothing_costs_the_broker_a_bounded_memory_it_gets_back(cluster, share):
    publish_big(share)
    cluster.start_manager()
    broker = cluster.start_broker(CLUSTER_MAX_QUEUE_WAIT="0")  # no load shedding: the client bounds alone
    cluster.start_agents(1, "--capacity", "8", "--models", "big,echo")
    cluster.wait_for_agents(1, model="big")
    client = cluster.client()
    x = {"x": np.ones((1, 4), np.float32)}
    for _ in range(20):  # warm up: the broker's own allocations for 256 KiB replies
        assert client.infer("big", {"n": np.array([65536], np.int64)}).as_numpy("y").shape == (1, 65536)
        client.infer("echo", x)
    proc = psutil.Process(broker.pid)
    before = proc.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ctx = zmq.Context()
    greedy = greedy_dealer(ctx, cluster.addresses.broker_clients)
    try:
        base = client.stats()
        send_requests(greedy, 5000, 65536)

        def settled():
            s = client.stats()
            seen = s["requests"] + s["client_refused"] - base["requests"] - base["client_refused"]
            return seen >= 5000 and s["in_flight"] == 0 and s["queued"] == 0

        # Meanwhile, and for 3 s after the broker has dealt with all 5,000, a normal client is served.
        served, settled_at = 0, None
        deadline = time.monotonic() + 120
        while settled_at is None or time.monotonic() < settled_at + 3.0:
            assert time.monotonic() < deadline, f"the broker did not deal with the 5,000 requests: {client.stats()}"
            assert client.infer("echo", x, timeout=10).as_numpy("y").tolist() == x["x"].tolist()
            served += 1
            if settled_at is None and settled():
                settled_at = time.monotonic()
        assert served >= 10
        stats = client.stats()
        assert stats["client_replies_dropped"] >= 1 and stats["client_refused"] > 0, stats
        grown = (peak[0] - before) / MiB
        assert grown < 100, f"the broker grew by {grown:.0f} MiB (before {before / MiB:.0f} MiB); bound 100 MiB"
    finally:
        greedy.close(linger=0)
        ctx.term()
        stop.set()
        sampler.join()
    # The greedy client is gone: what was held for it and its pipe are freed and given back (malloc_trim).
    wait_for(
        lambda: proc.memory_info().rss < before + 25 * MiB,
        15,
        f"the broker's RSS to come back within 25 MiB of {before / MiB:.0f} MiB (peak {peak[0] / MiB:.0f} MiB)",
    )
    assert client.infer("echo", x).as_numpy("y").tolist() == x["x"].tolist()


@pytest.mark.timeout(120)
def test_a_client_that_pauses_reading_is_served_until_it_stalls_past_the_grace_period(cluster, share):
    """A client that stops reading for a moment (a GC pause, a burst of replies on a loaded host) fills its pipe, and
    the broker holds its replies: its new requests are still served, not refused. (Refusal waits for the pipe to take
    nothing for the grace period, 30 s here so that a slow machine cannot pass it; test_broker_logic covers that.)"""
    publish_big(share)
    cluster.start_manager()
    cluster.start_broker(CLUSTER_CLIENT_READ_GRACE="30")
    cluster.start_agents(1, "--capacity", "8", "--models", "big")
    cluster.wait_for_agents(1, model="big")
    client = cluster.client()
    ctx = zmq.Context()
    paused = greedy_dealer(ctx, cluster.addresses.broker_clients)
    try:
        # 120 replies of 256 KiB: more than its pipe (CLIENT_SNDHWM) and the socket buffers take.
        send_requests(paused, 120, 65536)
        wait_for(
            lambda: (s := client.stats())["client_replies_held"] > 0 and s["in_flight"] == 0,
            60,
            f"the broker to answer all 120 and hold some replies for the paused client: {client.stats()}",
        )
        send_requests(paused, 10, 65536)  # sent while it still reads nothing
        codes = []
        while len(codes) < 130:
            assert paused.poll(30_000), f"only {len(codes)} of 130 replies came: {client.stats()}"
            frames = paused.recv_multipart()
            header = protocol.unpack_header(frames[1])
            codes.append(header.get("code", "OK"))
        assert codes == ["OK"] * 130, f"replies other than results: {sorted(set(codes))}"
        assert client.stats()["client_replies_held"] == 0
    finally:
        ctx.destroy(linger=0)
