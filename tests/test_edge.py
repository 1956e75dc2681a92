"""The HTTP edge, end to end: real manager, broker and agents (LocalCluster) and the edge as its own uvicorn process.

- edge/oip.py on its own: every datatype the bus carries, from JSON and from binary, and every refusal;
- tritonclient.http, unmodified, against the edge, with and without binary data, giving what the bus Client gives;
- the Open Inference Protocol JSON by hand (httpx): nested and flat data, id echo, outputs filter;
- every error status with its {"error"} body: 400, 404, 413, 415, 429, 503, 504;
- /metrics, /agents, /models and the OpenAPI document;
- hypothesis fuzzing of the infer endpoint: never a 500, and the edge still answers afterwards.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.protocol import DATATYPES
from edge import oip
from edge.oip import InvalidRequest, parse_infer_request, tensor_from_binary, tensor_from_json
from tests.harness import LocalCluster, start_edge, wait_for
from tests.models import publish_slow, slow_rounds_per_second

SMALL_LIMIT = 1024 * 1024  # the edge under test refuses bodies over 1 MiB
ALL_DATATYPES = list(DATATYPES)


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
    from sklearn.datasets import load_digits

    return load_digits().images[:16].astype(np.float32)


def echo_body(values, shape=None, datatype="FP32", **extra) -> dict:
    shape = shape if shape is not None else list(np.shape(values))
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": values}], **extra}


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:500]}"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    for word in words:
        assert word.lower() in body["error"].lower(), f"{word!r} not in {body['error']!r}"
    return body["error"]


# ---------------------------------------------------------------------------------------------------------------
# edge/oip.py on its own
# ---------------------------------------------------------------------------------------------------------------

JSON_SAMPLES = {
    "BOOL": [[True, False], [False, True]],
    "UINT8": [[0, 255], [1, 2]],
    "UINT16": [[0, 65535], [3, 4]],
    "UINT32": [[0, 2**32 - 1], [5, 6]],
    "UINT64": [[0, 2**64 - 1], [7, 8]],
    "INT8": [[-128, 127], [0, -1]],
    "INT16": [[-(2**15), 2**15 - 1], [0, -1]],
    "INT32": [[-(2**31), 2**31 - 1], [0, -1]],
    "INT64": [[-(2**63), 2**63 - 1], [0, -1]],
    "FP16": [[0.5, -2.0], [65504.0, 1]],
    "FP32": [[0.1, -2.5], [3.4e38, 7]],
    "FP64": [[0.1, -2.5], [1.7e308, 7]],
}
OUT_OF_RANGE = {
    "UINT8": 256, "UINT16": -1, "UINT32": 2**32, "UINT64": 2**64, "INT8": -129, "INT16": 2**15,
    "INT32": -(2**31) - 1, "INT64": 2**63, "FP16": 70000.0, "FP32": 1e39, "FP64": 10**400,
}
WRONG_JSON_TYPE = {"BOOL": 1, "UINT8": 1.5, "INT32": True, "INT64": "3", "FP32": True, "FP64": None, "FP16": "x"}


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_oip_every_datatype_from_json_nested_and_flat(datatype):
    nested = JSON_SAMPLES[datatype]
    expected = np.array(nested, dtype=DATATYPES[datatype])
    for data in (nested, [v for row in nested for v in row]):
        array = tensor_from_json("t", datatype, [2, 2], data)
        assert array.dtype == DATATYPES[datatype] and array.shape == (2, 2)
        np.testing.assert_array_equal(array, expected)
    # and back: JSON of an output gives the same numbers
    assert np.array(oip.tensor_to_json(expected), dtype=expected.dtype).reshape(2, 2).tolist() == expected.tolist()


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_oip_every_datatype_from_binary(datatype):
    expected = np.array(JSON_SAMPLES[datatype], dtype=DATATYPES[datatype])
    raw = expected.astype(expected.dtype.newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(tensor_from_binary("t", datatype, [2, 2], raw), expected)
    assert oip.tensor_to_binary(expected) == raw
    with pytest.raises(InvalidRequest, match="input 't'.*needs"):
        tensor_from_binary("t", datatype, [2, 2], raw[:-1])


@pytest.mark.parametrize("datatype", sorted(OUT_OF_RANGE))
def test_oip_rejects_out_of_range(datatype):
    with pytest.raises(InvalidRequest, match=f"input 'v'.*out of range for {datatype}"):
        tensor_from_json("v", datatype, [2], [1, OUT_OF_RANGE[datatype]])


@pytest.mark.parametrize("datatype", sorted(WRONG_JSON_TYPE))
def test_oip_rejects_wrong_json_types(datatype):
    with pytest.raises(InvalidRequest, match=f"input 'w'.*{datatype} data must be"):
        tensor_from_json("w", datatype, [2], [WRONG_JSON_TYPE[datatype]] * 2)


@pytest.mark.parametrize(
    "datatype, shape, data, words",
    [
        ("FP32", [2, 3], [1, 2, 3, 4, 5], "needs 6 elements, 'data' has 5"),
        ("FP32", [2, 2], [[1, 2], [3]], "ragged"),
        ("FP32", [3], [1, [2], 3], "data must be numbers"),
        ("FP32", [2], [[1], 2], "mixes arrays and scalars"),
        ("FP32", [2], 7, "must be an array"),
        ("FP32", [-1, 2], [1, 2], "negative"),
        ("FP32", [2.0], [1, 2], "integers only"),
        ("FP32", "2", [1, 2], "array of integers"),
        ("FP32", [1] * 17, [1], "dimensions"),
        ("BYTES", [1], ["a"], "not supported"),
        ("fp32", [1], [1], "unknown datatype"),
        (32, [1], [1], "must be a string"),
        ("BOOL", [2], [True, 2], "true/false"),
    ],
)
def test_oip_rejects_malformed_tensors(datatype, shape, data, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        tensor_from_json("bad", datatype, shape, data)


def test_oip_binary_bool_must_be_0_or_1():
    with pytest.raises(InvalidRequest, match="0 or 1"):
        tensor_from_binary("b", "BOOL", [2], b"\x00\x02")


def test_oip_request_with_binary_inputs_and_outputs():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, -2], dtype=np.int64)
    header = json.dumps({
        "id": "7",
        "parameters": {"binary_data_output": True, "timeout": 1_500_000, "priority": 1, "anything": "goes"},
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
            {"name": "j", "shape": [1], "datatype": "INT8", "data": [5]},
            {"name": "b", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": b.nbytes}},
        ],
        "outputs": [{"name": "o1"}, {"name": "o2", "parameters": {"binary_data": False}}],
    }).encode()
    request = parse_infer_request(header + a.tobytes() + b.tobytes(), str(len(header)))
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    assert request.inputs["j"].tolist() == [5] and request.inputs["j"].dtype == np.int8
    assert request.id == "7" and request.timeout == 1.5 and request.outputs == ["o1", "o2"]
    assert request.wants_binary("o1") and not request.wants_binary("o2")

    outputs = {"o1": np.array([[1.5, 2.5]], dtype=np.float16), "o2": np.array([True, False])}
    body, headers = oip.encode_infer_response("m", 3, outputs, request)
    length = int(headers[oip.HEADER_LENGTH])
    head = json.loads(body[:length])
    assert head["model_name"] == "m" and head["model_version"] == "3" and head["id"] == "7"
    o1, o2 = head["outputs"]
    assert o1 == {"name": "o1", "datatype": "FP16", "shape": [1, 2], "parameters": {"binary_data_size": 4}}
    assert o2 == {"name": "o2", "datatype": "BOOL", "shape": [2], "data": [True, False]}
    assert np.frombuffer(body[length:], dtype=np.float16).tolist() == [1.5, 2.5]

    # without binary outputs the response is plain JSON
    body, headers = oip.encode_infer_response("m", 3, outputs, parse_infer_request(b'{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1]}]}'))
    assert oip.HEADER_LENGTH not in headers and json.loads(body)["outputs"][0]["data"] == [1.5, 2.5]


@pytest.mark.parametrize(
    "body, header, words",
    [
        (b"{", None, "invalid JSON"),
        (b"\xff\xfe\x00", None, "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "invalid JSON"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', None, "NaN"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e999]}]}', None, "out of range"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "'data' is missing"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}', None, "'shape' is missing"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "twice"),
        (b'{"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "'id' must be a string"),
        (b'{"parameters": [], "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "'parameters' must be an object"),
        (b'{"parameters": {"timeout": -1}, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "timeout"),
        (b'{"parameters": {"binary_data_output": "yes"}, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "true or false"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}', None, "classification"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{}]}', None, "outputs[0]"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}', None, "no Inference-Header-Content-Length"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}abc', "json", "runs past the end"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}abcde', "json", "bytes after"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}abcd', "json", "needs 8 bytes"),
        (b"{}", "-1", "non-negative integer"),
        (b"{}", "3", "the body has only 2 bytes"),
    ],
)
def test_oip_rejects_malformed_requests(body, header, words):
    if header == "json":  # the length of the JSON part, binary data after it
        header = str(body.index(b"}]}") + 3)
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        parse_infer_request(body, header)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False), st.text(max_size=5)
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"inputs": st.lists(st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]), json_values), max_size=3)},
            optional={"outputs": json_values, "parameters": json_values, "id": json_values},
        ).map(lambda v: json.dumps(v).encode()),
    ),
    header=st.one_of(st.none(), st.integers(-5, 400).map(str), st.text(max_size=6)),
)
def test_oip_parser_fuzz_only_ever_raises_invalid_request(body, header):
    try:
        request = parse_infer_request(body, header)
    except InvalidRequest:
        return
    assert request.inputs and all(isinstance(a, np.ndarray) for a in request.inputs.values())


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
        result = client.infer("digits", [image], outputs=outputs, request_id="req-1", model_version="1" if binary_in else "")
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
            result = client.infer("digits", [image], request_compression_algorithm=algorithm, timeout=10_000_000, priority=1)
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
    response = http.post("/v2/models/digits/infer", json={
        "id": "d", "parameters": {"custom": "ignored", "priority": 2},
        "inputs": [{"name": "image", "shape": list(digits_images.shape), "datatype": "FP32", "data": digits_images.tolist()}],
    })
    assert response.status_code == 200, response.text
    probs = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(16, 10)
    assert np.allclose(probs, expected, atol=1e-6)


def test_infer_binary_by_hand(http):
    values = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    header = json.dumps({
        "inputs": [{"name": "x", "shape": [2, 5], "datatype": "FP32", "parameters": {"binary_data_size": values.nbytes}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()
    response = http.post("/v2/models/echo/infer", content=header + values.tobytes(), headers={oip.HEADER_LENGTH: str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers[oip.HEADER_LENGTH])
    head = json.loads(response.content[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": values.nbytes}
    np.testing.assert_array_equal(np.frombuffer(response.content[length:], dtype=np.float32).reshape(2, 5), values)


def test_bad_input_is_400_naming_the_input(http):
    assert_error(http.post("/v2/models/echo/infer", content=b'{"inputs": [', headers={"content-type": "application/json"}), 400, "invalid JSON")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([1, 2, 3], shape=[2, 2])), 400, "'x'", "4 elements")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1, 2]], datatype="INT32")), 400, "'x'", "datatype", "INT32")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1, 2]], datatype="STRING")), 400, "'x'", "unknown datatype")
    wrong_name = {"inputs": [{"name": "z", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert_error(http.post("/v2/models/echo/infer", json=wrong_name), 400, "'z'")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1, 2, 3]], shape=[3])), 400, "'x'", "dimensions")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1, "2"]])), 400, "'x'", "string")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1, 2]], outputs=[{"name": "nope"}])), 400, "nope")
    assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1, 2]]), headers={"content-encoding": "br"}), 415, "br")
    assert_error(http.post("/v2/models/echo/infer", content=b"garbage", headers={"content-encoding": "gzip"}), 400, "gzip")


def test_unknown_model_or_version_is_404(http):
    assert_error(http.post("/v2/models/no-such-model/infer", json=echo_body([[1.0]])), 404, "no-such-model")
    assert_error(http.post("/v2/models/echo/versions/9/infer", json=echo_body([[1.0]])), 404, "version 9")
    assert_error(http.post("/v2/models/echo/versions/latest/infer", json=echo_body([[1.0]])), 404, "latest")
    assert_error(http.get("/v2/models/no-such-model"), 404, "no-such-model")
    assert_error(http.get("/v2/models/echo/versions/9"), 404)
    assert_error(http.get("/v2/models/no-such-model/ready"), 404)
    assert_error(http.get("/no/such/route"), 404)
    assert_error(http.get("/v2/models/echo/infer"), 405)


def test_body_over_the_limit_is_413(http):
    big = json.dumps(echo_body([[0.5] * 1000] * 300)).encode()  # about 1.2 MB of JSON
    assert len(big) > SMALL_LIMIT
    assert_error(http.post("/v2/models/echo/infer", content=big, headers={"content-type": "application/json"}), 413, "limit")

    def chunks():  # no Content-Length: the edge counts while it reads
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    assert_error(http.post("/v2/models/echo/infer", content=chunks()), 413, "limit")
    bomb = gzip.compress(b" " * (SMALL_LIMIT + 10))  # small on the wire, over the limit once inflated
    assert_error(http.post("/v2/models/echo/infer", content=bomb, headers={"content-encoding": "gzip"}), 413, "limit")
    # just under the limit still works
    ok = echo_body([[0.5] * 1000] * 150)
    assert http.post("/v2/models/echo/infer", json=ok).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Cluster views, metrics, OpenAPI
# ---------------------------------------------------------------------------------------------------------------


def test_agents_models_and_health(http, stack):
    cluster, _ = stack
    agents = http.get("/agents").json()
    assert len(agents) == 2
    for agent in agents:
        assert agent["id"].startswith("agent-") and agent["host"] and agent["capacity"] >= 1
        assert {m["name"] for m in agent["models"]} == {"digits", "echo"}
        assert agent["heartbeat_age"] < 5 and "in_flight" in agent
    models = http.get("/models").json()
    assert set(models) == {"digits", "echo"}
    assert models["digits"]["versions"] == [1] and sorted(models["digits"]["agents"]) == sorted(a["id"] for a in agents)
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2/models/echo/ready").json() == {"name": "echo", "ready": True}
    assert http.get("/v2/models/echo/versions/1/ready").status_code == 200


def _counter(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests(http):
    before = http.get("/metrics").text
    for _ in range(3):
        assert http.post("/v2/models/echo/infer", json=echo_body([[1.0, 2.0]])).status_code == 200
    assert http.post("/v2/models/echo/infer", json=echo_body([[1.0]], datatype="INT32")).status_code == 400
    assert http.post("/v2/models/no-such-model/infer", json=echo_body([[1.0]])).status_code == 404
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text
    assert _counter(after, "edge_requests_total", model="echo", outcome="success") == _counter(before, "edge_requests_total", model="echo", outcome="success") + 3
    assert _counter(after, "edge_requests_total", model="echo", outcome="bad_request") == _counter(before, "edge_requests_total", model="echo", outcome="bad_request") + 1
    assert _counter(after, "edge_requests_total", model="_other", outcome="not_found") >= 1
    assert _counter(after, "edge_request_seconds_count", model="echo") >= 4
    assert "edge_agents_alive 2.0" in after and "edge_broker_up 1.0" in after
    assert _counter(after, "edge_batch_size_count", model="echo") == _counter(before, "edge_batch_size_count", model="echo") + 3
    assert _counter(after, "edge_queue_wait_seconds_count", model="echo") >= 3


def test_openapi_lists_every_route(http):
    doc = http.get("/openapi.json").json()
    expected = {
        "/v2/health/live": "get", "/v2/health/ready": "get", "/v2": "get",
        "/v2/models/{name}": "get", "/v2/models/{name}/versions/{version}": "get",
        "/v2/models/{name}/ready": "get", "/v2/models/{name}/versions/{version}/ready": "get",
        "/v2/models/{name}/infer": "post", "/v2/models/{name}/versions/{version}/infer": "post",
        "/agents": "get", "/models": "get", "/metrics": "get", "/": "get",
    }
    for path, method in expected.items():
        assert method in doc["paths"].get(path, {}), f"{method.upper()} {path} missing from the OpenAPI document"
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schemas = doc["components"]["schemas"]
    request = schemas[ref.rsplit("/", 1)[1]]
    assert {"inputs", "outputs", "id", "parameters"} <= set(request["properties"])
    for target in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)):
        assert target in schemas, f"dangling $ref {target}"
    assert {"400", "404", "413", "429", "503"} <= set(infer["responses"])
    assert http.get("/docs").status_code == 200


def test_page_is_served(http):
    response = http.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'id="digit-canvas"' in response.text


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing the infer endpoint
# ---------------------------------------------------------------------------------------------------------------

datatypes = st.sampled_from(ALL_DATATYPES + ["BYTES", "BF16", "fp32", "", "FP32 "])
numbers = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(), st.text(max_size=3)
)
shapes = st.lists(st.one_of(st.integers(0, 4), st.integers(-3, 2**41), st.just(1.5), st.just("2")), max_size=4)


@st.composite
def infer_inputs(draw):
    """A mostly plausible input: sometimes exactly right for echo, sometimes off in one way."""
    if draw(st.booleans()):
        rows, cols = draw(st.integers(0, 4)), draw(st.integers(0, 4))
        shape = [rows, cols]
        values = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=rows * cols, max_size=rows * cols))
        data = [values[r * cols : (r + 1) * cols] for r in range(rows)] if draw(st.booleans()) else values
        entry = {"name": draw(st.sampled_from(["x", "x", "image", "y"])), "shape": shape, "datatype": draw(st.sampled_from(["FP32", "FP32", "FP64", "INT32"])), "data": data}
    else:
        entry = {
            "name": draw(st.one_of(st.sampled_from(["x", "image"]), st.text(max_size=4), st.integers())),
            "shape": draw(shapes),
            "datatype": draw(datatypes),
            "data": draw(st.recursive(st.lists(numbers, max_size=6), lambda inner: st.lists(inner, max_size=3), max_leaves=20)),
        }
    if draw(st.integers(0, 5)) == 0:
        entry["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_size", "x"]), numbers, max_size=2))
    if draw(st.integers(0, 8)) == 0:
        del entry[draw(st.sampled_from(sorted(entry)))]
    return entry


@st.composite
def valid_echo_calls(draw):
    """A request echo must answer 200: JSON or binary input, any mix of binary outputs, id, outputs filter."""
    rows, cols = draw(st.integers(0, 4)), draw(st.integers(1, 4))
    values = np.array(draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=rows * cols, max_size=rows * cols)), dtype=np.float32).reshape(rows, cols)
    request: dict = {}
    if draw(st.booleans()):
        request["id"] = draw(st.text(max_size=8))
    if draw(st.booleans()):
        request["outputs"] = [{"name": "y", "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.booleans()):
        request["parameters"] = {"binary_data_output": draw(st.booleans()), "priority": draw(st.integers(0, 3)), "timeout": 10_000_000}
    headers = {}
    if draw(st.booleans()):
        request["inputs"] = [{"name": "x", "shape": [rows, cols], "datatype": "FP32", "parameters": {"binary_data_size": values.nbytes}}]
        head = json.dumps(request).encode()
        body = head + values.tobytes()
        headers[oip.HEADER_LENGTH] = str(len(head))
    else:
        data = values.tolist() if draw(st.booleans()) else values.ravel().tolist()
        request["inputs"] = [{"name": "x", "shape": [rows, cols], "datatype": "FP32", "data": data}]
        body = json.dumps(request).encode()
    if draw(st.integers(0, 4)) == 0:
        headers["content-encoding"] = "gzip"
        body = gzip.compress(body)
    return "echo", draw(st.sampled_from([None, "1"])), body, headers


@st.composite
def random_calls(draw):
    """Anything from plausible-but-wrong OIP to random bytes, with the binary extension's header right or wrong."""
    model = draw(st.sampled_from(["echo", "echo", "echo", "digits", "nope"]))
    version = draw(st.sampled_from([None, None, None, "1", "2", "x1", "0"]))
    headers = {}
    kind = draw(st.integers(0, 9))
    if kind == 0:
        body = draw(st.binary(max_size=200))
    elif kind == 1:
        body = json.dumps(draw(st.recursive(numbers, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=15))).encode()
    else:
        request = {"inputs": draw(st.lists(infer_inputs(), min_size=1, max_size=2))}
        if draw(st.booleans()):
            request["id"] = draw(st.one_of(st.text(max_size=8), st.integers()))
        if draw(st.integers(0, 3)) == 0:
            request["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "probs", "z"])}, optional={"parameters": st.dictionaries(st.sampled_from(["binary_data", "classification"]), numbers, max_size=2)}), max_size=2))
        if draw(st.integers(0, 3)) == 0:
            request["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_output", "timeout", "priority", "k"]), numbers, max_size=3))
        body = json.dumps(request).encode()
    if draw(st.integers(0, 3)) == 0:  # the binary extension, right or wrong
        tail = draw(st.binary(max_size=64))
        headers[oip.HEADER_LENGTH] = draw(st.one_of(st.just(str(len(body))), st.integers(-2, len(body) + 70).map(str), st.text(max_size=5)))
        body += tail
    if draw(st.integers(0, 9)) == 0:
        headers["content-encoding"] = draw(st.sampled_from(["gzip", "deflate", "identity", "br", "x"]))
        if headers["content-encoding"] == "gzip" and draw(st.booleans()):
            body = gzip.compress(body)
    return model, version, body, headers


infer_calls = st.one_of(valid_echo_calls(), random_calls(), random_calls())


def _header_safe(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if v.isprintable() and v.isascii() and v == v.strip()}


def test_fuzz_infer_never_500(http):
    seen = {}
    started = time.monotonic()

    @settings(max_examples=800, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(call=infer_calls)
    def one(call):
        model, version, body, headers = call
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        response = http.post(path, content=body, headers=_header_safe(headers))
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        # 504 only for a request that set a deadline of a few microseconds (parameters.timeout)
        assert response.status_code in (200, 400, 404, 413, 415, 504), f"{response.status_code} {response.text[:300]} for {body[:300]!r} {headers}"
        if response.status_code != 200:
            assert isinstance(response.json().get("error"), str)
        elif oip.HEADER_LENGTH in response.headers:
            json.loads(response.content[: int(response.headers[oip.HEADER_LENGTH])])
        else:
            assert response.json()["model_name"] == model

    one()
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 10, seen  # both sides were exercised
    print(f"fuzz: {sum(seen.values())} requests in {time.monotonic() - started:.1f} s, statuses {seen}")
    # the edge still answers
    assert http.get("/v2/health/ready").status_code == 200
    assert http.post("/v2/models/echo/infer", json=echo_body([[1.0, 2.0]])).json()["outputs"][0]["data"] == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------------------------
# Statuses that need the cluster in a particular state: 429, 503, 504
# ---------------------------------------------------------------------------------------------------------------


def publish_slow_model(share: Path, tmp_path: Path) -> None:
    """A model that takes a while (a loop of matmuls) and does not batch, so an agent's capacity stays as set."""
    import torch

    from cluster.repository import publish_version

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.eye(192) * 0.5, requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.w
            for _ in range(60):
                m = torch.tanh(m @ self.w + 0.1)
            return x + m.sum() * 0

    path = tmp_path / "slow.pt"
    torch.jit.save(torch.jit.script(Slow().eval()), str(path))
    config = {
        "name": "slow", "platform": "torchscript", "max_batch_size": 0, "max_queue_delay_us": 0, "instances": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
    }
    publish_version(share, "slow", path, config)


def test_overloaded_is_429(tmp_path):
    """A broker that queues nothing (CLUSTER_BROKER_QUEUE_LIMIT=0), one agent taking one request at a time of a
    model that takes tens of milliseconds: of 16 requests sent at once, the ones that find it busy get 429.
    The share holds only that model, so the agent serves it without a deployment step."""
    share = tmp_path / "slow-share"
    publish_slow_model(share, tmp_path)
    cluster = LocalCluster(share, tmp_path / "logs")
    edge = None
    try:
        cluster.start_manager()
        cluster.start_broker(CLUSTER_BROKER_QUEUE_LIMIT=0)
        cluster.start_agent("agent-solo", CLUSTER_CAPACITY=1)
        cluster.wait_for_agents(1, model="slow")
        edge = start_edge(cluster.addresses.broker_clients, tmp_path)
        with httpx.Client(base_url=edge.url, timeout=30, limits=httpx.Limits(max_connections=16)) as http, ThreadPoolExecutor(16) as pool:

            def post(_):
                return http.post("/v2/models/slow/infer", json=echo_body([[1.0, 2.0]]))

            def some_overloaded():
                responses = list(pool.map(post, range(16)))
                assert {r.status_code for r in responses} <= {200, 429}, [(r.status_code, r.text[:200]) for r in responses]
                return [r for r in responses if r.status_code == 429]

            overloaded = wait_for(some_overloaded, 30, "a 429 from a full broker")
            assert_error(overloaded[0], 429, "try again")
            assert overloaded[0].headers["retry-after"] == "1"
            assert _counter(http.get("/metrics").text, "edge_requests_total", model="slow", outcome="overloaded") >= 1
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        if edge is not None:
            edge.stop()
        cluster.stop_all()


def test_no_live_agent_is_503_and_no_broker_is_503(cluster, tmp_path):
    cluster.start_manager()
    broker = cluster.start_broker()
    agent = cluster.start_agent("agent-only")
    cluster.wait_for_agents(1)
    edge = start_edge(cluster.addresses.broker_clients, tmp_path)
    try:
        with httpx.Client(base_url=edge.url, timeout=30) as http:
            assert http.post("/v2/models/echo/infer", json=echo_body([[1.0]])).status_code == 200
            cluster.stop(agent)
            wait_for(lambda: http.get("/agents").json() == [], 15, "the agent to leave")
            assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1.0]])), 503, "no live agent")
            ready = http.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False and "agent" in ready.json()["error"]
            model = http.get("/v2/models/echo/ready")
            assert model.status_code == 503 and model.json() == {"name": "echo", "ready": False}
            assert http.get("/v2/models/echo").status_code == 200  # metadata is still known
            metrics = http.get("/metrics").text
            assert _counter(metrics, "edge_requests_total", model="echo", outcome="unavailable") == 1

            cluster.stop(broker)
            started = time.monotonic()
            assert_error(http.get("/agents"), 503, "broker")
            assert_error(http.get("/v2/models/echo"), 503, "broker")
            assert http.get("/v2/health/ready").status_code == 503
            assert http.get("/v2/health/live").status_code == 200  # the edge itself is fine
            assert "edge_broker_up 0.0" in http.get("/metrics").text
            # With the broker connection down, inference fails at once with 503 (not after its deadline).
            before = time.monotonic()
            assert_error(http.post("/v2/models/echo/infer", json=echo_body([[1.0]])), 503, "not reachable")
            assert time.monotonic() - before < 1.0
            assert time.monotonic() - started < 20
    finally:
        edge.stop()


def test_no_answer_within_the_deadline_is_504(cluster, tmp_path):
    publish_slow(cluster.share)
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("slow-agent", "--models", "slow")
    cluster.wait_for_agents(1, model="slow")
    edge = start_edge(cluster.addresses.broker_clients, tmp_path)
    rounds = int(slow_rounds_per_second() * 3)
    body = {
        "inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
            {"name": "n", "shape": [1], "datatype": "INT64", "data": [rounds]},
        ],
        "parameters": {"timeout": 300_000},  # microseconds, as Triton's
    }
    try:
        with httpx.Client(base_url=edge.url, timeout=30) as http:
            started = time.monotonic()
            assert_error(http.post("/v2/models/slow/infer", json=body), 504, "slow")
            assert time.monotonic() - started < 2.5
    finally:
        edge.stop()
