"""Benchmarks 1 and 2: sequential round trip to `echo` (64 float32) through cluster.Client with 2 agents (p50/p99),
and throughput with 64 requests in flight through Client and through AsyncClient (64 coroutines), each next to a bare
pyzmq ROUTER-ROUTER echo broker with 2 workers on the same path. Every answer is checked: request k carries its own
values (`Payloads`), and a wrong, lost or failed answer fails the benchmark. `echo_stacks` (both set-ups up at once)
is shared with benchmark 5 (bench/big.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from bench.lib import (
    ECHO_FLOATS,
    IN_FLIGHT,
    Suite,
    local_cluster,
    log,
    percentile,
    ratio_row,
    start_sim,
)
from bench.models import make_echo_share
from cluster.local import LocalCluster

TARGET_SEQ_P50_MAX_RATIO = 1.5  # 1: our sequential p50 <= 1.5x the bare broker's (issue 23)
TARGET_THROUGHPUT_MIN_RATIO = 0.45  # 2: Client's throughput, 64 in flight >= 0.45x the bare broker's (issue 23)
TARGET_ASYNC_THROUGHPUT_MIN_RATIO = 0.45  # 2b: AsyncClient's, 64 coroutines >= 0.45x the bare broker's (issue 23)


class Payloads:
    """Request k sends `echo` the 64 floats k, k+1, ...: its answer must be exactly them (a crossed, stale or garbled
    answer is caught, not only a failed one). Made once, so the loops measure the bus, not numpy."""

    COUNT = 4096  # distinct payloads, far more than in flight at once

    def __init__(self) -> None:
        base = np.arange(ECHO_FLOATS, dtype=np.float32)
        self.arrays = [(base + k).reshape(1, ECHO_FLOATS) for k in range(self.COUNT)]
        self.inputs = [{"x": a} for a in self.arrays]

    def check(self, k: int, result, errors: dict) -> bool:
        """The answer to request k is its own payload; else count it in `errors` (kind -> n)."""
        if np.array_equal(result.as_numpy("y"), self.arrays[k % self.COUNT]):
            return True
        errors["wrong answer"] = errors.get("wrong answer", 0) + 1
        return False


def fail_on(errors: dict, what: str) -> None:
    if errors:
        raise RuntimeError(f"echo, {what}: {sum(errors.values())} answers lost, wrong or failed: {errors}")


def checked_sequential(client, payloads: Payloads, n: int) -> list[float]:
    """`n` calls one after the other: each one's latency; every answer checked."""
    latencies = []
    errors: dict = {}
    for k in range(n):
        t = time.perf_counter()
        result = client.infer("echo", payloads.inputs[k % payloads.COUNT], timeout=60)
        latencies.append(time.perf_counter() - t)
        payloads.check(k, result, errors)
    fail_on(errors, "sequential")
    return latencies


def client_closed_loop(client, payloads: Payloads, in_flight: int, seconds: float, warmup: float) -> float:
    """Client.submit keeping `in_flight` requests outstanding for warmup + seconds (as bench.lib.closed_loop, every
    answer checked in its done callback): answers per second in the window."""
    done = threading.Semaphore(0)
    errors: dict = {}
    answered: list[float] = []  # when each right answer came (list.append: safe from any thread)
    window = [float("inf"), float("inf")]
    next_k = [0]

    def finished(future, k: int) -> None:
        t = time.perf_counter()
        exc = future.exception()
        if exc is not None:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        elif payloads.check(k, future.result(), errors):
            answered.append(t)
        done.release()

    def submit() -> None:
        k = next_k[0]
        next_k[0] += 1
        future = client.submit("echo", payloads.inputs[k % payloads.COUNT], timeout=60)
        future.add_done_callback(lambda f, k=k: finished(f, k))

    for _ in range(in_flight):
        submit()
    window[0] = time.perf_counter() + warmup
    window[1] = window[0] + seconds
    while time.perf_counter() < window[1]:
        if not done.acquire(timeout=60):
            raise RuntimeError("echo: no answer for 60 s")
        submit()
    for _ in range(in_flight):
        if not done.acquire(timeout=60):
            raise RuntimeError("echo: in-flight requests not answered within 60 s")
    fail_on(errors, f"Client, {in_flight} in flight")
    return sum(window[0] <= t <= window[1] for t in answered) / seconds


async def async_closed_loop(client, payloads: Payloads, in_flight: int, seconds: float, warmup: float) -> float:
    """`in_flight` coroutines each awaiting AsyncClient.infer in a loop for warmup + seconds (the same closed loop
    and window as client_closed_loop), every answer checked: answers per second in the window."""
    errors: dict = {}
    counted = 0
    next_k = 0
    start = time.perf_counter() + warmup
    end = start + seconds

    async def caller() -> None:
        nonlocal counted, next_k
        while True:
            k = next_k
            next_k += 1
            try:
                result = await client.infer("echo", payloads.inputs[k % payloads.COUNT], timeout=60)
            except Exception as exc:  # counted, and the benchmark fails below
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                result = None
            t = time.perf_counter()
            if result is not None and payloads.check(k, result, errors) and start <= t <= end:
                counted += 1
            if t > end:
                return

    await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(in_flight))), warmup + seconds + 60)
    fail_on(errors, f"AsyncClient, {in_flight} coroutines")
    return counted / seconds


def async_throughput(address: str, payloads: Payloads, in_flight: int, seconds: float, warmup: float) -> float:
    """AsyncClient's figure, in a loop of its own (asyncio.run) on this thread; a short warm-up call first."""
    from cluster import AsyncClient

    async def go() -> float:
        async with AsyncClient(address, timeout=60) as client:
            checked = {}
            payloads.check(0, await client.infer("echo", payloads.inputs[0], timeout=60), checked)
            fail_on(checked, "AsyncClient warm-up")
            return await async_closed_loop(client, payloads, in_flight, seconds, warmup)

    return asyncio.run(go())


class BareBus:
    """The bare pyzmq ROUTER-ROUTER echo broker and 2 workers (bench/sims.py), started as `cluster`'s processes, and
    a DEALER client to drive them."""

    def __init__(self, cluster: LocalCluster) -> None:
        addresses = start_sim(cluster, "bare-broker", "bare-broker").addresses
        self.front = addresses["front"]
        for i in range(2):
            start_sim(cluster, f"bare-worker-{i}", "bare-worker", addresses["back"])
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(self.front)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Both workers registered: a few hundred requests all answered."""
        payload = np.ones(ECHO_FLOATS, np.float32).tobytes()
        deadline = time.monotonic() + timeout
        self.sock.send(payload)
        while not self.sock.poll(100):
            if time.monotonic() > deadline:
                raise RuntimeError("bare broker did not answer")
        self.sock.recv()
        time.sleep(0.5)  # the second worker
        for _ in range(500):
            self.sock.send(payload)
            if not self.sock.poll(10_000):
                raise RuntimeError("bare broker stopped answering")
            self.sock.recv()

    def sequential(self, payload: bytes, n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            t = time.perf_counter()
            self.sock.send(payload, copy=False)
            self.sock.recv(copy=False)
            latencies.append(time.perf_counter() - t)
        return latencies

    def throughput(self, payload: bytes, in_flight: int, seconds: float, warmup: float) -> float:
        sock = self.sock
        for _ in range(in_flight):
            sock.send(payload, copy=False)
        start = time.perf_counter() + warmup
        end = start + seconds
        done = 0
        while True:
            if not sock.poll(60_000):
                raise RuntimeError("bare broker stopped answering")
            sock.recv(copy=False)
            now = time.perf_counter()
            if now > end:
                break
            if now >= start:
                done += 1
            sock.send(payload, copy=False)
        for _ in range(in_flight - 1):
            if not sock.poll(60_000):
                raise RuntimeError("bare broker stopped answering")
            sock.recv(copy=False)
        return done / seconds

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@contextlib.contextmanager
def echo_stacks(prefix: str):
    """Our cluster (manager, broker, 2 agents serving echo) and the bare pyzmq bus, both up; stopped by pid after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tmp = Path(tmp)
        make_echo_share(tmp / "share")
        with local_cluster(tmp / "share", tmp / "logs") as cluster:
            cluster.start_manager()
            cluster.start_broker()
            cluster.start_agents(2, "--capacity", str(IN_FLIGHT))
            bare = BareBus(cluster)
            try:
                cluster.wait_for_agents(2, model="echo")
                bare.wait_ready()
                yield cluster, bare
            finally:
                bare.close()


def run(suite: Suite) -> None:
    from cluster import Client

    s = suite.settings
    with echo_stacks("suite-bench_echo-") as (cluster, bare):
        x = np.ones((1, ECHO_FLOATS), np.float32)
        payload = x.tobytes()
        payloads = Payloads()
        address = cluster.addresses.broker_clients
        keys = ("ours_p50", "ours_p99", "bare_p50", "bare_p99", "ours_tput", "async_tput", "bare_tput")
        results: dict[str, list] = {k: [] for k in keys}
        with Client(address, timeout=60) as client:
            checked_sequential(client, payloads, 500)  # warm-up
            for r in range(s.rounds):
                log(f"1/2 echo: round {r + 1}/{s.rounds}: sequential ({s.seq_requests} requests each)")
                lat = bare.sequential(payload, s.seq_requests)
                results["bare_p50"].append(percentile(lat, 50) * 1e6)
                results["bare_p99"].append(percentile(lat, 99) * 1e6)
                lat = checked_sequential(client, payloads, s.seq_requests)
                results["ours_p50"].append(percentile(lat, 50) * 1e6)
                results["ours_p99"].append(percentile(lat, 99) * 1e6)
                log(f"1/2 echo: round {r + 1}/{s.rounds}: {IN_FLIGHT} in flight for {s.seconds:g} s each")
                results["bare_tput"].append(bare.throughput(payload, IN_FLIGHT, s.seconds, s.warmup))
                results["ours_tput"].append(client_closed_loop(client, payloads, IN_FLIGHT, s.seconds, s.warmup))
                results["async_tput"].append(async_throughput(address, payloads, IN_FLIGHT, s.seconds, s.warmup))
        med = {k: float(np.median(v)) for k, v in results.items()}
        rounds = s.rounds_suffix()
        suite.add(
            ratio_row(
                f"1. echo 64 FP32, sequential p50 (us){rounds}",
                med["ours_p50"],
                med["bare_p50"],
                0,
                f"<= {TARGET_SEQ_P50_MAX_RATIO}x bare",
                lambda r: r <= TARGET_SEQ_P50_MAX_RATIO,
            ),
            ratio_row(f"1. echo 64 FP32, sequential p99 (us){rounds}", med["ours_p99"], med["bare_p99"], 0, "-"),
            ratio_row(
                f"2. echo 64 FP32, {IN_FLIGHT} in flight, Client (req/s){rounds}",
                med["ours_tput"],
                med["bare_tput"],
                0,
                f">= {TARGET_THROUGHPUT_MIN_RATIO}x bare",
                lambda r: r >= TARGET_THROUGHPUT_MIN_RATIO,
            ),
            ratio_row(
                f"2b. echo 64 FP32, {IN_FLIGHT} coroutines, AsyncClient (req/s){rounds}",
                med["async_tput"],
                med["bare_tput"],
                0,
                f">= {TARGET_ASYNC_THROUGHPUT_MIN_RATIO}x bare",
                lambda r: r >= TARGET_ASYNC_THROUGHPUT_MIN_RATIO,
            ),
        )
        per_round = {k: [round(x) for x in v] for k, v in results.items()}
        suite.note(
            "1/2: baseline = bench/sims.py's bare pyzmq ROUTER-ROUTER broker + 2 DEALER workers (no protocol, "
            "no model); every answer of ours checked (request k echoes its own values); per-round figures: "
            + json.dumps(per_round)
        )
