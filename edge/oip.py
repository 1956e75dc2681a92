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
message names the offending input. This module reads and writes whole bodies; each tensor's checks and conversions
are edge/oip_tensors.py's, the JSON text's (strict parsing, large arrays in chunks) edge/oip_json.py's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from cluster.codec import datatype_of
from cluster.config import MAX_NAME, MAX_REQUEST_TIMEOUT_S, MAX_TENSORS
from edge import oip_json
from edge.oip_json import InvalidRequest, parse_json_fast, parse_without_spans
from edge.oip_tensors import (
    bytes_to_json,
    tensor_from_binary,
    tensor_from_json,
    tensor_from_json_span,
    tensor_to_binary,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_TIMEOUT_US = int(MAX_REQUEST_TIMEOUT_S * 1_000_000)  # Triton's `timeout` parameter is in microseconds


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
    spans = oip_json.number_spans(body, end) if end > oip_json.SPAN_MIN else []
    markers: dict[str, tuple[int, int]] = {}
    if spans:  # the large number arrays are left out of the parse (their marker in their place), read later
        request, markers = parse_without_spans(body, end, spans)
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
        elif array.dtype == object:  # BYTES: strings
            entry["data"] = bytes_to_json(name, array)
        else:
            flat = oip_json.json_ready(array)
            if flat.size > oip_json.CHUNK_ELEMENTS:
                nonce = nonce or os.urandom(12).hex()  # a random marker, which no model name or id can hold
                marker = f"{nonce}#{len(large)}"
                large[f'"{marker}"'.encode()] = flat
                entry["data"] = marker
            else:
                entry["data"] = oip_json.widened(flat)
        entries.append(entry)
    response["outputs"] = entries
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if large:  # each marker string replaced by its array's JSON, written a chunk at a time
        parts: list = []
        position = 0
        for marker, flat in large.items():
            at = head.index(marker, position)
            parts.append(head[position:at])
            parts += oip_json.json_array_parts(flat)
            position = at + len(marker)
        parts.append(head[position:])
        head = b"".join(parts)
        del parts
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
