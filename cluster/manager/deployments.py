"""Desired deployments and rollouts, without I/O (the manager drives them; agents converge on them).

The desired state says, per model, which version every agent serves (`version`) and which version is being rolled
out (`staged`): agents load and warm up a staged version next to the serving one but send it no traffic. It lives
in `<share>/deployments.json` (written atomically), so a restarted manager, and an agent that starts while the
manager is down, know it.

A rollout is two-phase, so that either every agent switches or none does:
1. stage: desired.staged = N. Each live agent loads N, warms it up, and reports it staged (or failed) in its beats.
2. all staged: desired.version = N, staged = None. Agents switch new requests to N, let the old version finish what
   it has in flight, and unload it. Any failure instead: staged = None, agents drop N and keep serving the old one.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

DEPLOYMENTS_FILE = "deployments.json"


@dataclass
class ModelDeployment:
    version: int | None  # served by every agent; None until a first version is rolled out
    staged: int | None = None  # being rolled out: loaded and warmed, not served yet
    history: list[int] = field(default_factory=list)  # versions served before, newest last (rollback targets)


@dataclass
class DesiredState:
    models: dict[str, ModelDeployment] = field(default_factory=dict)
    generation: int = 0  # bumped on every change; agents apply a state once per generation

    def to_wire(self) -> dict:
        return {
            "generation": self.generation,
            "models": {n: {"version": d.version, "staged": d.staged, "history": d.history} for n, d in self.models.items()},
        }

    @classmethod
    def from_wire(cls, data: dict) -> "DesiredState":
        """Parse (and check) the wire/file form; ValueError on anything malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ValueError("desired state must be a map with a 'models' map")
        generation = data.get("generation", 0)
        if not isinstance(generation, int):
            raise ValueError("'generation' must be an int")
        models = {}
        for name, entry in data["models"].items():
            if not isinstance(name, str) or not isinstance(entry, dict):
                raise ValueError(f"bad entry for model {name!r}")
            version, staged, history = entry.get("version"), entry.get("staged"), entry.get("history", [])
            for value in (version, staged):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ValueError(f"model {name!r}: versions must be ints >= 1")
            if not isinstance(history, list) or not all(isinstance(v, int) for v in history):
                raise ValueError(f"model {name!r}: history must be a list of ints")
            models[name] = ModelDeployment(version, staged, history)
        return cls(models, generation)

    # ---- persistence on the share -----------------------------------------------------------------------

    @classmethod
    def load(cls, share_dir: str | os.PathLike) -> "DesiredState | None":
        path = Path(share_dir) / DEPLOYMENTS_FILE
        try:
            return cls.from_wire(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: {exc}") from None

    def save(self, share_dir: str | os.PathLike) -> None:
        """Write atomically: a temp file on the share, fsync, rename over the old one, fsync the folder."""
        path = Path(share_dir) / DEPLOYMENTS_FILE
        tmp = path.with_name(f".{DEPLOYMENTS_FILE}.{secrets.token_hex(4)}")
        with open(tmp, "w") as f:
            json.dump(self.to_wire(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def changed(self) -> None:
        self.generation += 1


def newest_versions(share) -> DesiredState:
    """Each model's newest version: what a share with no deployments.json serves (the manager and agents agree).
    `share` is a cluster.share.Share; its ShareError propagates."""
    desired = DesiredState()
    for name in share.list_models():
        versions = share.list_versions(name)
        if versions:
            desired.models[name] = ModelDeployment(max(versions))
    return desired


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

    def observe(self, agent: str, beat: dict) -> None:
        """Update this agent's outcome from its heartbeat."""
        if agent not in self.expected:
            return
        if self.phase == "staging":
            for entry in beat.get("failed", []):
                if entry.get("name") == self.model and entry.get("version") == self.version:
                    self.outcomes[agent] = str(entry.get("error", "failed"))
                    return
            if _has(beat.get("staged", []), self.model, self.version) or _serves(beat, self.model, self.version):
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


def _has(entries: list, model: str, version: int) -> bool:
    return any(isinstance(e, dict) and e.get("name") == model and e.get("version") == version for e in entries)


def _serves(beat: dict, model: str, version: int, default_only: bool = False) -> bool:
    return any(
        isinstance(e, dict) and e.get("name") == model and e.get("version") == version and (e.get("default", True) or not default_only)
        for e in beat.get("models", [])
    )
