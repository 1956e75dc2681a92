"""How an agent loads a version (cluster.agent.loaded_model, cluster.agent.loader): through a sealed memfd, so the
bytes torch reads are the bytes hashed, and several versions at once, each outcome (a model or why not) kept apart.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import pytest
import torch

from cluster.agent.loaded_model import SealedMap, _sealed_copy, load_model
from cluster.agent.loader import ModelLoader, load_versions
from cluster.demo_models import ECHO_CONFIG, make_echo
from cluster.publish import publish_version
from cluster.repository import ModelRepository
from cluster.share import LocalShare

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd seals are Linux's")


@pytest.fixture
def echo_share(tmp_path):
    source = tmp_path / "echo.pt"
    torch.jit.save(make_echo(), str(source))
    share = tmp_path / "share"
    publish_version(share, "echo", source, config=ECHO_CONFIG, version=1)
    publish_version(share, "echo", source, config=ECHO_CONFIG, version=2)
    return share


@linux_only
def test_a_sealed_copy_has_the_file_bytes_and_refuses_every_change(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"0123456789" * 1000)
    with contextlib.ExitStack() as stack:
        sealed = _sealed_copy(path, stack)
        assert isinstance(sealed, SealedMap)
        assert bytes(sealed) == path.read_bytes()
        with pytest.raises(PermissionError):
            os.write(sealed.fd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(sealed.fd, 1)
        with open(sealed.path, "rb") as again:  # the path torch opens reads the same bytes
            assert again.read() == path.read_bytes()
        fd = sealed.fd
    with pytest.raises(OSError):
        os.fstat(fd)  # released with the stack


def test_an_empty_file_is_read_as_bytes(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    with contextlib.ExitStack() as stack:
        assert _sealed_copy(path, stack) == b""


def _model_memfds() -> list[str]:
    """This process's open memfds made by _sealed_copy (their link reads "/memfd:model-<file> (deleted)")."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, another thread's)
        if target.startswith("/memfd:model-"):
            found.append(target)
    return found


@linux_only
def test_load_model_leaves_no_memfd_open(echo_share):
    model = load_model(ModelRepository(echo_share), "echo", 1)
    x = torch.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert torch.equal(model.infer({"x": x})["y"], x)
    assert _model_memfds() == []


def test_load_versions_keeps_each_outcome_in_the_order_asked(echo_share):
    outcomes = load_versions(LocalShare(echo_share), [("echo", 1), ("echo", 9), ("echo", 2)], "cpu", threads=2)
    assert [(name, version) for name, version, _ in outcomes] == [("echo", 1), ("echo", 9), ("echo", 2)]
    assert outcomes[0][2].version == 1 and outcomes[2][2].version == 2
    assert isinstance(outcomes[1][2], str) and "9" in outcomes[1][2]


def test_the_loader_threads_load_and_wake_the_agent(echo_share):
    import zmq

    ctx = zmq.Context()
    wake = ctx.socket(zmq.PULL)
    wake.bind("inproc://loads")
    loader = ModelLoader(ctx, "inproc://loads", LocalShare(echo_share), "cpu", threads=2)
    loader.start()
    try:
        loader.submit("echo", 1)
        loader.submit("echo", 2)
        assert wake.poll(30_000) and wake.recv() == b"\x01"
        assert wake.poll(30_000) and wake.recv() == b"\x01"
        outcomes = [loader.done.get(timeout=5) for _ in range(2)]
    finally:
        loader.stop()
        wake.close(linger=0)
        ctx.term()
    assert sorted((name, version, model.version) for name, version, model in outcomes) == [
        ("echo", 1, 1),
        ("echo", 2, 2),
    ]
