"""Shared fixtures: the demo share (digits and echo; digits trained once per session), digits model files for
deployments (no further training), and a real local cluster.

Markers (registered in pytest.ini): `cluster` starts real processes, `browser` drives Chromium, `nfs` needs the
userspace NFS server. The fast subset is `python3 -m pytest -m "not cluster"`.
"""

from __future__ import annotations

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
def demo_share(tmp_path_factory) -> Path:
    """A share holding the two demo models, version 1. Read-only for tests: copy it to change it."""
    from cluster.demo_models import write_demo_models

    share = tmp_path_factory.mktemp("demo-share")
    write_demo_models(share)
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
