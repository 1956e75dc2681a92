"""Canary rollouts (issue 21), measured on real processes: how many requests fail and how long the cluster takes to
decide when a canary is bad, at the highest load this machine gives.

Each scenario starts a manager, a broker and AGENTS agents serving `scaled` (tests/models.py Scaled: y = 2x, the
answer checked) on a fresh share with the versions it needs, keeps requests in flight through one AsyncClient (each
carries its own number k in x[:, 0]; a load that counts up), starts a canary through the manager's QUERY canary, and
prints what the clients saw and what the manager decided. Nothing is asserted here: tests/test_canary_cluster.py
asserts what must hold.

    python3 -m bench.canary raising        v2 raises for a third of its inputs: retry on stable, then retry off
    python3 -m bench.canary slow           v2 is 3x slower per batch: at the 50% step, then at 10% (compute)
    python3 -m bench.canary all            both
    python3 -m bench.canary aa --runs 10   canaries of a version identical to the stable one: false rollbacks

Time to decide: the manager's rollback decision less its start decision (wall clock, both in the canary's decision
list). Expected failures with retry off: weight x 1/3 x request rate x time to decide.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.lib import log
from cluster.local import LocalCluster, wait_until
from cluster.manager.client import ManagerClient
from tests.models import CANARY_FLOATS, Scaled, publish_canary_versions, rounds_for_ms

MODEL = "scaled"
AGENTS = 2
IN_FLIGHT = 128  # raising: enough in flight for far more than RATE
RATE = 1000.0  # raising: requests per second (the issue's load; --rate 0: as many as this machine answers)
TIMEOUT = 30.0  # each request's deadline (seconds)
DECIDE_TIMEOUT = 60.0  # the most a scenario waits for the canary run to end
BASE_MS = 8.0  # slow: the stable version's forward pass; the canary's is 3x (well above the bus's noise here)


# ---- load ------------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """`in_flight` requests kept outstanding through one AsyncClient (in a thread of its own), or paced to `rate` per
    second; request k carries x[:, 0] = k (k counts up from 1) and its answer must be 2k. records: (time answered,
    k, version or None, "ok" | "wrong" | the error's class name)."""

    address: str
    in_flight: int = 32
    rate: float | None = None
    records: list = field(default_factory=list)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="canary-load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT + 10)

    async def _main(self) -> None:
        from cluster import AsyncClient

        client = AsyncClient(self.address, timeout=TIMEOUT)
        started = time.monotonic()
        try:
            await asyncio.gather(*(self._worker(client, started) for _ in range(self.in_flight)))
        finally:
            await client.close()

    async def _worker(self, client, started: float) -> None:
        while not self._stop.is_set():
            self.sent += 1
            k = self.sent % (1 << 24)  # exact in float32
            if self.rate:
                await asyncio.sleep(max(0.0, started + k / self.rate - time.monotonic()))
            x = np.full((1, CANARY_FLOATS), k, np.float32)
            try:
                result = await client.infer(MODEL, {"x": x})
            except Exception as exc:
                self.records.append((time.monotonic(), k, None, type(exc).__name__))
                continue
            y = result.as_numpy("y")
            ok = y.shape == x.shape and bool(np.allclose(y, 2 * x, rtol=1e-6))
            self.records.append((time.monotonic(), k, result.version, "ok" if ok else "wrong"))

    def count(self) -> int:
        return len(self.records)

    def wait_answers(self, n: int, timeout: float = 30.0, version: int | None = None) -> None:
        """Wait for n more answers (of `version`, if given)."""

        def answers() -> int:
            return sum(1 for r in list(self.records) if r[3] == "ok" and (version is None or r[2] == version))

        start = answers()
        wait_until(
            lambda: answers() >= start + n, timeout, f"{n} more answers" + (f" of v{version}" if version else "")
        )

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        window = [r for r in list(self.records) if since <= r[0] <= until]
        outcomes = Counter(r[3] for r in window)
        versions = Counter(r[2] for r in window if r[3] == "ok")
        seconds = (min(until, window[-1][0]) - max(since, window[0][0])) if window else 0.0
        return {
            "answered": outcomes.get("ok", 0),
            "wrong": outcomes.get("wrong", 0),
            "failed": sum(v for k, v in outcomes.items() if k not in ("ok", "wrong")),
            "errors": {k: v for k, v in outcomes.items() if k not in ("ok", "wrong")},
            "versions": dict(versions),
            "rate": len(window) / seconds if seconds > 0 else 0.0,
        }

    def canary_window(self, version: int) -> tuple[float, float] | None:
        """(first, last) time an answer of `version` came back."""
        times = [r[0] for r in list(self.records) if r[2] == version]
        return (times[0], times[-1]) if times else None


# ---- the cluster -------------------------------------------------------------------------------------------------


class CanaryCluster:
    """manager, broker and AGENTS agents serving MODEL, whose versions are `modules` (v1 the stable one)."""

    def __init__(self, workdir: Path, modules: list, batching: bool = True, log_level: str = "INFO") -> None:
        share = workdir / "share"
        (share / "models").mkdir(parents=True)
        self.versions = publish_canary_versions(share, MODEL, modules[:1], batching)
        self.later = modules[1:]
        self.batching = batching
        self.cluster = LocalCluster(share, workdir / "logs", heartbeat_interval=0.3, log_level=log_level)
        self.cluster.start_manager()
        self.cluster.start_broker()
        self.cluster.start_agents(AGENTS)
        self.cluster.wait_for_agents(AGENTS, model=MODEL)
        # the canary versions go on the share after the agents serve v1: a first deploy would take the newest
        self.versions += publish_canary_versions(share, MODEL, self.later, batching)

    @property
    def manager(self) -> ManagerClient:
        return ManagerClient(self.cluster.addresses.manager_queries)

    def canary(self, version: int, **fields) -> dict:
        """QUERY canary of `version` (fields: steps, step_seconds, shadow, shadow_only, retry, criteria)."""
        return self.manager.call("canary", timeout=10, name=MODEL, version=version, **fields)

    def status(self) -> dict | None:
        """The manager's status of MODEL's latest canary run (running or done), or None."""
        return (self.manager.call("rollouts", timeout=5, name=MODEL).get("canaries") or {}).get(MODEL)

    def wait_status(self, condition, timeout: float, what: str) -> dict:
        def check():
            s = self.status()
            return s if s is not None and condition(s) else None

        return wait_until(check, timeout, what, interval=0.05, describe=self.cluster.logs)

    def wait_running(self, version: int, timeout: float = 60.0) -> dict:
        return self.wait_status(
            lambda s: s["version"] == version and (s["phase"] == "running" or s["done"]),
            timeout,
            f"the canary of v{version} to run",
        )

    def wait_done(self, version: int, timeout: float = DECIDE_TIMEOUT) -> dict:
        return self.wait_status(
            lambda s: s["version"] == version and s["done"], timeout, f"the run of v{version} to end"
        )

    def served(self) -> dict[str, list[int]]:
        """Agent id -> the versions of MODEL it serves."""
        with contextlib.closing(self.cluster.client()) as client:
            return {a["id"]: sorted(m["version"] for m in a["models"] if m["name"] == MODEL) for a in client.agents()}

    def close(self) -> None:
        self.cluster.stop_all()

    def __enter__(self) -> CanaryCluster:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            log(self.cluster.logs())
        self.close()


def decision(status: dict, kind: str) -> dict | None:
    """The first decision `kind` ("start", "pass", "promote", "rollback", ...) of a run's status."""
    return next((d for d in status.get("decisions", []) if d.get("decision") == kind), None)


def decide_seconds(status: dict) -> float | None:
    """Seconds from the run's start decision to its rollback (or promote) decision."""
    start = decision(status, "start")
    end = decision(status, "rollback") or decision(status, "promote")
    return None if start is None or end is None else end["at"] - start["at"]


# ---- scenarios -------------------------------------------------------------------------------------------------


def raising_run(
    workdir: Path, retry: bool, rate: float | None = RATE, in_flight: int = IN_FLIGHT, steps=(10, 50, 100)
) -> dict:
    """v2 raises for every third k: started under load (`rate` per second, None: as fast as it goes) at steps[0]
    percent; the figures of the run."""
    with CanaryCluster(workdir, [Scaled(), Scaled(fail_every=3)], batching=True, log_level="WARNING") as cc:
        with Load(cc.cluster.addresses.broker_clients, in_flight=in_flight, rate=rate) as load:
            load.wait_answers(500)
            begun = time.monotonic()
            cc.canary(2, steps=list(steps), step_seconds=600.0, retry=retry)
            status = cc.wait_done(2)
            load.wait_answers(200)
            ended = time.monotonic()
        figures = {"retry": retry, "weight": steps[0], **load.summary(begun, ended)}
        window = load.canary_window(2)
        seconds = decide_seconds(status)
        rate = load.summary(begun, ended)["rate"]
        figures.update(
            outcome=status.get("outcome"),
            reason=(decision(status, "rollback") or {}).get("reason"),
            decide_s=seconds,
            canary_answers_s=None if window is None else window[1] - window[0],
            expected_failures=None if seconds is None else steps[0] / 100 / 3 * rate * seconds,
            look=status.get("look"),
        )
        return figures


def slow_run(workdir: Path, steps=(50, 100), in_flight: int = 2) -> dict:
    """v2 does 3x the compute per forward pass (BASE_MS against 3 x BASE_MS): started at steps[0] percent. A light
    load (`in_flight` 2, two agents): end-to-end times then show the compute, not the queue behind other batches."""
    base = rounds_for_ms(BASE_MS)
    with CanaryCluster(workdir, [Scaled(rounds=base), Scaled(rounds=3 * base)], batching=True) as cc:
        with Load(cc.cluster.addresses.broker_clients, in_flight=in_flight) as load:
            load.wait_answers(200)
            begun = time.monotonic()
            cc.canary(2, steps=list(steps), step_seconds=600.0, criteria={"min_requests": 100_000})
            status = cc.wait_done(2)
            ended = time.monotonic()
        rollback = decision(status, "rollback") or {}
        return {
            "weight": steps[0],
            "rollback_weight": rollback.get("weight"),
            "rounds": [base, 3 * base],
            **load.summary(begun, ended),
            "outcome": status.get("outcome"),
            "reason": rollback.get("reason"),
            "decide_s": decide_seconds(status),
            "looks": status.get("look"),
        }


def aa_runs(workdir: Path, runs: int, in_flight: int = 8, step_seconds: float = 5.0) -> list[dict]:
    """A/A: `runs` canaries of versions identical to the stable one (Scaled(), sub-millisecond), one after another
    at 10% under as much load as `in_flight` gives, default criteria: each run's outcome and its latency figures.
    Every rollback is a false one."""
    results = []
    with CanaryCluster(workdir, [Scaled()] * (runs + 1), batching=True, log_level="WARNING") as cc:
        with Load(cc.cluster.addresses.broker_clients, in_flight=in_flight) as load:
            load.wait_answers(300)
            for version in range(2, runs + 2):
                cc.canary(version, steps=[10, 100], step_seconds=step_seconds)
                status = cc.wait_done(version)
                look = status.get("look") or {}
                results.append(
                    {
                        "outcome": status["outcome"],
                        "reason": look.get("reason"),
                        "latency": (look.get("figures") or {}).get("latency"),
                        "decide_s": decide_seconds(status),
                    }
                )
                log(f"A/A run {version - 1}: {status['outcome']}: {look.get('reason')}")
            results.append({"load": load.summary()})
    return results


def show_raising(f: dict) -> None:
    decide = "n/a" if f["decide_s"] is None else f"{f['decide_s']:.2f}"
    expected = "n/a" if f["expected_failures"] is None else f"{f['expected_failures']:.0f}"
    log(
        f"raising canary at {f['weight']}%, retry on stable {'on' if f['retry'] else 'off'}: {f['outcome']} in "
        f"{decide} s (start -> rollback decision), at {f['rate']:.0f} req/s; failed requests {f['failed']} "
        f"{f['errors'] or ''} (expected weight x 1/3 x rate x time: {expected}), wrong {f['wrong']}, answers per "
        f"version {f['versions']}; reason: {f['reason']}"
    )


def show_slow(f: dict) -> None:
    decide = "n/a" if f["decide_s"] is None else f"{f['decide_s']:.2f}"
    log(
        f"3x slower canary from {f['weight']}%: {f['outcome']} at {f['rollback_weight']}% in {decide} s, at "
        f"{f['rate']:.0f} req/s, failed {f['failed']}; reason: {f['reason']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["raising", "slow", "all", "aa"])
    parser.add_argument("--runs", type=int, default=10, help="aa: canaries of identical versions, one after another")
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="raising: requests in flight")
    parser.add_argument("--rate", type=float, default=RATE, help="raising: requests per second (0: all it takes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="canary-") as tmp:
        if args.scenario in ("raising", "all"):
            for retry in (True, False):
                show_raising(raising_run(Path(tmp) / f"raising-{retry}", retry, args.rate or None, args.in_flight))
        if args.scenario == "aa":
            results = aa_runs(Path(tmp) / "aa", args.runs)
            runs = results[:-1]
            false = sum(1 for r in runs if r["outcome"] != "promoted")
            log(f"A/A at 10%, {results[-1]['load']['rate']:.0f} req/s: {false} of {len(runs)} runs rolled back (false)")
        if args.scenario in ("slow", "all"):
            show_slow(slow_run(Path(tmp) / "slow-50", steps=(50, 100)))
            show_slow(slow_run(Path(tmp) / "slow-10", steps=(10, 50, 100)))


if __name__ == "__main__":
    main()
