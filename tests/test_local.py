"""cluster.local: the ready file, port-0 binding, stopping by pid in order, and one whole cluster on OS-picked ports.

The first tests run in-process or start tiny Python processes (fractions of a second); those marked `cluster` start
real roles."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from dataclasses import replace

import httpx
import numpy as np
import psutil
import pytest
import zmq

from cluster import Client
from cluster.config import Addresses
from cluster.local import (
    LocalCluster,
    StartError,
    any_port,
    any_port_addresses,
    is_any_port,
    read_ready_file,
    write_ready_file,
)
from cluster.sockets import bound_address, make_socket
from tests.harness import wait_for

# ---- in-process -----------------------------------------------------------------------------------------------------


def test_ready_file_is_written_whole_and_read_back(tmp_path):
    path = tmp_path / "broker.ready.json"
    assert read_ready_file(path) is None
    write_ready_file(path, "broker", {"broker_clients": "tcp://127.0.0.1:40001"})
    ready = read_ready_file(path)
    assert ready["role"] == "broker" and ready["addresses"] == {"broker_clients": "tcp://127.0.0.1:40001"}
    assert isinstance(ready["pid"], int) and ready["pid"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["broker.ready.json"], "the temporary file was left behind"
    write_ready_file(path, "broker", {"broker_clients": "tcp://127.0.0.1:40002"})  # a restart replaces it
    assert json.loads(path.read_text())["addresses"]["broker_clients"] == "tcp://127.0.0.1:40002"


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "tcp://127.0.0.1:*"])
def test_a_socket_bound_to_port_0_reports_the_port_it_got(address):
    ctx = zmq.Context()
    try:
        server = make_socket(ctx, zmq.ROUTER, bind=address)
        bound = bound_address(server)
        assert bound.startswith("tcp://127.0.0.1:") and not is_any_port(bound), bound
        client = make_socket(ctx, zmq.DEALER, connect=bound)
        client.send(b"hello")
        assert server.poll(5000), f"nothing arrived on {bound}"
        assert server.recv_multipart()[1] == b"hello"
        for sock in (client, server):
            sock.close(linger=0)
    finally:
        ctx.term()


def test_any_port_addresses():
    assert is_any_port("tcp://127.0.0.1:0") and is_any_port("tcp://*:*")
    assert not is_any_port("tcp://127.0.0.1:5555") and not is_any_port("ipc:///tmp/broker")
    assert any_port("tcp://10.0.0.1:5555") == "tcp://10.0.0.1:0" and any_port("ipc:///tmp/x") == "ipc:///tmp/x"
    assert all(is_any_port(a) for a in vars(any_port_addresses()).values())


def test_addresses_and_env_carry_what_the_roles_reported(tmp_path):
    local = LocalCluster("/share", tmp_path, heartbeat_interval=0.25, liveness=4, extra_env={"CLUSTER_CAPACITY": 2})
    assert local.env()["CLUSTER_BROKER_CLIENTS"] == "tcp://127.0.0.1:0"
    local.bound.update(broker_clients="tcp://127.0.0.1:40001", edge="http://127.0.0.1:40002")
    env = local.env(CLUSTER_CAPACITY=3)
    assert local.addresses.broker_clients == env["CLUSTER_BROKER_CLIENTS"] == "tcp://127.0.0.1:40001"
    assert env["CLUSTER_BROKER_AGENTS"] == "tcp://127.0.0.1:0" and local.edge_url == "http://127.0.0.1:40002"
    assert (env["CLUSTER_SHARE"], env["CLUSTER_HEARTBEAT_INTERVAL"], env["CLUSTER_LIVENESS"]) == ("/share", "0.25", "4")
    assert env["CLUSTER_CAPACITY"] == "3", "a start's own variables win over extra_env"
    quiet = LocalCluster(None, tmp_path, heartbeat_interval=None, liveness=None, reconnect=None, log_level=None)
    added = set(quiet.env()) - set(os.environ)
    assert not {"CLUSTER_SHARE", "CLUSTER_HEARTBEAT_INTERVAL", "CLUSTER_RECONNECT_MAX"} & added, added


# ---- stopping by pid, with small Python processes -------------------------------------------------------------------

# Appends its name to a file on SIGTERM and exits; with "stubborn", ignores SIGTERM.
CHILD = textwrap.dedent(
    """
    import signal, sys, time
    name, record, mode = sys.argv[1:4]
    def on_term(*_):
        with open(record, "a") as f:
            f.write(name + "\\n")
        if mode != "stubborn":
            sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("up", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def _child(local: LocalCluster, role: str, name: str, record, mode: str = "polite"):
    proc = local.spawn(name, [sys.executable, "-c", CHILD, name, str(record), mode], role=role)
    wait_for(lambda: "up" in proc.log(), 30, f"{name} to start")
    return proc


def test_stop_all_stops_front_to_back_by_pid(tmp_path):
    """The edge, then the agents (they drain through a live broker), then the broker and the manager."""
    record = tmp_path / "stopped.txt"
    local = LocalCluster(None, tmp_path)
    for role, name in [("manager", "m"), ("broker", "b"), ("agent", "a1"), ("agent", "a2"), ("edge", "e")]:
        _child(local, role, name, record)
    local.stop_all(timeout=10)
    order = record.read_text().split()
    assert order[0] == "e" and set(order[1:3]) == {"a1", "a2"} and set(order[3:]) == {"b", "m"}, order
    assert [p.returncode for p in local.procs] == [0] * 5
    assert local.exited() == [], "processes stopped on purpose are not reported as exited"


def test_a_process_that_ignores_sigterm_is_killed_after_the_deadline(tmp_path):
    local = LocalCluster(None, tmp_path)
    stubborn = _child(local, "agent", "stubborn", tmp_path / "stopped.txt", "stubborn")
    started = time.monotonic()
    assert local.stop(stubborn, timeout=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 5
    assert (tmp_path / "stopped.txt").read_text() == "stubborn\n", "it got SIGTERM first"


def test_exited_lists_processes_that_died_on_their_own(tmp_path):
    local = LocalCluster(None, tmp_path)
    crashing = local.spawn("crashing", [sys.executable, "-c", "import sys; sys.exit(7)"], role="broker")
    killed = _child(local, "agent", "killed", tmp_path / "stopped.txt")
    local.kill(killed)
    wait_for(lambda: local.exited() == [crashing], 30, "the crashed process to be reported")
    assert crashing.returncode == 7 and killed.returncode == -signal.SIGKILL
    local.stop_all()


# ---- real roles -----------------------------------------------------------------------------------------------------


def _addresses(**fixed: str) -> Addresses:
    """Port 0 everywhere but where `fixed` says."""
    return replace(any_port_addresses(), **fixed)


@pytest.fixture
def manager_events():
    """Stands in for the manager's event and heartbeat sockets (a broker subscribes to one and reports on the
    other), so that a broker can start without a manager: the addresses to give LocalCluster."""
    ctx = zmq.Context()
    events = make_socket(ctx, zmq.PUB, bind="tcp://127.0.0.1:0")
    beats = make_socket(ctx, zmq.SUB, bind="tcp://127.0.0.1:0")
    yield {"manager_events": bound_address(events), "manager_heartbeats": bound_address(beats)}
    for sock in (events, beats):
        sock.close(linger=0)
    ctx.term()


@pytest.mark.cluster
def test_a_restarted_broker_comes_back_on_the_ports_it_got(tmp_path, manager_events):
    with LocalCluster(None, tmp_path, addresses=_addresses(**manager_events)) as local:
        first = local.start_broker()
        assert set(first.addresses) == {"broker_clients", "broker_agents"}
        clients = first.addresses["broker_clients"]
        assert local.addresses.broker_clients == clients and not is_any_port(clients)
        ready = read_ready_file(tmp_path / f"{first.name}.ready.json")
        assert ready["pid"] == first.pid and ready["role"] == "broker"
        with Client(local.addresses.broker_clients) as client:
            assert client.agents(timeout=10) == []
            local.kill(first)
            second = local.start_broker()
            assert second.addresses == first.addresses
            assert client.agents(timeout=10) == [], "the client's socket reconnected to the restarted broker"


def _environ(proc) -> dict[str, str]:
    """A child's environment, as the kernel holds it (Linux)."""
    return psutil.Process(proc.pid).environ()


@pytest.mark.cluster
def test_several_brokers_each_on_its_own_ports_and_name_and_restarted_on_them(tmp_path, manager_events):
    """start_broker() while every broker runs adds one (its own ports, --name broker-<i>); the cluster's broker
    addresses list every broker in order, for roles started after; a broker killed and started again (start_broker(),
    or restart) binds its own ports again and keeps its name, and the others are untouched."""
    with LocalCluster(None, tmp_path, addresses=_addresses(**manager_events)) as local:
        first, second = local.start_broker(), local.start_broker()
        ports = [p.addresses for p in (first, second)]
        assert ports[0] != ports[1] and len({a for p in ports for a in p.values()}) == 4, ports
        assert [b.name for b in local.brokers] == ["broker-0", "broker-1"] and local.broker_procs == [first, second]
        for i, proc in enumerate((first, second)):
            env = _environ(proc)
            assert env["CLUSTER_BROKER_NAME"] == f"broker-{i}", "each broker names itself"
            assert env["CLUSTER_BROKER_CLIENTS"] == any_port(proc.addresses["broker_clients"]), "its own: port 0"
            assert env["CLUSTER_BROKER_AGENTS"] == any_port(proc.addresses["broker_agents"])
            own = local.broker_addresses(i)
            assert (own.broker_clients, own.broker_agents) == (
                proc.addresses["broker_clients"],
                proc.addresses["broker_agents"],
            )
        every = local.addresses
        assert every.broker_clients == ",".join(p["broker_clients"] for p in ports), every
        assert every.broker_agents == ",".join(p["broker_agents"] for p in ports), every
        env = local.env()  # what an agent, the edge or a client started now gets: every broker
        assert (env["CLUSTER_BROKER_CLIENTS"], env["CLUSTER_BROKER_AGENTS"]) == (
            every.broker_clients,
            every.broker_agents,
        )

        local.kill(second)
        again = local.start_broker()  # the broker that is down, not a third one
        assert again.addresses == second.addresses and len(local.brokers) == 2, local.brokers
        assert _environ(again)["CLUSTER_BROKER_NAME"] == "broker-1" and local.broker_procs == [first, again]
        assert _environ(again)["CLUSTER_BROKER_CLIENTS"] == second.addresses["broker_clients"], "the ports it got"
        assert first.alive() and local.addresses == every
        restarted = local.restart(first)
        assert restarted.addresses == first.addresses and _environ(restarted)["CLUSTER_BROKER_NAME"] == "broker-0"
        assert local.broker_procs == [restarted, again] and local.addresses == every
        third = local.start_broker()
        assert [b.name for b in local.brokers] == ["broker-0", "broker-1", "broker-2"]
        assert local.addresses.broker_clients == every.broker_clients + "," + third.addresses["broker_clients"]
        with Client(local.broker_addresses(2).broker_clients) as client:
            assert client.agents(timeout=10) == [], "broker-2 serves on the address it reported"


@pytest.mark.cluster
def test_one_broker_is_as_before_and_an_agent_first_reserves_it(tmp_path, manager_events):
    """One broker: plain addresses (no list), and an edge started before any broker reserves the broker's ports,
    which the broker's real start then binds."""
    with LocalCluster(None, tmp_path, addresses=_addresses(**manager_events)) as local:
        local.start_edge()  # starts the broker once to learn its addresses
        reserved = local.addresses
        assert len(local.brokers) == 1 and "," not in reserved.broker_clients + reserved.broker_agents
        broker = local.start_broker()
        assert local.addresses == reserved and len(local.brokers) == 1, local.brokers
        assert broker.addresses == {"broker_clients": reserved.broker_clients, "broker_agents": reserved.broker_agents}
        assert _environ(broker)["CLUSTER_BROKER_NAME"] == "broker-0"


@pytest.mark.cluster
def test_a_role_that_cannot_bind_fails_its_start_with_its_log(tmp_path, manager_events):
    ctx = zmq.Context()
    taken = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:0")
    try:
        addresses = _addresses(**manager_events, broker_clients=bound_address(taken))
        with LocalCluster(None, tmp_path, addresses=addresses) as local:
            before_ready = r"broker-0 \(pid \d+\) exited with status 1 before it was ready"
            with pytest.raises(StartError, match=before_ready) as failure:
                local.start_broker()
            assert "Address already in use" in str(failure.value), "the error carries the role's log"
    finally:
        taken.close(linger=0)
        ctx.term()


@pytest.mark.cluster
def test_a_whole_cluster_on_ports_the_os_picked_serves_bus_and_http(cluster):
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agent("agent-a", "--models", "echo")
    edge = cluster.start_edge()
    assert edge.url == cluster.edge_url and edge.port > 0
    for address in vars(cluster.addresses).values():
        assert not is_any_port(address), cluster.addresses
    cluster.wait_for_agents(1, model="echo")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    assert cluster.client(timeout=30).infer("echo", {"x": x}).as_numpy("y").tolist() == x.tolist()
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.5]}]}
    answer = httpx.post(f"{edge.url}/v2/models/echo/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [1.5, 2.5]
