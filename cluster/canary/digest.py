"""What a broker counts while a canary runs, and how the manager adds up the brokers.

A broker counts, per model under canary and per step of it, for each version that answered (`VersionDigest`): the
outcomes, the service time it measured (request sent to the agent -> answer back) and the compute time per batch
size (service time less the agent's queue wait, from the REPLY header), as log-bucketed histograms (histogram.py);
and for shadow copies (`ShadowDigest`) how the mirrored version's answers compared with the stable one's, and the
same for the stable version mirrored to itself (the noise floor). The counts are cumulative for one canary run
(`Canary.id`) within one broker process (its incarnation), so a lost report loses nothing: the next one carries it
all. The manager keeps each broker incarnation's latest digest per canary and sums them (`sum_digests`), so the
judge sees the whole cluster's traffic however many brokers there are.

On the wire: EVENT canary_digest (protocol.CanaryDigest) {broker, incarnation, seq, models: {model:
ModelDigest.to_wire()}}, every `canary_digest_interval` while the broker has a canary to count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

from cluster.canary import histogram


def _count(data: Mapping, key: str) -> int:
    value = data.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"digest field {key!r} must be a count (int >= 0)")
    return value


@dataclass
class VersionDigest:
    """One version's answers at one step (or summed)."""

    ok: int = 0  # answered
    errors: int = 0  # the model raised (INFERENCE_FAILED): counted against the version
    timeouts: int = 0  # no answer within the request's deadline while at this version
    other: int = 0  # other errors (bad input, cancelled, agent lost): the version's fault or not, not judged
    retried: int = 0  # canary failures run again on the stable version (retry on stable)
    service: dict[int, int] = field(default_factory=dict)  # histogram of service times (s) of ok answers
    compute: dict[int, dict[int, int]] = field(default_factory=dict)  # batch size -> histogram of compute times (s)

    @property
    def answered(self) -> int:
        """Requests judged: ok + errors + timeouts."""
        return self.ok + self.errors + self.timeouts

    def add(self, other: VersionDigest) -> VersionDigest:
        self.ok += other.ok
        self.errors += other.errors
        self.timeouts += other.timeouts
        self.other += other.other
        self.retried += other.retried
        histogram.merge(self.service, other.service)
        for size, hist in other.compute.items():
            histogram.merge(self.compute.setdefault(size, {}), hist)
        return self

    def to_wire(self) -> dict:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "other": self.other,
            "retried": self.retried,
            "service": histogram.to_wire(self.service),
            "compute": [[size, histogram.to_wire(h)] for size, h in sorted(self.compute.items())],
        }

    @classmethod
    def from_wire(cls, data) -> VersionDigest:
        if not isinstance(data, dict):
            raise ValueError("a version digest must be a map")
        compute = data.get("compute") or []
        if not isinstance(compute, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int) and p[0] >= 0 for p in compute
        ):
            raise ValueError("digest 'compute' must be a list of [batch size, histogram] pairs")
        return cls(
            _count(data, "ok"),
            _count(data, "errors"),
            _count(data, "timeouts"),
            _count(data, "other"),
            _count(data, "retried"),
            histogram.from_wire(data.get("service") or []),
            {size: histogram.from_wire(h) for size, h in compute},
        )


@dataclass
class ShadowDigest:
    """Comparisons of mirrored answers with the stable version's, for one step (or summed)."""

    sent: int = 0  # mirrored copies sent to an agent
    skipped: int = 0  # drawn for mirroring, but no agent of that version had a free slot (never queued)
    errors: int = 0  # the mirrored copy failed (or timed out) where the stable answer was ok
    pairs: int = 0  # answer pairs compared
    mismatched: int = 0  # pairs whose outputs differ in names, shapes or dtypes
    rel_err: dict[int, int] = field(default_factory=dict)  # histogram (ERROR_BASE) of each float pair's max rel error
    abs_err: dict[int, int] = field(default_factory=dict)  # histogram (ERROR_BASE) of each float pair's max abs error
    top1_agree: int = 0  # [N, C] float scores: rows whose arg-max agrees ...
    top1_rows: int = 0  # ... of the rows compared
    exact: int = 0  # integer (and bool) outputs: pairs equal in every element ...
    exact_pairs: int = 0  # ... of the integer pairs compared

    def add(self, other: ShadowDigest) -> ShadowDigest:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                histogram.merge(mine, theirs)
            else:
                setattr(self, f.name, mine + theirs)
        return self

    def to_wire(self) -> dict:
        return {
            f.name: histogram.to_wire(v) if isinstance(v := getattr(self, f.name), dict) else v for f in fields(self)
        }

    @classmethod
    def from_wire(cls, data) -> ShadowDigest:
        if not isinstance(data, dict):
            raise ValueError("a shadow digest must be a map")
        values = {}
        for f in fields(cls):
            if f.name in ("rel_err", "abs_err"):
                values[f.name] = histogram.from_wire(data.get(f.name) or [])
            else:
                values[f.name] = _count(data, f.name)
        return cls(**values)


@dataclass
class StepDigest:
    """Everything counted at one step of a canary run."""

    versions: dict[int, VersionDigest] = field(default_factory=dict)  # version -> its answers
    shadow: ShadowDigest = field(default_factory=ShadowDigest)  # the mirrored version vs the stable one
    floor: ShadowDigest = field(default_factory=ShadowDigest)  # the stable version mirrored to itself

    def version(self, version: int) -> VersionDigest:
        return self.versions.setdefault(version, VersionDigest())

    def add(self, other: StepDigest) -> StepDigest:
        for v, d in other.versions.items():
            self.version(v).add(d)
        self.shadow.add(other.shadow)
        self.floor.add(other.floor)
        return self

    def to_wire(self) -> dict:
        return {
            "versions": [[v, d.to_wire()] for v, d in sorted(self.versions.items())],
            "shadow": self.shadow.to_wire(),
            "floor": self.floor.to_wire(),
        }

    @classmethod
    def from_wire(cls, data) -> StepDigest:
        if not isinstance(data, dict) or not isinstance(data.get("versions", []), list):
            raise ValueError("a step digest must be a map with a 'versions' list")
        versions = {}
        for pair in data.get("versions", []):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], int):
                raise ValueError("digest 'versions' must be a list of [version, digest] pairs")
            versions[pair[0]] = VersionDigest.from_wire(pair[1])
        return cls(
            versions,
            ShadowDigest.from_wire(data.get("shadow") or {}),
            ShadowDigest.from_wire(data.get("floor") or {}),
        )


@dataclass
class ModelDigest:
    """One broker's counts for one model's canary run (`canary`: Canary.id), per step, and its circuit breaker."""

    canary: str
    steps: dict[int, StepDigest] = field(default_factory=dict)  # step index -> what was counted at it
    tripped: str | None = None  # the broker's circuit breaker stopped the canary: why (None: it did not)
    weight: int = 0  # the weight in force at this broker (0 once tripped)

    def step(self, step: int) -> StepDigest:
        return self.steps.setdefault(step, StepDigest())

    def to_wire(self) -> dict:
        return {
            "canary": self.canary,
            "steps": [[k, s.to_wire()] for k, s in sorted(self.steps.items())],
            "tripped": self.tripped,
            "weight": self.weight,
        }

    @classmethod
    def from_wire(cls, data) -> ModelDigest:
        if not isinstance(data, dict) or not isinstance(data.get("canary"), str):
            raise ValueError("a model digest must be a map with a 'canary' id")
        steps = {}
        if not isinstance(data.get("steps") or [], list):
            raise ValueError("digest 'steps' must be a list of [step, digest] pairs")
        for pair in data.get("steps") or []:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], int):
                raise ValueError("digest 'steps' must be a list of [step, digest] pairs")
            steps[pair[0]] = StepDigest.from_wire(pair[1])
        tripped, weight = data.get("tripped"), data.get("weight", 0)
        if tripped is not None and not isinstance(tripped, str):
            raise ValueError("digest 'tripped' must be a reason or null")
        if not isinstance(weight, int) or isinstance(weight, bool):
            raise ValueError("digest 'weight' must be an int")
        return cls(data["canary"], steps, tripped, weight)


def sum_digests(digests: Iterable[ModelDigest]) -> dict[int, StepDigest]:
    """Step -> the sum over `digests` (one per broker incarnation, all of one canary run)."""
    total: dict[int, StepDigest] = {}
    for digest in digests:
        for k, step in digest.steps.items():
            total.setdefault(k, StepDigest()).add(step)
    return total
