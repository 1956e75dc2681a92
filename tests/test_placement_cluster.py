"""Placement with real processes (issue 22, item 4): three agents with a 1 GiB --memory-budget each; `replicas: 2`
puts the large model A (600 MiB by its config) on two of them and the third never loads it (its heartbeats say so);
killing one of A's agents by pid re-places A on the third and requests keep being answered; a deploy that cannot fit
is refused with the shortfall named, and its version leaves the share. `cluster models` shows where each model lives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cluster.local import LocalCluster
from tests.harness import wait_for
from tests.test_deploy import run_cli

pytestmark = pytest.mark.cluster


def model_files(tmp_path, name: str, replicas: int, memory_mb: int = 0):
    """A tiny TorchScript model (x -> x) and its config with `replicas` (and `memory_mb`)."""
    model = tmp_path / f"{name}.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(model))
    config = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "replicas": replicas,
    } | ({"memory_mb": memory_mb} if memory_mb else {})
    config_file = tmp_path / f"{name}.json"
    config_file.write_text(json.dumps(config))
    return str(model), str(config_file)


def deploy(cluster, tmp_path, name: str, replicas: int, memory_mb: int = 0):
    model, config = model_files(tmp_path, name, replicas, memory_mb)
    return run_cli(cluster, "deploy", model, "--name", name, "--config", config)


def beats(cluster) -> dict[str, dict]:
    return {a["id"]: a for a in cluster.manager_query("agents")}


def holds(beat: dict, model: str) -> bool:
    """Whether an agent's heartbeat shows the model served, staged, failed or loaded in any way."""
    entries = [*beat["models"], *beat["staged"], *beat["failed"]]
    return any(e["name"] == model for e in entries) or model in beat["model_info"]


@pytest.fixture
def cluster(request, tmp_path):
    """A LocalCluster on an empty share (models come by `cluster deploy`), stopped after the test; logs on failure."""
    share = tmp_path / "share"
    share.mkdir()
    local = LocalCluster(share, tmp_path / "logs")
    yield local
    local.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(local.logs())


def test_replicas_place_copies_by_memory_re_place_on_death_and_refuse_what_cannot_fit(cluster, tmp_path):
    cluster.start_manager()
    cluster.start_broker()
    procs = {a: cluster.start_agent(a, "--memory-budget", "1Gi") for a in ("agent-1", "agent-2", "agent-3")}
    wait_for(lambda: len(beats(cluster)) == 3, 60, "three agents heard by the manager")
    assert {b["memory_budget"] for b in beats(cluster).values()} == {2**30}, "each announces its --memory-budget"

    out = deploy(cluster, tmp_path, "B", replicas=2)  # small: its memory is measured at load
    assert out.returncode == 0, out.stdout + out.stderr
    out = deploy(cluster, tmp_path, "A", replicas=2, memory_mb=600)
    assert out.returncode == 0, out.stdout + out.stderr
    placed = cluster.manager_query("deployments")
    a_agents, b_agents = placed["A"]["placed"], placed["B"]["placed"]
    assert len(a_agents) == 2 and len(b_agents) == 2, placed
    assert "on 2 agents" in out.stdout, out.stdout  # A's rollout waited for its two agents only
    [third] = set(procs) - set(a_agents)

    # The third agent never loads A: several of its beats later, nothing of A in them.
    uptime = beats(cluster)[third]["uptime"]
    wait_for(lambda: beats(cluster)[third]["uptime"] > uptime + 1.0, 30, f"{third} to beat for another second")
    assert not holds(beats(cluster)[third], "A"), beats(cluster)[third]
    assert all(holds(beats(cluster)[a], "A") for a in a_agents)
    listing = run_cli(cluster, "models")
    assert listing.returncode == 0 and "2/2 on" in listing.stdout, listing.stdout + listing.stderr

    client = cluster.client()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for _ in range(10):
        assert np.array_equal(client.infer("A", {"x": x}).outputs["y"], x)

    # One of A's agents dies: A is placed on the third, which loads it; requests keep being answered.
    victim = a_agents[0]
    cluster.kill(procs[victim])
    answered = 0

    def re_placed():
        nonlocal answered
        assert np.array_equal(client.infer("A", {"x": x}, timeout=30).outputs["y"], x)
        answered += 1
        return third in cluster.manager_query("deployments")["A"]["placed"] and holds(beats(cluster)[third], "A")

    wait_for(re_placed, 60, f"A re-placed on {third} after {victim} died", interval=0.1)
    wait_for(lambda: sum(any(m["name"] == "A" for m in b["models"]) for b in client.agents()) == 2, 30, "A on 2")
    for _ in range(10):
        assert np.array_equal(client.infer("A", {"x": x}).outputs["y"], x)
    assert answered >= 1

    # Two more copies of 600 MiB: the two agents left have about 424 MiB free each; refused, and named.
    out = deploy(cluster, tmp_path, "C", replicas=2, memory_mb=600)
    assert out.returncode != 0, out.stdout
    assert "cannot place it: model 'C' needs 2 copies of 600.0 MiB (memory_mb in its config); room on 0 agents: " in (
        out.stderr
    ), out.stdout + out.stderr
    assert "MiB free" in out.stderr and victim not in out.stderr, out.stderr
    print(listing.stdout, out.stderr, sep="\n")
    assert not (cluster.share / "models" / "C").exists(), "a refused first version leaves the share"
    assert "C" not in cluster.manager_query("deployments")
