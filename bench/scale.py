"""Benchmark 6, scale with simulated agents (bench/sims.py): (a) the manager's CPU with 1,000 agents heartbeating once
a second, next to a bare SUB socket that decodes the same beats; (b) the broker's throughput with 100 simulated agents
next to 2 (same simulator), 64 in flight."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lib import (
    ECHO_FLOATS,
    IN_FLIGHT,
    Row,
    Settings,
    Suite,
    check_running,
    closed_loop,
    cpu_seconds,
    fmt,
    local_cluster,
    log,
    ratio_row,
    sequential,
    start_sim,
)
from bench.sims import SIM_AGENT_CAPACITY

SIM_BEAT_AGENTS = 1000
SIM_BROKER_AGENTS = 100
TARGET_MANAGER_MAX_CPU_PCT = 10.0  # 6a: manager CPU with 1,000 agents beating 1/s < 10% of one core
TARGET_BROKER_SCALE_MIN_RATIO = 0.8  # 6b: throughput with 100 agents >= 0.8x with 2


def _registered(manager_queries: str) -> int:
    """How many agents the manager lists for `echo`."""
    from cluster.manager.client import ManagerClient

    return len(ManagerClient(manager_queries).call("models", timeout=5).get("echo", {}).get("agents", []))


# ---- 6a: the manager with 1,000 agents ------------------------------------------------------------------------------


def run_manager(suite: Suite) -> None:
    s = suite.settings
    with tempfile.TemporaryDirectory(prefix="suite-manager-") as tmp:
        tmp = Path(tmp)
        (tmp / "share" / "models").mkdir(parents=True)
        with local_cluster(tmp / "share", tmp / "logs") as cluster:
            manager = cluster.start_manager()
            bare = start_sim(cluster, "bare-sub", "bare-sub")
            beats_to = f"{cluster.addresses.manager_heartbeats},{bare.addresses['address']}"
            sim = start_sim(cluster, "sim-beats", "sim-beats", beats_to, str(SIM_BEAT_AGENTS), "1.0", stop_as="agent")
            log(f"6a manager: waiting for {SIM_BEAT_AGENTS} simulated agents in the registry")
            deadline = time.monotonic() + 60
            while True:
                check_running(cluster)
                try:
                    n = _registered(cluster.addresses.manager_queries)
                except Exception:
                    n = 0
                if n >= SIM_BEAT_AGENTS:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {n} of {SIM_BEAT_AGENTS} simulated agents registered in 60 s")
                time.sleep(0.5)
            time.sleep(2)  # past the joins
            log(f"6a manager: measuring CPU for {s.cpu_seconds:g} s")
            pids = {"manager": manager.pid, "bare": bare.pid, "sim": sim.pid}
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            t = time.monotonic()
            time.sleep(s.cpu_seconds)
            wall = time.monotonic() - t
            pct = {k: (cpu_seconds(p) - before[k]) / wall * 100 for k, p in pids.items()}
            alive = _registered(cluster.addresses.manager_queries)
            check_running(cluster)
            suite.add(
                Row(
                    f"6a. manager CPU, {SIM_BEAT_AGENTS} agents beating 1/s (% of a core)",
                    fmt(pct["manager"], 1),
                    fmt(pct["bare"], 1),
                    f"{pct['manager'] / pct['bare']:.2f}x" if pct["bare"] > 0 else "n/a",
                    f"< {TARGET_MANAGER_MAX_CPU_PCT:g}%",
                    "yes" if pct["manager"] < TARGET_MANAGER_MAX_CPU_PCT else "no",
                )
            )
            suite.note(
                f"6a: baseline = a bare pyzmq SUB that msgpack-decodes the same beats into a dict (same "
                f"publisher, same time); the simulator used {pct['sim']:.1f}% of a core; {alive} agents alive "
                "at the end"
            )


# ---- 6b: the broker with 100 agents ---------------------------------------------------------------------------------


def broker_with_sim_agents(n_agents: int, s: Settings, tmp: Path) -> float:
    """A fresh broker with `n_agents` simulated agents (over 2 processes): req/s with IN_FLIGHT in flight."""
    from cluster import Client

    workdir = tmp / f"agents-{n_agents}-{time.monotonic_ns()}"
    (tmp / "share").mkdir(exist_ok=True)
    with local_cluster(tmp / "share", workdir) as cluster:
        cluster.start_broker()
        per_proc = [n_agents // 2 + (1 if i < n_agents % 2 else 0) for i in range(2)]
        for i, count in enumerate(per_proc):
            start_sim(
                cluster,
                f"sim-agents-{i}",
                "sim-agents",
                cluster.addresses.broker_agents,
                f"sim{i}-",
                str(count),
                str(SIM_AGENT_CAPACITY),
                stop_as="agent",
            )
        cluster.wait_for_agents(n_agents, model="echo")
        x = np.ones((1, ECHO_FLOATS), np.float32)
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            sequential(client, "echo", {"x": x}, 200)
            result = closed_loop(client, "echo", {"x": x}, IN_FLIGHT, s.seconds, s.warmup)
        check_running(cluster)
        return result["throughput"]


def run_broker(suite: Suite) -> None:
    s = suite.settings
    many, few = [], []
    with tempfile.TemporaryDirectory(prefix="suite-broker-") as tmp:
        for r in range(s.rounds):
            log(f"6b broker: round {r + 1}/{s.rounds}: 2 simulated agents, {IN_FLIGHT} in flight for {s.seconds:g} s")
            few.append(broker_with_sim_agents(2, s, Path(tmp)))
            log(f"6b broker: round {r + 1}/{s.rounds}: {SIM_BROKER_AGENTS} simulated agents, {IN_FLIGHT} in flight")
            many.append(broker_with_sim_agents(SIM_BROKER_AGENTS, s, Path(tmp)))
    suite.add(
        ratio_row(
            f"6b. broker, {SIM_BROKER_AGENTS} vs 2 simulated agents, {IN_FLIGHT} in flight (req/s){s.rounds_suffix()}",
            float(np.median(many)),
            float(np.median(few)),
            0,
            f">= {TARGET_BROKER_SCALE_MIN_RATIO}x 2 agents",
            lambda r: r >= TARGET_BROKER_SCALE_MIN_RATIO,
        )
    )
    suite.note(
        f"6b: simulated agents (capacity {SIM_AGENT_CAPACITY}, echo without torch) spread over 2 processes; a "
        f"fresh broker per run; rounds {SIM_BROKER_AGENTS} agents {[round(v) for v in many]}, 2 agents "
        f"{[round(v) for v in few]}"
    )
