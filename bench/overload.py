"""Overload: 2,000 concurrent clients on a slow model, through the bus (AsyncClient) and through the edge (httpx).

With load shedding, a request expected to wait in the broker's queue longer than the bound (the broker's
`--max-queue-wait`, default 5 s) is refused at once (OVERLOADED on the bus, 429 with Retry-After over HTTP). Each
client loops for `--duration` seconds: send, wait for the answer; when refused, wait the `retry_after` it was told
(as a well-behaved client does), then send again. Reported per path: requests sent, the share refused, the time to
refuse (p50, p99), the latency of accepted requests (p50, p99) against the bound, and the RSS of the broker and the
edge before, during (peak) and after the flood. Speed is reported here, never asserted in tests.

    python3 -m bench.overload [--duration 30] [--clients 2000] [--service-ms 11] [--bound 5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from bench.lib import local_cluster, log, percentile, publish_slow, slow_rounds_for
from cluster.client import AsyncClient
from cluster.demo_models import SLOW_CONFIG as CONFIG
from cluster.errors import ClusterError, OverloadedError


class RssWatch:
    """Peak RSS of some processes, sampled every 0.2 s in a thread while the flood runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict[str, float]:
        return {name: proc.memory_info().rss / 2**20 for name, proc in self.procs.items()}

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, rss in self.now().items():
                self.peak[name] = max(self.peak[name], rss)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


async def flood(send, clients: int, duration: float) -> dict:
    """`clients` loops of send() for `duration` s. send returns ("ok" | "refused" | "error", retry_after)."""
    accepted, refused, errors = [], [], []
    accepted_after_first_refusal = []  # sent once the broker had measured a rate and refused something
    first_refusal = [math.inf]
    stop_at = time.monotonic() + duration

    async def one_client(i: int) -> None:
        await asyncio.sleep(i * 0.0005)  # a ramp of one second for 2,000 clients, not one burst of connects
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            outcome, retry_after = await send()
            took = time.perf_counter() - start
            if outcome == "ok":
                accepted.append(took)
                if start > first_refusal[0]:
                    accepted_after_first_refusal.append(took)
            elif outcome == "refused":
                first_refusal[0] = min(first_refusal[0], start + took)
                refused.append(took)
                await asyncio.sleep(min(retry_after or 1.0, max(0.0, stop_at - time.monotonic())))
            else:
                errors.append(took)
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return {"accepted": accepted, "refused": refused, "errors": errors, "steady": accepted_after_first_refusal}


def report(path: str, result: dict, bound: float, rss: dict) -> list[str]:
    accepted, refused, errors = result["accepted"], result["refused"], result["errors"]
    total = len(accepted) + len(refused) + len(errors)
    lines = [
        f"{path}: {total} requests, {len(refused) / total:.1%} refused, {len(errors)} other errors",
        f"  time to refuse: p50 {percentile(refused, 50) * 1000:.1f} ms, p99 {percentile(refused, 99) * 1000:.1f} ms",
        f"  accepted: p50 {percentile(accepted, 50):.2f} s, p99 {percentile(accepted, 99):.2f} s "
        f"(queue bound {bound:g} s, plus the forward pass)",
        f"  accepted once shedding began ({len(result['steady'])}): p50 {percentile(result['steady'], 50):.2f} s, "
        f"p99 {percentile(result['steady'], 99):.2f} s (before the broker has measured the model's rate nothing is "
        "refused: the first burst queues whole)",
        "  RSS MiB before / peak during / after: "
        + ", ".join(
            f"{name} {b:.0f} / {rss['peak'][name]:.0f} / {rss['after'][name]:.0f}" for name, b in rss["before"].items()
        ),
    ]
    for line in lines:
        log(line)
    return lines


async def bus_flood(address: str, clients: int, duration: float, rounds: int) -> dict:
    inputs = {"x": np.zeros((1, 1), np.float32), "n": np.array([rounds], np.int64)}
    async with AsyncClient(address, timeout=120) as client:

        async def send():
            try:
                await client.infer("slow", inputs)
                return "ok", None
            except OverloadedError as exc:
                return "refused", exc.retry_after
            except ClusterError:
                return "error", None

        return await flood(send, clients, duration)


async def edge_flood(url: str, clients: int, duration: float, rounds: int) -> dict:
    import httpx

    body = {
        "inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.0]},
            {"name": "n", "shape": [1], "datatype": "INT64", "data": [rounds]},
        ]
    }
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:

        async def send():
            try:
                answer = await http.post("/v2/models/slow/infer", json=body)
            except httpx.HTTPError:
                return "error", None
            if answer.status_code == 200:
                return "ok", None
            if answer.status_code == 429:
                return "refused", float(answer.headers.get("retry-after", "1"))
            return "error", None

        return await flood(send, clients, duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of flood per path")
    parser.add_argument("--clients", type=int, default=2000, help="concurrent clients")
    parser.add_argument("--service-ms", type=float, default=11.0, help="forward pass of the model (~90/s at 11)")
    parser.add_argument("--bound", type=float, default=5.0, help="the broker's --max-queue-wait, seconds")
    parser.add_argument("--paths", default="bus,edge", help="bus, edge or both")
    args = parser.parse_args()
    rounds = slow_rounds_for(args.service_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        tmp = Path(tmp)
        publish_slow(tmp / "share", CONFIG)
        with local_cluster(tmp / "share", tmp / "logs") as cluster:
            cluster.start_manager()
            broker = cluster.start_broker("--max-queue-wait", str(args.bound))
            cluster.start_agent("slow-agent", "--models", "slow", "--capacity", "4", OMP_NUM_THREADS="1")
            cluster.wait_for_agents(1, model="slow")
            edge = cluster.start_edge() if "edge" in args.paths else None
            pids = {"broker": broker.popen.pid, **({"edge": edge.popen.pid} if edge else {})}
            lines = [
                f"overload: {args.clients} clients x {args.duration:g} s per path, model forward "
                f"~{args.service_ms:g} ms (~{1000 / args.service_ms:.0f}/s), one agent, "
                f"broker --max-queue-wait {args.bound:g}"
            ]
            for path in args.paths.split(","):
                watch = RssWatch(pids)
                before = watch.now()
                log(f"flooding through the {path} for {args.duration:g} s")
                with watch:
                    if path == "bus":
                        run = bus_flood(cluster.addresses.broker_clients, args.clients, args.duration, rounds)
                    else:
                        run = edge_flood(cluster.edge_url, args.clients, args.duration, rounds)
                    result = asyncio.run(run)
                time.sleep(3)
                rss = {"before": before, "peak": watch.peak, "after": watch.now()}
                lines += report(path, result, args.bound, rss)
            stats = cluster.client().stats()
            lines.append(f"broker stats: {stats}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
