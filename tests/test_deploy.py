"""Deployments: `cluster deploy` publishes a version atomically and the manager rolls it out to every agent with no
failed request; a broken version leaves every agent on the old one; late agents and a restarted manager follow the
desired state kept on the share.

Every test starts a manager, a broker and three agents. The model files deployed come from the session's
`digits_v1_file` / `digits_v2_file` fixtures (tests/conftest.py), so digits is trained once per test run."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cluster import ModelNotFoundError
from cluster.demo_models import DIGITS_CONFIG, digits_split
from cluster.manager.client import ManagerClient
from cluster.publish import publish_version
from tests.harness import REPO_ROOT, wait_for

pytestmark = pytest.mark.cluster


class Load:
    """Keeps `in_flight` digits requests in flight from a thread; records every outcome and its latency."""

    def __init__(self, client, in_flight: int = 16) -> None:
        self.client = client
        self.in_flight = in_flight
        self.results: list[tuple[float, float, int, str]] = []  # (sent at, latency, version, agent)
        self.errors: list[str] = []
        self._stop = threading.Event()
        _, _, self.images, _ = digits_split()
        self.thread = threading.Thread(target=self._run)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(60)

    def _submit(self, i: int):
        return self.client.submit("digits", {"image": self.images[i % 360][None]}), time.monotonic()

    def _run(self) -> None:
        pending = dict(self._submit(i) for i in range(self.in_flight))
        i = self.in_flight
        while pending:
            done, _ = concurrent.futures.wait(pending, timeout=60, return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                self.errors.append("no answer within 60 s")
                return
            for future in done:
                sent = pending.pop(future)
                try:
                    result = future.result()
                    self.results.append((sent, time.monotonic() - sent, result.version, result.agent))
                except Exception as exc:
                    self.errors.append(repr(exc))
                if not self._stop.is_set():
                    new_future, at = self._submit(i)
                    pending[new_future] = at
                    i += 1

    def wait_for_answers(self, n: int, timeout: float = 30) -> None:
        start = len(self.results)
        wait_for(lambda: len(self.results) >= start + n, timeout, f"{n} more answers under load")


def run_cli(cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def served_versions(client, model: str = "digits") -> dict[str, list[int]]:
    return {a["id"]: sorted(m["version"] for m in a["models"] if m["name"] == model) for a in client.agents()}


def percentile(values, q):
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


@pytest.fixture
def three_agents(cluster):
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agents(3)
    cluster.wait_for_agents(3, model="digits")
    return cluster


def test_rollout_under_load_drops_nothing_then_bad_versions_change_nothing(
    three_agents, tmp_path, digits_v1_file, digits_v2_file
):
    cluster = three_agents
    client = cluster.client()
    with Load(client) as load:
        load.wait_for_answers(300)
        before = [lat for _, lat, _, _ in load.results]
        started = time.monotonic()
        out = run_cli(cluster, "deploy", str(digits_v2_file), "--name", "digits")
        rollout_seconds = time.monotonic() - started
        during = [lat for sent, lat, _, _ in load.results if sent >= started and sent <= started + rollout_seconds]
        assert out.returncode == 0, out.stdout + out.stderr
        assert "published digits version 2" in out.stdout and "done" in out.stdout, out.stdout
        wait_for(lambda: all(v == [2] for v in served_versions(client).values()), 10, "every agent to serve v2 only")
        load.wait_for_answers(300)
        versions_seen = [v for _, _, v, _ in load.results]

        # Version 3 with bad bytes: every agent fails to load it and keeps serving v2; v3 is taken off the share.
        bad = tmp_path / "bad.pt"
        bad.write_bytes(os.urandom(4096))
        out_bad = run_cli(cluster, "deploy", str(bad), "--name", "digits")
        rejected_left = (cluster.share / "models" / "digits" / "3").exists()
        # Then a good file whose bytes change after publishing (so v3 again): the sha256 check refuses it everywhere.
        v4 = publish_version(cluster.share, "digits", digits_v1_file)  # a copy: the session's file stays intact
        published = cluster.share / "models" / "digits" / str(v4) / "model.pt"
        data = bytearray(published.read_bytes())
        data[len(data) // 2] ^= 0xFF
        published.write_bytes(bytes(data))
        refused = ManagerClient(cluster.addresses.manager_queries).call("deploy", timeout=60, name="digits", version=v4)
        load.wait_for_answers(200)

    manager_seconds = re.search(r"done in ([\d.]+) s on 3 agents", out.stdout)
    print(
        f"\nrollout of digits v2 over 3 agents: {manager_seconds and manager_seconds.group(1)} s in the manager "
        f"(stage, warm up, switch), {rollout_seconds:.2f} s for the whole `cluster deploy` command; latency p50/p99 "
        f"before {percentile(before, 50):.1f}/{percentile(before, 99):.1f} ms, during {percentile(during, 50):.1f}/"
        f"{percentile(during, 99):.1f} ms ({len(during)} requests)"
    )
    assert not load.errors, f"{len(load.errors)} requests failed: {load.errors[:5]}"
    assert versions_seen[:100] == [1] * 100 and versions_seen[-100:] == [2] * 100, (
        "replies did not switch from v1 to v2"
    )
    assert out_bad.returncode == 1, out_bad.stdout + out_bad.stderr
    assert "FAILED" in out_bad.stdout and all(f"agent-{i}" in out_bad.stdout for i in (2, 3, 4)), out_bad.stdout
    assert "cannot load" in out_bad.stdout, out_bad.stdout
    assert "every agent keeps serving v2; v3 was taken off the share" in out_bad.stdout, out_bad.stdout
    assert not rejected_left, "the rejected version stayed on the share"
    assert not refused["ok"] and len(refused["agents"]) == 3, refused
    assert all("sha256 mismatch" in reason for reason in refused["agents"].values()), refused
    assert all(v == [2] for v in served_versions(client).values()), served_versions(client)
    result = client.infer("digits", {"image": np.zeros((1, 8, 8), np.float32)})
    assert result.version == 2


def test_late_agent_and_restarted_manager_follow_the_desired_state(three_agents, digits_v2_file):
    cluster = three_agents
    client = cluster.client()
    publish_version(cluster.share, "digits", digits_v2_file)  # v2 on the share
    manager = ManagerClient(cluster.addresses.manager_queries)
    assert manager.call("deploy", timeout=60, name="digits", version=2)["ok"]
    out = run_cli(cluster, "rollback", "digits")  # back to v1, while v2 stays the newest on the share
    assert out.returncode == 0 and "rollback of digits v1 done" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: all(v == [1] for v in served_versions(client).values()), 10, "every agent back on v1")

    # Restart the manager: it reads the desired state back from the share.
    cluster.kill(cluster.procs[0])
    cluster.start_manager()
    wait_for(lambda: len(cluster.manager_query("agents")) == 3, 10, "the new manager to see the agents")
    deployments = manager.call("deployments")
    assert deployments["digits"]["version"] == 1 and deployments["digits"]["history"][-1] == 2, deployments

    # A new agent loads the desired version (v1, not the share's newest v2) before it takes any request.
    late = cluster.start_agent("late-agent")
    first_sight = wait_for(
        lambda: next((a for a in client.agents() if a["id"] == "late-agent"), None), 60, "the late agent"
    )
    assert [(m["name"], m["version"]) for m in first_sight["models"] if m["name"] == "digits"] == [("digits", 1)], (
        first_sight
    )
    wait_for(
        lambda: "late-agent" in manager.call("deployments")["digits"]["agents"],
        5,
        "the manager's deployments to list the late agent among digits' agents",
    )
    out = run_cli(cluster, "models")
    assert out.returncode == 0 and "late-agent" in out.stdout, out.stdout + out.stderr
    assert late.alive()


def test_undeploy_and_deploy_a_new_model(three_agents, tmp_path, digits_v2_file):
    cluster = three_agents
    client = cluster.client()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**DIGITS_CONFIG, "name": "digits2"}))
    out = run_cli(cluster, "deploy", str(digits_v2_file), "--name", "digits2", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    result = client.infer("digits2", {"image": np.zeros((1, 8, 8), np.float32)})
    assert result.model == "digits2" and result.version == 1
    out = run_cli(cluster, "undeploy", "echo")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: "echo" not in client.models(), 10, "echo to be unloaded everywhere")
    # Undeployed on purpose: "not found" for requests and metadata alike (404 at the edge), not "no agent" (503).
    with pytest.raises(ModelNotFoundError, match="not deployed"):
        client.infer("echo", {"x": np.ones((1, 2), np.float32)})
    with pytest.raises(ModelNotFoundError, match="not deployed"):
        client.model_metadata("echo")
    out = run_cli(cluster, "deploy", str(tmp_path / "missing.pt"), "--name", "x")
    assert out.returncode == 2
    # A brand-new model whose first version no agent can load: no "previous version" to keep, nothing left behind.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(4096))
    config.write_text(json.dumps({**DIGITS_CONFIG, "name": "doomed"}))
    out = run_cli(cluster, "deploy", str(bad), "--name", "doomed", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "doomed stays undeployed (it had no earlier version); v1 was taken off the share" in out.stdout, out.stdout
    assert not (cluster.share / "models" / "doomed").exists()


def test_request_naming_a_version(three_agents):
    cluster = three_agents
    client = cluster.client()
    assert client.infer("digits", {"image": np.zeros((1, 8, 8), np.float32)}, version=1).version == 1
    # A version no agent serves, of a model that is served: MODEL_NOT_FOUND naming the model and the version.
    with pytest.raises(ModelNotFoundError, match=r"model 'digits' version 7 is not served by any live agent"):
        client.infer("digits", {"image": np.zeros((1, 8, 8), np.float32)}, version=7)


def test_a_heartbeat_from_nowhere_does_not_hold_a_rollout_up(cluster, digits_v2_file):
    """Fake heartbeats put a 'ghost' agent in the manager's registry that the broker never saw: a rollout waits only
    for the agents the broker routes to, finishes, and says it did not wait for the ghost."""
    import zmq

    from cluster.protocol import Command, Heartbeat, message

    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agents(2)
    cluster.wait_for_agents(2, model="digits")
    ghost = Heartbeat("ghost", 2, [{"name": "digits", "version": 1, "default": True}], pid=1, started=1.0)
    stop = threading.Event()

    def haunt():
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(cluster.addresses.manager_heartbeats)
        try:
            while not stop.wait(0.2):
                pub.send_multipart(message(Command.HEARTBEAT, ghost.to_wire()))
        finally:
            pub.close()

    haunting = threading.Thread(target=haunt, daemon=True)
    haunting.start()
    try:
        wait_for(lambda: any(a["id"] == "ghost" for a in cluster.manager_query("agents")), 10, "the ghost to be heard")
        # The broker reports the agents it routes to once a heartbeat interval: wait for a report that lists both
        # agents and came long enough after the ghost joined to judge it (a newcomer is waited for, not left out).
        wait_for(
            lambda: (
                {a["id"]: a.get("at_broker") for a in cluster.manager_query("agents")}
                == {"agent-2": True, "agent-3": True, "ghost": False}
            ),
            10,
            "the manager to see both agents at the broker, and the ghost not",
        )
        version = publish_version(cluster.share, "digits", digits_v2_file)
        started = time.monotonic()
        report = ManagerClient(cluster.addresses.manager_queries).call(
            "deploy", timeout=60, name="digits", version=version, rollout_timeout=40
        )
        took = time.monotonic() - started
    finally:
        stop.set()
        haunting.join(5)
    assert report["ok"] and len(report["agents"]) == 2 and "ghost" not in report["agents"], report
    assert report["left_out"] == {"ghost": "not connected to the broker"}, report
    assert took < 30, f"the rollout took {took:.1f} s: it waited for the ghost"
