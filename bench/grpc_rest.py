"""gRPC vs REST through the same edge, in the same run: throughput and p50 latency for `echo` (64 FP32) and `digits`
(one 8x8 image), each with unmodified tritonclient's asyncio clients (tritonclient.grpc.aio with raw contents,
tritonclient.http.aio with binary tensors), IN_FLIGHT requests kept in flight for SECONDS after a warm-up.
One cluster (manager, broker, 2 agents, one edge serving both doors).

    python3 -m bench.grpc_rest [--seconds 8] [--in-flight 16]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lib import ECHO_FLOATS, fmt, local_cluster, log, percentile
from cluster.demo_models import write_demo_models


def inputs_for(model: str) -> tuple[str, np.ndarray]:
    if model == "echo":
        return "x", np.random.default_rng(0).standard_normal((1, ECHO_FLOATS)).astype(np.float32)
    return "image", np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)


async def closed_loop(infer, in_flight: int, seconds: float, warmup: float) -> dict:
    """`in_flight` workers each awaiting `infer()` back to back; latencies after the warm-up only."""
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker():
        while (now := time.perf_counter()) < stop_at:
            await infer()
            done = time.perf_counter()
            if now >= measure_from:
                latencies.append(done - now)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(in_flight))), warmup + seconds + 120)
    return {"rps": len(latencies) / seconds, "p50_ms": percentile(latencies, 50) * 1e3, "n": len(latencies)}


async def run_grpc(address: str, model: str, in_flight: int, seconds: float, warmup: float) -> dict:
    import tritonclient.grpc.aio as triton

    name, array = inputs_for(model)
    async with triton.InferenceServerClient(address) as client:
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        return await closed_loop(lambda: client.infer(model, [tensor]), in_flight, seconds, warmup)


async def run_rest(url: str, model: str, in_flight: int, seconds: float, warmup: float) -> dict:
    import tritonclient.http.aio as triton

    name, array = inputs_for(model)
    client = triton.InferenceServerClient(url.split("://", 1)[1], conn_limit=in_flight)
    try:
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=True)
        return await closed_loop(lambda: client.infer(model, [tensor]), in_flight, seconds, warmup)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpc-rest-"))
    try:
        share = workdir / "share"
        write_demo_models(share)
        with local_cluster(share, workdir / "logs") as cluster:
            cluster.edge_grpc_port = 0  # gRPC on a port the OS picks, beside the HTTP edge
            cluster.start_manager()
            cluster.start_broker()
            cluster.start_agents(2)
            cluster.wait_for_agents(2, model="digits")
            cluster.start_edge()
            log(f"edge: REST {cluster.edge_url}, gRPC {cluster.grpc_address}")
            rows = []
            for model in ("echo", "digits"):
                for door, run in (("gRPC", run_grpc), ("REST", run_rest)):
                    where = cluster.grpc_address if door == "gRPC" else cluster.edge_url
                    result = asyncio.run(run(where, model, args.in_flight, args.seconds, args.warmup))
                    rows.append((model, door, result))
                    log(f"{model:6} {door:4}  {fmt(result['rps'])} req/s  p50 {fmt(result['p50_ms'], 2)} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n| model | door | req/s | p50 ms |  ({args.in_flight} in flight, {args.seconds:g} s each)")
    print("| --- | --- | ---: | ---: |")
    for model, door, result in rows:
        print(f"| {model} | {door} | {fmt(result['rps'])} | {fmt(result['p50_ms'], 2)} |")


if __name__ == "__main__":
    main()
