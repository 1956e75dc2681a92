"""The canary judge, without I/O: the brokers' summed digests in, a decision and its reason out.

The manager (cluster/manager/canaries.py) calls `Judge.look` each time a digest arrives (every
canary_digest_interval per broker); the judge keeps no state between looks (it reads cumulative counts), so a
restarted manager judges the same from the same counts, and looking often does not inflate false rollbacks: the
error test is anytime-valid (a mixture sequential probability ratio test, Lindon et al., KDD 2022).

- Errors: which version each error came from, given the traffic split, against the mixture Bayes factor; rolled back
  when it passes 1/alpha.
- Latency: Mann-Whitney U from the two service-time histograms (or, at weights below `compute_below`, the per-batch
  compute times at equal batch sizes, since a small canary's batches fill more slowly), with a minimum effect (median
  or p99 ratio past `latency_ratio`), as Kayenta pairs significance with effect size.
- Shadow: pairs beyond tolerance, judged against the stable version mirrored to itself (the noise floor).
- A step passes with enough exposure (min_requests canary answers and step_seconds) and no rejection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from cluster.canary.digest import StepDigest


@dataclass
class Criteria:
    """What the judge asks of a canary. Every field can be set per run (`cluster deploy --canary ... --alpha ...`,
    the `criteria` of QUERY canary); `to_wire` keeps only those that differ from the defaults."""

    alpha: float = 0.01  # the error test's bound on false rollbacks, however often it looks
    min_requests: int = 100  # canary answers a step needs before it may pass
    latency_ratio: float = 1.5  # the least slowdown (canary/stable, median or p99) that rolls back ...
    latency_alpha: float = 0.001  # ... when Mann-Whitney also finds it significant at this level (one-sided)
    latency_min: int = 30  # answers (or batches) per version before latency is judged
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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"criterion {key!r} must be a number >= 0")
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
    figures: dict = field(default_factory=dict)  # per version {requests, errors, error_rate, p50, p99}, the tests'
    # statistics ({errors: {log_bf, threshold}, latency: {z, p, ratio, basis}, shadow: {pairs, drift_rate, floor,
    # top1_agreement, exact}})


class Judge:
    def __init__(self, criteria: Criteria | None = None) -> None:
        self.criteria = criteria or Criteria()

    def look(self, look: Look) -> Verdict:
        raise NotImplementedError  # (filled in by the judge's own commit)
