"""The registry of live agents, without any I/O (the sans-IO core of the manager, as pyzmq's zmq/auth/base.py is).

Fed heartbeats and clock ticks, it returns the registry events to publish. Any beat from an agent keeps it alive;
an agent silent for `expiry` seconds is dead. A missed beat (PUB/SUB drops them at the high-water mark and while
a subscriber joins) costs nothing as long as a later one arrives in time.

It is the manager's own view, for what the manager decides (which agents a rollout waits for, the deployments,
agents and models answers). Liveness for routing is the broker's: it expires agents from their own DEALER traffic
on its clock; the `agent_dead` events returned here are published to it as a backup word only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cluster.clock import pardon
from cluster.logs import BadInputLog
from cluster.protocol import AgentDead, Heartbeat, agent_view, models_view

log = logging.getLogger("cluster.manager")
duplicates = BadInputLog(log, per_second=2)


@dataclass
class AgentRecord:
    agent_id: str
    beat: Heartbeat  # the latest heartbeat
    first_seen: float
    last_seen: float
    joined: float  # wall time of the first beat
    key: str | None = None  # keys on: the public key of its first beat; only that key may beat for it


class Registry:
    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        self.agents: dict[str, AgentRecord] = {}

    def may_beat(self, agent_id: str, key: str | None) -> bool:
        """Keys on: whether `key` may beat for `agent_id` (a new id, or the key the live agent first beat with)."""
        record = self.agents.get(agent_id)
        return record is None or record.key == key

    def observe(self, beat: Heartbeat, now: float, key: str | None = None) -> list[dict]:
        """Record a heartbeat (from `key`, keys on); returns [agent_joined event] the first time an agent is seen
        (the manager logs it and sends the newcomer the desired state; it is not published)."""
        agent_id = beat.agent
        record = self.agents.get(agent_id)
        if (
            record is not None
            and record.beat.instance is not None
            and beat.instance is not None
            and record.beat.instance != beat.instance
            and now - record.last_seen <= self.expiry
        ):
            # Another process beats with a live agent's id (started with the same --id): the broker refuses it
            # and it exits; the first keeps its record. A restarted agent's beats count once its predecessor
            # expires (one expiry at most).
            duplicates.error(
                "heartbeat for agent %s ignored: it comes from another process (host %s, pid %s, instance %s) than "
                "the live one (host %s, pid %s, instance %s)",
                agent_id,
                beat.host,
                beat.pid,
                beat.instance,
                record.beat.host,
                record.beat.pid,
                record.beat.instance,
            )
            return []
        if record is None:
            self.agents[agent_id] = AgentRecord(agent_id, beat, now, now, time.time(), key)
            return [{"event": "agent_joined", "agent": agent_id, "info": beat}]
        record.beat = beat
        record.last_seen = now
        return []

    def paused(self, lost: float, now: float) -> None:
        """The manager did not run for `lost` seconds (RunClock): beats sent meanwhile are still unread, so that
        time is no agent's silence."""
        for record in self.agents.values():
            record.last_seen = pardon(record.last_seen, lost, now)

    def expire(self, now: float) -> list[dict]:
        """Drop agents silent for longer than the expiry; returns an agent_dead event for each."""
        dead = [r for r in self.agents.values() if now - r.last_seen > self.expiry]
        for record in dead:
            del self.agents[record.agent_id]
        return [AgentDead(r.agent_id, r.beat.instance, round(now - r.last_seen, 3)).to_wire() for r in dead]

    def describe_agents(self, now: float) -> list[dict]:
        return [agent_view(r.beat, heartbeat_age=now - r.last_seen, joined=r.joined) for r in self.agents.values()]

    def describe_models(self) -> dict[str, dict]:
        return models_view((r.agent_id, r.beat.served_versions()) for r in self.agents.values())
