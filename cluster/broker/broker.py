"""The broker: clients in on one ROUTER, agents on another, requests routed to live agents that have the model.

Shaped after the ZeroMQ Guide's Majordomo broker, with its gaps fixed (dispatcher.py says how). Layout (pyzmq's
zmq/auth idea, as `ClientCore` and the manager's `Registry`): the logic is in plain classes without I/O, the
`Dispatcher` (requests, queues, deadlines, re-dispatch) over the `AgentTable` (live agents and what they serve);
this module is the thin part that owns the sockets: one thread, one poll loop (`run()`), parsing at the edge of the
process, and the sends. Tensor frames are forwarded as received (zero-copy, copy=False), never decoded.

With a key (`security`, cluster/auth.py): both ROUTERs serve CURVE (ZAP domains "clients" and "agents"), the SUB to
the manager's events connects with the server key, every client message is checked against the allow-list (its
key's role: client or admin; else an UNAUTHENTICATED or PERMISSION_DENIED answer), and agent messages are checked in
the Dispatcher (role agent, and the key an agent registered with). The agents' ROUTER then does not hand a live
identity over to a newcomer (libzmq ignores a second connection with an identity in use, so the real agent keeps its
pipe); ZMTP heartbeats close a dead agent's connection within one expiry, so a restarted agent gets its id back.

Agent identities are per process ("<agent id>/<secret random token>", protocol.agent_identity; the token is not the
public instance `agents()` shows), so ROUTER_HANDOVER (keys off) only ever hands a connection back to the process
that owned it, reconnecting after a network blip while the broker still holds its old, half-dead link. Two processes
started with the same --id hold two connections; the Dispatcher accepts the first and answers the second's READY
with ERROR AGENT_ID_IN_USE (it logs it and exits), so a mistaken duplicate, or a copy of a live agent's id and
instance, can neither take the first one's traffic nor orphan it.

Liveness is the broker's, for routing (the Majordomo way). It hears every agent directly, on the agents' DEALER
link: any message from a registered agent (READY, HEARTBEAT, REPLY, ERROR) proves it alive, on the broker's own
clock, and an agent silent for `timings.expiry` seconds is removed, as is one that says DISCONNECT or that a send
fails to reach (ROUTER_MANDATORY: EHOSTUNREACH). The manager's `agent_dead` event (from the heartbeats agents PUBlish
to it, on its clock) is a backup word: the broker drops the agent it names too. That word can only drop an agent
sooner, never keep one; an agent dropped while still alive is told DISCONNECT on its next message and registers
again with READY, and its requests in flight were re-dispatched (what it answers for them late is dropped: an answer
is accepted only from an agent that holds its route, see the Dispatcher). The manager's registry
decides liveness for the control plane only (rollouts, `cluster models`), never for routing.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading
import time

import zmq

from cluster import protocol
from cluster.auth import BusSecurity, key_of
from cluster.broker.agents import UnknownModel
from cluster.broker.dispatcher import Dispatcher, Send, client_error
from cluster.broker.intake import ClientIntake, bad_input
from cluster.broker.metrics import BrokerMetrics, broker_load, metrics_host_for
from cluster.broker.outbox import ClientOutbox
from cluster.broker.replies import ClientReplies
from cluster.broker.routing import make_policy
from cluster.broker.sender import PeerSends, outgoing
from cluster.broker.shadow import ShadowComparer
from cluster.clock import RunClock
from cluster.config import CLIENT_SNDHWM, MAX_CONTROL_BYTES, default_broker_name
from cluster.desired import DesiredState
from cluster.protocol import (
    PREAMBLE,
    AgentDead,
    Answer,
    BrokerHello,
    BrokerReport,
    CanaryDigest,
    Command,
    Desired,
    ErrorCode,
    ProtocolError,
    Query,
    What,
    as_bytes,
    message,
    pack,
    parse_event,
    require,
)
from cluster.role_settings import BrokerSettings
from cluster.settings import from_env
from cluster.sockets import drain, handle_each, make_socket, send_frames

log = logging.getLogger("cluster.broker")
_ANSWERS = (Command.REPLY, Command.ERROR, Command.HEARTBEAT)  # what a BATCH may hold

DRAIN_BATCH = 256  # messages read from one socket before looking at the others
AGENTS_QUERY_ID = "broker-start-agents"  # the id of the broker's start-up QUERY {what: agents} to the manager
UNREADY_CLIENTS_MAX = 10_000  # clients told "not ready" that are told "ready" once it is (the oldest forgotten)


def _malloc_trim():
    """glibc's malloc_trim(0), or None elsewhere: freed heap memory goes back to the OS. Needed here because
    replies freed in bulk (a client's pipe, when it leaves) stay in glibc's arenas otherwise, and RSS stays high."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


malloc_trim = _malloc_trim()


def broker_name(settings: BrokerSettings) -> str:
    """The broker's one name: its ROUTERs' routing id (set before they bind) and what its reports and metrics say.
    --name, else host:port of its clients' address; on a port the OS picks (0, *) that port is not known before the
    bind, so host:any-<random> (unique, as a port would be)."""
    if settings.broker_name:
        return settings.broker_name
    address = settings.addresses.broker_clients
    if address.startswith("tcp://") and address.rsplit(":", 1)[-1] in ("0", "*"):
        return default_broker_name(address.rsplit(":", 1)[0] + ":any-" + secrets.token_hex(4))
    return default_broker_name(address)


class Broker(ClientIntake, ClientReplies):
    def __init__(
        self,
        settings: BrokerSettings | None = None,
        ctx: zmq.Context | None = None,
        security: BusSecurity | None = None,
    ) -> None:
        self.settings = settings = settings or from_env(BrokerSettings)  # None: its CLUSTER_* variables
        self.addresses = settings.addresses
        self.timings = settings.timings
        self.policy = make_policy(settings.policy)
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.security = security
        secured = security is not None
        if secured:
            security.start_authenticator(self.ctx)
        # Its routing id at clients (their ROUTER addresses it by name) and at agents: the bound side names itself
        self.name = broker_name(settings)
        self.clients = make_socket(
            self.ctx,
            zmq.ROUTER,
            bind=self.addresses.broker_clients,
            sndhwm=CLIENT_SNDHWM,  # a few replies per client in ZeroMQ's pipe; beyond, the outbox's byte budget
            identity=self.name.encode(),
            timings=self.timings,
            curve=security.server("clients") if secured else None,
        )
        self.agents_sock = make_socket(
            self.ctx,
            zmq.ROUTER,
            bind=self.addresses.broker_agents,
            handover=not secured,  # with keys, an identity is not handed over (see above)
            identity=self.name.encode(),
            timings=self.timings,
            curve=security.server("agents") if secured else None,
            heartbeat=(self.timings.heartbeat_interval, self.timings.expiry) if secured else None,
        )
        self.events = make_socket(
            self.ctx,
            zmq.SUB,
            connect=self.addresses.manager_events,
            subscribe=PREAMBLE[Command.EVENT],
            max_bytes=MAX_CONTROL_BYTES,
            timings=self.timings,
            curve=security.client() if secured else None,
        )
        # At start, the manager's query socket says which agents are alive (QUERY {what: agents}): requests for their
        # models are held until they have registered here (Dispatcher.expect_agents).
        self.manager = make_socket(
            self.ctx,
            zmq.DEALER,
            connect=self.addresses.manager_queries,
            hwm=4,
            max_bytes=MAX_CONTROL_BYTES,
            timings=self.timings,
            curve=security.client() if secured else None,
        )
        # Every heartbeat interval, and at once when the agents we route to change: a BrokerReport (those agents, our
        # load) on a PUB to the manager's heartbeat address, so that its rollouts wait only for agents that serve; the
        # manager's view is the union of every broker's, and a standby manager could subscribe too.
        self.reports = make_socket(
            self.ctx,
            zmq.PUB,
            connect=self.addresses.manager_heartbeats,
            hwm=4,  # the manager down: a few reports wait, the rest are dropped (a fresh one follows; seq tells)
            max_bytes=MAX_CONTROL_BYTES,
            timings=self.timings,
            curve=security.client() if secured else None,
        )
        self.allow = security.allow if secured else None
        self.dispatcher = Dispatcher(self.timings, self.policy, time.monotonic(), allow=self.allow)
        self.outbox = ClientOutbox(self.timings.client_reply_budget, self.timings.client_read_grace)
        self.sends = PeerSends(self.send_to_agent, self.send_to_client, self.agent_send_failed)  # one per peer a pass
        self.unready: dict[bytes, None] = {}  # clients told "not ready", in order: told "ready" once it is
        self._trims: list[float] = []  # when to call malloc_trim next
        self.clock = RunClock(self.timings.pause_bound, time.monotonic(), "broker", log)  # our own stalls
        self._report_seq = 0
        self._reported_agents: list[str] | None = None  # the agent list of our last report
        self._digest_seq = 0  # canary digests sent (on the same PUB as the reports)
        self.comparer = ShadowComparer(self.dispatcher.canary)  # shadow answer pairs, compared off this loop
        self.dispatcher.canary.on_pair = self.comparer.submit
        self.metrics = BrokerMetrics(self.name)
        self.metrics_url = None  # http://host:port of our /metrics, when served
        if settings.metrics_port:
            host = settings.metrics_host or metrics_host_for(self.addresses.broker_clients)
            try:
                self.metrics_url = self.metrics.serve(host, settings.metrics_port)
            except OSError as exc:  # routing matters more than its metrics: serve on, and say so loudly
                where = f"{host}:{settings.metrics_port}"
                log.error("cannot serve the broker's metrics on %s (%s): running without them", where, exc)
        self._stop = threading.Event()

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() is called."""
        # Only the two hot sockets are polled: every socket in a zmq_poll costs a mailbox check (a poll and a getpid
        # syscall in libzmq) before and after each wait. The manager's events and answers are read each tick.
        poller = zmq.Poller()
        poller.register(self.agents_sock, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        # With keys on, the preamble frame stays a zmq.Frame: its User-Id property is the sender's key (auth.key_of).
        copied = 1 if self.allow is not None else 3
        self.ask_manager_for_agents()
        tick = min(0.1, self.timings.heartbeat_interval / 2)
        if self.timings.hedge_after > 0:
            tick = min(tick, max(0.01, self.timings.hedge_after / 2))  # a stuck request is hedged soon after its time
        next_tick = time.monotonic()
        next_beat = next_digest = next_tick
        self.clock = RunClock(self.timings.pause_bound, next_tick, "broker", log)
        log.info(
            "broker %s serving clients on %s, agents on %s, policy %s, hedging %s, incarnation %s",
            self.name,
            self.addresses.broker_clients,
            self.addresses.broker_agents,
            self.policy.name,
            f"after {self.timings.hedge_after * 1e3:g} ms" if self.timings.hedge_after > 0 else "off",
            self.dispatcher.incarnation.hex(),
        )
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000)) + 1))
                self.look_at_clock(time.monotonic())  # a pause in the poll: known before any message is handled
                if self.agents_sock in ready:
                    self.drain_pass(self.agents_sock, self.process_agent, copied)
                if self.clients in ready:
                    self.drain_pass(self.clients, self.process_client, copied)
                if self.outbox.held:
                    self.flush_outbox()
                now = time.monotonic()
                self.look_at_clock(now)  # with the `now` the tick judges by: a pause anywhere in this pass is known
                if now >= next_tick:
                    next_tick = now + tick
                    drain(self.events, self.process_event, DRAIN_BATCH, log)
                    drain(self.manager, self.process_manager_answer, DRAIN_BATCH, log)
                    if self.allow is not None:
                        self.allow.refresh(now)  # an add or revoke takes effect within about a second
                    self.deliver(self.dispatcher.tick(now))
                    if self.metrics_url is not None:
                        self.metrics.publish(
                            dict(broker_load(self.dispatcher), canary=self.dispatcher.canary.snapshot())
                        )
                    if self.unready and self.dispatcher.registration.serving(now):
                        self.tell_ready()
                    if self._trims and now >= self._trims[0]:
                        self._trims.pop(0)
                        if malloc_trim is not None:
                            malloc_trim(0)
                    if now >= next_beat:
                        next_beat = now + self.timings.heartbeat_interval
                        self.deliver(self.dispatcher.heartbeats())
                        self.report_to_manager()
                    else:
                        self.report_if_agents_changed()
                    if self.dispatcher.canary.runs and (now >= next_digest or self.dispatcher.canary.tripped_news):
                        next_digest = now + self.timings.canary_digest_interval
                        self.send_canary_digest()
        finally:
            self.close()

    def drain_pass(self, sock: zmq.Socket, handle, copied: int) -> None:
        """Up to DRAIN_BATCH messages of `sock` handled; what they made goes at the end, one message per peer."""
        self.sends.collecting = True
        try:
            drain(sock, handle, DRAIN_BATCH, log, copied)
        finally:
            self.sends.collecting = False
        try:
            self.sends.flush()
        except Exception:  # as a message's handler in `drain`: logged, never the end of the broker
            log.exception("error sending what a pass made; its messages dropped")
            self.sends.queues.clear()

    def look_at_clock(self, now: float) -> None:
        """Our own stalls (RunClock): time we did not run is no agent's silence; what they sent meanwhile is
        unread, not missing (Dispatcher.paused)."""
        lost = self.clock.look(now)
        if lost:
            self.dispatcher.paused(lost, now)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.metrics.close()
        self.comparer.stop()
        for sock in (self.clients, self.agents_sock, self.events, self.manager, self.reports):
            sock.close(linger=0)
        if self.security is not None:
            self.security.stop()
        if self._own_ctx:
            self.ctx.term()

    def ask_manager_for_agents(self) -> None:
        """At start: which agents does the manager hear? (It answers with its registry; a manager that is down
        answers when it is back, and an answer after the rejoin window changes nothing.)"""
        try:
            self.manager.send_multipart(
                message(Command.QUERY, Query(AGENTS_QUERY_ID, What.AGENTS).to_wire()), zmq.NOBLOCK
            )
        except zmq.Again:
            log.warning("could not ask the manager which agents are alive; requests wait only in the warm-up window")

    def process_manager_answer(self, frames: list) -> None:
        """The manager's answer to `ask_manager_for_agents` (the reports get none)."""
        try:
            if len(frames) != 2:
                raise ProtocolError("an answer from the manager must be preamble + header")
            cmd = protocol.parse_preamble(frames[0])
            header = protocol.unpack_header(frames[1])
        except ProtocolError as exc:
            bad_input.warning("bad answer from the manager dropped: %s", exc)
            return
        if header.get("id") != AGENTS_QUERY_ID:
            return
        if cmd != Command.REPLY:
            log.warning("the manager did not say which agents are alive: %s", header.get("message"))
            return
        answer = Answer.from_wire(header)
        if answer.desired is not None and self.dispatcher.agents.deployed is None:
            self.desired_state(answer.desired)  # a `desired` event read already is newer: it stays
        self.deliver(self.dispatcher.expect_agents(answer.result, time.monotonic()))

    def routed_agents(self) -> list[str]:
        """The ids of the agents we route to (not draining), sorted."""
        return sorted(a.agent_id for a in self.dispatcher.agents.agents.values() if not a.beat.draining)

    def report_if_agents_changed(self) -> bool:
        """Report at once (not at the next interval) when the agents we route to changed since the last report."""
        if self.routed_agents() == self._reported_agents:
            return False
        self.report_to_manager()
        return True

    def report_to_manager(self) -> None:
        """EVENT broker_report on our PUB: the agents we route to and our load, numbered (the manager counts gaps)."""
        agents = self.routed_agents()
        self._reported_agents = agents
        self._report_seq += 1
        load = broker_load(self.dispatcher)
        report = BrokerReport(self.name, self.dispatcher.incarnation.hex(), self._report_seq, agents, load)
        try:
            self.reports.send_multipart(message(Command.EVENT, report.to_wire()), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the manager is down: it hears the next one (PUB drops at its high-water mark anyway)

    def send_canary_digest(self) -> None:
        """EVENT canary_digest on our PUB: this broker's cumulative counts of each running canary."""
        self._digest_seq += 1
        models = self.dispatcher.canary.wire_digests()
        digest = CanaryDigest(self.name, self.dispatcher.incarnation.hex(), self._digest_seq, models)
        try:
            self.reports.send_multipart(message(Command.EVENT, digest.to_wire()), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the manager is down: the next digest carries everything (cumulative)

    def deliver(self, outbox: list[Send]) -> None:
        """Send what the dispatcher asked for, in order per peer (PeerSends: in a pass of the loop, at its end, one
        message per peer): to clients by `send_to_client` (replies.py); an agent a send fails to reach:
        `agent_send_failed`."""
        self.sends.send(outbox)

    def send_to_agent(self, agent: bytes, messages: list[list]) -> None:
        send_frames(self.agents_sock, outgoing(agent, messages))

    def agent_send_failed(self, unsent: list[list], exc: zmq.ZMQError) -> None:
        self.deliver(self.dispatcher.send_failed(unsent, exc))  # (that batch and all else queued for the agent)

    def send_client_error(self, client: bytes, request_id, code: ErrorCode, text: str, model: str | None = None):
        self.deliver([client_error(client, request_id, code, text, model)])

    # ---- clients (what they send: intake.py) --------------------------------------------------------------------

    def hello(self, client: bytes) -> None:
        """Answer a client's probe with READY BrokerHello: who we are, which incarnation, and whether we are ready
        (past the rejoin window: agents back). A client told "not ready" is told again once we are (`tell_ready`)."""
        ready = self.dispatcher.registration.serving(time.monotonic())
        if not ready:
            self.unready.pop(client, None)
            self.unready[client] = None
            if len(self.unready) > UNREADY_CLIENTS_MAX:
                del self.unready[next(iter(self.unready))]
        self.send_hello(client, ready)

    def send_hello(self, client: bytes, ready: bool) -> None:
        hello = BrokerHello(self.name, self.dispatcher.incarnation.hex(), ready)
        self.sends.flush_peer(False, client)  # (what this pass made for it goes first, as it did unbatched)
        try:
            send_frames(self.clients, [client, PREAMBLE[Command.READY], pack(hello.to_wire())])
        except zmq.ZMQError:
            pass  # its pipe is full or it is gone: it probes again on its next connection

    def tell_ready(self) -> None:
        """Now ready: tell every client we told "not ready"."""
        clients, self.unready = self.unready, {}
        for client in clients:
            self.send_hello(client, True)

    def answer_query(self, client: bytes, request_id, header: dict) -> None:
        """A client's QUERY, answered by the handler QUERIES names for its `what` (ProtocolError for any other)."""
        query = Query.from_wire(header, self.QUERIES)
        try:
            result = self.QUERIES[query.what](self, query)
        except UnknownModel as exc:
            name = query.fields.get("name")
            self.send_client_error(client, request_id, ErrorCode.MODEL_NOT_FOUND, str(exc), name)
            return
        answer = pack(Answer(request_id, result).to_wire())
        self.deliver([Send(False, [client, PREAMBLE[Command.REPLY], answer])])

    def query_agents(self, query: Query) -> list:
        return self.dispatcher.agents.describe_agents(time.monotonic())

    def query_models(self, query: Query) -> dict:
        return self.dispatcher.agents.describe_models()

    def query_model(self, query: Query) -> dict:
        name = require(query.fields, "name", str)
        return self.dispatcher.agents.describe_model(name, require(query.fields, "version", int, optional=True))

    def query_stats(self, query: Query) -> dict:
        held = sum(map(len, self.outbox.held.values()))
        return dict(self.dispatcher.counts(), client_replies_held=held, **self.sends.stats)

    def query_statistics(self, query: Query) -> dict:
        name = require(query.fields, "name", str, optional=True)
        version = require(query.fields, "version", (str, int), optional=True)
        per_agent = self.dispatcher.agents.describe_statistics(name, None if version is None else str(version))
        queue_depth = {model: len(queue) for model, queue in self.dispatcher.pending.items()}
        return {"agents": per_agent, "broker": dict(self.dispatcher.counts(), queue_depth=queue_depth)}

    QUERIES = {  # what the broker answers: QUERY `what` -> its handler (UnknownModel: MODEL_NOT_FOUND)
        What.AGENTS: query_agents,
        What.MODELS: query_models,
        What.MODEL: query_model,
        What.STATS: query_stats,
        What.STATISTICS: query_statistics,
    }

    # ---- agents -------------------------------------------------------------------------------------------------

    def process_agent(self, frames: list, batched: bool = False) -> int | None:
        if len(frames) < 3:
            bad_input.warning("short message from agent %r dropped", as_bytes(frames[0]))
            return
        head = as_bytes(frames[1])
        try:
            if not batched and protocol.is_batch(head):  # answers: each handled as if it came alone
                self.sends.stats["batches_from_agents"] += 1
                messages = protocol.unbatch(frames, 1)
                handle_each(messages, lambda one: self.process_agent(one, True), log)
                return len(messages)  # (drain counts them towards its limit)
            cmd, route = protocol.parse_routed(head)
            if batched and cmd not in _ANSWERS:
                raise ProtocolError(f"{cmd.name} in a BATCH")
        except ProtocolError as exc:
            bad_input.warning("bad message from agent %r dropped: %s", as_bytes(frames[0]), exc)
            return
        if cmd in (Command.HEARTBEAT, Command.READY):
            # An agent's news may follow from the manager's (it unloaded a model because the manager undeployed it):
            # read the manager's first, so that a model dropped on purpose is "not deployed", never "no agent".
            drain(self.events, self.process_event, DRAIN_BATCH, log)
        key = key_of(frames[1]) if self.allow is not None else None
        self.deliver(self.dispatcher.agent_message(cmd, frames, time.monotonic(), key, route))

    # ---- the manager's registry events --------------------------------------------------------------------------

    def process_event(self, frames: list) -> None:
        try:
            if len(frames) != 2:
                raise ProtocolError("event must be preamble + header")
            protocol.parse_preamble(frames[0])
            event = parse_event(protocol.unpack_header(frames[1]))
        except ProtocolError as exc:
            bad_input.warning("bad event from the manager dropped: %s", exc)
            return
        if isinstance(event, AgentDead):
            self.deliver(self.dispatcher.agent_declared_dead(event.agent, event.instance))
        elif isinstance(event, Desired):  # which models the manager wants served: an undeployed one is "not found"
            self.desired_state(event.state)

    def desired_state(self, state) -> None:
        """The manager's desired state (an event, or its answer at start-up): the models it wants served. A model
        it does not list is "not found", and is not held while agents re-register. Its canaries: the split here."""
        try:
            desired = DesiredState.from_wire(state)
        except ValueError as exc:
            return bad_input.warning("bad desired state from the manager dropped: %s", exc)
        self.dispatcher.agents.deployed = set(desired.models)
        self.dispatcher.canary.update(desired)
