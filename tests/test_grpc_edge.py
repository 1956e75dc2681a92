"""The edge's gRPC service in-process: a grpc.aio server on 127.0.0.1:0 in the test's own event loop, in front of
the fake bus client of tests/test_edge_app.py, called through the generated stub. What the service itself decides:
raw and typed inputs, requested outputs, the timeout parameter, error codes, tokens as metadata, streaming errors.
tests/test_grpc.py runs unmodified tritonclient.grpc against a real cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cluster.errors import InferenceFailedError, InferenceTimeoutError, NoAgentAvailableError, OverloadedError
from edge import repository
from edge.dataplane import DataPlane
from edge.grpc_service import create_server
from edge.security import EdgeSecurity
from tests.test_edge_app import FakeBus

LIMIT = 64 * 1024


def run(scenario, bus: FakeBus | None = None, tokens: tuple = (), admin_tokens: tuple = ()):
    """Run `scenario(stub, bus)` against a fresh server; returns what it returns."""
    bus = bus or FakeBus()

    async def main():
        edge = DataPlane(bus.address, LIMIT, Path("."), 30.0, 5.0, EdgeSecurity(tokens, admin_tokens))
        edge.client = bus
        server, port = create_server(edge, "127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await asyncio.wait_for(scenario(service_pb2_grpc.GRPCInferenceServiceStub(channel), bus), 30)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def echo_request(x: np.ndarray, typed: bool = False, **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="echo", **fields)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    if typed:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def output(response, index: int = 0) -> np.ndarray:
    meta = response.outputs[index]
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(list(meta.shape))


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


X = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.mark.parametrize("typed", [False, True])
def test_infer_raw_and_typed_inputs_answer_raw_outputs(typed):
    async def scenario(stub, bus):
        response = await stub.ModelInfer(echo_request(X, typed=typed, id="r1"))
        assert response.model_name == "echo" and response.model_version == "1" and response.id == "r1"
        assert response.outputs[0].name == "y" and response.outputs[0].datatype == "FP32"
        np.testing.assert_array_equal(output(response), X)
        assert bus.calls[-1]["inputs"]["x"].dtype == np.float32
        assert bus.calls[-1]["timeout"] == 30.0  # the edge's default

    run(scenario)


def test_requested_outputs_and_timeout_parameter_reach_the_bus():
    async def scenario(stub, bus):
        request = echo_request(X)
        request.outputs.add(name="y")
        request.parameters["timeout"].int64_param = 2_500_000
        response = await stub.ModelInfer(request)
        assert [o.name for o in response.outputs] == ["y"]
        assert bus.calls[-1]["outputs"] == ["y"] and bus.calls[-1]["timeout"] == 2.5

    run(scenario)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r.inputs[0].shape.__setitem__(0, 5), "needs"),  # raw bytes do not fit the shape
        (lambda r: setattr(r.inputs[0], "datatype", "BF16"), "BF16 is not supported"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP99"), "unknown datatype"),
        (lambda r: r.raw_input_contents.append(b"x"), "one per input"),
        (lambda r: r.parameters["timeout"].__setattr__("string_param", "soon"), "timeout"),
        (lambda r: setattr(r, "model_version", "v1"), "no version"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(change, words):
    async def scenario(stub, bus):
        request = echo_request(X)
        change(request)
        code, details = await code_of(stub.ModelInfer(request))
        expected = grpc.StatusCode.NOT_FOUND if words == "no version" else grpc.StatusCode.INVALID_ARGUMENT
        assert code == expected, (code, details)
        assert words in details, details

    run(scenario)


def test_typed_contents_of_the_wrong_length_are_refused():
    async def scenario(stub, bus):
        request = echo_request(X, typed=True)
        request.inputs[0].contents.fp32_contents.append(1.0)
        code, details = await code_of(stub.ModelInfer(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "contents hold 7" in details, details

    run(scenario)


def test_unknown_model_is_not_found_and_a_wrong_shape_is_invalid():
    async def scenario(stub, bus):
        request = echo_request(X)
        request.model_name = "nope"
        code, details = await code_of(stub.ModelInfer(request))
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
        request = service_pb2.ModelInferRequest(model_name="digits")
        request.inputs.add(name="image", datatype="FP32", shape=[1, 7, 8])
        request.raw_input_contents.append(np.zeros((1, 7, 8), "<f4").tobytes())
        code, details = await code_of(stub.ModelInfer(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        code, _ = await code_of(stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope")))
        assert code == grpc.StatusCode.NOT_FOUND

    run(scenario)


@pytest.mark.parametrize(
    "error, code",
    [
        (OverloadedError("queue full", "echo"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NoAgentAvailableError("no agent", "echo"), grpc.StatusCode.UNAVAILABLE),
        (InferenceTimeoutError("too late", "echo"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (InferenceFailedError("model broke", "echo"), grpc.StatusCode.INTERNAL),
    ],
)
def test_cluster_errors_map_to_grpc_codes(error, code):
    bus = FakeBus()
    bus.raises["infer"] = error

    async def scenario(stub, bus):
        got, details = await code_of(stub.ModelInfer(echo_request(X)))
        assert got == code and str(error) in details, (got, details)

    run(scenario, bus)


def test_health_and_metadata():
    async def scenario(stub, bus):
        assert (await stub.ServerLive(service_pb2.ServerLiveRequest())).live
        assert (await stub.ServerReady(service_pb2.ServerReadyRequest())).ready
        assert (await stub.ModelReady(service_pb2.ModelReadyRequest(name="echo"))).ready
        meta = await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="digits"))
        assert meta.name == "digits" and list(meta.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "FP32", [-1, 8, 8])]
        server = await stub.ServerMetadata(service_pb2.ServerMetadataRequest())
        assert server.name == "torch-serving-cluster"
        bus.live = False
        assert not (await stub.ServerReady(service_pb2.ServerReadyRequest())).ready
        assert not (await stub.ModelReady(service_pb2.ModelReadyRequest(name="echo"))).ready

    run(scenario)


def test_tokens_are_needed_as_metadata_except_for_health():
    async def scenario(stub, bus):
        assert (await stub.ServerLive(service_pb2.ServerLiveRequest())).live
        assert (await stub.ServerReady(service_pb2.ServerReadyRequest())).ready
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "secret"),)):
            code, details = await code_of(stub.ModelInfer(echo_request(X), metadata=metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (metadata, code, details)
        code, _ = await code_of(stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="echo")))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        response = await stub.ModelInfer(echo_request(X), metadata=(("authorization", "Bearer secret"),))
        np.testing.assert_array_equal(output(response), X)
        assert len(bus.calls) == 1  # the refused ones never reached the bus

    run(scenario, tokens=("secret",))


def test_stream_answers_every_request_and_keeps_going_after_an_error():
    async def scenario(stub, bus):
        bad = echo_request(X)
        bad.model_name = "nope"
        requests = [echo_request(X, id="a"), bad, echo_request(X * 2, id="c")]
        call = stub.ModelStreamInfer(iter(requests))
        answers = [answer async for answer in call]
        assert len(answers) == 3
        assert answers[0].error_message == "" and answers[0].infer_response.id == "a"
        assert "nope" in answers[1].error_message
        np.testing.assert_array_equal(output(answers[2].infer_response), X * 2)

    run(scenario)


def test_a_message_over_the_edge_limit_is_refused():
    async def scenario(stub, bus):
        big = np.zeros((1, LIMIT // 4 + 16), np.float32)
        code, _ = await code_of(stub.ModelInfer(echo_request(big)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not bus.calls

    run(scenario)


def test_a_cancelled_call_cancels_the_bus_await():
    bus = FakeBus()
    started = asyncio.Event
    state = {}

    async def slow_infer(model, inputs, **kwargs):
        state["started"].set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    bus.infer = slow_infer

    async def scenario(stub, bus):
        state["started"] = started()
        call = stub.ModelInfer(echo_request(X))
        await asyncio.wait_for(state["started"].wait(), 10)
        call.cancel()
        for _ in range(200):  # the server learns of the cancel asynchronously
            if state.get("cancelled"):
                break
            await asyncio.sleep(0.05)
        assert state.get("cancelled"), "the bus await went on after the gRPC call was cancelled"

    run(scenario, bus)


def test_repository_and_statistics_delegate_to_the_extension_modules(monkeypatch):
    """The handlers call edge/repository.py and the data plane's statistics, the same functions the REST routes use
    (tested in tests/test_edge_repository.py, tests/test_statistics.py); stand-ins here record the calls and what the
    RPCs make of their answers."""
    seen = []

    async def repository_index(edge, ready_only=False):
        seen.append(("index", ready_only))
        return [{"name": "echo", "version": "1", "state": "READY", "reason": ""}]

    async def load_model(edge, name, config, files):
        seen.append(("load", name, config, files))

    async def unload_model(edge, name):
        seen.append(("unload", name))

    async def model_statistics(plane, name, version):
        seen.append(("stats", name, version))
        return {"model_stats": [{"name": "echo", "version": "1", "inference_count": 3, "extra": 1}]}

    async def scenario(stub, bus):
        admin = (("authorization", "Bearer boss"),)
        index = await stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), metadata=admin)
        assert [(m.name, m.version, m.state) for m in index.models] == [("echo", "1", "READY")]
        load = service_pb2.RepositoryModelLoadRequest(model_name="m")
        load.parameters["config"].string_param = "{}"
        load.parameters["file:1/model.pt"].bytes_param = b"pt"
        code, _ = await code_of(stub.RepositoryModelLoad(load, metadata=(("authorization", "Bearer user"),)))
        assert code == grpc.StatusCode.PERMISSION_DENIED  # a plain token may not change the cluster
        await stub.RepositoryModelLoad(load, metadata=admin)
        await stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name="m"), metadata=admin)
        stats = await stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="echo"), metadata=admin)
        assert stats.model_stats[0].inference_count == 3
        assert seen == [
            ("index", True),
            ("load", "m", "{}", {"file:1/model.pt": b"pt"}),
            ("unload", "m"),
            ("stats", "echo", None),
        ]

    monkeypatch.setattr(repository, "repository_index", repository_index)
    monkeypatch.setattr(repository, "load_model", load_model)
    monkeypatch.setattr(repository, "unload_model", unload_model)
    monkeypatch.setattr(DataPlane, "model_statistics", model_statistics)
    run(scenario, tokens=("user",), admin_tokens=("boss",))
