"""A slow model beside echo on one agent, end to end (issue 18 point 7): echo's latency while the slow model is busy
stays far under the slow model's forward pass, and the broker judges no stall for the agent's echo. Before execution
slots per model, echo queued behind the slow model on the agent's one inference thread: its p99 approached the
slow call's length (1.25 s beside a 1 s model here, 857 ms in the issue) and the agent was judged stalled.
`python3 bench/slow_beside.py` prints the figures (same-run ratios)."""

from __future__ import annotations

import pytest

from bench.slow_beside import publish_share, run_beside
from tests.harness import LocalCluster

pytestmark = pytest.mark.cluster


@pytest.fixture
def beside_cluster(request, tmp_path):
    share = tmp_path / "share"
    publish_share(share)
    # A stall floor of 0.5 s (default 0.1): a scheduler pause of 100+ ms on a loaded 2-core machine is not what this
    # test is about; echo waiting behind a 3 s call is judged stalled either way.
    local = LocalCluster(share, tmp_path / "logs", heartbeat_interval=1.0, extra_env={"CLUSTER_STALL_FLOOR": "0.5"})
    yield local
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    local.stop_all()
    if failed:
        print(local.logs())


def test_a_slow_model_does_not_slow_echo_on_the_same_agent(beside_cluster):
    """A 3 s model kept busy beside echo (64 in flight): echo's p99 stays under a third of the slow call (a generous
    bound: on a loaded 2-core machine, where the slow model takes one core, echo's p99 reached 0.5 s; waiting behind
    the slow call would take up to the whole 3 s), and no stall is judged for echo."""
    slow_s = 3.0
    figures = run_beside(beside_cluster, seconds=3.0, slow_s=slow_s, echo_in_flight=64, slow_in_flight=2)
    print(figures)
    beside = figures["echo_beside_slow"]
    assert beside["p99_ms"] < slow_s / 3 * 1e3, f"echo's p99 beside a {slow_s:g} s model: {figures}"
    echo_stalls = [line for line in figures["stall_lines"] if "for model echo" in line or "stalled:" in line]
    assert echo_stalls == [], figures["stall_lines"]
