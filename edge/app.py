"""The HTTP edge: Open Inference Protocol (KServe V2) REST in front of the bus, plus the page and a few cluster views.

A thin FastAPI app with no model logic: each HTTP request becomes one call on a long-lived `AsyncClient` (created in
the lifespan, closed at shutdown). `oip.py` turns OIP JSON (and Triton's binary tensor extension) into numpy arrays
and back; this module holds the routes, the body limit and the mapping from cluster errors to HTTP statuses:

    400  bad input (invalid JSON, data vs shape, wrong datatype, unknown input or output name)  BadRequestError too
    404  unknown model or version                                          ModelNotFoundError, or a bad version path
    413  body over the limit (Content-Length checked first, bytes counted while reading, after decompression too)
    415  Content-Encoding other than gzip, deflate or identity
    429  the broker's queue is full (with Retry-After: 1)                  OverloadedError
    503  no live agent for the model, or the broker does not answer a query  NoAgentAvailableError, query timeouts
    504  no answer to an inference request within its deadline            InferenceTimeoutError on infer
    500  the model itself failed                                           InferenceFailedError
    502  any other error reported by the cluster                          ClusterError

Every error body is {"error": "<message>"}. Health follows the OIP's status-code semantics with small JSON bodies
(KServe style): 200 {"live": true}; ready 200 {"ready": true} / 503 {"ready": false, "error": ...}; model ready
200 / 503 {"name", "ready"}, 404 for a model the cluster does not know.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import AsyncClient
from cluster.protocol import DATATYPES
from cluster.errors import (
    BadRequestError,
    ClusterError,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelNotFoundError,
    NoAgentAvailableError,
    OverloadedError,
)
from edge import oip
from edge.metrics import EdgeMetrics

log = logging.getLogger("edge")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The page: frontend.html at the repository root (a source checkout or editable install), else where setup.py's
# data_files put it in an installed environment.
FRONTEND_CANDIDATES = (REPO_ROOT / "frontend.html", Path(sys.prefix) / "share" / "torch-serving-cluster" / "frontend.html")


def default_frontend() -> Path:
    return next((p for p in FRONTEND_CANDIDATES if p.is_file()), FRONTEND_CANDIDATES[0])
DEFAULT_MAX_BODY = 64 * 1024 * 1024
SERVER_NAME = "torch-serving-cluster"
EXTENSIONS = ["binary_tensor_data"]


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version(SERVER_NAME)
    except Exception:
        return "0.1.0"


# ---------------------------------------------------------------------------------------------------------------
# Bodies, as pydantic models so the OpenAPI document shows them
# ---------------------------------------------------------------------------------------------------------------

Datatype = Literal[tuple(DATATYPES)]  # the one datatype table, as an OpenAPI enum
Parameters = dict[str, str | int | float | bool]
TensorData = list[Any]


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in words a person can act on.")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool
    error: str | None = Field(None, description="Why the server is not ready (only when it is not).")


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable-size dimension.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = Field(
        None, description="`binary_data_size`: this input's bytes follow the JSON (Triton's binary tensor extension)."
    )
    data: TensorData | None = Field(None, description="Row-major values, flat or nested; omitted when sent in binary.")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(None, description="`binary_data`: true to get this output in binary.")


class InferenceRequest(BaseModel):
    """An Open Inference Protocol inference request. With the binary tensor extension the HTTP body is this JSON
    followed by raw little-endian tensor bytes, and the `Inference-Header-Content-Length` header gives the JSON length."""

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: Parameters | None = Field(
        None,
        description="`binary_data_output` (bool): all outputs in binary; `timeout` (int, microseconds): deadline; "
        "`priority` accepted and ignored. Other parameters are accepted and ignored.",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return (all when omitted).")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = Field(None, description="`binary_data_size` when the output is sent in binary.")
    data: TensorData | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = Field(None, description="`agent`: the id of the agent that served the request.")
    outputs: list[ResponseOutput]


class AgentModel(BaseModel):
    name: str
    version: int


class AgentInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    host: str | None = None
    pid: int | None = None
    device: str | None = None
    models: list[AgentModel] = []
    in_flight: int | None = Field(None, description="Requests the agent is working on (from its last heartbeat).")
    broker_in_flight: int | None = Field(None, description="Requests the broker has handed to the agent (exact, now).")
    capacity: int | None = None
    heartbeat_age: float | None = Field(None, description="Seconds since the broker last heard from the agent.")
    draining: bool | None = None
    uptime: float | None = None


class ModelListing(BaseModel):
    versions: list[int]
    agents: list[str]


ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad input: invalid JSON, data that does not fit the shape or datatype, unknown input or output.",
        404: "Unknown model or version.",
        413: "Body over the edge's limit.",
        415: "Unsupported Content-Encoding.",
        429: "The cluster is overloaded; retry after the Retry-After header's seconds.",
        500: "The model failed.",
        502: "The cluster reported an internal error.",
        503: "No live agent serves the model, or the broker does not answer.",
        504: "No answer within the request's deadline.",
    }.items()
}


def _errors(*codes: int) -> dict:
    return {code: ERRORS[code] for code in codes}


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """An answer other than 200, raised anywhere in a route; the handler turns it into {"error": message}."""

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


def cluster_http_error(exc: ClusterError, *, infer: bool, broker: str) -> HTTPError:
    """The HTTP status (and metrics outcome) for an error the bus reported."""
    text = str(exc)
    if isinstance(exc, BadRequestError):
        return HTTPError(400, text, "bad_request")
    if isinstance(exc, ModelNotFoundError):
        return HTTPError(404, text, "not_found")
    if isinstance(exc, OverloadedError):
        return HTTPError(429, text, "overloaded", {"Retry-After": "1"})
    if isinstance(exc, NoAgentAvailableError):
        return HTTPError(503, text, "unavailable")
    if isinstance(exc, InferenceTimeoutError):
        if infer:
            return HTTPError(504, text, "timeout")
        return HTTPError(503, f"the cluster's broker at {broker} is not answering ({text})", "unavailable")
    if isinstance(exc, InferenceFailedError):
        return HTTPError(500, text, "failed")
    return HTTPError(502, f"the cluster reported an error: {text}", "error")


def parse_version(name: str, version: str | None) -> int | None:
    """A version path segment as the bus's int; 404 for anything that cannot be a version."""
    if version is None:
        return None
    if not (version.isascii() and version.isdigit()) or len(version) > 18:
        raise HTTPError(404, f"model '{name}' has no version '{version[:40]}'", "not_found")
    return int(version)


# ---------------------------------------------------------------------------------------------------------------
# The edge's state: one bus client, the metrics, the limits
# ---------------------------------------------------------------------------------------------------------------


class Edge:
    def __init__(self, broker: str, max_body_bytes: int, frontend_path: Path, request_timeout: float | None, query_timeout: float) -> None:
        self.broker = broker
        self.max_body_bytes = max_body_bytes
        self.frontend_path = frontend_path
        self.request_timeout = request_timeout
        self.query_timeout = query_timeout
        self.metrics = EdgeMetrics()
        self.client: AsyncClient | None = None

    async def query(self, call):
        """Await a bus query, turning its errors into HTTP errors (a query that times out means no broker: 503)."""
        try:
            return await call
        except ClusterError as exc:
            raise cluster_http_error(exc, infer=False, broker=self.broker) from None

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 past the limit (announced or counted) and decompressed if need be."""
        limit = self.max_body_bytes
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity", "gzip", "deflate"):
            raise HTTPError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or no encoding", "bad_request")
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
            body = self._decompress(body, encoding, limit)
        return body

    @staticmethod
    def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
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


def get_edge(request: Request) -> Edge:
    return request.app.state.edge


router = APIRouter()


# ---------------------------------------------------------------------------------------------------------------
# Open Inference Protocol: health and metadata
# ---------------------------------------------------------------------------------------------------------------


@router.get("/v2/health/live", response_model=ServerLive, tags=["health"], summary="Server live")
async def server_live() -> Response:
    """200 while the edge can take requests."""
    return json_response({"live": True})


@router.get(
    "/v2/health/ready", response_model=ServerReady, tags=["health"], summary="Server ready",
    responses={503: {"model": ServerReady, "description": "The broker does not answer, or no agent is live."}},
)
async def server_ready(request: Request) -> Response:
    """200 when the broker answers and at least one agent is live (and not draining); 503 otherwise."""
    edge = get_edge(request)
    try:
        agents = await edge.client.agents(timeout=edge.query_timeout)
    except ClusterError as exc:
        return json_response({"ready": False, "error": cluster_http_error(exc, infer=False, broker=edge.broker).message}, 503)
    if not any(not a.get("draining") for a in agents):
        return json_response({"ready": False, "error": "no live agent is connected to the cluster"}, 503)
    return json_response({"ready": True})


@router.get("/v2", response_model=ServerMetadata, tags=["metadata"], summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": SERVER_NAME, "version": _server_version(), "extensions": EXTENSIONS})


async def _model_metadata(edge: Edge, name: str, version: str | None) -> dict:
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


@router.get("/v2/models/{name}", response_model=ModelMetadata, tags=["metadata"], summary="Model metadata", responses=_errors(404, 503))
async def model_metadata(request: Request, name: str) -> Response:
    return json_response(_metadata_body(await _model_metadata(get_edge(request), name, None)))


@router.get(
    "/v2/models/{name}/versions/{version}", response_model=ModelMetadata, tags=["metadata"],
    summary="Model metadata (one version)", responses=_errors(404, 503),
)
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(_metadata_body(await _model_metadata(get_edge(request), name, version)))


async def _model_ready(edge: Edge, name: str, version: str | None) -> Response:
    meta = await _model_metadata(edge, name, version)
    ready = bool(meta.get("ready"))
    return json_response({"name": name, "ready": ready}, 200 if ready else 503)


_READY_RESPONSES = {503: {"model": ModelReady, "description": "Known to the cluster but no live agent serves it."}, 404: ERRORS[404]}


@router.get("/v2/models/{name}/ready", response_model=ModelReady, tags=["health"], summary="Model ready", responses=_READY_RESPONSES)
async def model_ready(request: Request, name: str) -> Response:
    """200 when a live agent serves the model's newest version; 503 when none does; 404 for an unknown model."""
    return await _model_ready(get_edge(request), name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready", response_model=ModelReady, tags=["health"],
    summary="Model ready (one version)", responses=_READY_RESPONSES,
)
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return await _model_ready(get_edge(request), name, version)


# ---------------------------------------------------------------------------------------------------------------
# Open Inference Protocol: inference
# ---------------------------------------------------------------------------------------------------------------

_INFER_DOC = dict(
    tags=["inference"],
    response_model=InferenceResponse,
    responses={
        200: {
            "description": "The outputs. With binary outputs the body is the JSON followed by their bytes, and "
            "`Inference-Header-Content-Length` gives the JSON length.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **_errors(400, 404, 413, 415, 429, 500, 502, 503, 504),
    },
    openapi_extra={
        "parameters": [
            {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "Binary tensor extension: length of the JSON part; binary input data follows it.",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "An InferenceRequest JSON followed by the raw bytes of inputs with binary_data_size.",
                },
            },
        },
    },
)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    edge = get_edge(request)
    metrics = edge.metrics
    started = time.perf_counter()
    outcome = "error"
    metrics.in_flight.inc()
    try:
        number = parse_version(name, version)
        body = await edge.read_body(request)
        parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH))
        timeout = parsed.timeout if parsed.timeout is not None else edge.request_timeout
        result = await edge.client.infer(name, parsed.inputs, version=number, timeout=timeout, outputs=parsed.outputs)
        metrics.confirm_model(name)
        metrics.observe_batching(name, result.batch_size, result.queue_seconds)
        served_by = {"agent": result.agent} if isinstance(result.agent, str) else None
        content, headers = oip.encode_infer_response(result.model or name, result.version, result.outputs, parsed, served_by)
        outcome = "success"
        return Response(content, headers=headers)
    except oip.InvalidRequest as exc:
        outcome = "bad_request"
        return error_response(400, str(exc))
    except HTTPError as exc:
        outcome = exc.outcome
        return error_response(exc.status, exc.message, exc.headers)
    except ClusterError as exc:
        error = cluster_http_error(exc, infer=True, broker=edge.broker)
        outcome = error.outcome
        if isinstance(exc, (InferenceFailedError, OverloadedError)):  # the cluster has the model
            metrics.confirm_model(name)
        return error_response(error.status, error.message, error.headers)
    finally:
        metrics.in_flight.dec()
        metrics.observe(name, outcome, time.perf_counter() - started)


@router.post("/v2/models/{name}/infer", summary="Inference", **_INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    """Run the model's newest version served by a live agent on the inputs."""
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference (one version)", **_INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


# ---------------------------------------------------------------------------------------------------------------
# The cluster, the metrics, the page
# ---------------------------------------------------------------------------------------------------------------


@router.get("/agents", response_model=list[AgentInfo], tags=["cluster"], summary="Live agents", responses=_errors(503))
async def agents(request: Request) -> Response:
    """The live agents as the broker sees them: host, models, requests in flight, capacity, heartbeat age."""
    edge = get_edge(request)
    found = await edge.query(edge.client.agents(timeout=edge.query_timeout))
    return json_response(sorted(found, key=lambda a: str(a.get("id"))))


@router.get("/models", response_model=dict[str, ModelListing], tags=["cluster"], summary="Deployed models", responses=_errors(503))
async def models(request: Request) -> Response:
    """Every model a live agent serves: name -> {versions, agents}. (The OIP has no list endpoint.)"""
    edge = get_edge(request)
    found = await edge.query(edge.client.models(timeout=edge.query_timeout))
    for name in found:
        edge.metrics.confirm_model(name)
    return json_response(found)


@router.get(
    "/metrics", tags=["cluster"], summary="Prometheus metrics",
    responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    edge = get_edge(request)
    try:
        found = await edge.client.agents(timeout=min(1.0, edge.query_timeout))
        edge.metrics.set_cluster(len(found))
    except ClusterError:
        edge.metrics.set_cluster(None)
    return Response(edge.metrics.render(), media_type=edge.metrics.content_type)


@router.get(
    "/", tags=["page"], summary="The web page",
    responses={200: {"description": "frontend.html", "content": {"text/html": {"schema": {"type": "string"}}}}, 404: ERRORS[404]},
)
async def page(request: Request) -> Response:
    path = get_edge(request).frontend_path
    if not path.is_file():
        return error_response(404, f"the page {path.name} is not installed with this edge")
    return FileResponse(path, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------


def create_app(
    broker_address: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    frontend_path: str | Path | None = None,
    request_timeout: float | None = None,
    query_timeout: float = 2.0,
) -> FastAPI:
    """The edge for the broker at `broker_address` (its client address, e.g. tcp://127.0.0.1:5555).

    max_body_bytes: largest request body (after decompression); frontend_path: the page served at / (default: the
    repository's frontend.html); request_timeout: default inference deadline in seconds (default: the client's, 30 s);
    query_timeout: how long health, metadata and cluster views wait for the broker.
    """
    edge = Edge(broker_address, max_body_bytes, Path(frontend_path) if frontend_path else default_frontend(), request_timeout, query_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with AsyncClient(broker_address, timeout=request_timeout, fail_fast=True) as client:
            edge.client = client
            try:
                yield
            finally:
                edge.client = None

    app = FastAPI(
        title="torch-serving-cluster edge",
        version=_server_version(),
        description="Open Inference Protocol (KServe V2) REST in front of the cluster's bus, with Triton's binary "
        "tensor extension, a live view of the cluster, Prometheus metrics and a web page. Errors are "
        '`{"error": "<message>"}`.',
        lifespan=lifespan,
    )
    app.state.edge = edge
    app.include_router(router)

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

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for operations in schema.get("paths", {}).values():  # path parameters are plain strings: no 422 here
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            request_schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(request_schema.pop("$defs", {}))
            components["InferenceRequest"] = request_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def run_edge(
    host: str = "127.0.0.1",
    port: int = 8000,
    broker: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    frontend_path: str | Path | None = None,
    request_timeout: float | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve the edge with uvicorn until SIGINT/SIGTERM (blocking). broker: the broker's client address
    (default CLUSTER_BROKER_CLIENTS, else tcp://127.0.0.1:5555)."""
    import uvicorn

    from cluster.config import BROKER_CLIENT_ADDR, env_or

    app = create_app(
        broker or env_or("BROKER_CLIENTS", BROKER_CLIENT_ADDR),
        max_body_bytes=max_body_bytes,
        frontend_path=frontend_path,
        request_timeout=request_timeout,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=access_log, timeout_graceful_shutdown=5)
