"""Helpers shared by the edge's tests (in-process, tests/test_edge_app.py, and end to end, tests/test_edge.py)."""

from __future__ import annotations

import json

import numpy as np

from edge.oip import HEADER_LENGTH


def echo_body(values, shape=None, datatype="FP32", **extra) -> dict:
    """An OIP inference request for the `echo` model (one input, x) with `values` as its JSON data."""
    shape = shape if shape is not None else list(np.shape(values))
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": values}], **extra}


def binary_echo_body(values: np.ndarray, binary_output: bool = True) -> tuple[bytes, dict]:
    """(body, headers) of a Triton binary-extension request for `echo`: the JSON header, then x's raw bytes."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(values.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": values.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": binary_output}}],
        }
    ).encode()
    return header + values.tobytes(), {HEADER_LENGTH: str(len(header))}


def assert_binary_echo(response, values: np.ndarray) -> None:
    """The response is 200 with y's raw bytes after the JSON header, equal to `values`."""
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER_LENGTH])
    head = json.loads(response.content[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": values.nbytes}
    received = np.frombuffer(response.content[length:], dtype=values.dtype).reshape(values.shape)
    np.testing.assert_array_equal(received, values)


def assert_error(response, status: int, *words: str) -> str:
    """The response is `status` with an {"error": message} body naming every one of `words` (any case)."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:500]}"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    for word in words:
        assert word.lower() in body["error"].lower(), f"{word!r} not in {body['error']!r}"
    return body["error"]


def counter(text: str, name: str, **labels) -> float:
    """The value of Prometheus sample `name` with these labels in /metrics `text` (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
