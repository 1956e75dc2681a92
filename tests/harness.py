"""What the end-to-end tests use to run a real cluster: `cluster.local.LocalCluster` (manager, broker, agents and the
edge as processes, every port picked by the OS), plus `wait_for`, a test's poll-with-deadline.

    with LocalCluster(share, tmp_path, heartbeat_interval=0.3) as cluster:
        cluster.start_manager(); cluster.start_broker(); cluster.start_agents(3)
        cluster.wait_for_agents(3)
        with cluster.client() as client: ...
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.config import Addresses
from cluster.local import LocalCluster, Proc, wait_until

__all__ = [
    "REPO_ROOT",
    "LocalCluster",
    "Proc",
    "all_gone",
    "edge_stack",
    "fuzz_examples",
    "start_edge",
    "until",
    "wait_for",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def fuzz_examples(full: int) -> int:
    """How many hypothesis examples an in-process fuzz test runs: `full` in CI (CI=true) or with CLUSTER_FUZZ=full,
    a fifth of it otherwise, so the fast subset stays fast while you iterate (generating the examples is the cost)."""
    thorough = os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("CLUSTER_FUZZ") == "full"
    return full if thorough else max(1, full // 5)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll `condition` until it returns something truthy (cluster.local.wait_until), failing the test with an
    AssertionError naming `what` at the deadline."""
    try:
        return wait_until(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


async def until(condition: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """wait_for for a coroutine (the event loop keeps running meanwhile): True once `condition` holds, False at the
    deadline, for callers that report the failure their own way (a child process returning its figures)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


def all_gone(pids) -> bool:
    """Whether every process in `pids` has exited (a zombie not yet reaped counts as gone)."""
    import psutil

    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def start_edge(broker: str, workdir: Path, *args: str, timeout: float = 30.0) -> Proc:
    """An edge of its own (port picked by the OS) in front of the broker at `broker`, returned once it serves:
    `.url`, `.port`, `.stop()`, `.alive()`, `.log()`. Same as LocalCluster.start_edge, for tests that hold the
    broker's address only."""
    edges = LocalCluster(None, workdir, addresses=Addresses(broker_clients=broker))
    name = f"edge-{time.monotonic_ns()}"  # tests may start several in one folder
    return edges.start_edge("--log-level", "warning", *args, name=name, timeout=timeout)


@contextmanager
def edge_stack(demo_share: Path, workdir: Path, model: str = "echo") -> Iterator[LocalCluster]:
    """A copy of the demo share and a whole cluster on it: manager, broker, two agents serving `model`, and the edge
    with REST and gRPC (ports the OS picks); the logs are printed if the block fails; everything is stopped after."""
    share = workdir / "share"
    shutil.copytree(demo_share, share)
    cluster = LocalCluster(share, workdir / "logs", edge_grpc_port=0)
    try:
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(2)
        cluster.wait_for_agents(2, model=model)
        cluster.start_edge("--log-level", "warning")
        assert cluster.grpc_address, "the edge did not report a gRPC address in its ready file"
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()
