"""Issue 22 items 2 and 3: a model is warmed up at every batch size before it serves, and max_batch_size counts rows
(Triton's meaning): no forward pass holds more, a larger request is refused (or split, as configured)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zmq

from cluster.agent.loaded_model import LoadedModel, load_model
from cluster.agent.runner import BatchStats, Job, WorkerPool
from cluster.codec import encode_tensors
from cluster.errors import BadRequestError
from cluster.model_config import InputError, ModelConfig
from cluster.protocol import PREAMBLE, Command, unpack_header
from cluster.publish import publish_version
from cluster.repository import ModelRepository, RepositoryError
from tests.harness import wait_for

WIDTH = 4


def rows_config(name: str = "rows", max_batch_size: int = 16, **extra) -> dict:
    """x FP32 [-1, WIDTH] in, y FP32 [-1, WIDTH] out (y = 2x), batching by rows."""
    return {
        "name": name,
        "platform": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, WIDTH]}],
        "max_batch_size": max_batch_size,
        "max_queue_delay_us": 2000,
        **extra,
    }


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _meta(rows: int, name: str = "x") -> dict:
    return {"name": name, "datatype": "FP32", "shape": [rows, WIDTH]}


# ---- the config's checks --------------------------------------------------------------------------------------


def test_a_request_of_more_rows_than_max_batch_size_is_refused_with_the_numbers():
    config = ModelConfig.from_dict(rows_config())
    config.check_inputs([_meta(16)])
    config.check_inputs([_meta(1)])
    with pytest.raises(InputError) as refused:
        config.check_inputs([_meta(64)])
    text = str(refused.value)
    assert "64 rows" in text and "max_batch_size is 16" in text and '"oversize": "split"' in text, text


def test_split_accepts_any_rows_and_max_batch_size_0_has_no_row_limit():
    from cluster.model_config import request_rows

    ModelConfig.from_dict(rows_config(oversize="split")).check_inputs([_meta(1000)])
    unbatched = ModelConfig.from_dict(rows_config(max_batch_size=0))
    unbatched.check_inputs([_meta(1000)])
    assert request_rows(unbatched, [_meta(1000)]) == 1  # a model that does not batch: each request is one execution
    one = ModelConfig.from_dict(rows_config(max_batch_size=1))  # no batching, but one row a request at most
    one.check_inputs([_meta(1)])
    with pytest.raises(InputError, match="2 rows .* max_batch_size is 1 rows"):
        one.check_inputs([_meta(2)])


def test_batched_inputs_of_one_request_must_agree_on_rows():
    from cluster.model_config import request_rows

    config = ModelConfig.from_dict(
        {
            **rows_config(),
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [-1, WIDTH]},
                {"name": "b", "datatype": "FP32", "shape": [-1, WIDTH]},
                {"name": "scale", "datatype": "FP32", "shape": [1]},  # not batched: its first dimension is fixed
            ],
        }
    )
    fine = [_meta(3, "a"), _meta(3, "b"), {"name": "scale", "datatype": "FP32", "shape": [1]}]
    config.check_inputs(fine)
    assert request_rows(config, fine) == 3
    with pytest.raises(InputError, match="differ: 'a' 3, 'b' 5"):
        config.check_inputs([_meta(3, "a"), _meta(5, "b"), {"name": "scale", "datatype": "FP32", "shape": [1]}])


def test_warmup_inputs_put_the_rows_in_the_leading_variable_dimension():
    batched = ModelConfig.from_dict({**rows_config(), "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}]})
    assert batched.warmup_inputs(5)["x"].shape == (5, 1)
    assert batched.warmup_inputs()["x"].shape == (1, 1)
    unbatched = ModelConfig.from_dict({**rows_config(max_batch_size=0)})
    assert unbatched.warmup_inputs(5)["x"].shape == (1, WIDTH)


def test_chunks_and_batch_stats_count_rows():
    from cluster.agent.runner import chunk_rows

    assert chunk_rows(64, 16) == [16, 16, 16, 16] and chunk_rows(40, 16) == [16, 16, 8]
    assert chunk_rows(7, 16) == [7] and chunk_rows(1000, 0) == [1000]
    stats = BatchStats()
    stats.add(3, [0.0, 0.0, 0.0], [15])
    stats.add(1, [0.0], [16, 16, 8])
    described = stats.describe()
    assert described["rows"] == 55 and described["largest_rows"] == 16 and described["largest_batch"] == 3, described


# ---- warm-up at every batch size ------------------------------------------------------------------------------


class _Recorder(torch.nn.Module):
    """Doubles x and notes the rows of every call (a Python module: LoadedModel runs whatever is callable)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        return x * 2


def test_warm_up_runs_every_batch_size_on_every_instance_and_is_timed():
    config = ModelConfig.from_dict(rows_config(max_batch_size=6, instances=2))
    first, second = _Recorder(), _Recorder()
    model = LoadedModel("rows", 1, config, first, copies=[second])
    for instance in range(2):
        model.warmup(instance)
    assert first.calls == second.calls == [1, 2, 3, 4, 5, 6]
    info = model.info()
    assert info["warmup_sizes"] == [1, 2, 3, 4, 5, 6] and model.warmup_s > 0, info

    listed = ModelConfig.from_dict(rows_config(max_batch_size=64, warmup_batch_sizes=[1, 8, 64]))
    recorder = _Recorder()
    model = LoadedModel("rows", 1, listed, recorder)
    model.warmup()
    assert recorder.calls == [1, 8, 64] and model.info()["warmup_sizes"] == [1, 8, 64]


def test_a_model_that_fails_at_a_larger_batch_size_is_refused_at_load(tmp_path):
    """Checked at every size: a model that only takes one row fails its warm-up at 2, not on a user's batch."""

    class OneRow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != 1:
                raise ValueError("one row only")
            return x

    path = tmp_path / "one.pt"
    torch.jit.script(OneRow()).save(str(path))
    publish_version(tmp_path, "one", path, rows_config("one", max_batch_size=4))
    with pytest.raises(RepositoryError, match=r"warm-up failed on zeros .*\[2, 4\].*one row only"):
        load_model(ModelRepository(tmp_path), "one", 1)


# ---- the batcher fills by rows --------------------------------------------------------------------------------


class _Pool:
    """A WorkerPool of one thread and its results socket, in-process; answers by request id."""

    def __init__(self, name: str) -> None:
        self.ctx = zmq.Context()
        self.results = self.ctx.socket(zmq.PULL)
        self.results.bind(f"inproc://{name}")
        self.pool = WorkerPool(self.ctx, f"inproc://{name}", "test-agent")

    def submit(self, model, i: int, x: np.ndarray) -> None:
        metas, frames = encode_tensors({"x": x})
        self.pool.submit(Job(i.to_bytes(8, "big"), i, model, metas, [bytes(f) for f in frames], None))

    def answers(self, n: int) -> dict:
        found = {}
        for _ in range(n):
            assert self.results.poll(10_000), f"no answer from the worker ({len(found)} of {n} came)"
            frames = self.results.recv_multipart()
            header = unpack_header(frames[1])
            ok = frames[0][:5] == PREAMBLE[Command.REPLY]
            y = np.frombuffer(frames[2], np.float32).reshape(header["outputs"][0]["shape"]) if ok else None
            found[header["id"]] = (ok, header, y)
        return found

    def close(self) -> None:
        self.pool.stop()
        self.results.close()
        self.ctx.term()


def _loaded(config: dict, module: torch.nn.Module) -> LoadedModel:
    return LoadedModel(config["name"], 1, ModelConfig.from_dict(config), module)


def test_the_batcher_fills_by_rows_in_order_and_never_passes_max_batch_size():
    """Queued before the worker starts: 1+7+7+1 = 16 rows make the first pass; 15 then waits at the head for its own
    pass (2 would fit after it, but a request is never passed over); 2+1+1 after it; each caller its own rows."""
    recorder = _Recorder()
    model = _loaded(rows_config(), recorder)
    rows = [1, 7, 7, 1, 15, 2, 1, 1, 16, 9, 8]
    inputs = [np.full((n, WIDTH), i, np.float32) for i, n in enumerate(rows)]
    pool = _Pool("rows-fill")
    try:
        for i, x in enumerate(inputs):
            pool.submit(model, i, x)
        pool.pool.start()
        answers = pool.answers(len(rows))
    finally:
        pool.close()
    assert recorder.calls == [16, 15, 4, 16, 9, 8], recorder.calls
    for i, x in enumerate(inputs):
        ok, header, y = answers[i]
        assert ok, header
        np.testing.assert_array_equal(y, x * 2)
    batching = pool.pool.describe()["rows"]
    assert batching["largest_rows"] == 16 and batching["rows"] == sum(rows) and batching["largest_batch"] == 4
    stats = pool.pool.describe_stats()["rows"]["1"]
    assert {b["batch_size"] for b in stats["batch_stats"]} == {16, 15, 4, 9, 8}, stats["batch_stats"]
    assert stats["inference_count"] == sum(rows) and stats["execution_count"] == 6, stats


def test_max_batch_size_0_runs_each_request_alone_whatever_its_rows():
    recorder = _Recorder()
    model = _loaded(rows_config(max_batch_size=0), recorder)
    pool = _Pool("rows-unbatched")
    try:
        for i, n in enumerate((100, 3, 100)):
            pool.submit(model, i, np.ones((n, WIDTH), np.float32))
        pool.pool.start()
        answers = pool.answers(3)
    finally:
        pool.close()
    assert recorder.calls == [100, 3, 100] and all(ok for ok, _, _ in answers.values()), recorder.calls


def test_a_request_that_does_not_fit_waits_for_the_next_batch_while_one_fills():
    """A burst (two requests queued) waits up to the delay for the batch to fill; a request arriving then that
    would pass 16 rows is not added: it goes in the next pass."""
    gate = threading.Event()

    class Gated(_Recorder):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate.wait(10)
            return super().forward(x)

    recorder = Gated()
    model = _loaded(rows_config(max_queue_delay_us=2_000_000), recorder)  # 2 s: ended by a request that does not fit
    pool = _Pool("rows-wait")
    try:
        pool.submit(model, 0, np.zeros((4, WIDTH), np.float32))
        pool.submit(model, 1, np.zeros((4, WIDTH), np.float32))
        pool.pool.start()
        wait_for(lambda: id(model) in pool.pool._held or None, 5, "the worker to hold 8 rows, waiting to fill")
        pool.submit(model, 2, np.zeros((4, WIDTH), np.float32))  # fits: 12
        pool.submit(model, 3, np.zeros((5, WIDTH), np.float32))  # 17 would pass 16: the batch goes without it
        gate.set()
        answers = pool.answers(4)
    finally:
        gate.set()
        pool.close()
    assert recorder.calls == [12, 5], recorder.calls
    assert all(ok for ok, _, _ in answers.values()), answers


def test_split_runs_chunks_of_at_most_max_batch_size_and_answers_once():
    recorder = _Recorder()
    model = _loaded(rows_config(oversize="split"), recorder)
    x = np.arange(40 * WIDTH, dtype=np.float32).reshape(40, WIDTH)
    pool = _Pool("rows-split")
    try:
        pool.submit(model, 0, np.ones((3, WIDTH), np.float32))
        pool.submit(model, 1, x)  # does not fit beside 3 rows, nor alone: three passes
        pool.submit(model, 2, np.ones((2, WIDTH), np.float32))
        pool.pool.start()
        answers = pool.answers(3)
    finally:
        pool.close()
    assert recorder.calls == [3, 16, 16, 8, 2], recorder.calls
    ok, header, y = answers[1]
    assert ok and y.shape == (40, WIDTH), header
    np.testing.assert_array_equal(y, x * 2)
    stats = pool.pool.describe_stats()["rows"]["1"]
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]} == {2: 1, 3: 1, 8: 1, 16: 2}
    assert pool.pool.describe()["rows"]["largest_rows"] == 16


def test_a_split_model_whose_outputs_are_not_rows_fails_that_request_clearly():
    class Summed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(0, keepdim=True)

    model = _loaded(rows_config(oversize="split"), Summed())
    pool = _Pool("rows-split-bad")
    try:
        pool.submit(model, 0, np.ones((20, WIDTH), np.float32))
        pool.pool.start()
        ok, header, _ = pool.answers(1)[0]
    finally:
        pool.close()
    assert not ok and "cannot be split into chunks of 16" in header["message"], header


# ---- through a real cluster -----------------------------------------------------------------------------------


@pytest.mark.cluster
def test_rows_through_a_cluster_refused_split_and_warm_at_every_size(cluster, share, tmp_path):
    """Requests of 1, 7 and 64 rows, max_batch_size 16: the agent's statistics show no pass over 16 rows; the
    64-row request is refused with the numbers, or split and answered whole; the heartbeat says each version was
    warmed at every batch size, and how long it took."""
    path = tmp_path / "double.pt"
    torch.jit.script(Double()).save(str(path))
    publish_version(share, "rows", path, rows_config("rows"))
    publish_version(share, "rows_split", path, rows_config("rows_split", oversize="split", warmup_batch_sizes=[1, 16]))
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("rows-agent")
    cluster.wait_for_agents(1, model="rows_split")
    client = cluster.client()
    rng = np.random.default_rng(0)
    for name in ("rows", "rows_split"):
        sizes = [1, 7, 64] * 6 + [7, 7, 1, 1]
        xs = [rng.standard_normal((n, WIDTH), dtype=np.float32) for n in sizes]
        futures = [client.submit(name, {"x": x}) for x in xs]
        for x, future in zip(xs, futures):
            if name == "rows" and len(x) == 64:
                with pytest.raises(BadRequestError, match="64 rows .*max_batch_size is 16"):
                    future.result(timeout=60)
            else:
                np.testing.assert_allclose(future.result(timeout=60).as_numpy("y"), x * 2)
    answered = {"rows": sum(n for n in sizes if n != 64), "rows_split": sum(sizes)}

    def counted():
        agent = client.agents()[0]
        stats = agent.get("stats") or {}
        rows = {m: stats.get(m, {}).get("1", {}).get("inference_count") for m in answered}
        return agent if rows == answered else None

    agent = wait_for(counted, 10, "the heartbeat's statistics to count every row answered")
    for name in answered:
        sizes_run = [b["batch_size"] for b in agent["stats"][name]["1"]["batch_stats"]]
        assert sizes_run and max(sizes_run) <= 16, (name, sizes_run)
        assert agent["batching"][name]["largest_rows"] <= 16, agent["batching"][name]
    assert 16 in [b["batch_size"] for b in agent["stats"]["rows_split"]["1"]["batch_stats"]]  # 64 rows: 4 x 16
    assert agent["stats"]["rows"]["1"]["failures"] == {}, "a refused request never reaches the model"

    info = agent["model_info"]
    assert info["rows"]["1"]["warmup_sizes"] == list(range(1, 17)), info
    assert info["rows_split"]["1"]["warmup_sizes"] == [1, 16], info
    assert all(info[m]["1"]["warmup_s"] > 0 for m in answered), info
    assert "model rows version 1 warmed up in" in cluster.logs()
