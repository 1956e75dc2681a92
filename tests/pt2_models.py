"""The two models of issue 22's tests and bench (random weights, built here): a torchvision-style CNN
(conv/bn/relu/pool/linear) and a small transformer encoder (torch.nn.TransformerEncoder, batch_first), with their
configs and an export with a dynamic batch dimension."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CNN_CONFIG = {
    "max_batch_size": 32,
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}
ENCODER_CONFIG = {
    "max_batch_size": 32,
    "inputs": [{"name": "tokens", "datatype": "FP32", "shape": [-1, 16, 64]}],
    "outputs": [{"name": "pooled", "datatype": "FP32", "shape": [-1, 64]}],
}


class Cnn(nn.Module):
    """A small ResNet-like stem and two conv blocks: conv, batch norm, relu, pooling, then a linear head."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(128, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


class Encoder(nn.Module):
    """Two transformer encoder layers (batch_first), mean-pooled over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens).mean(1)


def make(kind: str, seed: int = 0) -> tuple[nn.Module, dict, torch.Tensor]:
    """(model in eval mode with random weights, config, a sample input of batch 3)."""
    torch.manual_seed(seed)
    if kind == "cnn":
        model, config = Cnn(), CNN_CONFIG
    else:
        model, config = Encoder(), ENCODER_CONFIG
    model.eval()
    with torch.no_grad():  # batch norm statistics that are not the identity, so fusing them is exercised
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    shape = config["inputs"][0]["shape"][1:]
    return model, config, torch.randn(3, *shape)


def export(model: nn.Module, sample: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    """torch.export with a dynamic batch dimension (1..1024), saved with torch.export.save."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    program = torch.export.export(model, (sample,), dynamic_shapes=shapes)
    torch.export.save(program, path)
    return path


def script(model: nn.Module, sample: torch.Tensor, path: Path) -> Path:
    """TorchScript by tracing (the encoder's graphs differ across trace checks: its eval fast path; answers agree)."""
    torch.jit.save(torch.jit.trace(model, sample, check_trace=False), str(path))
    return path
