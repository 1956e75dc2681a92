"""Unit tests of the sans-IO parts: routing policies, the manager's registry, desired state, the agent's model table,
protocol validation and error mapping."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cluster import errors, protocol
from cluster.agent.models import ModelTable
from cluster.broker.routing import LeastOutstanding, RoundRobin, make_policy
from cluster.desired import Canary, DesiredState, ModelDeployment
from cluster.manager.deployments import Rollout
from cluster.manager.registry import Registry
from cluster.protocol import ErrorCode, Heartbeat, ProtocolError


@dataclass(eq=False)
class FakeAgent:
    name: str
    in_flight_count: int = 0
    capacity: int = 2

    def has_room(self, model: str) -> bool:
        return self.in_flight_count < self.capacity


def test_round_robin_takes_turns_and_skips_full_agents():
    agents = [FakeAgent("a"), FakeAgent("b"), FakeAgent("c")]
    policy = RoundRobin()
    assert [policy.choose("m", agents).name for _ in range(6)] == list("abcabc")
    agents[1].in_flight_count = 2  # full
    assert [policy.choose("m", agents).name for _ in range(4)] == list("acac")
    for agent in agents:
        agent.in_flight_count = 2
    assert policy.choose("m", agents) is None
    assert policy.choose("m", []) is None


def test_least_outstanding_prefers_the_idlest_agent():
    agents = [FakeAgent("a", 1), FakeAgent("b", 0), FakeAgent("c", 2, capacity=8)]
    assert LeastOutstanding().choose("m", agents).name == "b"
    agents[1].in_flight_count = 2
    agents[1].capacity = 2
    assert LeastOutstanding().choose("m", agents).name == "a"
    with pytest.raises(ValueError, match="least-outstanding"):
        make_policy("random")


def test_registry_joins_keeps_alive_and_expires():
    registry = Registry(expiry=3.0)
    beat = Heartbeat("a1", 4, [{"name": "m", "version": 1}])
    assert registry.observe(beat, now=0.0)[0]["event"] == "agent_joined"
    assert registry.observe(beat, now=2.5) == []
    assert registry.expire(now=5.0) == []
    dead = registry.expire(now=5.6)
    assert [e["agent"] for e in dead] == ["a1"] and dead[0]["event"] == "agent_dead"
    assert registry.describe_models() == {}


def test_heartbeat_round_trip_and_checks():
    beat = Heartbeat(
        "a1",
        4,
        [{"name": "m", "version": 1, "default": True}],
        staged=[{"name": "m", "version": 2}],
        host="h",
        pid=7,
        draining=True,
        serves_only=["m"],
    )
    assert Heartbeat.from_wire(protocol.unpack_header(protocol.pack(beat.to_wire()))) == beat
    assert beat.served_versions() == {"m": {1}} and beat.takes_part_in("m") and not beat.takes_part_in("other")
    # What routing and rollouts rely on must be well-formed; informational fields of the wrong type fall back.
    for bad, message in (
        ({"capacity": 1, "models": []}, "missing 'agent'"),
        ({"agent": "a", "capacity": "4", "models": []}, "'capacity' has the wrong type"),
        ({"agent": "a", "capacity": 1, "models": [{"name": "m"}]}, "missing 'version'"),
        ({"agent": "a", "capacity": 1, "models": [], "failed": [3]}, "each of 'failed' must be a map"),
    ):
        with pytest.raises(ProtocolError, match=message):
            Heartbeat.from_wire(bad)
    lax = Heartbeat.from_wire({"agent": "a", "capacity": 1, "models": [], "pid": "x", "draining": 1, "uptime": 2})
    assert (lax.pid, lax.draining, lax.uptime) == (None, False, 2)


def test_agents_and_models_views():
    a = Heartbeat("a", 4, [{"name": "m", "version": 2}, {"name": "n", "version": 1}])
    b = Heartbeat("b", 4, [{"name": "m", "version": 1}])
    view = protocol.agent_view(a, heartbeat_age=0.12345, joined=5.0, broker_in_flight=3)
    assert (view["id"], view["heartbeat_age"], view["joined"], view["broker_in_flight"]) == ("a", 0.123, 5.0, 3)
    assert view["models"] == a.models and view["capacity"] == 4
    assert protocol.models_view([("a", a.served_versions()), ("b", b.served_versions())]) == {
        "m": {"versions": [1, 2], "agents": ["a", "b"]},
        "n": {"versions": [1], "agents": ["a"]},
    }


def test_desired_state_round_trip_and_validation(tmp_path):
    state = DesiredState({"m": ModelDeployment(2, staged=3, history=[1])}, generation=4)
    state.save(tmp_path)
    assert DesiredState.load(tmp_path).to_wire() == state.to_wire()
    for bad in (
        {},
        {"models": {"m": {"version": "2"}}},
        {"models": {"m": {"version": 0}}},
        {"models": [], "generation": 1},
    ):
        with pytest.raises(ValueError):
            DesiredState.from_wire(bad)


def test_model_table_never_leaves_a_gap():
    table = ModelTable()
    desired = DesiredState({"m": ModelDeployment(1)})
    assert table.plan(desired, set()) == [("m", 1)]
    table.add_loaded("m", 1, "v1")
    table.converge(desired)
    assert table.lookup("m", None) == "v1"
    # Stage v2: v1 keeps serving, v2 is loaded but not served.
    desired = DesiredState({"m": ModelDeployment(1, staged=2)})
    assert table.plan(desired, set()) == [("m", 2)]
    table.add_loaded("m", 2, "v2")
    table.converge(desired)
    assert table.lookup("m", None) == "v1" and table.lookup("m", 2) is None
    assert table.describe()["staged"] == [{"name": "m", "version": 2}]
    # Switch: v2 serves, v1 is dropped.
    desired = DesiredState({"m": ModelDeployment(2)})
    table.converge(desired)
    assert table.lookup("m", None) == "v2" and table.lookup("m", 1) is None
    # Desired v3 fails to load: v2 keeps serving.
    desired = DesiredState({"m": ModelDeployment(3)})
    table.add_failed("m", 3, "corrupt")
    table.converge(desired)
    assert table.lookup("m", None) == "v2"
    assert table.describe()["failed"] == [{"name": "m", "version": 3, "error": "corrupt"}]
    assert table.plan(desired, set()) == []  # not retried in a loop
    # Undeploy.
    table.converge(DesiredState({}))
    assert table.lookup("m", None) is None and table.describe() == {"models": [], "staged": [], "failed": []}


def test_model_table_serves_a_canary_beside_the_default_and_loads_each_version_once():
    table = ModelTable()
    shadow_of_stable = DesiredState({"m": ModelDeployment(1, canary=Canary(1, [10], "id", shadow_only=True))})
    assert table.plan(shadow_of_stable, set()) == [("m", 1)], "the stable version mirrored to itself: loaded once"
    table.add_loaded("m", 1, "v1")
    table.converge(shadow_of_stable)
    desired = DesiredState({"m": ModelDeployment(1, canary=Canary(2, [10, 100], "id2"))})
    assert table.plan(desired, set()) == [("m", 2)]
    table.add_loaded("m", 2, "v2")
    table.converge(desired)
    assert (table.lookup("m", None), table.lookup("m", 2)) == ("v1", "v2"), "served beside, never the default"
    table.converge(DesiredState({"m": ModelDeployment(1)}))  # rolled back
    assert table.lookup("m", 2) is None and table.lookup("m", None) == "v1"


def test_rollout_collects_outcomes():
    rollout = Rollout("m", 2, 1, {"a", "b"}, deadline=10.0)
    rollout.observe("a", Heartbeat("a", 4, [], staged=[{"name": "m", "version": 2}]))
    assert not rollout.complete()
    rollout.observe("b", Heartbeat("b", 4, [], failed=[{"name": "m", "version": 2, "error": "sha256 mismatch"}]))
    assert rollout.complete() and rollout.failures() == {"b": "sha256 mismatch"}
    rollout.agent_lost("b")
    assert rollout.complete() and not rollout.failures()


@pytest.mark.parametrize(
    "metas, frames, message",
    [
        ({}, [], "must be a list"),
        ([{"name": "x", "datatype": "FP32", "shape": [2]}], [], "1 inputs described but 0"),
        ([{"name": "x", "datatype": "FP99", "shape": [2]}], [b"\0" * 8], "unsupported datatype"),
        ([{"name": "x", "datatype": "FP32", "shape": [3]}], [b"\0" * 8], "needs 12 bytes, frame has 8"),
        ([{"name": "x", "datatype": "FP32", "shape": [-1]}], [b""], "non-negative"),
        ([{"name": "", "datatype": "FP32", "shape": [0]}], [b""], "no valid name"),
        ([{"name": "x", "datatype": "FP32", "shape": [0]}] * 2, [b"", b""], "appears twice"),
    ],
)
def test_tensor_validation_names_the_problem(metas, frames, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.validate_tensor_metas(metas, frames)


def test_preamble_and_header_checks():
    assert protocol.parse_preamble(protocol.PREAMBLE[protocol.Command.REPLY]) == protocol.Command.REPLY
    for frame, message in (
        (b"MSB2\x02", "unsupported protocol version"),
        (b"MSB1\x7f", "unknown command"),
        (b"HTTP", "not a bus message"),
    ):
        with pytest.raises(ProtocolError, match=message):
            protocol.parse_preamble(frame)
    for raw in (b"\xc1", b"\x92\x01\x02", b"\x81\x01\x02"):
        with pytest.raises(ProtocolError):
            protocol.unpack_header(raw)


def test_the_route_rides_in_the_preamble_frame_of_broker_agent_messages():
    Command = protocol.Command
    key = b"k" * protocol.ROUTE_BYTES
    frames = protocol.routed(Command.REPLY, key, {"id": 1}, [b"t"])
    assert len(frames) == 3 and frames[0] == protocol.PREAMBLE[Command.REPLY] + key
    assert protocol.parse_routed(frames[0]) == (Command.REPLY, key)
    assert protocol.parse_routed(protocol.PREAMBLE[Command.HEARTBEAT]) == (Command.HEARTBEAT, b"")
    for frame, message in (
        (protocol.PREAMBLE[Command.READY] + key, "carries no route"),
        (b"MSB2\x02" + key, "unsupported protocol version"),
        (b"MSB1\x7f" + key, "unknown command"),
        (b"HTTP/1.1", "not a bus message"),
        (b"", "not a bus message"),
    ):
        with pytest.raises(ProtocolError, match=message):
            protocol.parse_routed(frame)


def test_every_error_code_has_its_exception():
    for code in ErrorCode:
        exc = errors.error_from_header({"code": code.value, "message": "m", "model": "x"})
        assert exc.code == code and exc.model == "x" and str(exc) == "m"
    assert isinstance(errors.error_from_header({"code": "TIMEOUT", "message": "t"}), TimeoutError)


def test_bad_input_log_is_rate_limited(monkeypatch, caplog):
    import logging

    from cluster import logs

    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    throttled = logs.BadInputLog(logging.getLogger("test.bad-input"), per_second=10)
    with caplog.at_level(logging.WARNING, logger="test.bad-input"):
        for i in range(25):
            throttled.warning("bad message %d", i)
        assert [r.getMessage() for r in caplog.records] == [f"bad message {i}" for i in range(10)]
        now[0] += 1.0
        throttled.warning("bad message %d", 25)
    assert caplog.records[-2].getMessage() == "(15 more bad messages in the last second were not logged)"
    assert caplog.records[-1].getMessage() == "bad message 25"
