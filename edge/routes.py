"""The edge's routes: Open Inference Protocol health, metadata and inference, the cluster views, /metrics and the page.

Each route turns one HTTP request into one call on the app's data plane (edge/dataplane.py: `DataPlane`, the app's
`state.edge`, which gRPC shares) and the answer back into JSON; edge/oip.py does the tensor conversions, edge/body.py
reads bodies, edge/errors.py maps errors to statuses.
Health follows the OIP's status-code semantics with small JSON bodies (KServe style): live 200 {"live": true};
ready 200 {"ready": true} / 503 {"ready": false, "error": ...}; model ready 200 / 503 {"name", "ready"}, 404 for a
model the cluster does not know.

Two routers: `public` (health live and ready, the page) answers everyone; `router` (everything else) needs a token
when the edge has tokens (edge/security.py); a route that changes the cluster adds `dependencies=[ADMIN]`.
"""

from __future__ import annotations

import asyncio
import logging
import re

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.config import EDGE_DISCONNECT_WATCH_AFTER
from cluster.errors import ClusterError
from cluster.protocol import What
from edge import oip
from edge.body import OFF_LOOP_BYTES, ClientDisconnected, give_memory_back, mib, off_loop, read_asgi_body
from edge.dataplane import INFER_ERRORS, DataPlane, new_request_id, parse_version
from edge.errors import HTTPError, cluster_http_error, error_content, error_response, json_response
from edge.schemas import (
    ERRORS,
    AgentInfo,
    BrokerInfo,
    InferenceResponse,
    ModelListing,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    error_responses,
)
from edge.security import TOKEN, check_infer_content_type

log = logging.getLogger("edge")


def get_edge(request: Request) -> DataPlane:
    return request.app.state.edge


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
    why_not = await get_edge(request).server_ready()
    if why_not is not None:
        return json_response({"ready": False, "error": why_not}, 503)
    return json_response({"ready": True})


@router.get("/v2", response_model=ServerMetadata, tags=["metadata"], summary="Server metadata")
async def server_metadata() -> Response:
    return json_response(DataPlane.server_metadata())


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadata,
    tags=["metadata"],
    summary="Model metadata",
    responses=error_responses(404, 503),
)
async def model_metadata(request: Request, name: str) -> Response:
    return json_response(await get_edge(request).model_metadata(name, None))


@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    tags=["metadata"],
    summary="Model metadata (one version)",
    responses=error_responses(404, 503),
)
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(await get_edge(request).model_metadata(name, version))


@router.get(
    "/v2/models/{name}/config",
    tags=["metadata"],
    summary="Model configuration (Triton's extension)",
    responses=error_responses(404, 503),
)
async def model_config(request: Request, name: str) -> Response:
    """The model's config as Triton's model config JSON (tritonclient's `get_model_config`)."""
    return json_response(await get_edge(request).model_config(name, None))


@router.get(
    "/v2/models/{name}/versions/{version}/config",
    tags=["metadata"],
    summary="Model configuration (one version)",
    responses=error_responses(404, 503),
)
async def model_version_config(request: Request, name: str, version: str) -> Response:
    return json_response(await get_edge(request).model_config(name, version))


async def _model_ready(edge: DataPlane, name: str, version: str | None) -> Response:
    ready = await edge.model_ready(name, version)
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


async def answer_infer(edge: DataPlane, headers, receive, name: str, version: str | None) -> tuple[int, bytes, dict]:
    """(status, body, headers) of an inference request: the body read with `receive` (ASGI), checked, parsed, sent
    on the bus (cancelled if the client goes), the answer encoded; every outcome counted in the metrics (the data
    plane's). headers: the request's, lower-case names (a dict or Starlette's Headers). The token, if any, is checked
    before this."""
    started = edge.infer_started()
    outcome = "error"
    large = False
    trace = None
    try:
        number = parse_version(name, version)
        check_infer_content_type(headers)
        header = headers.get(_HEADER_LENGTH_KEY)
        body = await _read_infer_body(headers, receive, edge, header)
        large = len(body) >= OFF_LOOP_BYTES
        parsed = await off_loop(len(body), oip.parse_infer_request, body, header)  # large: not on the event loop
        del body
        trace = parsed.id or new_request_id()  # followed through the broker's and the agent's logs
        call = edge.infer(name, parsed.inputs, number, parsed.timeout, parsed.outputs, trace)
        result = await unless_disconnected(receive, call)
        edge.infer_answered(name, result)
        served_by = {"agent": result.agent} if isinstance(result.agent, str) else None
        size = sum(a.nbytes for a in result.outputs.values())
        large = large or size >= OFF_LOOP_BYTES
        content, response_headers = await off_loop(
            size, oip.encode_infer_response, result.model or name, result.version, result.outputs, parsed, served_by
        )
        outcome = "success"
        return 200, content, response_headers
    except INFER_ERRORS as exc:
        error = edge.infer_error(exc, name)
        outcome = error.outcome
        return error.status, error_content(error.message), {**JSON_HEADERS, **(error.headers or {})}
    finally:
        seconds = edge.infer_finished(name, outcome, started, "http")
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


async def _read_infer_body(headers, receive, edge: DataPlane, header: str | None) -> bytes:
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

    def __init__(self, app: ASGIApp, edge: DataPlane) -> None:
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
    "/brokers",
    response_model=list[BrokerInfo],
    tags=["cluster"],
    summary="Live brokers",
    responses=error_responses(503),
)
async def brokers(request: Request) -> Response:
    """The live brokers as the manager hears them (each one's latest report): name, the agents it routes to, its
    load (in flight, queued, capacity per model), how long ago it reported. 503 when the manager does not answer."""
    edge = get_edge(request)
    if edge.manager is None:
        raise HTTPError(503, "this edge has no manager to ask about the brokers", "unavailable")
    try:
        found = await edge.manager.call(What.BROKERS, edge.query_timeout)
    except ClusterError as exc:
        raise cluster_http_error(exc, infer=False, broker=edge.manager.address, role="manager") from None
    return json_response(found)


@router.get("/rollouts", tags=["cluster"], summary="Rollouts and canary runs", responses=error_responses(503))
async def rollouts(request: Request) -> Response:
    """The manager's rollouts: counts, and per model its canary run (in progress, or the last one): split, step,
    the judge's latest look and the decisions so far. 503 when the manager does not answer."""
    return await _rollouts(request, None)


@router.get("/rollouts/{name}", tags=["cluster"], summary="One model's canary run", responses=error_responses(503))
async def model_rollouts(request: Request, name: str) -> Response:
    """The rollouts view limited to one model's canary run."""
    return await _rollouts(request, name)


async def _rollouts(request: Request, name: str | None) -> Response:
    edge = get_edge(request)
    if edge.manager is None:
        raise HTTPError(503, "this edge has no manager to ask about rollouts", "unavailable")
    try:
        found = await edge.manager.call(What.ROLLOUTS, edge.query_timeout, name=name)
    except ClusterError as exc:
        raise cluster_http_error(exc, infer=False, broker=edge.manager.address, role="manager") from None
    return json_response(found)


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
    """The edge's own metrics, the cluster's in Triton's names and the rollouts (edge/metrics.py)."""
    edge = get_edge(request)
    return Response(await edge.render_metrics(), media_type=edge.metrics.content_type)


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
