"""Reading a request body: refused with 413 past the edge's limit (announced by Content-Length or counted while
reading, and again after decompression, so a small gzip bomb cannot get through), 415 for an encoding other than
gzip, deflate or identity, 400 for compressed data that does not decompress.

Large bodies are decoded (and large responses encoded) off the event loop, in one worker thread (`off_loop`): the
loop keeps answering health probes meanwhile, and large JSON requests are taken one at a time, so their memory does
not add up. Small ones stay inline (a thread hop costs more than they do). After a large one, the C heap is handed
back to the system (`malloc_trim`, glibc)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import zlib
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from edge.errors import HTTPError

OFF_LOOP_BYTES = 1024 * 1024  # bodies (and responses) from this size are decoded (encoded) in the worker thread
_worker: ThreadPoolExecutor | None = None


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _libc_malloc_trim()


async def off_loop(size: int, function, *args):
    """function(*args), in the edge's worker thread when `size` (bytes) is at least OFF_LOOP_BYTES, else inline."""
    global _worker
    if size < OFF_LOOP_BYTES:
        return function(*args)
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-json")
    return await asyncio.get_running_loop().run_in_executor(_worker, function, *args)


def give_memory_back(delay: float = 0.5) -> None:
    """Soon (once the request's objects are gone), hand the free C heap back to the system, in the worker thread."""
    if _malloc_trim is None or _worker is None:
        return
    loop = asyncio.get_running_loop()
    loop.call_later(delay, lambda: loop.run_in_executor(_worker, _malloc_trim, 0))


def mib(size: int) -> str:
    return f"{size / 2**20:g} MiB" if size % 2**20 == 0 else f"{size} bytes"


ENCODINGS = ("", "identity", "gzip", "deflate")


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready (while its body was read, or while its request waited
    on the bus)."""


async def read_body(request: Request, limit: int, json_advice: str | None = None) -> bytes:
    """The request body, at most `limit` bytes once decompressed. json_advice: the body is JSON, and this limit is
    the one for JSON: the 413 says so, and adds this advice."""
    return await read_asgi_body(request.headers, request.receive, limit, json_advice)


async def read_asgi_body(headers, receive, limit: int, json_advice: str | None = None) -> bytes:
    """read_body for a raw ASGI request: `headers` any mapping of lower-case names (Starlette's Headers, a dict),
    `receive` the ASGI receive callable. ClientDisconnected if the client goes away before the body's end."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ENCODINGS:
        raise HTTPError(
            415,
            f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or no encoding",
            "bad_request",
        )
    announced = headers.get("content-length", "").strip()
    if announced.isdigit() and int(announced) > limit:
        raise _too_large(limit, json_advice, int(announced))
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body = message.get("body", b"")  # the usual case: the whole body in one message
        if len(body) > limit:
            raise _too_large(limit, json_advice)
    else:
        chunks, size = [], 0
        while True:
            if message["type"] != "http.request":  # http.disconnect
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, json_advice)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
            message = await receive()
        body = b"".join(chunks)
        del chunks
    if encoding in ("gzip", "deflate"):
        body = decompress(body, encoding, limit, _over(limit, json_advice))
    return body


def _too_large(limit: int, json_advice: str | None, announced: int | None = None) -> HTTPError:
    what = "JSON body" if json_advice is not None else "request body"
    size = f" of {announced} bytes" if announced is not None else ""
    return HTTPError(413, f"{what}{size} is {_over(limit, json_advice)}", "too_large")


def _over(limit: int, json_advice: str | None) -> str:
    if json_advice is not None:
        return f"over the {mib(limit)} limit for JSON; {json_advice}"
    return f"over the limit of {limit} bytes"


def decompress(body: bytes, encoding: str, limit: int, over: str | None = None) -> bytes:
    """One complete gzip or zlib stream, inflated to at most `limit` bytes (never more is held in memory)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPError(400, f"body is not valid {encoding} data: {exc}", "bad_request") from None
    if len(out) > limit:
        raise HTTPError(413, f"decompressed request body is {over or f'over the limit of {limit} bytes'}", "too_large")
    if not inflater.eof or inflater.unused_data:
        raise HTTPError(400, f"body is not a single complete {encoding} stream", "bad_request")
    return out
