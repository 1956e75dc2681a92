"""The JSON text of OIP bodies: strict parsing (no NaN/Infinity; orjson wherever it gives the standard library's
answer), and large number arrays found, read and written in chunks (issue 11). `InvalidRequest`, the error of every
OIP check (HTTP 400), is defined here, at the bottom of the edge's three OIP modules (oip_json <- oip_tensors <- oip).

Large JSON: a request's `data` array of plain numbers at least SPAN_MIN bytes long is cut out of the JSON before it
is parsed, then read CHUNK_BYTES at a time with orjson straight into the tensor (edge/oip_tensors.py), so no Python
list of the whole data ever exists and the GIL is let go between chunks; the rest of the JSON (small) is parsed with
the standard library, as before. Outputs with more than CHUNK_ELEMENTS elements are written to JSON with orjson in
chunks of that many elements (no .tolist()). Other modules read these three sizes as `oip_json.X` when they run, so
a test may change them here.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import orjson

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


class InvalidRequest(ValueError):
    """The request cannot be served as sent (HTTP 400). The message says what is wrong, and with which input."""


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


def pieces(text: bytes, start: int, end: int):
    """text[start:end] (the inside of a JSON array of numbers) in pieces of about CHUNK_BYTES, cut at commas."""
    while True:
        stop = text.find(b",", min(start + CHUNK_BYTES, end), end)
        if stop < 0:
            stop = end
        yield text[start:stop]
        if stop >= end:
            return
        start = stop + 1


def load_numbers(piece: bytes, exact_ints: bool) -> list:
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


def parse_without_spans(body: bytes, end: int, spans: list[tuple[int, int]]) -> tuple[Any, dict]:
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


def json_ready(array: np.ndarray) -> np.ndarray:
    """An output as orjson writes it: flat, C-contiguous, native byte order."""
    array = np.ascontiguousarray(array).reshape(-1)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def widened(array: np.ndarray) -> np.ndarray:
    """FP16 and FP32 as float64 (exact), so their JSON numbers are the ones .tolist() gave: each value's shortest
    float64 text, e.g. 0.1428571492433548 for float32(1/7), read back as the same double by any client."""
    return array.astype(np.float64) if array.dtype.kind == "f" and array.dtype.itemsize < 8 else array


def json_array_parts(array: np.ndarray) -> list:
    """The JSON text of a flat array, CHUNK_ELEMENTS numbers a piece (the GIL is let go between pieces)."""
    parts = [b"["]
    for start in range(0, array.size, CHUNK_ELEMENTS):
        if start:
            parts.append(b",")
        parts.append(memoryview(orjson.dumps(widened(array[start : start + CHUNK_ELEMENTS]), option=_NUMPY))[1:-1])
    parts.append(b"]")
    return parts
