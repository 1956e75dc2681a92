"""`cluster bench`: a load generator for users (what Triton's perf_analyzer is), through the bus client, the HTTP
edge or its gRPC service. A sweep of levels, each measured for S seconds after a warm-up:
- closed loop, `concurrency` callers each sending the next request when the last one is answered;
- open loop, a fixed arrival `rate` (requests per second) whatever the answers do, so that latency under load is not
  hidden by callers that slow down with the server (latency counts from when the request was due).
Each level reports throughput, p50/p90/p95/p99, errors, and where the time went: queueing (the broker's queue and the
agent's) and compute, per request, from the statistics the agents keep (Triton's statistics extension), read before
and after the level.

Inputs are built from the model's metadata: zeros of each input's shape with every variable dimension set to
`--batch` (first) or 1 (others); a caller of `sample_inputs` may give whole shapes instead (`shapes={NAME: [D, ...]}`).
"""

from __future__ import annotations

import asyncio
import json
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
            "p90_ms": round(self.percentile(90), 3),
            "p95_ms": round(self.percentile(95), 3),
            "p99_ms": round(self.percentile(99), 3),
        }


@dataclass
class Split:
    """Where a level's time went, per successful request, from the agents' counters (Triton's statistics)."""

    count: int = 0  # successes counted by the agents over the level (warm-up included)
    queue_ns: int = 0  # broker queue + agent queue
    compute_ns: int = 0  # inputs + forward pass + outputs

    @classmethod
    def of(cls, model_stats: list[dict]) -> Split:
        split = cls()
        for entry in model_stats:
            stats = entry.get("inference_stats") or {}
            split.count += int(stats.get("success", {}).get("count", 0))
            split.queue_ns += int(stats.get("queue", {}).get("ns", 0))
            split.compute_ns += sum(
                int(stats.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output")
            )
        return split

    def since(self, before: Split) -> dict:
        n = self.count - before.count
        if n <= 0:
            return {"queue_ms": None, "compute_ms": None}
        return {
            "queue_ms": round((self.queue_ns - before.queue_ns) / n / 1e6, 3),
            "compute_ms": round((self.compute_ns - before.compute_ns) / n / 1e6, 3),
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


async def _timed(call, since: float, measuring_from: float, result: LoadResult) -> None:
    """Await one call; its latency counts from `since` (when it was sent, or due), its error by type, both only
    once the warm-up is over."""
    try:
        await call()
        if since >= measuring_from:
            result.latencies.append(time.monotonic() - since)
    except Exception as exc:
        if since >= measuring_from:
            result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1


async def _drive(call, concurrency: int, duration: float, warmup: float) -> LoadResult:
    result = LoadResult()
    measuring_from = time.monotonic() + warmup
    stop_at = measuring_from + duration

    async def caller():
        while True:
            start = time.monotonic()
            if start >= stop_at:
                return
            await _timed(call, start, measuring_from, result)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    result.seconds = duration
    return result


async def _drive_rate(call, rate: float, duration: float, warmup: float, max_outstanding: int = 10_000) -> LoadResult:
    """Open loop: a request due every 1/rate s, sent whether or not earlier ones were answered; its latency counts
    from when it was due (a late send is the server's delay too). Past `max_outstanding` unanswered, a due request
    is counted as an error ("Backlog") rather than sent, so the generator cannot run away with memory."""
    result = LoadResult()
    start = time.monotonic()
    measuring_from, stop_at = start + warmup, start + warmup + duration
    pending: set[asyncio.Task] = set()

    i = 0
    while (due := start + i / rate) < stop_at:
        i += 1
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) >= max_outstanding:
            if due >= measuring_from:
                result.errors["Backlog"] = result.errors.get("Backlog", 0) + 1
            continue
        task = asyncio.ensure_future(_timed(call, due, measuring_from, result))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=120)
    result.seconds = duration
    return result


@dataclass
class Level:
    """One level of a sweep: closed loop at `concurrency`, or open loop at `rate` requests per second."""

    concurrency: int | None = None
    rate: float | None = None

    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.rate is None else f"rate {self.rate:g}/s"

    async def drive(self, call, duration: float, warmup: float) -> LoadResult:
        if self.rate is not None:
            return await _drive_rate(call, self.rate, duration, warmup)
        return await _drive(call, self.concurrency, duration, warmup)


async def sweep(
    door,
    levels: list[Level],
    duration: float,
    warmup: float = 1.0,
    settle: float = 5.0,
    rows: list[dict] | None = None,
    on_row=None,
) -> list[dict]:
    """Run each level through `door` (a BusDoor, HttpDoor or GrpcDoor, opened); one summary dict per level. The
    queue/compute split waits (up to `settle` s) for the agents' heartbeats to count the level's requests.
    rows: the list each level's row is appended to as soon as it is measured (so that a caller interrupted by Ctrl-C
    still has the levels done); on_row(row): called then too (e.g. to print it)."""
    rows = [] if rows is None else rows
    for level in levels:
        before = Split.of(await door.statistics())
        result = await level.drive(door.call, duration, warmup)
        done = len(result.latencies)
        deadline = time.monotonic() + settle
        while True:
            after = Split.of(await door.statistics())
            if after.count - before.count >= done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        rows.append(
            {
                "level": level.label(),
                "concurrency": level.concurrency,
                "rate": level.rate,
                "seconds": duration,
                **result.summary(),
                **after.since(before),
                "error_types": dict(result.errors),
            }
        )
        if on_row is not None:
            on_row(rows[-1])
    return rows


def format_row(row: dict) -> str:
    split = (
        f", queue {row['queue_ms']:.3f} ms, compute {row['compute_ms']:.3f} ms"
        if row.get("queue_ms") is not None
        else ", queue/compute: not counted yet"
    )
    errors = f", {row['errors']} errors {row['error_types']}" if row["errors"] else ", 0 errors"
    return (
        f"{row['level']}: {row['throughput']:.1f} req/s, p50 {row['p50_ms']:.2f} ms, p90 {row['p90_ms']:.2f} ms, "
        f"p99 {row['p99_ms']:.2f} ms{split}{errors}"
    )


class BusDoor:
    """The bus (AsyncClient): `call` one inference, `statistics` the model's Triton entries."""

    def __init__(self, address: str, model: str, batch: int = 1, shapes=None, key: str | None = None) -> None:
        self.address, self.model, self.batch, self.shapes, self.key = address, model, batch, shapes, key

    async def __aenter__(self) -> BusDoor:
        from cluster import AsyncClient

        self.client = await AsyncClient(self.address, key=self.key).__aenter__()
        self.inputs = sample_inputs(await self.client.model_metadata(self.model), self.batch, self.shapes)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.__aexit__(*exc)

    async def call(self) -> None:
        await self.client.infer(self.model, self.inputs)

    async def statistics(self) -> list[dict]:
        from cluster.statistics import merge

        answer = await self.client.statistics(self.model)
        entries = [e for models in answer.get("agents", {}).values() for e in models.get(self.model, {}).values()]
        return [merge(entries)] if entries else []


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class HttpDoor:
    """The HTTP edge: Triton's binary tensor extension (what a tensor client such as tritonclient sends; outputs
    asked for as binary too), or OIP JSON with binary=False. token: the edge's bearer token; ca_file: the CA that
    signed an https edge's certificate (default: the system's); transport: an httpx transport (tests)."""

    def __init__(
        self,
        url: str,
        model: str,
        batch: int = 1,
        shapes=None,
        concurrency: int = 8,
        *,
        token: str | None = None,
        binary: bool = True,
        ca_file: str | None = None,
        transport=None,
    ) -> None:
        self.url, self.model, self.batch, self.shapes = url.rstrip("/"), model, batch, shapes
        self.concurrency, self.token, self.binary, self.ca_file, self.transport = (
            concurrency,
            token,
            binary,
            ca_file,
            transport,
        )

    async def __aenter__(self) -> HttpDoor:
        import ssl

        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        self.http = await httpx.AsyncClient(
            base_url=self.url,
            limits=limits,
            timeout=60,
            headers=bearer(self.token),
            verify=verify,
            transport=self.transport,
        ).__aenter__()
        meta = (await self.http.get(f"/v2/models/{self.model}")).raise_for_status().json()
        inputs = sample_inputs(meta, self.batch, self.shapes)
        specs = list(zip(inputs.items(), meta["inputs"]))
        if self.binary:
            header = {
                "inputs": [
                    {
                        "name": n,
                        "shape": list(a.shape),
                        "datatype": s["datatype"],
                        "parameters": {"binary_data_size": a.nbytes},
                    }
                    for (n, a), s in specs
                ],
                "outputs": [{"name": o["name"], "parameters": {"binary_data": True}} for o in meta.get("outputs", [])],
            }
            head = json.dumps(header).encode()
            self.content = head + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
            self.headers = {
                "Inference-Header-Content-Length": str(len(head)),
                "Content-Type": "application/octet-stream",
            }
        else:
            body = {
                "inputs": [
                    {"name": n, "shape": list(a.shape), "datatype": s["datatype"], "data": a.reshape(-1).tolist()}
                    for (n, a), s in specs
                ]
            }
            self.content, self.headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.__aexit__(*exc)

    async def call(self) -> None:
        response = await self.http.post(f"/v2/models/{self.model}/infer", content=self.content, headers=self.headers)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")

    async def statistics(self) -> list[dict]:
        response = await self.http.get(f"/v2/models/{self.model}/stats")
        return response.raise_for_status().json().get("model_stats", [])


class GrpcDoor:
    """The edge's OIP gRPC service (tritonclient.grpc.aio, raw input contents). token: the edge's bearer token (as
    `authorization` metadata); ca_file: TLS, trusting this CA (an edge with --ssl-certfile serves gRPC over TLS)."""

    def __init__(
        self, address: str, model: str, batch: int = 1, shapes=None, *, token: str | None = None, ca_file=None
    ) -> None:
        self.address, self.model, self.batch, self.shapes = address, model, batch, shapes
        self.headers = {"authorization": f"Bearer {token}"} if token else None
        self.ca_file = ca_file

    async def __aenter__(self) -> GrpcDoor:
        import tritonclient.grpc.aio as triton

        tls = {"ssl": True, "root_certificates": self.ca_file} if self.ca_file else {}
        self.client = triton.InferenceServerClient(self.address, **tls)
        meta = await self.client.get_model_metadata(self.model, headers=self.headers, as_json=True)
        specs = [
            {"name": i["name"], "datatype": i["datatype"], "shape": [int(d) for d in i["shape"]]}
            for i in meta["inputs"]
        ]
        arrays = sample_inputs({"inputs": specs}, self.batch, self.shapes)
        self.tensors = []
        for spec in specs:
            tensor = triton.InferInput(spec["name"], list(arrays[spec["name"]].shape), spec["datatype"])
            tensor.set_data_from_numpy(arrays[spec["name"]])
            self.tensors.append(tensor)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def call(self) -> None:
        await self.client.infer(self.model, self.tensors, headers=self.headers)

    async def statistics(self) -> list[dict]:
        answer = await self.client.get_inference_statistics(self.model, headers=self.headers, as_json=True)
        return answer.get("model_stats", [])


async def bench_bus(
    address: str, model: str, concurrency: int, duration: float, batch: int = 1, warmup: float = 1.0, key=None
) -> LoadResult:
    """One closed-loop level through the bus, without the statistics split (bench/curve.py's quick figure)."""
    async with BusDoor(address, model, batch, key=key) as door:
        return await _drive(door.call, concurrency, duration, warmup)
