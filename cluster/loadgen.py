"""`cluster bench`: a load generator for users (what Triton's perf_analyzer is): N concurrent callers for S seconds,
through the bus client or through the HTTP edge, then throughput and latency percentiles.

Inputs are built from the model's metadata: zeros of each input's shape with every variable dimension set to
`--batch` (first) or 1 (others); a caller of `sample_inputs` may give whole shapes instead (`shapes={NAME: [D, ...]}`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from cluster.protocol import DATATYPES


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")

    def summary(self) -> dict:
        return {
            "requests": len(self.latencies),
            "errors": sum(self.errors.values()),
            "throughput": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p95_ms": round(self.percentile(95), 3),
            "p99_ms": round(self.percentile(99), 3),
        }


def sample_inputs(metadata: dict, batch: int = 1, shapes: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    shapes = shapes or {}
    inputs = {}
    for spec in metadata["inputs"]:
        shape = shapes.get(spec["name"]) or [
            batch if (i == 0 and d == -1) else (1 if d == -1 else d) for i, d in enumerate(spec["shape"])
        ]
        inputs[spec["name"]] = np.zeros(shape, dtype=DATATYPES[spec["datatype"]])
    return inputs


async def _drive(call, concurrency: int, duration: float, warmup: float) -> LoadResult:
    result = LoadResult()
    measuring_from = time.monotonic() + warmup
    stop_at = measuring_from + duration

    async def caller():
        while True:
            start = time.monotonic()
            if start >= stop_at:
                return
            try:
                await call()
                if start >= measuring_from:
                    result.latencies.append(time.monotonic() - start)
            except Exception as exc:
                if start >= measuring_from:
                    result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    result.seconds = duration
    return result


async def bench_bus(
    address: str,
    model: str,
    concurrency: int,
    duration: float,
    batch: int = 1,
    shapes=None,
    warmup: float = 1.0,
    key: str | None = None,
) -> LoadResult:
    from cluster import AsyncClient

    async with AsyncClient(address, key=key) as client:
        inputs = sample_inputs(await client.model_metadata(model), batch, shapes)
        return await _drive(lambda: client.infer(model, inputs), concurrency, duration, warmup)


async def bench_http(
    url: str, model: str, concurrency: int, duration: float, batch: int = 1, shapes=None, warmup: float = 1.0
) -> LoadResult:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), limits=limits, timeout=60) as http:
        meta = (await http.get(f"/v2/models/{model}")).raise_for_status().json()
        inputs = sample_inputs(meta, batch, shapes)
        body = {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": s["datatype"], "data": a.reshape(-1).tolist()}
                for (n, a), s in zip(inputs.items(), meta["inputs"])
            ]
        }

        async def call():
            response = await http.post(f"/v2/models/{model}/infer", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")

        return await _drive(call, concurrency, duration, warmup)
