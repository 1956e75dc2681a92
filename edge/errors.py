"""How the edge answers when something goes wrong: `HTTPError`, the cluster's errors as HTTP statuses, and the app's
exception handlers. Every error body is {"error": "<message>"}.

    400  bad input (invalid JSON, data vs shape, wrong datatype, unknown input or output name)  BadRequestError too;
         also a Host header that is not one of the edge's names (edge/security.py)
    401  no token or an unknown one, when the edge has tokens (with WWW-Authenticate: Bearer)
    403  a plain token on a route that needs an admin token; a POST from a browser page of another origin
    404  unknown model or version                                          ModelNotFoundError, or a bad version path
    413  body over the limit (Content-Length checked first, bytes counted while reading, after decompression too)
    415  Content-Encoding other than gzip, deflate or identity; an infer body neither JSON nor octet-stream
    429  the broker's queue is full, or the wait would pass the model's bound (Retry-After: the broker's retry_after,
         rounded up to whole seconds; 1 if it gave none)                  OverloadedError
    503  no live agent for the model, or the broker does not answer a query  NoAgentAvailableError, query timeouts
    504  no answer to an inference request within its deadline            InferenceTimeoutError on infer
    500  the model itself failed                                           InferenceFailedError
    503  also: the broker refused the edge's own bus key (CURVE)            AuthenticationError
    403  also: the edge's bus key lacks the role for it                     PermissionDeniedError
    502  any other error reported by the cluster                          ClusterError
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import (
    AuthenticationError,
    BadRequestError,
    ClusterError,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelNotFoundError,
    NoAgentAvailableError,
    OverloadedError,
    PermissionDeniedError,
)

log = logging.getLogger("edge")


class HTTPError(Exception):
    """An answer other than 200, raised anywhere in a route; the handler turns it into {"error": message}.
    `outcome` is the label the metrics count it under (edge/metrics.py)."""

    def __init__(self, status: int, message: str, outcome: str = "error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome
        self.headers = headers


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), default=str).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def error_content(message: str) -> bytes:
    """The body of error_response, for the infer path that sends its answer without a Response."""
    return json.dumps({"error": message}, separators=(",", ":"), default=str).encode()


def cluster_http_error(exc: ClusterError, *, infer: bool, broker: str, role: str = "broker") -> HTTPError:
    """The HTTP status (and metrics outcome) for an error the bus reported. A timeout is the model's on an inference
    request (504) but means the broker (or `role`, the manager, at the address `broker`) is not answering on a query
    (503)."""
    text = str(exc)
    if isinstance(exc, BadRequestError):
        return HTTPError(400, text, "bad_request")
    if isinstance(exc, ModelNotFoundError):
        return HTTPError(404, text, "not_found")
    if isinstance(exc, OverloadedError):
        retry_after = getattr(exc, "retry_after", None)
        seconds = max(1, math.ceil(retry_after)) if retry_after is not None else 1  # Retry-After takes whole seconds
        return HTTPError(429, text, "overloaded", {"Retry-After": str(seconds)})
    if isinstance(exc, NoAgentAvailableError):
        return HTTPError(503, text, "unavailable")
    if isinstance(exc, InferenceTimeoutError):
        if infer:
            return HTTPError(504, text, "timeout")
        return HTTPError(503, f"the cluster's {role} at {broker} is not answering ({text})", "unavailable")
    if isinstance(exc, InferenceFailedError):
        return HTTPError(500, text, "failed")
    if isinstance(exc, AuthenticationError):  # the broker refused the edge's own bus key: the operator's to fix
        return HTTPError(503, f"the cluster's {role} at {broker} refused the edge's key ({text})", "unavailable")
    if isinstance(exc, PermissionDeniedError):
        return HTTPError(403, text, "forbidden")
    return HTTPError(502, f"the cluster reported an error: {text}", "error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises, FastAPI's and Starlette's own included, answers {"error": message}."""

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal error in the edge: {type(exc).__name__}")
