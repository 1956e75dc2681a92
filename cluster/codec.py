"""Tensors <-> raw frames. numpy on the client side, torch on the agent side; the bytes are never copied by Python.

A tensor travels as (meta, frame): meta = {name, datatype, shape} goes into the msgpack header, the frame is the
tensor's own C-ordered memory, handed to ZeroMQ as a buffer (send with copy=False). On receipt the array is a view
over the received frame's buffer (read-only, which is why the agent marks its inputs as not to be written to).

BYTES (strings, encoded images) is a numpy object array of `bytes` (str elements are sent as UTF-8, as
tritonclient does); its frame is Triton's layout (protocol.join_bytes / split_bytes), its elements copied out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cluster.protocol import DATATYPES, ProtocolError, frame_bytes, join_bytes, split_bytes

DATATYPE_OF_NUMPY = {v: k for k, v in DATATYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    """The Open Inference Protocol datatype name of a numpy array; ValueError if the bus cannot carry it."""
    if array.dtype.kind in "OSU":  # object (bytes/str elements), fixed-width bytes or str: BYTES
        return "BYTES"
    try:
        return DATATYPE_OF_NUMPY[array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype]
    except KeyError:
        raise ValueError(f"dtype {array.dtype} cannot travel on the bus") from None


def as_numpy(value: Any) -> np.ndarray:
    """A C-contiguous little-endian numpy array from a numpy array, a torch tensor or a nested list."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if not value.is_contiguous():
            value = value.contiguous()
        value = value.numpy()
    array = np.asarray(value)
    if array.dtype.kind in "SU" and not isinstance(value, np.ndarray):
        array = np.asarray(value, dtype=object)  # keep each element whole (numpy's "S" drops trailing NULs)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def encode_tensors(tensors: Mapping[str, Any]) -> tuple[list[dict], list]:
    """(metas, frames) for a name -> array mapping. Frames are the arrays' own buffers."""
    metas, frames = [], []
    for name, value in tensors.items():
        array = as_numpy(value)
        datatype = datatype_of(array)
        metas.append({"name": name, "datatype": datatype, "shape": list(array.shape)})
        if datatype == "BYTES":
            frames.append(bytes_frame(name, array))
        else:
            frames.append(memoryview(array).cast("B") if array.size else b"")
    return metas, frames


def bytes_frame(name: str, array: np.ndarray) -> bytes:
    """A BYTES tensor's frame: each element (bytes-like, or str sent as UTF-8) length-prefixed, row-major."""
    items = []
    for item in array.ravel():
        if isinstance(item, str):
            item = item.encode()
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            raise ValueError(f"tensor '{name}': a BYTES element must be bytes or str, not {type(item).__name__}")
        items.append(item)
    return join_bytes(items)


def bytes_array(name: str, raw, shape: Sequence[int]) -> np.ndarray:
    """An object array of `bytes` from a BYTES frame; ProtocolError if it does not hold exactly prod(shape)."""
    items = split_bytes(raw, math.prod(shape), f"tensor '{name}'")
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def decode_tensors(metas: Sequence[dict], frames: Sequence) -> dict[str, np.ndarray]:
    """name -> numpy view over each frame (BYTES: its elements, every length checked against the frame, ProtocolError
    if one does not fit). Call protocol.validate_tensor_metas first."""
    out = {}
    for meta, frame in zip(metas, frames):
        dtype = DATATYPES.get(meta["datatype"])
        if dtype is None:
            raise ProtocolError(f"tensor '{meta['name']}': unsupported datatype {meta['datatype']!r}")
        if meta["datatype"] == "BYTES":
            out[meta["name"]] = bytes_array(meta["name"], frame_bytes(frame), meta["shape"])
            continue
        out[meta["name"]] = np.frombuffer(frame_bytes(frame), dtype=dtype).reshape(meta["shape"])
    return out


# torch warns on every read-only array; filter that one message once (catch_warnings per call costs ~2 us and
# swaps the process-wide filter list, which is not thread-safe).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def to_torch(array: np.ndarray):
    """A torch tensor sharing the array's memory (read-only buffers included: the model must not write its input)."""
    import torch

    return torch.from_numpy(array)
