"""edge/oip.py (with oip_tensors.py and oip_json.py) on its own: every datatype the bus carries, from JSON and from
binary, every refusal, and a fuzz of the request parser (it only ever raises InvalidRequest). Pure functions: no app,
no cluster."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.protocol import DATATYPES, NUMERIC_DATATYPES
from edge import oip, oip_json, oip_tensors
from edge.oip import InvalidRequest, parse_infer_request, tensor_from_binary, tensor_from_json
from tests.harness import fuzz_examples

ALL_DATATYPES = list(NUMERIC_DATATYPES)  # BYTES: tests/test_bytes.py

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
    "UINT8": 256,
    "UINT16": -1,
    "UINT32": 2**32,
    "UINT64": 2**64,
    "INT8": -129,
    "INT16": 2**15,
    "INT32": -(2**31) - 1,
    "INT64": 2**63,
    "FP16": 70000.0,
    "FP32": 1e39,
    "FP64": 10**400,
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
    assert (
        np.array(oip_tensors.tensor_to_json(expected), dtype=expected.dtype).reshape(2, 2).tolist() == expected.tolist()
    )


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_oip_every_datatype_from_binary(datatype):
    expected = np.array(JSON_SAMPLES[datatype], dtype=DATATYPES[datatype])
    raw = expected.astype(expected.dtype.newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(tensor_from_binary("t", datatype, [2, 2], raw), expected)
    assert oip_tensors.tensor_to_binary(expected) == raw
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
        ("BYTES", [1], [1], "BYTES data must be strings"),
        ("BF16", [1], [1], "not supported"),
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
    header = json.dumps(
        {
            "id": "7",
            "parameters": {"binary_data_output": True, "timeout": 1_500_000, "priority": 1, "anything": "goes"},
            "inputs": [
                {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
                {"name": "j", "shape": [1], "datatype": "INT8", "data": [5]},
                {"name": "b", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": b.nbytes}},
            ],
            "outputs": [{"name": "o1"}, {"name": "o2", "parameters": {"binary_data": False}}],
        }
    ).encode()
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
    body, headers = oip.encode_infer_response(
        "m", 3, outputs, parse_infer_request(b'{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1]}]}')
    )
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
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, '
            b'{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            None,
            "twice",
        ),
        (
            b'{"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            None,
            "'id' must be a string",
        ),
        (
            b'{"parameters": [], "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            None,
            "'parameters' must be an object",
        ),
        (
            b'{"parameters": {"timeout": -1}, '
            b'"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            None,
            "timeout",
        ),
        (
            b'{"parameters": {"binary_data_output": "yes"}, '
            b'"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            None,
            "true or false",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], '
            b'"outputs": [{"name": "y", "parameters": {"classification": 3}}]}',
            None,
            "classification",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{}]}',
            None,
            "outputs[0]",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}',
            None,
            "no Inference-Header-Content-Length",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}abc',
            "json",
            "runs past the end",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", '
            b'"parameters": {"binary_data_size": 4}}]}abcde',
            "json",
            "bytes after",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}abcd',
            "json",
            "needs 8 bytes",
        ),
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
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


# Generating the nested JSON is the cost (about 15 ms of CPU each; parsing is 0.2 ms): 500 examples in CI, 100 while
# iterating (fuzz_examples)
@settings(max_examples=fuzz_examples(500), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {
                "inputs": st.lists(
                    st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]), json_values),
                    max_size=3,
                )
            },
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
# Large JSON (issue 11): number arrays read in chunks, outputs written in chunks; same answers as the plain parse
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """The large-JSON paths at toy sizes: a number array of 16+ bytes is cut out and read 40 bytes at a time,
    outputs over 7 elements are written 7 at a time."""
    monkeypatch.setattr(oip_json, "SPAN_MIN", 16)
    monkeypatch.setattr(oip_json, "CHUNK_BYTES", 40)
    monkeypatch.setattr(oip_json, "CHUNK_ELEMENTS", 7)


def _plain(body: bytes, monkeypatch) -> object:
    """What the plain parse (no number spans) answers: the request, or the InvalidRequest's message."""
    with monkeypatch.context() as m:
        m.setattr(oip_json, "SPAN_MIN", 10**12)
        try:
            return parse_infer_request(body)
        except InvalidRequest as exc:
            return str(exc)


def _both(body: bytes, monkeypatch):
    try:
        chunked = parse_infer_request(body)
    except InvalidRequest as exc:
        chunked = str(exc)
    return chunked, _plain(body, monkeypatch)


@pytest.mark.parametrize("datatype", [d for d in ALL_DATATYPES if d != "BOOL"])
def test_oip_number_spans_give_what_the_plain_parse_gives(datatype, small_chunks, monkeypatch):
    rng = np.random.default_rng(1)
    dtype = DATATYPES[datatype]
    if datatype.startswith("FP"):
        values = (rng.standard_normal(101) * 100).astype(dtype)
        data = json.dumps([float(v) for v in values])
    else:
        info = np.iinfo(dtype)
        values = np.concatenate([np.array([info.min, info.max], dtype), rng.integers(0, 100, 99).astype(dtype)])
        data = json.dumps([int(v) for v in values])
    body = (
        b'{"id": "s", "inputs": [{"name": "a", "shape": [1, 101], "datatype": "%s", "data": %s},'
        b' {"name": "b", "shape": [2], "datatype": "INT8", "data": [1, 2]}]}' % (datatype.encode(), data.encode())
    )
    assert oip_json.number_spans(body, len(body))  # the toy threshold does cut the array out
    chunked, plain = _both(body, monkeypatch)
    assert not isinstance(chunked, str), chunked
    assert chunked.id == "s" and list(chunked.inputs) == ["a", "b"]
    for name in ("a", "b"):
        assert chunked.inputs[name].dtype == plain.inputs[name].dtype
        np.testing.assert_array_equal(chunked.inputs[name], plain.inputs[name])
    np.testing.assert_array_equal(chunked.inputs["a"].ravel(), values)


@pytest.mark.parametrize(
    "data, words",
    [
        ("[" + ", ".join(["1"] * 30) + ",]", "invalid JSON"),  # trailing comma
        ("[" + ", ".join(["1"] * 15) + ",," + ", ".join(["1"] * 14) + "]", "invalid JSON"),  # empty element
        ("[" + ", ".join(["1"] * 29) + ", 1e999]", "must be integers"),
        ("[" + ", ".join(["1"] * 29) + ", 1e999]", "FP32 (JSON numbers must be finite)"),
        ("[" + ", ".join(["1"] * 29) + ", 1e39]", "out of range for FP32"),
        ("[" + ", ".join(["1"] * 29) + ", 1.2.3]", "invalid JSON"),
        ("[" + ", ".join(["1"] * 29) + ", --1]", "invalid JSON"),
        ("[" + ", ".join(["1"] * 29) + ", 01]", "invalid JSON"),
        ("[" + ", ".join(["1"] * 31) + "]", "needs 30 elements, 'data' has 31"),
        ("[" + ", ".join(["1"] * 29) + ", 1.5]", "data must be integers"),
        ("[" + ", ".join(["1"] * 29) + ", 123456789012345678901234567890]", "out of range for INT64"),
        ("[" + ", ".join(["1"] * 29) + ", 9223372036854775808]", "out of range for INT64"),
        ("[" + ", ".join(["1"] * 29) + ", 1e3]", "data must be integers"),
    ],
)
def test_oip_number_spans_refuse_what_the_plain_parse_refuses(data, words, small_chunks, monkeypatch):
    datatype = b"FP32" if "FP32" in words else b"INT64"
    body = b'{"inputs": [{"name": "i", "shape": [30], "datatype": "%s", "data": %s}]}' % (datatype, data.encode())
    chunked, plain = _both(body, monkeypatch)
    assert isinstance(chunked, str) and words in chunked, chunked
    assert isinstance(plain, str), plain  # the plain parse refuses it too (with the standard library's words)
    if "invalid JSON" not in words:
        assert chunked == plain


@pytest.mark.parametrize(
    "body, words",
    [
        # a number list inside a string, in a parameter, as a key: the plain parse decides
        (
            b'{"id": "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", '
            b'"data": [1]}]}',
            None,
        ),
        (
            b'{"parameters": {"p": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}, "inputs": [{"name": "x", "shape": [1], '
            b'"datatype": "FP32", "data": [1]}]}',
            "must be a string, number or boolean",
        ),
        (b'{[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]: 1, "inputs": []}', "invalid JSON"),
        (
            b'{"inputs": [{"name": "x", "shape": [10], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}, '
            b'{"name": "x", "shape": [10], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}]}',
            "twice",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [10], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}],'
            b' "inputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            None,
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [10], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],'
            b' "data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]}]}',
            None,
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [10], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}]',
            "invalid JSON",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2, 5], "datatype": "FP32", "data": [[1, 2, 3, 4, 5.00], '
            b"[6, 7, 8, 9, 10.0]]}]}",
            None,
        ),
    ],
)
def test_oip_number_spans_elsewhere_fall_back_to_the_plain_parse(body, words, small_chunks, monkeypatch):
    assert oip_json.number_spans(body, len(body))
    chunked, plain = _both(body, monkeypatch)
    if words is None:
        assert not isinstance(chunked, str), chunked
        assert chunked.id == plain.id and list(chunked.inputs) == list(plain.inputs)
        for name in chunked.inputs:
            np.testing.assert_array_equal(chunked.inputs[name], plain.inputs[name])
    else:
        assert chunked == plain and words in chunked


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_oip_large_outputs_are_written_in_chunks(datatype, small_chunks):
    rng = np.random.default_rng(2)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        big = rng.integers(0, 2, (3, 11)).astype(bool)
    elif datatype.startswith("FP"):
        big = rng.standard_normal((3, 11)).astype(dtype)
    else:
        big = rng.integers(0, 100, (3, 11)).astype(dtype)
    outputs = {"big": big, "t": np.arange(6, dtype=np.float32)[::2], "small": np.array([1, 2], dtype=">i4")}
    request = parse_infer_request(
        b'{"id": "o", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'
    )
    body, headers = oip.encode_infer_response("m", 1, outputs, request, {"agent": "a-1"})
    assert headers == {"Content-Type": "application/json"}
    response = json.loads(body)
    assert response["id"] == "o" and response["parameters"] == {"agent": "a-1"}
    by_name = {o["name"]: o for o in response["outputs"]}
    assert by_name["big"]["shape"] == [3, 11] and by_name["big"]["datatype"] == datatype
    np.testing.assert_array_equal(np.array(by_name["big"]["data"], dtype=dtype).reshape(3, 11), big)
    assert by_name["t"]["data"] == [0.0, 2.0, 4.0] and by_name["small"]["data"] == [1, 2]


number_text = st.lists(
    st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
        st.sampled_from(["", " ", "-", "1e999", "1.", ".5", "01", "1e", "+1", "1E+2", "-0", "\t2\n"]),
    ),
    min_size=1,
    max_size=40,
).map(", ".join)


@settings(max_examples=fuzz_examples(300), deadline=None, database=None)
@given(data=number_text, count=st.integers(0, 45), datatype=st.sampled_from(["FP32", "FP64", "INT64", "UINT8"]))
def test_oip_number_spans_fuzz_same_as_the_plain_parse(data, count, datatype):
    body = b'{"inputs": [{"name": "f", "shape": [%d], "datatype": "%s", "data": [%s]}]}' % (
        count,
        datatype.encode(),
        data.encode(),
    )
    with pytest.MonkeyPatch.context() as m:
        m.setattr(oip_json, "SPAN_MIN", 8)
        m.setattr(oip_json, "CHUNK_BYTES", 16)
        try:
            chunked = parse_infer_request(body).inputs["f"]
        except InvalidRequest as exc:
            chunked = str(exc)
        m.setattr(oip_json, "SPAN_MIN", 10**12)
        try:
            plain = parse_infer_request(body).inputs["f"]
        except InvalidRequest as exc:
            plain = str(exc)
    if isinstance(plain, str):  # refused both ways (the words of a JSON syntax error may differ)
        assert isinstance(chunked, str), (body, plain)
        if not plain.startswith("invalid JSON"):
            assert chunked == plain, body
    else:
        assert not isinstance(chunked, str), (body, chunked)
        np.testing.assert_array_equal(chunked, plain)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)
_JSON_BYTES = list(b'{}[],:"\\ .-+eE0123456789truefalsnul\x00\x1f') + [0xC3, 0xA9, 0xFF, 0xED, 0xA0, 0xEF, 0xBB, 0xBF]


def _parsed(parse, text: bytes):
    try:
        return "ok", parse(text)
    except InvalidRequest:
        return "invalid", None


@settings(max_examples=fuzz_examples(2000), suppress_health_check=list(HealthCheck), deadline=None)
@given(_JSON_VALUES, st.integers(0, 10**6), st.sampled_from(_JSON_BYTES), st.sampled_from(["keep", "swap", "drop"]))
def test_the_fast_json_read_answers_as_the_standard_library(value, where, byte, edit):
    """oip_json.parse_json_fast (orjson where it agrees) must give parse_json's answer, or refuse what it refuses: on
    valid JSON (integers past 64 bits, which orjson reads as floats, included) and with one byte swapped or dropped."""
    text = json.dumps(value).encode()
    at = where % len(text)
    if edit == "swap":
        text = text[:at] + bytes([byte]) + text[at + 1 :]
    elif edit == "drop":
        text = text[:at] + text[at + 1 :]
    fast, slow = _parsed(oip_json.parse_json_fast, text), _parsed(oip_json.parse_json, text)
    assert fast[0] == slow[0], text
    assert json.dumps(fast[1]) == json.dumps(slow[1]), text  # same values, same types (1 vs 1.0)


def test_the_fast_json_read_keeps_integers_past_64_bits_exact():
    big = 2**64 + 1
    assert oip_json.parse_json_fast(b"[%d, -%d]" % (big, big)) == [big, -big]
    request = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [big]}]}
    with pytest.raises(InvalidRequest, match="out of range for INT64"):
        parse_infer_request(json.dumps(request).encode())
