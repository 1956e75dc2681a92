"""Benchmarks 1 and 2: sequential round trip to `echo` (64 float32) through cluster.Client with 2 agents (p50/p99),
and throughput with 64 requests in flight, each next to a bare pyzmq ROUTER-ROUTER echo broker with 2 workers on the
same path. `echo_stacks` (both set-ups up at once) is shared with benchmark 5 (bench/big.py)."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from bench.lib import (
    ECHO_FLOATS,
    IN_FLIGHT,
    Suite,
    closed_loop,
    local_cluster,
    log,
    percentile,
    ratio_row,
    sequential,
    start_sim,
)
from bench.models import make_echo_share
from cluster.local import LocalCluster

TARGET_SEQ_P50_MAX_RATIO = 2.0  # 1: our sequential p50 <= 2.0x the bare broker's (issue 13)
TARGET_THROUGHPUT_MIN_RATIO = 0.45  # 2: our throughput, 64 in flight >= 0.45x the bare broker's (issue 13)


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
        results = {"ours_p50": [], "ours_p99": [], "bare_p50": [], "bare_p99": [], "ours_tput": [], "bare_tput": []}
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            sequential(client, "echo", {"x": x}, 500)  # warm-up
            for r in range(s.rounds):
                log(f"1/2 echo: round {r + 1}/{s.rounds}: sequential ({s.seq_requests} requests each)")
                lat = bare.sequential(payload, s.seq_requests)
                results["bare_p50"].append(percentile(lat, 50) * 1e6)
                results["bare_p99"].append(percentile(lat, 99) * 1e6)
                lat = sequential(client, "echo", {"x": x}, s.seq_requests)
                results["ours_p50"].append(percentile(lat, 50) * 1e6)
                results["ours_p99"].append(percentile(lat, 99) * 1e6)
                log(f"1/2 echo: round {r + 1}/{s.rounds}: {IN_FLIGHT} in flight for {s.seconds:g} s each")
                results["bare_tput"].append(bare.throughput(payload, IN_FLIGHT, s.seconds, s.warmup))
                ours = closed_loop(client, "echo", {"x": x}, IN_FLIGHT, s.seconds, s.warmup)
                results["ours_tput"].append(ours["throughput"])
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
                f"2. echo 64 FP32, {IN_FLIGHT} in flight (req/s){rounds}",
                med["ours_tput"],
                med["bare_tput"],
                0,
                f">= {TARGET_THROUGHPUT_MIN_RATIO}x bare",
                lambda r: r >= TARGET_THROUGHPUT_MIN_RATIO,
            ),
        )
        per_round = {k: [round(x) for x in v] for k, v in results.items()}
        suite.note(
            "1/2: baseline = bench/sims.py's bare pyzmq ROUTER-ROUTER broker + 2 DEALER workers (no protocol, "
            "no model); per-round figures: " + json.dumps(per_round)
        )
