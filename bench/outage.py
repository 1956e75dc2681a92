"""A long outage of the broker or the manager (issue 11, point 2): what clients see once it is back.

Broker: closed-loop client threads call `echo` through one Client; the broker is killed (-9), stays down
`--broker-outage` seconds, and is started again on the same addresses (LocalCluster.restart). Printed per outage: the
errors by type, split into requests in flight during the outage (they wait in the client and are re-sent on the new
connection) and requests sent once the broker was back; when every agent was registered with the new broker again
(seconds from the new broker listening); the first 0.5 s window with at least 80% of the throughput measured before
the kill; and the time to full throughput, the later of those two (with few client threads one agent can carry the
whole load, so the throughput alone does not show agents that are still missing).

Manager: killed, down `--manager-outage` seconds, started again: how long until its registry lists every agent.

Every process runs with the production timings (heartbeat 1 s, liveness 3, reconnect 1 s doubling to 32 s), not the
short ones the other tests use, since the outage's effect depends on them. Nothing is asserted here
(tests/test_outage.py does, on the same functions).

    python3 -m bench.outage [--broker-outage 10,30] [--manager-outage 20] [--agents 3] [--threads 4]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.client import Client
from cluster.errors import ClusterError
from cluster.local import LocalCluster, wait_until

WINDOW_S = 0.5  # throughput is measured over windows this long
FULL = 0.8  # "full throughput": at least this share of the rate before the outage
REQUEST_TIMEOUT = 90.0  # long enough that a request made during a 30 s outage waits rather than times out


def write_echo_share(share: Path) -> Path:
    """A share with the echo demo model only (no training)."""
    from cluster.demo_models import ECHO_CONFIG, make_echo
    from cluster.publish import publish_version

    share.mkdir(parents=True, exist_ok=True)
    path = share.parent / "echo.pt"
    make_echo().save(str(path))
    publish_version(share, "echo", path, ECHO_CONFIG)
    path.unlink()
    return share


def production_cluster(share: Path, workdir: Path, **kwargs) -> LocalCluster:
    """Heartbeats once a second, liveness 3, the default reconnect settings (nothing set: each process's own)."""
    return LocalCluster(share, workdir, heartbeat_interval=1.0, liveness=3, reconnect=None, log_level="INFO", **kwargs)


@dataclass
class Load:
    """Closed-loop client threads on `echo`: each sends one request, waits for its outcome, sends the next."""

    client: Client
    threads: int
    outcomes: list = field(default_factory=list)  # (sent, done, outcome: "ok" or the error's class name)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def _loop(self, i: int) -> None:
        x = np.full((1, 64), i, np.float32)
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                self.client.infer("echo", {"x": x}, timeout=REQUEST_TIMEOUT)
                outcome = "ok"
            except ClusterError as exc:
                outcome = type(exc).__name__
            self.outcomes.append((sent, time.monotonic(), outcome))

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(REQUEST_TIMEOUT + 5)

    def rate(self, start: float, end: float) -> float:
        """Successful answers per second that arrived in [start, end)."""
        return sum(1 for _, done, o in list(self.outcomes) if o == "ok" and start <= done < end) / (end - start)

    def full_throughput_at(self, since: float, baseline: float) -> float | None:
        """The start of the first WINDOW_S window from `since` with at least FULL * baseline answers per second."""
        done = sorted(d for _, d, o in list(self.outcomes) if o == "ok" and d >= since)
        j = 0
        for i, start in enumerate(done):
            while j < len(done) and done[j] < start + WINDOW_S:
                j += 1
            if (j - i) / WINDOW_S >= FULL * baseline:
                return start
        return None


@dataclass
class BrokerOutage:
    outage_s: float
    baseline_rate: float  # answers per second before the kill
    back_after_kill_s: float  # the new broker listened this long after the kill
    registered_s: float | None  # every agent registered with the new broker, seconds after it listened
    first_answer_s: float | None  # the first answer after it listened
    rate_back_s: float | None  # the first window at FULL * baseline_rate, seconds after it listened
    errors_before_back: dict  # error class -> count, requests in flight during the outage
    errors_after_back: dict  # error class -> count, requests sent once the new broker listened
    answered_before_back: int  # requests in flight during the outage that were answered (after the restart)

    @property
    def full_throughput_s(self) -> float | None:
        """Every agent back and the rate back: the later of the two."""
        if self.registered_s is None or self.rate_back_s is None:
            return None
        return max(self.registered_s, self.rate_back_s)

    def line(self) -> str:
        def s(v):
            return "never" if v is None else f"{v:.2f} s"

        return (
            f"broker down {self.outage_s:g} s (listening {self.back_after_kill_s:.1f} s after the kill): baseline "
            f"{self.baseline_rate:.0f} req/s; after it listened: first answer {s(self.first_answer_s)}, every agent "
            f"registered {s(self.registered_s)}, rate >= {FULL:.0%} {s(self.rate_back_s)}, full throughput "
            f"{s(self.full_throughput_s)}; errors for requests sent after it was back: "
            f"{self.errors_after_back or 'none'}; requests in flight during the outage: {self.answered_before_back} "
            f"answered after the restart, errors {self.errors_before_back or 'none'}"
        )


def broker_outage(
    cluster: LocalCluster, broker, agents: int, outage_s: float, threads: int = 4, settle_s: float = 15.0
) -> tuple[BrokerOutage, object]:
    """Load on echo, kill -9 the broker, `outage_s` down, restart it; measure until full throughput (or `settle_s`
    after the restart), plus one more second of errors. Returns the figures and the new broker process."""
    cluster.wait_for_agents(agents, timeout=60, model="echo")
    client = cluster.client()
    watcher = cluster.client()
    load = Load(client, threads)
    load.start()
    time.sleep(1.0)  # warm up
    t0 = time.monotonic()
    time.sleep(3.0)  # measure the rate before the outage
    baseline = load.rate(t0, time.monotonic())
    killed = time.monotonic()
    cluster.kill(broker)
    time.sleep(outage_s)  # the outage itself
    broker = cluster.restart(broker)
    back = time.monotonic()

    def registered():
        try:
            return len(watcher.agents(timeout=1)) >= agents
        except ClusterError:
            return False

    try:
        wait_until(registered, settle_s, "every agent registered with the new broker", interval=0.05)
        registered_s = time.monotonic() - back
    except TimeoutError:
        registered_s = None
    try:
        wait_until(lambda: load.full_throughput_at(back, baseline), settle_s, "full throughput", interval=0.05)
    except TimeoutError:
        pass
    time.sleep(1.0)
    load.stop()
    errors_before, errors_after = {}, {}
    answered_before = 0
    for sent, done, outcome in load.outcomes:
        if done < killed:
            continue
        if outcome == "ok":
            answered_before += sent < back
            continue
        target = errors_after if sent >= back else errors_before
        target[outcome] = target.get(outcome, 0) + 1
    firsts = [d for _, d, o in load.outcomes if o == "ok" and d >= back]
    rate_back = load.full_throughput_at(back, baseline)
    result = BrokerOutage(
        outage_s,
        baseline,
        back - killed,
        registered_s,
        min(firsts) - back if firsts else None,
        None if rate_back is None else rate_back - back,
        errors_before,
        errors_after,
        answered_before,
    )
    return result, broker


def manager_outage(cluster: LocalCluster, manager, agents: int, outage_s: float, settle_s: float = 30.0):
    """Kill -9 the manager, `outage_s` down, restart it; seconds from it listening until its registry lists every
    agent (None if not within `settle_s`), and the new manager process."""
    wait_until(lambda: len(cluster.manager_query("agents")) >= agents, 60, "every agent in the manager's registry")
    cluster.kill(manager)
    time.sleep(outage_s)  # the outage itself
    manager = cluster.restart(manager)
    back = time.monotonic()
    try:
        wait_until(
            lambda: len(cluster.manager_query("agents", timeout=1)) >= agents,
            settle_s,
            "every agent in the restarted manager's registry",
            interval=0.05,
        )
        return time.monotonic() - back, manager
    except TimeoutError:
        return None, manager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-outage", default="10,30", help="seconds the broker stays down, comma-separated")
    parser.add_argument("--manager-outage", default="20", help="seconds the manager stays down, comma-separated")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="closed-loop client threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        share = write_echo_share(Path(tmp) / "share")
        with production_cluster(share, Path(tmp) / "logs") as cluster:
            manager = cluster.start_manager()
            broker = cluster.start_broker()
            cluster.start_agents(args.agents)
            for outage in [float(s) for s in args.broker_outage.split(",") if s]:
                result, broker = broker_outage(cluster, broker, args.agents, outage, args.threads)
                print(result.line(), flush=True)
            for outage in [float(s) for s in args.manager_outage.split(",") if s]:
                took, manager = manager_outage(cluster, manager, args.agents, outage)
                when = "not within 30 s" if took is None else f"{took:.2f} s after it listened"
                print(f"manager down {outage:g} s: every agent back in its registry {when}", flush=True)


if __name__ == "__main__":
    main()
