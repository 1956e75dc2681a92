"""The desired deployments: which version of each model every agent serves, and which is being rolled out.

Shared by the manager (which decides it and keeps it in `<share>/deployments.json`) and the agents (which converge on
it), so it lives outside both roles' packages. The desired state says, per model, which version every agent serves
(`version`) and which version is being rolled out (`staged`): agents load and warm up a staged version next to the
serving one but send it no traffic. It lives in `<share>/deployments.json` (written atomically), so a restarted
manager, and an agent that starts while the manager is down, know it. The rollout that moves it is
`cluster.manager.deployments`.

A model may also have a `canary`: a second live version, loaded and served beside `version` on every agent, which
gets a share (`weight`, percent) of the unpinned requests, drawn per request by the brokers, and/or a mirrored
fraction (`shadow`) whose answers only the broker sees. The manager moves it step by step on the judgement of
cluster.canary.judge (cluster/manager/canaries.py); the brokers read the weight from this state, so it survives the
manager (the brokers keep the last state they saw) and a restart of it (saved here, resumed at its step).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cluster.atomic import atomic_write

DEPLOYMENTS_FILE = "deployments.json"


MAX_DECISIONS = 50  # a canary's decisions kept in the desired state (newest last)


@dataclass
class Canary:
    """A canary (or shadow) run of `version` beside a model's stable version. The weight in force is
    `steps[step]` percent of the unpinned requests once every agent has it loaded (`phase` "running"); 0 while
    "loading" and for a shadow-only run."""

    version: int
    steps: list[int]  # live weights in percent, judged one after another, e.g. [10, 50, 100]; 100 means promote
    id: str  # random hex, new for every canary run: the brokers key their counters and circuit breakers on it
    step: int = 0  # index into steps
    step_seconds: float = 30.0  # the least time a step runs before it may pass (it also needs enough requests)
    step_started: float | None = None  # wall time the current step began (None while loading)
    phase: str = "loading"  # loading (agents load and warm it) -> running
    shadow: float = 0.0  # fraction of unpinned requests also mirrored to this version (answers never reach clients)
    shadow_only: bool = False  # mirror only: weight 0 throughout; the run reports drift, never promotes on its own
    retry: bool = True  # a canary request that fails because the model raised is run again on the stable version
    criteria: dict = field(default_factory=dict)  # cluster.canary.judge.Criteria fields that differ from defaults
    decisions: list[dict] = field(default_factory=list)  # [{at, step, weight, decision, reason}], newest last

    @property
    def weight(self) -> int:
        """Percent of unpinned requests the brokers send to the canary now."""
        if self.phase != "running" or self.shadow_only or not self.steps:
            return 0
        return self.steps[min(self.step, len(self.steps) - 1)]

    def to_wire(self) -> dict:
        return {
            "version": self.version,
            "steps": list(self.steps),
            "id": self.id,
            "step": self.step,
            "step_seconds": self.step_seconds,
            "step_started": self.step_started,
            "phase": self.phase,
            "shadow": self.shadow,
            "shadow_only": self.shadow_only,
            "retry": self.retry,
            "criteria": dict(self.criteria),
            "decisions": list(self.decisions[-MAX_DECISIONS:]),
        }

    @classmethod
    def from_wire(cls, data) -> Canary:
        """ValueError naming the field when malformed."""
        if not isinstance(data, dict):
            raise ValueError("a canary must be a map")
        version, steps, step = data.get("version"), data.get("steps"), data.get("step", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError("canary 'version' must be an int >= 1")
        if (
            not isinstance(steps, list)
            or not steps
            or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= 100 for w in steps)
        ):
            raise ValueError("canary 'steps' must be a non-empty list of percents (ints 0..100)")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < len(steps):
            raise ValueError("canary 'step' must index 'steps'")
        if not isinstance(data.get("id"), str):
            raise ValueError("canary 'id' must be a string")
        shadow = data.get("shadow", 0.0)
        if not isinstance(shadow, (int, float)) or isinstance(shadow, bool) or not 0 <= shadow <= 1:
            raise ValueError("canary 'shadow' must be a fraction between 0 and 1")
        step_seconds = data.get("step_seconds", 30.0)
        if not isinstance(step_seconds, (int, float)) or isinstance(step_seconds, bool) or step_seconds < 0:
            raise ValueError("canary 'step_seconds' must be a number >= 0")
        started = data.get("step_started")
        if started is not None and (not isinstance(started, (int, float)) or isinstance(started, bool)):
            raise ValueError("canary 'step_started' must be a wall time or null")
        phase = data.get("phase", "loading")
        if phase not in ("loading", "running"):
            raise ValueError("canary 'phase' must be 'loading' or 'running'")
        criteria, decisions = data.get("criteria") or {}, data.get("decisions") or []
        if not isinstance(criteria, dict) or not isinstance(decisions, list):
            raise ValueError("canary 'criteria' must be a map and 'decisions' a list")
        return cls(
            version,
            list(steps),
            data["id"],
            step,
            float(step_seconds),
            None if started is None else float(started),
            phase,
            float(shadow),
            bool(data.get("shadow_only", False)),
            bool(data.get("retry", True)),
            criteria,
            [d for d in decisions if isinstance(d, dict)][-MAX_DECISIONS:],
        )


@dataclass
class ModelDeployment:
    version: int | None  # served by every agent; None until a first version is rolled out
    staged: int | None = None  # being rolled out: loaded and warmed, not served yet
    history: list[int] = field(default_factory=list)  # versions served before, newest last (rollback targets)
    canary: Canary | None = None  # a second live version being judged on live traffic (served beside `version`)
    # the agents that hold it (config `replicas: N`, placed by cluster/manager/placement.py); None: every agent
    agents: list[str] | None = None

    def placed_on(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents

    def wanted_versions(self) -> list[int]:
        """The versions an agent should hold, each once, in the order to load them: the stable one, one being
        staged, a canary's (a shadow-only run of the stable version is that version)."""
        canary = self.canary.version if self.canary is not None else None
        return [v for v in dict.fromkeys((self.version, self.staged, canary)) if v is not None]


@dataclass
class DesiredState:
    models: dict[str, ModelDeployment] = field(default_factory=dict)
    generation: int = 0  # bumped on every change; agents apply a state once per generation

    def to_wire(self) -> dict:
        return {
            "generation": self.generation,
            "models": {
                n: {"version": d.version, "staged": d.staged, "history": d.history}
                | ({"canary": d.canary.to_wire()} if d.canary is not None else {})
                | ({"agents": list(d.agents)} if d.agents is not None else {})
                for n, d in self.models.items()
            },
        }

    @classmethod
    def from_wire(cls, data: dict) -> DesiredState:
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
            canary = entry.get("canary")
            try:
                canary = Canary.from_wire(canary) if canary is not None else None
            except ValueError as exc:
                raise ValueError(f"model {name!r}: {exc}") from None
            agents = entry.get("agents")
            if agents is not None and (not isinstance(agents, list) or not all(isinstance(a, str) for a in agents)):
                raise ValueError(f"model {name!r}: agents must be a list of agent ids")
            models[name] = ModelDeployment(version, staged, history, canary, agents)
        return cls(models, generation)

    def for_agent(self, agent: str, model_names: list[str] | None = None) -> DesiredState:
        """What one agent serves: the models placed on it (and, started with --models, only those)."""
        models = {
            n: d for n, d in self.models.items() if d.placed_on(agent) and (model_names is None or n in model_names)
        }
        return DesiredState(models, self.generation)

    # ---- persistence on the share -----------------------------------------------------------------------

    @classmethod
    def load(cls, share_dir: str | os.PathLike) -> DesiredState | None:
        path = Path(share_dir) / DEPLOYMENTS_FILE
        try:
            return cls.from_wire(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: {exc}") from None

    def save(self, share_dir: str | os.PathLike) -> None:
        """Write atomically: a temp file on the share, fsync, rename over the old one, fsync the folder."""
        atomic_write(Path(share_dir) / DEPLOYMENTS_FILE, json.dumps(self.to_wire(), indent=2).encode())

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
