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
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from cluster.codec import datatype_of
from cluster.config import MAX_DIMS, MAX_TENSORS
from cluster.protocol import DATATYPES

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIM = 2**40  # the bus refuses larger dimensions (protocol.validate_tensor_metas)
MAX_NAME = 256
MAX_TIMEOUT_US = 24 * 3600 * 1_000_000  # the broker's longest request deadline
SUPPORTED_DATATYPES = tuple(DATATYPES)  # BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64

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
    kinds = set(map(type, flat))
    if datatype == "BOOL":
        allowed = _BOOL_TYPES
    elif datatype.startswith(("INT", "UINT")):
        allowed = _INT_TYPES
    else:
        allowed = _FLOAT_TYPES
    if not kinds <= allowed:
        wrong = sorted(_json_type_name(k) for k in kinds - allowed)
        want = {_BOOL_TYPES: "true/false", _INT_TYPES: "integers", _FLOAT_TYPES: "numbers"}[allowed]
        raise InvalidRequest(f"input '{name}': {datatype} data must be {want}, got {' and '.join(wrong)}")
    if allowed is _INT_TYPES:
        info = np.iinfo(dtype)
        low, high = min(flat), max(flat)
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidRequest(
                f"input '{name}': value {_short(bad)} is out of range for {datatype} [{info.min}, {info.max}]"
            )
        array = np.array(flat, dtype=dtype)
    elif allowed is _FLOAT_TYPES:
        try:
            wide = np.array(flat, dtype=np.float64)
        except OverflowError:  # an integer literal too large for a double
            raise InvalidRequest(f"input '{name}': a value is out of range for {datatype}") from None
        finite = np.isfinite(wide)
        if not finite.all():  # JSON has no inf/nan; a literal like 1e999 parses to inf
            raise InvalidRequest(
                f"input '{name}': a value is out of range for {datatype} (JSON numbers must be finite)"
            )
        limit = float(np.finfo(dtype).max)
        if wide.size and float(np.abs(wide).max()) > limit:
            raise InvalidRequest(
                f"input '{name}': a value is out of range for {datatype} (largest magnitude {limit:g})"
            )
        array = wide.astype(dtype)
    else:
        array = np.array(flat, dtype=dtype)
    return array.reshape(shape)


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
    json_size = parse_header_length(header_length, len(body))
    view = memoryview(body)
    head = view if json_size is None else view[:json_size]
    request = parse_json(bytes(head))
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
            inputs[name] = tensor_from_json(name, entry["datatype"], entry["shape"], entry["data"])
    if offset != len(binary):
        raise InvalidRequest(f"the body has {len(binary) - offset} bytes after the inputs' binary data")

    outputs, binary_outputs = _parse_outputs(request.get("outputs"))
    return InferRequest(inputs, request_id, parameters, outputs, binary_outputs, binary_default, timeout)


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
            entry["data"] = tensor_to_json(array)
        entries.append(entry)
    response["outputs"] = entries
    head = json.dumps(response, separators=(",", ":")).encode()
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
