"""`cluster health ROLE`: the exec probe of the Kubernetes manifests (deploy/kubernetes/). Exit 0 while the role
serves, 1 with one line saying why when it does not; run in-process through typer's CliRunner against a real
cluster (LocalCluster), with keys off and on."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from cluster.cli import _local_address, app
from tests.harness import LocalCluster

TIMEOUT = "1.5"


def health(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["health", *args, "--timeout", TIMEOUT], env={"CLUSTER_KEY": ""})
    return result.exit_code, result.output.strip()


def one_line(out: str) -> str:
    assert out and "\n" not in out, f"not one line: {out!r}"
    assert "Traceback" not in out
    return out


def test_local_address():
    assert _local_address("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert _local_address("tcp://*:5559") == "tcp://127.0.0.1:5559"
    assert _local_address("tcp://cluster-broker:5555") == "tcp://cluster-broker:5555"


def test_nothing_running_fails_with_one_line(tmp_path):
    from cluster.local import any_port_addresses

    dead = "tcp://127.0.0.1:1"  # nothing listens on port 1
    for args in (
        ["manager", "--manager", dead],
        ["broker", "--broker", dead],
        ["agent", "--broker", dead, "--id", "x"],
    ):
        code, out = health(*args)
        assert code == 1, out
        assert one_line(out).startswith(f"{args[0]} tcp://127.0.0.1:1: not serving"), out
    code, out = health("agent", "--broker", dead, "--id", "x", "--ok-if-broker-down")  # liveness: cannot tell
    assert code == 0 and "cannot tell" in one_line(out), out
    code, out = health("agent", "--broker", dead)  # no id: said, not guessed
    assert code == 1 and "--id" in one_line(out)
    code, out = health("edge", "--url", "http://127.0.0.1:1")
    assert code == 1 and one_line(out).startswith("edge http://127.0.0.1:1/v2/health/ready: not serving"), out
    assert any_port_addresses()  # (the harness is importable: the cluster tests below use it)


@pytest.mark.cluster
def test_health_of_every_role_then_each_down(demo_share, tmp_path):
    share = tmp_path / "share"
    shutil.copytree(demo_share, share)
    with LocalCluster(share, tmp_path / "logs") as cluster:
        manager = cluster.start_manager()
        broker = cluster.start_broker()
        cluster.start_agent("pod-a")
        cluster.wait_for_agents(1, model="echo")
        edge = cluster.start_edge("--log-level", "warning")
        a = cluster.addresses
        for args, starts in (
            (["manager", "--manager", a.manager_queries], "manager "),
            (["broker", "--broker", a.broker_clients], "broker "),
            (["agent", "--broker", a.broker_clients, "--id", "pod-a"], "agent pod-a: registered"),
            (["edge", "--url", edge.url], "edge "),
        ):
            code, out = health(*args)
            assert code == 0, out
            assert one_line(out).startswith(starts), out
        code, out = health("agent", "--broker", a.broker_clients, "--id", "pod-b")
        assert code == 1 and "agent pod-b: not registered" in one_line(out), out
        code, out = health("agent", "--broker", a.broker_clients, "--id", "pod-b", "--ok-if-broker-down")
        assert code == 1 and "agent pod-b: not registered" in one_line(out), out  # the broker answered: it can tell
        code, out = health("agent", "--broker", a.broker_clients.replace("127.0.0.1", "0.0.0.0"), "--id", "pod-a")
        assert code == 0, out  # a bind address (0.0.0.0) in the pod's environment means this machine

        cluster.stop(edge)
        code, out = health("edge", "--url", edge.url)
        assert code == 1 and "not serving" in one_line(out), out
        cluster.stop(broker)
        for args in (
            ["broker", "--broker", a.broker_clients],
            ["agent", "--broker", a.broker_clients, "--id", "pod-a"],
        ):
            code, out = health(*args)
            assert code == 1 and "not serving" in one_line(out), out
        cluster.stop(manager)
        code, out = health("manager", "--manager", a.manager_queries)
        assert code == 1 and "not serving" in one_line(out), out


@pytest.mark.cluster
def test_health_with_keys(demo_share, tmp_path):
    """The keys the manifests give the probes: the manager's own server key; a client key (probe.key) for the broker
    and agent checks. The agent's own key cannot ask the broker: refused, in one line."""
    from cluster.keys import add

    share = tmp_path / "share"
    shutil.copytree(demo_share, share)
    keys = tmp_path / "keys"
    with LocalCluster(share, tmp_path / "logs", keys=keys) as cluster:
        add(keys, "probe", "client")
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agent("pod-a")
        cluster.wait_for_agents(1, model="echo")
        a = cluster.addresses
        code, out = health("manager", "--manager", a.manager_queries, "--key", str(keys / "server.key"))
        assert code == 0, out
        probe = str(keys / "probe.key")
        code, out = health("broker", "--broker", a.broker_clients, "--key", probe)
        assert code == 0, out
        code, out = health("agent", "--broker", a.broker_clients, "--id", "pod-a", "--key", probe)
        assert code == 0, out
        code, out = health("broker", "--broker", a.broker_clients)  # no key: the broker does not answer the clear
        assert code == 1 and "not serving" in one_line(out), out
        code, out = health("agent", "--broker", a.broker_clients, "--id", "pod-a", "--key", str(keys / "pod-a.key"))
        assert code == 1 and "not serving" in one_line(out), out
