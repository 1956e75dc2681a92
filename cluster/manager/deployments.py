"""The manager's deployments without I/O: the commands (deploy / rollback / undeploy) and the rollouts they start.
The manager (manager.py) feeds `Deployments` its events and carries out the `Actions` it returns: it saves
`deployments.json`, publishes the desired state and answers the requesters. Nothing here touches a socket, so the
whole rollout logic is tested in-process (tests/test_manager_logic.py), as pyzmq's zmq/auth/base.py is.

The desired state itself (`DesiredState`) is shared with the agents and lives in `cluster.desired`.

A rollout is two-phase, so that either every agent switches or none does:
1. stage: desired.staged = N. Each live agent loads N, warms it up, and reports it staged (or failed) in its beats.
2. all staged: desired.version = N, staged = None. Agents switch new requests to N, let the old version finish what
   it has in flight, and unload it. Any failure instead: staged = None, agents drop N and keep serving the old one.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

from cluster.config import ROLLOUT_TIMEOUT_S
from cluster.desired import DesiredState, ModelDeployment
from cluster.manager.placement import Host, PlacementError, Want, check_fits, plan
from cluster.manager.registry import Registry
from cluster.protocol import ErrorCode, Heartbeat, What, require
from cluster.repository import ModelRepository, RepositoryError

log = logging.getLogger("cluster.manager")

ABORT_GRACE = 10.0  # seconds a failing rollout waits for the remaining agents' outcomes before it is aborted
HISTORY_LENGTH = 20  # earlier versions kept per model as rollback targets


class CommandError(Exception):
    """A deploy/rollback/undeploy that cannot be done; answered as ERROR with this code."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code


@dataclass
class Actions:
    """What the manager must do after an event: save and publish the desired state (first), then answer."""

    desired_changed: bool = False  # save deployments.json and publish the desired state
    answers: list[tuple[tuple, dict]] = field(default_factory=list)  # (requester, result): send REPLY {id, result}
    discard: list[tuple[str, int, bool]] = field(default_factory=list)  # (model, version, whole model): take off
    # the share (a version the manager published for this rollout, which the rollout rejected)
    errors: list[tuple[tuple, ErrorCode, str, str]] = field(default_factory=list)  # (requester, code, text, model):
    # send ERROR (a rollout undone because its state could not be saved)


@dataclass
class Rollout:
    """One deploy/rollback in progress: which agents must report, and what each said."""

    model: str
    version: int
    previous: int | None
    expected: set[str]  # the agents it waits for: serving (connected to the broker) when it started, or since
    deadline: float  # the switch must be over by then (and staging, for agents that joined at the start)
    requester: tuple | None = None  # (peer identity, request id) to answer when done
    phase: str = "staging"  # staging -> switching -> done
    outcomes: dict[str, str] = field(default_factory=dict)  # agent -> "ok" or the reason it failed
    started: float = field(default_factory=time.monotonic)
    failed_at: float | None = None  # when the first agent reported a failure
    timeout: float = ROLLOUT_TIMEOUT_S  # seconds each agent has to stage, from when it joined the rollout
    staging_deadlines: dict[str, float] = field(default_factory=dict)  # agent -> when its staging time is up
    left_out: dict[str, str] = field(default_factory=dict)  # agents the manager hears but did not wait for: why
    discard: str | None = None  # if it fails, take off the share: "version" (published for it) or "model" (new)

    def join(self, agent: str, now: float) -> None:
        """Wait for this agent too, with its own staging deadline (one that starts serving mid-rollout: it must
        stage the new version too, so that every agent switches or none does)."""
        self.expected.add(agent)
        self.staging_deadlines[agent] = now + self.timeout
        self.deadline = max(self.deadline, self.staging_deadlines[agent])
        self.left_out.pop(agent, None)

    def overdue(self, now: float) -> None:
        """Staging: an agent past its own deadline without an outcome has failed (the rollout then aborts)."""
        for agent in self.expected - set(self.outcomes):
            if now > self.staging_deadlines.get(agent, self.deadline):
                self.outcomes[agent] = f"not staged within {self.timeout:g} s"

    def observe(self, agent: str, beat: Heartbeat) -> None:
        """Update this agent's outcome from its heartbeat."""
        if agent not in self.expected:
            return
        if self.phase == "staging":
            for entry in beat.failed:
                if entry["name"] == self.model and entry["version"] == self.version:
                    self.outcomes[agent] = str(entry.get("error", "failed"))
                    return
            if _has(beat.staged, self.model, self.version) or _serves(beat, self.model, self.version):
                self.outcomes[agent] = "ok"
        elif self.phase == "switching" and _serves(beat, self.model, self.version, default_only=True):
            self.outcomes[agent] = "ok"

    def agent_lost(self, agent: str, why: str = "lost during the rollout") -> None:
        """An agent died (or left the broker) mid-rollout: it no longer counts (it loads the desired state when it
        comes back)."""
        if agent in self.expected:
            self.expected.discard(agent)
            self.outcomes.pop(agent, None)
            self.staging_deadlines.pop(agent, None)
            self.left_out[agent] = why

    def complete(self) -> bool:
        return self.expected.issubset(self.outcomes)

    def failures(self) -> dict[str, str]:
        return {a: r for a, r in self.outcomes.items() if r != "ok"}

    def report(self, now: float) -> dict:
        missing = (
            "no answer before the deadline" if self.failed_at is None else "no outcome before the rollout was aborted"
        )
        agents = {a: self.outcomes.get(a, missing) for a in sorted(self.expected)}
        return {
            "model": self.model,
            "version": self.version,
            "previous": self.previous,
            "ok": all(r == "ok" for r in agents.values()),
            "agents": agents,  # the agents it waited for, each with its outcome
            "left_out": dict(sorted(self.left_out.items())),  # agents it did not wait for, and why
            "seconds": round(now - self.started, 3),
            "removed": self.discard is not None and not all(r == "ok" for r in agents.values()),  # off the share
        }


class Deployments:
    """The desired state and the rollouts that move it. Events in: `command` (from a requester), `observe` (a
    heartbeat), `agent_lost` (the registry expired an agent), `tick` (the clock). Out: `Actions`.

    `share` is the share's folder (None: a manager without a share, which refuses commands); its versions are read
    with cluster.repository.ModelRepository. `registry` is the manager's registry: the live agents a rollout waits for.
    """

    def __init__(
        self, share: str | None, desired: DesiredState, registry: Registry, abort_grace: float = ABORT_GRACE
    ) -> None:
        self.share = share
        self.desired = desired
        self.registry = registry
        self.abort_grace = abort_grace
        self.rollouts: dict[str, Rollout] = {}  # model -> the rollout in progress for it
        # The agents the brokers route to (not draining): the union of the live brokers' reports (manager/brokers.py);
        # None when no broker reports. A rollout waits only for agents that serve: one the manager hears but no
        # broker knows (a heartbeat from nowhere, an agent cut off from the brokers) is left out.
        self.broker_view: set[str] | None = None
        # Wall time of the oldest of those reports, and how often a broker sends one: an agent that joined less than a
        # report interval before it may not be in it yet (it registered just now), so it is waited for, not left
        # out. The defaults judge every agent by the view as it is (the unit tests set the view alone).
        self.broker_view_at = math.inf
        self.report_interval = 0.0
        self.finished = {"ok": 0, "failed": 0}  # rollouts over since the manager started, by outcome (a metric)
        # Placement (placement.py): until then (monotonic), nothing is placed or moved (a manager just started has
        # not heard every agent yet; the manager passes an expiry).
        self.settle_until = 0.0
        self.short: dict[str, str] = {}  # model -> why it has fewer copies than it wants (logged once per change)
        self._specs: dict[tuple[str, int], tuple[int | None, int, str]] = {}  # (model, version) -> config's say
        self._unreadable: set[str] = set()  # models whose config the share did not give (logged once)

    def command(self, what: What, header: dict, requester: tuple, now: float) -> Actions:
        """deploy / rollback / undeploy. The answer comes in the Actions now, or from `tick` at the end of the
        rollout. CommandError (or ProtocolError for a malformed header) when it cannot be done."""
        if self.share is None:
            raise CommandError(ErrorCode.BAD_REQUEST, "this manager was started without --share, so it cannot deploy")
        name = require(header, "name", str)
        for key in [k for k in self._specs if k[0] == name]:  # a version number rejected and published again
            del self._specs[key]
        discard = header.get("discard_on_failure") if what == What.DEPLOY else None
        if discard not in (None, "version", "model"):
            raise CommandError(ErrorCode.BAD_REQUEST, "discard_on_failure must be 'version' or 'model'")
        if name in self.rollouts:
            raise CommandError(
                ErrorCode.OVERLOADED, f"a rollout of '{name}' is already in progress; try again when it is over"
            )
        current = self.desired.models.get(name)
        if current is not None and current.canary is not None and what != What.UNDEPLOY:
            raise CommandError(  # (undeploy ends the canary with the model: cluster/manager/canaries.py)
                ErrorCode.OVERLOADED,
                f"a canary of '{name}' (v{current.canary.version}) is running; promote or abort it first",
            )
        if what == What.UNDEPLOY:
            if current is None:
                raise CommandError(ErrorCode.MODEL_NOT_FOUND, f"model '{name}' is not deployed")
            del self.desired.models[name]
            self.desired.changed()
            log.info("undeployed %s", name)
            return Actions(desired_changed=True, answers=[(requester, {"model": name, "undeployed": True})])
        try:
            versions = ModelRepository(self.share).versions(name)
        except RepositoryError as exc:  # an invalid model name: answered, never dropped
            raise CommandError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if what == What.DEPLOY:
            version = require(header, "version", int, optional=True) or (versions[-1] if versions else None)
        else:  # rollback
            version = require(header, "to", int, optional=True)
            if version is None:
                history = [v for v in (current.history if current else []) if v in versions]
                if not history:
                    raise CommandError(
                        ErrorCode.MODEL_NOT_FOUND, f"model '{name}' has no earlier version to roll back to"
                    )
                version = history[-1]
        if version is None or version not in versions:
            raise CommandError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model '{name}' has no version {version} in the share ({versions or 'none'})",
            )
        if current is not None and current.version == version:
            already = {
                "model": name,
                "version": version,
                "previous": version,
                "ok": True,
                "agents": {},
                "seconds": 0.0,
                "note": "already deployed",
            }
            return Actions(answers=[(requester, already)])
        timeout = require(header, "rollout_timeout", (int, float), optional=True) or ROLLOUT_TIMEOUT_S
        try:
            agents = self._fit(name, version, current)
        except PlacementError as exc:  # refused before anything moves (a version published for it leaves the share)
            log.warning("%s %s v%d refused: %s", what, name, version, exc)
            refused = Actions(errors=[(requester, ErrorCode.BAD_REQUEST, f"cannot place it: {exc}", name)])
            if discard is not None:
                refused.discard.append((name, version, discard == "model"))
            return refused
        deployment = current or ModelDeployment(None)
        deployment.agents = agents
        self.desired.models[name] = deployment
        deployment.staged = version
        self.desired.changed()
        rollout = Rollout(name, version, deployment.version, set(), now + timeout, requester, started=now)
        rollout.timeout = timeout
        rollout.discard = discard
        serving, left_out = self._participants(name)
        for agent in serving:
            rollout.join(agent, now)
        rollout.left_out.update(left_out)
        self.rollouts[name] = rollout
        log.info(
            "%s %s v%d: staging on %d agents (%s)%s",
            what,
            name,
            version,
            len(rollout.expected),
            ", ".join(sorted(rollout.expected)) or "none",
            "".join(f"; not waiting for {a}: {why}" for a, why in sorted(left_out.items())),
        )
        self._observe_all(rollout)  # an agent may already have it
        return Actions(desired_changed=True)

    def _participants(self, name: str) -> tuple[set[str], dict[str, str]]:
        """(the agents a rollout of `name` waits for, {agent the manager hears but leaves out: why})."""
        deployment = self.desired.models.get(name)
        heard = {
            a
            for a, r in self.registry.agents.items()
            if r.beat.takes_part_in(name) and (deployment is None or deployment.placed_on(a))
        }
        left_out = {a for a in heard if self.at_broker(a) is False}
        return heard - left_out, {a: "not connected to the broker" for a in left_out}

    def at_broker(self, agent: str) -> bool | None:
        """Whether a broker routes to `agent` by the brokers' last reports; None when no broker reports, or the
        agent joined too shortly before a report to be in it (both mean: wait for the agent)."""
        if self.broker_view is None:
            return None  # no broker reports: every agent the manager hears takes part, as before
        if agent in self.broker_view:
            return True
        record = self.registry.agents.get(agent)
        if record is not None and record.joined > self.broker_view_at - self.report_interval:
            return None
        return False

    def observe(self, beat: Heartbeat) -> None:
        """A heartbeat: what the agent says it staged, serves or failed to load moves the rollouts on."""
        for rollout in self.rollouts.values():
            rollout.observe(beat.agent, beat)

    def agent_lost(self, agent: str) -> None:
        """The registry expired the agent: no rollout waits for it any longer."""
        for rollout in self.rollouts.values():
            rollout.agent_lost(agent)

    def tick(self, now: float) -> Actions:
        """Move each rollout on: all staged -> switch; any failure or deadline -> abort; all switched -> answer."""
        actions = Actions(desired_changed=self.place(now))
        for name, rollout in list(self.rollouts.items()):
            deployment = self.desired.models.get(name)
            if deployment is None:  # undeployed meanwhile
                rollout.phase = "done"
            elif rollout.phase == "staging":
                self._follow_the_broker(rollout, now)
                rollout.overdue(now)
                failed = rollout.failures()
                if failed and rollout.failed_at is None:
                    rollout.failed_at = now
                # On a failure, wait (briefly) for the other agents' outcomes too, so the report names every one.
                grace_over = failed and now > min(rollout.deadline, rollout.failed_at + self.abort_grace)
                deadline_passed = now > rollout.deadline and not rollout.complete()
                if (failed and rollout.complete()) or grace_over or deadline_passed:
                    deployment.staged = None
                    if deployment.version is None:
                        del self.desired.models[name]
                    rollout.phase = "done"
                    self.desired.changed()
                    actions.desired_changed = True
                    log.warning("rollout of %s v%d aborted: %s", name, rollout.version, failed or "deadline passed")
                    if rollout.discard is not None:
                        actions.discard.append((name, rollout.version, rollout.discard == "model"))
                elif rollout.complete():
                    if deployment.version is not None:
                        deployment.history = (deployment.history + [deployment.version])[-HISTORY_LENGTH:]
                    deployment.version, deployment.staged = rollout.version, None
                    rollout.phase = "switching"
                    rollout.outcomes.clear()
                    self._observe_all(rollout)
                    self.desired.changed()
                    actions.desired_changed = True
                    log.info("rollout of %s v%d: staged everywhere, switching", name, rollout.version)
            elif rollout.phase == "switching" and (rollout.complete() or now > rollout.deadline):
                rollout.phase = "done"
                log.info("rollout of %s v%d done in %.2f s", name, rollout.version, now - rollout.started)
            if rollout.phase == "done":
                del self.rollouts[name]
                report = rollout.report(now)
                self.finished["ok" if report["ok"] else "failed"] += 1
                if rollout.requester is not None:
                    actions.answers.append((rollout.requester, report))
        return actions

    def revert(self, agreed: DesiredState, why: str) -> tuple[Actions, set[str]]:
        """The desired state could not be saved (`why`: the path and the cause). Each model whose entry differs from
        `agreed` (the last state saved) goes back to it with nothing staged, so agents drop what they staged and no
        version is served or staged that the file does not name; its rollout ends with ERROR `why`. Returns the Actions
        (errors, versions to take off the share) and the models reverted (their other answers become errors)."""
        actions = Actions()
        reverted = set()
        for name in sorted(set(self.desired.models) | set(agreed.models)):
            before = agreed.models.get(name)
            if self.desired.models.get(name) == before:
                continue  # unchanged since saved (a rollout whose staging was saved goes on)
            target = None
            if before is not None and before.version is not None:  # (a canary run goes back to where it was ...
                canary = copy.deepcopy(before.canary)
                now_entry = self.desired.models.get(name)
                if now_entry is not None and now_entry.canary is None and now_entry.version == before.version:
                    canary = None  # ... but one that ended (rolled back, aborted) stays ended: that is always safe)
                target = ModelDeployment(before.version, None, list(before.history), canary, before.agents)
            if self.desired.models.get(name) == target:
                continue  # already that: an aborted rollout (the file still names its staged version)
            reverted.add(name)
            if target is None:
                self.desired.models.pop(name, None)
            else:
                self.desired.models[name] = target
            rollout = self.rollouts.pop(name, None)
            if rollout is None:
                continue
            self.finished["failed"] += 1
            kept = f"every agent keeps serving v{target.version}" if target else f"'{name}' stays undeployed"
            log.error("rollout of %s v%d undone: %s", name, rollout.version, why)
            if rollout.requester is not None:
                text = f"rollout of '{name}' v{rollout.version} undone: {why}; {kept}"
                actions.errors.append((rollout.requester, ErrorCode.INTERNAL, text, name))
            if rollout.discard is not None:
                actions.discard.append((name, rollout.version, rollout.discard == "model"))
        if reverted:
            self.desired.changed()
            actions.desired_changed = True
        return actions, reverted

    def describe(self) -> dict:
        """Desired state per model, with which agents serve which version now (the `deployments` query)."""
        out = {}
        for name, d in self.desired.models.items():
            agents = {}
            for record in self.registry.agents.values():
                versions = [e["version"] for e in record.beat.models if e["name"] == name]
                if versions:
                    agents[record.agent_id] = versions
            out[name] = {
                "version": d.version,
                "staged": d.staged,
                "history": d.history,
                "agents": agents,
                "rolling_out": name in self.rollouts,
                **self._placement_view(name, d),
            }
        for name in [*self.registry.describe_models(), *self._share_models()]:
            out.setdefault(name, {"version": None, "staged": None, "history": [], "agents": {}, "rolling_out": False})
        return out

    def rollout_counts(self) -> dict:
        """Rollouts finished since the manager started, by outcome, and those in progress (the `rollouts` query)."""
        return {**self.finished, "in_progress": len(self.rollouts)}

    def _share_models(self) -> list[str]:
        """The models on the share, deployed or not (an unreadable share lists none: the rest of the view stands)."""
        if self.share is None:
            return []
        try:
            return ModelRepository(self.share).model_names()
        except (OSError, RepositoryError):
            return []

    def _follow_the_broker(self, rollout: Rollout, now: float) -> None:
        """While staging: an agent that starts serving joins (with its own deadline); one the broker no longer
        routes to is not waited for any more."""
        serving, left_out = self._participants(rollout.model)
        for agent in serving - rollout.expected:
            log.info("rollout of %s v%d: %s joined; waiting for it too", rollout.model, rollout.version, agent)
            rollout.join(agent, now)
            if agent in self.registry.agents:
                rollout.observe(agent, self.registry.agents[agent].beat)
        for agent in {a for a in rollout.expected - serving - set(left_out) if a in self.registry.agents}:
            log.info(
                "rollout of %s v%d: %s no longer holds it; not waiting for it", rollout.model, rollout.version, agent
            )
            rollout.agent_lost(agent, "the model was placed elsewhere")
        for agent in rollout.expected & set(left_out):
            log.warning(
                "rollout of %s v%d: %s %s; not waiting for it", rollout.model, rollout.version, agent, left_out[agent]
            )
            rollout.agent_lost(agent, left_out[agent])

    # ---- placement (placement.py decides; this feeds it and keeps its answer in the desired state) --------------

    def place(self, now: float) -> bool:
        """Place every model that wants N copies: keep copies where their agents live, re-place those of agents gone
        or draining, add missing ones where there is room. True if the desired state changed. Not before the
        manager has settled (heard every live agent): it would place on the few heard first, or nowhere."""
        if now < self.settle_until:
            return False
        wants = {}
        for name, d in self.desired.models.items():
            want = self._want(name, d)
            if want is not None:  # (its config unreadable just now: its copies stay where they are)
                wants[name] = want
        if not any(w.replicas is not None for w in wants.values()) and all(
            d.agents is None for d in self.desired.models.values()
        ):
            return False  # every model on every agent: nothing to place
        current = {n: d.agents for n, d in self.desired.models.items()}
        result = plan(wants, self._hosts(), current)
        changed = False
        for name, agents in result.agents.items():
            d = self.desired.models[name]
            if agents != d.agents:
                where = "every agent" if agents is None else ", ".join(agents) or "no agent"
                log.info("%s placed on %s (was %s)", name, where, d.agents)
                d.agents = agents
                changed = True
        for name, why in result.short.items():
            if self.short.get(name) != why:
                log.warning("%s serves on fewer agents than it wants: %s", name, why)
        for name in set(self.short) - set(result.short):
            log.info("%s has every copy it wants again", name)
        self.short = result.short
        if changed:
            self.desired.changed()
        return changed

    def _fit(self, name: str, version: int, current: ModelDeployment | None) -> list[str] | None:
        """Where a deploy of `name` v`version` goes (None: every agent); PlacementError naming what is short."""
        try:
            replicas, need, how = self._spec(name, version)
        except RepositoryError as exc:  # its agents refuse it with the same reason: the rollout reports it
            log.warning("cannot read the config of %s v%d for its placement: %s", name, version, exc)
            return current.agents if current is not None else None
        return self.fits(name, Want(replicas, need, how))

    def fits(self, name: str, want: Want) -> list[str] | None:
        """The agents `name` would be placed on with `want` (None: every agent), beside the other models;
        PlacementError naming what is short (the manager also asks it before a publish's upload)."""
        if want.replicas is None:
            return None
        wants = {n: w for n, d in self.desired.models.items() if n != name and (w := self._want(n, d)) is not None}
        current_agents = {n: d.agents for n, d in self.desired.models.items()}
        return check_fits(name, want, wants, self._hosts(), current_agents)

    def _hosts(self) -> dict[str, Host]:
        """The agents placement may use: live, and routed to by a broker (or not known yet not to be)."""
        return {
            a: Host(a, r.beat.memory_budget, r.beat.serves_only, r.beat.draining)
            for a, r in self.registry.agents.items()
            if self.at_broker(a) is not False
        }

    def _want(self, name: str, d: ModelDeployment) -> Want | None:
        """Copies wanted (the newest version's config says) and bytes per copy: config memory_mb, else the most any
        agent measured for a version it holds, else the estimate from the files; None if the share cannot say."""
        versions = d.wanted_versions()
        if not versions:
            return None
        try:
            specs = [self._spec(name, v) for v in versions]
        except RepositoryError as exc:
            if name not in self._unreadable:  # (once: this runs every tick)
                self._unreadable.add(name)
                log.warning("cannot read the config of %s for its placement: %s", name, exc)
            return None
        self._unreadable.discard(name)
        replicas = specs[-1][0] if d.staged is None else self._spec(name, d.staged)[0]
        if any(how == "memory_mb" for _, _, how in specs):
            return Want(replicas, max(need for _, need, how in specs if how == "memory_mb"), "memory_mb")
        measured = [
            info.get("memory")
            for record in self.registry.agents.values()
            for v in versions
            if isinstance(versions_info := record.beat.model_info.get(name), dict)  # (informational: may be junk)
            and isinstance(info := versions_info.get(str(v)), dict)
        ]
        measured = [m for m in measured if isinstance(m, int) and m > 0]
        if measured:
            return Want(replicas, max(measured), "measured")
        return Want(replicas, max(need for _, need, _ in specs), "estimated")

    def _spec(self, name: str, version: int) -> tuple[int | None, int, str]:
        """(replicas, bytes per copy, how known) from the version's config on the share: memory_mb, else the model
        file's size x instances. Read once per version (a version's files never change). RepositoryError."""
        key = (name, version)
        if key not in self._specs:
            repository = ModelRepository(self.share)
            config = repository.version_config(name, version)
            if config.memory_mb:
                spec = (config.replicas, config.memory_mb * 2**20, "memory_mb")
            else:
                spec = (config.replicas, repository.model_file_size(name, version) * config.instances, "estimated")
            self._specs[key] = spec
        return self._specs[key]

    def _placement_view(self, name: str, d: ModelDeployment) -> dict:
        """The `deployments` answer's placement of a model: copies wanted, the agents placed, bytes per copy."""
        want = self._want(name, d)
        return {
            "replicas": want.replicas if want is not None else None,
            "placed": d.agents,
            "memory": want.need if want is not None else None,
            "memory_from": want.how if want is not None else None,
            "short": self.short.get(name),
        }

    def _observe_all(self, rollout: Rollout) -> None:
        for agent_id, record in self.registry.agents.items():
            rollout.observe(agent_id, record.beat)


def _has(entries: list[dict], model: str, version: int) -> bool:
    return any(e["name"] == model and e["version"] == version for e in entries)


def _serves(beat: Heartbeat, model: str, version: int, default_only: bool = False) -> bool:
    return any(
        e["name"] == model and e["version"] == version and (e.get("default", True) or not default_only)
        for e in beat.models
    )
