"""The HTTP edge in-process: `create_app` with a fake bus client (FakeBus) under Starlette's TestClient, no sockets.

Everything the edge itself decides, fast: the OIP JSON and binary bodies, what reaches the bus (inputs, version,
deadline, outputs), every error status with its {"error"} body (400, 404, 405, 413, 415, 429, 500, 502, 503, 504),
health, the cluster views, /metrics, the OpenAPI document, the page, and a hypothesis fuzz of the infer endpoint
(never a 500). tests/test_edge.py runs the edge as its own process in front of a real cluster.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import protocol
from cluster.client import InferResult
from cluster.codec import decode_tensors, encode_tensors
from cluster.config import Addresses, Timings
from cluster.errors import (
    AuthenticationError,
    BadRequestError,
    ClusterError,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelNotFoundError,
    NoAgentAvailableError,
    OverloadedError,
    PermissionDeniedError,
)
from cluster.model_config import shape_mismatch
from cluster.protocol import DATATYPES, NUMERIC_DATATYPES
from cluster.role_settings import EdgeSettings
from edge import create_app, oip
from tests.edge_http import assert_binary_echo, assert_error, binary_echo_body, counter, echo_body
from tests.harness import fuzz_examples

with warnings.catch_warnings():  # starlette would rather have httpx2; the httpx installed here works the same
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

LIMIT = 64 * 1024  # the app under test refuses bodies over 64 KiB
ALL_DATATYPES = list(NUMERIC_DATATYPES)


# ---------------------------------------------------------------------------------------------------------------
# A fake bus client: what the broker and two agents would answer, without them
# ---------------------------------------------------------------------------------------------------------------

MODELS = {
    "echo": {
        "platform": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
    },
    "digits": {
        "platform": "torchscript",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
    },
}


class FakeBus:
    """Stands in for `cluster.AsyncClient`: the same coroutines, answering as a broker with two live agents serving
    version 1 of `echo` (y = x) and `digits` (ten probabilities per image) would, and raising the cluster's own
    exceptions with the broker's and the agent's messages. Inputs go through the bus codec, as the real client's do.

    Tests steer it: `live = False` (no agent left: NO_AGENT), `broker_down()` (queries time out, inference fails
    at once, as the real client with fail_fast does), `raises[method] = exception` (that call raises it).
    `calls` records every infer call as the edge made it.
    """

    address = "tcp://127.0.0.1:9"  # never connected: nothing here opens a socket

    def __init__(self) -> None:
        self.live = True
        self.raises: dict[str, Exception] = {}
        self.calls: list[dict] = []

    def broker_down(self) -> None:
        for what in ("agents", "models", "model_metadata"):
            self.raises[what] = InferenceTimeoutError(
                "query: no answer from the broker within the deadline (is it running?)"
            )
        self.raises["infer"] = NoAgentAvailableError(f"the broker at {self.address} is not reachable")

    async def statistics(self, name=None, version=None, timeout=None) -> dict:
        """The broker's `statistics` answer: one live agent that counted two echo requests."""
        self._maybe_raise("statistics")
        if name is not None and name not in MODELS:
            raise ModelNotFoundError(f"model '{name}' is not known to the cluster", name)
        entry = {
            "name": "echo",
            "version": "1",
            "last_inference": 5,
            "inference_count": 2,
            "execution_count": 2,
            "inference_stats": {"success": {"count": 2, "ns": 4000}, "queue": {"count": 2, "ns": 1000}},
            "batch_stats": [],
            "failures": {"BACKEND": 1},
        }
        agents = {"agent-a": {"echo": {"1": entry}} if name in (None, "echo") else {}}
        return {"agents": agents, "broker": {"agents": 1, "queue_depth": {"echo": 0}, "redispatched": 0}}

    def _maybe_raise(self, what: str) -> None:
        if what in self.raises:
            raise self.raises[what]

    async def infer(self, model, inputs, *, version=None, timeout=None, outputs=None, request_id=None) -> InferResult:
        self.calls.append(
            {
                "model": model,
                "inputs": dict(inputs),
                "version": version,
                "timeout": timeout,
                "outputs": outputs,
                "request_id": request_id,
            }
        )
        self._maybe_raise("infer")
        try:  # what ClientCore.infer_call and the agent do with the inputs
            metas, frames = encode_tensors(inputs)
            arrays = decode_tensors(protocol.validate_tensor_metas(metas, frames), frames)
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"inputs cannot be sent: {exc}", model) from None
        what = f"model '{model}'" + (f" version {version}" if version is not None else "")
        if model not in MODELS:
            raise ModelNotFoundError(f"{what} is not served by any agent", model)
        if not self.live:
            raise NoAgentAvailableError(f"no live agent serves {what} right now", model)
        if version not in (None, 1):
            raise ModelNotFoundError(f"{what} is not served by any live agent (other versions are)", model)
        if timeout is not None and timeout < 0.001:  # a deadline of a few microseconds passes before any agent answers
            raise InferenceTimeoutError(
                f"model '{model}': no answer within the request's deadline (waiting for a free agent)", model
            )
        self._check_inputs(model, metas)
        known = [o["name"] for o in MODELS[model]["outputs"]]
        unknown = [o for o in outputs or [] if o not in known]
        if unknown:
            raise BadRequestError(f"model '{model}' has no output {unknown[0]!r}; it has {sorted(known)}", model)
        if model == "echo":
            results = {"y": arrays["x"]}
        else:
            results = {"probs": np.full((arrays["image"].shape[0], 10), 0.1, dtype=np.float32)}
        if outputs is not None:
            results = {name: results[name] for name in outputs}
        return InferResult(model, 1, "agent-a", results, len(self.calls), batch_size=1, queue_seconds=0.0)

    @staticmethod
    def _check_inputs(model: str, metas: list[dict]) -> None:
        """The agent's check of a request against the model's config (cluster.repository.ModelConfig.check_inputs)."""
        declared = {spec["name"]: spec for spec in MODELS[model]["inputs"]}
        for meta in metas:
            if meta["name"] not in declared:
                raise BadRequestError(
                    f"unknown input '{meta['name']}': model '{model}' takes {', '.join(map(repr, declared))}", model
                )
        given_names = {meta["name"]: meta for meta in metas}
        for name, spec in declared.items():
            meta = given_names.get(name)
            if meta is None:
                raise BadRequestError(
                    f"missing input '{name}' ({spec['datatype']} {spec['shape']}) for model '{model}'", model
                )
            if meta["datatype"] != spec["datatype"]:
                raise BadRequestError(
                    f"input '{name}': expected datatype {spec['datatype']}, got {meta['datatype']}", model
                )
            problem = shape_mismatch(spec["shape"], meta["shape"])
            if problem:
                raise BadRequestError(f"input '{name}': {problem}", model)

    async def agents(self, timeout=None) -> list[dict]:
        self._maybe_raise("agents")
        if not self.live:
            return []
        models = [{"name": name, "version": 1} for name in MODELS]
        return [  # not sorted: the edge sorts them
            {
                "id": "agent-b",
                "host": "h",
                "pid": 2,
                "device": "cpu",
                "models": models,
                "in_flight": 0,
                "capacity": 4,
                "heartbeat_age": 0.1,
            },
            {
                "id": "agent-a",
                "host": "h",
                "pid": 1,
                "device": "cpu",
                "models": models,
                "in_flight": 1,
                "capacity": 4,
                "heartbeat_age": 0.2,
            },
        ]

    async def models(self, timeout=None) -> dict:
        self._maybe_raise("models")
        return {name: {"versions": [1], "agents": ["agent-a", "agent-b"]} for name in MODELS} if self.live else {}

    async def model_metadata(self, name, version=None, timeout=None) -> dict:
        self._maybe_raise("model_metadata")
        if name not in MODELS or version not in (None, 1):
            what = f"model '{name}'" + (f" version {version}" if version is not None else "")
            raise ModelNotFoundError(f"{what} is not known to the cluster", name)
        served = [1] if self.live else []
        return dict(MODELS[name], name=name, version=1, versions=served, ready=bool(served))


class FakeManager:
    """Stands in for `cluster.manager.client.AsyncManagerClient`: answers `call` as a manager whose share holds
    `echo` (deployed at version 1, served by agent-a) and `spare` (on the share, not deployed) would. `calls` records
    every call with its fields (and the file's size); `fail_rollout` makes the next publish or deploy a failed
    rollout; `raises[what]` makes that call raise."""

    address = "tcp://127.0.0.1:19"  # never connected

    def __init__(self) -> None:
        self.deployments = {
            "echo": {"version": 1, "staged": None, "history": [], "agents": {"agent-a": [1]}, "rolling_out": False},
            "spare": {"version": None, "staged": None, "history": [], "agents": {}, "rolling_out": False},
        }
        self.calls: list[tuple] = []
        self.raises: dict[str, Exception] = {}
        self.fail_rollout = False
        self.rollouts = {"ok": 0, "failed": 0}
        load = {"agents": 1, "in_flight": 2, "queued": 3, "capacity": {"echo": 4}, "queued_by_model": {"echo": 3}}
        self.brokers = [
            {
                "name": "b1",
                "incarnation": "aa",
                "seq": 7,
                "gaps": 0,
                "heard_age": 0.2,
                "agents": ["agent-a"],
                "load": load,
            }
        ]

    async def call(self, what: str, timeout: float = 5.0, data: bytes | None = None, **fields):
        self.calls.append((what, None if data is None else len(data), fields))
        if what in self.raises:
            raise self.raises[what]
        name = fields.get("name")
        if what == "deployments":
            return {n: dict(d) for n, d in self.deployments.items()}
        if what == "rollouts":
            return {**self.rollouts, "in_progress": 0}
        if what == "brokers":
            return [dict(b) for b in self.brokers]
        if what == "undeploy":
            if (self.deployments.get(name) or {}).get("version") is None:
                raise ModelNotFoundError(f"model '{name}' is not deployed", name)
            self.deployments[name].update(version=None, agents={})
            return {"model": name, "undeployed": True}
        if what == "deploy" and name not in self.deployments:
            raise ModelNotFoundError(f"model '{name}' has no version None in the share (none)", name)
        if what in ("deploy", "publish"):
            version = fields.get("version") or 1
            ok = not self.fail_rollout
            self.fail_rollout = False
            self.rollouts["ok" if ok else "failed"] += 1
            if ok:
                self.deployments[name] = {
                    "version": version,
                    "staged": None,
                    "history": [],
                    "agents": {"agent-a": [version]},
                    "rolling_out": False,
                }
            why = "ok" if ok else "cannot load: RuntimeError: bad file"
            return {"model": name, "version": version, "previous": None, "ok": ok, "agents": {"agent-a": why}}
        raise AssertionError(f"the edge asked the manager for {what!r}")


@pytest.fixture
def bus() -> FakeBus:
    return FakeBus()


@pytest.fixture
def http(bus):
    """The edge app on the fake bus, its lifespan run; errors answered as HTTP (not raised into the test)."""
    app = create_app(
        EdgeSettings(max_body_bytes=LIMIT, timings=Timings(request_timeout=7.0)), client=bus, manager=FakeManager()
    )
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as client:
        yield client
    assert app.state.edge.client is None, "the lifespan should let go of the bus client at shutdown"


def infer_json(http, model="echo", body=None, version=None, **kwargs):
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return http.post(path, json=body, **kwargs) if body is not None else http.post(path, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Inference: bodies in and out, and what reaches the bus
# ---------------------------------------------------------------------------------------------------------------


def test_infer_json_nested_flat_id_and_outputs(http, bus):
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    nested = infer_json(http, body=echo_body(values.tolist(), id="abc", outputs=[{"name": "y"}]))
    assert nested.status_code == 200, nested.text
    assert nested.headers["content-type"].startswith("application/json")
    body = nested.json()
    assert body["id"] == "abc" and body["model_name"] == "echo" and body["model_version"] == "1"
    assert body["parameters"] == {"agent": "agent-a"}
    assert body["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [3, 4], "data": values.ravel().tolist()}]
    sent = bus.calls[-1]
    assert sent["outputs"] == ["y"] and sent["version"] is None
    assert sent["inputs"]["x"].dtype == np.float32 and sent["inputs"]["x"].shape == (3, 4)

    flat = infer_json(http, body=echo_body(values.ravel().tolist(), shape=[3, 4]), version="1")
    assert flat.status_code == 200 and "id" not in flat.json()
    assert flat.json()["outputs"] == body["outputs"]
    assert bus.calls[-1]["version"] == 1 and bus.calls[-1]["outputs"] is None


def test_infer_deadline_is_the_requests_or_the_edges_default(http, bus):
    assert (
        infer_json(http, body=echo_body([[1.0]], parameters={"timeout": 1_500_000, "priority": 1})).status_code == 200
    )
    assert bus.calls[-1]["timeout"] == 1.5  # microseconds, as Triton's
    assert infer_json(http, body=echo_body([[1.0]])).status_code == 200
    assert bus.calls[-1]["timeout"] == 7.0  # the settings' request_timeout


def test_infer_every_datatype_through_json_and_binary(http, bus):
    """The edge hands the bus the right numpy dtype for every datatype, from JSON data and from binary data."""
    for datatype in ALL_DATATYPES:
        values = np.array([[1, 0], [0, 1]], dtype=DATATYPES[datatype])
        from_json = {"inputs": [{"name": "t", "shape": [2, 2], "datatype": datatype, "data": values.tolist()}]}
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "t",
                        "shape": [2, 2],
                        "datatype": datatype,
                        "parameters": {"binary_data_size": values.nbytes},
                    }
                ]
            }
        ).encode()
        infer_json(http, body=from_json)  # 400 from the fake agent (echo takes x): the tensor reached the bus first
        infer_json(http, content=head + values.tobytes(), headers={oip.HEADER_LENGTH: str(len(head))})
        for call in bus.calls[-2:]:
            np.testing.assert_array_equal(call["inputs"]["t"], values)
            assert call["inputs"]["t"].dtype == DATATYPES[datatype], datatype


def test_infer_bytes_through_json_and_binary_reach_the_bus_as_bytes(http, bus):
    """BYTES (issue 22): JSON strings (UTF-8) and Triton's length-prefixed binary reach the bus as object arrays of
    bytes; a length past the binary data is a 400 naming the input."""
    from_json = {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["é", ""]}]}
    infer_json(http, body=from_json)  # 400 from the fake agent (echo takes FP32): the tensor reached the bus first
    raw = b"\x02\x00\x00\x00\xc3\xa9\x00\x00\x00\x00"
    entry = {"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [entry]}).encode()
    infer_json(http, content=head + raw, headers={oip.HEADER_LENGTH: str(len(head))})
    for call in bus.calls[-2:]:
        assert call["inputs"]["x"].dtype == object and call["inputs"]["x"].tolist() == ["é".encode(), b""]
    calls = len(bus.calls)
    head = json.dumps({"inputs": [dict(entry, parameters={"binary_data_size": len(raw) - 1})]}).encode()
    response = infer_json(http, content=head + raw[:-1], headers={oip.HEADER_LENGTH: str(len(head))})
    assert response.status_code == 400 and "input 'x': BYTES element 1 of 2" in response.json()["error"], response.text
    assert len(bus.calls) == calls  # refused at the edge


def test_infer_binary_inputs_and_outputs(http):
    values = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    body, headers = binary_echo_body(values)
    assert_binary_echo(infer_json(http, content=body, headers=headers), values)

    # binary in, JSON out (binary_data false); and JSON in, all outputs binary (binary_data_output)
    body, headers = binary_echo_body(values, binary_output=False)
    header = body[: int(headers[oip.HEADER_LENGTH])]
    response = infer_json(http, content=body, headers=headers)
    assert oip.HEADER_LENGTH not in response.headers
    assert np.allclose(response.json()["outputs"][0]["data"], values.ravel())
    response = infer_json(http, body=echo_body(values.tolist(), parameters={"binary_data_output": True}))
    length = int(response.headers[oip.HEADER_LENGTH])
    np.testing.assert_array_equal(np.frombuffer(response.content[length:], dtype=np.float32).reshape(2, 5), values)

    # the binary extension's header, wrong: a 400 that says what is wrong with it
    assert_error(
        infer_json(http, content=header + values.tobytes(), headers={oip.HEADER_LENGTH: "x"}),
        400,
        "non-negative integer",
    )
    assert_error(
        infer_json(http, content=header + values.tobytes()[:-1], headers={oip.HEADER_LENGTH: str(len(header))}),
        400,
        "'x'",
        "runs past the end",
    )


@pytest.mark.parametrize(
    "encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress), ("identity", bytes)]
)
def test_compressed_bodies_are_accepted(http, encoding, compress):
    body = json.dumps(echo_body([[1.0, 2.0]])).encode()
    response = infer_json(http, content=compress(body), headers={"content-encoding": encoding})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------------------------
# Error statuses
# ---------------------------------------------------------------------------------------------------------------


def test_bad_input_is_400_naming_the_input(http):
    assert_error(
        infer_json(http, content=b'{"inputs": [', headers={"content-type": "application/json"}), 400, "invalid JSON"
    )
    assert_error(infer_json(http, body=echo_body([1, 2, 3], shape=[2, 2])), 400, "'x'", "4 elements")
    assert_error(infer_json(http, body=echo_body([[1, 2]], datatype="INT32")), 400, "'x'", "datatype", "INT32")
    assert_error(infer_json(http, body=echo_body([[1, 2]], datatype="STRING")), 400, "'x'", "unknown datatype")
    wrong_name = {"inputs": [{"name": "z", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert_error(infer_json(http, body=wrong_name), 400, "'z'")
    assert_error(infer_json(http, body=echo_body([[1, 2, 3]], shape=[3])), 400, "'x'", "dimensions")
    assert_error(infer_json(http, body=echo_body([[1, "2"]])), 400, "'x'", "string")
    assert_error(infer_json(http, body=echo_body([[1, 2]], outputs=[{"name": "nope"}])), 400, "nope")
    assert_error(infer_json(http, content=b"garbage", headers={"content-encoding": "gzip"}), 400, "gzip")
    two_streams = gzip.compress(b"{}") * 2
    assert_error(
        infer_json(http, content=two_streams, headers={"content-encoding": "gzip"}), 400, "single complete gzip stream"
    )


def test_unsupported_encoding_is_415(http):
    for encoding in ("br", "compress", "gzip, br"):
        assert_error(infer_json(http, body=echo_body([[1, 2]]), headers={"content-encoding": encoding}), 415, encoding)


def test_unknown_model_or_version_is_404(http):
    assert_error(infer_json(http, "no-such-model", echo_body([[1.0]])), 404, "no-such-model")
    assert_error(infer_json(http, "echo", echo_body([[1.0]]), version="9"), 404, "version 9")
    assert_error(infer_json(http, "echo", echo_body([[1.0]]), version="latest"), 404, "latest")
    assert_error(infer_json(http, "echo", echo_body([[1.0]]), version="1" * 19), 404, "no version")
    assert_error(http.get("/v2/models/no-such-model"), 404, "no-such-model")
    assert_error(http.get("/v2/models/echo/versions/9"), 404)
    assert_error(http.get("/v2/models/echo/versions/x1"), 404, "no version 'x1'")
    assert_error(http.get("/v2/models/no-such-model/ready"), 404)
    assert_error(http.get("/no/such/route"), 404)
    assert_error(http.get("/v2/models/echo/infer"), 405)


def test_body_over_the_limit_is_413(http):
    big = json.dumps(echo_body([[0.5] * 100] * 150)).encode()
    assert LIMIT < len(big) < 2 * LIMIT
    assert_error(
        infer_json(http, content=big, headers={"content-type": "application/json"}), 413, "limit", f"{len(big)} bytes"
    )

    def chunks():  # no Content-Length: the edge counts while it reads
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    assert_error(infer_json(http, content=chunks()), 413, "limit")
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        bomb = compress(b" " * (LIMIT + 10))  # small on the wire, over the limit once inflated
        assert len(bomb) < LIMIT // 10
        assert_error(
            infer_json(http, content=bomb, headers={"content-encoding": encoding}), 413, "decompressed", "limit"
        )
    # just under the limit still works, plain and compressed
    ok = json.dumps(echo_body([[0.5] * 100] * 100)).encode()
    assert LIMIT // 2 < len(ok) <= LIMIT
    assert infer_json(http, content=ok).status_code == 200
    assert infer_json(http, content=gzip.compress(ok), headers={"content-encoding": "gzip"}).status_code == 200


ERROR_STATUSES = [  # exception raised by the bus client -> status, metrics outcome, whether the model is confirmed
    (BadRequestError("input 'x': expected datatype FP32, got INT32"), 400, "bad_request", False),
    (ModelNotFoundError("model 'echo' version 3 is not served by any agent"), 404, "not_found", False),
    (OverloadedError("model 'echo': 10000 requests already waiting; try again later"), 429, "overloaded", True),
    (NoAgentAvailableError("no live agent serves model 'echo' right now"), 503, "unavailable", False),
    (
        InferenceTimeoutError("model 'echo': no answer within the request's deadline (on agent agent-a)"),
        504,
        "timeout",
        False,
    ),
    (InferenceFailedError("model 'echo' failed: RuntimeError: boom"), 500, "failed", True),
    (ClusterError("malformed answer from the cluster: bad frame"), 502, "error", False),
    (AuthenticationError("the broker refused this client's key"), 503, "unavailable", False),
    (PermissionDeniedError("a client key may not deploy"), 403, "forbidden", False),
]


@pytest.mark.parametrize(
    "error, status, outcome, confirmed", ERROR_STATUSES, ids=[type(e[0]).__name__ for e in ERROR_STATUSES]
)
def test_cluster_errors_on_infer_map_to_statuses(http, bus, error, status, outcome, confirmed):
    bus.raises["infer"] = error
    message = assert_error(infer_json(http, body=echo_body([[1.0]])), status, str(error))
    response = infer_json(http, body=echo_body([[1.0]]))
    assert response.headers.get("retry-after") == ("1" if status == 429 else None)
    if status == 502:
        assert message == f"the cluster reported an error: {error}"
    metrics = http.get("/metrics").text
    label = "echo" if confirmed else "_other"  # only names the cluster confirmed get their own label
    assert counter(metrics, "edge_requests_total", model=label, outcome=outcome) == 2, metrics


def test_query_errors_map_to_statuses(http, bus):
    """On a query (metadata, health, the views) a timeout means the broker is not answering: 503, not 504."""
    bus.raises["model_metadata"] = InferenceTimeoutError(
        "query: no answer from the broker within the deadline (is it running?)"
    )
    assert_error(
        http.get("/v2/models/echo"), 503, f"the cluster's broker at {bus.address} is not answering", "no answer"
    )
    bus.raises["model_metadata"] = ClusterError("internal")
    assert_error(http.get("/v2/models/echo/ready"), 502, "the cluster reported an error: internal")
    bus.raises["models"] = NoAgentAvailableError(f"the broker at {bus.address} is not reachable")
    assert_error(http.get("/models"), 503, "not reachable")


def test_no_live_agent_is_503_and_no_broker_is_503(http, bus):
    assert infer_json(http, body=echo_body([[1.0]])).status_code == 200
    bus.live = False
    assert http.get("/agents").json() == []
    assert_error(infer_json(http, body=echo_body([[1.0]])), 503, "no live agent")
    ready = http.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.json() == {
        "ready": False,
        "error": "no live agent is connected to the cluster",
    }
    model = http.get("/v2/models/echo/ready")
    assert model.status_code == 503 and model.json() == {"name": "echo", "ready": False}
    meta = http.get("/v2/models/echo")
    assert meta.status_code == 200 and meta.json()["versions"] == ["1"]  # metadata is still known
    metrics = http.get("/metrics").text
    assert counter(metrics, "edge_requests_total", model="echo", outcome="unavailable") == 1
    assert "edge_agents_alive 0.0" in metrics

    bus.broker_down()
    assert_error(http.get("/agents"), 503, "broker")
    assert_error(http.get("/v2/models/echo"), 503, "broker")
    ready = http.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False and "broker" in ready.json()["error"]
    assert http.get("/v2/health/live").status_code == 200  # the edge itself is fine
    assert "edge_broker_up 0.0" in http.get("/metrics").text
    assert_error(infer_json(http, body=echo_body([[1.0]])), 503, "not reachable")


def test_draining_agents_are_not_ready(http, bus):
    async def draining(timeout=None):
        return [{"id": "agent-a", "draining": True}]

    bus.agents = draining
    ready = http.get("/v2/health/ready")
    assert ready.status_code == 503 and "no live agent" in ready.json()["error"]


def test_an_unexpected_error_is_500_without_details(http, bus):
    bus.raises["agents"] = RuntimeError("a bug, with a secret in its message")
    response = http.get("/agents")
    message = assert_error(response, 500, "internal error in the edge", "RuntimeError")
    assert "secret" not in message


# ---------------------------------------------------------------------------------------------------------------
# Health, the cluster views, metrics, OpenAPI, the page
# ---------------------------------------------------------------------------------------------------------------


def test_agents_models_and_health(http):
    agents = http.get("/agents").json()
    assert [a["id"] for a in agents] == ["agent-a", "agent-b"]  # sorted by id
    assert agents[0]["capacity"] == 4 and {m["name"] for m in agents[0]["models"]} == {"digits", "echo"}
    assert http.get("/models").json() == {
        "echo": {"versions": [1], "agents": ["agent-a", "agent-b"]},
        "digits": {"versions": [1], "agents": ["agent-a", "agent-b"]},
    }
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2/models/echo/ready").json() == {"name": "echo", "ready": True}
    assert http.get("/v2/models/echo/versions/1/ready").status_code == 200
    server = http.get("/v2").json()
    assert (
        server["name"] == "torch-serving-cluster"
        and server["version"]
        and server["extensions"] == ["binary_tensor_data", "statistics", "model_repository", "model_configuration"]
    )
    meta = http.get("/v2/models/digits").json()
    assert meta == {
        "name": "digits",
        "versions": ["1"],
        "platform": "torchscript",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert http.get("/v2/models/digits/versions/1").json() == meta


def test_json_has_its_own_lower_limit(bus):
    """A body without the binary extension is all JSON: the JSON limit, and a 413 that says to send binary; the binary
    extension takes bodies up to the body limit, with the JSON limit for its JSON part."""
    app = create_app(EdgeSettings(max_body_bytes=4 * LIMIT, max_json_body=LIMIT), client=bus)
    assert (
        create_app(EdgeSettings(max_body_bytes=LIMIT, max_json_body=4 * LIMIT), client=bus).state.edge.max_json_bytes
        == LIMIT
    )
    values = np.arange(2 * LIMIT // 4, dtype=np.float32).reshape(1, -1)  # 2 x the JSON limit in binary
    as_json = json.dumps(echo_body(values.tolist())).encode()
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as http:
        message = assert_error(
            infer_json(http, content=as_json, headers={"content-type": "application/json"}),
            413,
            f"JSON body of {len(as_json)} bytes",
            "65536 bytes limit for JSON",
            "binary extension (up to 262144 bytes)",
        )
        assert "limit" in message
        zeros = gzip.compress(json.dumps(echo_body(np.zeros_like(values).tolist())).encode())
        assert len(zeros) < LIMIT
        assert_error(
            infer_json(http, content=zeros, headers={"content-encoding": "gzip"}), 413, "decompressed", "limit for JSON"
        )
        body, headers = binary_echo_body(values)
        assert_binary_echo(infer_json(http, content=body, headers=headers), values)
        padded = json.dumps(echo_body([[1.0]], id="x" * LIMIT)).encode()  # a JSON part over the JSON limit
        assert_error(
            infer_json(http, content=padded, headers={oip.HEADER_LENGTH: str(len(padded))}),
            413,
            f"JSON part of {len(padded)} bytes",
            "limit for JSON",
        )


def test_large_json_is_decoded_and_encoded_off_the_event_loop(http, bus, monkeypatch):
    """Bodies and responses over edge.body.OFF_LOOP_BYTES go through the worker thread: same answers, same 400s."""
    import threading

    from edge import body as edge_body

    monkeypatch.setattr(edge_body, "OFF_LOOP_BYTES", 0)
    threads = []
    real = oip.parse_infer_request

    def parse(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(oip, "parse_infer_request", parse)
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    response = infer_json(http, body=echo_body(values.tolist(), id="off"))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == values.ravel().tolist()
    assert threads and threads[-1].startswith("edge-json")
    assert_error(infer_json(http, body=echo_body([[1.0, 2.0]], shape=[3])), 400, "needs 3 elements")
    assert_error(infer_json(http, body=echo_body([["a"]])), 400, "FP32 data must be numbers")
    assert_error(infer_json(http, content=b'{"inputs": [', headers={"content-type": "application/json"}), 400, "JSON")


def test_metrics_count_requests(http):
    before = http.get("/metrics").text
    for _ in range(3):
        assert infer_json(http, body=echo_body([[1.0, 2.0]])).status_code == 200
    assert infer_json(http, body=echo_body([[1.0]], datatype="INT32")).status_code == 400
    assert infer_json(http, "no-such-model", echo_body([[1.0]])).status_code == 404
    assert infer_json(http, content=b"x" * (LIMIT + 1)).status_code == 413
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text

    def grew(name: str, **labels) -> float:
        return counter(after, name, **labels) - counter(before, name, **labels)

    assert grew("edge_requests_total", model="echo", outcome="success") == 3
    assert grew("edge_requests_total", model="echo", outcome="bad_request") == 1
    assert grew("edge_requests_total", model="_other", outcome="not_found") == 1
    assert grew("edge_requests_total", model="echo", outcome="too_large") == 1
    assert grew("edge_request_seconds_count", model="echo") == 5
    assert grew("edge_batch_size_count", model="echo") == 3 and grew("edge_queue_wait_seconds_count", model="echo") == 3
    assert "edge_agents_alive 2.0" in after and "edge_broker_up 1.0" in after
    assert "edge_requests_in_flight 0.0" in after


def test_openapi_lists_every_route(http):
    doc = http.get("/openapi.json").json()
    expected = {
        "/v2/health/live": "get",
        "/v2/health/ready": "get",
        "/v2": "get",
        "/v2/models/{name}": "get",
        "/v2/models/{name}/versions/{version}": "get",
        "/v2/models/{name}/ready": "get",
        "/v2/models/{name}/versions/{version}/ready": "get",
        "/v2/models/{name}/infer": "post",
        "/v2/models/{name}/versions/{version}/infer": "post",
        "/agents": "get",
        "/brokers": "get",
        "/models": "get",
        "/metrics": "get",
        "/": "get",
    }
    for path, method in expected.items():
        assert method in doc["paths"].get(path, {}), f"{method.upper()} {path} missing from the OpenAPI document"
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schemas = doc["components"]["schemas"]
    request = schemas[ref.rsplit("/", 1)[1]]
    assert {"inputs", "outputs", "id", "parameters"} <= set(request["properties"])
    # What the document allows, the edge takes: no empty `inputs` (the edge answers 400), and the binary extension's
    # header only described with octet-stream bodies, not offered as a parameter of JSON ones
    assert request["properties"]["inputs"]["minItems"] == 1 and "inputs" in request["required"]
    assert not [p for p in infer.get("parameters", []) if p["name"].lower() == "inference-header-content-length"]
    octet = infer["requestBody"]["content"]["application/octet-stream"]["description"]
    assert "Inference-Header-Content-Length" in octet
    for target in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)):
        assert target in schemas, f"dangling $ref {target}"
    assert {"400", "404", "413", "429", "503"} <= set(infer["responses"])
    assert not any("422" in op.get("responses", {}) for ops in doc["paths"].values() for op in ops.values())
    assert http.get("/docs").status_code == 200


def test_brokers_are_the_managers_answer_and_503_when_it_does_not_answer(bus):
    manager = FakeManager()
    app = create_app(EdgeSettings(), client=bus, manager=manager)
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as http:
        answer = http.get("/brokers")
        assert answer.status_code == 200 and answer.json() == manager.brokers
        assert manager.calls[-1][0] == "brokers"
        manager.raises["brokers"] = InferenceTimeoutError("no answer from the manager within the deadline")
        assert_error(http.get("/brokers"), 503, f"the cluster's manager at {manager.address} is not answering")


def test_page_is_served(http):
    response = http.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    assert 'id="digit-canvas"' in response.text


def test_missing_page_is_404(bus, tmp_path):
    app = create_app(EdgeSettings(edge_frontend=str(tmp_path / "nowhere.html")), client=bus)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as http:
        assert_error(http.get("/"), 404, "nowhere.html is not installed")


def test_create_app_defaults_the_broker_to_the_clients(bus):
    """The broker the edge names is the one its bus client talks to: a client brought in, else the settings'."""
    assert create_app(client=bus).state.edge.broker == bus.address
    assert create_app(EdgeSettings(), client=bus).state.edge.broker == bus.address
    settings = EdgeSettings(addresses=Addresses(broker_clients="tcp://10.0.0.1:5555"))
    assert create_app(settings).state.edge.broker == "tcp://10.0.0.1:5555"


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing the infer endpoint
# ---------------------------------------------------------------------------------------------------------------

datatypes = st.sampled_from(ALL_DATATYPES + ["BYTES", "BF16", "fp32", "", "FP32 "])
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
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
        entry = {
            "name": draw(st.sampled_from(["x", "x", "image", "y"])),
            "shape": shape,
            "datatype": draw(st.sampled_from(["FP32", "FP32", "FP64", "INT32"])),
            "data": data,
        }
    else:
        entry = {
            "name": draw(st.one_of(st.sampled_from(["x", "image"]), st.text(max_size=4), st.integers())),
            "shape": draw(shapes),
            "datatype": draw(datatypes),
            "data": draw(
                st.recursive(st.lists(numbers, max_size=6), lambda inner: st.lists(inner, max_size=3), max_leaves=20)
            ),
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
    values = np.array(
        draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=rows * cols, max_size=rows * cols)), dtype=np.float32
    ).reshape(rows, cols)
    request: dict = {}
    if draw(st.booleans()):
        request["id"] = draw(st.text(max_size=8))
    if draw(st.booleans()):
        request["outputs"] = [{"name": "y", "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.booleans()):
        request["parameters"] = {
            "binary_data_output": draw(st.booleans()),
            "priority": draw(st.integers(0, 3)),
            "timeout": 10_000_000,
        }
    headers = {}
    if draw(st.booleans()):
        request["inputs"] = [
            {"name": "x", "shape": [rows, cols], "datatype": "FP32", "parameters": {"binary_data_size": values.nbytes}}
        ]
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
        body = json.dumps(
            draw(
                st.recursive(
                    numbers,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=15,
                )
            )
        ).encode()
    else:
        request = {"inputs": draw(st.lists(infer_inputs(), min_size=1, max_size=2))}
        if draw(st.booleans()):
            request["id"] = draw(st.one_of(st.text(max_size=8), st.integers()))
        if draw(st.integers(0, 3)) == 0:
            request["outputs"] = draw(
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(["y", "probs", "z"])},
                        optional={
                            "parameters": st.dictionaries(
                                st.sampled_from(["binary_data", "classification"]), numbers, max_size=2
                            )
                        },
                    ),
                    max_size=2,
                )
            )
        if draw(st.integers(0, 3)) == 0:
            request["parameters"] = draw(
                st.dictionaries(
                    st.sampled_from(["binary_data_output", "timeout", "priority", "k"]), numbers, max_size=3
                )
            )
        body = json.dumps(request).encode()
    if draw(st.integers(0, 3)) == 0:  # the binary extension, right or wrong
        tail = draw(st.binary(max_size=64))
        headers[oip.HEADER_LENGTH] = draw(
            st.one_of(st.just(str(len(body))), st.integers(-2, len(body) + 70).map(str), st.text(max_size=5))
        )
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

    # Generating the examples is the cost here (about 10 ms of CPU each, against 2 ms for the request itself):
    # 800 in CI, 160 while iterating (fuzz_examples)
    @settings(max_examples=fuzz_examples(800), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(call=infer_calls)
    def one(call):
        model, version, body, headers = call
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        response = http.post(path, content=body, headers=_header_safe(headers))
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        # 504 only for a request that set a deadline of a few microseconds (parameters.timeout)
        assert response.status_code in (200, 400, 404, 413, 415, 504), (
            f"{response.status_code} {response.text[:300]} for {body[:300]!r} {headers}"
        )
        if response.status_code != 200:
            assert isinstance(response.json().get("error"), str)
        elif oip.HEADER_LENGTH in response.headers:
            json.loads(response.content[: int(response.headers[oip.HEADER_LENGTH])])
        else:
            assert response.json()["model_name"] == model

    one()
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 10, seen  # both sides were exercised
    # the edge still answers
    assert http.get("/v2/health/ready").status_code == 200
    assert infer_json(http, body=echo_body([[1.0, 2.0]])).json()["outputs"][0]["data"] == [1.0, 2.0]
    assert "edge_requests_in_flight 0.0" in http.get("/metrics").text


def test_statistics_in_tritons_shape_and_404_for_unknown_models(http):
    stats = http.get("/v2/models/stats").json()["model_stats"]
    assert [(s["name"], s["version"], s["inference_count"]) for s in stats] == [("echo", "1", 2)], stats
    assert "failures" not in stats[0] and stats[0]["inference_stats"]["success"] == {"count": 2, "ns": 4000}
    assert http.get("/v2/models/echo/stats").json()["model_stats"][0]["execution_count"] == 2
    assert http.get("/v2/models/echo/versions/1/stats").status_code == 200
    assert http.get("/v2/models/nope/stats").status_code == 404
    assert "statistics" in http.get("/v2").json()["extensions"]


def test_metrics_carry_tritons_names_per_agent(http):
    text = http.get("/metrics").text
    assert 'nv_inference_request_success{agent="agent-a",model="echo",version="1"} 2.0' in text, text
    assert 'nv_inference_request_failure{agent="agent-a",model="echo",reason="BACKEND",version="1"} 1.0' in text
    assert "# TYPE nv_inference_count counter" in text and "cluster_agents_alive 1.0" in text, text
    assert "edge_requests_in_flight" in text


def test_docs_pages_load_nothing_from_the_internet(http):
    """/docs and /redoc work offline: every script, style and icon they load is served by the edge itself."""
    for page in ("/docs", "/redoc"):
        html = http.get(page)
        assert html.status_code == 200, (page, html.status_code)
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""", html.text)
        assert len(urls) >= 2 and not re.findall(r"https?://", html.text), html.text[:800]
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            assert http.get(url).status_code == 200, f"{page}: {url} is not served"


def test_the_request_id_goes_on_the_bus_to_follow_a_request_in_the_logs(http, bus):
    """The OIP `id` (or one the edge makes up when there is none) travels with the request as its request_id."""
    assert infer_json(http, body=echo_body([[1.0, 2.0, 3.0]], id="trace-me-1")).status_code == 200
    assert bus.calls[-1]["request_id"] == "trace-me-1"
    assert infer_json(http, body=echo_body([[1.0, 2.0, 3.0]])).status_code == 200
    assert re.fullmatch(r"edge-[0-9a-f]{16}", bus.calls[-1]["request_id"]), bus.calls[-1]["request_id"]


def test_infer_under_a_root_path_goes_through_fastapis_routes_with_the_same_answers(bus):
    """edge.routes.InferPath answers the plain infer paths in front of FastAPI; under a root path (a proxy's prefix)
    it lets FastAPI's routes serve them: the answers, the errors and the metrics must not tell the two apart."""
    app = create_app(
        EdgeSettings(max_body_bytes=LIMIT, timings=Timings(request_timeout=7.0)), client=bus, manager=FakeManager()
    )
    url = "http://127.0.0.1:8000"
    with (
        TestClient(app, base_url=url, raise_server_exceptions=False) as front,
        TestClient(app, base_url=url, root_path="/edge", raise_server_exceptions=False) as routed,
    ):
        for http in (front, routed):
            answer = infer_json(http, body=echo_body([[1.0, 2.0]], id="same"))
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
            assert answer.json()["outputs"][0]["data"] == [1.0, 2.0] and answer.json()["id"] == "same"
            assert bus.calls[-1]["request_id"] == "same" and bus.calls[-1]["timeout"] == 7.0
            assert_error(infer_json(http, body=echo_body([[1.0]], datatype="INT32")), 400, "INT32")
            assert_error(infer_json(http, version="x", body=echo_body([[1.0]])), 404, "no version")
            assert_error(infer_json(http, content=b"x" * (LIMIT + 1)), 413, "limit")
            bus.raises["infer"] = OverloadedError("the queue is full", "echo", retry_after=1.5)
            shed = infer_json(http, body=echo_body([[1.0]]))
            del bus.raises["infer"]
            assert_error(shed, 429, "queue is full")
            assert shed.headers["retry-after"] == "2"
        metrics = front.get("/metrics").text
        assert counter(metrics, "edge_requests_total", model="echo", outcome="success") == 2
        assert counter(metrics, "edge_requests_total", model="echo", outcome="overloaded") == 2


def test_an_unexpected_error_on_infer_is_500_without_details(http, bus):
    """The infer path answers in front of FastAPI's handlers: it must answer an unexpected error as they do."""
    bus.raises["infer"] = RuntimeError("a bug, with a secret in its message")
    message = assert_error(infer_json(http, body=echo_body([[1.0]])), 500, "internal error in the edge", "RuntimeError")
    assert "secret" not in message
    assert counter(http.get("/metrics").text, "edge_requests_total", model="_other", outcome="error") == 1
