"""The edge's Open Inference Protocol over gRPC (KServe's `inference.GRPCInferenceService`), beside the REST routes.

The message and servicer classes are tritonclient.grpc's generated `service_pb2` / `service_pb2_grpc` (no copy of
generated code here). Every RPC is a call on the HTTP app's data plane (edge/dataplane.py: the same bus client,
limits, tokens, readiness rule and metrics, where its inferences count under protocol "grpc"), with the same tensor
checks (edge/oip_tensors.py). Errors take the REST edge's HTTP status (edge/errors.py) and map it to a gRPC code.
With edge tokens on, every RPC but ServerLive/ServerReady needs metadata `authorization: Bearer <token>`.
A cancelled gRPC call cancels its bus await, which makes AsyncClient send the broker a CANCEL.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from cluster.errors import ClusterError
from edge import oip, oip_tensors, repository
from edge.dataplane import INFER_ERRORS, SERVER_NAME, DataPlane, new_request_id, parse_version
from edge.errors import HTTPError, cluster_http_error

log = logging.getLogger("edge")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNKNOWN,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# the typed `contents` field that holds each datatype's elements (InferTensorContents)
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class RPCError(Exception):
    """An RPC's failure: its gRPC code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def http_to_rpc(error: HTTPError) -> RPCError:
    return RPCError(STATUS_CODES.get(error.status, grpc.StatusCode.UNKNOWN), error.message)


def _param_value(param: service_pb2.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def tensor_from_grpc(tensor, raw: bytes | None) -> np.ndarray:
    """An input as numpy: from its raw bytes (raw_input_contents) or its typed `contents`; oip's checks apply."""
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if raw is not None:
        return oip_tensors.tensor_from_binary(name, datatype, shape, raw)
    dtype = oip_tensors.check_datatype(name, datatype)
    shape = oip_tensors.check_shape(name, shape)
    values = getattr(tensor.contents, _CONTENTS_FIELD[datatype])
    if len(values) != math.prod(shape):
        raise oip.InvalidRequest(
            f"input '{name}': shape {shape} needs {math.prod(shape)} elements, contents hold {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise oip.InvalidRequest(f"input '{name}': contents do not fit {datatype}: {exc}") from None


def parse_request(request, max_timeout_us: int = oip.MAX_TIMEOUT_US) -> tuple[dict, list[str] | None, float | None]:
    """(inputs, outputs asked for, timeout seconds) of a ModelInferRequest; InvalidRequest for what cannot be served."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise oip.InvalidRequest(
            f"raw_input_contents holds {len(raws)} tensors for {len(request.inputs)} inputs; give one per input"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if not tensor.name or len(tensor.name) > oip.MAX_NAME:
            raise oip.InvalidRequest(f"input {i}: a name of 1 to {oip.MAX_NAME} characters is needed")
        if tensor.name in inputs:
            raise oip.InvalidRequest(f"input '{tensor.name}' is given twice")
        inputs[tensor.name] = tensor_from_grpc(tensor, raws[i] if raws else None)
    if not inputs:
        raise oip.InvalidRequest("the request has no inputs")
    outputs = [o.name for o in request.outputs] or None
    timeout = None
    if "timeout" in request.parameters:
        value = _param_value(request.parameters["timeout"])
        if type(value) is not int or not 0 < value <= max_timeout_us:
            raise oip.InvalidRequest(f"parameter 'timeout' must be microseconds, 1 to {max_timeout_us}")
        timeout = value / 1e6
    return inputs, outputs, timeout


def encode_response(
    request, model: str, version, outputs: dict[str, np.ndarray], wanted: list[str] | None
) -> service_pb2.ModelInferResponse:
    """The outputs asked for (all when none were), in order, as raw_output_contents."""
    response = service_pb2.ModelInferResponse(
        model_name=model, model_version="" if version is None else str(version), id=request.id
    )
    for name in wanted if wanted is not None else list(outputs):
        array = outputs.get(name)
        if array is None:
            continue
        response.outputs.add(name=name, datatype=oip.datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(oip_tensors.tensor_to_binary(array))
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The RPCs, each one call on the data plane `edge` (or on the repository module)."""

    def __init__(self, edge: DataPlane) -> None:
        self.edge = edge

    # ---- plumbing ---------------------------------------------------------------------------------------------

    def _authorize(self, context, *, admin: bool = False) -> None:
        security = self.edge.security
        if not security.auth:
            return
        metadata = dict(context.invocation_metadata() or ())
        try:
            security.check(metadata.get("authorization"), admin=admin)
        except HTTPError as exc:
            raise http_to_rpc(exc) from None

    async def _query(self, call):
        try:
            return await call
        except ClusterError as exc:
            raise http_to_rpc(cluster_http_error(exc, infer=False, broker=self.edge.broker)) from None

    async def _run(self, context, work):
        """Await `work`, aborting the call with the gRPC code of any error."""
        try:
            return await work
        except RPCError as exc:
            await context.abort(exc.code, exc.message)
        except HTTPError as exc:
            await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)
        except oip.InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # ---- health and metadata ----------------------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=await self.edge.server_ready() is None)

    async def ModelReady(self, request, context):
        """ready=false for a model that is not served, known or not (as Triton answers, and as HTTP's 404 and 503
        read to tritonclient.http's is_model_ready), never NOT_FOUND."""

        async def work():
            self._authorize(context)
            try:
                ready = await self.edge.model_ready(request.name, request.version)
            except HTTPError as exc:
                if exc.status != 404:
                    raise
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=ready)

        return await self._run(context, work())

    async def ServerMetadata(self, request, context):
        async def work():
            self._authorize(context)
            return service_pb2.ServerMetadataResponse(**self.edge.server_metadata())

        return await self._run(context, work())

    async def ModelMetadata(self, request, context):
        async def work():
            self._authorize(context)
            body = await self.edge.model_metadata(request.name, request.version)
            response = service_pb2.ModelMetadataResponse(
                name=body["name"] or request.name, versions=body["versions"], platform=body["platform"]
            )
            for kind, into in (("inputs", response.inputs), ("outputs", response.outputs)):
                for tensor in body[kind]:
                    into.add(
                        name=tensor.get("name", ""),
                        datatype=tensor.get("datatype", ""),
                        shape=[int(d) for d in tensor.get("shape", [])],
                    )
            return response

        return await self._run(context, work())

    async def ModelConfig(self, request, context):
        """Triton's model configuration extension: the config as Triton's ModelConfig (edge/triton_config.py)."""

        async def work():
            self._authorize(context)
            config = await self.edge.model_config(request.name, request.version)
            return service_pb2.ModelConfigResponse(
                config=json_format.ParseDict(config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
            )

        return await self._run(context, work())

    # ---- inference --------------------------------------------------------------------------------------------

    async def infer(self, request, context) -> service_pb2.ModelInferResponse:
        """One ModelInferRequest answered, or RPCError; counted in the data plane's metrics as REST's are (protocol
        "grpc"). Not shielded: cancelling the call cancels the bus await."""
        edge = self.edge
        self._authorize(context)  # as REST: a request without a valid token is refused before it is counted
        name = request.model_name
        started = edge.infer_started()
        outcome = "error"
        try:
            number = parse_version(name, request.model_version)
            inputs, outputs, timeout = parse_request(request)
            result = await edge.infer(name, inputs, number, timeout, outputs, request.id or new_request_id())
            edge.infer_answered(name, result)
            response = encode_response(request, result.model or name, result.version, result.outputs, outputs)
            outcome = "success"
            return response
        except INFER_ERRORS as exc:
            error = edge.infer_error(exc, name)
            outcome = error.outcome
            raise http_to_rpc(error) from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            edge.infer_finished(name, outcome, started, "grpc")

    async def ModelInfer(self, request, context):
        return await self._run(context, self.infer(request, context))

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request answered in order; a failed one gets `error_message` and the stream stays open."""
        async for request in request_iterator:
            try:
                response = await self.infer(request, context)
            except RPCError as exc:
                yield service_pb2.ModelStreamInferResponse(error_message=exc.message)
            except HTTPError as exc:
                yield service_pb2.ModelStreamInferResponse(error_message=exc.message)
            except oip.InvalidRequest as exc:
                yield service_pb2.ModelStreamInferResponse(error_message=str(exc))
            else:
                yield service_pb2.ModelStreamInferResponse(infer_response=response)

    # ---- repository and statistics (edge/repository.py, edge/statistics.py) ----------------------------------

    async def RepositoryIndex(self, request, context):
        async def work():
            self._authorize(context)
            entries = await self._query(repository.repository_index(self.edge, ready_only=request.ready))
            response = service_pb2.RepositoryIndexResponse()
            for entry in entries:
                response.models.add(
                    name=str(entry.get("name", "")),
                    version=str(entry.get("version", "")),
                    state=str(entry.get("state", "")),
                    reason=str(entry.get("reason", "")),
                )
            return response

        return await self._run(context, work())

    async def RepositoryModelLoad(self, request, context):
        async def work():
            self._authorize(context, admin=True)
            config = None
            files: dict[str, bytes] = {}
            others = {}  # a canary run's (edge/repository.py canary_fields)
            compiling: dict = {}  # `compile` (edge/repository.py compile_field)
            for key, param in request.parameters.items():
                if key == "config":
                    config = param.string_param
                elif key.startswith("file:"):
                    files[key] = param.bytes_param
                elif key in repository.CANARY_PARAMETERS:
                    others[key] = _param_value(param)
                elif key == "compile":
                    compiling["compile_for"] = repository.compile_field(_param_value(param))
            canary = {"canary": repository.canary_fields(others)} if others else {}  # (its status has no field here)
            await self._query(
                repository.load_model(self.edge, request.model_name, config, files, **canary, **compiling)
            )
            return service_pb2.RepositoryModelLoadResponse()

        return await self._run(context, work())

    async def RepositoryModelUnload(self, request, context):
        async def work():
            self._authorize(context, admin=True)
            await self._query(repository.unload_model(self.edge, request.model_name))
            return service_pb2.RepositoryModelUnloadResponse()

        return await self._run(context, work())

    async def ModelStatistics(self, request, context):
        async def work():
            self._authorize(context)
            stats = await self.edge.model_statistics(request.name or None, request.version or None)
            return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

        return await self._run(context, work())


def _unimplemented(rpc: str):
    async def handler(self, request, context):
        # UNIMPLEMENTED with a clear message and no ERROR traceback in the edge's log (the generated base class
        # raises NotImplementedError, which grpc logs as a servicer failure)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not supported by this server ({SERVER_NAME})")

    handler.__name__ = rpc
    return handler


for _rpc in dir(service_pb2_grpc.GRPCInferenceServiceServicer):
    if not _rpc.startswith("_") and _rpc not in InferenceServicer.__dict__:
        setattr(InferenceServicer, _rpc, _unimplemented(_rpc))


def create_server(edge: DataPlane, address: str, tls: tuple[str, str] | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server for the edge on `address` (host:port, port 0 = any), not started; and the port bound.
    Messages are limited to the edge's max body, as REST bodies are. tls: (certificate, private key) PEM files: serve
    TLS with them (the HTTP edge's own, so that a token is never sent in the clear on either port)."""
    limit = int(edge.max_body_bytes)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", max(limit, 64 << 20))]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(edge), server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        certfile, keyfile = tls
        credentials = grpc.ssl_server_credentials([(Path(keyfile).read_bytes(), Path(certfile).read_bytes())])
        port = server.add_secure_port(address, credentials)
    if not port:
        raise OSError(f"the edge cannot listen for gRPC on {address}")
    return server, port


def grpc_address(host: str, port: int) -> str:
    """host:port as gRPC clients take it ([::1]:8001 for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def serving(edge: DataPlane, address: str | None, grace: float = 5.0, tls: tuple[str, str] | None = None):
    """Serve gRPC on `address` (None: not at all) in the running loop while the block runs: the app's lifespan,
    so it starts with uvicorn and stops with it (SIGTERM included). Sets `edge.grpc_address` to what it bound.
    tls: (certificate, key) PEM files, as create_server."""
    if address is None:
        yield
        return
    server, port = create_server(edge, address, tls)
    await server.start()
    edge.grpc_address = grpc_address(address.rsplit(":", 1)[0].strip("[]"), port)
    log.info("gRPC (Open Inference Protocol) on %s%s", edge.grpc_address, " with TLS" if tls else "")
    try:
        yield
    finally:
        await server.stop(grace)  # calls still running get `grace` seconds, then are cancelled
        edge.grpc_address = None
