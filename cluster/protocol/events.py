"""The manager's events (EVENT on its PUB, and the brokers' reports and digests to it): one class per event, as in
messages.py (split from it to keep each module under 600 lines). `parse_event` reads any of them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.protocol.frames import ProtocolError, require


class EventKind(enum.StrEnum):
    AGENT_DEAD = "agent_dead"
    DESIRED = "desired"
    BROKER_REPORT = "broker_report"
    CANARY_DIGEST = "canary_digest"


@dataclass
class AgentDead:
    """EVENT agent_dead, manager -> broker (PUB): the manager's registry stopped hearing the agent. A backup word:
    the broker drops the agent only if `instance` is its live one's."""

    agent: str
    instance: str | None = None
    silent_for: float | None = None  # seconds
    event = EventKind.AGENT_DEAD

    def to_wire(self) -> dict:
        return {
            "event": self.event.value,
            "agent": self.agent,
            "instance": self.instance,
            "silent_for": self.silent_for,
        }


@dataclass
class Desired:
    """EVENT desired, manager -> agents and broker (PUB): the desired state (DesiredState.to_wire()), on every
    change, when an agent joins, and every heartbeat interval."""

    state: Any
    event = EventKind.DESIRED

    def to_wire(self) -> dict:
        return {"event": self.event.value, "state": self.state}


@dataclass
class BrokerEvent:
    """What every event a broker sends the manager starts with: the broker's name, its incarnation (hex) and the
    event's number (`seq`, from 1 per incarnation and kind, so the manager can tell a gap from a silent broker)."""

    broker: str
    incarnation: str
    seq: int

    def _head(self) -> dict:
        return {"event": self.event.value, "broker": self.broker, "incarnation": self.incarnation, "seq": self.seq}

    @staticmethod
    def _parse_head(header: Mapping) -> tuple[str, str, int]:
        return require(header, "broker", str), require(header, "incarnation", str), require(header, "seq", int)


@dataclass
class BrokerReport(BrokerEvent):
    """EVENT broker_report, broker -> manager (the broker's PUB, connected to the manager's heartbeat address), every
    heartbeat interval: the agents it routes to (not draining) and its load. The manager's view is the union of every
    live broker's; a standby manager can subscribe too."""

    agents: list[str]  # ids of the agents it routes to
    load: dict = field(default_factory=dict)  # {in_flight, queued, agents, capacity: {model: n}, ...} (informational)
    event = EventKind.BROKER_REPORT

    def to_wire(self) -> dict:
        return self._head() | {"agents": self.agents, "load": self.load}

    @classmethod
    def from_wire(cls, header: Mapping) -> BrokerReport:
        agents = require(header, "agents", list)
        if not all(isinstance(a, str) for a in agents):
            raise ProtocolError("each of 'agents' must be a string")
        load = header.get("load")
        return cls(*cls._parse_head(header), agents, load if isinstance(load, dict) else {})


@dataclass
class CanaryDigest(BrokerEvent):
    """EVENT canary_digest, broker -> manager (on the broker's report PUB), every canary_digest_interval while the
    broker counts a canary: per model, cluster.canary.digest.ModelDigest.to_wire() (cumulative for the canary run in
    this broker incarnation, so a dropped one loses nothing). The manager checks the models' digests itself
    (ModelDigest.from_wire), so that one malformed model's digest does not drop the others'."""

    models: dict  # model -> ModelDigest wire form
    event = EventKind.CANARY_DIGEST

    def to_wire(self) -> dict:
        return self._head() | {"models": self.models}

    @classmethod
    def from_wire(cls, header: Mapping) -> CanaryDigest:
        models = require(header, "models", dict)
        if not all(isinstance(k, str) for k in models):
            raise ProtocolError("each of 'models' must be named by a string")
        return cls(*cls._parse_head(header), models)


def parse_event(header: Mapping) -> AgentDead | Desired | BrokerReport | CanaryDigest | None:
    """An EVENT's header as its class; None for an event this side does not know (a newer manager's: ignored).
    ProtocolError naming the field when a known one is malformed."""
    event = require(header, "event", str)
    if event == EventKind.AGENT_DEAD:
        return AgentDead(
            require(header, "agent", str),
            require(header, "instance", str, optional=True),
            require(header, "silent_for", (int, float), optional=True),
        )
    if event == EventKind.DESIRED:
        return Desired(header.get("state"))
    if event == EventKind.BROKER_REPORT:
        return BrokerReport.from_wire(header)
    if event == EventKind.CANARY_DIGEST:
        return CanaryDigest.from_wire(header)
    return None
