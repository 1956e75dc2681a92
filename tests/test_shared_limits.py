"""The limits the edge and the bus share (issue 19 point 1): the longest dimension and tensor name, the longest request
deadline and the default rollout timeout are defined once, in cluster/config.py, and the edge (REST and gRPC) and the
bus refuse exactly the same things at each boundary. In-process: the checks are pure functions, plus a static scan of
cluster/ and edge/ for a limit written again as a literal."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from tritonclient.grpc import service_pb2

from cluster import config
from cluster.protocol import ProtocolError, validate_tensor_metas
from edge import grpc_service, oip
from edge.oip import InvalidRequest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("MAX_DIM", "MAX_NAME", "MAX_REQUEST_TIMEOUT_S", "ROLLOUT_TIMEOUT_S")


def _bus_accepts(name: str, shape: list[int]) -> bool:
    try:
        validate_tensor_metas([{"name": name, "datatype": "FP32", "shape": shape}], [b""])
    except ProtocolError:
        return False
    return True


def _rest_accepts(name: str, shape: list[int], timeout_us: int | None = None) -> bool:
    body = {"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": []}]}
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    try:
        oip.parse_infer_request(json.dumps(body).encode())
    except InvalidRequest:
        return False
    return True


def _grpc_accepts(name: str, shape: list[int], timeout_us: int | None = None) -> bool:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"")
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    try:
        grpc_service.parse_request(request)
    except InvalidRequest:
        return False
    return True


@pytest.mark.parametrize(
    "name, shape, accepted",
    [
        ("x" * config.MAX_NAME, [0, 1], True),
        ("x" * (config.MAX_NAME + 1), [0, 1], False),
        ("x", [0, config.MAX_DIM - 1], True),  # no elements: the data is empty, only the dimension is checked
        ("x", [0, config.MAX_DIM], False),
    ],
    ids=["longest-name", "name-too-long", "largest-dim", "dim-too-large"],
)
def test_the_edge_and_the_bus_refuse_the_same_tensors(name, shape, accepted):
    said = {"bus": _bus_accepts(name, shape), "REST": _rest_accepts(name, shape), "gRPC": _grpc_accepts(name, shape)}
    assert said == dict.fromkeys(said, accepted), f"the edge and the bus disagree about a tensor {shape}: {said}"


def test_the_edge_takes_deadlines_up_to_the_buses_longest():
    longest = round(config.MAX_REQUEST_TIMEOUT_S * 1_000_000)  # Triton's `timeout` parameter: microseconds
    assert oip.MAX_TIMEOUT_US == longest
    for accepts in (_rest_accepts, _grpc_accepts):
        assert accepts("x", [0], timeout_us=longest), accepts.__name__
        assert not accepts("x", [0], timeout_us=longest + 1), accepts.__name__
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "parameters": {"timeout": longest},
    }
    assert oip.parse_infer_request(json.dumps(body).encode()).timeout == config.MAX_REQUEST_TIMEOUT_S


# A literal that is one of these values, anywhere in cluster/ or edge/ but config.py, is a shared limit written twice.
LITERAL_VALUES = {2**40: "MAX_DIM", 24 * 3600: "MAX_REQUEST_TIMEOUT_S", 24 * 3600 * 1_000_000: "MAX_REQUEST_TIMEOUT_S"}
# path -> why that literal is not the shared limit
ALLOWED_LITERALS = {
    "cluster/client.py": "the blocking client's outer bound on a wait, a guard against a dead I/O thread (every call "
    "has its own deadline), not the request deadline limit",
}


def _constant_value(node: ast.AST):
    """The value of a number literal or of arithmetic on number literals (2**40, 24 * 3600); None for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Pow)):
        left, right = _constant_value(node.left), _constant_value(node.right)
        if left is not None and right is not None:
            return left * right if isinstance(node.op, ast.Mult) else left**right
    return None


def test_the_shared_limits_are_written_once_in_config():
    assert all(hasattr(config, name) for name in SHARED)
    written_again = []
    for path in sorted([*(ROOT / "cluster").rglob("*.py"), *(ROOT / "edge").rglob("*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative == "cluster/config.py" or relative in ALLOWED_LITERALS:
            continue
        tree = ast.parse(path.read_text(), filename=relative)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Constant, ast.BinOp)) and _constant_value(node) in LITERAL_VALUES:
                name = LITERAL_VALUES[_constant_value(node)]
                written_again.append(f"{relative}:{node.lineno} writes {name}'s value; import it from cluster.config")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _constant_value(node.value) is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name) and any(s in target.id for s in ("MAX_NAME", "ROLLOUT_TIMEOUT")):
                        written_again.append(f"{relative}:{node.lineno} sets {target.id} to a literal")
    assert not written_again, "limits the edge and the bus share, defined again: " + "; ".join(written_again)
