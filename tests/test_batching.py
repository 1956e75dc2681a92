"""Dynamic batching returns exactly what unbatched inference returns, each caller gets its own rows, and one bad
request in a batch fails only itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zmq

from cluster.agent.loaded_model import load_model
from cluster.agent.runner import Job, WorkerPool
from cluster.codec import encode_tensors
from cluster.demo_models import digits_split
from cluster.protocol import PREAMBLE, Command, unpack_header
from cluster.publish import publish_version
from cluster.repository import ModelRepository
from tests.harness import wait_for


class Picky(torch.nn.Module):
    """Doubles x; refuses negative input (so one request can make a batched pass fail)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2


PICKY_CONFIG = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    "max_batch_size": 8,
    "max_queue_delay_us": 1000,
}


@pytest.mark.cluster
def test_batched_digits_match_the_model_run_directly(cluster, share):
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("batching-agent", "--models", "digits")
    cluster.wait_for_agents(1, model="digits")
    _, _, x_test, _ = digits_split()
    repository = ModelRepository(share)
    model = load_model(repository, "digits", 1)
    assert model.config.max_batch_size > 1, "the demo digits model should batch"
    direct = model.infer({"image": torch.from_numpy(x_test)})["probs"].numpy()
    client = cluster.client()
    futures = [client.submit("digits", {"image": x_test[i : i + 1]}) for i in range(360)]
    batched = np.concatenate([f.result(timeout=60).as_numpy("probs") for f in futures])
    np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-6)

    def counted_all():
        stats = client.agents()[0]["batching"].get("digits", {})
        return stats if stats.get("requests", 0) >= 360 else None

    stats = wait_for(counted_all, 5, "the agent's heartbeat to count all 360 requests in its batching statistics")
    assert stats["mean_batch"] > 1 and stats["largest_batch"] <= 32, stats


def test_one_bad_request_fails_only_itself(tmp_path):
    path = tmp_path / "picky.pt"
    torch.jit.script(Picky()).save(str(path))
    publish_version(tmp_path, "picky", path, {"name": "picky", **PICKY_CONFIG})
    model = load_model(ModelRepository(tmp_path), "picky", 1)
    ctx = zmq.Context()
    results = ctx.socket(zmq.PULL)
    results.bind("inproc://test-results")
    pool = WorkerPool(ctx, "inproc://test-results", "test-agent")
    inputs = [
        np.full((2, 3), 1, np.float32),
        np.full((1, 3), -1, np.float32),
        np.arange(9, dtype=np.float32).reshape(3, 3),
    ]
    for i, x in enumerate(inputs):  # queued before the worker starts: they are taken as one batch
        metas, frames = encode_tensors({"x": x})
        pool.submit(Job(bytes([i]) * 8, i, model, metas, [bytes(f) for f in frames], None))
    pool.start()
    answers = {}
    try:
        for _ in inputs:
            assert results.poll(10_000), "no answer from the worker"
            frames = results.recv_multipart()
            answers[frames[0][5]] = (frames[0][:5], unpack_header(frames[1]), frames[2:])  # preamble + route
    finally:
        pool.stop()
        results.close()
        ctx.term()
    for i in (0, 2):
        preamble, header, tensors = answers[i]
        assert preamble == PREAMBLE[Command.REPLY], header
        assert header["id"] == i
        y = np.frombuffer(tensors[0], np.float32).reshape(header["outputs"][0]["shape"])
        np.testing.assert_array_equal(y, inputs[i] * 2)
    preamble, header, _ = answers[1]
    assert preamble == PREAMBLE[Command.ERROR] and "negative input" in header["message"], header
    assert pool.describe()["picky"]["largest_batch"] == 3
