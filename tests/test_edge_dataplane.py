"""One edge data plane behind both surfaces (issue 19 point 3): the same requests through REST and gRPC, on one app
(create_app with its gRPC service on 127.0.0.1:0, the fake bus of tests/test_edge_app.py), count alike in the
edge's request metrics, told apart by their `protocol` label, and get the same readiness answer. In-process."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cluster.role_settings import EdgeSettings
from edge import create_app
from tests.edge_http import counter, echo_body
from tests.test_edge_app import LIMIT, FakeBus, FakeManager, TestClient


@pytest.fixture
def surfaces():
    """(REST client, gRPC stub, fake bus) of one app whose lifespan serves both."""
    bus = FakeBus()
    app = create_app(EdgeSettings(max_body_bytes=LIMIT), client=bus, manager=FakeManager(), grpc_address="127.0.0.1:0")
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as http:
        address = app.state.edge.grpc_address
        assert address, "the app's lifespan did not start its gRPC service"
        with grpc.insecure_channel(address) as channel:
            yield http, service_pb2_grpc.GRPCInferenceServiceStub(channel), bus


def grpc_request(model: str, values: np.ndarray, datatype: str = "FP32") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype=datatype, shape=list(values.shape))
    request.raw_input_contents.append(values.tobytes())
    return request


def grpc_code(stub, request) -> grpc.StatusCode:
    try:
        stub.ModelInfer(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_rest_and_grpc_inference_count_alike_in_the_edge_metrics(surfaces):
    http, stub, _bus = surfaces
    good, bad = np.array([[1.0, 2.0]], dtype="<f4"), np.array([[1]], dtype="<i4")  # echo takes FP32, not INT32

    assert http.post("/v2/models/echo/infer", json=echo_body(good.tolist())).status_code == 200
    assert http.post("/v2/models/echo/infer", json=echo_body(bad.tolist(), datatype="INT32")).status_code == 400
    assert http.post("/v2/models/no-such-model/infer", json=echo_body(good.tolist())).status_code == 404
    assert grpc_code(stub, grpc_request("echo", good)) == grpc.StatusCode.OK
    assert grpc_code(stub, grpc_request("echo", bad, "INT32")) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(stub, grpc_request("no-such-model", good)) == grpc.StatusCode.NOT_FOUND

    metrics = http.get("/metrics").text
    for protocol in ("http", "grpc"):
        counts = {
            (model, outcome): counter(metrics, "edge_requests_total", model=model, outcome=outcome, protocol=protocol)
            for model, outcome in (("echo", "success"), ("echo", "bad_request"), ("_other", "not_found"))
        }
        assert counts == {
            ("echo", "success"): 1,
            ("echo", "bad_request"): 1,
            ("_other", "not_found"): 1,
        }, f"{protocol}: {counts}\n{metrics}"
        seconds = counter(metrics, "edge_request_seconds_count", model="echo", protocol=protocol)
        assert seconds == 2, f"{protocol}: edge_request_seconds_count {seconds}"
    assert counter(metrics, "edge_batch_size_count", model="echo") == 2, (
        "both good requests' batching should be counted"
    )
    assert "edge_requests_in_flight 0.0" in metrics


def test_rest_and_grpc_answer_readiness_by_one_rule(surfaces):
    http, stub, bus = surfaces
    assert http.get("/v2/health/ready").status_code == 200 and stub.ServerReady(service_pb2.ServerReadyRequest()).ready

    async def draining(timeout=None):
        return [{"id": "agent-a", "draining": True}]

    bus.agents = draining  # agents that drain are not ready, on both surfaces
    assert http.get("/v2/health/ready").status_code == 503
    assert not stub.ServerReady(service_pb2.ServerReadyRequest()).ready
    assert http.get("/v2/models/no-such-model/ready").status_code == 404
    assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="no-such-model")).ready
