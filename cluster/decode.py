"""The built-in decode step of a BYTES input (config `decode`): an encoded image to a uint8 [H, W, C] array.

Torch-free, with Pillow. JPEG and PNG only (the formats are told apart by their signatures, never by a guess across
Pillow's many plugins), and the image's width x height is read from its header and refused past `max_pixels` before
a single pixel is decoded, so a small file that would inflate to gigabytes (a decompression bomb) costs nothing.
Every refusal is a DecodeError naming the input and element; the agent answers it as a bad request.
"""

from __future__ import annotations

import io

import numpy as np

from cluster.model_config import InputError

SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


class DecodeError(InputError):
    """An element that is not a JPEG or PNG image this model may take (the client's fault: BAD_REQUEST)."""


def _pillow():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is an install requirement
        raise DecodeError("this agent cannot decode images: Pillow is not installed (pip install Pillow)") from None
    return Image


def image_format(data: bytes) -> str | None:
    """'JPEG' or 'PNG' from the first bytes, None for anything else."""
    for signature, fmt in SIGNATURES.items():
        if data[: len(signature)] == signature:
            return fmt
    return None


def decode_image(data: bytes, channels: int, max_pixels: int, what: str = "image") -> np.ndarray:
    """A JPEG or PNG as uint8 [H, W, channels] (1: grey, 3: RGB); DecodeError for anything else, for an image over
    `max_pixels` (checked on the header, before decoding) and for a corrupt or truncated file."""
    data = bytes(data)
    fmt = image_format(data)
    if fmt is None:
        raise DecodeError(f"{what}: not a JPEG or PNG image ({len(data)} bytes, starting {data[:8]!r})")
    image_module = _pillow()
    try:
        with image_module.open(io.BytesIO(data), formats=[fmt]) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise DecodeError(
                    f"{what}: {fmt} of {width} x {height} = {width * height} pixels is over this input's limit of "
                    f"{max_pixels} pixels (decode max_pixels); refused before decoding"
                )
            if width == 0 or height == 0:
                raise DecodeError(f"{what}: {fmt} of {width} x {height} pixels is empty")
            image.load()
            converted = image.convert("L" if channels == 1 else "RGB")
    except DecodeError:
        raise
    except image_module.DecompressionBombError as exc:  # Pillow's own bound, met first by a huge header
        raise DecodeError(
            f"{what}: {fmt} refused before decoding ({exc}); this input's limit is {max_pixels} pixels"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DecodeError(f"{what}: cannot decode this {fmt}: {exc}") from None
    array = np.asarray(converted, dtype=np.uint8)
    return array.reshape(height, width, channels)


def tiny_image(channels: int, size: int = 16) -> bytes:
    """A small valid PNG (grey, or RGB), for a decoded input's warm-up."""
    image_module = _pillow()
    buffer = io.BytesIO()
    mode = "L" if channels == 1 else "RGB"
    image_module.new(mode, (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()
