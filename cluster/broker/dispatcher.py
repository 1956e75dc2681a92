"""The broker's dispatcher, without any I/O: every request from its arrival to its answer, over the AgentTable.

It takes events and returns what to send (a list of `Send`), never touching a socket (pyzmq's zmq/auth/base.py
idea; `Broker` is the thin loop that owns the sockets). The events: a client's request (`client_request`) or
cancel (`client_cancel`), an agent's message (`agent_message`: READY, HEARTBEAT, REPLY, ERROR, DISCONNECT), the
manager's word that an agent is dead (`agent_declared_dead`), a clock tick (`tick`), time to beat (`heartbeats`),
and a send that failed (`send_failed`: the agent is gone). Every time is the caller's `now` (monotonic seconds), so
tests run the clock.

What it guarantees (the Majordomo broker's gaps, fixed):
- every request in flight is tracked (agent, deadline); when its agent dies it goes to another agent with the model,
  at most `max_dispatch_attempts` agents in all (then INFERENCE_FAILED; NO_AGENT if no other agent serves it);
- "alive" and "has capacity" are separate: an agent never has more than its announced capacity in flight, however
  often it beats; the rest wait, in order, in a per-model queue (past `broker_queue_limit` waiting: OVERLOADED) and
  go out as replies free slots;
- a request for a version goes only to agents that serve it; an agent that answers MODEL_NOT_FOUND (it unloaded the
  version since its last beat) is forgotten for that version, and the request silently goes elsewhere;
- a request no live agent can take fails at once (MODEL_NOT_FOUND or NO_AGENT), except while agents re-register
  after the broker (re)starts: then it waits, within its deadline. That is the warm-up window (one expiry and one
  interval from the start, for any model), and after it, for the models of the agents the manager says are alive
  (`expect_agents`, its answer at start-up), until each of them has registered again or is declared dead, at most
  `timings.rejoin_window` from the start; requests for a model none of them serves fail as before. A model the
  manager's desired state does not list is never held, warm-up or not: it fails at once with MODEL_NOT_FOUND (the
  broker learns that state from the manager's answer at start-up, and from its `desired` events); only until it
  knows it is an unknown model held, in the warm-up window at most;
- past its deadline a request fails with TIMEOUT, whether in flight or queued; the agent is told how long a request
  has left (and how long it waited here) in the REQUEST's route frame, so it drops work that expired before it began;
- a client's CANCEL (found by client identity and id) takes its request out of the queue, or, in flight, is passed
  to its agent (which skips it if not started); whatever the agent answers then is dropped, the slot freed;
- load shedding: a request that would wait in the queue longer than its model's bound (`max_queue_wait_ms` in the
  model's config, else `timings.max_queue_wait`), estimated from the queue's length and the model's measured
  service rate (ServiceRate), is refused at once with OVERLOADED and a `retry_after`; never before a rate is known;
- capacity per model: an agent that announces `model_capacity` holds at most that many requests of each model (and
  at most `capacity` in all); one that does not gets `capacity` for every model;
- a stalled agent (see `stalled`, judged per model: its oldest request of a model here is older than max(stall_factor
  x that model's recent p99 service time, stall_floor) and it answered none of that model for that long) gets no
  new requests of that model until it answers one again (an agent busy with a slow or hung model still gets the
  others); it stays alive and keeps what it has (re-dispatched only when it is declared dead);
- hedging (`timings.hedge_after` > 0): a request at one agent longer than that is also sent to one other eligible
  agent (same route key; each copy counts as an attempt); the first answer goes to the client, the other copy is
  cancelled (CANCEL) and its answer dropped; its slot stays taken until that agent answers. When the agent of one
  copy dies, the other copy carries on (nothing is re-dispatched);
- tensor frames are forwarded as received, never decoded; of an agent's answer only an ERROR's header is read;
- an answer reaches only the client that asked: a route is this broker's random incarnation + a counter, so it
  names one request of one broker process (never reused after a restart), and an answer is accepted only from an
  agent that holds that route (the agent it was sent to, or its hedge copy's); anything else is dropped, with a
  rate-limited log line (a late answer from before a restart, a forged or guessed route);
- with keys on (`allow`, the allow-list): only a key with role agent may speak on the agents' socket, and an agent is
  bound to the key it registered with: READY for an identity registered with another key is refused (until that
  agent expires), and any other message for it from another key is dropped; READY must name the agent id it
  connected with (its routing identity), and an agent whose key is refused (revoked) is told so (ERROR
  UNAUTHENTICATED or PERMISSION_DENIED, to its READY and HEARTBEAT) and dropped at once;
- one live agent per agent id: a READY naming an id that another live process holds (another connection, another
  instance token or another key) is refused with ERROR AGENT_ID_IN_USE to the newcomer and an error in the log;
  the live agent keeps serving and keeps its requests (it is probed, so a dead predecessor goes at once). The same
  process registering again (same instance, on its own connection) is not a duplicate; a READY on another
  connection is, whatever instance it claims (an instance is public: `agents()` shows it).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from cluster import protocol
from cluster.auth import refusal
from cluster.broker.agents import AgentEntry, AgentTable
from cluster.broker.routing import RoutingPolicy
from cluster.clock import pardon
from cluster.config import RETRY_AFTER_MAX, RETRY_AFTER_MIN, Timings
from cluster.keys import AllowList
from cluster.logs import BadInputLog
from cluster.protocol import (
    PREAMBLE,
    Command,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    as_bytes,
    error_header,
    identity_names,
    pack,
)

log = logging.getLogger("cluster.broker")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate
refused = BadInputLog(log)  # messages refused for their key (keys on), rate-limited on their own
foreign = BadInputLog(log)  # answers from an agent that does not hold their route, rate-limited on their own

_REQUEST, _ERROR, _HEARTBEAT = PREAMBLE[Command.REQUEST], PREAMBLE[Command.ERROR], PREAMBLE[Command.HEARTBEAT]
_CANCEL = PREAMBLE[Command.CANCEL]
RATE_WINDOW_S = 1.0  # a model's service rate is measured over windows this long ...
RATE_WEIGHT = 0.3  # ... and each saturated window's rate weighs this much in the moving average (EWMA)
FIRST_RATE_COMPLETIONS = 8  # the first estimate comes sooner: after this many completions with a queue waiting
SERVICE_WINDOW = 256  # a model's recent service times (sent -> answered, per copy) kept for its p99 ...
SERVICE_MIN_SAMPLES = 20  # ... known from this many answers on (before that, no agent is judged stalled for it) ...
SERVICE_P99_EVERY = 16  # ... and computed again every this many answers
_EMPTY_HEADER = pack({})
_SEND_READY = pack({"reason": "unknown agent; send READY"})


class Send(NamedTuple):
    """One message for the broker to send: `frames` start with the peer's ROUTER identity; `to_agent` picks the
    agents' socket, else the clients'."""

    to_agent: bool
    frames: list

    @property
    def peer(self) -> bytes:
        return self.frames[0]

    @property
    def command(self) -> Command:
        return protocol.parse_routed(self.frames[1])[0]


def client_error(
    client: bytes, request_id, code: ErrorCode, text: str, model: str | None = None, retry_after: float | None = None
) -> Send:
    header = error_header(request_id, code, text, model, retry_after)
    return Send(False, [client, PREAMBLE[Command.ERROR], pack(header)])


class ServiceRate:
    """Completions per second of one model, as an EWMA over RATE_WINDOW_S windows. Only windows that ended with
    requests queued count: a model that is not saturated completes what arrives, which says nothing of how fast it
    could go (and would make the estimate refuse too early). `per_second` is None until the first estimate, which
    comes after FIRST_RATE_COMPLETIONS saturated completions rather than a whole window: a flood that arrives faster
    than a window would otherwise queue whole before anything could be refused."""

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.completed = 0
        self.per_second: float | None = None

    def completion(self, now: float, saturated: bool) -> None:
        self.completed += 1
        elapsed = now - self.window_start
        first = self.per_second is None and self.completed >= FIRST_RATE_COMPLETIONS and elapsed > 0
        if elapsed < RATE_WINDOW_S and not first:
            return
        if saturated:
            rate = self.completed / elapsed
            self.per_second = (
                rate if self.per_second is None else (1 - RATE_WEIGHT) * self.per_second + RATE_WEIGHT * rate
            )
        self.window_start, self.completed = now, 0


class ServiceTimes:
    """A model's recent service times as the broker sees them (a request sent to an agent -> its answer, agent
    queueing included): a window of the last SERVICE_WINDOW, and its p99, recomputed every SERVICE_P99_EVERY
    answers (a sort of 256 floats: microseconds). `p99` is None until SERVICE_MIN_SAMPLES answers."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self.p99: float | None = None
        self._since = 0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._since += 1
        n = len(self.samples)
        if n >= SERVICE_MIN_SAMPLES and (self.p99 is None or self._since >= SERVICE_P99_EVERY):
            self.p99 = sorted(self.samples)[min(n - 1, int(0.99 * n))]
            self._since = 0


@dataclass(eq=False)
class BrokerRequest:
    """One client request, from arrival until its reply (or error) has gone back to the client."""

    route: bytes  # the broker's own key for it, sent to the agent and echoed back
    client: bytes  # the client's ROUTER identity
    request_id: Any  # the client's id, echoed in errors the broker makes up itself
    model: str
    version: int | None
    header: Any  # the client's header frame, forwarded untouched
    tensors: list  # the client's tensor frames, forwarded untouched
    deadline: float
    arrived: float = 0.0  # the broker's clock when it came in (what it waited is told to the agent)
    attempts: int = 0  # agents it was sent to (a hedge copy counts)
    agent: AgentEntry | None = None  # where it is in flight now
    sent_at: float = 0.0  # when it was sent to `agent`
    hedge: AgentEntry | None = None  # hedging: where its second copy is in flight, if it has one
    hedged_at: float = 0.0  # when that copy was sent
    queued: bool = False  # it has waited in the queue (a request taken back after a failed send returns there)
    done: bool = False  # answered or failed; a queued request marked done is skipped
    trace: str | None = None  # the caller's request_id (the OIP id, say): in every log line about it

    def log_extra(self) -> dict:
        """`extra=` for a log line about this request: its request_id (JSON logs carry it as a field)."""
        return {"request_id": self.trace, "model": self.model}


class Dispatcher:
    def __init__(self, timings: Timings, policy: RoutingPolicy, now: float, allow: AllowList | None = None) -> None:
        self.timings = timings
        self.allow = allow  # keys on: the allow-list, and every agent message carries its sender's key
        self.policy = policy
        self.agents = AgentTable(timings.expiry)
        self.requests: dict[bytes, BrokerRequest] = {}  # route -> request, from arrival until answered
        self.pending: dict[str, deque[BrokerRequest]] = {}  # model -> requests waiting for a free slot
        self.pending_count = 0
        self.started = now
        # Routes: this broker's random incarnation + a counter (protocol.ROUTE_BYTES); agents learn the incarnation
        # from its heartbeats, and answer only requests of the broker they are connected to.
        self.incarnation = protocol.broker_incarnation()
        self._routes = itertools.count(1)
        self.heartbeat_header = pack({"broker": self.incarnation.hex()})
        self.stats = {
            "requests": 0,
            "redispatched": 0,
            "timeouts": 0,
            "agents_lost": 0,
            "cancelled": 0,
            "shed": 0,
            "client_refused": 0,  # OVERLOADED for the client's own bounds: requests in flight, replies not read
            "client_replies_dropped": 0,  # clients found past their reply budget (broker.py: their requests cancelled)
            "stalls": 0,  # agents found stalled (skipped by routing until they answer again)
            "hedged": 0,  # second copies sent (hedging)
            "hedge_wins": 0,  # of those, answered before the first copy
        }
        self.client_load: dict[bytes, int] = {}  # client -> its requests here (queued or at an agent)
        self.by_client: dict[tuple[bytes, Any], bytes] = {}  # (client identity, its id) -> route, for CANCEL
        self.rates: dict[str, ServiceRate] = {}  # model -> its measured service rate (load shedding)
        self.service: dict[str, ServiceTimes] = {}  # model -> its recent service times (stall detection)
        self.now = now  # the latest event's clock: what a request forwarded now has left, and has waited
        self.reserved: dict[str, tuple[str | None, float]] = {}  # agent id -> (instance, until): see _refuse_duplicate
        # agent id -> (instance, model -> versions): alive at the manager, not registered here again yet (expect_agents)
        self.expected: dict[str, tuple[str | None, dict[str, set[int]]]] = {}

    def warming_up(self, now: float) -> bool:
        """Just started (or restarted): agents are still re-registering, so "no agent has it" is not known yet.
        Requests wait (within their deadline) instead of failing, so clients ride through a broker restart."""
        return now - self.started < self.timings.expiry + self.timings.heartbeat_interval

    def expect_agents(self, views: list, now: float) -> list[Send]:
        """The manager's answer to QUERY {what: agents}, asked at start-up: the agents it hears (their heartbeats),
        which will register here again. Until each has (or is declared dead, or `rejoin_window` from the start has
        passed), requests for what it serves wait rather than fail. Agents already registered, draining, or entries
        that do not parse are left out. An answer after the rejoin window changes nothing."""
        out: list[Send] = []
        self.now = now
        if now >= self.started + self.timings.rejoin_window or not isinstance(views, list):
            return out
        heard = 0
        for view in views:
            try:
                beat = Heartbeat.from_wire(view)
            except (ProtocolError, TypeError, AttributeError):
                continue
            heard += 1
            if beat.draining or not beat.models or self.agents.get_by_id(beat.agent) is not None:
                continue
            self.expected[beat.agent] = (beat.instance, beat.served_versions())
        held = ""
        if self.expected:
            held = (
                f" ({', '.join(sorted(self.expected))}): holding requests for "
                f"{', '.join(sorted({m for _, models in self.expected.values() for m in models}))} until they are "
                f"(at most {self.timings.rejoin_window:g} s from the start)"
            )
        log.info("the manager hears %d agents, %d not registered here yet%s", heard, len(self.expected), held)
        return out

    def holding(self, model: str, version: int | None, now: float) -> bool:
        """Whether a request for `model` (`version`) that no live agent can take now waits rather than fails: in the
        warm-up window, or while an agent the manager said is alive and serves it has not registered again; never
        for a model the manager's desired state (once known) does not list: that fails at once, as it does later."""
        if self.agents.undeployed(model):
            return False  # the manager does not want it served: no agent coming back will serve it
        if self.warming_up(now):
            return True  # (the manager's desired state not heard yet, in the warm-up window only: bounded)
        if not self.expected or now >= self.started + self.timings.rejoin_window:
            return False
        return any(
            model in models and (version is None or version in models[model]) for _, models in self.expected.values()
        )

    def _end_rejoin_window(self, now: float) -> None:
        if self.expected and now >= self.started + self.timings.rejoin_window:
            log.warning(
                "agents the manager said were alive did not register within %.1f s of the start: %s; requests for "
                "their models are no longer held",
                self.timings.rejoin_window,
                ", ".join(sorted(self.expected)),
            )
            self.expected.clear()

    def counts(self) -> dict:
        """The `stats` answer."""
        return dict(self.stats, agents=len(self.agents), in_flight=len(self.requests), queued=self.pending_count)

    # ---- events -------------------------------------------------------------------------------------------------

    def client_request(
        self,
        client: bytes,
        request_id,
        model: str,
        version: int | None,
        timeout: float,
        header_frame,
        tensors: list,
        now: float,
        congested: bool = False,
        trace: str | None = None,
    ) -> list[Send]:
        """A client's REQUEST, already checked: send it to an agent, queue it, or answer why it cannot be served.
        `congested`: the client is not reading its replies (the broker holds some for it): OVERLOADED, as is a
        request past the client's bound on requests here (`client_max_in_flight`). `trace`: its request_id."""
        out: list[Send] = []
        self.now = now
        load = self.client_load.get(client, 0)
        if congested or load >= self.timings.client_max_in_flight:
            self.stats["client_refused"] += 1
            text = (
                "this client is not reading its replies (the broker holds replies it has not taken); read them, "
                "then try again"
                if congested
                else f"this client has {load} requests in flight, the most one client may have; try again later"
            )
            out.append(client_error(client, request_id, ErrorCode.OVERLOADED, text, model, retry_after=1.0))
            return out
        if not self.agents.candidates(model, version) and not self.holding(model, version, now):
            code, text = self.agents.why_unroutable(model, version)
            out.append(client_error(client, request_id, code, text, model))
            return out
        self.stats["requests"] += 1
        route = self.incarnation + next(self._routes).to_bytes(8, "big")
        request = BrokerRequest(route, client, request_id, model, version, header_frame, tensors, now + timeout)
        request.arrived = now
        request.trace = trace
        self.requests[request.route] = request
        self.client_load[client] = load + 1
        self.by_client[(client, request_id)] = request.route
        if not self._dispatch(request, out):
            self._queue_or_refuse(request, out)
        return out

    def agent_message(
        self, cmd: Command, frames: list, now: float, key: str | None = None, route: bytes | None = None
    ) -> list[Send]:
        """A message from an agent, as received: [identity, preamble (+ route), header, ...], with the preamble read
        as `cmd` and at least those three frames; `key`: its sender's public key (keys on); `route`: what follows the
        preamble (protocol.parse_routed; taken from frames[1] when not given). Any message from a known agent counts
        as a sign of life."""
        out: list[Send] = []
        self.now = now
        identity = as_bytes(frames[0])
        if self.allow is not None:
            why = refusal(self.allow, key, "agent")
            if why is not None:
                refused.warning("%s from %r refused: %s", cmd.name, identity, why[1])
                self._refuse_key(identity, cmd, why, out)
                return out
        if cmd == Command.READY:
            self._ready(identity, frames[2], now, out, key)
            return out
        agent = self.agents.get(identity)
        if agent is not None and agent.key != key:
            refused.warning(
                "%s for agent %s refused: it comes from another key than the one it registered with",
                cmd.name,
                agent.agent_id,
            )
            return out
        if agent is None:
            # An agent we do not know (we restarted, or declared it dead): ask it to introduce itself again.
            if cmd != Command.DISCONNECT:
                out.append(Send(True, [identity, PREAMBLE[Command.DISCONNECT], _SEND_READY]))
            return out
        agent.last_seen = now
        if cmd == Command.REPLY or cmd == Command.ERROR:
            if route is None:
                route = as_bytes(frames[1])[protocol.PREAMBLE_BYTES :]
            self._answered(agent, cmd, frames, route, out)
        elif cmd == Command.HEARTBEAT:
            self._heartbeat(agent, frames[2], out)
        elif cmd == Command.DISCONNECT:
            self._remove(agent, "it said goodbye", out)
        else:
            log.warning("agent %s sent unexpected %s; dropped", agent.agent_id, cmd.name)
        return out

    def client_cancel(self, client: bytes, request_id, now: float) -> list[Send]:
        """A client's CANCEL: it gave up on that request and wants no answer. Queued: it leaves the queue. In flight:
        its agent is told (it skips the request if it has not started it); the slot stays taken until the agent
        answers, and that answer is dropped. Unknown (answered already, or never seen): nothing to do."""
        out: list[Send] = []
        self.now = now
        route = self.by_client.get((client, request_id))
        request = self.requests.get(route) if route is not None else None
        if request is None or request.done:
            return out
        self.stats["cancelled"] += 1
        request.done = True
        self._forget(request)
        if request.agent is not None:
            self._cancel_copies(request, None, out)
        else:
            queue = self.pending.get(request.model)
            if queue is not None and request in queue:
                queue.remove(request)
                self.pending_count -= 1
                if not queue:
                    del self.pending[request.model]
        return out

    def drop_client(self, client: bytes, now: float) -> list[Send]:
        """The client is gone, or does not read its replies past its budget: cancel every request it has here (out
        of the queue; at an agent, a CANCEL), as if it had cancelled each itself."""
        out: list[Send] = []
        for owner, request_id in [k for k in self.by_client if k[0] == client]:
            out.extend(self.client_cancel(owner, request_id, now))
        return out

    def agent_declared_dead(self, agent_id: str, instance: str | None = None) -> list[Send]:
        """The manager's `agent_dead` event: a second opinion (see broker.py on who owns liveness). When it names
        the instance that died, a live agent of another instance with that id (a restart) is not touched."""
        out: list[Send] = []
        expected = self.expected.get(agent_id)
        if expected is not None and (instance is None or expected[0] in (None, instance)):
            del self.expected[agent_id]  # it will not register again: its models' requests are held no longer
        agent = self.agents.get_by_id(agent_id)
        if agent is not None and instance is not None and agent.beat.instance not in (None, instance):
            return out
        if agent is not None:
            self._remove(agent, "the manager declared it dead", out)
        return out

    def send_failed(self, unsent: list[list], error: Exception) -> list[Send]:
        """Sending to an agent failed (ROUTER_MANDATORY: it is gone; or its queue is full): `unsent` holds the frames
        of that message and of every later one to the same agent, which the caller held back. The agent is removed
        (its requests that did leave are re-dispatched); requests in `unsent` never left, so they are taken back
        without counting an attempt and go to another agent, or back where they waited, as if never sent."""
        out: list[Send] = []
        agent = self.agents.get(unsent[0][0])
        if agent is None:
            return out  # a DISCONNECT to an agent we do not know: gone already
        what = "heartbeat send failed" if unsent[0][1] == _HEARTBEAT else "send failed"
        taken_back = []
        for frames in unsent:
            preamble = as_bytes(frames[1])  # a REQUEST's: the preamble, the key, then its times
            key = preamble[protocol.PREAMBLE_BYTES : protocol.PREAMBLE_BYTES + protocol.ROUTE_BYTES]
            request = agent.pop_request(key) if preamble[: protocol.PREAMBLE_BYTES] == _REQUEST else None
            if request is not None:
                request.attempts -= 1
                if self._drop_copy(request, agent):
                    continue  # a hedge: its other copy did leave, and carries on
                request.agent = None
                taken_back.append(request)
        self._remove(agent, f"{what} ({error})", out)
        front = []
        for request in taken_back:
            if request.done or self._dispatch(request, out):
                continue
            if request.attempts or request.queued:
                front.append(request)  # it had waited, or was being re-dispatched: it keeps its place at the head
            else:
                self._queue_or_refuse(request, out)  # it had just arrived
        for request in reversed(front):
            self._enqueue(request, front=True)
        return out

    def tick(self, now: float) -> list[Send]:
        """The clock: expire silent agents, fail requests past their deadline, and (after warm-up) fail queued
        requests that no live agent can take any more, and none that is expected back will."""
        out: list[Send] = []
        self.now = now
        for agent in self.agents.silent(now):
            self._remove(agent, f"silent for {now - agent.last_seen:.1f} s", out)
        for agent in self.agents.agents.values():
            self.stalled(agent, now)  # routing asks at each dispatch; this makes it known (stats, log) between
        if self.timings.hedge_after > 0:
            self._hedge(now, out)
        self._expire_requests(now, out)
        self._end_rejoin_window(now)
        if self.pending_count and (not self.warming_up(now) or self.agents.deployed is not None):
            self._fail_orphaned_queues(now, out)  # in the warm-up: those held before the desired state came
        return out

    def paused(self, lost: float, now: float) -> None:
        """The broker did not run for `lost` seconds (its RunClock says so: SIGSTOP, a VM stall): what agents sent
        meanwhile is still unread, so that time does not count as their silence. Nor as no progress: an agent is
        judged stalled only from now on (stall thresholds are far finer than the RunClock's bound), so the answers
        waiting unread count first. Deadlines are the clients' and stay as they are."""
        for agent in self.agents.agents.values():
            agent.last_seen = pardon(agent.last_seen, lost, now)
            agent.last_answer = max(agent.last_answer, now)
            for model in agent.model_in_flight:  # stalls are judged per model (from its last answer, or its oldest)
                agent.model_last_answer[model] = max(agent.model_last_answer.get(model, now), now)

    def heartbeats(self) -> list[Send]:
        """The broker's beat to every agent, so agents know it is alive."""
        return [Send(True, [a.identity, _HEARTBEAT, self.heartbeat_header]) for a in self.agents.agents.values()]

    # ---- agents -------------------------------------------------------------------------------------------------

    def _ready(self, identity: bytes, header_frame, now: float, out: list[Send], key: str | None = None) -> None:
        try:
            header = protocol.unpack_header(header_frame)
            beat = Heartbeat.from_wire(header)
            if beat.capacity < 1:
                raise ProtocolError("capacity must be at least 1")
        except ProtocolError as exc:
            bad_input.warning("bad READY from %r dropped: %s", identity, exc)
            return
        if self.allow is not None and not identity_names(identity, beat.agent):
            refused.warning(
                "READY from %r refused: it names agent %r (keys on: the two must match)", identity, beat.agent
            )
            return
        old = self.agents.get(identity)  # this connection's entry
        live = self.agents.get_by_id(beat.agent)  # the live agent holding this id, whatever its connection
        if old is not None and old.key != key:
            refused.warning("READY for agent %s refused: it is registered with another key", old.agent_id)
            return
        conflict = None
        if live is not None and live is not old:
            # A second process started with the same --id, or one that copied the live agent's id and instance
            # (both public): the same process always comes back on its own identity (connection), so another
            # connection is never the live agent, whatever it claims.
            conflict = "in use by another live agent"
        elif live is not None and (live.key != key or not self.agents.same_process(live, beat)):
            if beat.instance is not None and live.beat.instance is not None:
                # Another process presented this process's own routing identity, and ROUTER_HANDOVER gave it the
                # connection: the first one's link is gone. Drop the first (its requests go elsewhere; it
                # reconnects and registers again, see the agent's check_broker) and refuse the newcomer.
                conflict = "taken over by another process presenting the live agent's identity"
        if conflict is None and live is None:
            reserved = self.reserved.get(beat.agent)
            if reserved is not None and reserved[1] > now and reserved[0] != beat.instance:
                conflict = "held for the agent whose connection was taken over, while it reconnects"
        if conflict is not None:
            self._refuse_duplicate(identity, beat, live, conflict, now, out)
            return
        self.reserved.pop(beat.agent, None)
        self.expected.pop(beat.agent, None)  # back: held requests for its models go to it now
        self.agents.remember_metadata(header.get("metadata"))
        if old is not None and self.agents.same_process(old, beat):
            self.agents.update(old, beat)  # the same process saying READY again (it thought we were gone)
            self._dispatch_pending(old.models, out)
            return
        if old is not None:
            self._remove(old, "it registered again (restarted)", out)
        agent = self.agents.add(identity, beat, now, key)
        self._dispatch_pending(agent.models, out)

    def _refuse_duplicate(
        self, identity: bytes, beat: Heartbeat, live: AgentEntry | None, why: str, now: float, out: list[Send]
    ) -> None:
        """READY for an agent id another live process holds: refused, with an ERROR AGENT_ID_IN_USE the newcomer
        logs (it tries again for a grace period, then exits: a restarted agent whose predecessor died gets in once
        the predecessor is gone). The live agent keeps its id, its requests and its credit. It is probed with a
        HEARTBEAT: if its connection is gone (a crashed predecessor), the send fails and it is removed at once,
        rather than at its expiry."""
        who = f"host {beat.host}, pid {beat.pid}, instance {beat.instance}"
        if live is not None and live.identity == identity:
            self.reserved[beat.agent] = (live.beat.instance, now + 3 * self.timings.expiry)
            self._remove(live, "its connection was taken over by another process presenting its identity", out)
            holder = f"an agent whose connection this one took over ({why})"
        elif live is not None:
            out.append(Send(True, [live.identity, _HEARTBEAT, self.heartbeat_header]))
            holder = (
                f"a live agent (host {live.beat.host}, pid {live.beat.pid}, instance {live.beat.instance}, "
                f"heard {now - live.last_seen:.1f} s ago)"
            )
        else:
            holder = f"an agent ({why})"
        text = (
            f"agent id '{beat.agent}' is already in use by {holder}; refusing this agent ({who}). "
            "Give every agent its own --id."
        )
        refused.error("READY from %r refused: %s", identity, text)
        out.append(Send(True, [identity, _ERROR, pack(error_header(None, ErrorCode.AGENT_ID_IN_USE, text))]))

    def _refuse_key(self, identity: bytes, cmd: Command, why: tuple[ErrorCode, str], out: list[Send]) -> None:
        """Keys on: a message from a key that may not be an agent (revoked since its handshake, or another role's).
        An agent registered with it is dropped at once (its requests go elsewhere), and READY and HEARTBEAT are
        answered with the reason, so the agent can say why it is refused (at most one a beat)."""
        agent = self.agents.get(identity)
        if agent is not None:
            self._remove(agent, f"its key is refused ({why[1]})", out)
        if cmd in (Command.READY, Command.HEARTBEAT):
            out.append(Send(True, [identity, _ERROR, pack(error_header(None, why[0], why[1]))]))

    def _heartbeat(self, agent: AgentEntry, header_frame, out: list[Send]) -> None:
        try:
            header = protocol.unpack_header(header_frame)
            beat = Heartbeat.from_wire(header)
        except ProtocolError as exc:
            log.warning("bad HEARTBEAT from agent %s ignored: %s", agent.agent_id, exc)
            return
        self.agents.remember_metadata(header.get("metadata"))
        self.agents.update(agent, beat)
        self._dispatch_pending(agent.models, out)

    def _answered(self, agent: AgentEntry, cmd: Command, frames: list, route: bytes, out: list[Send]) -> None:
        """An agent answered: forward the answer to the client, free the slot, feed the agent from the queue.
        MODEL_NOT_FOUND for a live request means the agent dropped that version: try another agent instead."""
        if len(frames) < 3 or len(route) != protocol.ROUTE_BYTES:
            bad_input.warning("agent %s sent a reply without route and header; dropped", agent.agent_id)
            return
        now = self.now
        held = agent.pop_request(route)
        if held is None:
            # Not a request this agent holds: a late answer from before a broker restart (another incarnation's
            # route), one given up on (re-dispatched after the agent was dropped), or a forged or guessed route.
            # Never forwarded: it could be another client's request's answer.
            foreign.warning(
                "%s from agent %s for a request it does not hold (route %s) dropped",
                cmd.name,
                agent.agent_id,
                route.hex(),
            )
            return
        agent.last_answer = now
        agent.model_last_answer[held.model] = now
        since = agent.stalled_models.pop(held.model, None)
        was_stalled = since is not None
        if was_stalled:
            log.warning("agent %s answers model %s again after %.2f s stalled", agent.agent_id, held.model, now - since)
            agent.model_stall_ended[held.model] = agent.stall_ended = now
            agent.stalled_since = min(agent.stalled_models.values(), default=None)
        request = self.requests.get(route)
        if request is not None and not request.done and cmd == Command.ERROR and _says_model_not_found(frames[2]):
            self.agents.forget_versions(agent, request.model, request.version)
            if not self._drop_copy(request, agent):  # a hedge: its other copy carries on
                self._redispatch(request, f"agent {agent.agent_id} no longer has it", out)
        else:
            if request is not None:
                self._forget(request)
                rate = self.rates.setdefault(request.model, ServiceRate(self.now))
                rate.completion(self.now, bool(self.pending.get(request.model)))
            if request is not None and not request.done:
                request.done = True
                sent = _sent_to(request, agent)
                # What a stalled agent answers late says nothing of the model's service time: left out of the p99.
                if sent is not None and not was_stalled and sent >= agent.model_stall_ended.get(request.model, 0.0):
                    self.service.setdefault(request.model, ServiceTimes()).add(now - sent)
                if request.hedge is agent:
                    self.stats["hedge_wins"] += 1
                # First answer wins: any other copy (a hedge, or the copy given to another agent when this one was
                # given up on) is cancelled; its slot stays taken until that agent answers, and that answer is dropped.
                self._cancel_copies(request, agent, out)
                out.append(Send(False, [request.client, PREAMBLE[cmd], *frames[2:]]))
        self._dispatch_pending(agent.models, out)

    def _remove(self, agent: AgentEntry, reason: str, out: list[Send]) -> None:
        orphans = self.agents.remove(agent)
        if orphans is None:
            return
        self.stats["agents_lost"] += 1
        log.warning("agent %s removed: %s; re-dispatching %d requests", agent.agent_id, reason, len(orphans))
        for request in orphans:
            if not request.done and self._drop_copy(request, agent):
                continue  # hedged: its other copy, at another agent, carries on
            self._redispatch(request, f"agent {agent.agent_id}: {reason}", out)

    # ---- requests -----------------------------------------------------------------------------------------------

    def _dispatch(self, request: BrokerRequest, out: list[Send]) -> bool:
        """Send the request to an agent the policy chooses; False if every candidate is at capacity."""
        agent = self._choose(request, None)
        if agent is None:
            return False
        request.agent = agent
        request.sent_at = self.now
        request.attempts += 1
        self._send_copy(request, agent, out)
        return True

    def _choose(self, request: BrokerRequest, exclude: AgentEntry | None) -> AgentEntry | None:
        """The agent the policy chooses for the request among those that serve it, skipping stalled ones (and
        `exclude`); None if none has a free slot."""
        candidates = self.agents.candidates(request.model, request.version)
        while True:
            agent = self.policy.choose(request.model, candidates)
            if agent is None or (agent is not exclude and not self.stalled(agent, self.now, request.model)):
                return agent
            candidates = [c for c in candidates if c is not agent]  # rare: a stalled agent with free slots

    def _send_copy(self, request: BrokerRequest, agent: AgentEntry, out: list[Send]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s for %s -> agent %s (attempt %d)",
                request.trace or request.route.hex(),
                request.model,
                agent.agent_id,
                request.attempts,
                extra=request.log_extra(),
            )
        agent.add_request(request)
        route = protocol.request_route(request.route, request.deadline - self.now, self.now - request.arrived)
        out.append(Send(True, [agent.identity, _REQUEST + route, request.header, *request.tensors]))

    def stalled(self, agent: AgentEntry, now: float, model: str | None = None) -> bool:
        """Whether the agent holds requests of `model` and makes no progress with them: its oldest request of that
        model here is older than the model's stall threshold and it has answered none of that model for that long.
        Judged per model, so an agent busy with a slow (or hung) model still gets the others. Stays so
        (`stalled_models`) until it answers one of that model. model None: judge every model it holds, True if it
        is stalled for any. Cheap: an agent that answered the model within `stall_floor` is never stalled for it."""
        if model is not None:
            return self._stalled_for(agent, model, now)
        judged = [self._stalled_for(agent, m, now) for m in list(agent.model_in_flight)]
        return any(judged) or bool(agent.stalled_models)

    def _stalled_for(self, agent: AgentEntry, model: str, now: float) -> bool:
        if model in agent.stalled_models:
            return True
        if not agent.model_in_flight.get(model):
            return False
        last = agent.model_last_answer.get(model)
        if last is not None and now - last <= self.timings.stall_floor:
            return False  # the common case under load, before looking for its oldest request
        oldest = next((r for r in agent.in_flight.values() if r.model == model), None)
        sent = _sent_to(oldest, agent) if oldest is not None else None
        if sent is None:
            return False
        last = sent if last is None else last  # never answered it: since its oldest request went there
        if now - last <= self.timings.stall_floor:
            return False
        threshold = self.stall_threshold(model)
        if threshold is None or now - sent <= threshold or now - last <= threshold:
            return False
        agent.stalled_models[model] = now
        if agent.stalled_since is None:
            agent.stalled_since = now
        self.stats["stalls"] += 1
        log.warning(
            "agent %s stalled for model %s: %d of its requests here, the oldest %.0f ms old, none answered for "
            "%.0f ms (threshold %.0f ms); no new requests of it until it answers",
            agent.agent_id,
            model,
            agent.model_in_flight.get(model, 0),
            (now - sent) * 1e3,
            (now - last) * 1e3,
            threshold * 1e3,
        )
        return True

    def stall_threshold(self, model: str) -> float | None:
        """max(stall_factor x the model's recent p99 service time, stall_floor); None while the p99 is unknown."""
        times = self.service.get(model)
        if times is None or times.p99 is None:
            return None
        return max(self.timings.stall_factor * times.p99, self.timings.stall_floor)

    def _hedge(self, now: float, out: list[Send]) -> None:
        """Hedging: every request at one agent for longer than `hedge_after`, not hedged yet and within its attempt
        budget, also goes to another agent the policy chooses (not stalled, with a free slot), if there is one."""
        after = self.timings.hedge_after
        due = []
        for agent in self.agents.agents.values():
            for request in agent.in_flight.values():  # oldest first: stop at the first young one
                sent = _sent_to(request, agent)
                if sent is not None and now - sent < after:
                    break
                if (
                    not request.done
                    and request.agent is agent
                    and request.hedge is None
                    and request.attempts < self.timings.max_dispatch_attempts
                ):
                    due.append(request)
        for request in due:
            target = self._choose(request, request.agent)
            if target is None:
                continue  # every other agent is busy: next tick
            request.hedge, request.hedged_at = target, now
            request.attempts += 1
            self.stats["hedged"] += 1
            self._send_copy(request, target, out)

    def _drop_copy(self, request: BrokerRequest, agent: AgentEntry) -> bool:
        """The request's copy at `agent` is gone (its agent died, dropped the model, or the send failed): True if
        the request has another copy in flight (a hedge), which then is the only one; False if it had no other."""
        if request.hedge is None:
            return False
        if request.hedge is agent:
            request.hedge = None
            return True
        if request.agent is agent:
            request.agent, request.sent_at = request.hedge, request.hedged_at
            request.hedge = None
            return True
        return False

    def _cancel_copies(self, request: BrokerRequest, answered_by: AgentEntry | None, out: list[Send]) -> None:
        """CANCEL to every agent other than `answered_by` that still holds a copy of the request (it skips it if
        not started); their slots stay taken until they answer."""
        for holder in (request.agent, request.hedge):
            if holder is not None and holder is not answered_by and request.route in holder.in_flight:
                out.append(Send(True, [holder.identity, _CANCEL + request.route, _EMPTY_HEADER]))

    def _queue_or_refuse(self, request: BrokerRequest, out: list[Send]) -> None:
        """A new request no agent has a free slot for: it waits, unless the queue is full or the wait would pass
        the model's bound (OVERLOADED, with a retry_after when the wait is what is too long)."""
        wait, bound = self.expected_wait(request.model), self.queue_wait_bound(request.model)
        if wait is not None and bound > 0 and wait > bound:
            self.stats["shed"] += 1
            request.done = True
            self._forget(request)
            retry_after = self.retry_after(wait)
            text = (
                f"model '{request.model}': about {wait:.1f} s of queue ahead, over its {bound:g} s bound; "
                f"try again in {retry_after:g} s"
            )
            out.append(
                client_error(request.client, request.request_id, ErrorCode.OVERLOADED, text, request.model, retry_after)
            )
            return
        if self.pending_count >= self.timings.broker_queue_limit:
            request.done = True
            self._forget(request)
            out.append(
                client_error(
                    request.client,
                    request.request_id,
                    ErrorCode.OVERLOADED,
                    f"model '{request.model}': {self.pending_count} requests already waiting; try again later",
                    request.model,
                    None if wait is None else self.retry_after(wait),
                )
            )
        else:
            self._enqueue(request)

    @staticmethod
    def retry_after(wait: float) -> float:
        """When a refused client may come back (`retry_after`, seconds): once the queue ahead of it now has been
        served (`wait`: expected_wait, its length over the model's measured rate), within RETRY_AFTER_MIN and
        RETRY_AFTER_MAX. Not merely once the queue is back under its bound (a few ms away at the margin): every
        refused client would come back at once, to be refused again."""
        return round(min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, wait)), 3)

    def queue_wait_bound(self, model: str) -> float:
        """Seconds a request of `model` may expect to wait in the queue (0: no bound): its config's
        max_queue_wait_ms, announced by its agents, else the broker's default."""
        configured = self.agents.max_queue_wait_ms.get(model, 0)
        return configured / 1000 if configured > 0 else self.timings.max_queue_wait

    def expected_wait(self, model: str) -> float | None:
        """How long a request queued for `model` now would wait: its place in the queue over the model's measured
        service rate. None while no rate is known (then nothing is refused for its wait)."""
        rate = self.rates.get(model)
        if rate is None or not rate.per_second:
            return None
        return (len(self.pending.get(model, ())) + 1) / rate.per_second

    def _enqueue(self, request: BrokerRequest, front: bool = False) -> None:
        queue = self.pending.setdefault(request.model, deque())
        if front:
            queue.appendleft(request)  # a re-dispatched request keeps its place ahead of newer ones
        else:
            queue.append(request)
        request.queued = True
        self.pending_count += 1

    def _dispatch_pending(self, models, out: list[Send]) -> None:
        """Hand queued requests for these models to agents that have free slots now."""
        for model in models:
            queue = self.pending.get(model)
            while queue:
                request = queue[0]
                if not request.done and not self._dispatch(request, out):
                    break
                queue.popleft()
                self.pending_count -= 1

    def _redispatch(self, request: BrokerRequest, reason: str, out: list[Send]) -> None:
        """Its agent died (or dropped the model) with this request in flight: give it to another agent, within the
        attempt budget."""
        request.agent = request.hedge = None
        if request.done:
            return
        self.stats["redispatched"] += 1
        log.info(
            "request %s for %s re-dispatched: %s",
            request.trace or "-",
            request.model,
            reason,
            extra=request.log_extra(),
        )
        if request.attempts >= self.timings.max_dispatch_attempts:
            self._finish_with_error(
                request,
                ErrorCode.INFERENCE_FAILED,
                f"model '{request.model}': gave up after {request.attempts} agents failed ({reason})",
                out,
            )
        elif not self.agents.candidates(request.model, request.version):
            if self.holding(request.model, request.version, self.now):
                self._enqueue(request, front=True)  # an agent that serves it is expected back
                return
            self._finish_with_error(
                request,
                ErrorCode.NO_AGENT,
                f"model '{request.model}': its agent failed ({reason}) and no other live agent serves it",
                out,
            )
        elif not self._dispatch(request, out):
            self._enqueue(request, front=True)

    def _forget(self, request: BrokerRequest) -> None:
        """The request is over for the broker (answered, failed or cancelled): out of both indexes."""
        if self.requests.pop(request.route, None) is not None:
            load = self.client_load.get(request.client, 0) - 1
            if load > 0:
                self.client_load[request.client] = load
            else:
                self.client_load.pop(request.client, None)
        if self.by_client.get((request.client, request.request_id)) == request.route:
            del self.by_client[(request.client, request.request_id)]

    def _finish_with_error(self, request: BrokerRequest, code: ErrorCode, text: str, out: list[Send]) -> None:
        log.debug(
            "request %s failed at the broker: %s %s", request.trace or "-", code.value, text, extra=request.log_extra()
        )
        request.done = True
        self._forget(request)
        out.append(client_error(request.client, request.request_id, code, text, request.model))

    def _expire_requests(self, now: float, out: list[Send]) -> None:
        for request in [r for r in self.requests.values() if r.deadline < now]:
            self.stats["timeouts"] += 1
            where = f" (on agent {request.agent.agent_id})" if request.agent else " (waiting for a free agent)"
            self._finish_with_error(
                request,
                ErrorCode.TIMEOUT,
                f"model '{request.model}': no answer within the request's deadline{where}",
                out,
            )
            # The slot stays taken until the agent answers or dies: it is still working on it.

    def _fail_orphaned_queues(self, now: float, out: list[Send]) -> None:
        """After warm-up: requests queued for a model no live agent has, and none expected back serves, fail now
        rather than at their deadline. Also drops queued requests already answered (timed out), so the queue length
        counts live ones only."""
        for model, queue in list(self.pending.items()):
            for request in queue:
                if (
                    not request.done
                    and not self.agents.candidates(request.model, request.version)
                    and not self.holding(request.model, request.version, now)
                ):
                    request.done = True
                    self._forget(request)
                    code, text = self.agents.why_unroutable(request.model, request.version)
                    out.append(client_error(request.client, request.request_id, code, text, request.model))
            live = deque(r for r in queue if not r.done)
            self.pending_count -= len(queue) - len(live)
            if live:
                self.pending[model] = live
            else:
                del self.pending[model]


def _sent_to(request: BrokerRequest, agent: AgentEntry) -> float | None:
    """When the copy of `request` that `agent` holds was sent to it (None: it holds none the request knows of)."""
    if request.agent is agent:
        return request.sent_at
    if request.hedge is agent:
        return request.hedged_at
    return None


def _says_model_not_found(header_frame) -> bool:
    try:
        return protocol.unpack_header(header_frame).get("code") == ErrorCode.MODEL_NOT_FOUND.value
    except ProtocolError:
        return False
