"""Log-bucketed histograms: small, mergeable by adding counts, and good enough for ranks and quantiles.

Bucket i holds values in [BASE * R**i, BASE * R**(i+1)), R = 2**(1/8) (a bucket is 9% wide); values below BASE go to
bucket 0. A histogram is a dict {bucket: count}; on the wire a list of [bucket, count] pairs (msgpack maps with int
keys are refused by our decoder). Times are in seconds with BASE 1 us; shadow errors use ERROR_BASE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

R = 2 ** (1 / 8)
_LOG_R = math.log(R)
TIME_BASE = 1e-6  # seconds: service and compute times
ERROR_BASE = 1e-12  # shadow comparisons: relative errors (0 goes to bucket 0)
MAX_BUCKET = 1000  # a bucket index past this is malformed (1 us x R**1000 is far past any deadline)


def bucket(value: float, base: float = TIME_BASE) -> int:
    """The bucket of `value` (>= 0)."""
    if value <= base:
        return 0
    return min(MAX_BUCKET, int(math.log(value / base) / _LOG_R))


def lower(index: int, base: float = TIME_BASE) -> float:
    """The lowest value of bucket `index`."""
    return base * R**index


def middle(index: int, base: float = TIME_BASE) -> float:
    """A representative value of bucket `index` (its geometric middle)."""
    return base * R ** (index + 0.5)


def add(hist: dict[int, int], value: float, base: float = TIME_BASE) -> None:
    i = bucket(value, base)
    hist[i] = hist.get(i, 0) + 1


def merge(into: dict[int, int], other: Mapping[int, int]) -> dict[int, int]:
    for i, n in other.items():
        into[i] = into.get(i, 0) + n
    return into


def total(hist: Mapping[int, int]) -> int:
    return sum(hist.values())


def quantile_bucket(hist: Mapping[int, float], q: float) -> int | None:
    """The bucket of the q-quantile (0..1) of a histogram with (possibly fractional) counts; None when empty."""
    n = sum(hist.values())
    if n <= 0:
        return None
    seen = 0.0
    for i in sorted(hist):
        seen += hist[i]
        if seen >= q * n:
            return i
    return max(hist)


def quantile(hist: Mapping[int, float], q: float, base: float = TIME_BASE) -> float | None:
    """The q-quantile (0..1) as its bucket's middle; None for an empty histogram."""
    i = quantile_bucket(hist, q)
    return None if i is None else middle(i, base)


def to_wire(hist: Mapping[int, int]) -> list[list[int]]:
    return [[i, n] for i, n in sorted(hist.items()) if n]


def from_wire(pairs) -> dict[int, int]:
    """ValueError when malformed."""
    if not isinstance(pairs, list):
        raise ValueError("a histogram must be a list of [bucket, count] pairs")
    hist: dict[int, int] = {}
    for pair in pairs:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
            or not 0 <= pair[0] <= MAX_BUCKET
            or pair[1] < 0
        ):
            raise ValueError("a histogram must be a list of [bucket, count] pairs of ints")
        hist[pair[0]] = hist.get(pair[0], 0) + pair[1]
    return hist


def from_values(values: Iterable[float], base: float = TIME_BASE) -> dict[int, int]:
    hist: dict[int, int] = {}
    for v in values:
        add(hist, v, base)
    return hist
