"""Clients through two brokers (issue 20), real processes: brokers b1 and b2, each with an agent of its own, and a
client given both addresses, under a closed loop of requests. One broker killed (kill -9) or frozen (SIGSTOP: a
machine that vanished without a reset, seen through ZMTP heartbeats): no call fails, every answer is the caller's
own, and the longest stretch without a completed request is printed and bounded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cluster import AsyncClient, Client
from tests.harness import until, wait_for

IN_FLIGHT = 32
LEAD_S = 0.5  # the broker goes once calls have been completing this long (the gaps are measured from then) ...
AFTER_S = 3.0  # ... and the load runs this long after: the window the gaps and counts are measured over
KILL_GAP_MAX_S = 0.5  # the figure is 0.1 s (50 ms bins); a loaded 2-core CI box gets this much slack
FREEZE_GAP_MAX_S = 1.0  # heartbeats: 0.1 s interval, 0.3 s timeout


def two_brokers(cluster) -> tuple:
    """Manager, broker b1 (the cluster's) with agent a1, broker b2 (own ports) with agent a2: (b1, b2, addresses of
    b1's and b2's clients)."""
    cluster.start_manager()
    b1 = cluster.start_broker("--name", "b1")
    first = cluster.addresses
    b2 = cluster.start(
        "broker",
        "--broker-clients",
        "tcp://127.0.0.1:0",
        "--broker-agents",
        "tcp://127.0.0.1:0",
        "--name",
        "b2",
        name="broker-b2",
    )
    second = dict(b2.addresses)
    # the cluster's own broker stays b1 (start() remembered b2's addresses as the cluster's)
    cluster.bound.update(broker_clients=first.broker_clients, broker_agents=first.broker_agents)
    cluster.start_agent("a1")
    cluster.start_agent("a2", CLUSTER_BROKER_AGENTS=second["broker_agents"])
    for address, agent in ((first.broker_clients, "a1"), (second["broker_clients"], "a2")):
        with Client(address, timeout=30) as one:
            wait_for(
                lambda one=one, agent=agent: (
                    [a["id"] for a in one.agents()] == [agent] and one.infer("echo", X1).agent == agent
                ),
                60,
                f"{agent} to serve echo through its broker",
            )
    return b1, b2, f"{first.broker_clients},{second['broker_clients']}"


X1 = {"x": np.ones((1, 4), np.float32)}


def flowing(done: list[float], in_flight: int) -> bool:
    """Calls have been completing for LEAD_S, at least two per caller: the load runs before anything is done to it."""
    return len(done) >= 2 * in_flight and time.monotonic() - done[0] >= LEAD_S


def longest_gap(done: list[float], start: float, end: float) -> float:
    times = sorted(t for t in done if start <= t <= end)
    edges = [start, *times, end]
    return max(b - a for a, b in zip(edges, edges[1:]))


def closed_loop(client: Client, act, in_flight: int = IN_FLIGHT) -> tuple[list[float], list, float]:
    """`in_flight` threads calling echo in a loop, each with its own payload; `act()` once the load flows; stops
    AFTER_S later. (completion times, errors, when act ran)."""
    done: list[float] = []
    errors: list = []
    stop = threading.Event()

    def caller(t: int) -> None:
        i = 0
        while not stop.is_set():
            x = np.full((1, 4), t * 100_000 + i, np.float32)
            try:
                y = client.infer("echo", {"x": x}, timeout=30).as_numpy("y")
                if y.tolist() != x.tolist():
                    errors.append(f"thread {t}: wrong answer {y.tolist()} for {x.tolist()}")
            except Exception as exc:  # every failure is a finding
                errors.append(f"thread {t}: {type(exc).__name__}: {exc}")
            done.append(time.monotonic())
            i += 1

    threads = [threading.Thread(target=caller, args=(t,), daemon=True) for t in range(in_flight)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: flowing(done, in_flight), 30, "calls to complete for LEAD_S")
    except AssertionError:
        stop.set()  # (the callers end with the test)
        raise
    acted = time.monotonic()
    act()
    time.sleep(AFTER_S)  # the measurement window (its length is what is measured over, not a wait for a condition)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a caller is stuck"
    return done, errors, acted


def ready_brokers(client) -> set[str]:
    return {b["name"] for b in client.brokers() if b["live"] and b["ready"]}


@pytest.mark.cluster
def test_kill_9_of_one_broker_fails_no_call(cluster):
    b1, _, addresses = two_brokers(cluster)
    client = Client(addresses, timeout=30)
    try:
        wait_for(lambda: ready_brokers(client) == {"b1", "b2"}, 30, "the client to know both brokers")
        done, errors, killed = closed_loop(client, lambda: cluster.kill(b1))
        gap = longest_gap(done, killed - LEAD_S, killed + AFTER_S)
        print(f"kill -9 of b1 with {IN_FLIGHT} in flight: {len(done)} calls, longest gap {gap * 1e3:.0f} ms")
        assert errors == [], errors[:5]
        assert gap < KILL_GAP_MAX_S, f"{gap:.3f} s without a completed call"
        assert [b["name"] for b in client.brokers() if b["live"]] == ["b2"]
        assert len([t for t in done if t > killed + 1]) > IN_FLIGHT, "calls go on through b2"
    finally:
        client.close()


@pytest.mark.cluster
def test_sigstop_of_one_broker_fails_no_call_and_it_is_back_once_it_runs(cluster):
    b1, _, addresses = two_brokers(cluster)
    client = Client(addresses, timeout=30)
    frozen = False
    try:
        wait_for(lambda: ready_brokers(client) == {"b1", "b2"}, 30, "the client to know both brokers")

        def freeze() -> None:
            nonlocal frozen
            os.kill(b1.pid, signal.SIGSTOP)
            frozen = True

        done, errors, stopped = closed_loop(client, freeze)
        gap = longest_gap(done, stopped - LEAD_S, stopped + AFTER_S)
        print(f"SIGSTOP of b1 with {IN_FLIGHT} in flight: {len(done)} calls, longest gap {gap * 1e3:.0f} ms")
        assert errors == [], errors[:5]
        assert gap < FREEZE_GAP_MAX_S, f"{gap:.3f} s without a completed call"
        assert "b1" not in {b["name"] for b in client.brokers() if b["live"]}, "the frozen broker is lost"
        os.kill(b1.pid, signal.SIGCONT)
        frozen = False
        # running again, it answers the probe of the client's new connection: live (and ready) again
        wait_for(lambda: ready_brokers(client) == {"b1", "b2"}, 30, "b1 back in rotation once it runs again")
    finally:
        if frozen:
            os.kill(b1.pid, signal.SIGCONT)
        client.close()


async def async_load(addresses: str, kill_pid: int) -> dict:
    """IN_FLIGHT tasks calling echo through an AsyncClient of both brokers; kill -9 of `kill_pid` once the load
    flows."""
    done: list[float] = []
    errors: list = []
    async with AsyncClient(addresses, timeout=30) as client:
        if not await until(lambda: {b["name"] for b in client.brokers() if b["ready"]} == {"b1", "b2"}, 30):
            return {"errors": [f"the client knows only {client.brokers()}"], "done": [], "killed": 0, "live": []}
        stop = asyncio.Event()

        async def caller(t: int) -> None:
            i = 0
            while not stop.is_set():
                x = np.full((1, 4), t * 100_000 + i, np.float32)
                try:
                    y = (await client.infer("echo", {"x": x}, timeout=30)).as_numpy("y")
                    if y.tolist() != x.tolist():
                        errors.append(f"task {t}: wrong answer")
                except Exception as exc:
                    errors.append(f"task {t}: {type(exc).__name__}: {exc}")
                done.append(time.monotonic())
                i += 1

        tasks = [asyncio.ensure_future(caller(t)) for t in range(IN_FLIGHT)]
        if not await until(lambda: flowing(done, IN_FLIGHT), 30):
            errors.append("calls did not flow within 30 s")
        killed = time.monotonic()
        os.kill(kill_pid, signal.SIGKILL)
        await asyncio.sleep(AFTER_S)  # the measurement window (measured over, not a wait for a condition)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        live = [b["name"] for b in client.brokers() if b["live"]]
    return {"errors": errors, "done": done, "killed": killed, "live": live}


@pytest.mark.cluster
def test_async_client_through_two_brokers_with_one_killed(cluster, tmp_path):
    """Run in a child process: with ZMQ_IMMEDIATE on the client's ROUTER, libzmq 4.3.5 aborted the client process
    (`Assertion failed: !_more (src/fq.cpp:80)`) in about 1 run in 8 of this test (bench/zmq_router_abort.py); the
    child keeps such an abort from taking the test session down, and the test fails on it."""
    b1, _, addresses = two_brokers(cluster)
    out = tmp_path / "async.json"
    code = (
        "import asyncio, json, sys; from tests.test_brokers_cluster import async_load; "
        f"json.dump(asyncio.run(async_load({addresses!r}, {b1.pid})), open({str(out)!r}, 'w'))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent
    )
    assert child.returncode != -signal.SIGABRT, f"the client process aborted: {child.stderr[-3000:]}"
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(out.read_text())
    gap = longest_gap(result["done"], result["killed"] - LEAD_S, result["killed"] + AFTER_S)
    calls = len(result["done"])
    print(f"AsyncClient, kill -9 of b1 with {IN_FLIGHT} in flight: {calls} calls, longest gap {gap * 1e3:.0f} ms")
    assert result["errors"] == [], result["errors"][:5]
    assert result["live"] == ["b2"]
    assert gap < KILL_GAP_MAX_S, f"{gap:.3f} s without a completed call"
