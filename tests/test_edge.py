"""The HTTP edge end to end: real manager, broker and agents (LocalCluster) and the edge as its own process
(`python -m edge`, the same command as `cluster edge`).

What only the real thing shows: tritonclient.http, unmodified, giving what the bus Client gives (JSON and binary, gzip
and deflate); the OIP JSON and binary bodies through the real agents; the cluster's own errors (404, 400 from the agent)
reaching HTTP; the live views; and, with the cluster in a particular state, 503 when the agent or the broker goes away
and 504 at a request's deadline. Everything the edge decides by itself is tested in-process in tests/test_edge_app.py.
"""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import pytest

from edge.app import DEFAULT_QUERY_TIMEOUT
from tests.edge_http import assert_binary_echo, assert_error, binary_echo_body, counter, echo_body
from tests.harness import LocalCluster, start_edge, wait_for
from tests.models import publish_slow, slow_rounds_per_second

pytestmark = pytest.mark.cluster

SMALL_LIMIT = 1024 * 1024  # the edge under test refuses bodies over 1 MiB (an option passed through `python -m edge`)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one cluster (manager, broker, 2 agents) and one edge for the module; destructive tests use their own
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(demo_share, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("edge-stack")
    share = workdir / "share"
    shutil.copytree(demo_share, share)  # the manager writes deployments.json into its share
    cluster = LocalCluster(share, workdir / "logs")
    edge = None
    try:
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(2)
        cluster.wait_for_agents(2, model="digits")
        edge = start_edge(cluster.addresses.broker_clients, workdir, "--max-body-bytes", str(SMALL_LIMIT))
        yield cluster, edge
    except BaseException:
        print(cluster.logs())
        if edge is not None:
            print(edge.log())
        raise
    finally:
        if edge is not None:
            edge.stop()
        cluster.stop_all()


@pytest.fixture(scope="module")
def http(stack):
    _, edge = stack
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def digits_images() -> np.ndarray:
    from cluster.demo_models import digits_split

    return digits_split()[2][:16]  # 16 held-out images, float32 [16, 8, 8]


# ---------------------------------------------------------------------------------------------------------------
# tritonclient.http, unmodified
# ---------------------------------------------------------------------------------------------------------------


def test_tritonclient_health_and_metadata(stack):
    import tritonclient.http as triton

    _, edge = stack
    client = triton.InferenceServerClient(f"127.0.0.1:{edge.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
        assert not client.is_model_ready("digits", "9") and not client.is_model_ready("no-such-model")
        server = client.get_server_metadata()
        assert "binary_tensor_data" in server["extensions"] and server["name"] and server["version"]
        meta = client.get_model_metadata("digits")
        assert meta["name"] == "digits" and meta["versions"] == ["1"] and meta["platform"]
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}]
        assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]
        assert client.get_model_metadata("echo", "1")["inputs"][0]["name"] == "x"
        with pytest.raises(triton.InferenceServerException) as info:
            client.get_model_metadata("no-such-model")
        assert info.value.status() == "404" and "no-such-model" in info.value.message()
    finally:
        client.close()


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False, None], ids=["binary-out", "json-out", "default-out"])
def test_tritonclient_infer_matches_bus_client(stack, digits_images, binary_in, binary_out):
    import tritonclient.http as triton

    cluster, edge = stack
    expected = cluster.client().infer("digits", {"image": digits_images}).outputs["probs"]
    client = triton.InferenceServerClient(f"127.0.0.1:{edge.port}")
    try:
        image = triton.InferInput("image", list(digits_images.shape), "FP32")
        image.set_data_from_numpy(digits_images, binary_data=binary_in)
        outputs = None if binary_out is None else [triton.InferRequestedOutput("probs", binary_data=binary_out)]
        result = client.infer(
            "digits", [image], outputs=outputs, request_id="req-1", model_version="1" if binary_in else ""
        )
        probs = result.as_numpy("probs")
        assert probs.dtype == np.float32 and probs.shape == (16, 10)
        assert np.allclose(probs, expected, atol=1e-6)
        response = result.get_response()
        assert response["id"] == "req-1" and response["model_name"] == "digits" and response["model_version"] == "1"
        sent_binary = "parameters" in response["outputs"][0]
        assert sent_binary == (binary_out is not False)  # tritonclient asks for binary unless told otherwise
    finally:
        client.close()


def test_tritonclient_compression_timeout_and_errors(stack, digits_images):
    import tritonclient.http as triton

    _, edge = stack
    client = triton.InferenceServerClient(f"127.0.0.1:{edge.port}")
    try:
        image = triton.InferInput("image", list(digits_images.shape), "FP32")
        image.set_data_from_numpy(digits_images)
        plain = client.infer("digits", [image]).as_numpy("probs")
        for algorithm in ("gzip", "deflate"):
            result = client.infer(
                "digits", [image], request_compression_algorithm=algorithm, timeout=10_000_000, priority=1
            )
            np.testing.assert_array_equal(result.as_numpy("probs"), plain)
        for model, version, status in (("no-such-model", "", "404"), ("digits", "9", "404"), ("echo", "", "400")):
            with pytest.raises(triton.InferenceServerException) as info:
                client.infer(model, [image], model_version=version)
            assert info.value.status() == status, info.value.message()
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------------------
# The OIP JSON by hand
# ---------------------------------------------------------------------------------------------------------------


def test_infer_json_nested_flat_id_and_outputs(http, stack, digits_images):
    cluster, _ = stack
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    nested = http.post("/v2/models/echo/infer", json=echo_body(values.tolist(), id="abc", outputs=[{"name": "y"}]))
    assert nested.status_code == 200, nested.text
    assert nested.headers["content-type"].startswith("application/json")
    body = nested.json()
    assert body["id"] == "abc" and body["model_name"] == "echo" and body["model_version"] == "1"
    assert body["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [3, 4], "data": values.ravel().tolist()}]
    flat = http.post("/v2/models/echo/versions/1/infer", json=echo_body(values.ravel().tolist(), shape=[3, 4]))
    assert flat.status_code == 200 and "id" not in flat.json()
    assert flat.json()["outputs"] == body["outputs"]

    # digits by hand gives the bus client's probabilities
    expected = cluster.client().infer("digits", {"image": digits_images}).outputs["probs"]
    response = http.post(
        "/v2/models/digits/infer",
        json={
            "id": "d",
            "parameters": {"custom": "ignored", "priority": 2},
            "inputs": [
                {
                    "name": "image",
                    "shape": list(digits_images.shape),
                    "datatype": "FP32",
                    "data": digits_images.tolist(),
                }
            ],
        },
    )
    assert response.status_code == 200, response.text
    probs = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(16, 10)
    assert np.allclose(probs, expected, atol=1e-6)


def test_infer_binary_by_hand(http):
    values = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    body, headers = binary_echo_body(values)
    assert_binary_echo(http.post("/v2/models/echo/infer", content=body, headers=headers), values)


# ---------------------------------------------------------------------------------------------------------------
# The cluster's own answers through the edge
# ---------------------------------------------------------------------------------------------------------------


def test_cluster_errors_reach_http_with_their_message(http):
    """400s the agent decides (input names, datatypes, outputs) and 404s the broker decides, as {"error"} bodies."""
    assert_error(
        http.post("/v2/models/echo/infer", json=echo_body([[1, 2]], datatype="INT32")), 400, "'x'", "datatype", "INT32"
    )
    wrong_name = {"inputs": [{"name": "z", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert_error(http.post("/v2/models/echo/infer", json=wrong_name), 400, "'z'")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1, 2]], outputs=[{"name": "nope"}])), 400, "nope")
    assert_error(http.post("/v2/models/no-such-model/infer", json=echo_body([[1.0]])), 404, "no-such-model")
    assert_error(http.post("/v2/models/echo/versions/9/infer", json=echo_body([[1.0]])), 404, "version 9")
    assert_error(http.get("/v2/models/no-such-model"), 404, "no-such-model")


def test_agents_models_and_health(http, stack):
    cluster, _ = stack
    expiry = (
        cluster.heartbeat_interval * cluster.liveness
    )  # the broker drops an agent it has not heard from for this long
    agents = http.get("/agents").json()
    assert len(agents) == 2
    for agent in agents:
        assert agent["id"].startswith("agent-") and agent["host"] and agent["capacity"] >= 1
        assert {m["name"] for m in agent["models"]} == {"digits", "echo"}
        assert agent["heartbeat_age"] < 2 * expiry, (
            f"heartbeat_age {agent['heartbeat_age']} s, the cluster's expiry is {expiry} s"
        )
        assert "in_flight" in agent
    models = http.get("/models").json()
    assert set(models) == {"digits", "echo"}
    assert models["digits"]["versions"] == [1] and sorted(models["digits"]["agents"]) == sorted(a["id"] for a in agents)
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2/models/echo/ready").json() == {"name": "echo", "ready": True}
    assert http.get("/v2/models/echo/versions/1/ready").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Statuses that need the cluster in a particular state: 503, 504
# ---------------------------------------------------------------------------------------------------------------

REQUEST_TIMEOUT = 10.0  # the edge's default inference deadline in the 503 test (--request-timeout)


def test_no_live_agent_is_503_and_no_broker_is_503(cluster, tmp_path):
    cluster.start_manager()
    broker = cluster.start_broker()
    agent = cluster.start_agent("agent-only")
    cluster.wait_for_agents(1)
    edge = start_edge(cluster.addresses.broker_clients, tmp_path, "--request-timeout", str(REQUEST_TIMEOUT))
    expiry = cluster.heartbeat_interval * cluster.liveness
    try:
        with httpx.Client(base_url=edge.url, timeout=30) as http:
            assert http.post("/v2/models/echo/infer", json=echo_body([[1.0]])).status_code == 200
            cluster.stop(agent)
            # a stopping agent says goodbye; were that lost, the broker drops it after `expiry` of silence
            wait_for(lambda: http.get("/agents").json() == [], 20 * expiry, "the agent to leave")
            assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1.0]])), 503, "no live agent")
            ready = http.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False and "agent" in ready.json()["error"]
            model = http.get("/v2/models/echo/ready")
            assert model.status_code == 503 and model.json() == {"name": "echo", "ready": False}
            assert http.get("/v2/models/echo").status_code == 200  # metadata is still known
            metrics = http.get("/metrics").text
            assert counter(metrics, "edge_requests_total", model="echo", outcome="unavailable") == 1

            cluster.stop(broker)
            started = time.monotonic()
            assert_error(http.get("/agents"), 503, "broker")
            assert_error(http.get("/v2/models/echo"), 503, "broker")
            assert http.get("/v2/health/ready").status_code == 503
            assert http.get("/v2/health/live").status_code == 200  # the edge itself is fine
            assert "edge_broker_up 0.0" in http.get("/metrics").text
            # Each of those four broker queries gives up after the edge's query timeout at most; twice that in all.
            queries_took, queries_bound = time.monotonic() - started, 2 * 4 * DEFAULT_QUERY_TIMEOUT
            assert queries_took < queries_bound, (
                f"4 queries with the broker down took {queries_took:.2f} s; each should give up within the edge's "
                f"{DEFAULT_QUERY_TIMEOUT} s query timeout"
            )
            # With the broker connection down, inference fails at once with 503, not after its deadline.
            before = time.monotonic()
            assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1.0]])), 503, "not reachable")
            took = time.monotonic() - before
            assert took < REQUEST_TIMEOUT / 4, (
                f"the 503 took {took:.2f} s: it should come at once, not near the {REQUEST_TIMEOUT} s deadline"
            )
    finally:
        edge.stop()


def test_no_answer_within_the_deadline_is_504(cluster, tmp_path):
    publish_slow(cluster.share)
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("slow-agent", "--models", "slow")
    cluster.wait_for_agents(1, model="slow")
    edge = start_edge(cluster.addresses.broker_clients, tmp_path)
    deadline = 0.3  # the request's parameters.timeout
    model_seconds = 10 * deadline  # how long the forward pass takes (on one thread, as the agent runs it)
    body = {
        "inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
            {"name": "n", "shape": [1], "datatype": "INT64", "data": [int(slow_rounds_per_second() * model_seconds)]},
        ],
        "parameters": {"timeout": int(deadline * 1e6)},  # microseconds, as Triton's
    }
    try:
        with httpx.Client(base_url=edge.url, timeout=30) as http:
            started = time.monotonic()
            assert_error(http.post("/v2/models/slow/infer", json=body), 504, "slow")
            took = time.monotonic() - started
            # the broker checks deadlines every min(0.1, heartbeat interval / 2) s; the answer must come at the
            # deadline, long before the forward pass could have ended
            assert deadline <= took < model_seconds, (
                f"the 504 came after {took:.2f} s: expected soon after the {deadline} s deadline, before the "
                f"{model_seconds:.1f} s forward pass ends (heartbeat interval {cluster.heartbeat_interval} s)"
            )
    finally:
        edge.stop()
