"""The lifecycle manager: listens to agents' heartbeats, keeps the registry, tells the broker who lives and dies,
and holds the desired deployments, rolling them out to every agent.

Sockets (all bound by the manager, so agents and the broker can start before or after it):
- SUB  heartbeats: agents' PUB sockets connect here and publish a HEARTBEAT every interval;
- PUB  events: registry changes (agent_joined, agent_dead), a periodic snapshot (for the broker), and the desired
  state ("desired", on every change and every interval, for agents);
- ROUTER queries: QUERY {what: agents | models | deployments} answered with REPLY {result}, and the commands
  QUERY {what: deploy | rollback | undeploy, name, ...}, answered when the rollout is over.

A restarted manager starts with an empty registry and rebuilds it from the next round of beats; the desired state
it reads back from the share.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from cluster import protocol
from cluster.config import MAX_CONTROL_BYTES, Addresses, Timings
from cluster.logs import BadInputLog
from cluster.desired import DesiredState, ModelDeployment, newest_versions
from cluster.manager.deployments import Rollout
from cluster.manager.registry import Registry
from cluster.repository import ModelRepository
from cluster.share import ShareError, open_share
from cluster.protocol import PREAMBLE, Command, ErrorCode, Heartbeat, ProtocolError, error_header, message, require
from cluster.sockets import drain, make_socket

log = logging.getLogger("cluster.manager")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate

ABORT_GRACE = 10.0  # seconds a failing rollout waits for the remaining agents' outcomes before it is aborted


class CommandError(Exception):
    """A deploy/rollback/undeploy that cannot be done; answered as ERROR with this code."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code


class Manager:
    def __init__(self, addresses: Addresses | None = None, timings: Timings | None = None, ctx=None, share: str | None = None) -> None:
        self.addresses = addresses or Addresses()
        self.timings = timings or Timings()
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        control = dict(max_bytes=MAX_CONTROL_BYTES, timings=self.timings)
        self.heartbeats = make_socket(
            self.ctx, zmq.SUB, bind=self.addresses.manager_heartbeats, subscribe=PREAMBLE[Command.HEARTBEAT], **control
        )
        self.events = make_socket(self.ctx, zmq.PUB, bind=self.addresses.manager_events, **control)
        self.queries = make_socket(self.ctx, zmq.ROUTER, bind=self.addresses.manager_queries, **control)
        self.registry = Registry(self.timings.expiry)
        self.share = share
        self.desired = self.load_desired_state()
        self.rollouts: dict[str, Rollout] = {}  # model -> the rollout in progress for it
        self._stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.heartbeats, zmq.POLLIN)
        poller.register(self.queries, zmq.POLLIN)
        tick = min(0.1, self.timings.heartbeat_interval / 4)
        next_tick = time.monotonic()
        next_snapshot = next_tick
        log.info(
            "manager: heartbeats on %s, events on %s, queries on %s",
            self.addresses.manager_heartbeats,
            self.addresses.manager_events,
            self.addresses.manager_queries,
        )
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000)) + 1))
                if self.heartbeats in ready:
                    drain(self.heartbeats, self.process_heartbeat, 1024, log)
                if self.queries in ready:
                    drain(self.queries, self.process_query, 1024, log)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick
                    for event in self.registry.expire(now):
                        log.warning("agent %s dead: silent for %.2f s", event["agent"], event["silent_for"])
                        self.publish(event)
                        for rollout in self.rollouts.values():
                            rollout.agent_lost(event["agent"])
                    self.advance_rollouts(now)
                    if now >= next_snapshot:
                        next_snapshot = now + self.timings.heartbeat_interval
                        self.publish({"event": "snapshot", "agents": sorted(self.registry.agents)})
                        self.publish_desired()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for sock in (self.heartbeats, self.events, self.queries):
            sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    def process_heartbeat(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 2:
                raise ProtocolError(f"heartbeat must have 2 frames, got {len(frames)}")
            protocol.parse_preamble(frames[0])
            beat = Heartbeat.from_wire(protocol.unpack_header(frames[1]))
        except ProtocolError as exc:
            bad_input.warning("bad heartbeat dropped: %s", exc)
            return
        for event in self.registry.observe(beat, time.monotonic()):
            log.info("agent %s joined (host %s, pid %s)", event["agent"], beat.host, beat.pid)
            self.publish({"event": event["event"], "agent": event["agent"]})
            self.publish_desired()  # a newcomer (or a restarted agent) learns the desired state at once
        for rollout in self.rollouts.values():
            rollout.observe(beat.agent, beat)

    def process_query(self, frames: list[bytes]) -> None:
        peer = frames[0]
        request_id = None
        try:
            if len(frames) != 3:
                raise ProtocolError(f"query must be preamble + header, got {len(frames) - 1} frames")
            if protocol.parse_preamble(frames[1]) != Command.QUERY:
                raise ProtocolError("the manager answers QUERY only")
            header = protocol.unpack_header(frames[2])
            request_id = header.get("id") if isinstance(header.get("id"), (int, str)) else None
            what = require(header, "what", str)
            if what == "agents":
                result = self.registry.describe_agents(time.monotonic())
            elif what == "models":
                result = self.registry.describe_models()
            elif what == "deployments":
                result = self.describe_deployments()
            elif what in ("deploy", "rollback", "undeploy"):
                result = self.command(what, header, (peer, request_id))
                if result is None:
                    return  # answered when the rollout is over
            else:
                raise ProtocolError(f"unknown query {what!r}; ask for agents, models, deployments, deploy, rollback or undeploy")
            reply = message(Command.REPLY, {"id": request_id, "result": result})
        except ProtocolError as exc:
            bad_input.warning("bad query dropped with an error reply: %s", exc)
            reply = message(Command.ERROR, error_header(request_id, ErrorCode.BAD_REQUEST, str(exc)))
        except CommandError as exc:
            reply = message(Command.ERROR, error_header(request_id, exc.code, str(exc), header.get("name")))
        self.answer(peer, reply)

    def answer(self, peer: bytes, reply: list) -> None:
        try:
            self.queries.send_multipart([peer, *reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the asker is gone

    # ---- desired state and rollouts ---------------------------------------------------------------------------

    def load_desired_state(self) -> DesiredState:
        """From <share>/deployments.json; on a share without one, each model's newest version (and save that)."""
        if self.share is None:
            return DesiredState()
        desired = DesiredState.load(self.share)
        if desired is None:
            try:
                desired = newest_versions(open_share(self.share))
            except ShareError as exc:  # e.g. no models/ folder yet
                log.warning("cannot list the models on the share (%s): nothing is deployed yet", exc)
                desired = DesiredState()
            desired.changed()
            desired.save(self.share)
            log.info("no deployments on the share yet: serving the newest version of %s", ", ".join(desired.models) or "nothing")
        return desired

    def publish_desired(self) -> None:
        if self.share is not None:
            self.publish({"event": "desired", "state": self.desired.to_wire()})

    def set_desired(self) -> None:
        self.desired.changed()
        self.desired.save(self.share)
        self.publish_desired()

    def command(self, what: str, header: dict, requester: tuple) -> dict | None:
        """deploy / rollback / undeploy. Returns the answer now, or None when it comes at the end of a rollout."""
        if self.share is None:
            raise CommandError(ErrorCode.BAD_REQUEST, "this manager was started without --share, so it cannot deploy")
        name = require(header, "name", str)
        if name in self.rollouts:
            raise CommandError(ErrorCode.OVERLOADED, f"a rollout of '{name}' is already in progress; try again when it is over")
        current = self.desired.models.get(name)
        if what == "undeploy":
            if current is None:
                raise CommandError(ErrorCode.MODEL_NOT_FOUND, f"model '{name}' is not deployed")
            del self.desired.models[name]
            self.set_desired()
            log.info("undeployed %s", name)
            return {"model": name, "undeployed": True}
        repository = ModelRepository(self.share)
        versions = repository.versions(name)
        if what == "deploy":
            version = require(header, "version", int, optional=True) or (versions[-1] if versions else None)
        else:  # rollback
            version = require(header, "to", int, optional=True)
            if version is None:
                history = [v for v in (current.history if current else []) if v in versions]
                if not history:
                    raise CommandError(ErrorCode.MODEL_NOT_FOUND, f"model '{name}' has no earlier version to roll back to")
                version = history[-1]
        if version is None or version not in versions:
            raise CommandError(ErrorCode.MODEL_NOT_FOUND, f"model '{name}' has no version {version} in the share ({versions or 'none'})")
        if current is not None and current.version == version:
            return {"model": name, "version": version, "previous": version, "ok": True, "agents": {}, "seconds": 0.0, "note": "already deployed"}
        timeout = require(header, "rollout_timeout", (int, float), optional=True) or 300.0
        deployment = current or ModelDeployment(None)
        self.desired.models[name] = deployment
        deployment.staged = version
        expected = {a for a, r in self.registry.agents.items() if r.beat.takes_part_in(name)}
        rollout = Rollout(name, version, deployment.version, expected, time.monotonic() + timeout, requester)
        self.rollouts[name] = rollout
        log.info("%s %s v%d: staging on %d agents", what, name, version, len(rollout.expected))
        self.set_desired()
        for agent_id, record in self.registry.agents.items():  # an agent may already have it
            rollout.observe(agent_id, record.beat)
        return None

    def advance_rollouts(self, now: float) -> None:
        """Move each rollout on: all staged -> switch; any failure or deadline -> abort; all switched -> answer."""
        for name, rollout in list(self.rollouts.items()):
            deployment = self.desired.models.get(name)
            if deployment is None:  # undeployed meanwhile
                rollout.phase = "done"
            elif rollout.phase == "staging":
                if rollout.failures() and rollout.failed_at is None:
                    rollout.failed_at = now
                # On a failure, wait (briefly) for the other agents' outcomes too, so the report names every one.
                gave_up = rollout.failed_at is not None and now > min(rollout.deadline, rollout.failed_at + ABORT_GRACE)
                if (rollout.failures() and (rollout.complete() or gave_up)) or (now > rollout.deadline and not rollout.complete()):
                    deployment.staged = None
                    if deployment.version is None:
                        del self.desired.models[name]
                    rollout.phase = "done"
                    self.set_desired()
                    log.warning("rollout of %s v%d aborted: %s", name, rollout.version, rollout.failures() or "deadline passed")
                elif rollout.complete():
                    if deployment.version is not None:
                        deployment.history = (deployment.history + [deployment.version])[-20:]
                    deployment.version, deployment.staged = rollout.version, None
                    rollout.phase = "switching"
                    rollout.outcomes.clear()
                    for agent_id, record in self.registry.agents.items():
                        rollout.observe(agent_id, record.beat)
                    self.set_desired()
                    log.info("rollout of %s v%d: staged everywhere, switching", name, rollout.version)
            elif rollout.phase == "switching" and (rollout.complete() or now > rollout.deadline):
                rollout.phase = "done"
                log.info("rollout of %s v%d done in %.2f s", name, rollout.version, now - rollout.started)
            if rollout.phase == "done":
                del self.rollouts[name]
                if rollout.requester is not None:
                    peer, request_id = rollout.requester
                    self.answer(peer, message(Command.REPLY, {"id": request_id, "result": rollout.report(now)}))

    def describe_deployments(self) -> dict:
        """Desired state per model, with which agents serve which version now."""
        out = {}
        served = self.registry.describe_models()
        for name, d in self.desired.models.items():
            agents = {}
            for record in self.registry.agents.values():
                versions = [e["version"] for e in record.beat.models if e["name"] == name]
                if versions:
                    agents[record.agent_id] = versions
            out[name] = {"version": d.version, "staged": d.staged, "history": d.history, "agents": agents,
                         "rolling_out": name in self.rollouts}
        for name in served:
            out.setdefault(name, {"version": None, "staged": None, "history": [], "agents": {}, "rolling_out": False})
        return out

    def publish(self, event: dict) -> None:
        try:
            self.events.send_multipart(message(Command.EVENT, event), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event %s dropped: subscribers not keeping up", event.get("event"))
