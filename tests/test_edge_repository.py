"""Triton's model repository extension in-process: edge/repository.py's REST routes and gRPC RPCs on a stand-in
manager (tests/test_edge_app.py's FakeManager), the index's states, Triton's config JSON, and publishing a model
file that arrived as bytes (cluster.publish.publish_upload). The same against real processes, with unmodified
tritonclient: tests/test_repository_cluster.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cluster.errors import InferenceTimeoutError, PermissionDeniedError
from cluster.model_config import ModelConfig, RepositoryError, from_triton, is_triton_config
from cluster.publish import publish_upload
from cluster.repository import ModelRepository
from cluster.role_settings import EdgeSettings
from edge import create_app
from edge.dataplane import DataPlane
from edge.grpc_service import create_server
from edge.repository import index_entries
from edge.security import EdgeSecurity
from tests.edge_http import assert_error
from tests.test_edge_app import FakeBus, FakeManager, TestClient

ECHO_CONFIG = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}
TRITON_CONFIG = {
    "name": "fresh",
    "platform": "pytorch_libtorch",
    "max_batch_size": 8,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4"]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
    "dynamic_batching": {"max_queue_delay_microseconds": "200"},
    "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
}


@pytest.fixture
def manager() -> FakeManager:
    return FakeManager()


def edge_client(manager: FakeManager, **options) -> TestClient:
    app = create_app(EdgeSettings(**options), client=FakeBus(), manager=manager)
    return TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


def load_body(config: dict | None = None, **files: bytes) -> dict:
    """A load body as tritonclient.http builds it: config as a JSON string, each file's bytes in base64."""
    parameters = {} if config is None else {"config": json.dumps(config)}
    parameters.update({path: base64.b64encode(data).decode() for path, data in files.items()})
    return {"parameters": parameters}


# ---- the index ------------------------------------------------------------------------------------------------


def test_index_states_from_the_managers_view():
    view = {
        "ready": {"version": 2, "staged": None, "agents": {"a": [1, 2]}, "rolling_out": False},
        "staging": {"version": None, "staged": 1, "agents": {}, "rolling_out": True},
        "orphan": {"version": 3, "staged": None, "agents": {"a": [2]}, "rolling_out": False},
        "spare": {"version": None, "staged": None, "agents": {}, "rolling_out": False},
    }
    assert index_entries(view, ready_only=False) == [
        {"name": "orphan", "version": "3", "state": "UNAVAILABLE", "reason": "no live agent serves it"},
        {"name": "ready", "version": "2", "state": "READY", "reason": ""},
        {"name": "spare", "state": "UNAVAILABLE", "reason": "unloaded"},
        {"name": "staging", "version": "1", "state": "LOADING", "reason": ""},
    ]
    assert [e["name"] for e in index_entries(view, ready_only=True)] == ["ready"]


def test_rest_index_takes_an_empty_body_or_ready(manager):
    with edge_client(manager) as http:
        everything = http.post("/v2/repository/index")  # tritonclient sends no body at all
        assert everything.status_code == 200, everything.text
        assert everything.json() == [
            {"name": "echo", "version": "1", "state": "READY", "reason": ""},
            {"name": "spare", "state": "UNAVAILABLE", "reason": "unloaded"},
        ]
        assert [e["name"] for e in http.post("/v2/repository/index", json={"ready": True}).json()] == ["echo"]
        assert_error(http.post("/v2/repository/index", json={"ready": "yes"}), 400, "'ready'")
        assert_error(http.post("/v2/repository/index", content=b"[1"), 400, "not valid JSON")


# ---- load ------------------------------------------------------------------------------------------------------


def test_rest_load_with_files_publishes_through_the_manager(manager):
    with edge_client(manager) as http:
        response = http.post(
            "/v2/repository/models/fresh/load", json=load_body(ECHO_CONFIG, **{"file:3/model.pt": b"torchscript"})
        )
        assert response.status_code == 200, response.text
        what, size, fields = manager.calls[-1]
        assert (what, size) == ("publish", len(b"torchscript"))
        assert fields["name"] == "fresh" and fields["file"] == "model.pt" and fields["version"] == 3
        assert fields["config"] == ECHO_CONFIG  # parsed here; the manager checks it (ours or Triton's)
        index = http.post("/v2/repository/index", json={"ready": True}).json()
        assert {"name": "fresh", "version": "3", "state": "READY", "reason": ""} in index
        metrics = http.get("/metrics").text
        assert 'cluster_rollouts_total{outcome="ok"} 1.0' in metrics, metrics[-600:]
        assert "cluster_rollouts_in_progress 0.0" in metrics


def test_rest_load_without_files_deploys_the_shares_newest_version(manager):
    with edge_client(manager) as http:
        assert http.post("/v2/repository/models/spare/load").status_code == 200
        assert manager.calls[-1][0] == "deploy" and manager.calls[-1][2]["name"] == "spare"
        assert_error(http.post("/v2/repository/models/nowhere/load"), 404, "nowhere")


@pytest.mark.parametrize(
    "body, says",
    [
        ({"parameters": {"file:1/model.pt": "not base64!"}}, "not valid base64"),
        ({"parameters": {"file:1/model.pt": 7}}, "base64"),
        (load_body(**{"file:1/model.pt": b"a", "file:2/model.pt": b"b"}), "exactly one model file"),
        (load_body(**{"file:x/model.pt": b"a"}), "file:<version>/<file>"),
        (load_body(**{"file:0/model.pt": b"a"}), "version from 1 to 2147483647"),
        (load_body(**{"file:999999999999999999/model.pt": b"a"}), "version from 1 to 2147483647"),
        (load_body(**{"file:2147483648/model.pt": b"a"}), "version from 1 to 2147483647"),
        (load_body(**{"file:1/weights.bin": b"a"}), "model.pt or model.pt2"),
        ({"parameters": {"config": "{not json", "file:1/model.pt": "YQ=="}}, "'config' is not valid JSON"),
        ({"parameters": {"config": "[1]", "file:1/model.pt": "YQ=="}}, "JSON object"),
        ({"parameters": {"config": {"inputs": []}}}, "string holding the config"),
        (load_body(ECHO_CONFIG), "a config alone cannot change a published version"),
        ({"parameters": []}, "'parameters' must be a JSON object"),
        ({"parameters": ["file:1/model.pt"]}, "'parameters' must be a JSON object"),
    ],
)
def test_rest_load_refuses_what_it_cannot_deploy(manager, body, says):
    with edge_client(manager) as http:
        assert_error(http.post("/v2/repository/models/m/load", json=body), 400, says)
    assert not [c for c in manager.calls if c[0] in ("publish", "deploy")], "nothing reaches the manager"


def test_a_failed_rollout_is_a_400_naming_each_agents_reason(manager):
    manager.fail_rollout = True
    with edge_client(manager) as http:
        response = http.post("/v2/repository/models/fresh/load", json=load_body(**{"file:1/model.pt": b"x"}))
        assert_error(response, 400, "failed to load 'fresh' version 1")
        assert "agent-a: cannot load: RuntimeError: bad file" in response.json()["error"]
        assert 'cluster_rollouts_total{outcome="failed"} 1.0' in http.get("/metrics").text


def test_the_manager_down_or_refusing_the_edges_key(manager):
    with edge_client(manager) as http:
        manager.raises["deployments"] = InferenceTimeoutError("no answer within 2 s")
        assert_error(http.post("/v2/repository/index"), 503, "the cluster's manager at tcp://127.0.0.1:19")
        manager.raises["publish"] = PermissionDeniedError("permission denied: publish needs an admin key")
        response = http.post("/v2/repository/models/m/load", json=load_body(**{"file:1/model.pt": b"x"}))
        assert_error(response, 403, "admin key")
        manager.raises["rollouts"] = InferenceTimeoutError("no answer")
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "cluster_rollouts_total" not in metrics.text


# ---- unload ----------------------------------------------------------------------------------------------------


def test_rest_unload_is_undeploy_and_idempotent(manager):
    with edge_client(manager) as http:
        assert http.post("/v2/repository/models/echo/unload", json={"parameters": {"unload_dependents": False}})
        assert manager.deployments["echo"]["version"] is None
        again = http.post("/v2/repository/models/echo/unload")  # Triton: unloading an unloaded model succeeds
        assert again.status_code == 200, again.text
        assert_error(http.post("/v2/repository/models/nowhere/unload"), 404, "unknown model 'nowhere'")
        index = http.post("/v2/repository/index").json()
        assert {"name": "echo", "state": "UNAVAILABLE", "reason": "unloaded"} in index


def test_load_and_unload_need_an_admin_token_index_any_token(manager):
    admin, user = {"Authorization": "Bearer boss"}, {"Authorization": "Bearer user"}
    with edge_client(manager, edge_token=["user"], edge_admin_token=["boss"]) as http:
        assert_error(http.post("/v2/repository/index"), 401, "token")
        assert http.post("/v2/repository/index", headers=user).status_code == 200
        for route in ("/v2/repository/models/echo/load", "/v2/repository/models/echo/unload"):
            assert_error(http.post(route, headers=user), 403, "admin token")
        assert http.post("/v2/repository/models/echo/unload", headers=admin).status_code == 200
        assert http.post("/v2/repository/models/spare/load", headers=admin).status_code == 200
        assert [c[0] for c in manager.calls if c[0] != "deployments"] == ["undeploy", "deploy"]


def test_the_openapi_document_lists_the_repository_routes(manager):
    with edge_client(manager) as http:
        paths = http.get("/openapi.json").json()["paths"]
        for path in (
            "/v2/repository/index",
            "/v2/repository/models/{name}/load",
            "/v2/repository/models/{name}/unload",
        ):
            assert "post" in paths[path], path
        assert "model_repository" in http.get("/v2").json()["extensions"]


# ---- gRPC --------------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def grpc_stub(manager):
    """A gRPC edge over a fake bus and `manager`, listening on 127.0.0.1 for the test's length: its stub."""
    edge = DataPlane("tcp://127.0.0.1:9", 1 << 20, Path("."), 30.0, 5.0, EdgeSecurity(), manager)
    edge.client = FakeBus()
    server, port = create_server(edge, "127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await server.stop(None)


def test_grpc_repository_rpcs_reach_the_manager():
    manager = FakeManager()

    async def main():
        async with grpc_stub(manager) as stub:
            load = service_pb2.RepositoryModelLoadRequest(model_name="fresh")
            load.parameters["config"].string_param = json.dumps(TRITON_CONFIG)
            load.parameters["file:1/model.pt"].bytes_param = b"\x00torchscript"
            await stub.RepositoryModelLoad(load)
            index = await stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
            manager.fail_rollout = True
            try:
                await stub.RepositoryModelLoad(load)
            except grpc.aio.AioRpcError as exc:
                failed = (exc.code(), exc.details())
            else:
                failed = None
            await stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name="fresh"))
            return index, failed

    index, failed = asyncio.run(main())
    assert sorted((m.name, m.version, m.state) for m in index.models) == [
        ("echo", "1", "READY"),
        ("fresh", "1", "READY"),
    ]
    assert failed is not None and failed[0] == grpc.StatusCode.INVALID_ARGUMENT and "failed to load" in failed[1]
    publish = [c for c in manager.calls if c[0] == "publish"]
    assert publish[0][1] == len(b"\x00torchscript") and publish[0][2]["config"] == TRITON_CONFIG
    assert manager.calls[-1][0] == "undeploy"


# ---- Triton's config JSON and publishing bytes -------------------------------------------------------------------


def test_tritons_config_becomes_ours():
    assert is_triton_config(TRITON_CONFIG) and not is_triton_config(ECHO_CONFIG)
    config = ModelConfig.from_dict(from_triton(TRITON_CONFIG, "fresh"), name="fresh")
    assert [(s.name, s.datatype, s.shape) for s in config.inputs] == [("x", "FP32", [-1, 4])]
    assert (config.platform, config.max_batch_size, config.max_queue_delay_us, config.instances) == (
        "torchscript",
        8,
        200,
        2,
    )
    plain = ModelConfig.from_dict(from_triton({**TRITON_CONFIG, "max_batch_size": 0, "dynamic_batching": None}))
    assert plain.inputs[0].shape == [4] and plain.max_batch_size == 0  # no batch dimension, no batching


@pytest.mark.parametrize(
    "change, says",
    [
        ({"sequence_batching": {}}, "unsupported key(s) 'sequence_batching'"),
        ({"platform": "onnxruntime_onnx"}, "cannot be served here"),
        ({"input": [{"name": "x", "data_type": "FP32", "dims": [4]}]}, "not a Triton TYPE_*"),
        ({"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["four"]}]}, "expected an integer"),
        ({"input": [{"name": "x", "data_type": "TYPE_FP32"}]}, "needs 'name', 'data_type' and 'dims'"),
        ({"instance_group": {"count": 2}}, "instance_group must be a list"),
    ],
)
def test_tritons_config_refused_where_we_cannot_honour_it(change, says):
    with pytest.raises(RepositoryError, match=says.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        from_triton({**TRITON_CONFIG, **change}, "fresh")


def test_publishing_uploaded_bytes_reuses_or_renumbers_but_never_overwrites(tmp_path):
    share = tmp_path / "share"
    assert publish_upload(share, "m", "model.pt", b"one", ECHO_CONFIG, 1) == (1, True)
    assert publish_upload(share, "m", "model.pt", b"one", ECHO_CONFIG, 1) == (1, False)  # the same files: no-op
    assert publish_upload(share, "m", "model.pt", b"one", None, 1) == (1, False)  # no config: the same too
    assert publish_upload(share, "m", "model.pt", b"two", ECHO_CONFIG, 1) == (2, True)  # other bytes: next number
    other_config = {**ECHO_CONFIG, "max_batch_size": 4}
    assert publish_upload(share, "m", "model.pt", b"two", other_config, 2) == (3, True)  # other config: next
    assert publish_upload(share, "m", "model.pt", b"nine", None, 9) == (9, True)  # a free number: as asked
    repo = ModelRepository(share)
    assert repo.versions("m") == [1, 2, 3, 9]
    assert [repo.read_model("m", v).data for v in (1, 2, 3, 9)] == [b"one", b"two", b"two", b"nine"]
    assert repo.read_model("m", 3).config.max_batch_size == 4 and repo.read_model("m", 1).config.max_batch_size == 0
    with pytest.raises(RepositoryError, match="model.pt or model.pt2"):
        publish_upload(share, "m", "model.onnx", b"x")
    with pytest.raises(RepositoryError, match="invalid model name"):
        publish_upload(share, "../up", "model.pt", b"x", ECHO_CONFIG)
    with pytest.raises(RepositoryError, match="no config was given"):
        publish_upload(share, "new", "model.pt", b"x")


def test_index_says_why_a_ready_model_has_fewer_copies_than_it_wants():
    short = "model 'big' needs 2 copies of 3.0 GiB (memory_mb in its config); placed on a; room for another on 0 agents"
    view = {"big": {"version": 1, "staged": None, "agents": {"a": [1]}, "rolling_out": False, "short": short}}
    assert index_entries(view, ready_only=True) == [{"name": "big", "version": "1", "state": "READY", "reason": short}]
