"""Benchmark 4: dynamic batching on vs off for a TorchScript MLP (4 x Linear 2048x2048, >= 2 ms per sample on one
thread), published twice with the same weights (mlp_batched, mlp_single), 64 in flight, 2 agents; then the same with
the agents at OMP_NUM_THREADS=1 as a control."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.lib import (
    AGENT_OMP_FIX,
    IN_FLIGHT,
    Row,
    Settings,
    Suite,
    closed_loop,
    fmt,
    local_cluster,
    log,
    percentile,
    ratio_row,
    sequential,
)
from bench.models import MLP_LAYERS, MLP_WIDTH, build_mlp, tensor_config, time_forward

TARGET_MIN_SAMPLE_MS = 2.0  # 4: one forward pass of one sample costs at least this (else batching is moot)
TARGET_BATCHING_MIN_SPEEDUP = 3.0  # 4: throughput with batching >= 3x without
TARGET_BATCHING_P99_MAX_RATIO = 1.0  # 4: p99 with batching no worse than without


def batching_run(share: Path, workdir: Path, module, s: Settings, env: dict) -> dict:
    """2 agents (with `env`) serving mlp_single and mlp_batched: sequential latency, then 64 in flight off and on."""
    import torch

    from cluster import Client

    with local_cluster(share, workdir) as cluster:
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(2, "--capacity", str(IN_FLIGHT), **env)
        cluster.wait_for_agents(2, model="mlp_batched")
        cluster.wait_for_agents(2, model="mlp_single")
        x = np.random.default_rng(0).random((1, MLP_WIDTH), dtype=np.float32)
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            for name in ("mlp_single", "mlp_batched"):
                with torch.inference_mode():
                    expected = module(torch.from_numpy(x)).numpy()
                if not np.allclose(client.infer(name, {"x": x}).as_numpy("y"), expected, atol=1e-4):
                    raise RuntimeError(f"{name} answered wrongly")
            sequential(client, "mlp_single", {"x": x}, 10)
            seq = sequential(client, "mlp_single", {"x": x}, 50 if s.quick else 200)
            log(f"4 batching{' ' + str(env) if env else ''}: off, {IN_FLIGHT} in flight for {s.batch_seconds:g} s")
            off = closed_loop(client, "mlp_single", {"x": x}, IN_FLIGHT, s.batch_seconds, max(1.0, s.warmup))
            log(f"4 batching{' ' + str(env) if env else ''}: on, {IN_FLIGHT} in flight for {s.batch_seconds:g} s")
            on = closed_loop(client, "mlp_batched", {"x": x}, IN_FLIGHT, s.batch_seconds, max(1.0, s.warmup))
            stats = {a["id"]: (a.get("batching") or {}).get("mlp_batched", {}) for a in client.agents()}
        mean_batch = [v.get("mean_batch") for v in stats.values()]
        return {"seq_p50_ms": percentile(seq, 50) * 1e3, "off": off, "on": on, "mean_batch": mean_batch}


def run(suite: Suite) -> None:
    import torch

    from cluster.publish import publish_version

    s = suite.settings
    with tempfile.TemporaryDirectory(prefix="suite-batch-") as tmp:
        tmp = Path(tmp)
        share = tmp / "share"
        model_path = tmp / "mlp.pt"
        module = build_mlp(model_path)
        one = time_forward(module, torch.randn(1, MLP_WIDTH), 30)
        batch = time_forward(module, torch.randn(IN_FLIGHT, MLP_WIDTH), 5)
        batched = tensor_config("mlp_batched", MLP_WIDTH, IN_FLIGHT, 2000)
        publish_version(share, "mlp_batched", model_path, config=batched, version=1)
        publish_version(share, "mlp_single", model_path, config=tensor_config("mlp_single", MLP_WIDTH), version=1)
        suite.add(
            Row(
                f"4. MLP {MLP_LAYERS}x{MLP_WIDTH}: one sample, 1 torch thread, in-process (ms)",
                fmt(one * 1e3, 2),
                f"batch of {IN_FLIGHT}: {batch * 1e3:.1f} ms ({batch * 1e3 / IN_FLIGHT:.2f}/sample)",
                "-",
                f">= {TARGET_MIN_SAMPLE_MS:g} ms",
                "yes" if one * 1e3 >= TARGET_MIN_SAMPLE_MS else "no",
            )
        )
        runs = {}
        for label, env in (("default", {}), ("omp1", AGENT_OMP_FIX)):
            runs[label] = r = batching_run(share, tmp / f"logs-{label}", module, s, env)
            off, on = r["off"], r["on"]
            if label == "default":
                suite.add(
                    Row(
                        "4. mlp_single sequential through the cluster, p50 (ms) vs in-process",
                        fmt(r["seq_p50_ms"], 2),
                        fmt(one * 1e3, 2),
                        f"{r['seq_p50_ms'] / (one * 1e3):.2f}x",
                    ),
                    ratio_row(
                        f"4. batching on vs off, {IN_FLIGHT} in flight (req/s)",
                        on["throughput"],
                        off["throughput"],
                        0,
                        f">= {TARGET_BATCHING_MIN_SPEEDUP:g}x off",
                        lambda v: v >= TARGET_BATCHING_MIN_SPEEDUP,
                    ),
                    ratio_row(
                        f"4. batching on vs off, {IN_FLIGHT} in flight, p99 (ms)",
                        on["p99_ms"],
                        off["p99_ms"],
                        1,
                        "<= 1.0x off (no worse)",
                        lambda v: v <= TARGET_BATCHING_P99_MAX_RATIO,
                    ),
                )
            else:
                suite.add(
                    Row(
                        "4. control, agents OMP_NUM_THREADS=1: sequential p50 (ms) vs in-process",
                        fmt(r["seq_p50_ms"], 2),
                        fmt(one * 1e3, 2),
                        f"{r['seq_p50_ms'] / (one * 1e3):.2f}x",
                    ),
                    ratio_row(
                        "4. control, agents OMP_NUM_THREADS=1: batching on vs off (req/s)",
                        on["throughput"],
                        off["throughput"],
                        0,
                        "- (control)",
                    ),
                    ratio_row(
                        "4. control, agents OMP_NUM_THREADS=1: batching on vs off, p99 (ms)",
                        on["p99_ms"],
                        off["p99_ms"],
                        1,
                        "- (control)",
                    ),
                )
            suite.note(
                f"4 ({label} agents{', env ' + str(env) if env else ''}): p50 on {on['p50_ms']:.1f} ms, "
                f"off {off['p50_ms']:.1f} ms; mean batch per agent {r['mean_batch']}"
            )
        suite.note(
            f"4: batched model max_batch_size {IN_FLIGHT}, max_queue_delay_us 2000; both configs publish the "
            "same model.pt; the control run starts the same agents with OMP_NUM_THREADS=1, to check that the "
            "agents' `--threads 1` reaches their inference threads (it did not before each worker thread set "
            "it; the runs agree now)"
        )
