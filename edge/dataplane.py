"""The edge's data plane (KServe's `DataPlane`): its state and what it does, whatever the surface.

One `DataPlane` per app (the app's `state.edge`): the bus client, the manager client, the limits, deadlines, tokens
and the metrics. It answers readiness, server and model metadata, model config, statistics and inference, and counts
every inference in the metrics, for both surfaces: the REST routes and the raw ASGI infer path (edge/routes.py) and
the gRPC servicer (edge/grpc_service.py) only turn their requests into these calls and the answers (or HTTPError,
whose status gRPC maps to a code) back into their own form.

Inference is split so that a surface keeps its own reading and encoding: `infer_started` / `infer_finished`
bracket a request for the metrics (in flight, outcome, latency, by protocol), `infer` is the bus call and
`infer_answered` counts its answer, and `infer_error` turns whatever a request raised into the HTTPError both
surfaces answer with (its `outcome` the metrics label).
"""

from __future__ import annotations

import asyncio
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from cluster.errors import ClusterError, InferenceFailedError, OverloadedError
from cluster.protocol import What
from cluster.statistics import ModelStats, merge
from edge import oip
from edge.body import ClientDisconnected, mib
from edge.errors import HTTPError, cluster_http_error
from edge.metrics import EdgeMetrics
from edge.security import EdgeSecurity
from edge.triton_config import triton_model_config

SERVER_NAME = "torch-serving-cluster"
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository", "model_configuration"]
# what an inference request may raise that has an answer (anything else: 500, outcome "error")
INFER_ERRORS = (oip.InvalidRequest, ClientDisconnected, HTTPError, ClusterError)


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        return "0.1.0"


def new_request_id() -> str:
    """An id for a request that came without one (the OIP `id` is optional), so that its log lines can be found."""
    return f"edge-{os.urandom(8).hex()}"


def parse_version(name: str, version: str | None) -> int | None:
    """A version as the bus's int (None or "": the newest); 404 for anything that cannot be a version."""
    if not version:
        return None
    if not (version.isascii() and version.isdigit()) or len(version) > 18:
        raise HTTPError(404, f"model '{name}' has no version '{version[:40]}'", "not_found")
    return int(version)


def metadata_body(meta: dict) -> dict:
    """The OIP model metadata of a bus `model_metadata` answer."""
    versions = meta.get("versions") or ([meta["version"]] if meta.get("version") is not None else [])
    body = {
        "name": meta.get("name"),
        "versions": [str(v) for v in versions],
        "platform": meta.get("platform") or "",
        "inputs": meta.get("inputs") or [],
        "outputs": meta.get("outputs") or [],
    }
    if isinstance(meta.get("runs"), str):  # what the agent runs: "aoti" (a compiled package), "exported", ...
        body["runs"] = meta["runs"]
    return body


class DataPlane:
    """The edge's state and operations (module docstring). max_body_bytes: the largest body; max_json_bytes: the
    largest JSON (a whole body without the binary extension, or the JSON part of one with it), at most
    max_body_bytes (default: the same).

    client: anything with AsyncClient's coroutines (infer, agents, models, model_metadata, statistics); set by the
    app's lifespan. manager: the lifecycle manager's client (cluster.manager.client.AsyncManagerClient: `call` and
    `address`), for the repository extension (edge/repository.py) and the rollout metrics.
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

    # ---- health and metadata ------------------------------------------------------------------------------------

    async def server_ready(self) -> str | None:
        """None when the broker answers and at least one agent is live (and not draining); else why not."""
        try:
            agents = await self.client.agents(timeout=self.query_timeout)
        except ClusterError as exc:
            return cluster_http_error(exc, infer=False, broker=self.broker).message
        if not any(not a.get("draining") for a in agents):
            return "no live agent is connected to the cluster"
        return None

    @staticmethod
    def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}

    async def bus_metadata(self, name: str, version: str | None) -> dict:
        """The bus's `model_metadata` answer (HTTPError 404 for an unknown model or version)."""
        meta = await self.query(
            self.client.model_metadata(name, parse_version(name, version), timeout=self.query_timeout)
        )
        self.metrics.confirm_model(name)
        return meta

    async def model_metadata(self, name: str, version: str | None) -> dict:
        return metadata_body(await self.bus_metadata(name, version))

    async def model_ready(self, name: str, version: str | None) -> bool:
        """Whether a live agent serves the model (its newest version, or `version`); 404 for an unknown model."""
        return bool((await self.bus_metadata(name, version)).get("ready"))

    async def model_config(self, name: str, version: str | None) -> dict:
        """The model's config as Triton's model config JSON (edge/triton_config.py)."""
        return triton_model_config(await self.bus_metadata(name, version))

    # ---- statistics and metrics -----------------------------------------------------------------------------

    async def model_statistics(self, name: str | None, version: str | None) -> dict:
        """Triton's `{"model_stats": [...]}`: one entry per (model, version), summed over live agents. A model the
        cluster knows but no agent has counted yet gets zeros. Unknown model: HTTPError 404."""
        if name is not None:
            parse_version(name, version)  # 404 for a version that cannot be one
        answer = await self.query(self.client.statistics(name, version, timeout=self.query_timeout))
        summed = []
        for _key, entries in sorted(_entries(answer.get("agents") or {}).items()):
            total = merge(entries)
            total.pop("failures", None)
            summed.append(total)
        if name is not None:
            self.metrics.confirm_model(name)
            if not summed:
                versions = [version] if version is not None else [str(v) for v in await self._served_versions(name)]
                summed = [ModelStats(name, v).to_triton() for v in versions]
        return {"model_stats": summed}

    async def _served_versions(self, name: str) -> list:
        served = await self.query(self.client.models(timeout=self.query_timeout))
        return sorted((served.get(name) or {}).get("versions") or [])

    async def render_metrics(self) -> bytes:
        """The Prometheus text: the edge's own metrics, the cluster's (one `statistics` query to the broker) and
        the rollouts (one `rollouts` query to the manager); either of the last two may be missing (not answering)."""
        timeout = min(1.0, self.query_timeout)
        try:
            found = await self.client.agents(timeout=timeout)
            self.metrics.set_cluster(len(found))
        except ClusterError:
            self.metrics.set_cluster(None)
        cluster, rollouts = await asyncio.gather(
            self.client.statistics(timeout=timeout),
            self.manager.call(What.ROLLOUTS, timeout) if self.manager is not None else asyncio.sleep(0),
            return_exceptions=True,
        )
        cluster = None if isinstance(cluster, BaseException) else cluster
        rollouts = rollouts if isinstance(rollouts, dict) else None
        return self.metrics.render(cluster, rollouts)

    # ---- inference --------------------------------------------------------------------------------------------

    def infer_started(self) -> float:
        """A request comes in: counted in flight; returns its start time for `infer_finished`."""
        self.metrics.requests_in_flight += 1
        return time.perf_counter()

    def infer_finished(self, name: str, outcome: str, started: float, protocol: str) -> float:
        """A request is answered (`outcome`: success or an HTTPError's outcome): counted; returns its seconds."""
        self.metrics.requests_in_flight -= 1
        seconds = time.perf_counter() - started
        self.metrics.observe(name, outcome, seconds, protocol)
        return seconds

    def infer(self, name: str, inputs: dict, version: int | None, timeout: float | None, outputs, request_id):
        """The bus call as an awaitable (timeout None: the edge's default deadline); it raises the cluster's errors
        (`infer_error` maps them). Await it, then give its result to `infer_answered`. Not a coroutine of its own:
        the hot path pays for one bus coroutine per request, not two."""
        return self.client.infer(
            name,
            inputs,
            version=version,
            timeout=timeout if timeout is not None else self.request_timeout,
            outputs=outputs,
            request_id=request_id,
        )

    def infer_answered(self, name: str, result) -> None:
        """The bus answered: the model is confirmed (its own metrics label) and its batching counted."""
        self.metrics.confirm_model(name)
        self.metrics.observe_batching(name, result.batch_size, result.queue_seconds)

    def infer_error(self, exc: Exception, name: str) -> HTTPError:
        """The answer to an inference request that raised `exc` (one of INFER_ERRORS), as both surfaces give it."""
        if isinstance(exc, HTTPError):
            return exc
        if isinstance(exc, oip.InvalidRequest):
            return HTTPError(400, str(exc), "bad_request")
        if isinstance(exc, ClientDisconnected):  # nobody reads it
            return HTTPError(499, "the client closed the connection; the request was cancelled", "cancelled")
        if isinstance(exc, (InferenceFailedError, OverloadedError)):  # the cluster has the model
            self.metrics.confirm_model(name)
        return cluster_http_error(exc, infer=True, broker=self.broker)


def _entries(per_agent: dict) -> dict[tuple[str, str], list[dict]]:
    """(model, version) -> the entries of every agent that reported it."""
    found: dict[tuple[str, str], list[dict]] = {}
    for models in per_agent.values():
        for model, versions in (models or {}).items():
            for version, entry in (versions or {}).items():
                if isinstance(entry, dict):
                    found.setdefault((model, str(version)), []).append(entry)
    return found
