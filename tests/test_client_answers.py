"""ClientCore reads an answer's outputs in one pass (client_core.read_outputs, issue 23): it must give exactly what
protocol.validate_tensor_metas + codec.decode_tensors give, and refuse what they refuse with their words."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from cluster.client_core import read_outputs
from cluster.codec import decode_tensors, encode_tensors
from cluster.config import MAX_DIM, MAX_NAME, MAX_TENSORS
from cluster.protocol import ProtocolError, validate_tensor_metas


def careful(metas, frames):
    return decode_tensors(validate_tensor_metas(metas, frames, "outputs"), frames)


GOOD = [
    {"y": np.arange(64, dtype=np.float32).reshape(1, 64)},
    {"a": np.zeros((0, 3), np.int64), "b": np.ones((2, 2, 2), np.float16), "c": np.array([True, False])},
    {"s": np.array([b"ab", b"", b"xyz"], dtype=object), "n": np.arange(3, dtype=np.uint8)},  # BYTES: careful way
]


@pytest.mark.parametrize("outputs", GOOD)
@pytest.mark.parametrize("as_frames", [False, True])
def test_good_outputs_read_as_the_careful_way_reads_them(outputs, as_frames):
    metas, frames = encode_tensors(outputs)
    frames = [zmq.Frame(bytes(f)) if as_frames else bytes(f) for f in frames]
    fast, slow = read_outputs(metas, frames), careful(metas, frames)
    assert list(fast) == list(slow) == list(outputs)
    for name, array in fast.items():
        assert array.dtype == slow[name].dtype and array.shape == slow[name].shape
        assert array.tolist() == slow[name].tolist() == outputs[name].tolist()


def bad_cases():
    frame = np.zeros(4, np.float32).tobytes()
    meta = {"name": "y", "datatype": "FP32", "shape": [4]}
    yield "not a list", {"y": meta}, [frame]
    yield "count", [meta, meta], [frame]
    yield "too many", [dict(meta, name=f"t{i}") for i in range(MAX_TENSORS + 1)], [frame] * (MAX_TENSORS + 1)
    yield "not a map", ["y"], [frame]
    for name in ("", 5, "n" * (MAX_NAME + 1)):
        yield f"name {name!r:.10}", [dict(meta, name=name)], [frame]
    yield "twice", [meta, meta], [frame, frame]
    yield "datatype", [dict(meta, datatype="FP128")], [frame]
    for shape in ([4.0], [True, 4], [-4], [MAX_DIM], "4", [1] * 65):
        yield f"shape {shape!r:.10}", [dict(meta, shape=shape)], [frame]
    yield "bytes", [dict(meta, shape=[5])], [frame]
    yield "BYTES too short", [dict(meta, datatype="BYTES", shape=[4])], [b"\0\0\0"]


@pytest.mark.parametrize(("why", "metas", "frames"), list(bad_cases()), ids=[c[0] for c in bad_cases()])
def test_bad_outputs_are_refused_with_the_careful_ways_words(why, metas, frames):
    with pytest.raises(ProtocolError) as slow:
        careful(metas, frames)
    with pytest.raises(ProtocolError) as fast:
        read_outputs(metas, frames)
    assert str(fast.value) == str(slow.value)


def test_an_answer_that_makes_the_reader_raise_still_resolves_its_call():
    """A reply whose output meta has a datatype that is no string (unhashable): the call gets a ClusterError at once
    (it is already out of the core's calls, so nothing else would ever resolve it)."""
    from cluster import ClusterError, protocol
    from cluster.client_core import ClientCore
    from cluster.protocol import PREAMBLE, Command, pack

    core = ClientCore(30.0)
    call = core.infer_call("echo", {"x": np.zeros(2, np.float32)}, None, None, None, None)
    reply = {"id": call.request_id, "model": "echo", "version": 1, "agent": "a"}
    reply["outputs"] = [{"name": "y", "datatype": [], "shape": [2]}]
    got, outcome = core.on_message([b"b", PREAMBLE[Command.REPLY], pack(reply), np.zeros(2, np.float32).tobytes()])
    assert got is call and isinstance(outcome, ClusterError) and "malformed answer" in str(outcome), outcome
    assert call.request_id not in core.calls
    assert protocol.is_batch(protocol.batch([[b"p", b"h"]])[0])


def test_outputs_that_are_not_names_are_refused_when_the_call_is_made():
    from cluster import BadRequestError
    from cluster.client_core import ClientCore

    with pytest.raises(BadRequestError, match="output names"):
        ClientCore(30.0).infer_call("echo", {"x": np.zeros(2, np.float32)}, None, None, [object()], None)
