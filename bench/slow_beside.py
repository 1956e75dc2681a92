"""A slow model beside a fast one on one agent (issue 18 point 7): `echo` alone, then `echo` while `slow` (a forward
pass of about --slow-s seconds) is kept busy on the same agent. Before execution slots per model, echo queued behind
the slow model on the agent's one inference thread (p99 15 -> 857 ms, 2,350 -> 540 req/s in the issue) and the
broker judged the agent stalled; now each model has its own slots (its `instances`) and stalls are judged per model.

    PYTHONPATH=. python3 bench/slow_beside.py                    # 1 s slow model, 64 echo requests in flight
    PYTHONPATH=. python3 bench/slow_beside.py --seconds 10 --slow-s 1

Prints echo's p99 and throughput alone and beside the busy slow model, their ratios (same run), the slow model's
own latency, and the broker's `stalls`. `run_beside` is what tests/test_slow_beside.py runs too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lib import closed_loop, percentile, slow_rounds_for  # noqa: E402


def publish_share(share: Path) -> None:
    """`echo` and `slow` (demo_models.Slow: n rounds of a small matmul)."""
    import torch

    from cluster.demo_models import ECHO_CONFIG, SLOW_CONFIG, Slow, make_echo
    from cluster.publish import publish_version

    share.mkdir(parents=True, exist_ok=True)
    for name, module, cfg in (("echo", make_echo(), ECHO_CONFIG), ("slow", torch.jit.script(Slow()), SLOW_CONFIG)):
        path = share / f"{name}.pt"
        torch.jit.save(module, str(path))
        publish_version(share, name, path, dict(cfg))
        path.unlink()


def run_beside(cluster, seconds: float = 5.0, slow_s: float = 1.0, echo_in_flight: int = 64, slow_in_flight: int = 2):
    """One agent serving echo and slow: echo's closed loop alone, then beside `slow_in_flight` slow requests kept
    outstanding. Returns the figures (ms, req/s) and the broker's stall count."""
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("one", "--models", "echo,slow")
    cluster.wait_for_agents(1, model="slow")
    client = cluster.client()
    x = {"x": np.zeros((1, 4), np.float32)}
    slow_inputs = {"x": np.zeros((1, 4), np.float32), "n": np.array([max(1000, slow_rounds_for(slow_s))])}
    alone = closed_loop(client, "echo", x, echo_in_flight, seconds, warmup=1.0)

    stop = threading.Event()
    slow_times: list[float] = []
    errors: list[str] = []

    def keep_slow_busy() -> None:
        import time

        while not stop.is_set():
            t = time.perf_counter()
            try:
                client.infer("slow", slow_inputs, timeout=60)
            except Exception as exc:  # noqa: BLE001 - reported, not raised from a thread
                errors.append(repr(exc))
                return
            slow_times.append(time.perf_counter() - t)

    threads = [threading.Thread(target=keep_slow_busy, daemon=True) for _ in range(slow_in_flight)]
    for thread in threads:
        thread.start()
    try:
        beside = closed_loop(client, "echo", x, echo_in_flight, seconds, warmup=1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    if errors:
        raise RuntimeError(f"slow requests failed: {errors[:3]}")
    return {
        "echo_alone": {k: alone[k] for k in ("throughput", "p50_ms", "p99_ms")},
        "echo_beside_slow": {k: beside[k] for k in ("throughput", "p50_ms", "p99_ms")},
        "p99_ratio": beside["p99_ms"] / alone["p99_ms"],
        "throughput_ratio": beside["throughput"] / alone["throughput"],
        "slow_p50_ms": percentile(slow_times, 50) * 1e3 if slow_times else None,
        "slow_answers": len(slow_times),
        "broker_stalls": client.stats(timeout=5).get("stalls"),
        "stall_lines": [
            line for p in cluster.procs if p.role == "broker" for line in p.log().splitlines() if " stalled" in line
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each measuring window")
    parser.add_argument("--slow-s", type=float, default=1.0, help="the slow model's forward pass, seconds")
    parser.add_argument("--echo-in-flight", type=int, default=64)
    parser.add_argument("--slow-in-flight", type=int, default=2)
    args = parser.parse_args()
    from bench.lib import local_cluster

    with tempfile.TemporaryDirectory() as tmp:
        share = Path(tmp) / "share"
        publish_share(share)
        with local_cluster(share, Path(tmp) / "logs") as cluster:
            figures = run_beside(cluster, args.seconds, args.slow_s, args.echo_in_flight, args.slow_in_flight)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
