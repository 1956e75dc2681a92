"""Brokers report to the manager on a PUB (issue 20): in-process first (the manager's `Brokers`: the union of the live
brokers' agents, sequence gaps, expiry; the real `Manager` taking reports on its heartbeat socket and answering
`brokers`; a `Broker` publishing numbered reports, at once when its agents change; its load and Prometheus metrics),
then on real processes (two brokers reporting, one killed, a rollout through both, /metrics over HTTP)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq
from prometheus_client import generate_latest
from typer.testing import CliRunner

from cluster import Client, protocol
from cluster.broker.broker import Broker
from cluster.broker.metrics import BrokerMetrics, broker_load, metrics_host_for
from cluster.cli import app
from cluster.config import Addresses, Timings
from cluster.manager.brokers import Brokers
from cluster.manager.manager import Manager
from cluster.protocol import BrokerReport, Command, message
from cluster.role_settings import BrokerSettings, ManagerSettings
from tests.harness import wait_for
from tests.models import publish_slow, slow_rounds_per_second
from tests.test_broker_logic import dispatcher, ready, request
from tests.test_routes import slow_inputs

_ids = itertools.count()


def report(broker: str, seq: int, agents=(), incarnation: str = "aa", load: dict | None = None) -> BrokerReport:
    return BrokerReport(broker, incarnation, seq, list(agents), load or {})


# ---- the manager's view of the brokers, sans-IO --------------------------------------------------------------------


def test_the_view_is_the_union_of_live_brokers_and_a_silent_one_leaves_it():
    brokers = Brokers(expiry=3.0)
    assert brokers.view() is None, "no broker reports: no view (rollouts wait for every agent heard)"
    assert brokers.observe(report("b1", 1, ["a1", "a2"]), now=0.0, wall=100.0)
    assert brokers.observe(report("b2", 1, ["a2", "a3"]), now=1.0, wall=101.0)
    assert brokers.view() == {"a1", "a2", "a3"}
    assert brokers.oldest_report() == 100.0
    assert not brokers.observe(report("b1", 2, ["a1", "a2"]), now=2.5, wall=102.5), "same agents: no change"
    assert brokers.oldest_report() == 101.0
    assert brokers.expire(now=4.1) == ["b2"], "b2 silent for 3.1 s"
    assert brokers.view() == {"a1", "a2"}
    assert [b["name"] for b in brokers.describe(4.1)] == ["b1"]
    assert brokers.expire(now=5.6) == ["b1"] and brokers.view() is None


def test_gaps_in_seq_are_counted_duplicates_ignored_and_a_restart_starts_over():
    brokers = Brokers(expiry=3.0)
    brokers.observe(report("b1", 5, ["a1"]), now=0.0, wall=0.0)  # the first ones lost while joining: no gap
    brokers.observe(report("b1", 6, ["a1"]), now=1.0, wall=1.0)
    brokers.observe(report("b1", 9, ["a1", "a2"]), now=2.0, wall=2.0)  # 7 and 8 dropped at the high-water mark
    assert not brokers.observe(report("b1", 9, ["a9"]), now=2.1, wall=2.1), "a duplicate changes nothing"
    assert not brokers.observe(report("b1", 4, ["a9"]), now=2.2, wall=2.2), "an older one neither"
    [entry] = brokers.describe(now=2.5)
    assert entry == {
        "name": "b1",
        "incarnation": "aa",
        "seq": 9,
        "gaps": 2,
        "heard_age": 0.5,
        "agents": ["a1", "a2"],
        "load": {},
    }
    brokers.observe(report("b1", 1, ["a3"], incarnation="bb"), now=3.0, wall=3.0)  # restarted: seq from 1
    [entry] = brokers.describe(now=3.0)
    assert (entry["incarnation"], entry["seq"], entry["gaps"], entry["agents"]) == ("bb", 1, 0, ["a3"])
    brokers.paused(lost=10.0, now=13.5)  # the manager stalled 10 s: that is no broker's silence
    assert brokers.expire(now=13.5) == []


def test_two_brokers_with_one_name_are_told_apart_from_a_restart(caplog):
    brokers = Brokers(expiry=3.0)
    brokers.observe(report("twin", 1, ["a1"], incarnation="aa"), now=0.0, wall=0.0)
    brokers.observe(report("twin", 1, ["a2"], incarnation="bb"), now=0.1, wall=0.1)  # a restart, as far as we know
    assert "two brokers report under the name twin" not in caplog.text
    brokers.observe(report("twin", 2, ["a1"], incarnation="aa"), now=0.2, wall=0.2)  # the old one again: two
    assert "two brokers report under the name twin" in caplog.text


# ---- the real manager, in-process ----------------------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path):
    n = next(_ids)
    fields = ("broker_clients", "broker_agents", "manager_events", "manager_heartbeats", "manager_queries")
    manager = Manager(
        ManagerSettings(
            share=str(tmp_path),
            addresses=Addresses(**{f: f"inproc://reports-{n}-{f}" for f in fields}),
            timings=Timings(heartbeat_interval=0.5, liveness=3),
        )
    )
    manager.sent = []
    manager.answer = lambda peer, reply: manager.sent.append(
        (protocol.parse_preamble(reply[0]), protocol.unpack_header(reply[1]))
    )
    manager.publish = lambda event: None
    yield manager
    manager.close()


def ask(manager: Manager, what: str) -> tuple[Command, dict]:
    manager.process_query([b"peer", *protocol.message(Command.QUERY, {"id": 7, "what": what})])
    return manager.sent[-1]


def test_the_manager_takes_reports_on_its_heartbeat_socket_and_answers_brokers(manager):
    load = {"agents": 1, "in_flight": 3, "queued": 2}
    manager.process_heartbeat(message(Command.EVENT, report("b1", 1, ["a1"], load=load).to_wire()))
    manager.process_heartbeat(message(Command.EVENT, report("b2", 1, ["a2"]).to_wire()))
    manager.process_heartbeat(message(Command.EVENT, report("b2", 3, ["a2", "a3"]).to_wire()))
    assert manager.deployments.broker_view == {"a1", "a2", "a3"}
    cmd, answer = ask(manager, "brokers")
    assert cmd == Command.REPLY, answer
    listed = {b["name"]: b for b in answer["result"]}
    assert sorted(listed) == ["b1", "b2"]
    assert listed["b1"]["load"] == load and listed["b1"]["agents"] == ["a1"]
    assert (listed["b2"]["seq"], listed["b2"]["gaps"], listed["b2"]["agents"]) == (3, 1, ["a2", "a3"])
    assert all(0 <= b["heard_age"] < 5 for b in listed.values())

    manager.expire_brokers(time.monotonic() + 1.6)  # expiry: 0.5 s x 3
    assert manager.deployments.broker_view is None and ask(manager, "brokers")[1]["result"] == []


def test_a_malformed_report_is_dropped_and_the_old_broker_view_query_is_gone(manager, caplog):
    manager.process_heartbeat(message(Command.EVENT, {"event": "broker_report", "broker": "b1", "seq": "x"}))
    assert "bad heartbeat dropped" in caplog.text and manager.brokers.brokers == {}
    cmd, answer = ask(manager, "broker_view")
    assert cmd == Command.ERROR and "unknown query 'broker_view'" in answer["message"], answer


def test_keys_on_only_the_server_key_may_report(manager, monkeypatch):
    class Allow:
        roles = {"server-key": "server", "agent-key": "agent"}

        def name_of(self, key):
            return key

        def refresh(self, now=None):
            pass

    manager.allow = Allow()
    sender = {"key": "agent-key"}
    monkeypatch.setattr("cluster.manager.manager.key_of", lambda frame: sender["key"])
    manager.process_heartbeat(message(Command.EVENT, report("rogue", 1, ["ghost"]).to_wire()))
    assert manager.deployments.broker_view is None, "an agent's key may not speak for a broker"
    sender["key"] = "server-key"
    manager.process_heartbeat(message(Command.EVENT, report("b1", 1, ["a1"]).to_wire()))
    assert manager.deployments.broker_view == {"a1"}


# ---- the broker: its reports, its load, its metrics ----------------------------------------------------------------


def test_broker_load_and_the_metrics_collector():
    d = dispatcher()
    ready(d, "a1", models=(("m", 1), ("n", 1)), capacity=2, model_capacity={"n": 1})
    ready(d, "a2", models=(("m", 1),), capacity=3)
    for rid in range(7):  # 5 slots for m: 5 at agents, 2 queued
        request(d, rid)
    load = broker_load(d)
    assert load == {
        "agents": 2,
        "in_flight": 5,
        "queued": 2,
        "capacity": {"m": 5, "n": 1},
        "queued_by_model": {"m": 2},
        "in_flight_by_model": {"m": 5},
        "requests": 7,
        "redispatched": 0,
        "busy": 0,
    }
    metrics = BrokerMetrics("b1")
    text = generate_latest(metrics.registry).decode()
    assert 'cluster_broker_agents{broker="b1"} 0.0' in text, "before the first snapshot: zeros, no error"
    metrics.publish(load)
    text = generate_latest(metrics.registry).decode()
    for line in (
        'cluster_broker_queue_depth{broker="b1",model="m"} 2.0',
        'cluster_broker_in_flight{broker="b1",model="m"} 5.0',
        'cluster_broker_capacity{broker="b1",model="m"} 5.0',
        'cluster_broker_capacity{broker="b1",model="n"} 1.0',
        'cluster_broker_agents{broker="b1"} 2.0',
        'cluster_broker_requests_total{broker="b1"} 7.0',
        'cluster_broker_redispatched_total{broker="b1"} 0.0',
        'cluster_broker_busy_total{broker="b1"} 0.0',
        "# TYPE cluster_broker_requests_total counter",
    ):
        assert line in text, f"{line!r} not in\n{text}"


@pytest.mark.parametrize(
    ("clients", "host"),
    [
        ("tcp://127.0.0.1:5555", "127.0.0.1"),
        ("tcp://0.0.0.0:5555", "0.0.0.0"),  # a broker in a pod: scraped from outside it
        ("tcp://*:5555", "0.0.0.0"),
        ("tcp://[::1]:5555", "::1"),
        ("tcp://eth0:5555", "127.0.0.1"),  # an interface name: loopback unless --metrics-host says
        ("inproc://broker", "127.0.0.1"),
    ],
)
def test_the_metrics_listen_where_the_clients_do_unless_told(clients, host):
    assert metrics_host_for(clients) == host


@pytest.fixture
def broker_and_manager_socket():
    """A Broker (inproc, metrics on any free port) and a SUB bound where the manager's heartbeats are."""
    n = next(_ids)
    ctx = zmq.Context()
    addresses = Addresses(**{f: f"inproc://broker-{n}-{f}" for f in Addresses.__dataclass_fields__})
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(addresses.manager_heartbeats)
    broker = Broker(BrokerSettings(addresses=addresses, broker_name="b-test", metrics_port=-1), ctx=ctx)
    yield broker, sub
    sub.close(0)
    broker.close()
    ctx.term()


def next_report(broker: Broker, sub: zmq.Socket, send: bool = True) -> BrokerReport:
    """The next report the manager's socket gets; `send`: ask the broker for one first (again, while the PUB's
    subscription is still on its way: a PUB drops what it sends before that)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if send:
            broker.report_to_manager()
        if sub.poll(100):
            frames = sub.recv_multipart()
            assert protocol.parse_preamble(frames[0]) == Command.EVENT
            return protocol.parse_event(protocol.unpack_header(frames[1]))
    raise AssertionError("no report reached the manager's socket within 5 s")


def test_a_broker_reports_on_its_pub_numbered_and_at_once_when_its_agents_change(broker_and_manager_socket):
    broker, sub = broker_and_manager_socket
    first = next_report(broker, sub)
    assert (first.broker, first.incarnation, first.agents) == ("b-test", broker.dispatcher.incarnation.hex(), [])
    second = next_report(broker, sub)
    assert second.seq == first.seq + 1
    assert not broker.report_if_agents_changed(), "nothing changed: no report before the interval"
    ready(broker.dispatcher, "a1", now=time.monotonic())
    assert broker.report_if_agents_changed()
    changed = next_report(broker, sub, send=False)
    assert changed.agents == ["a1"] and changed.seq == second.seq + 1
    assert changed.load["agents"] == 1 and changed.load["capacity"] == {"m": 2}

    broker.metrics.publish(broker_load(broker.dispatcher))  # what the loop does each tick
    with urllib.request.urlopen(broker.metrics_url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    assert 'cluster_broker_agents{broker="b-test"} 1.0' in text, text


def test_a_broker_on_any_port_has_one_name_for_its_agents_router_and_its_reports():
    """Port 0 without --name: the name its agents' ROUTER gives itself (set before the bind) is the one its reports
    and metrics carry, and two such brokers on one host are not given the same ("host:0")."""
    ctx = zmq.Context()
    brokers = []
    try:
        for _ in range(2):
            addresses = Addresses(broker_clients="tcp://127.0.0.1:0", broker_agents="tcp://127.0.0.1:0")
            brokers.append(Broker(BrokerSettings(addresses=addresses), ctx=ctx))
        for broker in brokers:
            identity = broker.agents_sock.getsockopt(zmq.ROUTING_ID)
            assert identity == broker.name.encode(), f"agents see {identity!r}, reports say {broker.name!r}"
            assert broker.metrics.broker == broker.name
        assert brokers[0].name != brokers[1].name, "two brokers on any port got one name"
    finally:
        for broker in brokers:
            broker.close()
        ctx.term()


# ---- real processes ------------------------------------------------------------------------------------------------


def brokers_answer(cluster) -> dict[str, dict]:
    return {b["name"]: b for b in cluster.manager_query("brokers")}


def start_second_broker(cluster, *args: str, name: str = "b2"):
    """A second broker process on ports of its own (the cluster's addresses keep naming the first)."""
    first = dict(cluster.bound)
    proc = cluster.start(
        "broker", "--clients", "tcp://127.0.0.1:0", "--agents", "tcp://127.0.0.1:0", "--name", name, *args,
        name=f"broker-{name}",
    )  # fmt: skip
    cluster.bound.clear()
    cluster.bound.update(first)
    return proc


def metric(url: str, line_start: str) -> float | None:
    """The value of the sample whose line starts with `line_start` on the /metrics page at `url`."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line_start)), None)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_two_brokers_report_the_manager_lists_both_and_forgets_a_killed_one(cluster):
    publish_slow(cluster.share)
    cluster.start_manager()
    cluster.start_broker("--name", "b1")
    b2 = start_second_broker(cluster, "--metrics-port", "-1")
    first_agents = cluster.addresses.broker_agents
    cluster.start_agent("agent-1")
    cluster.start_agent(
        "agent-2", "--models", "slow", "--capacity", "1", CLUSTER_BROKER_AGENTS=b2.addresses["broker_agents"]
    )

    def both_listed():
        found = brokers_answer(cluster)
        agents = {name: b["agents"] for name, b in found.items()}
        return found if agents == {"b1": ["agent-1"], "b2": ["agent-2"]} else None

    found = wait_for(both_listed, 60, "the manager to list b1 with agent-1 and b2 with agent-2")
    assert found["b2"]["load"]["agents"] == 1 and found["b2"]["load"]["capacity"] == {"slow": 1}, found
    assert all(b["incarnation"] and b["seq"] >= 1 for b in found.values()), found
    at_broker = {a["id"]: a["at_broker"] for a in cluster.manager_query("agents")}
    assert at_broker == {"agent-1": True, "agent-2": True}, at_broker
    assert first_agents == cluster.addresses.broker_agents, "the cluster's addresses still name the first broker"

    # b2's queue depth on its own /metrics: slow requests past its agent's one slot wait in b2's queue
    url = b2.addresses["metrics"]
    assert metric(url, 'cluster_broker_agents{broker="b2"}') == 1.0
    rounds = int(slow_rounds_per_second() * 0.3)  # about 0.3 s each on an idle machine
    with Client(b2.addresses["broker_clients"], timeout=60) as client:
        calls = [client.submit("slow", slow_inputs(float(i), rounds), timeout=60) for i in range(4)]
        depth = wait_for(
            lambda: metric(url, 'cluster_broker_queue_depth{broker="b2",model="slow"}'),
            20,
            "b2's /metrics to show requests queued for slow",
        )
        assert 1 <= depth <= 3, depth
        for i, call in enumerate(calls):
            assert call.result(timeout=60).as_numpy("y").tolist() == [[float(i)]]
    assert metric(url, 'cluster_broker_requests_total{broker="b2"}') == 4.0

    killed = time.monotonic()
    cluster.kill(b2)
    wait_for(lambda: sorted(brokers_answer(cluster)) == ["b1"], 10, "the killed broker to leave the answer")
    gone_after = time.monotonic() - killed
    expiry = cluster.heartbeat_interval * cluster.liveness
    print(f"b2 left the manager's brokers answer {gone_after:.2f} s after its kill (expiry {expiry:g} s)")
    assert gone_after < expiry + 2.0, f"b2 left the answer {gone_after:.2f} s after its kill (expiry {expiry:g} s)"
    at_broker = {a["id"]: a["at_broker"] for a in cluster.manager_query("agents")}
    assert at_broker["agent-1"] is True and at_broker.get("agent-2") in (False, None), at_broker


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_rollout_through_two_brokers_waits_for_the_agents_of_both(cluster, digits_v2_file):
    """Each broker routes to one of the two agents: the manager's view is the union, so a deploy waits for both and
    leaves none out (one broker's report no longer replaces the other's)."""
    cluster.start_manager()
    cluster.start_broker("--name", "b1")
    b2 = start_second_broker(cluster)
    cluster.start_agent("agent-1")
    cluster.start_agent("agent-2", CLUSTER_BROKER_AGENTS=b2.addresses["broker_agents"])
    wait_for(
        lambda: (
            {b["name"]: b["agents"] for b in cluster.manager_query("brokers")} == {"b1": ["agent-1"], "b2": ["agent-2"]}
        ),
        60,
        "both brokers to report their agent",
    )
    # `cluster status` shows each broker with its agents and load, from the manager's `brokers` answer
    status = CliRunner().invoke(
        app,
        ["status", "--broker", cluster.addresses.broker_clients, "--manager", cluster.addresses.manager_queries],
        env={"COLUMNS": "200"},
    )
    assert status.exit_code == 0, status.output
    rows = {}
    for line in status.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 5 and cells[1] in ("b1", "b2"):
            rows[cells[1]] = cells[2:5]
    assert rows == {"b1": ["1: agent-1", "0", "0"], "b2": ["1: agent-2", "0", "0"]}, status.stdout
    assert "Brokers (2)" in status.stdout and "in flight" in status.stdout and "queued" in status.stdout

    deploy = subprocess.run(
        [sys.executable, "-m", "cluster", "deploy", str(digits_v2_file), "--name", "digits", "--timeout", "90"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "agent-1" in deploy.stdout and "agent-2" in deploy.stdout, deploy.stdout
    assert "not waited for" not in deploy.stdout, deploy.stdout  # each broker's agent is in the manager's view
    version = cluster.manager_query("deployments")["digits"]["version"]
    assert version == 2, deploy.stdout
    served = {a["id"]: a["models"] for a in cluster.manager_query("agents")}
    for agent in ("agent-1", "agent-2"):
        assert ("digits", 2) in [(m["name"], m["version"]) for m in served[agent]], served


@pytest.mark.cluster
def test_keys_on_the_brokers_report_reaches_the_manager(share, tmp_path):
    """With CURVE, the broker's PUB (server key) may connect to the manager's heartbeat socket (ZAP domain
    "heartbeats": agents and the server) and its reports are taken: the manager lists it with its agent."""
    from cluster.local import LocalCluster

    with LocalCluster(share, tmp_path / "logs", keys=tmp_path / "keys") as cluster:
        try:
            cluster.start_manager()
            cluster.start_broker("--name", "secure-broker")
            cluster.start_agent("agent-k")
            listed = wait_for(
                lambda: [b for b in cluster.manager_query("brokers") if b["agents"] == ["agent-k"]],
                60,
                "the manager to list the broker with agent-k",
            )
            assert listed[0]["name"] == "secure-broker", listed
        except BaseException:
            print(cluster.logs())
            raise
