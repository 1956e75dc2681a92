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
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster import AsyncClient
from cluster.logs import logging_config
from cluster.manager.client import AsyncManagerClient
from cluster.role_settings import EdgeSettings
from cluster.serving import serve_http
from cluster.settings import from_env
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
DEFAULT_MAX_BODY = EdgeSettings.max_body_bytes  # the defaults (the settings: EdgeSettings, cluster/role_settings.py)
DEFAULT_MAX_JSON_BODY = EdgeSettings.max_json_body  # JSON costs several times its size to decode: a lower limit
DOCS_ASSETS = "/docs-assets"  # where /docs and /redoc find Swagger UI's and ReDoc's files
DEFAULT_QUERY_TIMEOUT = EdgeSettings.edge_query_timeout  # the default (settings: EdgeSettings.edge_query_timeout)


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
    settings: EdgeSettings | None = None,
    *,
    client: Any = None,
    manager: Any = None,
    grpc_address: str | None = None,
    grpc_tls: tuple[str, str] | None = None,
) -> FastAPI:
    """The edge with these settings (EdgeSettings, cluster/role_settings.py; None: its
    CLUSTER_* variables over the defaults): its broker
    (that of `client` when one is brought), body limits, page, request timeout, tokens (and token files), allowed hosts,
    CORS origins, bus key and manager are the settings'; see `cluster config edge`.

    client: the bus client to use instead of the AsyncClient the app otherwise opens at startup and closes at
    shutdown: any object with AsyncClient's coroutines (infer, agents, models, model_metadata), e.g. a fake in
    tests. The caller owns it (the app does not close it). manager: an object with AsyncManagerClient's `call` and
    `address` to use instead of the AsyncManagerClient of the settings' manager address (a fake in tests).
    grpc_address: host:port (port 0: any) where the app's lifespan also serves the OIP over gRPC (None: no gRPC);
    grpc_tls: (certificate, key) PEM files gRPC serves TLS with (run_edge gives the HTTPS edge's own).
    """
    settings = settings or from_env(EdgeSettings)
    broker = getattr(client, "address", None) or settings.addresses.broker_clients  # the one it talks to
    frontend_path = settings.edge_frontend
    request_timeout = settings.timings.request_timeout
    query_timeout = settings.edge_query_timeout
    key = settings.key
    # given as options or variables (several to a value, comma- or space-separated) and in token files
    tokens = split_tokens([*settings.edge_token, *(t for f in settings.edge_token_file for t in read_token_file(f))])
    admin_tokens = split_tokens(
        [*settings.edge_admin_token, *(t for f in settings.edge_admin_token_file for t in read_token_file(f))]
    )
    allowed_hosts = hosts_for_bind(settings.edge_host, settings.edge_allowed_hosts)
    cors_origins = settings.edge_cors_origins
    page = Path(frontend_path) if frontend_path else default_frontend()
    security = EdgeSecurity(tokens, admin_tokens, tuple(allowed_hosts), tuple(cors_origins))
    if manager is None:
        manager_key = settings.edge_manager_key
        manager = AsyncManagerClient(
            settings.addresses.manager_queries, key=manager_key if manager_key is not None else key
        )
    json_limit = settings.max_json_body
    edge = DataPlane(
        broker,
        settings.max_body_bytes,
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


def run_edge(settings: EdgeSettings | None = None, *, ready_file: str | Path | None = None) -> None:
    """Serve the edge with uvicorn until SIGINT/SIGTERM (blocking), as its settings say (None: its CLUSTER_*
    variables): on edge_host:edge_port (port 0: any free port), HTTPS with edge_ssl_certfile + edge_ssl_keyfile
    (PEM); a non-loopback host is added to the allowed hosts (every address, 0.0.0.0: a warning instead); the OIP
    gRPC service also listens on edge_grpc_port, on edge_grpc_host (default: edge_host), in the same event loop (0:
    no gRPC; -1: any free port), reported in the ready file as "grpc": "host:port"; ready_file: where to report the
    URL once it serves (cluster.local reads it)."""
    settings = settings or from_env(EdgeSettings)
    host, ssl_certfile, ssl_keyfile = settings.edge_host, settings.edge_ssl_certfile, settings.edge_ssl_keyfile
    grpc_port = settings.edge_grpc_port
    try:
        if bool(ssl_certfile) != bool(ssl_keyfile):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for path in (ssl_certfile, ssl_keyfile):
            if path and not Path(path).is_file():
                raise ValueError(f"no such file: {path}")
        tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
        app = create_app(
            settings,
            grpc_address=None
            if grpc_port == 0
            else format_grpc_address(settings.edge_grpc_host or host, max(grpc_port, 0)),
            # with TLS, gRPC serves the same certificate: tokens and model loads never travel in the clear
            grpc_tls=(str(ssl_certfile), str(ssl_keyfile)) if ssl_certfile else None,
        )
        if grpc_port < -1 or grpc_port > 65535:
            raise ValueError(f"--grpc-port {grpc_port} is not a port (0: no gRPC, -1: any free port)")
    except (ValueError, OSError) as exc:  # a bad option: say which, no traceback
        logging.getLogger("edge").error("cannot start the edge: %s", exc)
        sys.exit(2)
    log_level, log_format = settings.log_level, settings.log_format
    serve_http(
        app,
        host,
        settings.edge_port,
        ready_file=ready_file,
        loop="auto",  # uvloop and httptools (setup.py installs them), else asyncio and h11
        http="auto",
        log_level=log_level.lower(),
        log_config=logging_config("edge", log_level, log_format),  # ours and uvicorn's loggers, text or JSON
        access_log=settings.edge_access_log,
        timeout_graceful_shutdown=5,
        extra_addresses=lambda: {"grpc": app.state.edge.grpc_address} if app.state.edge.grpc_address else {},
        **tls,
    )
