"""The desired deployments: which version of each model every agent serves, and which is being rolled out.

Shared by the manager (which decides it and keeps it in `<share>/deployments.json`) and the agents (which converge on
it), so it lives outside both roles' packages. The desired state says, per model, which version every agent serves
(`version`) and which version is being rolled out (`staged`): agents load and warm up a staged version next to the
serving one but send it no traffic. It lives in `<share>/deployments.json` (written atomically), so a restarted
manager, and an agent that starts while the manager is down, know it. The rollout that moves it is
`cluster.manager.deployments`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cluster.atomic import atomic_write

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
            "models": {
                n: {"version": d.version, "staged": d.staged, "history": d.history} for n, d in self.models.items()
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
            models[name] = ModelDeployment(version, staged, history)
        return cls(models, generation)

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
