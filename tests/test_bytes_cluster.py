"""JPEG bytes in, class index out, through real processes (issue 22): a share holding a small CNN with an exported
preprocess (resize, normalise) and postprocess (softmax, top-1) and a config that decodes its BYTES input; manager,
broker, two agents and the edge; unmodified tritonclient.http and tritonclient.grpc, checked against the same
pipeline run directly in the test. A decompression bomb and a corrupt JPEG are refused with a clear 400 and the
agents keep serving. The logic alone: tests/test_bytes.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import bytes_models
from tests.harness import wait_for

pytestmark = pytest.mark.cluster

http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def stack(classifier_programs, tmp_path_factory):
    from tests.harness import edge_stack

    share = tmp_path_factory.mktemp("bytes-share")
    assert bytes_models.publish_classifier(share, classifier_programs) == 1
    with edge_stack(share, tmp_path_factory.mktemp("bytes-stack"), model="classifier") as cluster:
        yield cluster


def _images(n: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = bytes_models.sample_images(n, seed=3)
    array = np.empty(n, dtype=object)
    array[:] = images
    expected_class, expected_score = bytes_models.reference([bytes_models.decoded(i) for i in images])
    assert len(set(expected_class.ravel().tolist())) > 1, "the sample images should get different classes"
    return array, expected_class, expected_score


def _input(module, array: np.ndarray):
    tensor = module.InferInput("image", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def test_metadata_says_bytes_in(stack):
    with http.InferenceServerClient(stack.edge_url.removeprefix("http://")) as client:
        meta = client.get_model_metadata("classifier")
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        config = client.get_model_config("classifier")
        assert config["input"][0]["data_type"] == "TYPE_STRING"


def test_jpeg_in_class_out_over_http(stack):
    """Binary (JSON carries BYTES as UTF-8 text only, which a JPEG is not: tritonclient itself says to use binary)."""
    images, expected_class, expected_score = _images()
    with http.InferenceServerClient(stack.edge_url.removeprefix("http://")) as client:
        result = client.infer("classifier", [_input(http, images)])
    np.testing.assert_array_equal(result.as_numpy("class"), expected_class)
    np.testing.assert_allclose(result.as_numpy("score"), expected_score, rtol=1e-5, atol=1e-6)


def test_jpeg_in_class_out_over_grpc_and_the_bus_clients(stack):
    images, expected_class, expected_score = _images()
    with grpc.InferenceServerClient(stack.grpc_address) as client:
        result = client.infer("classifier", [_input(grpc, images)])
    np.testing.assert_array_equal(result.as_numpy("class"), expected_class)
    np.testing.assert_allclose(result.as_numpy("score"), expected_score, rtol=1e-5, atol=1e-6)
    bus = stack.client(timeout=30)
    answer = bus.infer("classifier", {"image": images})
    np.testing.assert_array_equal(answer.as_numpy("class"), expected_class)

    async def with_asyncio():
        from cluster import AsyncClient

        async with AsyncClient(stack.addresses.broker_clients, timeout=30) as client:
            return await client.infer("classifier", {"image": list(images)})  # a list of bytes will do

    answer = asyncio.run(with_asyncio())
    np.testing.assert_array_equal(answer.as_numpy("class"), expected_class)


def test_bomb_and_corrupt_images_are_refused_and_the_agents_keep_serving(stack):
    images, expected_class, _ = _images()
    bomb = np.array([bytes_models.bomb_png(30000)], dtype=object)
    corrupt = np.array([images[0][: len(images[0]) // 2]], dtype=object)
    with http.InferenceServerClient(stack.edge_url.removeprefix("http://")) as client:
        with pytest.raises(http.InferenceServerException) as caught:
            client.infer("classifier", [_input(http, bomb)])
        assert caught.value.status() == "400", caught.value
        assert "PNG refused before decoding" in caught.value.message(), caught.value
        with pytest.raises(http.InferenceServerException) as caught:
            client.infer("classifier", [_input(http, corrupt)])
        assert caught.value.status() == "400" and "cannot decode this JPEG" in caught.value.message(), caught.value
        result = client.infer("classifier", [_input(http, images)])
        np.testing.assert_array_equal(result.as_numpy("class"), expected_class)
    with grpc.InferenceServerClient(stack.grpc_address) as client:
        with pytest.raises(grpc.InferenceServerException) as caught:
            client.infer("classifier", [_input(grpc, bomb)])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
        assert "refused before decoding" in caught.value.message(), caught.value
    assert all(proc.alive() for proc in stack.running().values()), stack.running()


def _serves(stack, model: str) -> bool:
    with stack.client() as client:
        return all(any(m["name"] == model for m in a["models"]) for a in client.agents())


def test_deploy_with_programs_over_the_load_route_and_cluster_deploy(stack, classifier_programs, tmp_path):
    """The edge's load route takes file:<v>/preprocess.pt2 and postprocess.pt2 beside the model file, and `cluster
    deploy --preprocess --postprocess` sends them to the manager (no share on the deploying side): both publish the
    three programs in one version, hashed in its manifest, and serve."""
    images, expected_class, _ = _images()
    files = {f"file:1/{name}": path.read_bytes() for name, path in classifier_programs.items()}
    with http.InferenceServerClient(stack.edge_url.removeprefix("http://")) as client:
        client.load_model("loaded", config=json.dumps(bytes_models.CONFIG), files=files)
        manifest = json.loads((stack.share / "models" / "loaded" / "1" / "manifest.json").read_text())
        assert {"model.pt2", "preprocess.pt2", "postprocess.pt2"} <= set(manifest["files"]), manifest
        wait_for(lambda: client.is_model_ready("loaded"), 10, "the loaded model to be ready at the edge")
        result = client.infer("loaded", [_input(http, images)])
        np.testing.assert_array_equal(result.as_numpy("class"), expected_class)

    config = tmp_path / "config.json"
    config.write_text(json.dumps(bytes_models.CONFIG))
    env = {k: v for k, v in stack.env().items() if k != "CLUSTER_SHARE"}  # over the bus: the manager publishes
    deploy = subprocess.run(
        [sys.executable, "-m", "cluster", "deploy", str(classifier_programs["model.pt2"]), "--name", "deployed"]
        + ["--config", str(config), "--preprocess", str(classifier_programs["preprocess.pt2"])]
        + ["--postprocess", str(classifier_programs["postprocess.pt2"]), "--timeout", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "the manager published deployed version 1" in deploy.stdout, deploy.stdout
    assert sorted(os.listdir(stack.share / "models" / "deployed" / "1")) == [
        "config.json",
        "manifest.json",
        "model.pt2",
        "postprocess.pt2",
        "preprocess.pt2",
    ]
    wait_for(lambda: _serves(stack, "deployed"), 10, "every agent to serve 'deployed'")
    answer = stack.client(timeout=30).infer("deployed", {"image": images})
    np.testing.assert_array_equal(answer.as_numpy("class"), expected_class)
