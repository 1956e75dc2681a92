"""Shared fixtures: the demo share (digits and echo; digits trained once per session), digits model files for
deployments (no further training), and a real local cluster.

Markers (registered in pytest.ini): `cluster` starts real processes, `browser` drives Chromium, `nfs` needs the
userspace NFS server. The fast subset is `python3 -m pytest -m "not cluster"`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.harness import LocalCluster


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def trained_digits_file(pytestconfig, tmp_path_factory) -> Path:
    """The demo digits model as `cluster up` trains it (seed 0), trained at most once per test run, and kept in
    pytest's cache between runs: training is seeded and single-threaded, so the same code on the same torch gives
    the same model, and the cache key is the training code's hash and torch's version. Read-only for tests."""
    import torch

    from cluster import demo_models

    key = hashlib.sha256(Path(demo_models.__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir("trained-digits") if cache is not None else tmp_path_factory.mktemp("trained-digits")
    path = folder / f"digits-{key}.pt"
    if not path.is_file():
        partial = folder / f".{path.name}.{id(path)}"
        torch.jit.save(demo_models.train_digits(seed=0), str(partial))
        partial.replace(path)  # whole or absent, should two runs race
    return path


@pytest.fixture(scope="session")
def demo_share(tmp_path_factory, trained_digits_file) -> Path:
    """A share holding the two demo models, version 1. Read-only for tests: copy it to change it."""
    from cluster.demo_models import write_demo_models

    share = tmp_path_factory.mktemp("demo-share")
    write_demo_models(share, digits_file=trained_digits_file)
    return share


@pytest.fixture(scope="session")
def digits_v1_file(demo_share, tmp_path_factory) -> Path:
    """A copy of the demo share's digits version 1 model file (the session's one training), to publish elsewhere.
    Read-only for tests: publish_version copies it."""
    target = tmp_path_factory.mktemp("digits-files") / "digits-v1.pt"
    shutil.copyfile(demo_share / "models" / "digits" / "1" / "model.pt", target)
    return target


@pytest.fixture(scope="session")
def digits_v2_file(digits_v1_file) -> Path:
    """A second digits model, for deployments: version 1 with every weight nudged by a fixed 1% noise, so it has other
    bytes (and sha256) and the same contract and accuracy, without training digits again. Read-only for tests."""
    import torch

    model = torch.jit.load(str(digits_v1_file))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * 0.01)
    target = digits_v1_file.with_name("digits-v2.pt")
    model.save(str(target))
    return target


@pytest.fixture(scope="session")
def classifier_programs(tmp_path_factory) -> dict[str, Path]:
    """The BYTES classifier's model, preprocess and postprocess programs (tests/bytes_models.py), exported once."""
    from tests import bytes_models

    return bytes_models.export_all(tmp_path_factory.mktemp("bytes-programs"))


@pytest.fixture
def share(demo_share, tmp_path) -> Path:
    """A private, writable copy of the demo share."""
    target = tmp_path / "share"
    shutil.copytree(demo_share, target)
    return target


@pytest.fixture
def cluster(request, share, tmp_path):
    """A LocalCluster (nothing started yet) whose processes are all stopped after the test; logs shown on failure."""
    local = LocalCluster(share, tmp_path / "logs")
    yield local
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    local.stop_all()
    if failed:
        print(local.logs())


@pytest.fixture
def echo_cluster(request, tmp_path):
    """A LocalCluster on a share holding only `echo`, with production heartbeats (1 s, dead after 3 s), so a freeze or
    a pause must be ridden out before anyone is judged dead; stopped after the test, logs shown on failure."""
    from bench.frozen import publish_echo_share

    share = tmp_path / "share"
    publish_echo_share(share)
    local = LocalCluster(share, tmp_path / "logs", heartbeat_interval=1.0)
    yield local
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    local.stop_all()
    if failed:
        print(local.logs())
