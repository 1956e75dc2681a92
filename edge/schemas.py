"""The HTTP API's bodies as pydantic models, so the OpenAPI document (/openapi.json, /docs) shows them.

The routes answer with JSON they build themselves (`errors.json_response`); these classes only document what each
route returns, and `ERRORS` the error statuses a route can answer with.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from cluster.protocol import DATATYPES, Heartbeat

Datatype = Literal[tuple(DATATYPES)]  # the one datatype table, as an OpenAPI enum
Parameters = dict[str, str | int | float | bool]
TensorData = list[Any]


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in words a person can act on.")


# ---- health and metadata (Open Inference Protocol) --------------------------------------------------------------


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
    runs: str | None = None  # what the agent runs: "aoti" (a compiled package), "exported", "torchscript"


# ---- inference (Open Inference Protocol) ------------------------------------------------------------------------


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
    followed by raw little-endian tensor bytes, and the `Inference-Header-Content-Length` header gives the JSON
    length."""

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: Parameters | None = Field(
        None,
        description="`binary_data_output` (bool): all outputs in binary; `timeout` (int, microseconds): deadline; "
        "`priority` accepted and ignored. Other parameters are accepted and ignored.",
    )
    inputs: list[RequestInput] = Field(..., min_length=1, description="At least one input.")
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


# ---- the cluster views ------------------------------------------------------------------------------------------


def _agent_info_model() -> type[BaseModel]:
    """The /agents entry: every field of the protocol's one Heartbeat definition (so a new heartbeat field shows up
    here by itself), plus what the broker's view adds (see cluster.protocol.agent_view)."""
    hints = typing.get_type_hints(Heartbeat)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Heartbeat):
        default = (
            Field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING else f.default
        )
        fields[f.name] = (hints[f.name], ... if default is dataclasses.MISSING else default)
    return create_model(
        "AgentInfo",
        __config__=ConfigDict(extra="allow"),
        id=(str, Field(description="The agent's id (the same as `agent`).")),
        heartbeat_age=(float, Field(description="Seconds since the broker last heard from the agent.")),
        joined=(float, Field(description="Wall time the agent registered with the broker.")),
        broker_in_flight=(
            int | None,
            Field(None, description="Requests the broker has handed to the agent (exact, now)."),
        ),
        **fields,
    )


AgentInfo = _agent_info_model()


class ModelListing(BaseModel):
    versions: list[int]
    agents: list[str]


class BrokerLoad(BaseModel):
    """A broker's load in its latest report (cluster/broker/metrics.py: broker_load)."""

    model_config = ConfigDict(extra="allow")
    agents: int = Field(0, description="Agents it routes to (not draining).")
    in_flight: int = Field(0, description="Requests held at agents.")
    queued: int = Field(0, description="Requests waiting in its queue.")
    capacity: dict[str, int] = Field(default_factory=dict, description="Slots its agents offer, by model.")
    queued_by_model: dict[str, int] = Field(default_factory=dict)
    requests: int = Field(0, description="Requests it accepted since it started.")


class BrokerInfo(BaseModel):
    """A live broker as the manager hears it (its latest report)."""

    name: str
    incarnation: str = Field(description="Changes when the broker restarts.")
    seq: int = Field(description="Its latest report's number.")
    gaps: int = Field(description="Reports of this incarnation that never reached the manager.")
    heard_age: float = Field(description="Seconds since the manager last heard from it.")
    agents: list[str] = Field(description="Ids of the agents it routes to.")
    load: BrokerLoad


# ---- error statuses, as the routes declare them ------------------------------------------------------------------

ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad input: invalid JSON, data that does not fit the shape or datatype, unknown input or output.",
        401: "No token, or a token this edge does not know (only when the edge has tokens: cluster edge --token).",
        403: "An admin token is needed (a route that changes the cluster), or a browser page of another origin.",
        404: "Unknown model or version.",
        413: "Body over the edge's limit.",
        415: "Unsupported Content-Encoding, or a Content-Type other than JSON or application/octet-stream.",
        429: "The cluster is overloaded; retry after the Retry-After header's seconds.",
        500: "The model failed.",
        502: "The cluster reported an internal error.",
        503: "No live agent serves the model, or the broker does not answer.",
        504: "No answer within the request's deadline.",
    }.items()
}


def error_responses(*codes: int) -> dict:
    """The `responses=` of a route that can answer with these error statuses."""
    return {code: ERRORS[code] for code in codes}
