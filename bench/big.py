"""Benchmark 5: 4 MiB tensors through `echo`, 8 in flight, 2 agents: payload bytes per second, next to the bare
pyzmq path (the set-up of benchmarks 1 and 2, bench/echo.py)."""

from __future__ import annotations

import numpy as np

from bench.echo import echo_stacks
from bench.lib import Suite, closed_loop, log, ratio_row

BIG_FLOATS = 1024 * 1024  # 4 MiB of float32
BIG_IN_FLIGHT = 8
TARGET_BIG_TENSOR_MIN_RATIO = 0.5  # 5: 4 MiB payload bytes/s >= 0.5x the bare pyzmq path


def run(suite: Suite) -> None:
    from cluster import Client

    s = suite.settings
    with echo_stacks("suite-bench_big-") as (cluster, bare):
        x = np.random.default_rng(0).random((1, BIG_FLOATS), dtype=np.float32)
        payload = x.tobytes()
        mib = len(payload) / 2**20
        ours, base = [], []
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            check = client.infer("echo", {"x": x})
            if not np.array_equal(check.as_numpy("y"), x):
                raise RuntimeError("echo of the 4 MiB tensor came back different")
            for r in range(s.rounds):
                log(f"5 big tensors: round {r + 1}/{s.rounds}: {BIG_IN_FLIGHT} in flight for {s.seconds:g} s each")
                base.append(bare.throughput(payload, BIG_IN_FLIGHT, s.seconds, s.warmup) * mib)
                result = closed_loop(client, "echo", {"x": x}, BIG_IN_FLIGHT, s.seconds, s.warmup)
                ours.append(result["throughput"] * mib)
        suite.add(
            ratio_row(
                f"5. echo 4 MiB FP32, {BIG_IN_FLIGHT} in flight (MiB/s){s.rounds_suffix()}",
                float(np.median(ours)),
                float(np.median(base)),
                0,
                f">= {TARGET_BIG_TENSOR_MIN_RATIO}x bare",
                lambda r: r >= TARGET_BIG_TENSOR_MIN_RATIO,
            )
        )
        suite.note(
            f"5: payload MiB/s = 4 MiB x answered requests per second; rounds ours {[round(v) for v in ours]}, "
            f"bare {[round(v) for v in base]}"
        )
