"""What one agent holds: the versions it serves, the ones staged for a rollout, the ones that failed to load.

`ModelTable` is the sans-IO part of the agent's model lifecycle: given the desired state it says which versions to
load (`plan`), takes loaded versions in (`add_loaded`) and applies switches and unloads (`converge`). It never drops
the version it serves by default until the desired version is ready to take over, so a rollout never leaves a gap,
and a version that failed to load leaves the old one serving. A canary version is served beside the default as
soon as it is loaded and warm (never as the default: the brokers draw which unpinned requests run it). Only the
agent's I/O thread touches it; a version removed here stays alive for the requests still running on it (they hold a
reference) and is freed after.
"""

from __future__ import annotations

from typing import Any

from cluster.desired import DesiredState


class ModelTable:
    def __init__(self) -> None:
        self.serving: dict[str, dict[int, Any]] = {}  # name -> version -> LoadedModel
        self.default: dict[str, int] = {}  # name -> the version unversioned requests get
        self.staged: dict[str, dict[int, Any]] = {}  # loaded and warm, not served until the rollout switches
        self.failed: dict[tuple[str, int], str] = {}  # (name, version) -> why it could not be loaded

    def lookup(self, name: str, version: int | None):
        versions = self.serving.get(name)
        if not versions:
            return None
        return versions.get(self.default[name] if version is None else version)

    def has(self, name: str, version: int) -> bool:
        return version in self.serving.get(name, {}) or version in self.staged.get(name, {})

    def plan(self, desired: DesiredState, loading: set[tuple[str, int]]) -> list[tuple[str, int]]:
        """The (name, version) pairs to load: wanted, not held, not loading, not failed already."""
        wanted = []
        for name, d in desired.models.items():
            for version in d.wanted_versions():
                key = (name, version)
                if not self.has(name, version) and key not in loading and key not in self.failed:
                    wanted.append(key)
        return wanted

    def add_loaded(self, name: str, version: int, model) -> None:
        """A freshly loaded, warmed-up version: staged until converge() decides to serve it."""
        self.staged.setdefault(name, {})[version] = model
        self.failed.pop((name, version), None)

    def add_failed(self, name: str, version: int, reason: str) -> None:
        self.failed[(name, version)] = reason

    def converge(self, desired: DesiredState) -> bool:
        """Switch and unload toward the desired state; True if anything a heartbeat shows changed."""
        before = self.describe()
        for name in list(self.serving) + list(self.staged):
            if name not in desired.models:  # undeployed
                self.serving.pop(name, None)
                self.staged.pop(name, None)
                self.default.pop(name, None)
        for name, d in desired.models.items():
            serving = self.serving.setdefault(name, {})
            staged = self.staged.setdefault(name, {})
            if d.version is not None and d.version in staged:  # the switch: new requests go to the new version
                serving[d.version] = staged.pop(d.version)
            canary = d.canary.version if d.canary is not None else None
            if canary is not None and canary in staged:  # a canary is served as soon as it is warm (never the
                serving[canary] = staged.pop(canary)  # default: the brokers send it its share, and pinned requests)
            if d.version in serving:
                self.default[name] = d.version
            elif serving and self.default.get(name) not in serving:
                self.default[name] = max(serving)
            keep = set(d.wanted_versions())
            for version in [v for v in serving if v not in keep and v != self.default.get(name)]:
                del serving[version]  # drained: running requests hold their own reference
            for version in [v for v in staged if v not in keep]:
                del staged[version]
            if not serving:
                self.serving.pop(name)
                self.default.pop(name, None)
            if not staged:
                self.staged.pop(name)
        self.failed = {
            k: v
            for k, v in self.failed.items()
            if k[0] in desired.models and k[1] in desired.models[k[0]].wanted_versions()
        }
        return self.describe() != before

    def describe(self) -> dict:
        """The heartbeat fields: models (served), staged, failed."""
        return {
            "models": [
                {"name": n, "version": v, "default": v == self.default.get(n)}
                for n, vs in self.serving.items()
                for v in sorted(vs)
            ],
            "staged": [{"name": n, "version": v} for n, vs in self.staged.items() for v in sorted(vs)],
            "failed": [{"name": n, "version": v, "error": e} for (n, v), e in sorted(self.failed.items())],
        }

    def capacity_needs(self, capacity: int) -> tuple[int, dict[str, int]]:
        """(requests the broker may keep at this agent at once, the same per model).

        In all: the configured capacity, or enough to keep every copy of the most demanding model busy with two
        batches each (one running, one filling; a batch of one when it does not batch), whichever is more. Per
        model: two batches for every copy of that model, or the configured capacity if more. Sized per model, so a
        model that does not batch is not given the slots a batching one needs: the broker then cannot pile up
        dozens of one model's requests on an agent that may stop making progress."""
        needs = [
            2 * max(m.config.max_batch_size, 1) * m.config.instances
            for m in self.loaded_models()
            if m.config.max_batch_size > 1 or m.config.instances > 1
        ]
        sizes: dict[str, int] = {}
        for m in self.loaded_models():
            need = max(capacity, 2 * max(m.config.max_batch_size, 1) * m.config.instances)
            sizes[m.name] = max(sizes.get(m.name, 0), need)
        return max([capacity, *needs]), sizes

    def model_info(self) -> dict:
        """The heartbeat's `model_info`: what runs for each version held (served or staged), and what it cost."""
        info: dict = {}
        for table in (self.serving, self.staged):
            for name, versions in table.items():
                for version, model in versions.items():
                    info.setdefault(name, {})[str(version)] = model.info()
        return info

    def loaded_models(self):
        for versions in self.serving.values():
            yield from versions.values()
