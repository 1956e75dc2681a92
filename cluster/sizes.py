"""Sizes in bytes as people write them (`--memory-budget 8Gi`) and as messages show them (3.0 GiB)."""

from __future__ import annotations

import math
import os
import re

_PREFIXES = "KMGT"
_UNITS = (
    {"": 1}
    | {p: 1000 ** (i + 1) for i, p in enumerate(_PREFIXES)}
    | {p + "I": 1024 ** (i + 1) for i, p in enumerate(_PREFIXES)}
)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?)?B?\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'8G' (10**9), '8Gi' or '8GiB' (2**30), '512Mi', '1500000': bytes. ValueError with the accepted forms."""
    match = _SIZE.fullmatch(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with K, M, G, T (or Ki, Mi, Gi, Ti)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def is_size(text) -> bool:
    try:
        parse_bytes(text)
    except ValueError:
        return False
    return True


def format_bytes(n: float | None) -> str:
    """3221225472 -> '3.0 GiB'; None or infinity (no budget) -> 'unlimited'."""
    if n is None or math.isinf(n):
        return "unlimited"
    for i in reversed(range(len(_PREFIXES))):
        unit, size = f"{_PREFIXES[i]}iB", 1024 ** (i + 1)
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def host_memory() -> int:
    """The host's RAM in bytes (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
