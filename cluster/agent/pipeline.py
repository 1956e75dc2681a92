"""What runs around a model (issue 22): decode BYTES inputs, pre-process, the model, post-process.

The config's inputs and outputs are the client's view. For each input the config `decode`s (JPEG/PNG, with
cluster.decode), every element is decoded to a uint8 [H, W, C] tensor; a version's `preprocess.pt2` (an exported
program, checked and loaded like model.pt2) then runs once per decoded image (images may differ in size) and returns
that image's row(s), e.g. [1, 3, H', W'] float, concatenated into the model's batch. Without a decoded input,
preprocess.pt2 takes every input in the config's order and returns the model's arguments. Without preprocess.pt2,
decoded images must agree in size and are stacked to [N, H, W, C]. `postprocess.pt2` takes the model's outputs and
returns the outputs the config names. Only exported programs run: no Python from the share, ever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cluster.codec import to_torch
from cluster.config import DECODE_MAX_TOTAL_PIXELS
from cluster.decode import DecodeError, decode_image
from cluster.model_config import InputError, ModelConfig, RepositoryError
from cluster.repository import POSTPROCESS_FILE, PREPROCESS_FILE


def as_model_inputs(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Decoded request arrays as LoadedModel.infer takes them: torch tensors over the frames, BYTES as they are
    (numpy object arrays of bytes)."""
    return {name: a if a.dtype == object else to_torch(a) for name, a in arrays.items()}


def stack_rows(values: Sequence[Any]) -> Any:
    """Requests' inputs joined along the first dimension (a batch): tensors, or BYTES object arrays."""
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    return torch.cat(list(values))


def _values(result: Any) -> list:
    """A program's outputs as a list: one tensor, a tuple or list, or a dict's values."""
    if isinstance(result, (tuple, list)):
        return list(result)
    if isinstance(result, dict):
        return list(result.values())
    return [result]


class Pipeline:
    """The steps around one version's model: built at load, run by LoadedModel.infer for every request."""

    def __init__(self, config: ModelConfig, where: str, pre: list | None = None, post: list | None = None) -> None:
        self.config = config
        self.where = where
        self.decode = dict(config.decode or {})
        self.pre = pre or []  # one module per instance (the agent's threads run instances at once)
        self.post = post or []
        undecoded = [s.name for s in config.inputs if s.datatype == "BYTES" and s.name not in self.decode]
        if undecoded:
            raise RepositoryError(
                f"{where}: input '{undecoded[0]}' is BYTES with no 'decode' step in config.json; a torch program "
                "takes tensors only"
            )

    @classmethod
    def load(cls, config: ModelConfig, where: str, has_file: Callable[[str], bool], load: Callable[[str], Any], n: int):
        """With the version's preprocess.pt2 / postprocess.pt2 when it has them: `load(fname)` gives a module."""
        pre = [load(PREPROCESS_FILE) for _ in range(n)] if has_file(PREPROCESS_FILE) else None
        post = [load(POSTPROCESS_FILE) for _ in range(n)] if has_file(POSTPROCESS_FILE) else None
        return cls(config, where, pre, post)

    def model_args(self, values: list, device: str, instance: int = 0) -> list:
        """The model's positional arguments from the inputs' values (the config's order)."""
        if not self.decode and not self.pre:  # a plain model (the usual case): its inputs are its arguments
            return values if device == "cpu" else [value.to(device) for value in values]
        names = [s.name for s in self.config.inputs]
        decoded = {}
        budget = [DECODE_MAX_TOTAL_PIXELS]  # pixels left for this pass's images, every decoded input
        for name, value in zip(names, values):
            step = self.decode.get(name)
            if step is not None:
                decoded[name] = self._decode(name, value, step, budget)
        pre = self.pre[instance % len(self.pre)] if self.pre else None
        args = []
        for name, value in zip(names, values):
            if name in decoded:
                args.append(self._prepared(name, decoded[name], pre, device))
            elif isinstance(value, np.ndarray):
                raise InputError(f"input '{name}' is BYTES, which this model cannot take without a decode step")
            else:
                args.append(value if device == "cpu" else value.to(device))
        if pre is not None and not decoded:
            args = _values(pre(*args))
        return args

    def outputs(self, result: Any, instance: int = 0) -> Any:
        """The model's result, through postprocess.pt2 when the version has one."""
        if not self.post:
            return result
        return self.post[instance % len(self.post)](*_values(result))

    def _decode(self, name: str, value: np.ndarray, step: dict, budget: list[int]) -> list[torch.Tensor]:
        images = []
        for i, data in enumerate(value.ravel()):
            what = f"input '{name}' element {i}"
            array = decode_image(data, step["channels"], step["max_pixels"], what)
            budget[0] -= array.shape[0] * array.shape[1]
            if budget[0] < 0:  # each image under max_pixels, but together a bomb
                raise DecodeError(
                    f"{what}: the images of this request decode to more than {DECODE_MAX_TOTAL_PIXELS} pixels "
                    "in all; send fewer or smaller images per request"
                )
            images.append(torch.from_numpy(array))
        if not images:
            raise InputError(f"input '{name}' holds no image")
        return images

    def _prepared(self, name: str, images: list[torch.Tensor], pre: Any, device: str) -> torch.Tensor:
        """Decoded images as one model input: each through preprocess (its rows concatenated), else stacked."""
        if device != "cpu":
            images = [image.to(device) for image in images]
        if pre is None:
            sizes = {tuple(image.shape) for image in images}
            if len(sizes) > 1:
                raise InputError(
                    f"input '{name}': images of different sizes {sorted(sizes)[:3]} and the model has no "
                    f"{PREPROCESS_FILE} to bring them to one size"
                )
            return torch.stack(images)
        rows = []
        for image in images:
            out = pre(image)
            if isinstance(out, (tuple, list)) and len(out) == 1:
                out = out[0]
            if not isinstance(out, torch.Tensor) or out.dim() == 0:
                raise RepositoryError(f"{self.where}: {PREPROCESS_FILE} must return one tensor of rows per image")
            rows.append(out)
        try:
            return torch.cat(rows)
        except RuntimeError as exc:
            raise RepositoryError(
                f"{self.where}: {PREPROCESS_FILE} returned rows of different shapes {[list(r.shape) for r in rows][:3]}"
                f" for images of different sizes ({exc}); it must bring every image to one size"
            ) from None
