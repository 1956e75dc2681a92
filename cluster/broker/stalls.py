"""Stall detection and hedging, without I/O: which agents make no progress with a model, and which requests are due a
second copy. The Dispatcher asks and applies the answer (routing skips a stalled agent; it sends the copies).

- A stalled agent (judged per model: its oldest request of a model here is older than max(stall_factor x that
  model's recent p99 service time, stall_floor) and it answered none of that model for that long) gets no new
  requests of that model until it answers one again (an agent busy with a slow or hung model still gets the
  others); it stays alive and keeps what it has (re-dispatched only when it is declared dead).
- Hedging (`timings.hedge_after` > 0): a request at one agent longer than that is due a copy at one other eligible
  agent (`hedges_due`); each copy counts as an attempt, so only requests within their attempt budget are due.

The stall bookkeeping lives on each AgentEntry (`stalled_models`, `model_last_answer`, ...); only this module
changes it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from cluster.broker.agents import AgentEntry, BrokerRequest
from cluster.config import Timings

log = logging.getLogger("cluster.broker")

SERVICE_WINDOW = 256  # a model's recent service times (sent -> answered, per copy) kept for its p99 ...
SERVICE_MIN_SAMPLES = 20  # ... known from this many answers on (before that, no agent is judged stalled for it) ...
SERVICE_P99_EVERY = 16  # ... and computed again every this many answers


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


class Stalls:
    def __init__(self, timings: Timings, stats: dict) -> None:
        self.timings = timings
        self.stats = stats  # the Dispatcher's counters: "stalls" counts agents found stalled
        self.service: dict[str, ServiceTimes] = {}  # model -> its recent service times

    def stalled(self, agent: AgentEntry, now: float, model: str | None = None) -> bool:
        """Whether the agent holds requests of `model` and makes no progress with them: its oldest request of that
        model here is older than the model's stall threshold and it has answered none of that model for that long.
        Judged per model, so an agent busy with a slow (or hung) model still gets the others. Stays so
        (`stalled_models`) until it answers one of that model. model None: judge every model it holds, True if it
        is stalled for any. Cheap: an agent that answered the model within `stall_floor` is never stalled for it."""
        if model is not None:
            return self.stalled_for(agent, model, now)
        judged = [self.stalled_for(agent, m, now) for m in list(agent.model_in_flight)]
        return any(judged) or bool(agent.stalled_models)

    def stalled_for(self, agent: AgentEntry, model: str, now: float) -> bool:
        if model in agent.stalled_models:
            return True
        if not agent.model_in_flight.get(model):
            return False
        last = agent.model_last_answer.get(model)
        if last is not None and now - last <= self.timings.stall_floor:
            return False  # the common case under load, before looking for its oldest request
        oldest = next((r for r in agent.in_flight.values() if r.model == model), None)
        sent = oldest.sent_to(agent) if oldest is not None else None
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

    def answered(self, agent: AgentEntry, model: str, now: float) -> bool:
        """The agent answered a request of `model` it held: it makes progress with it. True if it was stalled for
        that model (its stall ends now)."""
        agent.last_answer = now
        agent.model_last_answer[model] = now
        since = agent.stalled_models.pop(model, None)
        if since is None:
            return False
        log.warning("agent %s answers model %s again after %.2f s stalled", agent.agent_id, model, now - since)
        agent.model_stall_ended[model] = agent.stall_ended = now
        agent.stalled_since = min(agent.stalled_models.values(), default=None)
        return True

    def served(self, request: BrokerRequest, agent: AgentEntry, was_stalled: bool, now: float) -> None:
        """`agent` answered `request` first: its service time counts toward the model's p99, unless the agent was
        stalled (what a stalled agent answers late says nothing of the model's service time)."""
        sent = request.sent_to(agent)
        if sent is not None and not was_stalled and sent >= agent.model_stall_ended.get(request.model, 0.0):
            times = self.service.get(request.model)
            if times is None:
                times = self.service[request.model] = ServiceTimes()
            times.add(now - sent)

    def paused(self, agents: Iterable[AgentEntry], now: float) -> None:
        """The broker did not run for a while: no agent is judged stalled for that time (see Dispatcher.paused)."""
        for agent in agents:
            agent.last_answer = max(agent.last_answer, now)
            for model in agent.model_in_flight:  # stalls are judged per model (from its last answer, or its oldest)
                agent.model_last_answer[model] = max(agent.model_last_answer.get(model, now), now)

    def hedges_due(self, agents: Iterable[AgentEntry], now: float) -> list[BrokerRequest]:
        """Hedging: every request at one agent for longer than `hedge_after`, not hedged yet and within its attempt
        budget: the Dispatcher sends each a second copy where the policy chooses (not stalled, with a free slot)."""
        after = self.timings.hedge_after
        due = []
        for agent in agents:
            for request in agent.in_flight.values():  # oldest first: stop at the first young one
                sent = request.sent_to(agent)
                if sent is not None and now - sent < after:
                    break
                if (
                    not request.done
                    and request.agent is agent
                    and request.hedge is None
                    and request.attempts < self.timings.max_dispatch_attempts
                ):
                    due.append(request)
        return due
