"""Benchmark 7: routing with a slow agent. 3 agents serve `work`; one of them reads its own share, where the same
model name and version costs 10x more; round-robin vs least-outstanding, a fresh cluster per policy."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from bench.lib import AGENT_OMP_FIX, Settings, Suite, closed_loop, local_cluster, log, ratio_row, sequential
from bench.models import WORK_WIDTH, build_work, tensor_config, time_forward

ROUTE_IN_FLIGHT = 16
ROUTE_CAPACITY = 16  # high enough that the capacity cap does not hide what the policy does
WORK_FAST_ITERS = 100  # ~1 ms on one thread here
WORK_SLOW_ITERS = 1000  # ~10 ms: the slow agent's copy of the same model name and version


def routing_run(policy: str, share_fast: Path, share_slow: Path, s: Settings, workdir: Path, env: dict) -> dict:
    from cluster import Client

    with local_cluster(share_fast, workdir) as cluster:
        cluster.start_manager()
        cluster.start_broker("--policy", policy)
        for name in ("fast-1", "fast-2"):
            cluster.start_agent(name, "--capacity", str(ROUTE_CAPACITY), **env)
        cluster.start_agent("slow-1", "--capacity", str(ROUTE_CAPACITY), CLUSTER_SHARE=str(share_slow), **env)
        cluster.wait_for_agents(3, model="work")
        x = np.ones((1, WORK_WIDTH), np.float32)
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            sequential(client, "work", {"x": x}, 30)
            return closed_loop(client, "work", {"x": x}, ROUTE_IN_FLIGHT, s.route_seconds, s.warmup)


def run(suite: Suite) -> None:
    import torch

    from cluster.publish import publish_version

    s = suite.settings
    with tempfile.TemporaryDirectory(prefix="suite-route-") as tmp:
        tmp = Path(tmp)
        costs = {}
        for kind, iters in (("fast", WORK_FAST_ITERS), ("slow", WORK_SLOW_ITERS)):
            path = tmp / f"work-{kind}.pt"
            module = build_work(path, iters)
            costs[kind] = time_forward(module, torch.ones(1, WORK_WIDTH), 20) * 1e3
            publish_version(tmp / f"share-{kind}", "work", path, config=tensor_config("work", WORK_WIDTH), version=1)
        slow = f"{WORK_SLOW_ITERS // WORK_FAST_ITERS}x"
        # One OpenMP thread in the agents, as bench 4's control. (Before the agents set torch's thread count in their
        # worker threads, 3 agents x 2 spinning OpenMP threads on 2 cores collapsed: 0 requests in 3 s.)
        for label, env in (("omp1", AGENT_OMP_FIX),):
            results = {}
            for policy in ("round-robin", "least-outstanding"):
                log(f"7 routing ({label} agents): {policy}, {ROUTE_IN_FLIGHT} in flight for {s.route_seconds:g} s")
                results[policy] = routing_run(
                    policy, tmp / "share-fast", tmp / "share-slow", s, tmp / f"logs-{label}-{policy}", env
                )
            rr, lo = results["round-robin"], results["least-outstanding"]
            what = ", agents OMP_NUM_THREADS=1"
            suite.add(
                ratio_row(
                    f"7. routing, 1 of 3 agents {slow} slow{what}: p99 (ms), least-outstanding vs round-robin",
                    lo["p99_ms"],
                    rr["p99_ms"],
                    1,
                    "- (report)",
                ),
                ratio_row(
                    f"7. routing{what}: p50 (ms), least-outstanding vs round-robin",
                    lo["p50_ms"],
                    rr["p50_ms"],
                    1,
                    "- (report)",
                ),
                ratio_row(
                    f"7. routing{what}: throughput (req/s), least-outstanding vs round-robin",
                    lo["throughput"],
                    rr["throughput"],
                    0,
                    "- (report)",
                ),
            )
            cut = (1 - lo["p99_ms"] / rr["p99_ms"]) * 100 if rr["p99_ms"] else float("nan")
            share = {
                p: {a: f"{100 * n / sum(r['agents'].values()):.0f}%" for a, n in sorted(r["agents"].items())}
                for p, r in results.items()
            }
            suite.note(
                f"7 ({label} agents{', env ' + str(env) if env else ''}): least-outstanding cuts p99 by "
                f"{cut:.0f}%; requests per agent: {json.dumps(share)}"
            )
    suite.note(
        f"7: model `work` costs {costs['fast']:.2f} ms (fast share) / {costs['slow']:.2f} ms (the slow agent's "
        f"share, same name and version) per call on one thread in-process; agents --capacity {ROUTE_CAPACITY}, "
        f"{ROUTE_IN_FLIGHT} in flight, a fresh cluster per policy"
    )
