"""Reading a request body: refused with 413 past the edge's limit (announced by Content-Length or counted while
reading, and again after decompression, so a small gzip bomb cannot get through), 415 for an encoding other than
gzip, deflate or identity, 400 for compressed data that does not decompress."""

from __future__ import annotations

import zlib

from fastapi import Request

from edge.errors import HTTPError

ENCODINGS = ("", "identity", "gzip", "deflate")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes once decompressed."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ENCODINGS:
        raise HTTPError(
            415,
            f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or no encoding",
            "bad_request",
        )
    announced = request.headers.get("content-length", "").strip()
    if announced.isdigit() and int(announced) > limit:
        raise HTTPError(413, f"request body of {int(announced)} bytes is over the limit of {limit} bytes", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is over the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if encoding in ("gzip", "deflate"):
        body = decompress(body, encoding, limit)
    return body


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """One complete gzip or zlib stream, inflated to at most `limit` bytes (never more is held in memory)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPError(400, f"body is not valid {encoding} data: {exc}", "bad_request") from None
    if len(out) > limit:
        raise HTTPError(413, f"decompressed request body is over the limit of {limit} bytes", "too_large")
    if not inflater.eof or inflater.unused_data:
        raise HTTPError(400, f"body is not a single complete {encoding} stream", "bad_request")
    return out
