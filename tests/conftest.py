"""Shared fixtures: the demo share (digits and echo, trained once per session) and a real local cluster."""

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
