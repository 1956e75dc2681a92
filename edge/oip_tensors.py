"""One tensor of an OIP request or response: its datatype, shape and data (JSON, a span of JSON text, or raw
little-endian bytes) checked strictly and turned into numpy, and an output back into JSON data or raw bytes. Every
refusal is an `InvalidRequest` naming the input: JSON types (BOOL takes true/false, integer types take integers, FP
types take numbers), integer ranges, float ranges (a finite value that does not fit FP16/FP32 is refused, not turned
into inf), element counts against the shape, byte counts against shape x item size. Shared by REST (edge/oip.py)
and gRPC (edge/grpc_service.py).

BYTES: a numpy object array of `bytes`. In JSON each element is a string (Triton's JSON form, sent as its UTF-8
bytes); in binary, Triton's layout (each element a 4-byte little-endian length, then its bytes).
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import numpy as np

from cluster.codec import bytes_array, bytes_frame
from cluster.config import MAX_DIM, MAX_DIMS
from cluster.protocol import DATATYPES, ProtocolError
from edge import oip_json
from edge.oip_json import InvalidRequest

SUPPORTED_DATATYPES = tuple(DATATYPES)  # BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES

_INT_TYPES = frozenset({int})
_FLOAT_TYPES = frozenset({int, float})
_BOOL_TYPES = frozenset({bool})
_JSON_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


def check_datatype(name: str, datatype: Any) -> np.dtype:
    """The numpy dtype (little-endian) for an OIP datatype name the bus carries; InvalidRequest otherwise."""
    if not isinstance(datatype, str):
        raise InvalidRequest(f"input '{name}': 'datatype' must be a string such as \"FP32\"")
    if datatype not in DATATYPES:
        if datatype == "BF16":
            raise InvalidRequest(
                f"input '{name}': datatype {datatype} is not supported by this cluster; "
                f"use one of {', '.join(SUPPORTED_DATATYPES)}"
            )
        raise InvalidRequest(
            f"input '{name}': unknown datatype {datatype[:40]!r}; use one of {', '.join(SUPPORTED_DATATYPES)}"
        )
    return DATATYPES[datatype] if datatype == "BYTES" else DATATYPES[datatype].newbyteorder("<")


def check_shape(name: str, shape: Any) -> list[int]:
    """A request shape: a list of at most MAX_DIMS non-negative integers (-1 is for metadata, not for data)."""
    if not isinstance(shape, list):
        raise InvalidRequest(f"input '{name}': 'shape' must be an array of integers")
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"input '{name}': shape has {len(shape)} dimensions, the limit is {MAX_DIMS}")
    for d in shape:
        if type(d) is not int:
            raise InvalidRequest(f"input '{name}': shape {_short(shape)} must hold integers only")
        if d < 0:
            raise InvalidRequest(
                f"input '{name}': shape {_short(shape)} has a negative dimension; a request gives actual sizes"
            )
        if d >= MAX_DIM:
            raise InvalidRequest(f"input '{name}': dimension {d} is too large")
    return shape


def _flatten(name: str, data: Any) -> list:
    """Row-major elements of flat or regularly nested JSON data; InvalidRequest for ragged or mixed nesting."""
    if not isinstance(data, list):
        raise InvalidRequest(f"input '{name}': 'data' must be an array (flat or nested), not {_json_type(data)}")
    level = data
    while level and type(level[0]) is list:
        if any(type(v) is not list for v in level):
            raise InvalidRequest(f"input '{name}': 'data' mixes arrays and scalars at the same depth")
        lengths = set(map(len, level))
        if len(lengths) != 1:
            raise InvalidRequest(f"input '{name}': nested 'data' is ragged (rows of lengths {sorted(lengths)[:5]})")
        level = list(chain.from_iterable(level))
    return level


def tensor_from_json(name: str, datatype: Any, shape: Any, data: Any) -> np.ndarray:
    """A numpy array from an input's JSON `data`, converted strictly to `datatype` and reshaped to `shape`."""
    dtype = check_datatype(name, datatype)
    shape = check_shape(name, shape)
    flat = _flatten(name, data)
    count = math.prod(shape)
    if len(flat) != count:
        raise InvalidRequest(f"input '{name}': shape {shape} needs {count} elements, 'data' has {len(flat)}")
    if datatype == "BYTES":
        return _bytes_from_json(name, flat).reshape(shape)
    if not flat:
        return np.zeros(shape, dtype=dtype)
    kinds = _check_kinds(name, datatype, set(map(type, flat)))
    if count <= oip_json.CHUNK_ELEMENTS:
        return _convert(name, datatype, dtype, flat, kinds).reshape(shape)
    # large: converted a chunk at a time (one float64 chunk at a time, not a float64 copy of it all)
    array = np.empty(count, dtype=dtype)
    if kinds is _INT_TYPES:
        _check_int_range(name, datatype, dtype, min(flat), max(flat))
    for start in range(0, count, oip_json.CHUNK_ELEMENTS):
        array[start : start + oip_json.CHUNK_ELEMENTS] = _convert(
            name, datatype, dtype, flat[start : start + oip_json.CHUNK_ELEMENTS]
        )
    return array.reshape(shape)


def _bytes_from_json(name: str, flat: list) -> np.ndarray:
    """BYTES elements given in JSON: strings, each sent as its UTF-8 bytes."""
    array = np.empty(len(flat), dtype=object)
    for i, value in enumerate(flat):
        if type(value) is not str:
            raise InvalidRequest(f"input '{name}': BYTES data must be strings, got {_json_type(value)}")
        array[i] = value.encode()
    return array


def _allowed_kinds(datatype: str) -> frozenset:
    if datatype == "BOOL":
        return _BOOL_TYPES
    if datatype.startswith(("INT", "UINT")):
        return _INT_TYPES
    return _FLOAT_TYPES


def _check_kinds(name: str, datatype: str, kinds: set) -> frozenset:
    """The JSON types allowed for `datatype`; InvalidRequest when `kinds` (the Python types met) has others."""
    allowed = _allowed_kinds(datatype)
    if not kinds <= allowed:
        wrong = sorted(_json_type_name(k) for k in kinds - allowed)
        want = {_BOOL_TYPES: "true/false", _INT_TYPES: "integers", _FLOAT_TYPES: "numbers"}[allowed]
        raise InvalidRequest(f"input '{name}': {datatype} data must be {want}, got {' and '.join(wrong)}")
    return allowed


def _check_int_range(name: str, datatype: str, dtype: np.dtype, low: int, high: int) -> None:
    info = np.iinfo(dtype)
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise InvalidRequest(
            f"input '{name}': value {_short(bad)} is out of range for {datatype} [{info.min}, {info.max}]"
        )


def _convert(name: str, datatype: str, dtype: np.dtype, flat: list, kinds: frozenset | None = None) -> np.ndarray:
    """A flat, non-empty list of JSON scalars as a 1-D array of `dtype`, every value checked."""
    allowed = kinds or _check_kinds(name, datatype, set(map(type, flat)))
    if allowed is _INT_TYPES:
        _check_int_range(name, datatype, dtype, min(flat), max(flat))
        return np.array(flat, dtype=dtype)
    if allowed is _FLOAT_TYPES:
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:  # an integer literal too large for a double
            raise InvalidRequest(f"input '{name}': a value is out of range for {datatype}") from None
        return _narrow(name, datatype, dtype, wide)
    return np.array(flat, dtype=dtype)


def _narrow(name: str, datatype: str, dtype: np.dtype, wide: np.ndarray) -> np.ndarray:
    """float64 values as `dtype`, refusing non-finite values and values too large for it."""
    peak = float(np.abs(wide).max()) if wide.size else 0.0  # inf or nan if any value is (max keeps a nan)
    if not math.isfinite(peak):  # JSON has no inf/nan; a literal like 1e999 parses to inf
        raise InvalidRequest(f"input '{name}': a value is out of range for {datatype} (JSON numbers must be finite)")
    limit = _FLOAT_MAX[dtype.itemsize]
    if peak > limit:
        raise InvalidRequest(f"input '{name}': a value is out of range for {datatype} (largest magnitude {limit:g})")
    return wide.astype(dtype)


_FLOAT_MAX = {size: float(np.finfo(f"f{size}").max) for size in (2, 4, 8)}  # by item size: FP16, FP32, FP64


def tensor_from_json_span(name: str, datatype: Any, shape: Any, text: bytes, start: int, end: int) -> np.ndarray:
    """Like tensor_from_json, for `data` given as the bytes text[start:end] of a JSON array holding numbers only
    (found by number_spans): read CHUNK_BYTES (edge/oip_json.py) at a time with orjson straight into the array."""
    dtype = check_datatype(name, datatype)
    shape = check_shape(name, shape)
    if datatype == "BYTES":
        raise InvalidRequest(f"input '{name}': BYTES data must be strings, got numbers")
    count = math.prod(shape)
    have = text.count(b",", start, end) + 1  # the element count, if the array is valid JSON
    if have != count:
        for piece in oip_json.pieces(text, start + 1, end - 1):  # invalid JSON is said first, as the plain parse does
            oip_json.load_numbers(piece, exact_ints=False)
        raise InvalidRequest(f"input '{name}': shape {shape} needs {count} elements, 'data' has {have}")
    allowed = _allowed_kinds(datatype)
    array = np.empty(count, dtype=dtype)
    filled = 0
    for piece in oip_json.pieces(text, start + 1, end - 1):
        values = oip_json.load_numbers(piece, exact_ints=allowed is _INT_TYPES)
        if filled + len(values) > count:  # cannot happen with one value per comma; kept as a guard
            raise InvalidRequest(f"input '{name}': shape {shape} needs {count} elements, 'data' has more")
        # numbers only (the span holds nothing else): for FP types no need to look at every value's type
        kinds = _FLOAT_TYPES if allowed is _FLOAT_TYPES else None
        array[filled : filled + len(values)] = _convert(name, datatype, dtype, values, kinds)
        filled += len(values)
    if filled != count:
        raise InvalidRequest(f"input '{name}': shape {shape} needs {count} elements, 'data' has {filled}")
    return array.reshape(shape)


def tensor_from_binary(name: str, datatype: Any, shape: Any, raw: bytes | memoryview) -> np.ndarray:
    """A numpy array over an input's raw little-endian bytes (Triton's binary tensor extension)."""
    dtype = check_datatype(name, datatype)
    shape = check_shape(name, shape)
    if datatype == "BYTES":
        try:
            return bytes_array(name, raw, shape)
        except ProtocolError as exc:
            raise InvalidRequest(f"input '{name}': {str(exc).removeprefix(f'tensor {name!r}: ')}") from None
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise InvalidRequest(
            f"input '{name}': shape {shape} of {datatype} needs {needed} bytes, binary_data_size is {len(raw)}"
        )
    if datatype == "BOOL" and len(raw) and int(np.frombuffer(raw, dtype=np.uint8).max()) > 1:
        raise InvalidRequest(f"input '{name}': BOOL bytes must be 0 or 1")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_to_json(array: np.ndarray) -> list:
    """Flat row-major JSON data for an output (FP16 as numbers, BOOL as true/false, BYTES as strings)."""
    if array.dtype == object:
        return bytes_to_json("", array)
    return np.ascontiguousarray(array).ravel().tolist()


def bytes_to_json(name: str, array: np.ndarray) -> list[str]:
    """A BYTES output's elements as JSON strings (UTF-8); InvalidRequest for bytes that are not UTF-8 (which only
    the binary form can carry)."""
    try:
        return [bytes(v).decode() if not isinstance(v, str) else v for v in array.ravel()]
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"output '{name}' holds bytes that are not UTF-8 text, which JSON cannot carry; ask for it in binary "
            "(parameters.binary_data: true)"
        ) from None


def tensor_to_binary(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of an output, row-major; BYTES in Triton's length-prefixed layout."""
    if array.dtype == object:
        return bytes_frame("", array)  # as the bus carries it (str elements as UTF-8)
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


def _json_type(value: Any) -> str:
    return _json_type_name(type(value))


def _json_type_name(kind: type) -> str:
    return _JSON_TYPE_NAMES.get(kind, kind.__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
