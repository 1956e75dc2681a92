"""Open Inference Protocol (KServe V2) JSON <-> numpy, and Triton's binary tensor extension. Pure functions, no I/O.

Request body (the Open Inference Protocol's inference request: kserve/open-inference-protocol,
specification/protocol/inference_rest.md; the binary extension: triton-inference-server/server,
docs/protocol/extension_binary_data.md):

    {"id": "42", "parameters": {...}, "inputs": [{"name", "shape", "datatype", "data" | parameters.binary_data_size}],
     "outputs": [{"name", "parameters": {"binary_data": bool}}]}

With the binary extension the HTTP body is that JSON followed by the raw little-endian bytes of every input that
declares `parameters.binary_data_size`, in input order, and the `Inference-Header-Content-Length` header gives the
length of the JSON part. Responses use the same layout for the outputs asked for in binary (per output
`parameters.binary_data`, else the request's `parameters.binary_data_output`).

Everything a client sends is checked before it reaches the bus, and every refusal is an `InvalidRequest` whose
message names the offending input: JSON types (BOOL takes true/false, integer types take integers, FP types take
numbers), integer ranges, float ranges (a finite value that does not fit FP16/FP32 is refused, not turned into inf),
element counts against the shape, byte counts against shape x item size.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson

from cluster.codec import datatype_of
from cluster.config import MAX_DIMS, MAX_TENSORS
from cluster.protocol import DATATYPES

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIM = 2**40  # the bus refuses larger dimensions (protocol.validate_tensor_metas)
MAX_NAME = 256
MAX_TIMEOUT_US = 24 * 3600 * 1_000_000  # the broker's longest request deadline
SUPPORTED_DATATYPES = tuple(DATATYPES)  # BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64

# Large JSON (issue 11): a request's `data` array of plain numbers at least SPAN_MIN bytes long is cut out of the
# JSON before it is parsed, then read CHUNK_BYTES at a time with orjson straight into the tensor, so no Python list
# of the whole data ever exists and the GIL is let go between chunks; the rest of the JSON (small) is parsed with the
# standard library, as before. Outputs with more than CHUNK_ELEMENTS elements are written to JSON with orjson in
# chunks of that many elements (no .tolist()).
SPAN_MIN = 64 * 1024
CHUNK_BYTES = 1024 * 1024
CHUNK_ELEMENTS = 256 * 1024
MAX_BRACKETS_SCANNED = 4096  # past this many '[' the search for number arrays gives up (the plain parse follows)
_NUMBER_BYTES = b"0123456789eE.+-,\x20\t\n\r"  # the bytes of a JSON array of numbers, between its brackets
_NOT_NUMBER = re.compile(rb"[^0-9eE.+\-,\x20\t\n\r]")  # a byte that cannot be in one
_EXPONENT_OR_POINT = re.compile(rb"[.eE]")
LONG_DIGITS = 19  # an integer of fewer digits fits 64 bits (signed or not), so orjson reads it exactly
# digits as "0", every other byte as " ": a run of LONG_DIGITS digits is then a substring search (a regex for it
# costs more than orjson's whole parse)
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_RUN = b"0" * LONG_DIGITS
_NUMPY = orjson.OPT_SERIALIZE_NUMPY

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


class InvalidRequest(ValueError):
    """The request cannot be served as sent (HTTP 400). The message says what is wrong, and with which input."""


@dataclass
class InferRequest:
    """A parsed, validated inference request, ready for AsyncClient.infer."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    outputs: list[str] | None = None  # the outputs asked for, in order; None = all of the model's outputs
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # per-output `parameters.binary_data`
    binary_default: bool = False  # the request's `parameters.binary_data_output`
    timeout: float | None = None  # seconds, from Triton's `parameters.timeout` (microseconds)

    def wants_binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_default)


# ---------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------


def check_datatype(name: str, datatype: Any) -> np.dtype:
    """The numpy dtype (little-endian) for an OIP datatype name the bus carries; InvalidRequest otherwise."""
    if not isinstance(datatype, str):
        raise InvalidRequest(f"input '{name}': 'datatype' must be a string such as \"FP32\"")
    if datatype not in DATATYPES:
        if datatype in ("BYTES", "BF16"):
            raise InvalidRequest(
                f"input '{name}': datatype {datatype} is not supported by this cluster; "
                f"use one of {', '.join(SUPPORTED_DATATYPES)}"
            )
        raise InvalidRequest(
            f"input '{name}': unknown datatype {datatype[:40]!r}; use one of {', '.join(SUPPORTED_DATATYPES)}"
        )
    return DATATYPES[datatype].newbyteorder("<")


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
    if not flat:
        return np.zeros(shape, dtype=dtype)
    kinds = _check_kinds(name, datatype, set(map(type, flat)))
    if count <= CHUNK_ELEMENTS:
        return _convert(name, datatype, dtype, flat, kinds).reshape(shape)
    # large: converted a chunk at a time (one float64 chunk at a time, not a float64 copy of it all)
    array = np.empty(count, dtype=dtype)
    if kinds is _INT_TYPES:
        _check_int_range(name, datatype, dtype, min(flat), max(flat))
    for start in range(0, count, CHUNK_ELEMENTS):
        array[start : start + CHUNK_ELEMENTS] = _convert(name, datatype, dtype, flat[start : start + CHUNK_ELEMENTS])
    return array.reshape(shape)


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
    (found by number_spans): read CHUNK_BYTES at a time with orjson straight into the array."""
    dtype = check_datatype(name, datatype)
    shape = check_shape(name, shape)
    count = math.prod(shape)
    have = text.count(b",", start, end) + 1  # the element count, if the array is valid JSON
    if have != count:
        for piece in _pieces(text, start + 1, end - 1):  # invalid JSON is said first, as the plain parse does
            _load_numbers(piece, exact_ints=False)
        raise InvalidRequest(f"input '{name}': shape {shape} needs {count} elements, 'data' has {have}")
    allowed = _allowed_kinds(datatype)
    array = np.empty(count, dtype=dtype)
    filled = 0
    for piece in _pieces(text, start + 1, end - 1):
        values = _load_numbers(piece, exact_ints=allowed is _INT_TYPES)
        if filled + len(values) > count:  # cannot happen with one value per comma; kept as a guard
            raise InvalidRequest(f"input '{name}': shape {shape} needs {count} elements, 'data' has more")
        # numbers only (the span holds nothing else): for FP types no need to look at every value's type
        kinds = _FLOAT_TYPES if allowed is _FLOAT_TYPES else None
        array[filled : filled + len(values)] = _convert(name, datatype, dtype, values, kinds)
        filled += len(values)
    if filled != count:
        raise InvalidRequest(f"input '{name}': shape {shape} needs {count} elements, 'data' has {filled}")
    return array.reshape(shape)


def _pieces(text: bytes, start: int, end: int):
    """text[start:end] (the inside of a JSON array of numbers) in pieces of about CHUNK_BYTES, cut at commas."""
    while True:
        stop = text.find(b",", min(start + CHUNK_BYTES, end), end)
        if stop < 0:
            stop = end
        yield text[start:stop]
        if stop >= end:
            return
        start = stop + 1


def _load_numbers(piece: bytes, exact_ints: bool) -> list:
    """The comma-separated JSON numbers in `piece`, with orjson; where orjson refuses them or turns an integer too
    large for 64 bits into a float, the standard library reads them again, for the same answer as a plain parse."""
    text = b"[" + piece + b"]"
    try:
        values = orjson.loads(text)
    except orjson.JSONDecodeError:
        values = parse_json(text)  # raises the standard library's message, or takes 1e999 as inf (refused later)
    else:
        if exact_ints and float in set(map(type, values)) and not _EXPONENT_OR_POINT.search(piece):
            values = parse_json(text)  # integers past 64 bits: exact, to be refused as out of range
    if not values:
        raise InvalidRequest("invalid JSON: an array has an empty element")
    return values


def number_spans(text: bytes, end: int) -> list[tuple[int, int]]:
    """(start, end) of every JSON array in text[:end] holding only numbers (no nesting) at least SPAN_MIN bytes long.
    A span may lie inside a JSON string: parse_infer_request checks where each one ends up."""
    spans: list[tuple[int, int]] = []
    position = 0
    for _ in range(MAX_BRACKETS_SCANNED):
        start = text.find(b"[", position, end)
        if start < 0:
            break
        stop = start + 1
        while True:  # the first byte that is not part of a number list, a window at a time (short GIL holds)
            window = min(stop + CHUNK_BYTES, end)
            if window - stop >= SPAN_MIN and not text[stop:window].translate(None, _NUMBER_BYTES):
                stop = window  # all number bytes (translate is ten times faster than the search)
            else:
                match = _NOT_NUMBER.search(text, stop, window)
                if match is not None:
                    stop = match.start()
                    break
                stop = window
            if stop >= end:
                break
        if stop < end and text[stop] == ord("]") and stop - start > SPAN_MIN:
            spans.append((start, stop + 1))
        position = stop
    return spans


def tensor_from_binary(name: str, datatype: Any, shape: Any, raw: bytes | memoryview) -> np.ndarray:
    """A numpy array over an input's raw little-endian bytes (Triton's binary tensor extension)."""
    dtype = check_datatype(name, datatype)
    shape = check_shape(name, shape)
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise InvalidRequest(
            f"input '{name}': shape {shape} of {datatype} needs {needed} bytes, binary_data_size is {len(raw)}"
        )
    if datatype == "BOOL" and len(raw) and int(np.frombuffer(raw, dtype=np.uint8).max()) > 1:
        raise InvalidRequest(f"input '{name}': BOOL bytes must be 0 or 1")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_to_json(array: np.ndarray) -> list:
    """Flat row-major JSON data for an output (FP16 as numbers, BOOL as true/false)."""
    return np.ascontiguousarray(array).ravel().tolist()


def _json_ready(array: np.ndarray) -> np.ndarray:
    """An output as orjson writes it: flat, C-contiguous, native byte order."""
    array = np.ascontiguousarray(array).reshape(-1)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _widened(array: np.ndarray) -> np.ndarray:
    """FP16 and FP32 as float64 (exact), so their JSON numbers are the ones .tolist() gave: each value's shortest
    float64 text, e.g. 0.1428571492433548 for float32(1/7), read back as the same double by any client."""
    return array.astype(np.float64) if array.dtype.kind == "f" and array.dtype.itemsize < 8 else array


def _json_array_parts(array: np.ndarray) -> list:
    """The JSON text of a flat array, CHUNK_ELEMENTS numbers a piece (the GIL is let go between pieces)."""
    parts = [b"["]
    for start in range(0, array.size, CHUNK_ELEMENTS):
        if start:
            parts.append(b",")
        parts.append(memoryview(orjson.dumps(_widened(array[start : start + CHUNK_ELEMENTS]), option=_NUMPY))[1:-1])
    parts.append(b"]")
    return parts


def tensor_to_binary(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of an output, row-major."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------


def _reject_constant(token: str):
    raise InvalidRequest(f"invalid JSON: {token} is not a JSON value")


def parse_json(text: bytes | str) -> Any:
    """Strict JSON (no NaN/Infinity), with every decoding failure as InvalidRequest."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except InvalidRequest:
        raise
    except RecursionError:
        raise InvalidRequest("invalid JSON: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise InvalidRequest(f"invalid JSON: {str(exc)[:200]}") from None


def parse_json_fast(text: bytes) -> Any:
    """parse_json's answer, read by orjson (several times faster) wherever orjson gives the same one: it reads an
    integer past 64 bits as a float (the standard library exactly, for the range check to refuse it), so text with
    LONG_DIGITS in a row goes to parse_json, and so does everything orjson refuses (1e999, lone surrogates, a BOM,
    UTF-16), for the standard library's answer or message."""
    if _LONG_RUN not in text.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return parse_json(text)


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """The JSON part's length from `Inference-Header-Content-Length`; None when the header is absent."""
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise InvalidRequest(f"{HEADER_LENGTH} must be a non-negative integer, got {value[:40]!r}")
    length = int(value)
    if length > body_size:
        raise InvalidRequest(f"{HEADER_LENGTH} is {length} but the body has only {body_size} bytes")
    return length


def _check_parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: 'parameters' must be an object")
    for key, v in value.items():
        if not isinstance(v, (str, int, float, bool)):
            raise InvalidRequest(f"{where}: parameter '{key[:64]}' must be a string, number or boolean")
    return value


def _check_bool(parameters: dict, key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{where}: parameter '{key}' must be true or false")
    return value


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse and validate an inference request body (JSON, or JSON + binary tensors when header_length is given)."""
    if not isinstance(body, bytes):
        body = bytes(body)
    json_size = parse_header_length(header_length, len(body))
    view = memoryview(body)
    end = len(body) if json_size is None else json_size
    spans = number_spans(body, end) if end > SPAN_MIN else []
    markers: dict[str, tuple[int, int]] = {}
    if spans:  # the large number arrays are left out of the parse (their marker in their place), read later
        request, markers = _parse_without_spans(body, end, spans)
    else:
        request = parse_json_fast(body if json_size is None else body[:json_size])
    if not isinstance(request, dict):
        raise InvalidRequest("the request body must be a JSON object with an 'inputs' array")

    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string")
    parameters = _check_parameters(request.get("parameters"), "request")
    binary_default = _check_bool(parameters, "binary_data_output", "request") or False
    timeout = parameters.get("timeout")
    if timeout is not None:
        if type(timeout) is not int or not 0 < timeout <= MAX_TIMEOUT_US:
            raise InvalidRequest(
                f"request: parameter 'timeout' must be an integer number of microseconds, 1 to {MAX_TIMEOUT_US}"
            )
        timeout = timeout / 1e6
    priority = parameters.get("priority")
    if priority is not None and (type(priority) is not int or priority < 0):
        raise InvalidRequest("request: parameter 'priority' must be a non-negative integer")

    inputs_json = request.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise InvalidRequest("'inputs' must be a non-empty array")
    if len(inputs_json) > MAX_TENSORS:
        raise InvalidRequest(f"{len(inputs_json)} inputs is over the limit of {MAX_TENSORS}")
    binary = view[json_size:] if json_size is not None else view[:0]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for i, entry in enumerate(inputs_json):
        if not isinstance(entry, dict):
            raise InvalidRequest(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = entry.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise InvalidRequest(f"inputs[{i}]: 'name' must be a non-empty string of at most {MAX_NAME} characters")
        if name in inputs:
            raise InvalidRequest(f"input '{name}' is given twice")
        for key in ("shape", "datatype"):
            if key not in entry:
                raise InvalidRequest(f"input '{name}': '{key}' is missing")
        input_parameters = _check_parameters(entry.get("parameters"), f"input '{name}'")
        size = input_parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidRequest(f"input '{name}': binary_data_size must be a non-negative integer")
            if json_size is None:
                raise InvalidRequest(
                    f"input '{name}': binary_data_size is given but the request has no {HEADER_LENGTH} header"
                )
            if "data" in entry:
                raise InvalidRequest(f"input '{name}': give either 'data' or parameters.binary_data_size, not both")
            if offset + size > len(binary):
                raise InvalidRequest(
                    f"input '{name}': binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            inputs[name] = tensor_from_binary(name, entry["datatype"], entry["shape"], binary[offset : offset + size])
            offset += size
        else:
            if "data" not in entry:
                raise InvalidRequest(f"input '{name}': 'data' is missing")
            data = entry["data"]
            span = markers.get(data) if type(data) is str else None
            if span is not None:
                inputs[name] = tensor_from_json_span(name, entry["datatype"], entry["shape"], body, *span)
            else:
                inputs[name] = tensor_from_json(name, entry["datatype"], entry["shape"], data)
            entry["data"] = data = None  # the list (if any) goes now, not with the request
    if offset != len(binary):
        raise InvalidRequest(f"the body has {len(binary) - offset} bytes after the inputs' binary data")

    outputs, binary_outputs = _parse_outputs(request.get("outputs"))
    return InferRequest(inputs, request_id, parameters, outputs, binary_outputs, binary_default, timeout)


def _parse_without_spans(body: bytes, end: int, spans: list[tuple[int, int]]) -> tuple[Any, dict]:
    """Parse body[:end] with every span replaced by a marker string (a random nonce: no client can send it), and
    return (the request, {marker: span}). When a marker is not found as exactly an input's `data` (a span was inside a
    string or an object key, or in a parameter), the whole JSON is parsed as it is instead, so the answer is always
    the one a plain parse gives."""
    nonce = os.urandom(12).hex()
    parts, position, markers = [], 0, {}
    for k, (start, stop) in enumerate(spans):
        marker = f"\x00{nonce}#{k}"
        markers[marker] = (start, stop)
        parts += [body[position:start], b'"\\u0000%s#%d"' % (nonce.encode(), k)]
        position = stop
    parts.append(body[position:end])
    try:
        request = parse_json(b"".join(parts))
    except InvalidRequest:
        request = None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    found = {
        entry["data"]
        for entry in (inputs if isinstance(inputs, list) else ())
        if isinstance(entry, dict) and type(entry.get("data")) is str and entry["data"] in markers
    }
    if len(found) != len(markers):
        return parse_json(body[:end]), {}
    return request, markers


def _parse_outputs(value: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if value is None:
        return None, {}
    if not isinstance(value, list):
        raise InvalidRequest("'outputs' must be an array of objects with a 'name'")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for i, entry in enumerate(value):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not entry["name"]
            or len(entry["name"]) > MAX_NAME
        ):
            raise InvalidRequest(f"outputs[{i}] must be an object with a non-empty string 'name'")
        name = entry["name"]
        if name in binary or name in names:
            raise InvalidRequest(f"output '{name}' is asked for twice")
        parameters = _check_parameters(entry.get("parameters"), f"output '{name}'")
        if parameters.get("classification") not in (None, 0):
            raise InvalidRequest(f"output '{name}': the classification extension is not supported")
        flag = _check_bool(parameters, "binary_data", f"output '{name}'")
        if flag is not None:
            binary[name] = flag
        names.append(name)
    return (names or None), binary


# ---------------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------------


def encode_infer_response(
    model: str, version: Any, outputs: dict[str, np.ndarray], request: InferRequest, parameters: dict | None = None
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an inference response: JSON, followed by binary outputs if any were asked for in binary.
    `parameters` (optional) become the response's parameters (the edge says which agent answered)."""
    response: dict[str, Any] = {"model_name": model}
    if version is not None:
        response["model_version"] = str(version)
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    entries = []
    chunks: list[bytes] = []
    large: dict[bytes, np.ndarray] = {}  # marker -> an output too large to write in one go
    nonce = None
    names = request.outputs if request.outputs is not None else list(outputs)
    for name in names:
        array = outputs.get(name)
        if array is None:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if request.wants_binary(name):
            raw = tensor_to_binary(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            flat = _json_ready(array)
            if flat.size > CHUNK_ELEMENTS:
                nonce = nonce or os.urandom(12).hex()  # a random marker, which no model name or id can hold
                marker = f"{nonce}#{len(large)}"
                large[f'"{marker}"'.encode()] = flat
                entry["data"] = marker
            else:
                entry["data"] = _widened(flat)
        entries.append(entry)
    response["outputs"] = entries
    head = orjson.dumps(response, option=_NUMPY)
    if large:  # each marker string replaced by its array's JSON, written a chunk at a time
        parts: list = []
        position = 0
        for marker, flat in large.items():
            at = head.index(marker, position)
            parts.append(head[position:at])
            parts += _json_array_parts(flat)
            position = at + len(marker)
        parts.append(head[position:])
        head = b"".join(parts)
        del parts
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def _json_type(value: Any) -> str:
    return _json_type_name(type(value))


def _json_type_name(kind: type) -> str:
    return _JSON_TYPE_NAMES.get(kind, kind.__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
