"""Triton's statistics extension, summed over the cluster's live agents; and the same counts for Prometheus.

Every request, whatever door it came in by (the bus client, REST, gRPC), is counted by the agent that ran it
(in cluster/statistics.py's format, which the edge sums); agents send their counts in heartbeats and the broker
answers the latest of each live agent (`statistics` query). So an agent that leaves takes its counts out of the
sums, and a count lags a request by at most one heartbeat interval.

The edge's data plane sums them (edge/dataplane.py: `DataPlane.model_statistics`, which gRPC calls too); `router`
serves `GET /v2/models/stats`, `/v2/models/{m}/stats` and `/v2/models/{m}/versions/{v}/stats`. It must be included
before edge/routes.py's `router`, whose `/v2/models/{name}` would otherwise take "stats" for a model's name.
edge/metrics.py turns the same `statistics` answer into Prometheus metrics in Triton's names at each scrape.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from edge.errors import json_response
from edge.routes import get_edge
from edge.security import TOKEN

router = APIRouter(dependencies=[TOKEN])  # a token, when the edge has tokens (as edge/routes.py's `router`)


@router.get("/v2/models/stats", tags=["statistics"], summary="Statistics of every model")
async def all_statistics(request: Request) -> Response:
    return json_response(await get_edge(request).model_statistics(None, None))


@router.get("/v2/models/{name}/stats", tags=["statistics"], summary="Statistics of one model")
async def statistics_of_model(request: Request, name: str) -> Response:
    return json_response(await get_edge(request).model_statistics(name, None))


@router.get("/v2/models/{name}/versions/{version}/stats", tags=["statistics"], summary="Statistics of one version")
async def statistics_of_version(request: Request, name: str, version: str) -> Response:
    return json_response(await get_edge(request).model_statistics(name, version))
