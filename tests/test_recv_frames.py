"""cluster.sockets.recv_frames, the hot path's receive (issue 23, point 4): the first `copied` frames as bytes, the
rest as zmq.Frame, and no getsockopt from Python per frame (pyzmq 27 looks every option up in its SocketOption enum:
it cost more than the receipt itself; each frame's `more` is read from the received zmq.Frame instead)."""

from __future__ import annotations

import pytest
import zmq

from cluster import sockets


@pytest.mark.parametrize("copied", [0, 1, 3, 9])
def test_recv_frames_splits_bytes_and_frames_without_a_getsockopt_per_frame(monkeypatch, copied):
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://recv-frames")
        b.connect("inproc://recv-frames")
        message = [b"MSB1\x02", b"header", b"", b"t" * 100_000, b"last"]
        b.send_multipart(message)
        b.send_multipart([b"alone"])
        assert a.poll(5000), "nothing arrived"

        def no_getsockopt(*args):
            raise AssertionError("recv_frames asked the socket an option from Python")

        monkeypatch.setattr(sockets, "_raw_get", no_getsockopt)
        frames = sockets.recv_frames(a, copied)
        assert [type(f) is bytes for f in frames] == [i < copied for i in range(len(message))]
        assert [f if type(f) is bytes else f.bytes for f in frames] == message
        alone = sockets.recv_frames(a, copied)
        assert len(alone) == 1 and (alone[0] if copied else alone[0].bytes) == b"alone", "one frame: no more"
        with pytest.raises(zmq.Again):
            sockets.recv_frames(a, copied)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
