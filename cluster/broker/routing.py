"""Routing policies: which agent gets the next request for a model (Ray Serve's request-router idea).

A policy is a small class with one method, `choose(model, candidates)`. `candidates` are the live agents that have
the model (and version) ready, in a stable order; the policy returns one with a free slot for that model
(`has_room(model)`: under its capacity for the model and in all), or None when every one is at capacity (the broker
then queues the request until a slot frees up). Policies never block and keep no reference to agents beyond the
call, so the broker may add and drop agents freely between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Candidate(Protocol):
    """What a policy may look at: the broker's AgentEntry satisfies this."""

    in_flight_count: int
    capacity: int

    def has_room(self, model: str) -> bool: ...


class RoutingPolicy:
    name = "base"

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate | None:
        raise NotImplementedError


class RoundRobin(RoutingPolicy):
    """Each model keeps a cursor into its candidates; the next agent after the cursor with a free slot wins.

    With free slots everywhere this serves the agents strictly in turn, so N sequential requests over k agents
    split N/k each. A full agent is skipped, not waited for, so one slow agent does not hold up the others.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._cursor: dict[str, int] = {}

    def choose(self, model, candidates):
        n = len(candidates)
        if n == 0:
            return None
        start = self._cursor.get(model, 0) % n
        for step in range(n):
            agent = candidates[(start + step) % n]
            if agent.has_room(model):
                self._cursor[model] = start + step + 1
                return agent
        return None


class LeastOutstanding(RoutingPolicy):
    """The agent with the fewest requests in flight (ties: the first in order), so a slow agent gets less."""

    name = "least-outstanding"

    def choose(self, model, candidates):
        best = None
        for agent in candidates:
            if agent.has_room(model) and (best is None or agent.in_flight_count < best.in_flight_count):
                best = agent
        return best


POLICIES = {cls.name: cls for cls in (RoundRobin, LeastOutstanding)}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
