"""Triton's model repository extension: the repository index, load and unload, through the lifecycle manager.

A load is the cluster's deploy: the manager's two-phase rollout to every live agent, answered when it is over (so a
load that returns has every agent serving the model, and one that fails changed nothing). A load may carry the model
itself, as Triton's does: `parameters.config` (the model config as a JSON string, ours or Triton's) and
`file:<version>/model.pt` (or `model.pt2`) with the file's bytes (base64 in REST, bytes in gRPC), and optionally
`file:<version>/preprocess.pt2` and `postprocess.pt2` (exported programs chained on the agent); the manager then
publishes it atomically on its share, so a machine without the share can deploy. Versions never change once
published: loading the same files twice is a no-op, and other bytes under a version that exists become the next
version. A load without files deploys the share's newest version. Unload is undeploy (agents finish what is in
flight); unloading a model that is not loaded succeeds, as in Triton.

A load may start a canary run instead (issue 21): parameters "canary" ("10,50,100" or a list of percents), "step"
("30s" or seconds), "shadow", "shadow_only", "retry", "criteria" (a JSON object, or its text), "version" (without
files: the version to judge). Without files it is QUERY canary; with files, a publish whose version is then judged
as a canary (a new model is deployed plainly). Answered at once with the run's status (`GET /rollouts/{m}` follows it).

`repository_index`, `load_model` and `unload_model` are transport-neutral (edge/grpc_service.py calls them too);
`router` serves `POST /v2/repository/index` and `POST /v2/repository/models/{m}/load|unload`. Load and unload change
the cluster: an admin token when the edge has tokens, and the manager may also refuse the edge's bus key (403).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cluster.canary.options import parse_duration, parse_steps
from cluster.config import COMPILE_TIMEOUT_S, MAX_VERSION, ROLLOUT_TIMEOUT_S
from cluster.errors import ClusterError, ModelNotFoundError
from cluster.protocol import What
from cluster.repository import MODEL_FILES, PROGRAM_FILES
from edge.body import off_loop, read_body
from edge.dataplane import DataPlane
from edge.errors import HTTPError, cluster_http_error, json_response
from edge.routes import get_edge
from edge.schemas import error_responses
from edge.security import ADMIN, TOKEN

UNLOAD_TIMEOUT = 10.0


async def _manager(edge: DataPlane, what: What, timeout: float, data: bytes | list | None = None, **fields) -> Any:
    """One call on the manager's query socket; its errors as HTTP errors naming the manager."""
    try:
        return await edge.manager.call(what, timeout, data, **fields)
    except ClusterError as exc:
        raise cluster_http_error(exc, infer=False, broker=edge.manager.address, role="manager") from None


def index_entries(deployments: dict, ready_only: bool) -> list[dict]:
    """Triton's index entries ({name, version, state, reason}) from the manager's `deployments` view: READY when a
    live agent serves the deployed version, LOADING while a rollout stages one, UNAVAILABLE otherwise (with why)."""
    entries = []
    for name, d in sorted(deployments.items()):
        version, staged = d.get("version"), d.get("staged")
        serving = [a for a, versions in (d.get("agents") or {}).items() if version is not None and version in versions]
        if version is not None and serving:
            # (fewer copies than its `replicas` wants, and why: the manager's placement)
            entry = {"name": name, "version": str(version), "state": "READY", "reason": d.get("short") or ""}
        elif staged is not None or d.get("rolling_out"):
            shown = staged if staged is not None else version
            entry = {"name": name, "version": "" if shown is None else str(shown), "state": "LOADING", "reason": ""}
        elif version is not None:
            entry = {"name": name, "version": str(version), "state": "UNAVAILABLE", "reason": "no live agent serves it"}
        else:
            entry = {"name": name, "state": "UNAVAILABLE", "reason": "unloaded"}
        if entry["state"] == "READY" or not ready_only:
            entries.append(entry)
    return entries


async def repository_index(edge: DataPlane, ready_only: bool = False) -> list[dict]:
    """Every model on the manager's share or served by an agent, with its state (`ready_only`: the READY ones)."""
    return index_entries(await _manager(edge, What.DEPLOYMENTS, edge.query_timeout), ready_only)


def _model_file(files: dict[str, bytes]) -> tuple[int, str, bytes, dict[str, bytes]]:
    """(version, file name, bytes, programs) of a load's `file:<version>/<model file>` entry and its optional
    `file:<version>/preprocess.pt2` and `postprocess.pt2` (programs: file name -> bytes), all of one version."""
    programs: dict[str, bytes] = {}
    models = {}
    versions = set()
    for path, data in files.items():
        version, _, file_name = path.removeprefix("file:").partition("/")
        versions.add(version)
        if file_name in PROGRAM_FILES:
            programs[file_name] = data
        else:
            models[path] = data
    if len(models) != 1 or len(versions) != 1:
        raise HTTPError(
            400,
            f"a load carries exactly one model file (file:<version>/model.pt or .pt2), and optionally "
            f"{' and '.join(PROGRAM_FILES)} of the same version; got {', '.join(sorted(files))[:200]}",
            "bad_request",
        )
    ((path, data),) = models.items()
    version, _, file_name = path.removeprefix("file:").partition("/")
    if not (version.isascii() and version.isdigit() and len(version) <= 10 and 1 <= int(version) <= MAX_VERSION):
        raise HTTPError(
            400, f"'{path[:80]}': expected file:<version>/<file> with a version from 1 to {MAX_VERSION}", "bad_request"
        )
    if file_name not in MODEL_FILES:
        raise HTTPError(
            400,
            f"'{path[:80]}': the model file must be {' or '.join(MODEL_FILES)} (TorchScript or torch.export)",
            "bad_request",
        )
    return int(version), file_name, data, programs


def compile_field(value) -> str | None:
    """A load's `compile` parameter: true or "cpu" -> "cpu", "cuda" -> "cuda", false or absent -> None."""
    if value is None or value is False or (isinstance(value, str) and value.lower() == "false"):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "cpu")):
        return "cpu"
    if isinstance(value, str) and value.lower() == "cuda":
        return "cuda"
    raise HTTPError(400, 'parameter \'compile\': must be true, false, "cpu" or "cuda"', "bad_request")


async def load_model(
    edge: DataPlane,
    name: str,
    config: str | None,
    files: dict[str, bytes],
    canary: dict | None = None,
    compile_for: str | None = None,
) -> dict:
    """Deploy `name` to every live agent (publishing the files first, if any); the rollout's report. 400 when the
    rollout failed (every agent keeps what it served), naming each agent's reason. With `canary` (canary_fields):
    a canary run of the new (or named) version instead, answered at once with its status. `compile_for`: the
    manager compiles the uploaded model.pt2 for that device kind first (AOTInductor, in a child process)."""
    parsed = None if config is None else _json_object(config, "parameter 'config'")
    wait = ROLLOUT_TIMEOUT_S + 60
    if compile_for is not None and not files:
        raise HTTPError(
            400, "parameter 'compile': send the exported program with it (file:<version>/model.pt2)", "bad_request"
        )
    if canary is not None and not files:
        if parsed is not None:
            raise HTTPError(400, "a config alone cannot change a published version", "bad_request")
        return await _manager(edge, What.CANARY, edge.query_timeout + 5, name=name, **canary)
    if files:
        version, file_name, data, programs = _model_file(files)
        fields = dict(name=name, file=file_name, version=version, config=parsed, rollout_timeout=ROLLOUT_TIMEOUT_S)
        if programs:  # sent after the model file, in this order
            fields["programs"] = list(programs)
            data = [data, *programs.values()]
        if compile_for is not None:
            fields["compile"] = compile_for
            wait += COMPILE_TIMEOUT_S
        if canary is not None:
            fields["canary"] = {k: v for k, v in canary.items() if k != "version"}
        report = await _manager(edge, What.PUBLISH, wait, data, **fields)
        if "outcome" in report:  # a canary run started
            edge.metrics.confirm_model(name)
            return report
    elif parsed is not None:
        raise HTTPError(
            400,
            "a config alone cannot change a published version: send the model file with it (file:<version>/model.pt)",
            "bad_request",
        )
    else:
        report = await _manager(edge, What.DEPLOY, wait, name=name, rollout_timeout=ROLLOUT_TIMEOUT_S)
    if not report.get("ok"):
        failed: dict[str, list[str]] = {}  # the same reason from every agent is said once, naming them all
        for agent, why in sorted(report.get("agents", {}).items()):
            if why != "ok":
                failed.setdefault(why, []).append(agent)
        reasons = "; ".join(f"{', '.join(agents)}: {why}" for why, agents in failed.items())
        raise HTTPError(
            400,
            f"failed to load '{name}' version {report.get('version')}; every agent keeps what it served ({reasons})",
            "bad_request",
        )
    edge.metrics.confirm_model(name)
    return report


async def unload_model(edge: DataPlane, name: str) -> None:
    """Undeploy `name` everywhere; a model that is known but not deployed is already unloaded (no error)."""
    try:
        await edge.manager.call(What.UNDEPLOY, UNLOAD_TIMEOUT, name=name)
    except ModelNotFoundError:
        known = await _manager(edge, What.DEPLOYMENTS, edge.query_timeout)
        if name not in known:
            text = f"unknown model '{name}': not on the share and served by no agent"
            raise HTTPError(404, text, "not_found") from None
    except ClusterError as exc:
        raise cluster_http_error(exc, infer=False, broker=edge.manager.address, role="manager") from None


# ---- REST -----------------------------------------------------------------------------------------------------


async def _json_body(request: Request, edge: DataPlane) -> dict:
    """The body as a JSON object; an empty body is `{}` (tritonclient sends none for the index). A large one (a model
    file in base64) is parsed in the edge's worker thread, not on the event loop."""
    body = await read_body(request, edge.max_body_bytes)
    return await off_loop(len(body), _json_object, body, "the body") if body.strip() else {}


def _json_object(text: str | bytes, what: str) -> dict:
    """`text` parsed as a JSON object; 400 naming `what` otherwise."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise HTTPError(400, f"{what} is not valid JSON: {exc}", "bad_request") from None
    if not isinstance(value, dict):
        raise HTTPError(400, f"{what} must be a JSON object", "bad_request")
    return value


CANARY_PARAMETERS = ("canary", "step", "shadow", "shadow_only", "retry", "criteria", "version")


def canary_fields(parameters: dict) -> dict | None:
    """A load's canary run (QUERY canary's fields) from its parameters (REST's JSON values, or gRPC's typed ones);
    None when it asks for none. 400 naming the parameter when one is wrong."""

    def bad(key: str, text: str):
        raise HTTPError(400, f"parameter '{key}': {text}", "bad_request")

    def flag(key: str) -> bool | None:
        value = parameters.get(key)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        bad(key, "must be true or false")

    shadow_only = flag("shadow_only")
    if parameters.get("canary") is None and not shadow_only:
        given = [k for k in CANARY_PARAMETERS[1:] if k != "shadow_only" and parameters.get(k) is not None]
        if given:
            bad(given[0], "belongs to a canary run: give 'canary' (e.g. \"10,50,100\") or 'shadow_only'")
        return None
    fields: dict = {"shadow_only": bool(shadow_only)}
    try:
        if parameters.get("canary") is not None:
            fields["steps"] = parse_steps(parameters["canary"])
        if parameters.get("step") is not None:
            fields["step_seconds"] = parse_duration(parameters["step"])
    except ValueError as exc:
        bad("canary" if "steps" not in fields and parameters.get("canary") is not None else "step", str(exc))
    if parameters.get("shadow") is not None:
        try:
            shadow = float(parameters["shadow"])
        except (TypeError, ValueError):
            shadow = -1.0
        if isinstance(parameters["shadow"], bool) or not 0 <= shadow <= 1:
            bad("shadow", "must be a fraction from 0 to 1")
        fields["shadow"] = shadow
    if (retry := flag("retry")) is not None:
        fields["retry"] = retry
    criteria = parameters.get("criteria")
    if criteria is not None:
        fields["criteria"] = _json_object(criteria, "parameter 'criteria'") if isinstance(criteria, str) else criteria
        if not isinstance(fields["criteria"], dict):
            bad("criteria", "must be a JSON object")
    version = parameters.get("version")
    if version is not None:
        if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) <= 10:
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            bad("version", f"must be a version from 1 to {MAX_VERSION}")
        fields["version"] = version
    return fields


def _load_parameters(body: dict) -> tuple[str | None, dict[str, bytes]]:
    """(config, files) of a REST load body: {"parameters": {"config": "<json>", "file:1/model.pt": "<base64>"}}."""
    parameters = body.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise HTTPError(400, "'parameters' must be a JSON object", "bad_request")
    config = parameters.get("config")
    if config is not None and not isinstance(config, str):
        raise HTTPError(400, "parameter 'config' must be a string holding the config's JSON", "bad_request")
    files = {}
    for key, value in parameters.items():
        if not key.startswith("file:"):
            continue
        if not isinstance(value, str):
            raise HTTPError(400, f"parameter '{key[:80]}' must be the file's bytes in base64", "bad_request")
        try:
            files[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPError(400, f"parameter '{key[:80]}' is not valid base64", "bad_request") from None
    return config, files


router = APIRouter(dependencies=[TOKEN])


@router.post(
    "/v2/repository/index",
    tags=["repository"],
    summary="Repository index",
    responses=error_responses(400, 503),
)
async def index(request: Request) -> Response:
    """Every model the cluster knows, with its state: body `{"ready": true}` for the READY ones only."""
    edge = get_edge(request)
    ready = (await _json_body(request, edge)).get("ready", False)
    if not isinstance(ready, bool):
        raise HTTPError(400, "'ready' must be true or false", "bad_request")
    return json_response(await repository_index(edge, ready))


@router.post(
    "/v2/repository/models/{name}/load",
    tags=["repository"],
    summary="Load (deploy) a model on every agent",
    dependencies=[ADMIN],
    responses=error_responses(400, 403, 404, 413, 503),
)
async def load(request: Request, name: str) -> Response:
    """Roll the model out to every live agent and answer when every one serves it; with `parameters.config` and
    `parameters["file:<version>/model.pt"]` (base64), publish those files on the share first. With
    `parameters.canary` ("10,50,100"; also step, shadow, shadow_only, retry, criteria, version): start a canary run
    of that version instead, answered at once with its status."""
    edge = get_edge(request)
    body = await _json_body(request, edge)
    parameters = body.get("parameters")
    size = sum(len(v) for v in parameters.values() if isinstance(v, str)) if isinstance(parameters, dict) else 0
    config, files = await off_loop(size, _load_parameters, body)  # base64 of a model file: off the event loop
    canary = canary_fields(parameters) if isinstance(parameters, dict) else None
    compile_for = compile_field(parameters.get("compile")) if isinstance(parameters, dict) else None
    del body, parameters
    if canary is not None:
        return json_response(await load_model(edge, name, config, files, canary, compile_for))
    await load_model(edge, name, config, files, compile_for=compile_for)
    return Response(status_code=200)


@router.post(
    "/v2/repository/models/{name}/unload",
    tags=["repository"],
    summary="Unload (undeploy) a model everywhere",
    dependencies=[ADMIN],
    responses=error_responses(400, 403, 404, 503),
)
async def unload(request: Request, name: str) -> Response:
    """Agents finish what they have in flight, then unload it; the share keeps its files."""
    edge = get_edge(request)
    await _json_body(request, edge)  # `unload_dependents` has no meaning here (no ensembles)
    await unload_model(edge, name)
    return Response(status_code=200)
