"""The manager's canary runs without I/O: the commands (canary / promote / abort), the loading phase, the brokers'
digests, the judge's verdicts and the steps they move. `Canaries` sits beside `Deployments` (deployments.py) and
shares its desired state: a run lives in `desired.models[m].canary` (saved on the share with the rest, so a
restarted manager resumes it at its step), and each event returns the same `Actions` for manager.py to carry out
(save and publish the state, answer the requester).

A run: QUERY canary -> phase "loading" (every participating agent loads and warms the version; a failure or
ROLLOUT_TIMEOUT_S ends it) -> "running" at steps[0] percent -> on each digest and tick the judge looks at the
brokers' summed counts: "pass" moves to the next step (or promotes: no next step, or the next is 100), "rollback"
ends it (stable serves everything), a broker's tripped circuit breaker ends it too. Shadow-only runs end on the
judge's verdict ("no drift" / "drift"), never promoted. Every decision is appended to the canary's `decisions`.

Interplay with deployments: a deploy or rollback of a model under canary is refused (OVERLOADED: promote or abort
first); undeploying it ends the run ("aborted", undeployed). A canary is refused while a rollout of the model runs.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from cluster.canary.digest import ModelDigest, sum_digests
from cluster.canary.judge import Criteria, Judge, Look
from cluster.config import CANARY_RUNS_KEPT, CANARY_SHADOW_ONLY, CANARY_STEP_SECONDS, CANARY_STEPS, ROLLOUT_TIMEOUT_S
from cluster.desired import Canary, DesiredState
from cluster.logs import BadInputLog
from cluster.manager.deployments import HISTORY_LENGTH, Actions, CommandError, Deployments
from cluster.protocol import CanaryDigest, ErrorCode, What, require
from cluster.repository import ModelRepository, RepositoryError

log = logging.getLogger("cluster.manager")
bad_input = BadInputLog(log)

OUTCOMES = {"promote": "promoted", "rollback": "rolled back", "abort": "aborted"}


@dataclass
class Run:
    """What the manager keeps in memory about the canary run of one model (the rest is in its `Canary`)."""

    model: str
    id: str
    started: float  # wall time the run began (a restarted manager: its first decision's, or when it read it back)
    loading_deadline: float  # the agents must serve the version by then (wall time)
    digests: dict[tuple[str, str], tuple[int, ModelDigest]] = field(default_factory=dict)  # (broker,
    # incarnation) -> (seq, its latest digest for this run): cumulative, so the latest of each is all it counted
    look: dict | None = None  # the latest verdict {decision, reason, figures}
    looked_at: float = -math.inf
    judge_failed: bool = False  # the judge raised once (logged once per run)


def parse_options(header: dict) -> dict:
    """A run's options from a QUERY canary (or a publish's "canary" map): steps, step_seconds, shadow, shadow_only,
    retry, criteria (only the fields that differ from the defaults), with the defaults filled in. CommandError
    BAD_REQUEST naming the field."""

    def bad(text: str):
        raise CommandError(ErrorCode.BAD_REQUEST, text)

    steps = header.get("steps")
    steps = list(CANARY_STEPS) if steps is None else steps
    if (
        not isinstance(steps, list)
        or not steps
        or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 100 for w in steps)
    ):
        bad("'steps' must be a non-empty list of percents from 1 to 100, e.g. [10, 50, 100]")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        bad(f"'steps' must rise: {steps}")
    step_seconds = header.get("step_seconds")
    step_seconds = CANARY_STEP_SECONDS if step_seconds is None else step_seconds
    if isinstance(step_seconds, bool) or not isinstance(step_seconds, (int, float)) or not 0 <= step_seconds < 1e7:
        bad("'step_seconds' must be a number of seconds >= 0")
    shadow_only, retry = header.get("shadow_only", False), header.get("retry", True)
    if not isinstance(shadow_only, bool) or not isinstance(retry, bool):
        bad("'shadow_only' and 'retry' must be true or false")
    shadow = header.get("shadow")
    shadow = (CANARY_SHADOW_ONLY if shadow_only else 0.0) if shadow is None else shadow
    if isinstance(shadow, bool) or not isinstance(shadow, (int, float)) or not 0 <= shadow <= 1:
        bad("'shadow' must be a fraction from 0 to 1")
    if shadow_only and shadow == 0:
        bad("a shadow-only run needs 'shadow' > 0 (the fraction of requests mirrored)")
    try:
        criteria = Criteria.from_wire(header.get("criteria")).to_wire()
    except (ValueError, TypeError) as exc:
        bad(f"bad criteria: {exc}")
    return dict(
        steps=steps,
        step_seconds=float(step_seconds),
        shadow=float(shadow),
        shadow_only=shadow_only,
        retry=retry,
        criteria=criteria,
    )


class Canaries:
    """The canary runs. Events in: `command` (canary / promote / abort), `start` (a publish's canary),
    `digest` (EVENT canary_digest), `tick` (the clock; also reads the registry's beats while loading). Out:
    `Actions`. Times are wall times (`Canary.step_started` is saved, and a restarted manager goes on from it).

    `judge`: called with a Criteria, returns an object whose `look(Look)` gives a Verdict (tests pass a fake)."""

    def __init__(
        self,
        deployments: Deployments,
        judge=Judge,
        loading_timeout: float = ROLLOUT_TIMEOUT_S,
        look_interval: float = 0.25,
        settle: float = 0.0,
    ) -> None:
        self.deployments = deployments
        # Until then (wall time), a canary with no agent to wait for keeps loading: a manager just (re)started has
        # heard no beat yet, and would otherwise start the step's clock with nobody serving it (the manager passes
        # an expiry: every live agent has beaten by then).
        self.settle_until = time.time() + settle
        self.judge = judge
        self.loading_timeout = loading_timeout
        self.look_interval = look_interval  # the least time between two looks from the clock (digests: each one)
        self.runs: dict[str, Run] = {}  # model -> its run in progress
        self.finished: deque[dict] = deque(maxlen=CANARY_RUNS_KEPT)  # the finished runs' last status, newest last
        self._last_status: dict[str, dict] = {}  # run id -> its status as last shown (for a run ended from outside)

    @property
    def desired(self) -> DesiredState:
        return self.deployments.desired

    def running(self, name: str) -> Canary | None:
        d = self.desired.models.get(name)
        return d.canary if d is not None else None

    # ---- commands -----------------------------------------------------------------------------------------------

    def command(self, what: What, header: dict, requester: tuple, now: float) -> Actions:
        """canary / promote / abort: answered at once with the run's status. CommandError (or ProtocolError for a
        malformed header) when it cannot be done."""
        if self.deployments.share is None:
            raise CommandError(ErrorCode.BAD_REQUEST, "this manager was started without --share, so it cannot deploy")
        name = require(header, "name", str)
        self._sync(now)
        if what == What.CANARY:
            return self.start(name, header, requester, now)
        canary = self.running(name)
        if canary is None:
            raise CommandError(ErrorCode.MODEL_NOT_FOUND, f"no canary of '{name}' is running")
        actions = Actions(desired_changed=True)
        if what == What.PROMOTE:
            if canary.version == self.desired.models[name].version:
                raise CommandError(
                    ErrorCode.BAD_REQUEST,
                    f"v{canary.version} is the stable version already (a shadow run of it): abort ends the run",
                )
            status = self._end(name, "promote", "promoted by command", now)
        else:
            status = self._end(name, "abort", "aborted by command", now)
        actions.answers.append((requester, status))
        return actions

    def start(self, name: str, header: dict, requester: tuple | None, now: float) -> Actions:
        """Start a canary run of header's `version` (default: the share's newest) with its options."""
        self._sync(now)
        current = self.desired.models.get(name)
        if current is None or current.version is None:
            raise CommandError(
                ErrorCode.BAD_REQUEST, f"'{name}' has no stable version to compare with: deploy a first version"
            )
        if name in self.deployments.rollouts:
            raise CommandError(ErrorCode.OVERLOADED, f"a rollout of '{name}' is in progress; try again when it is over")
        if current.canary is not None:
            raise CommandError(
                ErrorCode.OVERLOADED,
                f"a canary of '{name}' (v{current.canary.version}) is running; promote or abort it first",
            )
        options = parse_options(header)
        try:
            versions = ModelRepository(self.deployments.share).versions(name)
        except RepositoryError as exc:
            raise CommandError(ErrorCode.BAD_REQUEST, str(exc)) from None
        version = require(header, "version", int, optional=True)
        version = version if version is not None else (versions[-1] if versions else None)
        if version is None or version not in versions:
            raise CommandError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model '{name}' has no version {version} in the share ({versions or 'none'})",
            )
        if version == current.version and not options["shadow_only"]:
            raise CommandError(
                ErrorCode.BAD_REQUEST,
                f"v{version} is the stable version of '{name}': a canary needs another version "
                "(a shadow-only run of it measures the noise floor)",
            )
        canary = Canary(version, options["steps"], secrets.token_hex(8), **_rest(options))
        current.canary = canary
        self.desired.changed()
        self.runs[name] = Run(name, canary.id, now, now + self.loading_timeout)
        log.info(
            "canary %s of %s v%d beside v%d: loading (steps %s, %g s each, shadow %g%s, retry %s)",
            canary.id,
            name,
            version,
            current.version,
            canary.steps,
            canary.step_seconds,
            canary.shadow,
            ", shadow only" if canary.shadow_only else "",
            "on" if canary.retry else "off",
        )
        actions = Actions(desired_changed=True)
        self._loading(name, now, actions)  # every agent may have it already
        if requester is not None:
            actions.answers.append((requester, self.status(name, now)))
        return actions

    # ---- events -------------------------------------------------------------------------------------------------

    def digest(self, event: CanaryDigest, now: float) -> Actions:
        """A broker's digest: kept per (broker, incarnation) for the run it counts (other ids: an old run's, or
        a run this manager does not know: dropped), then the judge looks."""
        self._sync(now)
        actions = Actions()
        for name, wire in event.models.items():
            run = self.runs.get(name)
            try:
                digest = ModelDigest.from_wire(wire)
            except ValueError as exc:
                bad_input.warning("canary digest of %s from broker %s dropped: %s", name, event.broker, exc)
                continue
            if run is None or digest.canary != run.id:
                continue
            key = (event.broker, event.incarnation)
            if key in run.digests and run.digests[key][0] > event.seq:
                continue  # an older one, late
            run.digests[key] = (event.seq, digest)
            canary = self.running(name)
            if canary is not None and canary.phase == "running":
                self._judge(name, now, actions)
        return actions

    def tick(self, now: float) -> Actions:
        """Loading runs: every agent serves it -> running; a failure or the deadline -> rolled back. Running ones:
        the judge looks (at most every look_interval; a step's time passing is a verdict too)."""
        self._sync(now)
        actions = Actions()
        for name in list(self.runs):
            canary = self.running(name)
            if canary.phase == "loading":
                self._loading(name, now, actions)
            elif now - self.runs[name].looked_at >= self.look_interval:
                self._judge(name, now, actions)
        return actions

    def _sync(self, now: float) -> None:
        """Runs follow the desired state: one whose canary left it (undeployed, or a state that could not be saved
        was undone) is over; a canary with no run (read back by a restarted manager, or restored by an undo) gets
        one."""
        for name, run in list(self.runs.items()):
            canary = self.running(name)
            if canary is None or canary.id != run.id:
                del self.runs[name]
                gone = name not in self.desired.models
                why = "undeployed" if gone else "its desired state could not be saved"
                log.warning("canary %s of %s ended: %s", run.id, name, why)
                self.finished.append(
                    dict(
                        self._last_status.pop(run.id, {"model": name, "id": run.id}),
                        done=True,
                        outcome="aborted",
                        weight=0,
                    )
                    | {"reason": why}
                )
        for name, d in self.desired.models.items():
            if d.canary is not None and name not in self.runs:
                started = d.canary.decisions[0].get("at", now) if d.canary.decisions else now
                self.runs[name] = Run(name, d.canary.id, started, now + self.loading_timeout)
                for record in [r for r in self.finished if r.get("id") == d.canary.id]:
                    self.finished.remove(record)  # restored by an undo: running again
                log.info("canary %s of %s v%d: %s (resumed)", d.canary.id, name, d.canary.version, d.canary.phase)

    def _loading(self, name: str, now: float, actions: Actions) -> None:
        canary = self.running(name)
        run = self.runs[name]
        agents = self.deployments.registry.agents
        failed = {
            agent: str(e.get("error", "failed"))
            for agent, record in agents.items()
            for e in record.beat.failed
            if e["name"] == name and e["version"] == canary.version
        }
        participants, _ = self.deployments._participants(name)
        waiting = sorted(
            a
            for a in participants
            if not any(e["name"] == name and e["version"] == canary.version for e in agents[a].beat.models)
        )
        if failed:
            agent, why = sorted(failed.items())[0]
            self._end(name, "rollback", f"{agent} could not load v{canary.version}: {why}", now)
        elif now > run.loading_deadline:
            text = f"not serving v{canary.version} within {self.loading_timeout:g} s: {', '.join(waiting)}"
            self._end(name, "rollback", text, now)
        elif not waiting and (participants or now >= self.settle_until):
            canary.phase = "running"
            canary.step, canary.step_started = 0, now
            run.looked_at = now
            self._decide(canary, "start", f"served by {len(participants)} agents", now)
            self.desired.changed()
            log.info("canary %s of %s v%d: running at %d%%", canary.id, name, canary.version, canary.weight)
        else:
            return
        actions.desired_changed = True

    def _judge(self, name: str, now: float, actions: Actions) -> None:
        canary, run = self.running(name), self.runs[name]
        run.looked_at = now
        stable = self.desired.models[name].version
        digests = [d for _, d in run.digests.values()]
        tripped = sorted((broker, d.tripped) for (broker, _), (_, d) in run.digests.items() if d.tripped)
        if tripped:
            broker, why = tripped[0]
            self._end(name, "rollback", f"circuit breaker at broker {broker}: {why}", now)
            actions.desired_changed = True
            return
        try:
            criteria = Criteria.from_wire(canary.criteria)
        except ValueError as exc:  # a hand-edited deployments.json: judged by the defaults
            bad_input.warning("canary of %s: bad criteria (%s); judging by the defaults", name, exc)
            criteria = Criteria()
        look = Look(
            stable=stable,
            canary=canary.version,
            step=canary.step,
            weight=canary.weight,
            step_elapsed=max(0.0, now - (canary.step_started or now)),
            step_seconds=canary.step_seconds,
            shadow_only=canary.shadow_only,
            steps=sum_digests(digests),
        )
        try:
            verdict = self.judge(criteria).look(look)
            decision, reason, figures = verdict.decision, str(verdict.reason), _plain(dict(verdict.figures or {}))
        except Exception as exc:  # a judge that fails must not stop the manager: the run waits (promote/abort work)
            if not run.judge_failed:
                log.exception("canary of %s: the judge failed; the run waits for a command", name)
            run.judge_failed = True
            run.look = {"decision": "continue", "reason": f"the judge failed: {exc!r}", "figures": {}}
            return
        if decision not in ("continue", "pass", "rollback"):
            bad_input.warning("canary of %s: the judge said %r; taken as continue", name, decision)
            decision = "continue"
        run.look = {"decision": decision, "reason": reason, "figures": figures}
        if decision == "continue":
            return
        actions.desired_changed = True
        summary = figures.get("versions")
        if decision == "rollback":
            self._end(name, "rollback", reason, now, summary)
        elif canary.shadow_only:
            self._end(name, "pass", reason, now, summary)
        elif canary.step + 1 >= len(canary.steps) or canary.steps[canary.step + 1] >= 100:
            self._end(name, "promote", f"{canary.weight}% passed: {reason}", now, summary)
        else:
            self._decide(canary, "pass", reason, now, summary)
            canary.step += 1
            canary.step_started = now
            self.desired.changed()
            log.info(
                "canary %s of %s v%d: step %d at %d%%", canary.id, name, canary.version, canary.step, canary.weight
            )

    def _decide(self, canary: Canary, decision: str, reason: str, now: float, figures: dict | None = None) -> None:
        entry = {"at": round(now, 3), "step": canary.step, "weight": canary.weight, "decision": decision}
        entry["reason"] = reason
        if figures:
            entry["figures"] = figures
        canary.decisions.append(entry)
        log.info("canary %s v%d: %s at step %d (%d%%): %s", canary.id, canary.version, decision, canary.step,
                 canary.weight, reason)  # fmt: skip

    def _end(self, name: str, decision: str, reason: str, now: float, figures: dict | None = None) -> dict:
        """Record the decision, end the run (promote: the canary becomes the stable version), and return its final
        status (kept for `rollouts`)."""
        d = self.desired.models[name]
        canary = d.canary
        self._decide(canary, decision, reason, now, figures)
        if canary.shadow_only and decision in ("pass", "rollback"):
            outcome = "no drift" if decision == "pass" else "drift"
        else:
            outcome = OUTCOMES[decision]
        weight = 100 if decision == "promote" else 0  # what it serves now (its decisions keep the step's weight)
        status = self.status(name, now) | {"done": True, "outcome": outcome, "weight": weight}
        if decision == "promote":
            d.history = (d.history + [d.version])[-HISTORY_LENGTH:]
            d.version = canary.version
        d.canary = None
        self.desired.changed()
        self.runs.pop(name, None)
        self._last_status.pop(canary.id, None)
        self.finished.append(status)
        log.info("canary %s of %s v%d: %s (%s)", canary.id, name, canary.version, outcome, reason)
        return status

    # ---- views --------------------------------------------------------------------------------------------------

    def status(self, name: str, now: float) -> dict:
        """The run of `name` in progress, as `rollouts` shows it."""
        d = self.desired.models[name]
        canary, run = d.canary, self.runs[name]
        brokers = {
            broker: {"weight": digest.weight, "tripped": digest.tripped}
            for (broker, _), (_, digest) in sorted(run.digests.items())
        }
        status = {
            "model": name,
            "id": canary.id,
            "version": canary.version,
            "stable": d.version,
            "steps": list(canary.steps),
            "step": canary.step,
            "weight": canary.weight,
            "phase": canary.phase,
            "shadow": canary.shadow,
            "shadow_only": canary.shadow_only,
            "retry": canary.retry,
            "criteria": dict(canary.criteria),
            "step_elapsed": round(max(0.0, now - canary.step_started), 3) if canary.step_started else 0.0,
            "step_seconds": canary.step_seconds,
            "started": run.started,
            "done": False,
            "outcome": "running",
            "look": copy.deepcopy(run.look),
            "decisions": copy.deepcopy(canary.decisions),
            "brokers": brokers,
        }
        self._last_status[canary.id] = status
        return status

    def rollouts(self, name: str | None, now: float) -> dict:
        """{"canaries": {model: its run in progress, else its latest finished one}, "finished": [the finished runs,
        newest last, without their decisions and looks (the answer stays small)]}; `name`: that model's only."""
        self._sync(now)
        canaries = {}
        for record in self.finished:
            canaries[record["model"]] = record
        for model in self.runs:
            canaries[model] = self.status(model, now)
        keep = (lambda m: True) if name is None else (lambda m: m == name)
        return {
            "canaries": {m: s for m, s in sorted(canaries.items()) if keep(m)},
            "finished": [
                {k: v for k, v in r.items() if k not in ("decisions", "look")}
                for r in self.finished
                if keep(r["model"])
            ],
        }


def _plain(value):
    """The judge's figures as the bus and JSON carry them: string keys (msgpack maps with int keys are refused by
    our decoder: a version's figures are keyed by version), lists, finite numbers (NaN and inf: None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _rest(options: dict) -> dict:
    return {k: options[k] for k in ("step_seconds", "shadow", "shadow_only", "retry", "criteria")}
