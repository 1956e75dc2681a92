"""One big JSON inference request through the HTTP edge, while another client probes `/v2/health/live` every 50 ms.

Reported: the longest gap between two answered probes (how long the edge's event loop was frozen), the edge's RSS
before, at its peak (sampled every 20 ms) and after the request, and the time of the request. The cluster is one
manager, one broker, one agent with the `echo` model and the edge (limits raised so the body is accepted).

    python3 -m bench.big_json [--mib 50] [--numbers digits|floats] [--output json|binary]

`--numbers digits`: single digits, about 2 bytes a number (the report of issue 11: 59 MiB, 31 million numbers);
`floats`: random floats with 6 decimals, about 9 bytes a number. `--output json`: the echo comes back as JSON (as
large again as the request, or larger); `binary`: in binary (`binary_data_output`).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.lib import local_cluster, log
from bench.models import make_echo_share

LIMIT_BYTES = 256 * 1024 * 1024  # the edge under test accepts this much JSON (and binary)


def make_body(mib: float, numbers: str, output: str) -> tuple[bytes, int]:
    """(body, count): an OIP request for echo with `count` numbers as JSON data, about `mib` MiB in all."""
    target = int(mib * 2**20)
    if numbers == "digits":
        count = target // 2
        digits = np.random.default_rng(0).integers(0, 10, count, dtype=np.uint8) + ord("0")
        text = np.empty(count * 2 - 1, dtype=np.uint8)
        text[0::2] = digits
        text[1::2] = ord(",")
        data = text.tobytes()
    else:
        count = target // 9
        values = np.random.default_rng(0).random(count)
        data = ",".join(f"{v:.6f}" for v in values).encode()
    params = b', "parameters": {"binary_data_output": true}' if output == "binary" else b""
    head = b'{"id": "big"%s, "inputs": [{"name": "x", "shape": [1, %d], "datatype": "FP32", "data": [' % (params, count)
    return head + data + b"]}]}", count


class Probe:
    """GET /v2/health/live every 50 ms in a thread; `gaps` are the times between two answered probes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.gaps: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            last = time.perf_counter()
            while not self._stop.is_set():
                try:
                    ok = client.get("/v2/health/live").status_code == 200
                except httpx.HTTPError:
                    ok = False
                now = time.perf_counter()
                if ok:
                    self.gaps.append(now - last)
                    last = now
                else:
                    self.failures += 1
                self._stop.wait(0.05)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(35)


class Rss:
    """Peak RSS (MiB) of one process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> Rss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.now())


def measure(edge_url: str, edge_pid: int, body: bytes, count: int, output: str) -> dict:
    """Send `body` once while probing; the figures."""
    with httpx.Client(base_url=edge_url, timeout=300) as client:
        warm = client.post(
            "/v2/models/echo/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        )
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up failed: {warm.status_code} {warm.text[:300]}")
        time.sleep(1.0)
        rss = Rss(edge_pid)
        before = rss.now()
        with rss, Probe(edge_url) as probe:
            time.sleep(0.5)
            start = time.perf_counter()
            response = client.post("/v2/models/echo/infer", content=body, headers={"content-type": "application/json"})
            seconds = time.perf_counter() - start
            time.sleep(0.5)
        if response.status_code != 200:
            raise RuntimeError(f"the big request failed: {response.status_code} {response.text[:300]}")
        if output == "json":
            tail = response.content[-200:]
            if b'"outputs"' not in response.content[:400] or not tail.endswith(b"]}]}"):
                raise RuntimeError(f"unexpected response: {response.content[:200]!r}...{tail!r}")
        response_bytes = len(response.content)
        del response
        time.sleep(2.0)
        after = rss.now()
    return {
        "body_mib": len(body) / 2**20,
        "numbers": count,
        "response_mib": response_bytes / 2**20,
        "request_s": seconds,
        "longest_gap_s": max(probe.gaps) if probe.gaps else float("nan"),
        "probes": len(probe.gaps),
        "probe_failures": probe.failures,
        "rss_before_mib": before,
        "rss_peak_mib": rss.peak,
        "rss_after_mib": after,
    }


def edge_args() -> list[str]:
    """The options that let the edge take the big body (the JSON limit only where this edge has one)."""
    args = ["--max-body-bytes", str(LIMIT_BYTES)]
    try:
        from edge.app import DEFAULT_MAX_JSON_BODY  # noqa: F401

        args += ["--max-json-body", str(LIMIT_BYTES)]
    except ImportError:  # an edge from before the JSON limit
        pass
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=50.0, help="size of the JSON body (MiB)")
    parser.add_argument("--numbers", choices=["digits", "floats"], default="digits")
    parser.add_argument("--output", choices=["json", "binary"], default="json")
    parser.add_argument("--runs", type=int, default=1, help="requests, one after the other, each measured")
    args = parser.parse_args()
    body, count = make_body(args.mib, args.numbers, args.output)
    log(f"body: {len(body) / 2**20:.1f} MiB, {count:,} numbers ({args.numbers}), output {args.output}")
    with tempfile.TemporaryDirectory(prefix="bench-big-json-") as tmp:
        share = Path(tmp) / "share"
        make_echo_share(share)
        with local_cluster(share, Path(tmp) / "logs") as cluster:
            cluster.start_manager()
            cluster.start_broker()
            cluster.start_agents(1)
            cluster.wait_for_agents(1, model="echo")
            edge = cluster.start_edge(*edge_args())
            for run in range(args.runs):
                r = measure(edge.url, edge.pid, body, count, args.output)
                print(
                    f"run {run + 1}: body {r['body_mib']:.1f} MiB ({r['numbers']:,} numbers, {args.numbers}), "
                    f"response {r['response_mib']:.1f} MiB ({args.output}): request {r['request_s']:.2f} s; "
                    f"longest /v2/health/live gap {r['longest_gap_s']:.2f} s ({r['probes']} probes, "
                    f"{r['probe_failures']} failed); edge RSS {r['rss_before_mib']:.0f} MiB before, "
                    f"{r['rss_peak_mib']:.0f} MiB peak (+{r['rss_peak_mib'] - r['rss_before_mib']:.0f}), "
                    f"{r['rss_after_mib']:.0f} MiB after",
                    flush=True,
                )


if __name__ == "__main__":
    main()
