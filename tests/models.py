"""Extra TorchScript models for tests, published into a share the way `cluster deploy` does."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cluster.repository import publish_version

SLOW_CONFIG = {
    "name": "slow",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}, {"name": "n", "datatype": "INT64", "shape": [1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
}


class Slow(torch.nn.Module):
    """Echoes x after n rounds of a small matmul: a forward pass whose length the caller picks (n)."""

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        w = torch.full((64, 64), 0.001)
        y = torch.ones(1, 64)
        for _ in range(int(n[0].item())):
            y = torch.tanh(y @ w)
        return x + y[0, 0] * 0.0


def publish_slow(share: Path) -> int:
    path = Path(share) / "slow.pt"
    torch.jit.script(Slow()).save(str(path))
    try:
        return publish_version(share, "slow", path, SLOW_CONFIG)
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
