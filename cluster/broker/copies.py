"""The Dispatcher's copies of a request beyond its one dispatch (a mixin of `Dispatcher`, in its own module to keep
each under its size limit): the copy sent to an agent (`_send_copy`, the route telling it the time left, the time
waited and the version to run), hedges (a second copy at another agent, Stalls), their CANCELs once one answered,
and the canary path (canary.py decides, this applies): shadow copies of a request into a free slot, their answers,
and a failed canary request run again on the stable version."""

from __future__ import annotations

import logging

from cluster import protocol
from cluster.broker.agents import AgentEntry, BrokerRequest
from cluster.broker.sends import Send
from cluster.protocol import PREAMBLE, Command, ErrorCode, pack

log = logging.getLogger("cluster.broker")

_REQUEST, _CANCEL = PREAMBLE[Command.REQUEST], PREAMBLE[Command.CANCEL]
_EMPTY_HEADER = pack({})  # the broker's CANCEL to an agent: the route names the request


class RequestCopies:
    """Methods of the Dispatcher (they use its agents, stalls, canary split, policy and queues)."""

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
        left, waited = request.deadline - self.now, self.now - request.arrived
        route = protocol.request_route(request.route, left, waited, request.run_version)
        out.append(Send(True, [agent.identity, _REQUEST + route, request.header, *request.tensors]))

    def _hedge(self, now: float, out: list[Send]) -> None:
        """Hedging: each request due a second copy (Stalls.hedges_due) goes to another agent the policy chooses
        (not stalled, with a free slot), if there is one."""
        for request in self.stalls.hedges_due(self.agents.agents.values(), now):
            drawn = request.run_version, request.canary
            target = self._choose(request, request.agent)
            if (request.run_version, request.canary) != drawn:  # the canary's fallback: its copy runs the version
                request.run_version, request.canary = drawn  # drawn, so no hedge (its answer counts as that one's)
                continue
            if target is None:
                continue  # every other agent is busy: next tick
            request.hedge, request.hedged_at = target, now
            request.attempts += 1
            self.stats["hedged"] += 1
            self._send_copy(request, target, out)

    def _cancel_copies(self, request: BrokerRequest, answered_by: AgentEntry | None, out: list[Send]) -> None:
        """CANCEL to every agent other than `answered_by` that still holds a copy of the request (it skips it if
        not started); their slots stay taken until they answer."""
        for holder in (request.agent, request.hedge):
            if holder is not None and holder is not answered_by and request.route in holder.in_flight:
                out.append(Send(True, [holder.identity, _CANCEL + request.route, _EMPTY_HEADER]))

    def _mirror(self, request: BrokerRequest, out: list[Send]) -> None:
        """A shadow copy of `request` (its own route) to an agent of the pair's version with a free slot: never
        queued, no attempt, no client; an agent lost with it just drops it (it is `done` from the start)."""
        pair, route = request.pair, self.incarnation + next(self._routes).to_bytes(8, "big")
        copy = BrokerRequest(route, b"", None, request.model, None, request.header, request.tensors, request.deadline)
        copy.run_version, copy.pair, copy.mirror, copy.done, copy.arrived = pair.version, pair, True, True, self.now
        agent = self._choose(copy, None)
        pair.sent = agent is not None
        self.canary.mirror_sent(pair, pair.sent)
        if agent is None:
            request.pair = None
            return
        copy.agent, copy.sent_at = agent, self.now
        self._send_copy(copy, agent, out)

    def _mirror_answered(self, agent: AgentEntry, held: BrokerRequest, code, frames: list, out: list[Send]) -> None:
        """A shadow copy's answer: its slot is free, and a REPLY goes with the stable answer to the comparison."""
        self.stalls.answered(agent, held.model, self.now)
        if code == ErrorCode.MODEL_NOT_FOUND:
            self.agents.forget_versions(agent, held.model, held.run_version)
        agent.full = agent.full or code == ErrorCode.BUSY
        self.canary.mirror_answered(held.pair, code, frames[2:])
        self._dispatch_pending(agent.models, out)

    def _canary_answered(self, agent: AgentEntry, request: BrokerRequest, code, frames: list, out: list[Send]) -> bool:
        """A request drawn by the canary split was answered (not MODEL_NOT_FOUND: the agent dropped the version, the
        request goes on elsewhere): counted; True if it is not over (the canary failed it and it runs again on the
        stable version, within the attempt budget, so its client sees only the stable answer; or a hedged copy
        failed and its other copy carries on)."""
        if request.done or code == ErrorCode.MODEL_NOT_FOUND:
            return False
        sent = request.sent_to(agent)
        service = None if sent is None else self.now - sent
        if not self.canary.answered(request, code, frames[2], service, request.hedge is None):
            return False
        if not request.drop_copy(agent):
            request.agent = None
            if not self._dispatch(request, out):
                self._enqueue(request, front=True)
        return True
