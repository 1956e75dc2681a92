"""Extra TorchScript models for tests, published into a share the way `cluster deploy` does."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cluster.demo_models import BIG_CONFIG, SLOW_CONFIG, Big, Slow  # noqa: F401  (re-exported for the tests)
from cluster.publish import publish_version


def publish_slow(share: Path) -> int:
    return _publish_scripted(share, "slow", Slow(), SLOW_CONFIG)


def publish_big(share: Path) -> int:
    return _publish_scripted(share, "big", Big(), BIG_CONFIG)


def _publish_scripted(share: Path, name: str, module: torch.nn.Module, config: dict) -> int:
    """Publish `module`, scripted, as the next version of `name` on the share."""
    path = Path(share) / f"{name}.pt"
    torch.jit.script(module).save(str(path))
    try:
        return publish_version(share, name, path, config)
    finally:
        path.unlink()


def slow_rounds_per_second() -> float:
    """How many rounds of Slow one CPU thread does per second here (the agents run torch with one thread)."""
    model = torch.jit.script(Slow())
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.zeros(1, 1)
        model(x, torch.tensor([1000]))
        start = time.perf_counter()
        model(x, torch.tensor([200_000]))
        return 200_000 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
