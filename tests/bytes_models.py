"""An image classifier served from JPEG bytes (issue 22): a small CNN, an exported preprocess (resize to a fixed
size, normalise) and an exported postprocess (softmax, top-1), each a torch.export program with random weights, and
the config that decodes the BYTES input. Shared by tests/test_bytes.py and tests/test_bytes_cluster.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIDE = 32  # preprocess resizes every image to SIDE x SIDE
CLASSES = 10
CONFIG = {
    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [
        {"name": "class", "datatype": "INT64", "shape": [-1, 1]},
        {"name": "score", "datatype": "FP32", "shape": [-1, 1]},
    ],
    "max_batch_size": 8,
    "decode": {"image": {"format": "image", "channels": 3, "max_pixels": 4096 * 4096}},
}


class Pre(torch.nn.Module):
    """uint8 [H, W, 3] -> float [1, 3, SIDE, SIDE], normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(2, 0, 1).unsqueeze(0).float() / 255.0
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(16, CLASSES)
        with torch.no_grad():
            self.fc.weight.mul_(40)  # random weights, scaled so that different images get different classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class Post(torch.nn.Module):
    """logits [N, CLASSES] -> (class INT64 [N, 1], score FP32 [N, 1])."""

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, index = torch.softmax(logits, dim=1).topk(1, dim=1)
        return index, score


def modules() -> tuple[Pre, Net, Post]:
    torch.manual_seed(0)
    return Pre().eval(), Net().eval(), Post().eval()


def export_all(folder: Path) -> dict[str, Path]:
    """preprocess.pt2, model.pt2 and postprocess.pt2 in `folder` (dynamic image size, dynamic batch)."""
    pre, net, post = modules()
    h, w = torch.export.Dim("h", min=2, max=8192), torch.export.Dim("w", min=2, max=8192)
    batch = torch.export.Dim("batch", min=1, max=64)
    paths = {}
    with torch.no_grad():
        programs = {
            "preprocess.pt2": torch.export.export(
                pre, (torch.zeros(20, 30, 3, dtype=torch.uint8),), dynamic_shapes=({0: h, 1: w},)
            ),
            "model.pt2": torch.export.export(net, (torch.zeros(2, 3, SIDE, SIDE),), dynamic_shapes=({0: batch},)),
            "postprocess.pt2": torch.export.export(post, (torch.zeros(2, CLASSES),), dynamic_shapes=({0: batch},)),
        }
    for name, program in programs.items():
        paths[name] = folder / name
        torch.export.save(program, paths[name])
    return paths


def publish_classifier(share: Path, programs: dict[str, Path]) -> int:
    """The classifier (model, preprocess and postprocess programs from export_all) published on `share`."""
    from cluster.publish import publish_version

    extra = {k: v for k, v in programs.items() if k != "model.pt2"}
    return publish_version(share, "classifier", programs["model.pt2"], CONFIG, programs=extra)


def reference(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The same pipeline run directly (eager modules): (class [N, 1], score [N, 1]) for decoded uint8 images."""
    pre, net, post = modules()
    with torch.no_grad():
        x = torch.cat([pre(torch.from_numpy(image)) for image in images])
        index, score = post(net(x))
    return index.numpy(), score.numpy()


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=90) if fmt == "JPEG" else Image.fromarray(array).save(
        buffer, format=fmt
    )
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def sample_images(n: int = 3, seed: int = 0) -> list[bytes]:
    """JPEGs of different sizes with some structure (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hgt, wid = 24 + 13 * i, 40 + 7 * i
        yy, xx = np.mgrid[0:hgt, 0:wid]
        tint = rng.integers(0, 256, 3)
        base = np.stack([xx * tint[0] // wid, yy * tint[1] // hgt, (xx + yy) * tint[2] // (wid + hgt)], axis=-1)
        noisy = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
        out.append(encode(noisy))
    return out


def bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header says side x side (grey), its data a few KiB of compressed zeros: never to be decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()  # a few rows are enough
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
