"""The canary judge, without I/O: the brokers' summed digests in, a decision and its reason out.

The manager (cluster/manager/canaries.py) calls `Judge.look` each time a digest arrives (every
canary_digest_interval per broker); the judge keeps no state between looks (it reads cumulative counts), so a
restarted manager judges the same from the same counts, and looking often does not inflate false rollbacks: the
error test is anytime-valid (a mixture sequential probability ratio test, Lindon et al., KDD 2022).

- Errors: which version each failure (error or timeout) came from, given each step's split, against the mixture
  Bayes factor (stats.py: a one-sided Beta mixture, one factor per step, multiplied); rolled back when it passes
  1/alpha.
- Latency: Mann-Whitney U from the two service-time histograms (or, at weights below `compute_below`, the per-batch
  compute times at equal batch sizes, since a small canary's batches fill more slowly), with a minimum effect (the
  median ratio past `latency_ratio`, or the p99 ratio past `p99_ratio` once each side has `p99_min` answers), as
  Kayenta pairs significance with effect size. Only the current step's times count. This test is not
  anytime-valid: its small alpha and the minimum effect keep A/A rollbacks rare (bench/canary_judge.py measures it;
  `python3 -m bench.canary aa` on real processes).
- Shadow: pairs beyond tolerance (relative error past max(rtol, 10 x the floor's p99)), mismatched, inexact or
  failed, and top-1 disagreements, less the same share for the stable version mirrored to itself (the noise floor).
- A step passes with enough exposure (min_requests canary answers and step_seconds) and no rejection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from cluster.canary import histogram, stats
from cluster.canary.digest import ShadowDigest, StepDigest, VersionDigest


@dataclass
class Criteria:
    """What the judge asks of a canary. Every field can be set per run (`cluster deploy --canary ... --alpha ...`,
    the `criteria` of QUERY canary); `to_wire` keeps only those that differ from the defaults."""

    alpha: float = 0.01  # the error test's bound on false rollbacks, however often it looks
    min_requests: int = 100  # canary answers a step needs before it may pass
    latency_ratio: float = 1.5  # the least slowdown (canary/stable, median or p99) that rolls back ...
    latency_alpha: float = 0.001  # ... when Mann-Whitney also finds it significant at this level (one-sided)
    latency_min: int = 30  # answers (or batches) per version before latency is judged
    p99_min: int = 1000  # ... and before the p99 ratio counts as an effect (the median's alone before that: the p99
    # of a few hundred answers is their few slowest, and an A/A canary on real processes was rolled back on it) ...
    p99_ratio: float = 2.0  # ... as a slowdown of at least this (tails are noisier: an A/A canary's p99 of 1,500
    # compute times on real processes was 1.54x stable's)
    latency_floor_ms: float = 1.0  # and the slowdown (of the median or p99) is at least this many ms: a version just
    # loaded runs its first calls slower (TorchScript's profiling runs), which in an A/A canary of a sub-millisecond
    # model was a significant 1.54x median that no user would notice
    compute_below: int = 50  # at weights below this (percent), latency is judged on per-batch compute time
    drift_rate: float = 0.01  # shadow: more than this share of pairs beyond tolerance (and the floor) is drift
    rtol: float = 1e-3  # shadow: float outputs agree within atol + rtol x |stable| ...
    atol: float = 1e-5  # ...
    min_pairs: int = 50  # shadow pairs before drift is judged
    breaker_consecutive: int = 20  # each broker's circuit breaker: this many canary failures in a row, or ...
    breaker_window: int = 50  # ... of its last this many canary answers ...
    breaker_rate: float = 0.5  # ... this share failed: the broker sets the canary's weight to 0 on its own

    def to_wire(self) -> dict:
        default = Criteria()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}

    @classmethod
    def from_wire(cls, data) -> Criteria:
        """ValueError naming the field for an unknown field or a value of the wrong type or range."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError("criteria must be a map")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown criterion {key!r}; known: {', '.join(known)}")
            default = getattr(cls(), key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"criterion {key!r} must be a finite number >= 0")
            if isinstance(default, int) and value != int(value):
                raise ValueError(f"criterion {key!r} must be a whole number")
            values[key] = type(default)(value)
        criteria = cls(**values)
        if not 0 < criteria.alpha < 1 or not 0 < criteria.latency_alpha < 1:
            raise ValueError("alpha and latency_alpha must be between 0 and 1")
        return criteria


@dataclass
class Look:
    """What the judge looks at: the canary's state and the cluster's counts for it (summed over brokers)."""

    stable: int  # the stable version
    canary: int  # the canary version
    step: int  # the current step's index
    weight: int  # the weight (percent) in force at this step
    step_elapsed: float  # seconds since the step began
    step_seconds: float  # the least time a step runs
    shadow_only: bool
    steps: dict[int, StepDigest]  # step index -> counts at it (every step so far)


@dataclass
class Verdict:
    """The judge's answer to one look."""

    decision: str  # "continue" (keep looking), "pass" (the step is over: next step or promote), "rollback"
    reason: str  # one line, for `cluster rollouts` and the log
    figures: dict = field(default_factory=dict)  # {versions: {"v": {requests, errors, error_rate, p50_ms, p99_ms}}
    # (the current step; string keys, for msgpack), errors: {log_bf, threshold}, latency: {basis, canary_n, stable_n,
    # z, p, median_ratio, p99_ratio}, shadow: {pairs, beyond, drift_rate, threshold, floor_p99, top1_agreement,
    # exact, ...}}: each part only once it could be computed


def _failures(d: VersionDigest | None) -> tuple[int, int]:
    """(failures, answers) of a version: errors and timeouts both count against it (a canary that hangs has no
    service times to judge, only timeouts)."""
    return (d.errors + d.timeouts, d.answered) if d is not None else (0, 0)


def _ms(bucket: int | None) -> float | None:
    return None if bucket is None else round(histogram.middle(bucket) * 1e3, 3)


def _ratio(canary: int | None, stable: int | None) -> float | None:
    if canary is None or stable is None:
        return None
    return round(histogram.middle(canary) / histogram.middle(stable), 3)


def _slower_by(canary: dict, stable: dict, q: float) -> float:
    """Seconds by which the canary's q-quantile is above stable's (0 when either is empty)."""
    mine, theirs = histogram.quantile(canary, q), histogram.quantile(stable, q)
    return 0.0 if mine is None or theirs is None else mine - theirs


def _version_figures(d: VersionDigest) -> dict:
    failed, answered = _failures(d)
    return {
        "requests": answered,
        "errors": failed,
        "error_rate": round(failed / answered, 6) if answered else 0.0,
        "p50_ms": _ms(histogram.quantile_bucket(d.service, 0.5)),
        "p99_ms": _ms(histogram.quantile_bucket(d.service, 0.99)),
    }


def _bad_share(d: ShadowDigest, threshold: float) -> tuple[int, float]:
    """(pairs beyond tolerance, the share of compared answers that disagree): float pairs whose max relative error
    is past `threshold` (whole buckets only), mismatched pairs, inexact integer pairs, failed mirrors; or, when
    higher, the share of [N, C] rows whose top-1 differs."""
    beyond = sum(n for b, n in d.rel_err.items() if histogram.lower(b, histogram.ERROR_BASE) >= threshold)
    total = d.pairs + d.errors
    if not total:
        return beyond, 0.0
    bad = min(total, beyond + d.mismatched + (d.exact_pairs - d.exact) + d.errors)
    top1 = (d.top1_rows - d.top1_agree) / d.top1_rows if d.top1_rows else 0.0
    return beyond, max(bad / total, top1)  # a changed top-1 is mostly also a pair beyond: not added twice


class Judge:
    """Stateless: `look` reads only the cumulative counts it is given, so any number of looks, or a restarted
    manager, judge alike."""

    def __init__(self, criteria: Criteria | None = None) -> None:
        self.criteria = criteria or Criteria()

    def look(self, look: Look) -> Verdict:
        c = self.criteria
        current = look.steps.get(look.step) or StepDigest()
        figures: dict = {
            "versions": {str(v): _version_figures(d) for v, d in sorted(current.versions.items()) if d.answered}
        }
        where = f"step {look.step} ({look.weight}%)"
        rollback = None
        if not look.shadow_only and look.canary != look.stable:
            rollback = self._errors(look, figures) or self._latency(look, current, figures)
        drift = self._shadow(look, figures)
        rollback = rollback or drift
        if rollback:
            return Verdict("rollback", f"{where}: {rollback}", figures)
        if look.shadow_only:
            pairs = figures.get("shadow", {}).get("pairs", 0)
            if pairs >= c.min_pairs and look.step_elapsed >= look.step_seconds:
                return Verdict("pass", f"{where}: no drift in {pairs} shadow pairs", figures)
            return Verdict(
                "continue",
                f"{where}: {pairs}/{c.min_pairs} shadow pairs, {look.step_elapsed:.1f}/{look.step_seconds:g} s",
                figures,
            )
        answers = _failures(current.versions.get(look.canary))[1]
        if answers >= c.min_requests and look.step_elapsed >= look.step_seconds:
            return Verdict(
                "pass", f"{where}: passed with {answers} canary answers in {look.step_elapsed:.1f} s", figures
            )
        return Verdict(
            "continue",
            f"{where}: {answers}/{c.min_requests} canary answers, {look.step_elapsed:.1f}/{look.step_seconds:g} s",
            figures,
        )

    def _errors(self, look: Look, figures: dict) -> str | None:
        """The mixture Bayes factor over every step so far (stats.py); a rollback reason or None."""
        counts = []
        for k in sorted(look.steps):
            versions = look.steps[k].versions
            x, n_canary = _failures(versions.get(look.canary))
            y, n_stable = _failures(versions.get(look.stable))
            counts.append((x, n_canary, y, n_stable))
        log_bf = stats.errors_log_bf(counts)
        threshold = math.log(1.0 / self.criteria.alpha)
        figures["errors"] = {"log_bf": round(log_bf, 3), "threshold": round(threshold, 3)}
        if log_bf < threshold:
            return None
        x, n_canary, y, n_stable = (sum(col) for col in zip(*counts))
        return (
            f"errors: canary {x}/{n_canary} ({x / max(n_canary, 1):.2%}) vs stable {y}/{n_stable} "
            f"({y / max(n_stable, 1):.2%}), log Bayes factor {log_bf:.1f} >= {threshold:.1f}"
        )

    def _latency(self, look: Look, step: StepDigest, figures: dict) -> str | None:
        """Mann-Whitney U at this step with a minimum effect; a rollback reason or None."""
        c = self.criteria
        canary, stable = step.versions.get(look.canary), step.versions.get(look.stable)
        if canary is None or stable is None:
            return None
        if look.weight < c.compute_below:
            # a small canary's batches fill more slowly: compare compute times at equal batch sizes, and stable's
            # times reweighted to the canary's batch sizes for the effect
            basis = "compute"
            sizes = sorted(set(canary.compute) & set(stable.compute))
            strata = [(canary.compute[b], stable.compute[b]) for b in sizes]
            pooled: dict[int, float] = {}
            weighted: dict[int, float] = {}
            for mine, theirs in strata:
                n_mine, n_theirs = histogram.total(mine), histogram.total(theirs)
                histogram.merge(pooled, mine)
                if n_theirs:
                    for b, n in theirs.items():
                        weighted[b] = weighted.get(b, 0.0) + n * n_mine / n_theirs
            n_c = sum(histogram.total(m) for m, _ in strata)
            n_s = sum(histogram.total(t) for _, t in strata)
        else:
            basis = "service"
            strata = [(canary.service, stable.service)]
            pooled, weighted = canary.service, stable.service
            n_c, n_s = histogram.total(canary.service), histogram.total(stable.service)
        part: dict = {"basis": basis, "canary_n": n_c, "stable_n": n_s}
        figures["latency"] = part
        if n_c < c.latency_min or n_s < c.latency_min:
            return None
        z = stats.stratified_z(strata)
        if z is None:
            return None
        p = stats.normal_sf(z)
        median = _ratio(histogram.quantile_bucket(pooled, 0.5), histogram.quantile_bucket(weighted, 0.5))
        p99 = _ratio(histogram.quantile_bucket(pooled, 0.99), histogram.quantile_bucket(weighted, 0.99))
        part.update(z=round(z, 3), p=float(f"{p:.3g}"), median_ratio=median, p99_ratio=p99)
        if min(n_c, n_s) < c.p99_min:
            p99 = None  # shown, not judged: too few answers for their p99 to be more than noise
        floor = c.latency_floor_ms / 1e3
        slow_median = (median or 0.0) >= c.latency_ratio and _slower_by(pooled, weighted, 0.5) >= floor
        slow_tail = (p99 or 0.0) >= c.p99_ratio and _slower_by(pooled, weighted, 0.99) >= floor
        if p > c.latency_alpha or not (slow_median or slow_tail):
            return None
        which, ratio, bound = ("median", median, c.latency_ratio) if slow_median else ("p99", p99, c.p99_ratio)
        return (
            f"latency ({basis} times): canary {which} {ratio:.2f}x stable's (>= {bound:g}x), "
            f"Mann-Whitney z {z:.1f}, p {p:.2g} <= {c.latency_alpha:g}"
        )

    def _shadow(self, look: Look, figures: dict) -> str | None:
        """Mirrored answers against stable's, over every step, judged against the floor; a rollback reason or None."""
        c = self.criteria
        shadow, floor = ShadowDigest(), ShadowDigest()
        for step in look.steps.values():
            shadow.add(step.shadow)
            floor.add(step.floor)
        if not shadow.pairs and not shadow.errors:
            return None
        floor_p99 = (
            histogram.quantile(floor.rel_err, 0.99, histogram.ERROR_BASE) if histogram.total(floor.rel_err) else None
        )
        threshold = max(c.rtol, 10.0 * floor_p99) if floor_p99 is not None else c.rtol
        beyond, share = _bad_share(shadow, threshold)
        floor_share = _bad_share(floor, threshold)[1] if floor.pairs >= c.min_pairs else 0.0
        drift = max(0.0, share - floor_share)
        part = {
            "pairs": shadow.pairs,
            "beyond": beyond,
            "mismatched": shadow.mismatched,
            "errors": shadow.errors,
            "drift_rate": round(drift, 6),
            "threshold": float(f"{threshold:.3g}"),
            "floor_pairs": floor.pairs,
        }
        if floor_p99 is not None:
            part["floor_p99"] = float(f"{floor_p99:.3g}")
        if shadow.top1_rows:
            part["top1_agreement"] = round(shadow.top1_agree / shadow.top1_rows, 6)
        if shadow.exact_pairs:
            part["exact"] = round(shadow.exact / shadow.exact_pairs, 6)
        figures["shadow"] = part
        if shadow.pairs < c.min_pairs or drift <= c.drift_rate:
            return None
        return (
            f"shadow drift: {drift:.1%} of {shadow.pairs} pairs disagree beyond the floor (> {c.drift_rate:.1%}; "
            f"{beyond} past rel err {threshold:.2g}, {shadow.mismatched} mismatched, {shadow.errors} failed)"
        )
