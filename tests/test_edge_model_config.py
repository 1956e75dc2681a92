"""Triton's model configuration extension and model readiness as tritonclient users meet them (issue 18): the config
over HTTP and gRPC (was 404 / UNIMPLEMENTED), `is_model_ready` false over gRPC for a model that is not served (was
NOT_FOUND, while HTTP said false), and an RPC the edge does not implement answered UNIMPLEMENTED without an ERROR
traceback in its log. Real processes (edge_stack); the translation itself in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from cluster.model_config import ModelConfig, from_triton
from cluster.repository import ModelRepository
from edge.triton_config import triton_model_config
from tests.harness import wait_for

BATCHED = {  # a Triton user's config with batching: dims leave the batch dimension out
    "name": "batched",
    "platform": "pytorch_libtorch",
    "max_batch_size": 8,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1]}],
    "dynamic_batching": {"max_queue_delay_microseconds": 500},
    "instance_group": [{"count": 2}],
}


@pytest.fixture(scope="module")
def stack(demo_share, tmp_path_factory):
    from tests.harness import edge_stack

    with edge_stack(demo_share, tmp_path_factory.mktemp("config-stack"), model="echo") as cluster:
        yield cluster


def _edge_log(stack) -> str:
    return next(p for p in reversed(stack.procs) if p.role == "edge").log()


@pytest.mark.cluster
def test_tritonclient_reads_model_configs_over_http_and_grpc(stack):
    http = triton_http.InferenceServerClient(stack.edge_url.split("://", 1)[1])
    grpc = triton_grpc.InferenceServerClient(stack.grpc_address)
    try:
        digits = http.get_model_config("digits")  # ours: max_batch_size 32, shapes [-1, 8, 8] -> [-1, 10]
        assert digits["name"] == "digits" and digits["platform"] == "pytorch_libtorch", digits
        assert digits["max_batch_size"] == 32 and "dynamic_batching" in digits, digits
        assert digits["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [8, 8]}], digits
        assert digits["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [10]}], digits
        assert digits["instance_group"][0]["count"] >= 1
        assert http.get_model_config("digits", "1") == digits
        echo = http.get_model_config("echo")  # no batching: the whole shapes
        assert echo["max_batch_size"] == 0 and echo["input"][0]["dims"] == [-1, -1], echo

        answer = grpc.get_model_config("digits").config  # the proto, as tritonclient.grpc gives it
        assert answer.name == "digits" and answer.platform == "pytorch_libtorch" and answer.max_batch_size == 32
        assert [(t.name, list(t.dims)) for t in answer.input] == [("image", [8, 8])]
        assert triton_grpc.model_config_pb2.DataType.Name(answer.input[0].data_type) == "TYPE_FP32"
        as_json = grpc.get_model_config("echo", as_json=True)["config"]
        assert as_json["name"] == "echo" and [int(d) for d in as_json["input"][0]["dims"]] == [-1, -1], as_json

        # what a Triton user loads comes back as they wrote it
        model = ModelRepository(stack.share).read_model("echo", 1).data
        http.load_model("batched", config=json.dumps(BATCHED), files={"file:1/model.pt": model})
        wait_for(lambda: http.is_model_ready("batched"), 10, "batched to be ready at the edge")
        config = http.get_model_config("batched")
        assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [-1], config
        assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 500}, config
        assert config["instance_group"][0]["count"] == 2, config

        for client in (http, grpc):
            with pytest.raises(InferenceServerException) as missing:
                client.get_model_config("nope")
            assert "nope" in missing.value.message(), missing.value
    finally:
        http.close()
        grpc.close()


@pytest.mark.cluster
def test_is_model_ready_is_false_over_grpc_as_over_http_for_a_model_not_served(stack):
    http = triton_http.InferenceServerClient(stack.edge_url.split("://", 1)[1])
    grpc = triton_grpc.InferenceServerClient(stack.grpc_address)
    try:
        assert http.is_model_ready("echo") and grpc.is_model_ready("echo")
        assert http.is_model_ready("never-heard-of") is False
        assert grpc.is_model_ready("never-heard-of") is False, "an unknown model is not ready, not an error"
        model = ModelRepository(stack.share).read_model("echo", 1).data
        config = {**BATCHED, "name": "brief", "max_batch_size": 0, "input": [], "output": []}
        config["input"] = [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, -1]}]
        config["output"] = [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, -1]}]
        del config["dynamic_batching"]
        grpc.load_model("brief", config=json.dumps(config), files={"file:1/model.pt": model})
        wait_for(lambda: grpc.is_model_ready("brief"), 10, "brief to be ready")
        grpc.unload_model("brief")
        wait_for(lambda: not http.is_model_ready("brief"), 10, "brief to be unloaded (HTTP: not ready)")
        assert grpc.is_model_ready("brief") is False, "an unloaded model is not ready over gRPC either"
        x = triton_grpc.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.ones((1, 2), np.float32))
        assert grpc.infer("echo", [x]).as_numpy("y").shape == (1, 2)
    finally:
        http.close()
        grpc.close()


@pytest.mark.cluster
def test_an_rpc_the_edge_does_not_implement_is_unimplemented_without_a_traceback(stack):
    grpc = triton_grpc.InferenceServerClient(stack.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as refused:
            grpc.get_system_shared_memory_status()
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED", refused.value
        assert "SystemSharedMemoryStatus" in refused.value.message()
        assert grpc.is_server_live()  # after the refusal: the edge's log has had time to say anything it would
    finally:
        grpc.close()
    log = _edge_log(stack)
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_the_triton_config_is_the_inverse_of_reading_one():
    """Ours -> Triton's -> ours gives the same config (batched and not)."""
    for ours in (
        {
            "name": "digits",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
            "max_batch_size": 32,
            "max_queue_delay_us": 100,
            "instances": 3,
        },
        {
            "name": "echo",
            "inputs": [{"name": "x", "datatype": "INT64", "shape": [1, -1]}],
            "outputs": [{"name": "y", "datatype": "FP64", "shape": [1, -1]}],
            "instances": 1,
        },
    ):
        config = ModelConfig.from_dict(ours)
        meta = dict(config.metadata(), version=1, versions=[1], config=config.to_dict())
        triton = triton_model_config(meta)
        back = ModelConfig.from_dict(from_triton({k: v for k, v in triton.items() if k != "version_policy"}))
        assert back.to_dict() == dict(config.to_dict(), platform="torchscript"), triton
    # an agent that announces no config (an older one): the inputs and outputs alone, no batching
    meta = {"name": "m", "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 4]}], "outputs": []}
    assert triton_model_config(meta)["input"] == [{"name": "a", "data_type": "TYPE_FP32", "dims": [-1, 4]}]
