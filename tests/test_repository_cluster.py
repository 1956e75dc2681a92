"""Triton's model repository and statistics extensions on real processes (manager, broker, two agents, the edge with
REST and gRPC), driven by unmodified tritonclient.http and tritonclient.grpc as a Triton user would: a model loaded
with its files from a machine without the share reaches every agent and answers; unload; the index; statistics over
gRPC that count requests from the bus, REST and gRPC together; the rollout counter in /metrics; and `cluster deploy`
without --share, which sends the file to the manager. The routes' own decisions are tested in-process in
tests/test_edge_repository.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from cluster.manager.client import ManagerClient
from cluster.repository import ModelRepository
from tests.harness import wait_for

pytestmark = pytest.mark.cluster

TRITON_ECHO_CONFIG = {  # Triton's own JSON form of a config: the cluster translates it
    "name": "mirror",
    "platform": "pytorch_libtorch",
    "max_batch_size": 0,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, -1]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, -1]}],
}


@pytest.fixture(scope="module")
def stack(demo_share, tmp_path_factory):
    from tests.harness import edge_stack

    with edge_stack(demo_share, tmp_path_factory.mktemp("repository-stack"), model="echo") as cluster:
        yield cluster


def serving(cluster, model: str) -> dict[str, list[int]]:
    """agent id -> versions of `model` it serves, from the broker."""
    with cluster.client() as client:
        return {a["id"]: sorted(m["version"] for m in a["models"] if m["name"] == model) for a in client.agents()}


def echo_bytes(cluster) -> bytes:
    """The demo echo model's TorchScript file: a Triton user's model.pt, read from outside the cluster's share."""
    return ModelRepository(cluster.share).read_model("echo", 1).data


def test_tritonclient_loads_a_new_model_with_its_files_unloads_it_and_lists_the_index(stack):
    http = triton_http.InferenceServerClient(stack.edge_url.split("://", 1)[1])
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["echo"]["state"] == "READY" and index["digits"]["state"] == "READY", index
    assert "mirror" not in index

    http.load_model("mirror", config=json.dumps(TRITON_ECHO_CONFIG), files={"file:1/model.pt": echo_bytes(stack)})
    # load_model returns when the rollout is over (the manager has heard every agent serve it); the broker hears
    # the same heartbeats, so it knows within moments
    wait_for(lambda: serving(stack, "mirror") == {a: [1] for a in serving(stack, "echo")}, 3, "both agents on mirror")
    wait_for(lambda: http.is_model_ready("mirror"), 3, "mirror to be ready at the edge")
    x = triton_http.InferInput("x", [2, 3], "FP32")
    x.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), binary_data=True)
    result = http.infer("mirror", [x])
    np.testing.assert_array_equal(result.as_numpy("y"), np.arange(6, dtype=np.float32).reshape(2, 3))
    published = stack.share / "models" / "mirror" / "1" / "config.json"
    assert json.loads(published.read_text())["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, -1]}

    # The same files again: nothing new is published (version 1 stays the only one).
    http.load_model("mirror", config=json.dumps(TRITON_ECHO_CONFIG), files={"file:1/model.pt": echo_bytes(stack)})
    assert ModelRepository(stack.share).versions("mirror") == [1]

    # A corrupt file: the rollout fails on every agent, the error says so, and version 1 keeps serving.
    with pytest.raises(InferenceServerException, match="failed to load 'mirror' version 2"):
        http.load_model("mirror", files={"file:2/model.pt": b"not a TorchScript archive"})
    assert serving(stack, "mirror") == {a: [1] for a in serving(stack, "echo")}
    assert http.infer("mirror", [x]).as_numpy("y").shape == (2, 3)

    http.unload_model("mirror")
    wait_for(lambda: not any(serving(stack, "mirror").values()), 10, "every agent to unload mirror")
    entry = next(m for m in http.get_model_repository_index() if m["name"] == "mirror")
    assert entry["state"] == "UNAVAILABLE" and entry["reason"] == "unloaded", entry
    assert [m["name"] for m in http.get_model_repository_index()] == sorted(
        m["name"] for m in http.get_model_repository_index()
    )
    metrics = httpx.get(f"{stack.edge_url}/metrics", timeout=30).text
    ok = re.search(r'^cluster_rollouts_total\{outcome="ok"\} (\S+)$', metrics, re.M)
    failed = re.search(r'^cluster_rollouts_total\{outcome="failed"\} (\S+)$', metrics, re.M)
    assert ok and float(ok.group(1)) >= 1 and failed and float(failed.group(1)) >= 1, metrics[-1500:]


def test_tritonclient_grpc_loads_and_statistics_count_every_door(stack):
    grpc = triton_grpc.InferenceServerClient(stack.grpc_address)
    config = {**TRITON_ECHO_CONFIG, "name": "twin"}
    grpc.load_model("twin", config=json.dumps(config), files={"file:1/model.pt": echo_bytes(stack)})
    wait_for(lambda: grpc.is_model_ready("twin"), 3, "twin to be ready at the edge")
    assert any(m.name == "twin" and m.state == "READY" for m in grpc.get_model_repository_index().models)

    bus, rest, rpc = 4, 3, 5
    with stack.client() as client:
        for _ in range(bus):
            client.infer("twin", {"x": np.ones((1, 2), np.float32)})
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    for _ in range(rest):
        answer = httpx.post(f"{stack.edge_url}/v2/models/twin/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
    x = triton_grpc.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    for _ in range(rpc):
        assert grpc.infer("twin", [x]).as_numpy("y").shape == (1, 2)

    expected = bus + rest + rpc

    def counted():
        stats = grpc.get_inference_statistics("twin", as_json=True)["model_stats"]
        success = int(stats[0]["inference_stats"]["success"].get("count", 0)) if stats else 0
        return stats if success >= expected else None

    stats = wait_for(counted, 15, f"{expected} successes in gRPC ModelStatistics for twin")[0]
    assert int(stats["inference_stats"]["success"]["count"]) == expected, stats
    assert int(stats["execution_count"]) == expected, stats
    grpc.unload_model("twin")
    wait_for(lambda: not any(serving(stack, "twin").values()), 10, "every agent to unload twin")


def test_cluster_deploy_without_a_share_sends_the_file_to_the_manager(stack, tmp_path):
    model = tmp_path / "shipped.pt"
    model.write_bytes(echo_bytes(stack))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TRITON_ECHO_CONFIG, "name": "shipped"}))
    env = stack.env()
    env.pop("CLUSTER_SHARE")  # the operator's machine has no share
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "deploy", str(model), "--name", "shipped", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the manager published shipped version 1" in out.stdout and "done" in out.stdout, out.stdout
    assert ModelRepository(stack.share).versions("shipped") == [1]  # on the manager's share
    with stack.client() as client:
        assert client.infer("shipped", {"x": np.ones((1, 2), np.float32)}).model == "shipped"


def test_cluster_bench_sweeps_levels_through_every_door(stack):
    """`cluster bench` right after the README's install (httpx comes with the package): a closed-loop sweep and an
    open-loop rate through the bus, HTTP and gRPC, each level with its percentiles and the queue/compute split from
    the agents' statistics; `--json` for machines."""

    def bench(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, "-m", "cluster", "bench", "echo", "--duration", "1", "--warmup", "0.3", *args],
            env=stack.env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    for door in ([], ["--http", stack.edge_url], ["--grpc", stack.grpc_address]):
        rows = json.loads(bench("--concurrency", "1,4", "--json", *door).stdout)
        assert [row["level"] for row in rows] == ["concurrency 1", "concurrency 4"], rows
        for row in rows:
            assert row["requests"] > 0 and row["errors"] == 0 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
            assert row["queue_ms"] is not None and row["compute_ms"] is not None and row["compute_ms"] > 0, row
    text = bench("--rate", "40").stdout
    assert re.search(r"rate 40/s: [\d.]+ req/s, p50 .* ms, queue [\d.]+ ms, compute [\d.]+ ms, 0 errors", text), text
    refused = subprocess.run(
        [sys.executable, "-m", "cluster", "bench", "echo", "--concurrency", "0,x"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "positive numbers" in refused.stderr, refused.stderr


def test_a_pt2_with_a_payload_is_refused_at_every_door(stack, tmp_path):
    """Issue 18 point 1: a real exported program whose weight is a pickle with a payload (and one whose shape
    expression holds Python for sympy to eval), handed to the cluster through every door a publisher has: the REST
    and gRPC repository load routes, `cluster deploy` over the bus and with --share, and a file put on the share by
    hand and deployed. Each is refused with a message saying why, nothing is left on the share, and the payload never
    runs, in any process."""
    from tests import pt2_payloads

    marker = tmp_path / "payload-ran"
    good = pt2_payloads.exported_program(tmp_path / "good.pt2")
    evil = pt2_payloads.pickled_weight(good, tmp_path / "evil.pt2", marker)
    says = "is stored as a pickle, which would run code when loaded"
    config = json.dumps(pt2_payloads.CONFIG)

    http = triton_http.InferenceServerClient(stack.edge_url.split("://", 1)[1])
    with pytest.raises(InferenceServerException, match=says):
        http.load_model("evil-rest", config=config, files={"file:1/model.pt2": evil.read_bytes()})
    grpc = triton_grpc.InferenceServerClient(stack.grpc_address)
    with pytest.raises(InferenceServerException, match=says):
        grpc.load_model("evil-grpc", config=config, files={"file:1/model.pt2": evil.read_bytes()})

    (tmp_path / "config.json").write_text(config)
    env = stack.env()
    share = env.pop("CLUSTER_SHARE")
    for name, extra, run_env in (("evil-bus", [], env), ("evil-share", ["--share", share], env)):
        out = subprocess.run(
            [sys.executable, "-m", "cluster", "deploy", str(evil), "--name", name, "--config", "config.json", *extra],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert out.returncode == 2 and says in out.stderr, (name, out.stdout, out.stderr)
    for name in ("evil-rest", "evil-grpc", "evil-bus", "evil-share"):
        assert not ModelRepository(stack.share).versions(name), f"{name} was published"

    # On the share by hand, with a manifest that matches: the agents check the bytes they load themselves.
    sympy_evil = pt2_payloads.rewritten_program(good, tmp_path / "sympy.pt2", pt2_payloads.sympy_python(marker))
    manager = ManagerClient(stack.addresses.manager_queries)
    for name, bad, why in (("dropped", evil, says), ("dropped-sympy", sympy_evil, "symbolic shape expression")):
        pt2_payloads.drop_on_share(stack.share, name, 1, bad, pt2_payloads.CONFIG)
        report = manager.call("deploy", timeout=90, name=name, version=1, rollout_timeout=60)
        assert not report["ok"] and len(report["agents"]) == 2, report
        assert all(why in reason for reason in report["agents"].values()), report
    assert not marker.exists(), f"the payload ran: {marker.read_text()}"
