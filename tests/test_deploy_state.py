"""The manager on real processes when it cannot write its state, and what it answers at once instead of never
(issue 18 points 4, 8, 9): a deploy whose desired state the share refuses is answered with the path and the cause
within seconds, undone, and the manager serves on; a repository load of an invalid name is a 400 from the edge, not
a wait for the manager; `cluster deploy` of a new model without a config is refused by the manager before the file
is sent. The logic of each: tests/test_manager_state.py, tests/test_manager_logic.py, tests/test_cli_deploy.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from cluster import ClusterError
from cluster.demo_models import digits_split
from cluster.desired import DEPLOYMENTS_FILE, DesiredState
from cluster.manager.client import ManagerClient
from cluster.publish import publish_version
from tests.harness import REPO_ROOT, wait_for

pytestmark = pytest.mark.cluster


def test_a_deploy_whose_state_cannot_be_saved_is_refused_in_seconds_undone_and_the_manager_serves_on(
    cluster, digits_v2_file
):
    manager_proc = cluster.start_manager()
    cluster.start_broker()
    cluster.start_agents(2)
    agents = {a["id"] for a in cluster.wait_for_agents(2, model="digits")}
    client = cluster.client()
    image = digits_split()[2][0][None]
    publish_version(cluster.share, "digits", digits_v2_file)  # v2 on the share, v1 deployed
    state = cluster.share / DEPLOYMENTS_FILE
    wait_for(state.is_file, 10, "the manager to save its desired state")
    state.unlink()
    state.mkdir()  # where the state file belongs: every save (temp file, rename over it) fails, even as root

    manager = ManagerClient(cluster.addresses.manager_queries)
    start = time.monotonic()
    with pytest.raises(ClusterError) as info:
        manager.call("deploy", timeout=30, name="digits", version=2, rollout_timeout=20)
    took = time.monotonic() - start
    refused_at = time.monotonic()
    text = str(info.value)
    assert f"could not save the desired state to {state}: Is a directory" in text, text
    assert "every agent keeps serving v1" in text and took < 5, (text, took)

    assert manager_proc.alive(), "the manager died:\n" + manager_proc.log()
    deployments = manager.call("deployments")["digits"]
    assert (deployments["version"], deployments["staged"], deployments["rolling_out"]) == (1, None, False)
    assert client.infer("digits", {"image": image}).version == 1, "the deployment before serves on"

    def beats_since_refusal():  # each agent beat a second after the refusal: it had the state the manager published
        listed = {a["id"]: a for a in manager.call("agents")}
        fresh = [a for a in listed.values() if a["heartbeat_age"] < time.monotonic() - refused_at - 1.0]
        return listed if {a["id"] for a in fresh} >= agents else None

    listed = wait_for(beats_since_refusal, 15, "every agent to beat after the refusal")
    for agent_id in agents:
        beat = listed[agent_id]
        assert beat["staged"] == [] and beat["failed"] == [], beat
        assert [m["version"] for m in beat["models"] if m["name"] == "digits"] == [1], beat

    with pytest.raises(ClusterError) as info:  # a file sent to publish (cluster deploy without --share): published
        data = digits_v2_file.read_bytes()  # as v3, then the deploy is refused and v3 taken off the share again
        manager.call("publish", timeout=30, data=data, name="digits", file="model.pt", rollout_timeout=20)
    assert f"could not save the desired state to {state}" in str(info.value), info.value
    assert not (cluster.share / "models" / "digits" / "3").exists() and manager_proc.alive()

    state.rmdir()  # the share takes writes again: the same deploy now goes through (nothing was left half-done)
    report = manager.call("deploy", timeout=60, name="digits", version=2, rollout_timeout=40)
    assert report["ok"] and set(report["agents"]) == agents, report
    assert DesiredState.load(cluster.share).models["digits"].version == 2
    assert manager_proc.alive() and client.infer("digits", {"image": image}).version == 2


def test_a_load_of_an_invalid_name_is_a_400_at_once_and_deploy_asks_the_manager_before_sending(cluster, tmp_path):
    cluster.edge_grpc_port = 0  # with the gRPC edge too (any free port)
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_edge("--log-level", "warning")
    config = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }
    body = {"parameters": {"config": json.dumps(config), "file:1/model.pt": "YQ=="}}  # all good but the name
    start = time.monotonic()
    response = httpx.post(f"{cluster.edge_url}/v2/repository/models/.hidden/load", json=body, timeout=60)
    took = time.monotonic() - start
    assert response.status_code == 400 and "invalid model name '.hidden'" in response.json()["error"], response.text
    assert took < 10, f"took {took:.1f} s"
    with triton_grpc.InferenceServerClient(cluster.grpc_address) as grpc_client:
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            grpc_client.load_model(
                ".hidden", config=json.dumps(config), files={"file:1/model.pt": b"a"}, client_timeout=60
            )
        took = time.monotonic() - start
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    assert "invalid model name '.hidden'" in info.value.message() and took < 10, (info.value, took)

    model = tmp_path / "fresh.pt"
    model.write_bytes(b"x" * 1024)
    env = {k: v for k, v in cluster.env().items() if k != "CLUSTER_SHARE"}  # no share here: over the bus
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "deploy", str(model), "--name", "fresh"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 2 and "'fresh' is a new model: give its config" in out.stderr, out.stdout + out.stderr
    assert "sending" not in out.stdout, "the file was not sent"
    assert not (cluster.share / "models" / "fresh").exists()
