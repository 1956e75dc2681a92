"""The edge's gRPC end to end: real manager, broker and agents (LocalCluster) and the edge as its own process with
gRPC on a port the OS picks, driven by unmodified tritonclient.grpc: sync, asyncio and streaming, with the bus
Client's answers as the reference. What the service decides by itself is tested in-process in tests/test_grpc_edge.py.
"""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest

pytestmark = pytest.mark.cluster

triton = pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def stack(demo_share, tmp_path_factory):
    from tests.harness import edge_stack

    with edge_stack(demo_share, tmp_path_factory.mktemp("grpc-stack"), model="digits") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def digits_images() -> np.ndarray:
    from cluster.demo_models import digits_split

    return digits_split()[2][:16]  # 16 held-out images, float32 [16, 8, 8]


def _input(name: str, array: np.ndarray, module=triton):
    tensor = module.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata(stack):
    with triton.InferenceServerClient(stack.grpc_address) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("echo", "1")
        meta = client.get_model_metadata("digits")
        assert meta.name == "digits" and "1" in meta.versions
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "FP32", [-1, 8, 8])]
        assert client.get_server_metadata().name == "torch-serving-cluster"
        with pytest.raises(triton.InferenceServerException) as caught:
            client.get_model_metadata("no-such-model")
        assert caught.value.status() == "StatusCode.NOT_FOUND", caught.value


def test_sync_infer_gives_what_the_bus_client_gives(stack, digits_images):
    bus = stack.client(timeout=30)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with triton.InferenceServerClient(stack.grpc_address) as client:
        echo = client.infer("echo", [_input("x", x)], outputs=[triton.InferRequestedOutput("y")])
        np.testing.assert_array_equal(echo.as_numpy("y"), bus.infer("echo", {"x": x}).as_numpy("y"))
        digits = client.infer("digits", [_input("image", digits_images)])
        expected = bus.infer("digits", {"image": digits_images}).as_numpy("probs")
        np.testing.assert_allclose(digits.as_numpy("probs"), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(triton.InferenceServerException) as caught:  # the agent's own shape check
            client.infer("digits", [_input("image", np.zeros((1, 7, 8), np.float32))])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value


def test_asyncio_client_infers(stack):
    import tritonclient.grpc.aio as triton_aio

    async def main():
        async with triton_aio.InferenceServerClient(stack.grpc_address) as client:
            xs = [np.full((1, 64), i, np.float32) for i in range(8)]
            results = await asyncio.wait_for(
                asyncio.gather(*(client.infer("echo", [_input("x", x, triton_aio)]) for x in xs)), 60
            )
            for x, result in zip(xs, results):
                np.testing.assert_array_equal(result.as_numpy("y"), x)

    asyncio.run(main())


def test_stream_answers_each_request_and_an_error_does_not_end_it(stack):
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(stack.grpc_address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for i in range(5):
                model = "no-such-model" if i == 2 else "echo"
                client.async_stream_infer(model, [_input("x", np.full((1, 4), i, np.float32))], request_id=str(i))
            got = [answers.get(timeout=60) for _ in range(5)]
        finally:
            client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "no-such-model" in str(errors[0]), errors
    values = sorted(int(result.as_numpy("y")[0, 0]) for result, error in got if error is None)
    assert values == [0, 1, 3, 4], values
