"""The broker's dispatcher, without any I/O: every request from its arrival to its answer, over the AgentTable.

It takes events and returns what to send (a list of `Send`), never touching a socket (pyzmq's zmq/auth/base.py
idea; `Broker` is the thin loop that owns the sockets). The events: a client's request (`client_request`) or
cancel (`client_cancel`), an agent's message (`agent_message`: READY, HEARTBEAT, REPLY, ERROR, DISCONNECT), the
manager's word that an agent is dead (`agent_declared_dead`), a clock tick (`tick`), time to beat (`heartbeats`),
and a send that failed (`send_failed`: the agent is gone). Every time is the caller's `now` (monotonic seconds), so
tests run the clock.

Its parts return decisions, which it applies (they never call back): `Admission` (admission.py: may a request
wait, or is it refused OVERLOADED), `Stalls` (stalls.py: which agents are stalled for a model, which requests are
due a hedge copy), `Registration` (registration.py: READY, duplicate ids, keys, the agents expected back after
a restart) and `CanarySplit` (canary.py: which version runs an unpinned request of a model under canary, the counts,
the circuit breaker, shadow picks). Their modules list what each guarantees; the rest is here, and in copies.py
(hedges, shadow copies, a canary request retried on the stable version).

What it guarantees (the Majordomo broker's gaps, fixed):
- every request in flight is tracked (agent, deadline); when its agent dies it goes to another agent with the model,
  at most `max_dispatch_attempts` agents in all (then INFERENCE_FAILED; NO_AGENT if no other agent serves it);
- "alive" and "has capacity" are separate: an agent never has more than its announced capacity in flight, however
  often it beats; the rest wait, in order, in a per-model queue (past `broker_queue_limit` waiting: OVERLOADED) and
  go out as replies free slots;
- a request for a version goes only to agents that serve it; an agent that answers MODEL_NOT_FOUND (it unloaded the
  version since its last beat) is forgotten for that version, and the request silently goes elsewhere; BUSY (its
  share shrank): none until its next beat, the request back at its queue's head, its attempt not counted;
- a request no live agent can take fails at once (MODEL_NOT_FOUND or NO_AGENT), except while agents re-register
  after the broker (re)starts (Registration.holding): then it waits, within its deadline. A model the manager's
  desired state does not list is never held, warm-up or not: it fails at once with MODEL_NOT_FOUND (the broker
  learns that state from the manager's answer at start-up, and from its `desired` events); only until it knows it
  is an unknown model held, in the warm-up window at most;
- past its deadline a request fails with TIMEOUT, whether in flight or queued; the agent is told how long a request
  has left (and how long it waited here) in the REQUEST's route frame, so it drops work that expired before it began;
- a client's CANCEL (found by client identity and id) takes its request out of the queue, or, in flight, is passed
  to its agent (which skips it if not started); whatever the agent answers then is dropped, the slot freed;
- load shedding (Admission): a request that would wait longer than its model's bound is refused (OVERLOADED);
- capacity per model: at most `model_capacity` of a model at an agent (and `capacity` in all); else `capacity`;
- a stalled agent (Stalls, judged per model) gets no new requests of that model until it answers one again;
- hedging (Stalls): a request at one agent past `timings.hedge_after` gets a copy at another (same route); the
  first answer wins, the other copy is cancelled (its slot taken until it answers); a dead copy's twin carries on;
- tensor frames are forwarded as received, never decoded; of an agent's answer only an ERROR's header is read;
- an answer reaches only the client that asked: a route is this broker's random incarnation + a counter, so it
  names one request of one broker process (never reused after a restart), and an answer is accepted only from an
  agent that holds that route (the agent it was sent to, or its hedge copy's); anything else is dropped, with a
  rate-limited log line (a late answer from before a restart, a forged or guessed route);
- keys and agent ids (Registration): only agent keys speak on the agents' socket, each agent bound to its key; one
  live agent per agent id (a second READY for it: ERROR AGENT_ID_IN_USE).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque

from cluster import protocol
from cluster.broker.admission import Admission, Refusal
from cluster.broker.agents import AgentEntry, AgentTable, BrokerRequest
from cluster.broker.canary import CanarySplit
from cluster.broker.copies import _REQUEST, RequestCopies
from cluster.broker.registration import TAKEN_OVER, Registration, bad_input
from cluster.broker.routing import RoutingPolicy
from cluster.broker.sends import Send, client_error, error_code
from cluster.broker.stalls import Stalls
from cluster.clock import pardon
from cluster.config import Timings
from cluster.keys import AllowList
from cluster.logs import BadInputLog
from cluster.protocol import PREAMBLE, BrokerBeat, Command, Disconnect, ErrorCode, as_bytes, error_header, pack

log = logging.getLogger("cluster.broker")
foreign = BadInputLog(log)  # answers from an agent that does not hold their route, rate-limited on their own

_ERROR, _HEARTBEAT = PREAMBLE[Command.ERROR], PREAMBLE[Command.HEARTBEAT]
_SEND_READY = pack(Disconnect("unknown agent; send READY").to_wire())


class Dispatcher(RequestCopies):
    def __init__(
        self, timings: Timings, policy: RoutingPolicy, now: float, allow: AllowList | None = None, rng=None
    ) -> None:
        self.timings = timings
        self.allow = allow  # keys on: the allow-list, and every agent message carries its sender's key
        self.policy = policy
        self.agents = AgentTable(timings.expiry)
        self.requests: dict[bytes, BrokerRequest] = {}  # route -> request, from arrival until answered
        self.pending: dict[str, deque[BrokerRequest]] = {}  # model -> requests waiting for a free slot
        self.pending_count = 0
        # Routes: this broker's random incarnation + a counter (protocol.ROUTE_BYTES); agents learn the incarnation
        # from its heartbeats, and answer only requests of the broker they are connected to.
        self.incarnation = protocol.broker_incarnation()
        self._routes = itertools.count(1)
        self.heartbeat_header = pack(BrokerBeat(self.incarnation.hex()).to_wire())
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
            "busy": 0,  # ERROR BUSY from agents (their share shrank): requests queued again, attempts not counted
        }
        self.client_load: dict[bytes, int] = {}  # client -> its requests here (queued or at an agent)
        self.by_client: dict[tuple, bytes] = {}  # (client identity, its id) -> route, for CANCEL
        self.now = now  # the latest event's clock: what a request forwarded now has left, and has waited
        # The parts that decide (each returns what to do; the dispatcher does it):
        self.admission = Admission(timings, self.agents.max_queue_wait_ms)
        self.stalls = Stalls(timings, self.stats)
        self.registration = Registration(timings, self.agents, allow, now)
        self.canary = CanarySplit(timings.max_dispatch_attempts, rng)  # rng: a random.Random (tests seed it)

        # ... and their state and judgements under the names the broker and the tests use:
        self.warming_up, self.holding = self.registration.warming_up, self.registration.holding
        self.stalled, self.stall_threshold = self.stalls.stalled, self.stalls.stall_threshold
        self.queue_wait_bound = self.admission.queue_wait_bound

    started = property(lambda self: self.registration.started)
    expected = property(lambda self: self.registration.expected)
    reserved = property(lambda self: self.registration.reserved)
    rates = property(lambda self: self.admission.rates)
    service = property(lambda self: self.stalls.service)
    retry_after = staticmethod(Admission.retry_after)

    def expected_wait(self, model: str) -> float | None:
        return self.admission.expected_wait(model, len(self.pending.get(model, ())))

    def expect_agents(self, views: list, now: float) -> list[Send]:
        """The manager's answer to QUERY {what: agents}, asked at start-up (Registration.expect)."""
        self.now = now
        self.registration.expect(views, now)
        return []

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
        attempt: int = 0,
    ) -> list[Send]:
        """A client's REQUEST, already checked: send it to an agent, queue it, or answer why it cannot be served.
        `congested`: the client is not reading its replies (the broker holds some for it): OVERLOADED, as is a
        request past the client's bound on requests here (`client_max_in_flight`). `trace`: its request_id (or
        TRACE_IN_HEADER). `attempt`: dispatches it had at brokers the client lost (its budget counts from there)."""
        out: list[Send] = []
        self.now = now
        load = self.client_load.get(client, 0)
        if congested or load >= self.timings.client_max_in_flight:
            refused = self.admission.client_refusal(load, congested)
            self.stats["client_refused"] += 1
            out.append(client_error(client, request_id, ErrorCode.OVERLOADED, refused.text, model, refused.retry_after))
            return out
        if not self.agents.candidates(model, version) and not self.registration.holding(model, version, now):
            code, text = self.agents.why_unroutable(model, version)
            out.append(client_error(client, request_id, code, text, model))
            return out
        self.stats["requests"] += 1
        route = self.incarnation + next(self._routes).to_bytes(8, "big")
        request = BrokerRequest(route, client, request_id, model, version, header_frame, tensors, now + timeout, now)
        request.trace, request.attempts = trace, attempt
        if version is None and model in self.canary.runs:  # under canary: which version runs it, and a mirror?
            self.canary.draw(request, lambda v: self.agents.serves(model, v))
        self.requests[route] = request
        self.client_load[client] = load + 1
        self.by_client[(client, request_id)] = route
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
            why = self.registration.key_refusal(identity, cmd, key)
            if why is not None:  # revoked, or another role's: an agent with it goes; READY and HEARTBEAT hear why
                agent = self.agents.get(identity)
                if agent is not None:
                    self._remove(agent, f"its key is refused ({why[1]})", out)
                if cmd in (Command.READY, Command.HEARTBEAT):
                    out.append(Send(True, [identity, _ERROR, pack(error_header(None, why[0], why[1]))]))
                return out
        if cmd == Command.READY:
            self._ready(identity, frames[2], now, out, key)
            return out
        agent = self.agents.get(identity)
        if agent is not None and agent.key != key:
            self.registration.wrong_key(agent, cmd)
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
        self.registration.declared_dead(agent_id, instance)
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
                if request.drop_copy(agent):
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
            self.stalls.stalled(agent, now)  # routing asks at each dispatch; this makes it known (stats, log) between
        if self.timings.hedge_after > 0:
            self._hedge(now, out)
        self._expire_requests(now, out)
        self.registration.end_rejoin_window(now)
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
        self.stalls.paused(self.agents.agents.values(), now)

    def heartbeats(self) -> list[Send]:
        """The broker's beat to every agent, so agents know it is alive."""
        return [Send(True, [a.identity, _HEARTBEAT, self.heartbeat_header]) for a in self.agents.agents.values()]

    # ---- agents -------------------------------------------------------------------------------------------------

    def _ready(self, identity: bytes, header_frame, now: float, out: list[Send], key: str | None = None) -> None:
        ready = self.registration.ready(identity, header_frame, key, now)
        if ready.refusal is not None:
            if ready.evict is not None:
                self._remove(ready.evict, TAKEN_OVER, out)
            elif ready.probe is not None:  # if its connection is gone, the send fails and it goes at once
                out.append(Send(True, [ready.probe.identity, _HEARTBEAT, self.heartbeat_header]))
            header = error_header(None, ErrorCode.AGENT_ID_IN_USE, ready.refusal)
            out.append(Send(True, [identity, _ERROR, pack(header)]))
            return
        if ready.beat is None:
            return
        self.agents.remember_metadata(ready.metadata)
        old = ready.old
        if ready.again:
            self.agents.update(old, ready.beat)  # the same process saying READY again (it thought we were gone)
            self._dispatch_pending(old.models, out)
            return
        if old is not None:
            self._remove(old, "it registered again (restarted)", out)
        agent = self.agents.add(identity, ready.beat, now, key)
        self._dispatch_pending(agent.models, out)

    def _heartbeat(self, agent: AgentEntry, header_frame, out: list[Send]) -> None:
        beat = self.registration.heartbeat(agent, header_frame)
        if beat is not None:
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
        code = error_code(frames[2]) if cmd == Command.ERROR else None
        if held.mirror:  # a shadow copy: compared with the stable answer, never forwarded, never retried
            return self._mirror_answered(agent, held, code, frames, out)
        if code == ErrorCode.BUSY:  # its share shrank before we heard: the request goes back to the head of its
            self.stats["busy"] += 1  # queue, its attempt not counted, and the agent gets none until its next beat
            agent.full = True
            held.attempts -= 1
            if not held.done and not held.drop_copy(agent):  # (a hedge: its other copy carries on)
                held.agent = None
                if not self._dispatch(held, out):
                    self._enqueue(held, front=True)
            return
        was_stalled = self.stalls.answered(agent, held.model, now)
        request = self.requests.get(route)
        if (
            request is not None
            and request.canary is not None
            and self._canary_answered(agent, request, code, frames, out)
        ):
            return self._dispatch_pending(agent.models, out)  # retried on the stable version
        if request is not None and not request.done and code == ErrorCode.MODEL_NOT_FOUND:
            self.agents.forget_versions(agent, request.model, request.version or request.run_version)
            if not request.drop_copy(agent):  # a hedge: its other copy carries on
                # the version the canary split drew left that agent (forgotten there): no attempt used up
                request.attempts -= request.version is None and request.run_version is not None
                self._redispatch(request, f"agent {agent.agent_id} no longer has it", out)
        else:
            if request is not None:
                self._forget(request)
                self.admission.completion(request.model, now, bool(self.pending.get(request.model)))
            if request is not None and not request.done:
                request.done = True
                self.stalls.served(request, agent, was_stalled, now)
                if request.hedge is agent:
                    self.stats["hedge_wins"] += 1
                # First answer wins: any other copy (a hedge, or the copy given to another agent when this one was
                # given up on) is cancelled; its slot stays taken until that agent answers, and that answer is dropped.
                self._cancel_copies(request, agent, out)
                out.append(Send(False, [request.client, PREAMBLE[cmd], *frames[2:]]))
                if request.pair is not None:  # mirrored: the answers are compared off the loop
                    self.canary.stable_answered(request.pair, cmd == Command.REPLY, frames[2:])
        self._dispatch_pending(agent.models, out)

    def _remove(self, agent: AgentEntry, reason: str, out: list[Send]) -> None:
        orphans = self.agents.remove(agent)
        if orphans is None:
            return
        self.stats["agents_lost"] += 1
        log.warning("agent %s removed: %s; re-dispatching %d requests", agent.agent_id, reason, len(orphans))
        for request in orphans:
            if not request.done and request.drop_copy(agent):
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
        if request.pair is not None and not request.pair.sent:
            self._mirror(request, out)
        return True

    def _choose(self, request: BrokerRequest, exclude: AgentEntry | None) -> AgentEntry | None:
        """The agent the policy chooses for the request among those that serve it, skipping stalled ones (and
        `exclude`); None if none has a free slot."""
        candidates = self.agents.candidates(request.model, request.run_version or request.version)
        run = request.canary  # the version drawn is served by no live agent (any more), or its breaker tripped:
        if run is not None and (not candidates or run.tripped) and self.canary.fallback(request, candidates):
            candidates = self.agents.candidates(request.model, request.run_version or request.version)
        while True:
            agent = self.policy.choose(request.model, candidates)
            if agent is None or (agent is not exclude and not self.stalls.stalled_for(agent, request.model, self.now)):
                return agent
            candidates = [c for c in candidates if c is not agent]  # rare: a stalled agent with free slots

    def _queue_or_refuse(self, request: BrokerRequest, out: list[Send]) -> None:
        """A new request no agent has a free slot for: it waits, unless Admission refuses it (OVERLOADED)."""
        queued = len(self.pending.get(request.model, ()))
        refused: Refusal | None = self.admission.queue_refusal(request.model, queued, self.pending_count)
        if refused is None:
            self._enqueue(request)
            return
        if refused.shed:
            self.stats["shed"] += 1
        request.done = True
        self._forget(request)
        code = ErrorCode.OVERLOADED
        out.append(
            client_error(request.client, request.request_id, code, refused.text, request.model, refused.retry_after)
        )

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
            if self.registration.holding(request.model, request.version, self.now):
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
        if log.isEnabledFor(logging.DEBUG):  # (its trace may have to be read from its header: only when logged)
            what = f"{code.value} {text}"
            log.debug("request %s failed at the broker: %s", request.trace or "-", what, extra=request.log_extra())
        request.done = True
        self._forget(request)
        out.append(client_error(request.client, request.request_id, code, text, request.model))

    def _expire_requests(self, now: float, out: list[Send]) -> None:
        for request in [r for r in self.requests.values() if r.deadline < now]:
            self.stats["timeouts"] += 1
            if request.canary is not None:
                self.canary.expired(request)
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
                    and not self.registration.holding(request.model, request.version, now)
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
