"""Tensor bytes are never copied by Python code between a client's array and the model's input, or back: frames are
views of the arrays when sent (ZeroMQ copy=False), and arrays/tensors are views of the frames when received."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from cluster import protocol
from cluster.codec import decode_tensors, encode_tensors, to_torch
from cluster.protocol import Command


@pytest.mark.parametrize("mib", [4, 64])
def test_no_copy_from_array_to_model_input_and_back(mib):
    array = np.random.default_rng(0).random((mib * 1024 * 1024 // 4 // 256, 256), dtype=np.float32)
    metas, frames = encode_tensors({"x": array})
    assert np.shares_memory(np.frombuffer(frames[0], np.uint8), array), "encoding copied the tensor"

    ctx = zmq.Context()
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    receiver.bind("inproc://zero-copy")
    sender.connect("inproc://zero-copy")
    try:
        # Over inproc, a frame sent with copy=False arrives as the very same memory: this proves no layer copied it.
        sender.send_multipart(protocol.message(Command.REQUEST, {"inputs": metas}, frames), copy=False)
        received = receiver.recv_multipart(copy=False)
        header = protocol.unpack_header(received[1])
        protocol.validate_tensor_metas(header["inputs"], received[2:])
        decoded = decode_tensors(header["inputs"], received[2:])["x"]
        tensor = to_torch(decoded)
        assert np.shares_memory(decoded, array), "receiving copied the tensor"
        assert tensor.data_ptr() == decoded.__array_interface__["data"][0], "to_torch copied the tensor"
        np.testing.assert_array_equal(tensor.numpy(), array)

        # The way back: the model's output tensor is encoded as a view too.
        out_metas, out_frames = encode_tensors({"y": tensor})
        assert np.shares_memory(np.frombuffer(out_frames[0], np.uint8), array)
    finally:
        sender.close(0)
        receiver.close(0)
        ctx.term()


@pytest.mark.cluster
def test_echo_moves_64_mib_through_the_cluster(cluster):
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("big-agent", "--models", "echo")
    cluster.wait_for_agents(1, model="echo")
    x = np.random.default_rng(1).random((4096, 4096), dtype=np.float32)  # 64 MiB
    result = cluster.client().infer("echo", {"x": x}, timeout=60)
    np.testing.assert_array_equal(result.as_numpy("y"), x)
