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


# ---- canary test models (issue 21): versions of one model that answer alike, fail, run slower or drift ----------

CANARY_FLOATS = 4  # x is [N, CANARY_FLOATS]; a load generator puts a counter in x[:, 0]


def canary_config(name: str, batching: bool = True) -> dict:
    """config.json of a Scaled model: x FP32 [N, F] in, y FP32 [N, F] out; dynamic batching (up to 8, 1 ms) or none."""
    return {
        "name": name,
        "platform": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
        "max_batch_size": 8 if batching else 0,
        "max_queue_delay_us": 1000 if batching else 0,
        "instances": 1,
    }


class Scaled(torch.nn.Module):
    """y = x * scale, deterministic, after `rounds` rounds of Slow's small matmul (a fixed cost per forward pass, so
    per batch). fail_every > 0: raises for a batch holding a row whose x[i, 0] is a non-zero multiple of it (a load
    generator that counts up makes 1/fail_every of its requests fail; the agent runs a failed batch's requests
    alone, and the warm-up's zeros pass)."""

    def __init__(self, scale: float = 2.0, rounds: int = 0, fail_every: int = 0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.rounds = int(rounds)
        self.fail_every = int(fail_every)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_every > 0:
            k = x[:, 0].to(torch.int64)
            if bool(((k != 0) & (k % self.fail_every == 0)).any()):
                raise RuntimeError("canary test model: this input fails on purpose")
        w = torch.full((64, 64), 0.001)
        y = torch.ones(1, 64)
        for _ in range(self.rounds):
            y = torch.tanh(y @ w)
        return x * self.scale + y[0, 0] * 0.0


def publish_canary_versions(share: Path, name: str, modules: list, batching: bool = True) -> list[int]:
    """Publish each module in turn as the next version of `name` (v1 first): the versions."""
    return [_publish_scripted(share, name, m, canary_config(name, batching)) for m in modules]


def rounds_for_ms(ms: float) -> int:
    """Rounds of Scaled (Slow's) for a forward pass of about `ms` on one torch thread here."""
    return max(1, int(slow_rounds_per_second() * ms / 1e3))
