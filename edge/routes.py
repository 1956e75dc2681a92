"""The edge's routes: Open Inference Protocol health, metadata and inference, the cluster views, /metrics and the page.

Each route turns one HTTP request into one call on the app's bus client (`EdgeState.client`) and the answer back into
JSON; edge/oip.py does the tensor conversions, edge/body.py reads bodies, edge/errors.py maps errors to statuses.
Health follows the OIP's status-code semantics with small JSON bodies (KServe style): live 200 {"live": true};
ready 200 {"ready": true} / 503 {"ready": false, "error": ...}; model ready 200 / 503 {"name", "ready"}, 404 for a
model the cluster does not know.

Two routers: `public` (health live and ready, the page) answers everyone; `router` (everything else) needs a token
when the edge has tokens (edge/security.py); a route that changes the cluster adds `dependencies=[ADMIN]`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.config import EDGE_DISCONNECT_WATCH_AFTER
from cluster.errors import ClusterError, InferenceFailedError, OverloadedError
from edge import oip
from edge.body import OFF_LOOP_BYTES, ClientDisconnected, give_memory_back, mib, off_loop, read_asgi_body
from edge.errors import HTTPError, cluster_http_error, error_content, error_response, json_response
from edge.metrics import EdgeMetrics
from edge.schemas import (
    ERRORS,
    AgentInfo,
    InferenceResponse,
    ModelListing,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    error_responses,
)
from edge.security import TOKEN, EdgeSecurity, check_infer_content_type
from edge.triton_config import triton_model_config

log = logging.getLogger("edge")
SERVER_NAME = "torch-serving-cluster"
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository", "model_configuration"]


def server_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:  # a source checkout that was never installed
        return "0.1.0"


class EdgeState:
    """What the routes share (the app's `state.edge`): the bus client, the metrics, the limits and deadlines.
    max_body_bytes: the largest body; max_json_bytes: the largest JSON (a whole body without the binary extension,
    or the JSON part of one with it), at most max_body_bytes (default: the same).

    client: anything with AsyncClient's coroutines (infer, agents, models, model_metadata); set by the app's lifespan.
    manager: the lifecycle manager's client (cluster.manager.client.AsyncManagerClient: `call` and `address`), for
    the repository extension (edge/repository.py) and the rollout metrics.
    security: tokens, allowed hosts and CORS origins (edge/security.py).
    """

    def __init__(
        self,
        broker: str,
        max_body_bytes: int,
        frontend_path: Path,
        request_timeout: float | None,
        query_timeout: float,
        security: EdgeSecurity | None = None,
        manager: Any = None,
        max_json_bytes: int | None = None,
    ) -> None:
        self.broker = broker
        self.manager = manager
        self.max_body_bytes = max_body_bytes
        # a body without the binary extension is all JSON: its own, lower limit (never above max_body_bytes)
        self.max_json_bytes = min(max_body_bytes, max_json_bytes if max_json_bytes is not None else max_body_bytes)
        self.json_advice = f"send tensors with the binary extension (up to {mib(max_body_bytes)})"
        self.frontend_path = frontend_path
        self.request_timeout = request_timeout
        self.query_timeout = query_timeout
        self.security = security or EdgeSecurity()
        self.metrics = EdgeMetrics()
        self.client: Any = None
        self.grpc_address: str | None = None  # host:port once the gRPC service listens (edge/grpc_service.py)

    async def query(self, call):
        """Await a bus query, turning its errors into HTTP errors (a query that times out means no broker: 503)."""
        try:
            return await call
        except ClusterError as exc:
            raise cluster_http_error(exc, infer=False, broker=self.broker) from None


def new_request_id() -> str:
    """An id for a request that came without one (the OIP `id` is optional), so that its log lines can be found."""
    return f"edge-{os.urandom(8).hex()}"


def get_edge(request: Request) -> EdgeState:
    return request.app.state.edge


def parse_version(name: str, version: str | None) -> int | None:
    """A version path segment as the bus's int; 404 for anything that cannot be a version."""
    if version is None:
        return None
    if not (version.isascii() and version.isdigit()) or len(version) > 18:
        raise HTTPError(404, f"model '{name}' has no version '{version[:40]}'", "not_found")
    return int(version)


public = APIRouter()  # open to all, tokens or not
router = APIRouter(dependencies=[TOKEN])  # a token, when the edge has tokens


# ---------------------------------------------------------------------------------------------------------------
# Open Inference Protocol: health and metadata
# ---------------------------------------------------------------------------------------------------------------


@public.get("/v2/health/live", response_model=ServerLive, tags=["health"], summary="Server live")
async def server_live() -> Response:
    """200 while the edge can take requests."""
    return json_response({"live": True})


@public.get(
    "/v2/health/ready",
    response_model=ServerReady,
    tags=["health"],
    summary="Server ready",
    responses={503: {"model": ServerReady, "description": "The broker does not answer, or no agent is live."}},
)
async def server_ready(request: Request) -> Response:
    """200 when the broker answers and at least one agent is live (and not draining); 503 otherwise."""
    edge = get_edge(request)
    try:
        agents = await edge.client.agents(timeout=edge.query_timeout)
    except ClusterError as exc:
        return json_response(
            {"ready": False, "error": cluster_http_error(exc, infer=False, broker=edge.broker).message}, 503
        )
    if not any(not a.get("draining") for a in agents):
        return json_response({"ready": False, "error": "no live agent is connected to the cluster"}, 503)
    return json_response({"ready": True})


@router.get("/v2", response_model=ServerMetadata, tags=["metadata"], summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS})


async def _model_metadata(edge: EdgeState, name: str, version: str | None) -> dict:
    meta = await edge.query(edge.client.model_metadata(name, parse_version(name, version), timeout=edge.query_timeout))
    edge.metrics.confirm_model(name)
    return meta


def _metadata_body(meta: dict) -> dict:
    versions = meta.get("versions") or ([meta["version"]] if meta.get("version") is not None else [])
    return {
        "name": meta.get("name"),
        "versions": [str(v) for v in versions],
        "platform": meta.get("platform") or "",
        "inputs": meta.get("inputs") or [],
        "outputs": meta.get("outputs") or [],
    }


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadata,
    tags=["metadata"],
    summary="Model metadata",
    responses=error_responses(404, 503),
)
async def model_metadata(request: Request, name: str) -> Response:
    return json_response(_metadata_body(await _model_metadata(get_edge(request), name, None)))


@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    tags=["metadata"],
    summary="Model metadata (one version)",
    responses=error_responses(404, 503),
)
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(_metadata_body(await _model_metadata(get_edge(request), name, version)))


@router.get(
    "/v2/models/{name}/config",
    tags=["metadata"],
    summary="Model configuration (Triton's extension)",
    responses=error_responses(404, 503),
)
async def model_config(request: Request, name: str) -> Response:
    """The model's config as Triton's model config JSON (tritonclient's `get_model_config`)."""
    return json_response(triton_model_config(await _model_metadata(get_edge(request), name, None)))


@router.get(
    "/v2/models/{name}/versions/{version}/config",
    tags=["metadata"],
    summary="Model configuration (one version)",
    responses=error_responses(404, 503),
)
async def model_version_config(request: Request, name: str, version: str) -> Response:
    return json_response(triton_model_config(await _model_metadata(get_edge(request), name, version)))


async def _model_ready(edge: EdgeState, name: str, version: str | None) -> Response:
    meta = await _model_metadata(edge, name, version)
    ready = bool(meta.get("ready"))
    return json_response({"name": name, "ready": ready}, 200 if ready else 503)


_READY_RESPONSES = {
    503: {"model": ModelReady, "description": "Known to the cluster but no live agent serves it."},
    404: ERRORS[404],
}


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReady,
    tags=["health"],
    summary="Model ready",
    responses=_READY_RESPONSES,
)
async def model_ready(request: Request, name: str) -> Response:
    """200 when a live agent serves the model's newest version; 503 when none does; 404 for an unknown model."""
    return await _model_ready(get_edge(request), name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    tags=["health"],
    summary="Model ready (one version)",
    responses=_READY_RESPONSES,
)
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return await _model_ready(get_edge(request), name, version)


# ---------------------------------------------------------------------------------------------------------------
# Open Inference Protocol: inference
# ---------------------------------------------------------------------------------------------------------------

_INFER_DOC = {
    "tags": ["inference"],
    "response_model": InferenceResponse,
    "responses": {
        200: {
            "description": "The outputs. With binary outputs the body is the JSON followed by their bytes, and "
            "`Inference-Header-Content-Length` gives the JSON length.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(400, 404, 413, 415, 429, 500, 502, 503, 504),
    },
    # The binary extension's `Inference-Header-Content-Length` header belongs to octet-stream bodies only, which
    # OpenAPI cannot say of a header parameter: it is described with that body, not listed as a parameter (a fuzzer
    # would otherwise send it, with any integer, alongside JSON bodies).
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "Binary tensor extension: an InferenceRequest JSON followed by the raw bytes of "
                    "the inputs that declare `parameters.binary_data_size`, with the header "
                    "`Inference-Header-Content-Length` giving the JSON part's length.",
                },
            },
        },
    },
}


async def _unless_disconnected(request: Request, work):
    """Await `work` (the bus call); if the HTTP client disconnects first, cancel it, which sends the broker a CANCEL
    (AsyncClient does), so the request leaves the queue or its agent skips it, and raise ClientDisconnected."""
    return await unless_disconnected(request.receive, work)


async def unless_disconnected(receive, work, watch_after: float = EDGE_DISCONNECT_WATCH_AFTER):
    """_unless_disconnected for a raw ASGI `receive`. From `watch_after` seconds on (a request answered sooner costs no
    watching: EDGE_DISCONNECT_WATCH_AFTER), one watcher task, which cancels this task when the client goes: cheaper
    than racing the call in a task of its own with asyncio.wait, which every request paid."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    gone = False
    watcher = None

    async def watch() -> None:
        nonlocal gone
        await _disconnect(receive)
        gone = True
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(watch_after, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # cancelled from outside (the server shutting down): not ours to swallow
            raise
        task.uncancel()
        raise ClientDisconnected() from None
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _disconnect(receive) -> None:
    """Returns when the ASGI server says the client disconnected (the body is read already: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


JSON_HEADERS = {"content-type": "application/json"}


async def answer_infer(edge: EdgeState, headers, receive, name: str, version: str | None) -> tuple[int, bytes, dict]:
    """(status, body, headers) of an inference request: the body read with `receive` (ASGI), checked, parsed, sent
    on the bus (cancelled if the client goes), the answer encoded; every outcome counted in the metrics. headers: the
    request's, lower-case names (a dict or Starlette's Headers). The token, if any, is checked before this."""
    metrics = edge.metrics
    started = time.perf_counter()
    outcome = "error"
    large = False
    trace = None
    metrics.requests_in_flight += 1
    try:
        number = parse_version(name, version)
        check_infer_content_type(headers)
        header = headers.get(_HEADER_LENGTH_KEY)
        body = await _read_infer_body(headers, receive, edge, header)
        large = len(body) >= OFF_LOOP_BYTES
        parsed = await off_loop(len(body), oip.parse_infer_request, body, header)  # large: not on the event loop
        del body
        timeout = parsed.timeout if parsed.timeout is not None else edge.request_timeout
        trace = parsed.id or new_request_id()  # followed through the broker's and the agent's logs
        call = edge.client.infer(
            name, parsed.inputs, version=number, timeout=timeout, outputs=parsed.outputs, request_id=trace
        )
        result = await unless_disconnected(receive, call)
        metrics.confirm_model(name)
        metrics.observe_batching(name, result.batch_size, result.queue_seconds)
        served_by = {"agent": result.agent} if isinstance(result.agent, str) else None
        size = sum(a.nbytes for a in result.outputs.values())
        large = large or size >= OFF_LOOP_BYTES
        content, response_headers = await off_loop(
            size, oip.encode_infer_response, result.model or name, result.version, result.outputs, parsed, served_by
        )
        outcome = "success"
        return 200, content, response_headers
    except oip.InvalidRequest as exc:
        outcome = "bad_request"
        return 400, error_content(str(exc)), JSON_HEADERS
    except ClientDisconnected:
        outcome = "cancelled"
        # nobody reads it
        return 499, error_content("the client closed the connection; the request was cancelled"), JSON_HEADERS
    except HTTPError as exc:
        outcome = exc.outcome
        return exc.status, error_content(exc.message), {**JSON_HEADERS, **(exc.headers or {})}
    except ClusterError as exc:
        error = cluster_http_error(exc, infer=True, broker=edge.broker)
        outcome = error.outcome
        if isinstance(exc, (InferenceFailedError, OverloadedError)):  # the cluster has the model
            metrics.confirm_model(name)
        return error.status, error_content(error.message), {**JSON_HEADERS, **(error.headers or {})}
    finally:
        metrics.requests_in_flight -= 1
        seconds = time.perf_counter() - started
        metrics.observe(name, outcome, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s for %s: %s in %.2f ms",
                trace or "-",
                name,
                outcome,
                seconds * 1e3,
                extra={"request_id": trace, "model": name},
            )
        if large:
            give_memory_back()


_HEADER_LENGTH_KEY = oip.HEADER_LENGTH.lower()


async def _read_infer_body(headers, receive, edge: EdgeState, header: str | None) -> bytes:
    """An inference body: all JSON (the JSON limit), or with the binary extension (the body limit, and the JSON
    limit for its JSON part)."""
    if header is None:
        return await read_asgi_body(headers, receive, edge.max_json_bytes, edge.json_advice)
    body = await read_asgi_body(headers, receive, edge.max_body_bytes)
    value = header.strip()
    if value.isascii() and value.isdigit() and len(value) < 20 and int(value) > edge.max_json_bytes:
        raise HTTPError(
            413,
            f"the JSON part of {int(value)} bytes is over the {mib(edge.max_json_bytes)} limit for JSON; "
            f"{edge.json_advice}",
            "too_large",
        )
    return body


async def _infer(request: Request, name: str, version: str | None) -> Response:
    """The infer routes as FastAPI serves them: only when InferPath did not (an app mounted under a root path)."""
    status, content, headers = await answer_infer(get_edge(request), request.headers, request.receive, name, version)
    return Response(content, status_code=status, headers=headers)


@router.post("/v2/models/{name}/infer", summary="Inference", **_INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    """Run the model's newest version served by a live agent on the inputs."""
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference (one version)", **_INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


# The infer path as raw ASGI, in front of FastAPI: the routes above stay for the OpenAPI document (and serve when
# InferPath cannot, under a root path); InferPath answers the POSTs without FastAPI's middleware, route matching,
# dependency solving and Request/Response objects, which took more of the edge's CPU than the bus call (py-spy).
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)/(?:versions/(?P<version>[^/]+)/)?infer$")  # as Starlette's


class InferPath:
    """ASGI middleware between the edge's RequestGuard and CORS (outside it: Host, Origin and CORS answers are theirs)
    and FastAPI's own stack (edge.app.EdgeApp puts it there): serves POST /v2/models/{name}/infer and
    /v2/models/{name}/versions/{version}/infer, with the routes' token check (TOKEN) and answers (answer_infer), and
    an unexpected error as the app's handler answers it (500, the error's type only). Everything else goes on."""

    def __init__(self, app: ASGIApp, edge: EdgeState) -> None:
        self.app = app
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            match = INFER_PATH.match(scope["path"])
            if match is not None:
                await _send_answer(send, *await self._answer(scope, receive, match["name"], match["version"]))
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, name: str, version: str | None) -> tuple[int, bytes, dict]:
        headers = _header_dict(scope["headers"])
        security = self.edge.security
        try:
            if security.auth:
                security.check(headers.get("authorization"), admin=False)
            return await answer_infer(self.edge, headers, receive, name, version)
        except HTTPError as exc:
            return exc.status, error_content(exc.message), {**JSON_HEADERS, **(exc.headers or {})}
        except Exception as exc:
            log.exception("unexpected error serving POST %s", scope["path"])
            return 500, error_content(f"internal error in the edge: {type(exc).__name__}"), JSON_HEADERS


def _header_dict(raw: list) -> dict[str, str]:
    """The request's headers by lower-case name (the first of repeated ones, as Starlette's Headers.get gives)."""
    headers: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name not in headers:
            headers[name] = value.decode("latin-1")
    return headers


async def _send_answer(send: Send, status: int, content: bytes, headers: dict) -> None:
    raw = [(b"content-length", str(len(content)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


# ---------------------------------------------------------------------------------------------------------------
# The cluster, the metrics, the page
# ---------------------------------------------------------------------------------------------------------------


@router.get(
    "/agents", response_model=list[AgentInfo], tags=["cluster"], summary="Live agents", responses=error_responses(503)
)
async def agents(request: Request) -> Response:
    """The live agents as the broker sees them: host, models, requests in flight, capacity, heartbeat age."""
    edge = get_edge(request)
    found = await edge.query(edge.client.agents(timeout=edge.query_timeout))
    return json_response(sorted(found, key=lambda a: str(a.get("id"))))


@router.get(
    "/models",
    response_model=dict[str, ModelListing],
    tags=["cluster"],
    summary="Deployed models",
    responses=error_responses(503),
)
async def models(request: Request) -> Response:
    """Every model a live agent serves: name -> {versions, agents}. (The OIP has no list endpoint.)"""
    edge = get_edge(request)
    found = await edge.query(edge.client.models(timeout=edge.query_timeout))
    for name in found:
        edge.metrics.confirm_model(name)
    return json_response(found)


@router.get(
    "/metrics",
    tags=["cluster"],
    summary="Prometheus metrics",
    responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
async def metrics(request: Request) -> Response:
    edge = get_edge(request)
    try:
        found = await edge.client.agents(timeout=min(1.0, edge.query_timeout))
        edge.metrics.set_cluster(len(found))
    except ClusterError:
        edge.metrics.set_cluster(None)
    # the cluster's counters in Triton's names (edge/metrics.py), from one `statistics` query to the broker, and the
    # rollouts from one to the manager, side by side; either may be missing (that role is not answering)
    timeout = min(1.0, edge.query_timeout)
    cluster, rollouts = await asyncio.gather(
        edge.client.statistics(timeout=timeout),
        edge.manager.call("rollouts", timeout) if edge.manager is not None else asyncio.sleep(0),
        return_exceptions=True,
    )
    cluster = None if isinstance(cluster, BaseException) else cluster
    rollouts = rollouts if isinstance(rollouts, dict) else None
    return Response(edge.metrics.render(cluster, rollouts), media_type=edge.metrics.content_type)


@public.get(
    "/",
    tags=["page"],
    summary="The web page",
    responses={
        200: {"description": "frontend.html", "content": {"text/html": {"schema": {"type": "string"}}}},
        404: ERRORS[404],
    },
)
async def page(request: Request) -> Response:
    path = get_edge(request).frontend_path
    if not path.is_file():
        return error_response(404, f"the page {path.name} is not installed with this edge")
    return FileResponse(path, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
