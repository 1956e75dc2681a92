"""Triton's statistics extension, summed over the cluster's live agents; and the same counts for Prometheus.

Every request, whatever door it came in by (the bus client, REST, gRPC), is counted by the agent that ran it
(in cluster/statistics.py's format, which the edge sums); agents send their counts in heartbeats and the broker
answers the latest of each live agent (`statistics` query). So an agent that leaves takes its counts out of the
sums, and a count lags a request by at most one heartbeat interval.

`model_statistics` is transport-neutral (REST here, gRPC may call it too); `router` serves
`GET /v2/models/stats`, `/v2/models/{m}/stats` and `/v2/models/{m}/versions/{v}/stats`. It must be included
before edge/routes.py's `router`, whose `/v2/models/{name}` would otherwise take "stats" for a model's name.
edge/metrics.py turns the same `statistics` answer into Prometheus metrics in Triton's names at each scrape.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cluster.statistics import ModelStats, merge
from edge.errors import json_response
from edge.routes import EdgeState, get_edge, parse_version
from edge.security import TOKEN


def _entries(per_agent: dict) -> dict[tuple[str, str], list[dict]]:
    """(model, version) -> the entries of every agent that reported it."""
    found: dict[tuple[str, str], list[dict]] = {}
    for models in per_agent.values():
        for model, versions in (models or {}).items():
            for version, entry in (versions or {}).items():
                if isinstance(entry, dict):
                    found.setdefault((model, str(version)), []).append(entry)
    return found


async def model_statistics(edge: EdgeState, name: str | None, version: str | None) -> dict:
    """Triton's `{"model_stats": [...]}`: one entry per (model, version), summed over live agents. A model the
    cluster knows but no agent has counted yet gets zeros. Unknown model: ModelNotFoundError turned 404."""
    if name is not None:
        parse_version(name, version)  # 404 for a version that cannot be one
    answer = await edge.query(edge.client.statistics(name, version, timeout=edge.query_timeout))
    summed = []
    for _key, entries in sorted(_entries(answer.get("agents") or {}).items()):
        total = merge(entries)
        total.pop("failures", None)
        summed.append(total)
    if name is not None:
        edge.metrics.confirm_model(name)
        if not summed:
            versions = [version] if version is not None else [str(v) for v in await _served_versions(edge, name)]
            summed = [ModelStats(name, v).to_triton() for v in versions]
    return {"model_stats": summed}


async def _served_versions(edge: EdgeState, name: str) -> list:
    served = await edge.query(edge.client.models(timeout=edge.query_timeout))
    return sorted((served.get(name) or {}).get("versions") or [])


router = APIRouter(dependencies=[TOKEN])  # a token, when the edge has tokens (as edge/routes.py's `router`)


@router.get("/v2/models/stats", tags=["statistics"], summary="Statistics of every model")
async def all_statistics(request: Request) -> Response:
    return json_response(await model_statistics(get_edge(request), None, None))


@router.get("/v2/models/{name}/stats", tags=["statistics"], summary="Statistics of one model")
async def statistics_of_model(request: Request, name: str) -> Response:
    return json_response(await model_statistics(get_edge(request), name, None))


@router.get("/v2/models/{name}/versions/{version}/stats", tags=["statistics"], summary="Statistics of one version")
async def statistics_of_version(request: Request, name: str, version: str) -> Response:
    return json_response(await model_statistics(get_edge(request), name, version))
