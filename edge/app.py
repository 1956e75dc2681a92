"""The HTTP edge's app: `create_app` builds the FastAPI app around one long-lived bus client, `run_edge` serves it.

A thin app with no model logic: each HTTP request becomes one call on the bus client. Where things are:
edge/dataplane.py the edge's state and operations (REST and gRPC call the same), edge/routes.py the routes,
edge/schemas.py the bodies the OpenAPI document shows, edge/errors.py the statuses of errors, edge/body.py the body
limit and encodings, edge/oip.py OIP JSON and binary tensors <-> numpy, edge/metrics.py the Prometheus metrics,
edge/security.py tokens, allowed hosts and CORS. The command line is
`cluster edge` or `python3 -m edge` (both run edge/command.py).
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster import AsyncClient
from cluster.config import EDGE_GRPC_PORT, default_address
from cluster.logs import logging_config
from cluster.manager.client import AsyncManagerClient
from cluster.serving import serve_http
from edge.dataplane import DataPlane, server_version
from edge.errors import install_error_handlers
from edge.grpc_service import grpc_address as format_grpc_address
from edge.grpc_service import serving as grpc_serving
from edge.repository import router as repository_router
from edge.routes import InferPath, public, router
from edge.schemas import ERRORS, InferenceRequest
from edge.security import (
    CORS_EXPOSED,
    CORS_HEADERS,
    EdgeSecurity,
    RequestGuard,
    hosts_for_bind,
    read_token_file,
    split_tokens,
)
from edge.statistics import router as statistics_router

REPO_ROOT = Path(__file__).resolve().parent.parent
# The page: frontend.html at the repository root (a source checkout or editable install), else where setup.py's
# data_files put it in an installed environment.
FRONTEND_CANDIDATES = (
    REPO_ROOT / "frontend.html",
    Path(sys.prefix) / "share" / "torch-serving-cluster" / "frontend.html",
)
DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_MAX_JSON_BODY = 32 * 1024 * 1024  # JSON costs several times its size to decode: a lower limit
DOCS_ASSETS = "/docs-assets"  # where /docs and /redoc find Swagger UI's and ReDoc's files
DEFAULT_QUERY_TIMEOUT = 2.0  # seconds health, metadata and the cluster views wait for the broker


class EdgeFastAPI(FastAPI):
    """FastAPI whose HTTP requests meet the edge's own layers first (`front`: RequestGuard, CORS, InferPath, set by
    create_app), before FastAPI's per-request telemetry check, middleware stack and routing: together those took more
    of the edge's CPU than the bus call (py-spy), so an inference POST is answered in front of them. Every other
    request goes on through `fastapi_call`, FastAPI as usual."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] == "http":
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def fastapi_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def default_frontend() -> Path:
    return next((p for p in FRONTEND_CANDIDATES if p.is_file()), FRONTEND_CANDIDATES[0])


def create_app(
    broker_address: str | None = None,
    *,
    client: Any = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_json_bytes: int | None = None,
    frontend_path: str | Path | None = None,
    request_timeout: float | None = None,
    query_timeout: float = DEFAULT_QUERY_TIMEOUT,
    tokens: Iterable[str] = (),
    admin_tokens: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] = (),
    key: str | None = None,
    grpc_address: str | None = None,
    grpc_tls: tuple[str, str] | None = None,
    manager_address: str | None = None,
    manager: Any = None,
    manager_key: str | None = None,
) -> FastAPI:
    """The edge for the broker at `broker_address` (its client address, e.g. tcp://127.0.0.1:5555; default
    CLUSTER_BROKER_CLIENTS, else tcp://127.0.0.1:5555).

    client: the bus client to use instead of the AsyncClient the app otherwise opens at startup and closes at
    shutdown: any object with AsyncClient's coroutines (infer, agents, models, model_metadata), e.g. a fake in
    tests. The caller owns it (the app does not close it). max_body_bytes: largest request body (after
    decompression); max_json_bytes: largest JSON, a body without the binary extension or the JSON part of one with
    it (default: DEFAULT_MAX_JSON_BODY, 32 MiB; never above max_body_bytes); frontend_path: the page served at /
    (default: the repository's frontend.html); request_timeout: default inference deadline in seconds (default: the
    client's, 30 s); query_timeout: how long health, metadata and cluster views wait for the broker.

    tokens / admin_tokens: bearer tokens (none: every route is open); allowed_hosts: Host names served besides the
    loopback ones ('*': any); cors_origins: browser origins allowed to call the edge (edge/security.py); key: the
    bus key file (`cluster keys add NAME --role client`) the edge's own AsyncClient presents (None: in the clear).
    grpc_address: host:port (port 0: any) where the app's lifespan also serves the OIP over gRPC (None: no gRPC);
    grpc_tls: (certificate, key) PEM files gRPC serves TLS with (run_edge gives the HTTPS edge's own).

    manager_address: the lifecycle manager's query address, for the repository extension (load, unload, index) and
    the rollout metrics (default CLUSTER_MANAGER_QUERIES, else tcp://127.0.0.1:5559); manager_key: the key the edge
    presents to it (default `key`; loads and unloads need an admin key when the cluster runs with keys); manager:
    an object with AsyncManagerClient's `call` and `address` to use instead (a fake in tests).
    """
    broker = broker_address or getattr(client, "address", None) or default_address()
    page = Path(frontend_path) if frontend_path else default_frontend()
    security = EdgeSecurity(
        split_tokens(list(tokens)), split_tokens(list(admin_tokens)), tuple(allowed_hosts), tuple(cors_origins)
    )
    if manager is None:
        manager = AsyncManagerClient(manager_address, key=manager_key if manager_key is not None else key)
    json_limit = DEFAULT_MAX_JSON_BODY if max_json_bytes is None else max_json_bytes
    edge = DataPlane(
        broker,
        max_body_bytes,
        page,
        request_timeout,
        query_timeout,
        security,
        manager=manager,
        max_json_bytes=json_limit,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            if client is not None:
                edge.client = client
                async with grpc_serving(edge, grpc_address, tls=grpc_tls):
                    yield
            else:
                async with AsyncClient(broker, timeout=request_timeout, fail_fast=True, key=key) as own:
                    edge.client = own
                    async with grpc_serving(edge, grpc_address, tls=grpc_tls):
                        # the objects of the start (the imports and the app: ~200k while torch was imported) are
                        # left out of every later garbage collection: a full collection of them took ~100 ms, a
                        # stall that showed in the edge's p99 latency
                        gc.freeze()
                        yield
        finally:
            edge.client = None

    # /docs (Swagger UI) and /redoc with their scripts served by the edge itself (fastapi-offline), not a CDN: the
    # edge is often where there is no internet
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="torch-serving-cluster edge",
        version=server_version(),
        description="Open Inference Protocol (KServe V2) REST in front of the cluster's bus, with Triton's binary "
        "tensor extension, a live view of the cluster, Prometheus metrics and a web page. Errors are "
        '`{"error": "<message>"}`.',
        lifespan=lifespan,
    )
    app.__class__ = EdgeFastAPI  # FastAPIOffline makes a FastAPI; this subclass adds only the `front` layers
    app.state.edge = edge
    app.include_router(public)
    app.include_router(statistics_router)  # before `router`: /v2/models/stats is not model "stats"
    app.include_router(repository_router)
    app.include_router(router)
    install_error_handlers(app)

    # The edge's own layers in front of FastAPI: RequestGuard outermost (Host, Origin), then CORS (with
    # --cors-origin), then InferPath, then FastAPI itself (its telemetry check, middleware stack and routing)
    front: ASGIApp = InferPath(app.fastapi_call, edge)
    if security.cors_origins:
        front = CORSMiddleware(
            front,
            allow_origins=list(security.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=CORS_HEADERS,
            expose_headers=CORS_EXPOSED,
            max_age=600,
        )
    app.front = RequestGuard(front, security=security)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for operations in schema.get("paths", {}).values():  # path parameters are plain strings: no 422 here
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            # the infer routes read the raw body (JSON or the binary extension), so FastAPI does not see the
            # request model: add it by hand, where the routes' requestBody points
            request_schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(request_schema.pop("$defs", {}))
            components["InferenceRequest"] = request_schema
            _bearer_in_openapi(schema, security.auth)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _bearer_in_openapi(schema: dict, auth: bool) -> None:
    """With tokens, every operation that needs one (FastAPI marked it `security`, from edge.security.BEARER) also
    lists its 401; without tokens, the scheme is left out altogether (the routes are open)."""
    components = schema.setdefault("components", {})
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "security" not in operation:
                continue
            if not auth:
                del operation["security"]
                continue
            operation.setdefault("responses", {})["401"] = {
                "description": ERRORS[401]["description"],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            }
    if not auth:
        components.pop("securitySchemes", None)


def run_edge(
    host: str = "127.0.0.1",
    port: int = 8000,
    broker: str | None = None,
    *,
    max_body_bytes: int | None = None,
    max_json_bytes: int | None = None,
    frontend_path: str | Path | None = None,
    request_timeout: float | None = None,
    log_level: str = "info",
    log_format: str = "text",
    access_log: bool = False,
    ready_file: str | Path | None = None,
    tokens: Iterable[str] = (),
    token_files: Iterable[str | Path] = (),
    admin_tokens: Iterable[str] = (),
    admin_token_files: Iterable[str | Path] = (),
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] = (),
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
    key: str | None = None,
    grpc_port: int = EDGE_GRPC_PORT,
    grpc_host: str | None = None,
    manager_address: str | None = None,
    manager_key: str | None = None,
) -> None:
    """Serve the edge with uvicorn until SIGINT/SIGTERM (blocking). broker: the broker's client address
    (default CLUSTER_BROKER_CLIENTS, else tcp://127.0.0.1:5555); max_body_bytes: default DEFAULT_MAX_BODY (64 MiB);
    max_json_bytes: default DEFAULT_MAX_JSON_BODY (32 MiB, at most max_body_bytes);
    port 0: any free port; ready_file: where to report the URL once it serves (cluster.local reads it);
    token_files / admin_token_files: more tokens, one a line; ssl_certfile + ssl_keyfile (PEM): serve HTTPS; a
    non-loopback `host` is added to allowed_hosts (every address, 0.0.0.0: a warning instead); the rest as in
    create_app; grpc_port: where the OIP gRPC service also listens, on grpc_host (default: `host`), in the same event
    loop (0: no gRPC; -1: any free port), reported in the ready file as "grpc": "host:port"; manager_address and
    manager_key as in create_app."""
    try:
        if bool(ssl_certfile) != bool(ssl_keyfile):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for path in (ssl_certfile, ssl_keyfile):
            if path and not Path(path).is_file():
                raise ValueError(f"no such file: {path}")
        tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
        app = create_app(
            broker,
            max_body_bytes=DEFAULT_MAX_BODY if max_body_bytes is None else max_body_bytes,
            max_json_bytes=max_json_bytes,
            frontend_path=frontend_path,
            request_timeout=request_timeout,
            key=key,
            manager_address=manager_address,
            manager_key=manager_key,
            tokens=[*split_tokens(list(tokens)), *(t for f in token_files for t in read_token_file(f))],
            admin_tokens=[
                *split_tokens(list(admin_tokens)),
                *(t for f in admin_token_files for t in read_token_file(f)),
            ],
            allowed_hosts=hosts_for_bind(host, allowed_hosts),
            cors_origins=cors_origins,
            grpc_address=None if grpc_port == 0 else format_grpc_address(grpc_host or host, max(grpc_port, 0)),
            # with TLS, gRPC serves the same certificate: tokens and model loads never travel in the clear
            grpc_tls=(str(ssl_certfile), str(ssl_keyfile)) if ssl_certfile else None,
        )
        if grpc_port < -1 or grpc_port > 65535:
            raise ValueError(f"--grpc-port {grpc_port} is not a port (0: no gRPC, -1: any free port)")
    except (ValueError, OSError) as exc:  # a bad option: say which, no traceback
        logging.getLogger("edge").error("cannot start the edge: %s", exc)
        sys.exit(2)
    serve_http(
        app,
        host,
        port,
        ready_file=ready_file,
        loop="auto",  # uvloop and httptools (setup.py installs them), else asyncio and h11
        http="auto",
        log_level=log_level.lower(),
        log_config=logging_config("edge", log_level, log_format),  # ours and uvicorn's loggers, text or JSON
        access_log=access_log,
        timeout_graceful_shutdown=5,
        extra_addresses=lambda: {"grpc": app.state.edge.grpc_address} if app.state.edge.grpc_address else {},
        **tls,
    )
