"""The canary judge on simulated traffic (issue 21, test 7): its false rollback rate over A/A runs, and how long it
takes to roll back canaries that fail more often than stable. In-process and seeded:

    PYTHONPATH=. python3 bench/canary_judge.py [--runs 2000] [--step 30] [--decision-runs 200]

takes 3-4 minutes on a loaded 2-core machine (`--step 2`: about 30 s).

Each simulated run sends `rate` requests a second; each goes to the canary with the step's weight; each fails with its
version's error rate; answers get a batch size, a compute time and a queue wait (a version's batches fill more slowly
the less traffic it gets: at 10% the canary waits longer for its batches, which is what the judge's compute-time
basis is for). Every `look` seconds (canary_digest_interval) the judge (cluster.canary.judge.Judge, default
Criteria) looks at the cumulative StepDigests, exactly as the manager does, and passes the step, rolls back, or goes
on. tests/test_canary_judge.py runs the same simulations, smaller, and checks the bounds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from cluster.canary import histogram, stats  # noqa: E402
from cluster.canary.digest import StepDigest, VersionDigest  # noqa: E402
from cluster.canary.judge import Criteria, Judge, Look  # noqa: E402

STABLE, CANARY = 1, 2
MAX_BATCH = 8
BATCH_WINDOW = 0.050  # s: the most a batch waits to fill (a slow stream waits the whole window)
COMPUTE = 0.005  # s: one sample's forward pass; each more sample in the batch adds a quarter of it
LO, HI = 40, 200  # the histogram buckets the simulated times fall in (1 us x R**40 = 32 us .. R**200 = 33 s)


@dataclass(frozen=True)
class Scenario:
    weights: tuple[int, ...] = (10, 50)  # the steps' weights (percent)
    step_seconds: float = 30.0  # each step runs this long (the default CANARY_STEP_SECONDS)
    rate: float = 1000.0  # requests a second, all versions
    look: float = 0.25  # seconds between looks (canary_digest_interval)
    p_stable: float = 0.01  # error rates
    p_canary: float = 0.01
    slow: float = 1.0  # the canary's compute time, as a multiple of stable's
    latency: bool = True  # simulate times (off: only counts, for the error test alone)


def _times(rng, n: int, share: float, sc: Scenario, slow: float):
    """(batch sizes, compute times, service times) of n answers of a version with `share` of the traffic."""
    per_second = max(sc.rate * share, 1e-9)
    batch = np.minimum(MAX_BATCH, 1 + rng.poisson(per_second * 0.004, n))
    compute = COMPUTE * (1 + 0.25 * (batch - 1)) * rng.lognormal(0.0, 0.15, n) * slow
    wait = rng.uniform(0.0, min(BATCH_WINDOW, MAX_BATCH / per_second), n)
    return batch, compute, compute + wait


def _buckets(values: np.ndarray) -> np.ndarray:
    idx = np.floor(np.log(np.maximum(values, histogram.TIME_BASE) / histogram.TIME_BASE) / math.log(histogram.R))
    return np.clip(idx.astype(np.int64), LO, HI - 1) - LO


def simulate_step(rng, sc: Scenario, weight: int, runs: int, looks: int) -> dict:
    """Per-look counts of one step for `runs` runs, cumulative from the step's start: arrays indexed [run, look]
    (and [..., batch, bucket] for times)."""
    n = int(round(sc.rate * sc.look))
    w = weight / 100.0
    out: dict = {}
    n_canary = rng.binomial(n, w, (runs, looks))
    for version, answers, p, share, slow in (
        (CANARY, n_canary, sc.p_canary, w, sc.slow),
        (STABLE, n - n_canary, sc.p_stable, 1.0 - w, 1.0),
    ):
        errors = rng.binomial(answers, p)
        entry = {"answers": answers.cumsum(1), "errors": errors.cumsum(1)}
        if sc.latency:
            ok = (answers - errors).ravel()
            cell = np.repeat(np.arange(ok.size), ok)
            batch, compute, service = _times(rng, cell.size, share, sc, slow)
            width = HI - LO
            entry["service"] = (
                np.bincount(cell * width + _buckets(service), minlength=ok.size * width)
                .reshape(runs, looks, width)
                .cumsum(1)
            )
            slots = MAX_BATCH * width
            entry["compute"] = (
                np.bincount(cell * slots + (batch - 1) * width + _buckets(compute), minlength=ok.size * slots)
                .reshape(runs, looks, MAX_BATCH, width)
                .cumsum(1)
            )
        out[version] = entry
    return out


def _hist(row: np.ndarray) -> dict[int, int]:
    (nz,) = np.nonzero(row)
    return dict(zip((nz + LO).tolist(), row[nz].tolist()))


def digest_at(sim: dict, run: int, look: int) -> StepDigest:
    """The StepDigest of one run at one look (what the brokers' digests would sum to)."""
    step = StepDigest()
    for version, entry in sim.items():
        answers, errors = int(entry["answers"][run, look]), int(entry["errors"][run, look])
        d = VersionDigest(ok=answers - errors, errors=errors)
        if "service" in entry:
            d.service = _hist(entry["service"][run, look])
            compute = entry["compute"][run, look]
            for b in np.nonzero(compute.sum(1))[0].tolist():
                d.compute[b + 1] = _hist(compute[b])
        step.versions[version] = d
    return step


def run_judged(sc: Scenario, runs: int, seed: int, criteria: Criteria | None = None, chunk: int = 25) -> list[dict]:
    """Each run through the Judge look by look: [{decision, at (s), reason, ...}]: "rollback" (with step,
    canary_requests, canary_failures, requests), "promote" (the last step passed) or "none" (it did not)."""
    judge = Judge(criteria)
    rng = np.random.default_rng(seed)
    looks = int(round(sc.step_seconds / sc.look))
    results = []
    for start in range(0, runs, chunk):
        count = min(chunk, runs - start)
        sims = [simulate_step(rng, sc, w, count, looks) for w in sc.weights]
        for r in range(count):
            results.append(_one_run(judge, sc, sims, r, looks))
    return results


def _one_run(judge: Judge, sc: Scenario, sims: list[dict], r: int, looks: int) -> dict:
    done: dict[int, StepDigest] = {}
    failures = canary = requests = 0
    passes = 0
    for k, (weight, sim) in enumerate(zip(sc.weights, sims)):
        for t in range(looks):
            current = digest_at(sim, r, t)
            steps = {**done, k: current}
            verdict = judge.look(Look(STABLE, CANARY, k, weight, (t + 1) * sc.look, sc.step_seconds, False, steps))
            if verdict.decision == "rollback" or verdict.decision == "pass" or t == looks - 1:
                c, s = current.versions[CANARY], current.versions[STABLE]
                if verdict.decision == "rollback":
                    return {
                        "decision": "rollback",
                        "at": k * sc.step_seconds + (t + 1) * sc.look,
                        "step": k,
                        "canary_requests": canary + c.answered,
                        "canary_failures": failures + c.errors,
                        "requests": requests + c.answered + s.answered,
                        "reason": verdict.reason,
                    }
                passes += verdict.decision == "pass"
                failures, canary = failures + c.errors, canary + c.answered
                requests += c.answered + s.answered
                done[k] = current
                break
    # every step passed: the next weight would be 100 and the manager would promote
    decision = "promote" if passes == len(sc.weights) else "none"
    return {"decision": decision, "at": len(sc.weights) * sc.step_seconds, "reason": ""}


def error_test_false_rollbacks(sc: Scenario, runs: int, seed: int, alpha: float = Criteria.alpha) -> int:
    """The error test alone (stats.step_log_bf, as the judge sums it), every look of every run: how many A/A runs
    it would roll back. Counts only, vectorised; the exact factor only where its upper bound reaches the threshold."""
    rng = np.random.default_rng(seed)
    sc = replace(sc, latency=False)
    looks = int(round(sc.step_seconds / sc.look))
    threshold = math.log(1.0 / alpha)
    carried = np.zeros(runs)  # the finished steps' log factors
    rejected = np.zeros(runs, bool)
    for weight in sc.weights:
        sim = simulate_step(rng, sc, weight, runs, looks)
        x, nc = sim[CANARY]["errors"], sim[CANARY]["answers"]
        y, ns = sim[STABLE]["errors"], sim[STABLE]["answers"]
        rho = nc / np.maximum(nc + ns, 1)
        bound = stats.step_log_glr(x, x + y, rho) + np.maximum(carried, 0.0)[:, None]
        for r, t in zip(*np.nonzero(bound >= threshold)):
            if not rejected[r]:
                log_bf = carried[r] + stats.step_log_bf(int(x[r, t]), int(x[r, t] + y[r, t]), float(rho[r, t]))
                rejected[r] = log_bf >= threshold
        for r in range(runs):
            carried[r] += stats.step_log_bf(int(x[r, -1]), int(x[r, -1] + y[r, -1]), float(rho[r, -1]))
    return int(rejected.sum())


DECISION_CASES = [  # (label, canary error rate, stable error rate, requests a second)
    ("33% vs 0%", 0.33, 0.0, 1000.0),
    ("3% vs 1%", 0.03, 0.01, 1000.0),
    ("0.5% vs 0.1%", 0.005, 0.001, 1000.0),
    ("33% vs 0%, 100 req/s (the issue's Flagger case)", 0.33, 0.0, 100.0),
]


def decision_times(
    p_canary: float, p_stable: float, runs: int, seed: int, horizon: float = 120.0, rate: float = 1000.0
) -> dict:
    """Time to roll back a canary at 10% of `rate` (one step, never passed): a summary over `runs` runs."""
    sc = Scenario(weights=(10,), step_seconds=horizon, p_canary=p_canary, p_stable=p_stable, rate=rate)
    criteria = Criteria(min_requests=10**9)  # never pass: the step lasts until the judge rolls back
    results = run_judged(sc, runs, seed, criteria, chunk=25)
    decided = [r for r in results if r["decision"] == "rollback"]

    def median(key):
        return float(np.median([r[key] for r in decided])) if decided else math.nan

    return {
        "runs": runs,
        "decided": len(decided),
        "errors_basis": sum("errors:" in r["reason"] for r in decided),
        "median_s": median("at"),
        "p90_s": float(np.percentile([r["at"] for r in decided], 90)) if decided else math.nan,
        "max_s": max((r["at"] for r in decided), default=math.nan),
        "canary_requests": median("canary_requests"),
        "canary_failures": median("canary_failures"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="A/A runs")
    parser.add_argument("--step", type=float, default=30.0, help="seconds per step of an A/A run")
    parser.add_argument("--decision-runs", type=int, default=200)
    args = parser.parse_args(argv)
    alpha = Criteria.alpha
    aa = Scenario(step_seconds=args.step)
    began = time.monotonic()
    results = run_judged(aa, args.runs, seed=1)
    rolled = [r for r in results if r["decision"] == "rollback"]
    errors_only = error_test_false_rollbacks(aa, args.runs, seed=2)
    sigma = math.sqrt(alpha * (1 - alpha) / args.runs)
    looks = int(len(aa.weights) * aa.step_seconds / aa.look)
    print(
        f"A/A: {args.runs} runs at {aa.rate:g} req/s, 1% errors in both, canary {aa.weights[0]}% then "
        f"{aa.weights[1]}% for {aa.step_seconds:g} s each, {looks} looks a run (every {aa.look:g} s); alpha {alpha:g}"
    )
    on_errors = sum("errors:" in r["reason"] for r in rolled)
    print(
        f"  judge: {len(rolled)} false rollbacks = {len(rolled) / args.runs:.4f} "
        f"(errors {on_errors}, latency {len(rolled) - on_errors})"
        f"; the error test alone, other seeds: {errors_only} = {errors_only / args.runs:.4f}; "
        f"bound alpha + 4 sigma = {alpha + 4 * sigma:.4f}  ({time.monotonic() - began:.0f} s)"
    )
    print()
    runs = args.decision_runs
    print(f"Time to roll back a canary at 10% (of 1,000 req/s unless said), looks every 0.25 s, {runs} runs:")
    header = ("errors canary vs stable", "decided", "median s", "p90 s", "max s", "canary requests", "canary failures")
    print("| " + " | ".join(header) + " |")
    print("| --- " * len(header) + "|")
    for i, (label, pc, ps, rate) in enumerate(DECISION_CASES):
        d = decision_times(pc, ps, runs, seed=10 + i, rate=rate)
        print(
            f"| {label} | {d['decided']}/{d['runs']} | {d['median_s']:.2f} | {d['p90_s']:.2f} | {d['max_s']:.2f} | "
            f"{d['canary_requests']:.0f} | {d['canary_failures']:.0f} |"
        )


if __name__ == "__main__":
    main()
