"""Extra TorchScript models for tests, published into a share the way `cluster deploy` does."""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.demo_models import BIG_CONFIG, SLOW_CONFIG, Big, Slow  # noqa: F401  (re-exported for the tests)
from cluster.repository import publish_version


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
