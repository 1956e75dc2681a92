"""The benchmarks' own models and shares: `echo` (the demo model, no digits training), an MLP whose single-sample
forward pass is slow enough for batching to matter, and `Work`, whose cost is a number of iterations whatever the
input (the routing benchmark's slow agent serves a 10x dearer copy)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

MLP_WIDTH = 2048
MLP_LAYERS = 4
WORK_WIDTH = 512


def make_echo_share(share: Path) -> Path:
    """A share with only `echo` (no digits training); returns its model file."""
    import torch

    from cluster.demo_models import ECHO_CONFIG, make_echo
    from cluster.publish import publish_version

    path = share.parent / "echo.pt"
    torch.jit.save(make_echo(), str(path))
    publish_version(share, "echo", path, config=ECHO_CONFIG, version=1)
    return share / "models" / "echo" / "1" / "model.pt"


def tensor_config(name: str, width: int, max_batch: int = 0, delay_us: int = 0) -> dict:
    """config.json for a model taking x FP32 [-1, width] to y FP32 [-1, width]."""
    return {
        "name": name,
        "platform": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, width]}],
        "max_batch_size": max_batch,
        "max_queue_delay_us": delay_us,
        "instances": 1,
    }


def build_mlp(path: Path):
    """MLP_LAYERS x (Linear MLP_WIDTH x MLP_WIDTH, ReLU), seeded, scripted and saved to `path`."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = []
        for _ in range(MLP_LAYERS):
            layers += [nn.Linear(MLP_WIDTH, MLP_WIDTH), nn.ReLU()]
        module = torch.jit.script(nn.Sequential(*layers).eval())
    torch.jit.save(module, str(path))
    return module


def build_work(path: Path, iters: int):
    """A TorchScript model whose cost is `iters` small matrix-vector products, whatever the input."""
    import torch

    source = f"""
import torch
class Work(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range({int(iters)}):
            h = torch.tanh(h @ self.w)
        return h
"""
    module_path = path.parent / f"work_{iters}.py"  # torch.jit.script reads the source of the class
    module_path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"work_{iters}", module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(WORK_WIDTH, WORK_WIDTH, generator=g) / WORK_WIDTH**0.5
    scripted = torch.jit.script(mod.Work(w).eval())
    torch.jit.save(scripted, str(path))
    return scripted


def time_forward(module, x, repeats: int) -> float:
    """Median seconds of one forward pass, one torch thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(3):
                module(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - t)
        return float(np.median(times))
    finally:
        torch.set_num_threads(before)
