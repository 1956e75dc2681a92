"""Faults on real processes under load, as an operator would cause them (issue 11's chaos runs, repeatable).

Each scenario starts a cluster on this machine (manager, broker, `--agents` agents serving `echo`; the edge too for
`soak`), keeps `--in-flight` bus requests outstanding (Client.submit, a closed loop), causes its fault, and prints
what the clients saw: requests answered, errors by type, p50/p99 latency, and the longest stretch with no answer
(50 ms bins). Nothing is asserted: the tests assert what must hold; these print figures for notes.

    python3 -m bench.chaos kill-agents [--seconds 60] [--every 5] [--in-flight 32]   kill -9 a random agent every 5 s
                                                                                     and start a new one
    python3 -m bench.chaos freeze      [--down 10]      SIGSTOP one of 3 agents for 10 s, then SIGCONT
    python3 -m bench.chaos broker      [--down 2]       kill -9 the broker, start it again after 2 s
    python3 -m bench.chaos manager     [--down 20]      kill -9 the manager, start it again after 20 s
    python3 -m bench.chaos drain                        SIGTERM one agent under load: its exit time
    python3 -m bench.chaos soak        [--seconds 180]  bus and HTTP load together: errors and every process's RSS
    python3 -m bench.chaos link-cut    [--down 10]      an agent in a network namespace of its own (root, iproute2)
                                                        has its link cut: when it is declared gone, when it is back
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil

from bench.lib import local_cluster, log, percentile
from cluster.demo_models import write_demo_models
from cluster.local import wait_until

BIN = 0.05  # seconds: the width of the throughput bins the longest stall is measured in


class Load:
    """`in_flight` echo requests kept outstanding through one Client (a pump thread sends one for each answer); each
    completion stamped (time, latency, error type or None) in the client's I/O thread."""

    def __init__(self, client, in_flight: int) -> None:
        self.client = client
        self.in_flight = in_flight
        self.records: list[tuple[float, float, str | None]] = []
        self.stopping = threading.Event()
        self.answered = threading.Semaphore(0)
        self.inputs = {"x": np.ones((1, 64), np.float32)}
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.sent = 0

    def _submit(self) -> None:
        self.sent += 1
        t0 = time.monotonic()
        self.client.submit("echo", self.inputs, timeout=30).add_done_callback(lambda f, t0=t0: self._done(f, t0))

    def _done(self, future, t0: float) -> None:
        t1 = time.monotonic()
        exc = future.exception()
        self.records.append((t1, t1 - t0, None if exc is None else type(exc).__name__))
        self.answered.release()

    def _pump(self) -> None:
        while not self.stopping.is_set():
            if self.answered.acquire(timeout=0.1):
                self._submit()

    def __enter__(self) -> Load:
        for _ in range(self.in_flight):
            self._submit()
        self.pump.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.pump.join(5)
        deadline = time.monotonic() + 60  # let what is in flight finish (its answers count too)
        while len(self.records) < self.sent and time.monotonic() < deadline:
            time.sleep(0.05)

    def report(self, since: float, until: float) -> dict:
        window = [r for r in self.records if since <= r[0] <= until]
        ok = [lat for _, lat, err in window if err is None]
        errors = Counter(err for _, _, err in window if err is not None)
        bins = Counter(int((t - since) / BIN) for t, _, err in window if err is None)
        longest = run = 0
        for i in range(int((until - since) / BIN)):
            run = 0 if bins.get(i) else run + 1
            longest = max(longest, run)
        return {
            "answered": len(ok),
            "rate": len(ok) / max(until - since, 1e-9),
            "errors": dict(errors),
            "p50_ms": percentile(ok, 50) * 1e3 if ok else float("nan"),
            "p99_ms": percentile(ok, 99) * 1e3 if ok else float("nan"),
            "longest_stall_s": longest * BIN,
        }


def show(what: str, figures: dict) -> None:
    log(
        f"{what}: {figures['answered']} answered ({figures['rate']:.0f}/s), errors {figures['errors'] or 'none'}, "
        f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, longest stretch with no answer "
        f"{figures['longest_stall_s']:.2f} s"
    )


def kill_agents(cluster, args) -> None:
    agents = [p for p in cluster.procs if p.role == "agent" and p.alive()]
    end = time.monotonic() + args.seconds
    killed = 0
    while time.monotonic() < end:
        time.sleep(min(args.every, max(0.0, end - time.monotonic())))
        victim = random.choice(agents)
        cluster.kill(victim)
        agents.remove(victim)
        agents.append(cluster.start_agent())
        killed += 1
    log(f"killed {killed} agents (kill -9), each replaced by a new one")


def freeze(cluster, args) -> None:
    time.sleep(2)
    victim = next(p for p in cluster.procs if p.role == "agent")
    os.kill(victim.pid, signal.SIGSTOP)
    log(f"SIGSTOP {victim.name} for {args.down:g} s")
    time.sleep(args.down)
    os.kill(victim.pid, signal.SIGCONT)
    time.sleep(3)


def restart_role(role: str):
    def scenario(cluster, args) -> None:
        time.sleep(2)
        proc = next(p for p in cluster.procs if p.role == role and p.alive())
        cluster.kill(proc)
        log(f"kill -9 the {role}; starting it again in {args.down:g} s")
        time.sleep(args.down)
        started = time.monotonic()
        cluster.restart(proc)
        log(f"the {role} serves again {time.monotonic() - started:.2f} s after its start")
        time.sleep(5)

    return scenario


def drain(cluster, args) -> None:
    time.sleep(2)
    victim = next(p for p in cluster.procs if p.role == "agent")
    started = time.monotonic()
    status = cluster.stop(victim)
    log(f"SIGTERM {victim.name}: exited with {status} after {time.monotonic() - started:.2f} s")
    time.sleep(3)


def soak(cluster, args) -> None:
    import httpx

    cluster.start_edge("--log-level", "warning")
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    http_errors: Counter = Counter()
    http_ok = 0
    procs = {p.name: psutil.Process(p.pid) for p in cluster.procs if p.alive()}
    before = {name: p.memory_info().rss for name, p in procs.items()}
    end = time.monotonic() + args.seconds
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < end:
            try:
                answer = http.post(f"{cluster.edge_url}/v2/models/echo/infer", json=body)
                if answer.status_code == 200:
                    http_ok += 1
                else:
                    http_errors[answer.status_code] += 1
            except httpx.HTTPError as exc:
                http_errors[type(exc).__name__] += 1
    after = {name: p.memory_info().rss for name, p in procs.items() if p.is_running()}
    log(f"HTTP: {http_ok} answered, errors {dict(http_errors) or 'none'}")
    for name in sorted(before):
        log(f"  {name}: RSS {before[name] / 2**20:.0f} MiB -> {after.get(name, 0) / 2**20:.0f} MiB")


class CutLink:
    """A network namespace of our own with a veth pair to this host (10.213.0.1 here, 10.213.0.2 inside), so that an
    agent can run behind a link this script cuts (`ip link set ... down`). Needs root and iproute2; removed on exit."""

    HOST, INSIDE = "10.213.0.1", "10.213.0.2"

    def __init__(self) -> None:
        tag = str(os.getpid() % 100000)
        self.ns, self.outer, self.inner = f"chaos{tag}", f"chh{tag}", f"chn{tag}"

    def __enter__(self) -> CutLink:
        self._ip("netns", "add", self.ns)
        self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        self._ip("link", "set", self.inner, "netns", self.ns)
        self._ip("addr", "add", f"{self.HOST}/30", "dev", self.outer)
        self._ip("link", "set", self.outer, "up")
        for args in (("addr", "add", f"{self.INSIDE}/30", "dev", self.inner), ("link", "set", self.inner, "up")):
            self._ip("netns", "exec", self.ns, "ip", *args)
        self._ip("netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def set(self, up: bool) -> None:
        self._ip("link", "set", self.outer, "up" if up else "down")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def link_cut(cluster, args) -> None:
    """Started by main() with the cut link in place: an agent in the namespace, its link cut for `--down` s."""
    link = cluster.cut_link
    with cluster.client() as client:
        wait_until(lambda: any(a["id"] == "cut-agent" for a in client.agents()), 60, "the agent behind the link")
        time.sleep(2)
        cut = time.monotonic()
        link.set(False)
        log(f"link to cut-agent cut for {args.down:g} s")
        gone = wait_until(lambda: all(a["id"] != "cut-agent" for a in client.agents()), 30, "the agent declared gone")
        log(f"cut-agent declared gone {time.monotonic() - cut:.2f} s after the cut")
        time.sleep(max(0.0, cut + args.down - time.monotonic()))
        link.set(True)
        back = time.monotonic()
        wait_until(lambda: any(a["id"] == "cut-agent" for a in client.agents()), 60, "the agent back")
        log(f"cut-agent serving again {time.monotonic() - back:.2f} s after the link came back")
        assert gone
        time.sleep(3)


SCENARIOS = {
    "kill-agents": kill_agents,
    "freeze": freeze,
    "broker": restart_role("broker"),
    "manager": restart_role("manager"),
    "drain": drain,
    "soak": soak,
    "link-cut": link_cut,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=None, help="kill-agents (60) and soak (180): how long")
    parser.add_argument("--every", type=float, default=5.0, help="kill-agents: seconds between kills")
    parser.add_argument("--down", type=float, default=None, help="freeze / broker / manager: seconds down")
    args = parser.parse_args()
    if args.down is None:
        args.down = {"freeze": 10.0, "manager": 20.0, "link-cut": 10.0}.get(args.scenario, 2.0)
    if args.seconds is None:
        args.seconds = 180.0 if args.scenario == "soak" else 60.0
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp, contextlib.ExitStack() as stack:
        share = Path(tmp) / "share"
        write_demo_models(share)
        link = stack.enter_context(CutLink()) if args.scenario == "link-cut" else None  # removed after the cluster
        cluster = stack.enter_context(local_cluster(share, Path(tmp) / "logs"))
        cluster.cut_link = link
        if link is not None:  # agents reach the broker and manager over the veth's host address
            cluster.requested = replace(
                cluster.requested,
                broker_agents=f"tcp://{link.HOST}:0",
                manager_heartbeats=f"tcp://{link.HOST}:0",
                manager_events=f"tcp://{link.HOST}:0",
            )
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(args.agents)
        cluster.wait_for_agents(args.agents, model="echo")
        if link is not None:
            argv = ["ip", "netns", "exec", link.ns, sys.executable, "-m", "cluster", "agent", "--id", "cut-agent"]
            cluster.spawn("cut-agent", argv, role="agent")
        with cluster.client() as client, Load(client, args.in_flight) as load:
            time.sleep(1)  # warm
            since = time.monotonic()
            SCENARIOS[args.scenario](cluster, args)
            until = time.monotonic()
        show(f"{args.scenario}, {args.in_flight} in flight over {until - since:.1f} s", load.report(since, until))


if __name__ == "__main__":
    main()
