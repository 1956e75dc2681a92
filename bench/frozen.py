"""A frozen agent under load (issue 11 point 5): 3 agents serve `echo` (and `echo-batched`, which batches up to 32,
as `cluster up`'s digits does, so that agents announce the capacity the demo cluster has), closed-loop clients keep
requests going on `echo`, one agent is stopped with SIGSTOP for a while, then SIGCONT. Completions are counted in
50 ms bins; the figure is the longest stretch of bins with no completion at all, and the throughput before, during
and after the freeze.

    PYTHONPATH=. python3 bench/frozen.py                      # defaults: 16 clients, 3 s freeze, no hedging
    PYTHONPATH=. python3 bench/frozen.py --hedge-after 0.1    # the broker hedges requests stuck 100 ms
    PYTHONPATH=. python3 bench/frozen.py --agent-capacity 64  # every model may hold 64 requests per agent

`run_freeze` is what tests/test_frozen_agent.py runs too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BIN_S = 0.05


def publish_echo_share(share: Path) -> None:
    """`echo` (no batching) and `echo-batched` (max_batch_size 32: agents then announce capacity 64, as with the
    demo share's digits)."""
    import torch

    from cluster.demo_models import ECHO_CONFIG, make_echo
    from cluster.publish import publish_version

    path = share / "echo.pt"
    share.mkdir(parents=True, exist_ok=True)
    torch.jit.save(make_echo(), str(path))
    publish_version(share, "echo", path, dict(ECHO_CONFIG))
    publish_version(share, "echo-batched", path, dict(ECHO_CONFIG, name="echo-batched", max_batch_size=32))
    path.unlink()


def longest_zero_stretch(stamps: list[float], start: float, end: float, bin_s: float = BIN_S) -> float:
    """Seconds of the longest run of consecutive `bin_s` bins between start and end with no completion."""
    bins = np.zeros(max(1, int((end - start) / bin_s)), dtype=np.int64)
    for t in stamps:
        i = int((t - start) / bin_s)
        if 0 <= i < len(bins):
            bins[i] += 1
    longest = run = 0
    for count in bins:
        run = run + 1 if count == 0 else 0
        longest = max(longest, run)
    return longest * bin_s


def closed_loop_with_freeze(
    client, pid: int, clients: int, before: float, freeze: float, after: float, model: str = "echo"
) -> dict:
    """`clients` requests kept outstanding (each answer is followed by a new request, as `clients` closed-loop
    callers would); after `before` seconds the process `pid` gets SIGSTOP, `freeze` seconds later SIGCONT, then
    `after` seconds more. Returns the figures (see the module docstring)."""
    x = np.ones((1, 64), np.float32)
    lock = threading.Lock()
    stamps: list[float] = []
    errors: dict[str, int] = {}
    agents: dict[str, int] = {}
    done = threading.Semaphore(0)

    def finished(future) -> None:
        t = time.monotonic()
        exc = future.exception()
        with lock:
            if exc is None:
                stamps.append(t)
                agent = future.result().agent
                agents[agent] = agents.get(agent, 0) + 1
            else:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        done.release()

    def submit() -> None:
        client.submit(model, {"x": x}, timeout=60).add_done_callback(finished)

    t0 = time.monotonic()
    stop_at, cont_at, end = t0 + before, t0 + before + freeze, t0 + before + freeze + after
    for _ in range(clients):
        submit()
    stopped = resumed = None
    try:
        while True:
            now = time.monotonic()
            if stopped is None and now >= stop_at:
                os.kill(pid, signal.SIGSTOP)
                stopped = time.monotonic()
            if stopped is not None and resumed is None and now >= cont_at:
                os.kill(pid, signal.SIGCONT)
                resumed = time.monotonic()
            if now >= end:
                break
            if done.acquire(timeout=0.01):
                submit()
    finally:
        if stopped is not None and resumed is None:
            os.kill(pid, signal.SIGCONT)
            resumed = time.monotonic()
    for _ in range(clients):  # every request still out is answered (or failed) before the figures
        if not done.acquire(timeout=60):
            raise RuntimeError("requests still unanswered 60 s after the run")
    with lock:
        stamps = sorted(stamps)

    def rate(a: float, b: float) -> float:
        return sum(1 for t in stamps if a <= t < b) / max(b - a, 1e-9)

    return {
        "longest_zero_s": round(longest_zero_stretch(stamps, t0 + 0.5, end), 3),
        "longest_zero_during_s": round(longest_zero_stretch(stamps, stopped, resumed + 0.5), 3),
        "before_per_s": round(rate(t0 + 0.5, stopped)),
        "during_per_s": round(rate(stopped, resumed)),
        "after_per_s": round(rate(resumed, end)),
        "completed": len(stamps),
        "errors": errors,
        "agents": agents,
    }


def run_freeze(
    cluster,
    *,
    clients: int = 16,
    before: float = 2.0,
    freeze: float = 3.0,
    after: float = 2.0,
    broker_args: tuple[str, ...] = (),
    agent_args: tuple[str, ...] = (),
) -> dict:
    """Start manager, broker and 3 agents in `cluster` (a LocalCluster over a share from publish_echo_share),
    freeze the first agent under load, return the figures and the broker's stats."""
    cluster.start_manager()
    cluster.start_broker(*broker_args)
    procs = [cluster.start_agent(f"agent-{i}", *agent_args) for i in range(3)]
    cluster.wait_for_agents(3, model="echo")
    cluster.wait_for_agents(3, model="echo-batched")
    client = cluster.client(timeout=60)
    x = np.ones((1, 64), np.float32)
    for _ in range(200):  # warm up every path (and give the broker its latency figures)
        client.infer("echo", {"x": x})
    capacities = {a["id"]: a.get("capacity") for a in client.agents(timeout=5)}
    figures = closed_loop_with_freeze(client, procs[0].pid, clients, before, freeze, after)
    figures["capacity"] = capacities
    figures["broker_stats"] = client.stats(timeout=5) if hasattr(client, "stats") else None
    return figures


def main() -> None:
    from cluster.local import LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--before", type=float, default=2.0)
    parser.add_argument("--freeze", type=float, default=3.0)
    parser.add_argument("--after", type=float, default=2.0)
    parser.add_argument("--hedge-after", type=float, default=None, help="seconds; passed to `cluster broker`")
    parser.add_argument("--agent-capacity", type=int, default=None, help="passed to `cluster agent --capacity`")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    args = parser.parse_args()
    broker_args = ("--hedge-after", str(args.hedge_after)) if args.hedge_after is not None else ()
    agent_args = ("--capacity", str(args.agent_capacity)) if args.agent_capacity is not None else ()
    with tempfile.TemporaryDirectory(prefix="bench-frozen-") as tmp:
        share = Path(tmp) / "share"
        publish_echo_share(share)
        cluster = LocalCluster(
            share, Path(tmp) / "logs", heartbeat_interval=args.heartbeat_interval, log_level="WARNING"
        )
        try:
            figures = run_freeze(
                cluster,
                clients=args.clients,
                before=args.before,
                freeze=args.freeze,
                after=args.after,
                broker_args=broker_args,
                agent_args=agent_args,
            )
        except BaseException:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.stop_all()
    print(
        f"frozen agent ({args.clients} closed-loop clients on echo, SIGSTOP {args.freeze:g} s, "
        f"heartbeat {args.heartbeat_interval:g} s, hedge {args.hedge_after or 'off'}, "
        f"agent capacity {args.agent_capacity or 'default'}):"
    )
    print(f"  longest zero-throughput stretch: {figures['longest_zero_s']:.2f} s (50 ms bins)")
    print(
        f"  throughput before / during / after: {figures['before_per_s']} / {figures['during_per_s']} / "
        f"{figures['after_per_s']} per s"
    )
    print(f"  failed requests: {sum(figures['errors'].values())} {figures['errors'] or ''}")
    print("  " + json.dumps({k: figures[k] for k in ("capacity", "agents", "broker_stats")}))


if __name__ == "__main__":
    main()
