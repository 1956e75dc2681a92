"""Placement (issue 22, item 4), in-process: placement.py's plan (budgets, least loaded first, sticky, re-placed on a
death, the refusal's message), the manager's Deployments placing real versions on a tmp share (deploy refused when it
cannot fit, a dead agent's copies re-placed, rollouts waiting only on the agents a model is placed on, the desired
state's wire form), the agent's view of it, and the sizes an agent's --memory-budget takes. No sockets."""

from __future__ import annotations

import pytest
import torch

from cluster.agent.memory import measure_memory, memory_budget
from cluster.desired import DesiredState, ModelDeployment
from cluster.manager.deployments import Deployments
from cluster.manager.placement import Host, PlacementError, Want, check_fits, plan
from cluster.manager.registry import Registry
from cluster.protocol import ErrorCode, Heartbeat
from cluster.publish import publish_version
from cluster.sizes import format_bytes, parse_bytes

GiB = 2**30
REQUESTER = (b"peer", 1)


def hosts(**budgets) -> dict[str, Host]:
    return {a: Host(a, None if b is None else int(b * GiB)) for a, b in budgets.items()}


def test_copies_go_to_the_agents_with_the_most_free_bytes_bigger_models_first():
    agents = hosts(a1=4, a2=6, a3=5)
    wants = {"small": Want(1, 1 * GiB), "big": Want(2, 3 * GiB)}
    result = plan(wants, agents, {})
    assert result.agents == {"big": ["a2", "a3"], "small": ["a1"]}  # a1 has 4 free; a2, a3 3 and 2 after big
    assert result.short == {}


def test_a_model_on_every_agent_counts_against_each_budget_and_is_not_placed():
    agents = hosts(a1=4, a2=4)
    wants = {"everywhere": Want(None, 2 * GiB), "big": Want(1, 3 * GiB)}
    result = plan(wants, agents, {})
    assert result.agents["everywhere"] is None
    assert "big" in result.short and result.agents["big"] == []  # 2 GiB free on each: no room for 3


def test_copies_are_sticky_and_a_dead_or_draining_agent_s_copies_are_re_placed():
    agents = hosts(a1=4, a2=4, a3=10)
    current = {"m": ["a1", "a2"]}
    assert plan({"m": Want(2, 3 * GiB)}, agents, current).agents == {"m": ["a1", "a2"]}  # a3 has more room: stays
    del agents["a1"]  # died
    assert plan({"m": Want(2, 3 * GiB)}, agents, current).agents == {"m": ["a2", "a3"]}
    agents["a2"].draining = True
    result = plan({"m": Want(2, 3 * GiB)}, agents, {"m": ["a2", "a3"]})
    assert result.agents == {"m": ["a3"]}
    assert result.short["m"] == (
        "model 'm' needs 2 copies of 3.0 GiB (measured at load); placed on a3; no other live agent can hold it: "
        "a2 (draining)"
    )


def test_before_the_manager_has_settled_a_copy_on_an_agent_not_heard_yet_stays():
    agents = hosts(a2=4)
    assert plan({"m": Want(2, 1 * GiB)}, agents, {"m": ["a1", "a2"]}, settled=False).agents == {"m": ["a1", "a2"]}
    assert plan({"m": Want(2, 1 * GiB)}, agents, {"m": ["a1", "a2"]}, settled=True).agents == {"m": ["a2"]}


def test_agents_started_with_models_get_only_those_and_fewer_replicas_trim():
    agents = hosts(a1=8, a2=4, a3=4)
    agents["a1"].serves_only = ["other"]
    assert plan({"m": Want(2, 1 * GiB)}, agents, {}).agents == {"m": ["a2", "a3"]}
    assert plan({"m": Want(1, 1 * GiB)}, agents, {"m": ["a3", "a2"]}).agents == {"m": ["a3"]}


def test_an_agent_without_a_budget_has_room_for_anything():
    assert plan({"m": Want(1, 100 * GiB)}, hosts(old=None), {}).agents == {"m": ["old"]}


def test_a_deploy_that_cannot_fit_is_refused_naming_copies_size_and_each_agent_s_room():
    agents = hosts(**{"agent-1": 3.5, "agent-2": 4, "agent-3": 3.5})
    wants = {"B": Want(1, 3 * GiB, "memory_mb")}
    current = {"B": ["agent-2"]}  # B holds 3 of agent-2's 4 GiB
    with pytest.raises(PlacementError) as info:
        check_fits("A", Want(3, 3 * GiB, "memory_mb"), wants, agents, current)
    assert str(info.value) == (
        "model 'A' needs 3 copies of 3.0 GiB (memory_mb in its config); room on 2 agents: "
        "agent-1 has 3.5 GiB free, agent-3 3.5 GiB, agent-2 1.0 GiB"
    )
    assert check_fits("A", Want(2, 3 * GiB), wants, agents, current) == ["agent-1", "agent-3"]
    with pytest.raises(PlacementError, match="no live agent can hold it"):
        check_fits("A", Want(1, GiB), {}, {}, {})


def test_sizes_parse_with_decimal_and_binary_suffixes_and_show_in_binary_units():
    assert parse_bytes("8Gi") == parse_bytes("8GiB") == 8 * GiB
    assert parse_bytes("512M") == 512 * 10**6 and parse_bytes("1.5k") == 1500 and parse_bytes("100") == 100
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("8 apples")
    assert format_bytes(3 * GiB) == "3.0 GiB" and format_bytes(1536) == "1.5 KiB" and format_bytes(None) == "unlimited"
    assert memory_budget("2Gi", "cpu") == 2 * GiB
    assert memory_budget(None, "cpu") > 0  # the host's RAM


def test_measure_memory_counts_every_instance_s_tensors_or_the_file_for_a_runner_without_any():
    linear = torch.nn.Linear(100, 100)  # 40 000 bytes of weight, 400 of bias
    program = torch.export.export(linear, (torch.zeros(2, 100),)).module()
    assert measure_memory([linear]) == 40_400
    assert measure_memory([program, torch.export.export(linear, (torch.zeros(2, 100),)).module()]) == 80_800
    assert measure_memory([torch.jit.script(linear)]) == 40_400
    assert measure_memory([lambda x: x, lambda x: x], loaded_bytes=1000) == 2000  # an AOTInductor runner: its file


def test_the_desired_state_carries_placement_on_the_wire_and_each_agent_keeps_its_own_models():
    state = DesiredState({"A": ModelDeployment(1, agents=["a1", "a2"]), "B": ModelDeployment(2)}, 5)
    back = DesiredState.from_wire(state.to_wire())
    assert back == state and "agents" not in state.to_wire()["models"]["B"]
    assert list(back.for_agent("a3").models) == ["B"]
    assert list(back.for_agent("a1").models) == ["A", "B"]
    assert list(back.for_agent("a1", ["A"]).models) == ["A"]
    with pytest.raises(ValueError, match="agents must be a list"):
        DesiredState.from_wire({"models": {"A": {"version": 1, "agents": "a1"}}})


# ---- the manager's Deployments on a real share -----------------------------------------------------------------


def publish(share, name: str, version: int, replicas=None, memory_mb: int = 0) -> None:
    """A tiny TorchScript model with `replicas` and `memory_mb` in its config."""
    path = share / f"{name}-{version}.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    config = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        "memory_mb": memory_mb,
    } | ({"replicas": replicas} if replicas is not None else {})
    publish_version(share, name, path, config, version)


def agent_beat(agent: str, budget_gib: float, serves=(), staged=(), info=None) -> Heartbeat:
    beat = Heartbeat(agent, 4, [{"name": n, "version": v, "default": True} for n, v in serves])
    beat.staged = [{"name": n, "version": v} for n, v in staged]
    beat.memory_budget = int(budget_gib * GiB)
    beat.model_info = info or {}
    return beat


def deployments(tmp_path, budgets: dict[str, float], deployed=None) -> Deployments:
    registry = Registry(3.0)
    for agent, budget in budgets.items():
        registry.observe(agent_beat(agent, budget), 0.0)
    return Deployments(str(tmp_path), DesiredState(deployed or {}), registry)


def test_a_deploy_places_its_copies_and_its_rollout_waits_only_for_them(tmp_path):
    publish(tmp_path, "A", 1, replicas=2, memory_mb=3072)
    d = deployments(tmp_path, {"a1": 6.5, "a2": 7, "a3": 6})
    actions = d.command("deploy", {"name": "A"}, REQUESTER, now=0.0)
    assert actions.desired_changed and not actions.errors
    assert d.desired.models["A"].agents == ["a2", "a1"]
    assert d.rollouts["A"].expected == {"a1", "a2"}  # a3 does not hold it: not waited for
    for agent in ("a1", "a2"):
        d.registry.observe(agent_beat(agent, 6, staged=[("A", 1)]), 1.0)
        d.observe(d.registry.agents[agent].beat)
    d.tick(1.0)
    for agent in ("a1", "a2"):
        d.registry.observe(agent_beat(agent, 6, serves=[("A", 1)]), 2.0)
        d.observe(d.registry.agents[agent].beat)
    answer = d.tick(2.0).answers[0][1]
    assert answer["ok"] and set(answer["agents"]) == {"a1", "a2"}
    view = d.describe()["A"]
    assert view | {"agents": None} == view | {
        "replicas": 2,
        "placed": ["a2", "a1"],
        "memory": 3 * GiB,
        "memory_from": "memory_mb",
        "short": None,
        "agents": None,
    }
    # a1 dies: its copy goes to a3 (the only agent left with room), and the state is saved and published
    d.registry.agents.pop("a1")
    d.agent_lost("a1")
    assert d.tick(10.0).desired_changed and d.desired.models["A"].agents == ["a2", "a3"]
    assert d.tick(11.0).desired_changed is False  # placed: nothing moves again


def test_a_deploy_that_cannot_fit_is_refused_and_a_version_published_for_it_leaves_the_share(tmp_path):
    publish(tmp_path, "B", 1, replicas=2, memory_mb=2048)
    d = deployments(tmp_path, {"agent-1": 6, "agent-2": 6, "agent-3": 6})
    d.command("deploy", {"name": "B"}, REQUESTER, now=0.0)
    assert d.desired.models["B"].agents == ["agent-1", "agent-2"]
    publish(tmp_path, "A", 1, replicas=3, memory_mb=5 * 1024)
    actions = d.command("deploy", {"name": "A", "discard_on_failure": "model"}, REQUESTER, now=0.0)
    assert not actions.desired_changed and "A" not in d.desired.models
    assert actions.discard == [("A", 1, True)]
    [(requester, code, text, model)] = actions.errors
    assert (requester, code, model) == (REQUESTER, ErrorCode.BAD_REQUEST, "A")
    assert text == (
        "cannot place it: model 'A' needs 3 copies of 5.0 GiB (memory_mb in its config); room on 1 agent: "
        "agent-3 has 6.0 GiB free, agent-1 4.0 GiB, agent-2 4.0 GiB"
    )


def test_measured_memory_beats_the_estimate_from_the_files(tmp_path):
    publish(tmp_path, "C", 1, replicas=1)
    d = deployments(tmp_path, {"a1": 1, "a2": 1})
    d.command("deploy", {"name": "C"}, REQUESTER, now=0.0)
    view = d.describe()["C"]
    assert view["memory_from"] == "estimated" and 0 < view["memory"] < 2**20  # a tiny TorchScript file
    d.registry.observe(agent_beat("a1", 1, info={"C": {"1": {"memory": 5 * 2**20}}}), 1.0)
    assert d.describe()["C"]["memory"] == 5 * 2**20 and d.describe()["C"]["memory_from"] == "measured"


def test_when_no_agent_has_room_the_model_serves_on_fewer_and_gets_its_copy_back_when_one_comes(tmp_path, caplog):
    publish(tmp_path, "A", 1, replicas=2, memory_mb=3072)
    d = deployments(tmp_path, {"a1": 4, "a2": 4, "a3": 2})
    d.command("deploy", {"name": "A"}, REQUESTER, now=0.0)
    d.registry.agents.pop("a1")
    d.agent_lost("a1")
    d.tick(5.0)
    assert d.desired.models["A"].agents == ["a2"]
    assert d.describe()["A"]["short"] == (
        "model 'A' needs 2 copies of 3.0 GiB (memory_mb in its config); placed on a2; room for another on 0 agents: "
        "a3 has 2.0 GiB free"
    )
    assert "serves on fewer agents than it wants" in caplog.text
    d.registry.observe(agent_beat("a4", 4), 6.0)
    assert d.tick(6.0).desired_changed and d.desired.models["A"].agents == ["a2", "a4"]
    assert d.describe()["A"]["short"] is None


def test_a_restarted_manager_keeps_copies_where_they_are_and_re_places_only_agents_not_back_after_settling(tmp_path):
    publish(tmp_path, "A", 1, replicas=2, memory_mb=1024)
    saved = DesiredState({"A": ModelDeployment(1, agents=["a1", "a2"])}, 3)
    saved.save(tmp_path)
    d = deployments(tmp_path, {}, deployed=DesiredState.load(tmp_path).models)  # a new manager: nobody heard yet
    d.settle_until = 5.0
    assert d.tick(1.0).desired_changed is False and d.desired.models["A"].agents == ["a1", "a2"]
    for agent in ("a2", "a3"):
        d.registry.observe(agent_beat(agent, 4), 2.0)
    assert d.tick(3.0).desired_changed is False, "a1 may not have beaten yet: its copy stays"
    assert d.tick(6.0).desired_changed and d.desired.models["A"].agents == ["a2", "a3"]


def test_a_canary_of_a_placed_model_waits_only_for_the_agents_that_hold_it(tmp_path):
    from cluster.manager.canaries import Canaries
    from cluster.protocol import What

    publish(tmp_path, "A", 1, replicas=2, memory_mb=1024)
    publish(tmp_path, "A", 2, replicas=2, memory_mb=1024)
    d = deployments(tmp_path, {"a1": 4, "a2": 4, "a3": 2}, deployed={"A": ModelDeployment(1, agents=["a1", "a2"])})
    canaries = Canaries(d, loading_timeout=60.0)
    canaries.command(What.CANARY, {"name": "A", "version": 2}, REQUESTER, 100.0)
    for agent in ("a1", "a2"):  # a3 never loads A
        d.registry.observe(agent_beat(agent, 4, serves=[("A", 1), ("A", 2)]), 1.0)
    canaries.tick(101.0)
    assert d.desired.models["A"].canary.phase == "running"


def test_a_loaded_model_s_memory_is_its_config_s_memory_mb_else_measured_and_shown_in_model_info(tmp_path):
    from cluster.agent.loaded_model import load_model
    from cluster.repository import ModelRepository

    path = tmp_path / "linear.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), str(path))  # 64 + 16 bytes of parameters
    config = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "instances": 2,
    }
    publish_version(tmp_path, "lin", path, config, 1)
    publish_version(tmp_path, "lin", path, dict(config, memory_mb=5), 2)
    measured = load_model(ModelRepository(tmp_path), "lin", 1)
    assert measured.memory == 2 * 80 and measured.info()["memory"] == 160
    assert load_model(ModelRepository(tmp_path), "lin", 2).memory == 5 * 2**20


def test_an_agent_no_broker_routes_to_gets_no_copy(tmp_path):
    publish(tmp_path, "A", 1, replicas=2, memory_mb=1024)
    d = deployments(tmp_path, {"a1": 2, "a2": 4, "a3": 3})
    d.broker_view = {"a1", "a3"}  # a2 (the most room) is cut off from the brokers
    d.command("deploy", {"name": "A"}, REQUESTER, now=0.0)
    assert d.desired.models["A"].agents == ["a3", "a1"]


def test_cluster_status_shows_the_models_memory_of_each_agent_s_budget():
    from cluster.cli.health import _memory

    agent = {"rss": 300 * 2**20, "memory_budget": 2**30, "model_info": {"A": {"1": {"memory": 600 * 2**20}}}}
    assert _memory(agent) == "300 MiB; models 600.0 MiB of 1.0 GiB"


def test_a_share_without_placement_yet_is_placed_once_the_manager_has_heard_every_agent(tmp_path):
    publish(tmp_path, "A", 1, replicas=2, memory_mb=1024)
    d = deployments(tmp_path, {"a1": 2, "a2": 2, "a3": 3}, deployed={"A": ModelDeployment(1)})  # newest_versions'
    d.settle_until = 5.0
    assert d.tick(1.0).desired_changed is False and d.desired.models["A"].agents is None  # every agent, meanwhile
    assert d.tick(6.0).desired_changed and d.desired.models["A"].agents == ["a3", "a1"]


def test_a_publish_over_the_bus_that_cannot_fit_is_refused_before_its_upload(tmp_path):
    from cluster.config import Addresses
    from cluster.manager.deployments import CommandError
    from cluster.manager.manager import Manager
    from cluster.role_settings import ManagerSettings

    addresses = Addresses(
        manager_queries="inproc://place-q", manager_events="inproc://place-e", manager_heartbeats="inproc://place-h"
    )
    manager = Manager(ManagerSettings(share=str(tmp_path), addresses=addresses))
    try:
        for agent in ("a1", "a2"):
            manager.registry.observe(agent_beat(agent, 1), 0.0)
        config = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
            "replicas": 2,
        }
        header = {"name": "big", "file": "model.pt", "config": dict(config, memory_mb=2048)}
        with pytest.raises(CommandError, match=r"cannot place it: model 'big' needs 2 copies of 2\.0 GiB"):
            manager.check_publish(header)
        manager.check_publish(dict(header, config=config))  # no memory_mb, no size yet: judged once the file is here
        with pytest.raises(CommandError, match=r"needs 2 copies of 1\.5 GiB \(estimated from its files"):
            manager.check_publish(dict(header, config=config), size=3 * 2**29)
    finally:
        manager.close()


def test_a_heartbeat_with_a_malformed_model_info_entry_does_not_stop_the_manager_s_tick(tmp_path):
    """model_info is informational (Heartbeat.from_wire keeps it when it is a dict): an agent that sends a model's
    entry as something else (another version's format, a bug) is ignored for the measure, never an exception in
    the manager's tick (which would end the manager's loop) or its `deployments` answer."""
    publish(tmp_path, "C", 1, replicas=1)
    d = deployments(tmp_path, {"a1": 1})
    d.command("deploy", {"name": "C"}, REQUESTER, now=0.0)
    for info in ({"C": ["1", {"memory": 5}]}, {"C": "x"}, {"C": {"1": 7}}):
        header = {"agent": "a2", "capacity": 4, "models": [], "memory_budget": GiB, "model_info": info}
        d.registry.observe(Heartbeat.from_wire(header), 1.0)
        d.tick(1.0)
        assert d.describe()["C"]["memory_from"] == "estimated"
    from cluster.cli.health import _memory, _runs  # `cluster status` shows the same heartbeats

    for info in ({"C": ["1"]}, {"C": {"1": "x"}}, {"C": {"1": {"memory": "5", "runs": 1}}}):
        agent = {"rss": 2**20, "memory_budget": 2**30, "model_info": info}
        assert _memory(agent) == "1 MiB; models 0 B of 1.0 GiB" and _runs(agent, {"name": "C", "version": 1}) == ""


def test_a_shortfall_names_agents_whose_serves_only_list_is_not_all_names(tmp_path):
    """serves_only is kept from a heartbeat when it is a list (Heartbeat.from_wire): the shortfall message, built in
    the manager's tick, must not fail on what the list holds."""
    header = {"agent": "a1", "capacity": 4, "models": [], "memory_budget": GiB, "serves_only": [1, None]}
    beat = Heartbeat.from_wire(header)
    agents = {"a1": Host("a1", beat.memory_budget, beat.serves_only)}
    result = plan({"m": Want(1, GiB)}, agents, {})
    assert result.short["m"].endswith("no live agent can hold it: a1 (serves only 1,None)")
