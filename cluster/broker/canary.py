"""The broker's side of a canary run, without I/O: the split, the counts, the circuit breaker and the mirror picks.

`CanarySplit` is fed each desired state (`update`) and keeps, per model whose canary is running, a `CanaryRun`: the
stable and canary versions, the weight, the shadow fraction, the criteria, the run's `ModelDigest` (cumulative per
canary id in this broker process, so a lost digest loses nothing) and its circuit breaker. The Dispatcher asks it,
for each unpinned request of such a model, which version runs it (`draw`: the request's `run_version`, told to the
agent in the route) and whether a shadow copy goes too (`request.pair`); it tells it each answer (`answered`,
`expired`, `mirror_answered`, `stable_answered`) and applies what it says (re-run a failed canary request on the
stable version). It never calls the Dispatcher back.

- Draw: `random() < weight/100` -> the canary version (if some live agent serves it), else the stable version.
  Pinned requests (`version=N`) are never drawn nor counted.
- Circuit breaker, per canary id: `breaker_consecutive` canary failures (errors, timeouts) in a row, or a share of
  `breaker_rate` of the last `breaker_window` canary answers -> the weight here is 0 (no mirroring either) whatever
  the desired state says, until a new canary id; the digest says why (`tripped`), so the manager rolls back.
- Shadow: of the requests that run on the stable version, a fraction `shadow` also goes as a mirrored copy to the
  canary version (CANARY_FLOOR_SHARE of them to the stable version itself: the noise floor). The stable answer and
  the mirrored one (their frames after the route) are handed, as a `ShadowPair`, to `on_pair` (the broker's
  comparison thread, cluster/broker/shadow.py). The digests' shadow parts are written by that thread too: `lock`
  guards them (the broker takes it to read a digest's wire form).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable

from cluster import protocol
from cluster.canary import histogram
from cluster.canary.digest import ModelDigest, ShadowDigest
from cluster.canary.judge import Criteria
from cluster.config import CANARY_FLOOR_SHARE
from cluster.desired import DesiredState
from cluster.protocol import ErrorCode, ProtocolError

log = logging.getLogger("cluster.broker")

_FAILED = ErrorCode.INFERENCE_FAILED
_TIMEOUT = ErrorCode.TIMEOUT
_NOT_TAKEN = (ErrorCode.BUSY, ErrorCode.MODEL_NOT_FOUND, ErrorCode.CANCELLED)  # a mirror an agent could not take


class CanaryRun:
    """One model's canary run as this broker counts it (one canary id)."""

    def __init__(self, model: str, stable: int, canary, criteria: Criteria) -> None:
        self.model, self.stable, self.version, self.id = model, stable, canary.version, canary.id
        self.digest = ModelDigest(canary.id)
        self.tripped: str | None = None  # the circuit breaker's reason, once it tripped
        self.consecutive = 0  # canary failures in a row
        self.window: deque[bool] = deque(maxlen=max(1, criteria.breaker_window))  # the last answers: failed?
        self.window_failures = 0
        self.follow(stable, canary, criteria)

    def follow(self, stable: int, canary, criteria: Criteria) -> None:
        """The desired state's news for this run: its step, weight, shadow fraction, retry and criteria."""
        self.stable, self.step, self.desired_weight = stable, canary.step, canary.weight
        self.counts = self.digest.step(canary.step).versions  # version -> its VersionDigest at the current step
        self.shadow, self.retry, self.shadow_only = canary.shadow, canary.retry, canary.shadow_only
        self.criteria = criteria
        if self.window.maxlen != max(1, criteria.breaker_window):
            self.window, self.window_failures = deque(maxlen=max(1, criteria.breaker_window)), 0

    @property
    def weight(self) -> int:
        """Percent of unpinned requests sent to the canary here: the desired state's, 0 once the breaker tripped."""
        return 0 if self.tripped is not None or self.version == self.stable else self.desired_weight


class ShadowPair:
    """A mirrored copy and the request it mirrors: their answers, once both are in, are compared off the loop."""

    __slots__ = ("run", "kind", "version", "into", "stable", "mirrored", "closed", "sent", "failed")

    def __init__(self, run: CanaryRun, kind: str, version: int, into: ShadowDigest) -> None:
        self.run, self.kind, self.version, self.into = run, kind, version, into  # kind: "shadow" or "floor"
        self.stable: list | None = None  # the stable answer's frames after the route: [header, *tensors]
        self.mirrored: list | None = None  # the mirrored answer's
        self.closed = False  # one side failed: nothing to compare
        self.sent = False  # the mirrored copy went out (once, with the request's first dispatch)
        self.failed = False  # the mirrored copy failed before the stable answer came: an error if that one is ok

    @property
    def criteria(self) -> Criteria:
        return self.run.criteria


class CanarySplit:
    def __init__(self, max_attempts: int, rng: random.Random | None = None, floor_share: float = CANARY_FLOOR_SHARE):
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.floor_share = floor_share
        self.runs: dict[str, CanaryRun] = {}  # model -> its running canary (weight 0 while loading: not here)
        self.lock = threading.Lock()  # the digests' shadow parts (the comparison thread adds to them)
        self.on_pair: Callable[[ShadowPair], object] | None = None  # where answer pairs go; None: `pairs`
        self.pairs: list[ShadowPair] = []
        # For the metrics (counters never go back, whatever the runs): (model, version, outcome) -> answers,
        # model -> retries on stable, (model, decision) -> decisions seen in desired states
        self.answers: dict[tuple[str, int, str], int] = {}
        self.retries: dict[str, int] = {}
        self.decisions: dict[tuple[str, str], int] = {}
        self._seen_decisions: set[tuple] = set()
        self._past_shadow: dict[tuple[str, str], list[int]] = {}  # (model, kind) -> [pairs, mismatched] of old runs
        self.not_compared = {"queue full": 0, "compare failed": 0}  # shadow pairs (shadow.py counts them)
        self.tripped_news = False  # a breaker tripped since the last digest: the broker sends one at once

    # ---- the desired state ------------------------------------------------------------------------------------

    def update(self, desired: DesiredState) -> None:
        """Follow the manager's desired state: a running canary counts (a new id starts from zero, breaker and
        all); a canary gone (promoted, rolled back) stops. The last state seen stays in force while none comes."""
        for name, run in list(self.runs.items()):
            d = desired.models.get(name)
            if d is None or d.canary is None or d.canary.id != run.id or d.canary.phase != "running":
                self._end(run, d)
        for name, d in desired.models.items():
            canary = d.canary
            if canary is None or d.version is None:
                continue
            for decision in canary.decisions:
                key = (canary.id, decision.get("at"), decision.get("step"), decision.get("decision"))
                if not all(v is None or isinstance(v, (int, float, str)) for v in key):
                    continue  # not the manager's (a hand-edited state): not counted
                if key not in self._seen_decisions and isinstance(decision.get("decision"), str):
                    self._seen_decisions.add(key)
                    self._count_decision(name, decision["decision"])
            if canary.phase != "running":
                continue
            try:
                criteria = Criteria.from_wire(canary.criteria)
            except ValueError as exc:
                log.warning("canary of model %s: bad criteria (%s); the defaults apply here", name, exc)
                criteria = Criteria()
            run = self.runs.get(name)
            if run is None:
                run = self.runs[name] = CanaryRun(name, d.version, canary, criteria)
                log.info(
                    "canary %s of model %s: version %d beside %d, weight %d%%, shadow %g",
                    canary.id,
                    name,
                    canary.version,
                    d.version,
                    run.weight,
                    canary.shadow,
                )
            else:
                run.follow(d.version, canary, criteria)

    def _end(self, run: CanaryRun, d) -> None:
        del self.runs[run.model]
        with self.lock:
            _add_shadow_counts(run, self._past_shadow)
        if d is not None and d.version == run.version and run.version != run.stable:
            ended = "promote"
        else:
            ended = "ended" if run.shadow_only else "rollback"
        key = (run.id, "end")
        if key not in self._seen_decisions:
            self._seen_decisions.add(key)
            seen = {k[3] for k in self._seen_decisions if k[0] == run.id and len(k) == 4}
            if ended not in seen and not (ended == "rollback" and "abort" in seen):
                self._count_decision(run.model, ended)
        log.info("canary %s of model %s ended here (%s)", run.id, run.model, ended)

    def _count_decision(self, model: str, decision: str) -> None:
        self.decisions[(model, decision)] = self.decisions.get((model, decision), 0) + 1

    # ---- requests ---------------------------------------------------------------------------------------------

    def draw(self, request, serves: Callable[[int], bool]) -> None:
        """An unpinned request of a model under canary: which version runs it (`request.run_version`; the canary
        only if `serves` it: some live agent has it), and whether a mirrored copy goes too (`request.pair`)."""
        run = self.runs[request.model]
        weight = run.weight
        if weight and (weight >= 100 or self.rng.random() * 100 < weight) and serves(run.version):
            request.run_version, request.canary = run.version, run
            return
        if not serves(run.stable):
            return  # no agent lists the stable version (it is leaving): the agents' default runs it, not counted
        request.run_version, request.canary = run.stable, run
        if run.shadow and run.tripped is None and self.rng.random() < run.shadow:
            floor = self.floor_share > 0 and self.rng.random() < self.floor_share
            step = run.digest.step(run.step)
            version, kind, into = (run.stable, "floor", step.floor) if floor else (run.version, "shadow", step.shadow)
            request.pair = ShadowPair(run, kind, version, into)

    def fallback(self, request, candidates) -> bool:
        """No live agent serves the version drawn for `request` (`candidates` empty: agents unloaded the canary), or
        the breaker tripped since the draw: the stable version runs a canary request; a request with no agent for
        the stable version either goes to the agents' default (not counted). True if its version changed."""
        run = request.canary
        if request.run_version == run.version and run.version != run.stable:
            request.run_version = run.stable
            return True
        if not candidates:
            request.run_version = request.canary = None
            return True
        return False

    def answered(self, request, code, header_frame, service: float | None, alone: bool) -> bool:
        """The agent's answer to a request drawn here (`code` None: REPLY, else the ERROR's code; `service`: seconds
        since it was sent there; `alone`: it has no other copy in flight). Counted for its version (and the
        breaker); True: run it again on the stable version (a canary request the model failed, retry on, within
        the attempt budget; its run_version is the stable one already), or, not `alone`, drop this copy only."""
        run: CanaryRun = request.canary
        version = request.run_version
        canary = version == run.version and version != run.stable
        digest = run.counts.get(version)
        if digest is None:
            digest = run.digest.step(run.step).version(version)
        if code is None:
            digest.ok += 1
            self._outcome(run.model, version, "ok")
            if service is not None:
                histogram.add(digest.service, service)
                batch, queue_s = _batch_and_wait(header_frame)
                if batch is not None:
                    histogram.add(digest.compute.setdefault(batch, {}), max(0.0, service - queue_s))
            if canary:
                self._breaker(run, False)
            return False
        if code == _FAILED:
            digest.errors += 1
            self._outcome(run.model, version, "error")
        elif code == _TIMEOUT:
            digest.timeouts += 1
            self._outcome(run.model, version, "timeout")
        else:
            digest.other += 1
            self._outcome(run.model, version, "other")
            return False
        if not canary:
            return False
        self._breaker(run, True)
        if code != _FAILED or not run.retry:
            return False
        if not alone:
            return True  # a hedged copy failed: its other copy carries on
        if request.attempts < self.max_attempts:
            digest.retried += 1
            self.retries[run.model] = self.retries.get(run.model, 0) + 1
            request.run_version = run.stable
            return True
        return False

    def expired(self, request) -> None:
        """A request drawn here passed its deadline at the broker: a timeout of its version if it was at an agent."""
        if request.agent is not None and request.canary is not None:
            self.answered(request, _TIMEOUT, None, None, alone=False)

    def _outcome(self, model: str, version: int, outcome: str) -> None:
        key = (model, version, outcome)
        self.answers[key] = self.answers.get(key, 0) + 1

    def _breaker(self, run: CanaryRun, failed: bool) -> None:
        if run.tripped is not None:
            return
        c = run.criteria
        run.consecutive = run.consecutive + 1 if failed else 0
        window = run.window
        if len(window) == window.maxlen:
            run.window_failures -= window[0]
        window.append(failed)
        run.window_failures += failed
        if c.breaker_consecutive and run.consecutive >= c.breaker_consecutive:
            why = f"{run.consecutive} canary failures in a row"
        elif c.breaker_window and c.breaker_rate > 0 and len(window) >= c.breaker_window:
            if run.window_failures < c.breaker_rate * len(window):
                return
            why = f"{run.window_failures} of the last {len(window)} canary answers failed"
        else:
            return
        run.tripped, self.tripped_news = why, True
        log.warning(
            "circuit breaker: canary %s of model %s version %d stopped here (weight 0): %s",
            run.id,
            run.model,
            run.version,
            why,
        )

    # ---- shadow copies ----------------------------------------------------------------------------------------

    def mirror_sent(self, pair: ShadowPair, sent: bool) -> None:
        """The mirrored copy went to an agent, or was skipped (no agent of that version had a free slot)."""
        with self.lock:
            if sent:
                pair.into.sent += 1
            else:
                pair.into.skipped += 1

    def mirror_answered(self, pair: ShadowPair, code, frames: list) -> None:
        """The mirrored copy's answer (`code` None: REPLY). An agent that could not take it (BUSY, the version
        gone) counts as skipped; any other error as the mirrored version's."""
        if pair.closed:
            return
        if code is not None:
            if code not in _NOT_TAKEN and pair.stable is None:
                pair.failed = True  # the client's bad input fails both: an error only if the stable answer is ok
                return
            pair.closed = True
            with self.lock:
                if code in _NOT_TAKEN:
                    pair.into.skipped += 1
                else:
                    pair.into.errors += 1
            return
        pair.mirrored = frames
        if pair.stable is not None:
            self._compare(pair)

    def stable_answered(self, pair: ShadowPair, ok: bool, frames: list) -> None:
        if pair.closed:
            return
        if not ok or pair.failed:
            pair.closed = True  # stable failed: nothing to compare against (nor a failed mirror to count)
            if ok:
                with self.lock:
                    pair.into.errors += 1
            return
        pair.stable = frames
        if pair.mirrored is not None:
            self._compare(pair)

    def _compare(self, pair: ShadowPair) -> None:
        pair.closed = True
        if self.on_pair is None:
            self.pairs.append(pair)
        else:
            self.on_pair(pair)

    # ---- what the broker sends and shows ----------------------------------------------------------------------

    def wire_digests(self) -> dict:
        """{model: ModelDigest wire form} of every running canary: EVENT canary_digest's `models`."""
        models, self.tripped_news = {}, False
        with self.lock:
            for name, run in self.runs.items():
                run.digest.tripped, run.digest.weight = run.tripped, run.weight
                models[name] = run.digest.to_wire()
        return models

    def snapshot(self) -> dict:
        """For the metrics (a fresh dict the loop no longer changes): weights, breakers, answers, retries, shadow
        pairs, decisions; {} while no canary was ever seen here."""
        if not (self.runs or self.answers or self.decisions or self._past_shadow):
            return {}
        shadow = {key: list(v) for key, v in self._past_shadow.items()}
        with self.lock:
            for run in self.runs.values():
                _add_shadow_counts(run, shadow)
        return {
            "weight": {m: r.weight for m, r in self.runs.items()},
            "tripped": {m: int(r.tripped is not None) for m, r in self.runs.items()},
            "answers": dict(self.answers),
            "retries": dict(self.retries),
            "shadow": shadow,
            "decisions": dict(self.decisions),
            "not_compared": dict(self.not_compared),
        }


def _add_shadow_counts(run: CanaryRun, into: dict[tuple[str, str], list[int]]) -> None:
    """Add the run's shadow and floor [pairs, mismatched], over its steps, to `into` (model, kind) -> counts."""
    for step in run.digest.steps.values():
        for kind, shadow in (("shadow", step.shadow), ("floor", step.floor)):
            counts = into.setdefault((run.model, kind), [0, 0])
            counts[0] += shadow.pairs
            counts[1] += shadow.mismatched


def _batch_and_wait(header_frame) -> tuple[int | None, float]:
    """A REPLY header's batch size and the seconds the request waited in the agent (0 when it does not say)."""
    try:
        header = protocol.unpack_header(header_frame)
    except ProtocolError:
        return None, 0.0
    batch, queue_us = header.get("batch_size"), header.get("queue_us")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        return None, 0.0
    if not isinstance(queue_us, (int, float)) or isinstance(queue_us, bool) or queue_us < 0:
        queue_us = 0
    return batch, queue_us / 1e6
