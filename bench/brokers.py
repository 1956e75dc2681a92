"""Several brokers (issue 20): faults of one broker under load, and throughput with 2 brokers against 1.

Each fault scenario starts manager, 2 brokers and 3 agents serving `echo` on this machine, keeps `--in-flight`
requests outstanding through one Client connected to both brokers (a closed loop; every request carries its own
number, and its answer is checked), causes its fault, and prints what the clients saw: answered, failed, wrong
answers, the longest stretch with no completed request (50 ms bins), and duplicate executions (the agents' executed
count minus the answers). Nothing is asserted here: tests/test_broker_failover.py asserts what must hold.

    python3 -m bench.brokers kill       kill -9 one broker
    python3 -m bench.brokers freeze     SIGSTOP one broker (a machine that vanished), SIGCONT after --down s
    python3 -m bench.brokers link-cut   one broker in a network namespace of its own, its link cut (root, iproute2)
    python3 -m bench.brokers restarts   kill -9 and restart a broker every --every s for --seconds s
    python3 -m bench.brokers throughput 2 brokers against 1, simulated agents (the broker is the bottleneck)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bench.chaos import CutLink
from bench.lib import IN_FLIGHT, check_running, cpu_seconds, local_cluster, log, start_sim
from bench.outage import write_echo_share
from bench.sims import SIM_AGENT_CAPACITY
from cluster.local import LocalCluster, Proc, wait_until

BIN = 0.05  # seconds: the width of the bins the longest stretch without an answer is measured in
AGENTS = 3
FLOATS = 16
TIMEOUT = 30.0  # each request's deadline (seconds)


@dataclass
class Traffic:
    """`in_flight` echo requests kept outstanding through one Client (each answer sends the next, from the thread
    that read it); request k carries the value k, and its answer must carry it back."""

    client: object
    in_flight: int
    records: list = field(default_factory=list)  # (time answered, "ok" | "wrong" | error class name)
    sent: int = 0
    stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _submit(self) -> None:
        with self._lock:
            if self.stopping:
                return
            self.sent += 1
            k = self.sent % (1 << 24)  # exact in float32
        future = self.client.submit("echo", {"x": np.full((1, FLOATS), k, np.float32)}, timeout=TIMEOUT)
        future.add_done_callback(lambda f, k=k: self._done(f, k))

    def _done(self, future, k: int) -> None:
        exc = future.exception()
        if exc is not None:
            outcome = type(exc).__name__
        else:
            y = future.result().as_numpy("y")
            outcome = "ok" if y.shape == (1, FLOATS) and bool((y == k).all()) else "wrong"
        self.records.append((time.monotonic(), outcome))
        self._submit()

    def __enter__(self) -> Traffic:
        for _ in range(self.in_flight):
            self._submit()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.stopping = True
        deadline = time.monotonic() + TIMEOUT + 5  # what is in flight finishes (its answers count too)
        while len(self.records) < self.sent and time.monotonic() < deadline:
            time.sleep(0.02)

    def report(self, since: float, until: float) -> dict:
        window = [r for r in self.records if since <= r[0] <= until]
        outcomes = Counter(outcome for _, outcome in window)
        bins = Counter(int((t - since) / BIN) for t, outcome in window if outcome == "ok")
        longest = run = 0
        longest_ends = 0
        for i in range(int((until - since) / BIN)):
            run = 0 if bins.get(i) else run + 1
            if run > longest:
                longest, longest_ends = run, i + 1
        return {
            "answered": outcomes.get("ok", 0),
            "rate": outcomes.get("ok", 0) / max(until - since, 1e-9),
            "wrong": outcomes.get("wrong", 0),
            "failed": {k: v for k, v in outcomes.items() if k not in ("ok", "wrong")},
            "longest_gap_s": longest * BIN,
            "longest_gap_ends_at": round(since + longest_ends * BIN, 2),  # monotonic: to compare with a fault's log
        }

    def total(self) -> int:
        """Answers (right or wrong) received in all."""
        return sum(1 for _, outcome in self.records if outcome in ("ok", "wrong"))


def executed(client) -> int:
    """Requests the agents have run in all (their heartbeats' `jobs`), as a broker last heard."""
    return sum(int(job.get("executed", 0)) for agent in client.agents() for job in (agent.get("jobs") or {}).values())


def settled_executed(client, interval: float) -> int:
    """executed(), once two heartbeats in a row agree (the agents' counts reach the broker a beat late)."""
    last = -1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = executed(client)
        if now == last:
            return now
        last = now
        time.sleep(2 * interval)
    return last


class TwoBrokers:
    """manager, 2 brokers, AGENTS agents serving echo (registered with both), and a Client of both brokers."""

    def __init__(self, tmp: Path, heartbeat: float = 0.3, link_cut: CutLink | None = None) -> None:
        self._cluster = local_cluster(write_echo_share(tmp / "share"), tmp / "logs")
        self.cluster: LocalCluster = self._cluster.__enter__()
        self.heartbeat = heartbeat
        self.cluster.heartbeat_interval = heartbeat
        self.link_cut = link_cut
        if link_cut is not None:  # everything the broker in the namespace reaches listens on the veth's host side
            self.cluster.requested = replace(
                self.cluster.requested,
                manager_heartbeats=f"tcp://{link_cut.HOST}:0",
                manager_events=f"tcp://{link_cut.HOST}:0",
                manager_queries=f"tcp://{link_cut.HOST}:0",
            )
        self.cluster.start_manager()
        self.brokers: list[Proc] = [self.cluster.start_broker()]
        self.brokers.append(self.start_cut_broker() if link_cut is not None else self.cluster.start_broker())
        self.cluster.start_agents(AGENTS, **self.broker_env())
        self.cluster.wait_for_agents(AGENTS, model="echo")

    def broker_addresses(self, kind: str = "broker_clients") -> str:
        return ",".join(b.addresses[kind] for b in self.brokers)

    def broker_env(self) -> dict:
        return {
            "CLUSTER_BROKER_CLIENTS": self.broker_addresses("broker_clients"),
            "CLUSTER_BROKER_AGENTS": self.broker_addresses("broker_agents"),
        }

    def start_cut_broker(self) -> Proc:
        """The second broker, inside the network namespace (its addresses on the veth's inner side)."""
        ns = self.link_cut
        argv = ["ip", "netns", "exec", ns.ns, sys.executable, "-m", "cluster", "broker"]
        argv += ["--clients", f"tcp://{ns.INSIDE}:15555", "--agents", f"tcp://{ns.INSIDE}:15556", "--name", "cut"]
        return self.cluster.spawn("broker-cut", argv, role="broker", ready=True)

    def client(self):
        from cluster import Client

        return Client(self.broker_addresses(), timeout=TIMEOUT)

    def broker_client(self, i: int):
        from cluster import Client

        return Client(self.brokers[i].addresses["broker_clients"], timeout=5)

    def close(self) -> None:
        self._cluster.__exit__(None, None, None)


def fault_run(args, fault) -> dict:
    """A TwoBrokers cluster under `args.in_flight` requests; `fault(two, victim)` is called after a warm second;
    the figures of the whole window, plus what `fault` returned and the duplicate executions."""
    with tempfile.TemporaryDirectory(prefix="brokers-") as tmp, contextlib.ExitStack() as stack:
        cut = stack.enter_context(CutLink()) if args.scenario == "link-cut" else None  # removed after the cluster
        two = TwoBrokers(Path(tmp), link_cut=cut)
        stack.callback(two.close)
        with two.client() as client:
            executed_before = settled_executed(client, two.heartbeat)
            with Traffic(client, args.in_flight) as traffic:
                time.sleep(1.0)
                since = time.monotonic()
                extra = fault(two, two.brokers[1]) or {}
                time.sleep(args.after)
                until = time.monotonic()
            figures = traffic.report(since, until)
            figures.update(extra)
            figures["duplicates"] = settled_executed(client, two.heartbeat) - executed_before - traffic.total()
            figures["seconds"] = until - since
        check_running(two.cluster)
        return figures


def at_agents(two: TwoBrokers, i: int) -> int | None:
    """Requests broker i has at agents now (its stats' in_flight)."""
    try:
        with two.broker_client(i) as c:
            return int(c.stats(timeout=2).get("in_flight", 0))
    except Exception:
        return None


def kill(two: TwoBrokers, victim: Proc) -> dict:
    had = at_agents(two, 1)
    killed = time.monotonic()
    two.cluster.kill(victim)
    log(f"kill -9 {victim.name}; it had {had} requests at agents")
    return {"victim_at_agents": had, "fault_at": round(killed, 2)}


def freeze(two: TwoBrokers, victim: Proc, down: float = 3.0) -> dict:
    had = at_agents(two, 1)
    os.kill(victim.pid, signal.SIGSTOP)
    log(f"SIGSTOP {victim.name} for {down:g} s; it had {had} requests at agents")
    time.sleep(down)
    os.kill(victim.pid, signal.SIGCONT)
    return {"victim_at_agents": had}


def link_cut(two: TwoBrokers, victim: Proc, down: float = 3.0) -> dict:
    had = at_agents(two, 1)
    two.link_cut.set(False)
    log(f"link of {victim.name} cut for {down:g} s; it had {had} requests at agents")
    time.sleep(down)
    two.link_cut.set(True)
    return {"victim_at_agents": had}


def restarts(two: TwoBrokers, victim: Proc, seconds: float = 120.0, every: float = 10.0) -> dict:
    """Kill -9 and restart a broker (the two in turn) every `every` s: how long after its restart (listening) until
    it routes requests again (its stats' `requests` grow)."""
    back: list[float] = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() + every <= end:
        time.sleep(every)
        which = i % 2
        i += 1
        killed = time.monotonic()
        two.cluster.kill(two.brokers[which])
        two.brokers[which] = two.cluster.restart(two.brokers[which])
        listening = time.monotonic()
        log(f"killed {two.brokers[which].name} at {killed:.2f}, listening again at {listening:.2f}")
        with two.broker_client(which) as c:
            wait_until(lambda c=c: int(c.stats(timeout=2).get("requests", 0)) > 0, 30, "the restarted broker used")
        back.append(time.monotonic() - listening)
        log(f"restart {i}: {two.brokers[which].name} routing again {back[-1]:.2f} s after it listened")
    return {"restarts": len(back), "back_in_rotation_max_s": max(back) if back else None}


def show(what: str, f: dict) -> None:
    log(
        f"{what}: {f['answered']} answered ({f['rate']:.0f}/s) in {f['seconds']:.1f} s, failed {f['failed'] or 0}, "
        f"wrong {f['wrong']}, longest stretch with no answer {f['longest_gap_s']:.2f} s, duplicate executions "
        f"{f['duplicates']} (the broker had {f.get('victim_at_agents')} at agents)"
        + (
            f", {f['restarts']} restarts, back in rotation within {f['back_in_rotation_max_s']:.2f} s at most"
            if "restarts" in f
            else ""
        )
    )


# ---- throughput: 2 brokers against 1 ---------------------------------------------------------------------------


def brokers_throughput(n_brokers: int, seconds: float, in_flight: int, tmp: Path) -> dict:
    """req/s through `n_brokers` brokers with simulated agents (2 simulator processes of 8 agents per broker), and
    the brokers' CPU seconds per request."""
    from bench.lib import closed_loop
    from cluster import Client

    workdir = tmp / f"brokers-{n_brokers}-{time.monotonic_ns()}"
    (tmp / "share").mkdir(exist_ok=True)
    with local_cluster(tmp / "share", workdir) as cluster:
        brokers = [cluster.start_broker() for _ in range(n_brokers)]
        for b, broker in enumerate(brokers):
            start_sim(
                cluster,
                f"sim-agents-{b}",
                "sim-agents",
                broker.addresses["broker_agents"],
                f"sim{b}-",
                "8",
                str(SIM_AGENT_CAPACITY),
                stop_as="agent",
            )
        addresses = ",".join(b.addresses["broker_clients"] for b in brokers)
        x = np.ones((1, FLOATS), np.float32)
        with Client(addresses, timeout=60) as client:
            wait_until(lambda: len(client.agents()) >= 8, 30, "the simulated agents")
            cpu0 = sum(cpu_seconds(b.pid) for b in brokers)
            result = closed_loop(client, "echo", {"x": x}, in_flight, seconds, 1.0)
            cpu1 = sum(cpu_seconds(b.pid) for b in brokers)
        check_running(cluster)
    requests = result["throughput"] * (seconds + 1.0)  # the brokers' CPU ran through the warm-up too
    return {"throughput": result["throughput"], "broker_cpu_us_per_request": (cpu1 - cpu0) / requests * 1e6}


def throughput(args) -> None:
    with tempfile.TemporaryDirectory(prefix="brokers-tp-") as tmp:
        one, two = [], []
        for r in range(args.rounds):
            one.append(brokers_throughput(1, args.seconds, args.in_flight, Path(tmp)))
            two.append(brokers_throughput(2, args.seconds, args.in_flight, Path(tmp)))
            log(f"round {r + 1}: 1 broker {one[-1]}, 2 brokers {two[-1]}")
    med = lambda rows, k: float(np.median([r[k] for r in rows]))  # noqa: E731
    log(
        f"throughput, {args.in_flight} in flight, simulated agents: 1 broker {med(one, 'throughput'):.0f} req/s, "
        f"2 brokers {med(two, 'throughput'):.0f} req/s, ratio {med(two, 'throughput') / med(one, 'throughput'):.2f}x; "
        f"broker CPU per request {med(one, 'broker_cpu_us_per_request'):.0f} us (1) vs "
        f"{med(two, 'broker_cpu_us_per_request'):.0f} us (2, both brokers together) (median of {args.rounds})"
    )


SCENARIOS = {"kill": kill, "freeze": freeze, "link-cut": link_cut, "restarts": restarts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=[*SCENARIOS, "throughput"])
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    parser.add_argument("--down", type=float, default=3.0, help="freeze, link-cut: seconds down")
    parser.add_argument("--seconds", type=float, default=120.0, help="restarts: how long; throughput: per level")
    parser.add_argument("--every", type=float, default=10.0, help="restarts: seconds between restarts")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of load after the fault")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: rounds (median)")
    args = parser.parse_args()
    if args.scenario == "throughput":
        if args.seconds == 120.0:
            args.seconds = 5.0
        throughput(args)
        return
    fault = SCENARIOS[args.scenario]
    if args.scenario in ("freeze", "link-cut"):
        fault = lambda two, victim: SCENARIOS[args.scenario](two, victim, args.down)  # noqa: E731
    elif args.scenario == "restarts":
        fault = lambda two, victim: restarts(two, victim, args.seconds, args.every)  # noqa: E731
    show(f"{args.scenario}, {args.in_flight} in flight", fault_run(args, fault))


if __name__ == "__main__":
    main()
