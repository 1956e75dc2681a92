"""The lifecycle manager: keeps a registry of live agents from their heartbeats and holds the desired deployments,
rolling them out to every agent. This module is the I/O shell: the poll loop, parsing, saving and sending. What the
commands and rollouts decide is in deployments.py (`Deployments`), the registry in registry.py, both without sockets.

Sockets (all bound by the manager, so agents and the broker can start before or after it):
- SUB  heartbeats: agents' PUB sockets connect here and publish a HEARTBEAT every interval; each broker's PUB
  connects here too and publishes EVENT broker_report (BrokerReport: the agents it routes to, its load, a sequence
  number) every interval and when its agents change (brokers.py keeps them; with keys, only from the server key);
- PUB  events, two kinds: "agent_dead" {agent, instance, silent_for} when the registry expires an agent (the broker
  reads it),
  and "desired" {state} on every change, when an agent joins, and every heartbeat interval (the agents read it);
- ROUTER queries: QUERY {what: agents | models | deployments | rollouts | brokers} answered with REPLY {result}, and the
  commands QUERY {what: deploy | rollback | undeploy, name, ...}, answered when the rollout is over. QUERY
  {what: publish, name, file, config?, version?} + one frame with the model file's bytes publishes a version on the
  share for a client that has no share (`cluster deploy` without --share, a Triton repository load with files),
  then deploys it: the write runs in a thread of its own (a large file on NFS must not stall heartbeats), and the
  answer is the rollout's report; QUERY {what: publish_check, ...} judges a publish without its file (`cluster
  deploy` asks it first, so a refusal costs no upload). A starting broker asks QUERY {what: agents} (the server key
  may), to hold requests for those agents' models until they re-register.

The brokers' reports make the rollouts' broker view (Deployments.broker_view): the union of the agents the live
brokers route to, so that a rollout waits only for agents that serve, not for a heartbeat from nowhere.

Liveness has one owner: the broker, for routing (the Majordomo way: from each agent's own DEALER traffic, on its own
clock, expiring an agent silent for `timings.expiry`). The manager's registry, fed by the PUB heartbeats, decides
only what the manager decides (which agents a rollout waits for, the deployments view); its `agent_dead` event is a
backup word to the broker, which drops the agent if it has not already.

With a key (`security`, cluster/auth.py): the three sockets serve CURVE (ZAP domains "heartbeats" for heartbeats
and broker reports, "events" for the PUB, "clients" for queries), and each message is checked against the allow-list:
heartbeats only from agent keys, and each agent id only from the key it first beat with (the registry binds them);
broker reports only from the server key; deploy, rollback
and undeploy only from admin keys (others: PERMISSION_DENIED), the read-only queries from client or admin keys.

Canary runs (QUERY canary / promote / abort, admin keys; EVENT canary_digest from the brokers on the heartbeat SUB,
server key only) are canaries.py's (`Canaries`), fed here like the deployments; `rollouts` shows them.

A restarted manager starts with an empty registry and rebuilds it from the next round of beats; the desired state
it reads back from the share (a rollout in progress is not resumed; a canary run is, at its step). Every query is
answered, an error included: a desired state the share refuses to save (full, folder gone) is undone
(Deployments.revert), the requester gets the path and the cause, and the save is tried again every
STATE_SAVE_RETRY_S; the manager never dies of it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zmq

from cluster import protocol
from cluster.auth import BusSecurity, key_of, refusal
from cluster.clock import RunClock
from cluster.config import MAX_CONTROL_BYTES, STATE_SAVE_RETRY_S
from cluster.desired import DEPLOYMENTS_FILE, DesiredState, newest_versions
from cluster.logs import BadInputLog
from cluster.manager.brokers import Brokers
from cluster.manager.canaries import Canaries, parse_options
from cluster.manager.deployments import Actions, CommandError, Deployments
from cluster.manager.placement import PlacementError, Want
from cluster.manager.registry import Registry
from cluster.model_config import ModelConfig, RepositoryError, from_triton, is_triton_config
from cluster.protocol import (
    PREAMBLE,
    Answer,
    BrokerReport,
    CanaryDigest,
    Command,
    Desired,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    Query,
    What,
    error_header,
    message,
    message_id,
    require,
)
from cluster.publish import compile_refusal, program_names, publish_upload, remove_version
from cluster.repository import MODEL_FILES, PROGRAM_FILES, ModelRepository, check_name
from cluster.role_settings import ManagerSettings
from cluster.settings import from_env
from cluster.share import ShareError, open_share
from cluster.sockets import drain, make_socket

log = logging.getLogger("cluster.manager")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate

# the queries that change the cluster: admin keys only (publish_check: a publish's header checked before its file is
# sent, so that a refusal costs no upload)
COMMANDS = (
    What.DEPLOY,
    What.ROLLBACK,
    What.UNDEPLOY,
    What.PUBLISH,
    What.PUBLISH_CHECK,
    What.CANARY,
    What.PROMOTE,
    What.ABORT,
)


class Manager:
    def __init__(
        self,
        settings: ManagerSettings | None = None,
        ctx=None,
        security: BusSecurity | None = None,
    ) -> None:
        self.settings = settings = settings or from_env(ManagerSettings)  # None: its CLUSTER_* variables
        share = settings.share
        self.addresses = settings.addresses
        self.timings = settings.timings
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.security = security
        self.allow = security.allow if security is not None else None
        if security is not None:
            security.start_authenticator(self.ctx)

        def curve(domain: str):
            return security.server(domain) if security is not None else None

        control = dict(max_bytes=MAX_CONTROL_BYTES, timings=self.timings)
        self.heartbeats = make_socket(
            self.ctx,
            zmq.SUB,
            bind=self.addresses.manager_heartbeats,
            subscribe=PREAMBLE[Command.HEARTBEAT],
            curve=curve("heartbeats"),
            **control,
        )
        self.heartbeats.setsockopt(zmq.SUBSCRIBE, PREAMBLE[Command.EVENT])  # the brokers' reports
        self.events = make_socket(
            self.ctx, zmq.PUB, bind=self.addresses.manager_events, curve=curve("events"), **control
        )
        self.queries = make_socket(
            self.ctx,
            zmq.ROUTER,
            bind=self.addresses.manager_queries,
            curve=curve("clients"),
            max_bytes=settings.limits.max_upload_bytes,  # a model file to publish travels on it
            timings=self.timings,
        )
        self.brokers = Brokers(self.timings.expiry)  # the brokers' latest reports
        self.clock = RunClock(self.timings.pause_bound, time.monotonic(), "manager", log)  # our own stalls
        self.registry = Registry(self.timings.expiry)
        self.share = share
        self._unsaved = False  # the desired state differs from the share's deployments.json (a save failed)
        self._next_save = 0.0  # when to try that save again
        self.deployments = Deployments(share, self.load_desired_state(), self.registry)
        self._agreed = self._copy_of_desired()  # the last desired state saved (what a failed save goes back to)
        if self._unsaved:
            self.save_desired()  # a share that refuses it does not stop the manager: tried again each tick
        self.deployments.report_interval = self.timings.heartbeat_interval  # a broker reports once a beat
        self.deployments.settle_until = time.monotonic() + self.timings.expiry  # every live agent has beaten by then
        self.canaries = Canaries(
            self.deployments, look_interval=self.timings.canary_digest_interval, settle=self.timings.expiry
        )
        self._stop = threading.Event()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="publish")  # one publish at a time, off the loop
        # model -> (the write, requester, header, whether the model is new on the share)
        self.publishing: dict[str, tuple[Future, tuple, dict, bool]] = {}

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.heartbeats, zmq.POLLIN)
        poller.register(self.queries, zmq.POLLIN)
        tick = min(0.1, self.timings.heartbeat_interval / 4)
        next_tick = time.monotonic()
        next_desired = next_tick
        self.clock = RunClock(self.timings.pause_bound, next_tick, "manager", log)
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
                    if self.deployments.rollouts:  # a beat that staged or switched moves its rollout on now, not at
                        self.carry_out(self.deployments.tick(time.monotonic()))  # the next tick (up to 0.1 s later)
                if self.queries in ready:
                    drain(self.queries, self.process_query, 1024, log)
                now = time.monotonic()
                # Looked at with the `now` the tick judges by: a stall anywhere in this pass (we did not run) is
                # known before any agent is judged silent; beats sent meanwhile are unread, not missing.
                lost = self.clock.look(now)
                if lost:
                    self.registry.paused(lost, now)
                    self.brokers.paused(lost, now)
                if now >= next_tick:
                    next_tick = now + tick
                    if self.allow is not None:
                        self.allow.refresh(now)  # an add or revoke takes effect within about a second
                    for event in self.registry.expire(now):
                        log.warning("agent %s dead: silent for %.2f s", event["agent"], event["silent_for"])
                        self.publish(event)
                        self.deployments.agent_lost(event["agent"])
                    self.finish_publishing(now)
                    if self._unsaved and now >= self._next_save:
                        self.save_desired(now)
                    self.expire_brokers(now)
                    self.carry_out(self.deployments.tick(now))
                    self.carry_out(self.canaries.tick(time.time()))
                    if now >= next_desired:  # also every interval: a missed PUB message costs one interval
                        next_desired = now + self.timings.heartbeat_interval
                        self.publish_desired()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)  # a half-written version is never renamed into place
        for sock in (self.heartbeats, self.events, self.queries):
            sock.close(linger=0)
        if self.security is not None:
            self.security.stop()
        if self._own_ctx:
            self.ctx.term()

    def process_heartbeat(self, frames: list[bytes]) -> None:
        """An agent's HEARTBEAT, or a broker's EVENT broker_report (the two share the SUB socket)."""
        try:
            if len(frames) != 2:
                raise ProtocolError(f"heartbeat must have 2 frames, got {len(frames)}")
            if protocol.parse_preamble(frames[0]) == Command.EVENT:
                self.take_broker_report(frames)
                return
            beat = Heartbeat.from_wire(protocol.unpack_header(frames[1]))
        except ProtocolError as exc:
            bad_input.warning("bad heartbeat dropped: %s", exc)
            return
        key = None
        if self.allow is not None:
            key = key_of(frames[0])
            refused = refusal(self.allow, key, "agent")
            if refused is None and not self.registry.may_beat(beat.agent, key):
                refused = (ErrorCode.PERMISSION_DENIED, "the agent id is registered with another key")
            if refused is not None:
                bad_input.warning("heartbeat for agent %r refused: %s", beat.agent, refused[1])
                return
        for event in self.registry.observe(beat, time.monotonic(), key):
            log.info("agent %s joined (host %s, pid %s)", event["agent"], beat.host, beat.pid)
            self.publish_desired()  # a newcomer (or a restarted agent) learns the desired state at once
        self.deployments.observe(beat)

    def process_query(self, frames: list[bytes]) -> None:
        peer = frames[0]
        request_id = header = None
        try:
            if not 3 <= len(frames) <= 4 + len(PROGRAM_FILES):
                raise ProtocolError(f"query must be preamble + header (+ files), got {len(frames) - 1} frames")
            if protocol.parse_preamble(frames[1]) != Command.QUERY:
                raise ProtocolError("the manager answers QUERY only")
            header = protocol.unpack_header(frames[2])
            request_id = message_id(header)
            query = Query.from_wire(header, self.QUERIES)
            what = query.what
            files = 1 + len(program_names(header.get("programs"))) if what == What.PUBLISH else 0
            if len(frames) != 3 + files:
                raise ProtocolError(
                    "'publish' carries one frame with the model file, then one per name in 'programs'; "
                    "other queries carry none"
                )
            if self.allow is not None:
                action = "deploy" if what in COMMANDS else "query"
                refused = refusal(self.allow, key_of(frames[1]), action, what)
                if (
                    refused is not None
                    and what == What.AGENTS
                    and refusal(self.allow, key_of(frames[1]), "report") is None
                ):
                    refused = None  # the broker, starting, asks which agents to wait for
                if refused is not None:
                    bad_input.warning("%s refused: %s", what, refused[1])
                    self.answer(peer, message(Command.ERROR, error_header(request_id, *refused)))
                    return
            answer = self.QUERIES[what](self, header, (peer, request_id), frames)
            if answer is None:
                return  # answered when it is done
            reply = message(Command.REPLY, answer.to_wire())
        except ProtocolError as exc:
            bad_input.warning("bad query dropped with an error reply: %s", exc)
            reply = message(Command.ERROR, error_header(request_id, ErrorCode.BAD_REQUEST, str(exc)))
        except CommandError as exc:
            reply = message(Command.ERROR, error_header(request_id, exc.code, str(exc), header.get("name")))
        except RepositoryError as exc:  # e.g. an invalid model name: answered, never dropped (the asker would wait)
            reply = message(Command.ERROR, error_header(request_id, ErrorCode.BAD_REQUEST, str(exc)))
        except Exception as exc:  # the share failing under us, or a bug: answered, and the manager keeps serving
            log.exception("query %r failed", header.get("what") if isinstance(header, dict) else None)
            reply = message(Command.ERROR, error_header(request_id, ErrorCode.INTERNAL, f"the manager failed: {exc}"))
        self.answer(peer, reply)

    def take_broker_report(self, frames: list) -> None:
        """A broker's report of the agents it routes to and its load, or its canary digest (with keys on: only from
        the server key). ProtocolError if malformed."""
        if self.allow is not None and (refused := refusal(self.allow, key_of(frames[0]), "report")) is not None:
            bad_input.warning("broker report refused: %s", refused[1])
            return
        event = protocol.parse_event(protocol.unpack_header(frames[1]))
        if isinstance(event, CanaryDigest):
            self.carry_out(self.canaries.digest(event, time.time()))
            return
        if not isinstance(event, BrokerReport):
            raise ProtocolError("the manager takes only broker_report and canary_digest events")
        self.brokers.observe(event, time.monotonic(), time.time())
        self.update_broker_view()

    def expire_brokers(self, now: float) -> None:
        """Brokers silent for an expiry leave the view (none left: rollouts wait for every agent heard)."""
        if self.brokers.expire(now):
            self.update_broker_view()

    def update_broker_view(self) -> None:
        """The rollouts' broker view: the union of the live brokers' agents (None when no broker reports)."""
        self.deployments.broker_view = self.brokers.view()
        self.deployments.broker_view_at = self.brokers.oldest_report()

    # ---- the queries it answers: one handler each (the answer, or None when it comes later) ----------------------

    def query_agents(self, header: dict, requester: tuple, frames: list) -> Answer:
        # at_broker: in a live broker's last report of the agents it routes to (True), judged in none (False: a
        # rollout leaves it out), or not known yet (None: the rollout waits for it). The desired state rides along: a
        # starting broker (it asks this) fails requests for models not deployed at once.
        agents = self.registry.describe_agents(time.monotonic())
        result = [dict(a, at_broker=self.deployments.at_broker(a["id"])) for a in agents]
        return Answer(requester[1], result, desired=self.deployments.desired.to_wire())

    def query_models(self, header: dict, requester: tuple, frames: list) -> Answer:
        return Answer(requester[1], self.registry.describe_models())

    def query_deployments(self, header: dict, requester: tuple, frames: list) -> Answer:
        return Answer(requester[1], self.deployments.describe())

    def query_rollouts(self, header: dict, requester: tuple, frames: list) -> Answer:
        """The rollouts' counts and the canary runs ({name}: one model's)."""
        name = require(header, "name", str, optional=True)
        return Answer(requester[1], self.deployments.rollout_counts() | self.canaries.rollouts(name, time.time()))

    def query_brokers(self, header: dict, requester: tuple, frames: list) -> Answer:
        return Answer(requester[1], self.brokers.describe(time.monotonic()))

    def query_command(self, header: dict, requester: tuple, frames: list) -> None:
        """deploy, rollback, undeploy: answered now, or when the rollout is over."""
        self.carry_out(self.deployments.command(header["what"], header, requester, time.monotonic()))

    def query_publish(self, header: dict, requester: tuple, frames: list) -> None:
        """Answered when the version is written and rolled out."""
        programs = dict(zip(program_names(header.get("programs")), map(protocol.frame_bytes, frames[4:])))
        self.start_publishing(header, protocol.frame_bytes(frames[3]), requester, programs)

    def query_publish_check(self, header: dict, requester: tuple, frames: list) -> Answer:
        self.check_publish(header)
        return Answer(requester[1], {"ok": True})

    def query_canary(self, header: dict, requester: tuple, frames: list) -> None:
        """canary, promote, abort (cluster/manager/canaries.py): answered at once with the run's status."""
        if header.get("name") in self.publishing:
            raise CommandError(ErrorCode.OVERLOADED, f"a deploy of '{header['name']}' is in progress; try again after")
        self.carry_out(self.canaries.command(header["what"], header, requester, time.time()))

    QUERIES = {  # what the manager answers: QUERY `what` -> its handler
        What.AGENTS: query_agents,
        What.MODELS: query_models,
        What.DEPLOYMENTS: query_deployments,
        What.ROLLOUTS: query_rollouts,
        What.BROKERS: query_brokers,
        What.DEPLOY: query_command,
        What.ROLLBACK: query_command,
        What.UNDEPLOY: query_command,
        What.PUBLISH: query_publish,
        What.PUBLISH_CHECK: query_publish_check,
        What.CANARY: query_canary,
        What.PROMOTE: query_canary,
        What.ABORT: query_canary,
    }

    # ---- publishing a model sent over the bus -------------------------------------------------------------------

    def check_publish(self, header: dict, size: int | None = None) -> tuple[str, str, int | None, dict | None, bool]:
        """Everything about a publish that can be judged without its file: (name, file, version, config, whether the
        model is new). The config may be ours or Triton's (a tritonclient `load_model(config=...)`). CommandError /
        ProtocolError if refused. `cluster deploy` asks this (publish_check) before it sends the file. With the
        file's `size` (or the config's memory_mb), a config with `replicas` that cannot be placed is refused too."""
        if self.share is None:
            raise CommandError(ErrorCode.BAD_REQUEST, "this manager was started without --share, so it cannot deploy")
        name = require(header, "name", str)
        file_name = require(header, "file", str)
        version = require(header, "version", int, optional=True)
        config = require(header, "config", dict, optional=True)
        if file_name not in MODEL_FILES:
            raise CommandError(ErrorCode.BAD_REQUEST, f"the model file must be {' or '.join(MODEL_FILES)}")
        if header.get("compile") is not None and (why := compile_refusal(file_name, header["compile"])):
            raise CommandError(ErrorCode.BAD_REQUEST, f"cannot compile: {why}")
        try:
            check_name(name)
            if config is not None and is_triton_config(config):
                config = from_triton(config, name)
            if config is not None:
                parsed = ModelConfig.from_dict(config, name=name)  # refused now, before anything is written
                if parsed.replicas is not None and (parsed.memory_mb or size is not None):  # room for its copies?
                    need = parsed.memory_mb * 2**20 or size * parsed.instances
                    self.deployments.fits(name, Want(parsed.replicas, need, "memory_mb" if parsed.memory_mb else ""))
            new_model = not ModelRepository(self.share).versions(name)
        except RepositoryError as exc:
            raise CommandError(ErrorCode.BAD_REQUEST, str(exc)) from None
        except PlacementError as exc:
            raise CommandError(ErrorCode.BAD_REQUEST, f"cannot place it: {exc}") from None
        if config is None and new_model:
            raise CommandError(
                ErrorCode.BAD_REQUEST, f"'{name}' is a new model: give its config (inputs, outputs) with the file"
            )
        if name in self.publishing or name in self.deployments.rollouts:
            raise CommandError(
                ErrorCode.OVERLOADED, f"a deploy of '{name}' is already in progress; try again when it is over"
            )
        running = self.canaries.running(name)
        if running is not None:
            raise CommandError(
                ErrorCode.OVERLOADED, f"a canary of '{name}' (v{running.version}) is running; promote or abort it first"
            )
        if header.get("canary") is not None:  # {steps, step_seconds, shadow, ...}: checked now, before the upload
            parse_options(require(header, "canary", dict))
        return name, file_name, version, config, new_model

    def start_publishing(
        self, header: dict, data: bytes | memoryview, requester: tuple, programs: dict | None = None
    ) -> None:
        """Check a publish, then write the version in the writer thread; `finish_publishing` deploys it.
        CommandError / ProtocolError if refused."""
        name, file_name, version, config, new_model = self.check_publish(header, len(data))
        log.info("publishing %s (%s, %d bytes) sent over the bus", name, file_name, len(data))
        compile_for = header.get("compile")  # checked by check_publish; compiled in a child process (no torch here)
        write = self._writer.submit(
            publish_upload, self.share, name, file_name, data, config, version, programs, compile_for
        )
        self.publishing[name] = (write, requester, header, new_model)

    def finish_publishing(self, now: float) -> None:
        """Each finished write: its version is deployed (answered when that rollout is over), or its error answered."""
        for name, (write, requester, header, new_model) in list(self.publishing.items()):
            if not write.done():
                continue
            del self.publishing[name]
            request_id = requester[1]
            try:
                version, published = write.result()
                stable = self.deployments.desired.models.get(name)
                if header.get("canary") is not None and stable is not None and stable.version is not None:
                    log.info("%s %s v%d; a canary of it", "published" if published else "already have", name, version)
                    options = dict(header["canary"], version=version)
                    self.carry_out(self.canaries.start(name, options, requester, time.time()))
                    continue
                log.info("%s %s v%d; deploying it", "published" if published else "already have", name, version)
                deploy = {"name": name, "version": version, "rollout_timeout": header.get("rollout_timeout")}
                if published:  # rejected by the rollout: off the share again (the whole model, if it is new)
                    deploy["discard_on_failure"] = "model" if new_model else "version"
                self.carry_out(self.deployments.command("deploy", deploy, requester, now))
            except (RepositoryError, CommandError) as exc:
                code, text = (exc.code if isinstance(exc, CommandError) else ErrorCode.BAD_REQUEST), str(exc)
            except Exception as exc:  # the share failing under us (disk full, NFS gone): say so, keep running
                log.exception("publishing %s failed", name)
                code, text = ErrorCode.INTERNAL, f"could not publish '{name}' on the share: {exc}"
            else:
                continue
            self.answer(requester[0], message(Command.ERROR, error_header(request_id, code, text, name)))

    def answer(self, peer: bytes, reply: list) -> None:
        try:
            self.queries.send_multipart([peer, *reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the asker is gone

    # ---- desired state ----------------------------------------------------------------------------------------

    def load_desired_state(self) -> DesiredState:
        """From <share>/deployments.json; on a share without one, each model's newest version (and save that)."""
        if self.share is None:
            return DesiredState()
        desired = DesiredState.load(self.share)
        if desired is not None and any(d.staged is not None for d in desired.models.values()):
            # a rollout was in progress when the last manager stopped: it ended with it (agents drop the version)
            for name, d in desired.models.items():
                if d.staged is not None:
                    log.warning("the rollout of %s v%d ended with the last manager: not resumed", name, d.staged)
                    d.staged = None
            desired.models = {n: d for n, d in desired.models.items() if d.version is not None}
            desired.changed()
            self._unsaved = True
        if desired is None:
            try:
                desired = newest_versions(open_share(self.share))
            except ShareError as exc:  # e.g. no models/ folder yet
                log.warning("cannot list the models on the share (%s): nothing is deployed yet", exc)
                desired = DesiredState()
            desired.changed()
            self._unsaved = True
            log.info(
                "no deployments on the share yet: serving the newest version of %s",
                ", ".join(desired.models) or "nothing",
            )
        return desired

    def _copy_of_desired(self) -> DesiredState:
        return DesiredState.from_wire(self.deployments.desired.to_wire())

    def save_desired(self, now: float | None = None) -> str | None:
        """Save the desired state on the share. None when saved; else what failed (the path and the cause), logged,
        and the save is tried again every STATE_SAVE_RETRY_S while the state differs from the file."""
        path = Path(self.share) / DEPLOYMENTS_FILE
        try:
            self.deployments.desired.save(self.share)
        except OSError as exc:
            self._next_save = (time.monotonic() if now is None else now) + STATE_SAVE_RETRY_S
            failure = f"could not save the desired state to {path}: {exc.strerror or exc}"
            log.error("%s", failure)
            return failure
        if self._unsaved:
            log.info("saved the desired state to %s", path)
        self._agreed = self._copy_of_desired()
        self._unsaved = False
        return None

    def carry_out(self, actions: Actions) -> None:
        """Do what the deployments asked for: save and publish a changed desired state, then answer requesters.
        A state that cannot be saved is undone (Deployments.revert), so that the agents, the file and the answers
        agree: its rollout is answered with the error, and the manager keeps serving."""
        reverted: set[str] = set()
        failure = None
        if actions.desired_changed:
            failure = self.save_desired()
            if failure is not None:
                undo, reverted = self.deployments.revert(self._agreed, failure)
                actions.discard.extend(undo.discard)
                actions.errors.extend(undo.errors)
                self._unsaved = self.deployments.desired.to_wire()["models"] != self._agreed.to_wire()["models"]
            self.publish_desired()  # undone: agents drop what they staged
        for name, version, whole_model in actions.discard:  # before the answer, which says it is done (a rename)
            log.info("taking %s v%d off the share: its rollout rejected it", name, version)
            try:
                remove_version(self.share, name, version, whole_model=whole_model)
            except OSError as exc:
                log.warning("could not take %s v%d off the share: %s", name, version, exc)
        for (peer, request_id), result in actions.answers:
            name = result.get("model")
            if name in reverted:  # e.g. an undeploy: not done after all
                text = f"'{name}' is unchanged: {failure}"
                self.answer(peer, message(Command.ERROR, error_header(request_id, ErrorCode.INTERNAL, text, name)))
            else:
                self.answer(peer, message(Command.REPLY, Answer(request_id, result).to_wire()))
        for (peer, request_id), code, text, name in actions.errors:
            self.answer(peer, message(Command.ERROR, error_header(request_id, code, text, name)))

    def publish_desired(self) -> None:
        if self.share is not None:
            self.publish(Desired(self.deployments.desired.to_wire()).to_wire())

    def publish(self, event: dict) -> None:
        try:
            self.events.send_multipart(message(Command.EVENT, event), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event %s dropped: subscribers not keeping up", event.get("event"))
