"""Extra TorchScript models for tests, published into a share the way `cluster deploy` does."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cluster.demo_models import BIG_CONFIG, SLOW_CONFIG, Big, Slow  # noqa: F401  (re-exported for the tests)
from cluster.repository import publish_version


def publish_slow(share: Path) -> int:
    path = Path(share) / "slow.pt"
    torch.jit.script(Slow()).save(str(path))
    try:
        return publish_version(share, "slow", path, SLOW_CONFIG)
    finally:
        path.unlink()


def publish_big(share: Path) -> int:
    path = Path(share) / "big.pt"
    torch.jit.script(Big()).save(str(path))
    try:
        return publish_version(share, "big", path, BIG_CONFIG)
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
