"""The two models that ship with the project, rebuilt from source rather than shipped as binaries.

digits: a small CNN on the 8x8 handwritten digits of UCI's optdigits (the copy scikit-learn ships, packaged in
cluster/data/ with its licence: no scikit-learn needed), trained here in a few seconds, so a fresh checkout (and CI)
has a real model to serve without downloading weights. echo: returns its input, for testing the bus without a
model's cost. Both are built deterministically (fixed seed, one thread), so rebuilding gives the same model
(byte-identical TorchScript on the same machine) and accuracy numbers are reproducible.

    python3 -m cluster.demo_models SHARE_DIR
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import tempfile
import time
from importlib import resources

import numpy as np
import torch
from torch import nn

from cluster.publish import publish_version
from cluster.repository import ModelRepository

SLOW_CONFIG = {
    "name": "slow",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}, {"name": "n", "datatype": "INT64", "shape": [1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
}


class Slow(torch.nn.Module):
    """Echoes x after n rounds of a small matmul: a forward pass whose length the caller picks (n). Not a demo model:
    the tests and bench/overload.py use it for slow models."""

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        w = torch.full((64, 64), 0.001)
        y = torch.ones(1, 64)
        for _ in range(int(n[0].item())):
            y = torch.tanh(y @ w)
        return x + y[0, 0] * 0.0


BIG_CONFIG = {
    "name": "big",
    "inputs": [{"name": "n", "datatype": "INT64", "shape": [1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, -1]}],
}


class Big(torch.nn.Module):
    """Answers n FP32 ones (4n bytes) whatever it is asked: a model with big replies for a small request. Not a demo
    model: the tests and bench/slow_reader.py use it for clients that do not read their replies."""

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, int(n[0].item()))


DIGITS_CONFIG = {
    "name": "digits",
    "platform": "torchscript",
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}],
    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
    "max_batch_size": 32,  # rows in a forward pass; a request of more (say the 360 test images) runs in chunks
    "oversize": "split",
    "max_queue_delay_us": 500,
    "instances": 1,
}

ECHO_CONFIG = {
    "name": "echo",
    "platform": "torchscript",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
    "max_batch_size": 0,
    "max_queue_delay_us": 0,
    "instances": 1,
}

TEST_SIZE = 360


def _data_file(name: str):
    """A file of cluster/data/, found in the source tree and in an installed package alike (setup.py package_data)."""
    return resources.files("cluster").joinpath("data", name)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); the 360-image held-out split is fixed so accuracy claims are comparable.

    The arrays scikit-learn's load_digits and train_test_split(test_size=360, random_state=0, stratify=y) give, read
    with numpy alone: the split is stored as row numbers (digits_split.json, written by tests/test_digits_data.py)
    rather than redone, so it cannot move with a scikit-learn or numpy release."""
    with _data_file("digits.csv.gz").open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)  # a row: 64 pixels (0-16), then the label
    rows = json.loads(_data_file("digits_split.json").read_text(encoding="utf-8"))
    train, test = np.asarray(rows["train"], dtype=np.intp), np.asarray(rows["test"], dtype=np.intp)
    if table.shape != (1797, 65) or len(test) != TEST_SIZE or sorted([*train, *test]) != list(range(len(table))):
        raise ValueError(f"cluster/data: digits data {table.shape} or its split does not match; reinstall the package")
    x = table[:, :64].reshape(-1, 8, 8).astype(np.float32)  # [1797, 8, 8], pixel values 0-16
    y = table[:, 64]
    return x[train], y[train], x[test], y[test]


class DigitsNet(nn.Module):
    """Raw 0-16 pixels in, probabilities out: clients send the data set's values as they are."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((image / 16.0).unsqueeze(1)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image), dim=1)


class Echo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _torch_threads(n: int):
    """Use n intra-op threads for a while: the thread count is process-wide, so put it back for the rest of the app."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_digits(seed: int = 0, epochs: int = 20, batch_size: int = 32) -> torch.jit.ScriptModule:
    """Train the digits CNN; one thread and a forked RNG make it reproducible without disturbing the caller's RNG."""
    x_train, y_train, _, _ = digits_split()
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    with _torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = DigitsNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                loss = nn.functional.cross_entropy(model.logits(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
        model.eval()
        return torch.jit.script(model)


def make_echo() -> torch.jit.ScriptModule:
    return torch.jit.script(Echo().eval())


DEMO_MODELS = (("digits", train_digits, DIGITS_CONFIG), ("echo", make_echo, ECHO_CONFIG))


def write_demo_models(share_dir: str | os.PathLike, digits_file: str | os.PathLike | None = None) -> list[str]:
    """Publish each demo model as version 1 unless the share already has a version of it (safe to call at every
    start-up: digits is only trained when it is missing). `digits_file`: a digits model trained before (train_digits
    then torch.jit.save) to publish instead of training one again."""
    repo = ModelRepository(share_dir)
    written = []
    for name, build, config in DEMO_MODELS:
        if repo.versions(name):
            continue
        if name == "digits" and digits_file is not None:
            publish_version(share_dir, name, digits_file, config=config, version=1)
        else:
            with tempfile.TemporaryDirectory(prefix=f"cluster-{name}-") as tmp:
                path = os.path.join(tmp, "model.pt")
                torch.jit.save(build(), path)
                publish_version(share_dir, name, path, config=config, version=1)
        written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python3 -m cluster.demo_models SHARE_DIR", file=sys.stderr)
        return 2
    share = argv[0]
    started = time.perf_counter()
    written = write_demo_models(share)
    repo = ModelRepository(share)
    if written:
        for name in written:
            print(f"wrote {name} version {repo.latest_version(name)} to {repo.models_dir / name}")
        print(f"done in {time.perf_counter() - started:.1f} s")
    else:
        print(f"nothing to write: {', '.join(n for n, _, _ in DEMO_MODELS)} already in {repo.models_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
