"""Rollouts of the desired deployments, without I/O (the manager drives them; agents converge on them).

The desired state itself (`DesiredState`) is shared with the agents and lives in `cluster.desired`.

A rollout is two-phase, so that either every agent switches or none does:
1. stage: desired.staged = N. Each live agent loads N, warms it up, and reports it staged (or failed) in its beats.
2. all staged: desired.version = N, staged = None. Agents switch new requests to N, let the old version finish what
   it has in flight, and unload it. Any failure instead: staged = None, agents drop N and keep serving the old one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.protocol import Heartbeat


@dataclass
class Rollout:
    """One deploy/rollback in progress: which agents must report, and what each said."""

    model: str
    version: int
    previous: int | None
    expected: set[str]  # live agents when it started
    deadline: float
    requester: tuple | None = None  # (peer identity, request id) to answer when done
    phase: str = "staging"  # staging -> switching -> done
    outcomes: dict[str, str] = field(default_factory=dict)  # agent -> "ok" or the reason it failed
    started: float = field(default_factory=time.monotonic)
    failed_at: float | None = None  # when the first agent reported a failure

    def observe(self, agent: str, beat: Heartbeat) -> None:
        """Update this agent's outcome from its heartbeat."""
        if agent not in self.expected:
            return
        if self.phase == "staging":
            for entry in beat.failed:
                if entry["name"] == self.model and entry["version"] == self.version:
                    self.outcomes[agent] = str(entry.get("error", "failed"))
                    return
            if _has(beat.staged, self.model, self.version) or _serves(beat, self.model, self.version):
                self.outcomes[agent] = "ok"
        elif self.phase == "switching" and _serves(beat, self.model, self.version, default_only=True):
            self.outcomes[agent] = "ok"

    def agent_lost(self, agent: str) -> None:
        """An agent died mid-rollout: it no longer counts (it loads the desired state when it comes back)."""
        if agent in self.expected:
            self.expected.discard(agent)
            self.outcomes.pop(agent, None)

    def complete(self) -> bool:
        return self.expected.issubset(self.outcomes)

    def failures(self) -> dict[str, str]:
        return {a: r for a, r in self.outcomes.items() if r != "ok"}

    def report(self, now: float) -> dict:
        missing = "no answer before the deadline" if self.failed_at is None else "no outcome before the rollout was aborted"
        agents = {a: self.outcomes.get(a, missing) for a in sorted(self.expected)}
        return {
            "model": self.model,
            "version": self.version,
            "previous": self.previous,
            "ok": all(r == "ok" for r in agents.values()),
            "agents": agents,
            "seconds": round(now - self.started, 3),
        }


def _has(entries: list[dict], model: str, version: int) -> bool:
    return any(e["name"] == model and e["version"] == version for e in entries)


def _serves(beat: Heartbeat, model: str, version: int, default_only: bool = False) -> bool:
    return any(
        e["name"] == model and e["version"] == version and (e.get("default", True) or not default_only) for e in beat.models
    )
