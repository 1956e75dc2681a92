"""The manager's commands and rollouts, in-process: `Deployments` fed commands, heartbeats, deaths and clock ticks
(`now` passed explicitly), on a tmp share whose empty numbered folders are the versions. No sockets, no processes."""

from __future__ import annotations

import pytest

from cluster.desired import DesiredState, ModelDeployment
from cluster.manager.deployments import ABORT_GRACE, CommandError, Deployments
from cluster.manager.registry import Registry
from cluster.protocol import ErrorCode, Heartbeat, ProtocolError

REQUESTER = (b"peer", 7)  # (peer identity, request id), handed back with the answer
EXPIRY = 3.0


def beat(agent: str, serves=(("m", 1),), staged=(), failed=(), serves_only=None) -> Heartbeat:
    """A heartbeat: `serves` [(model, version)] (the last version of a model is the default), `staged`
    [(model, version)], `failed` [(model, version, error)]."""
    models = [{"name": n, "version": v, "default": not any(n2 == n and v2 > v for n2, v2 in serves)} for n, v in serves]
    return Heartbeat(
        agent,
        4,
        models,
        staged=[{"name": n, "version": v} for n, v in staged],
        failed=[{"name": n, "version": v, "error": e} for n, v, e in failed],
        serves_only=serves_only,
    )


def make(tmp_path, deployed=None, on_share=None, agents=("a", "b", "c"), share=True) -> Deployments:
    """Deployments over a tmp share holding `on_share` {model: [versions]}, desired state `deployed` {model:
    ModelDeployment}, and the `agents` live in the registry (each serving m v1) at time 0."""
    for name, versions in (on_share if on_share is not None else {"m": [1, 2]}).items():
        for version in versions:
            (tmp_path / "models" / name / str(version)).mkdir(parents=True)
    registry = Registry(EXPIRY)
    for agent in agents:
        registry.observe(beat(agent), now=0.0)
    desired = DesiredState(deployed if deployed is not None else {"m": ModelDeployment(1)})
    return Deployments(str(tmp_path) if share else None, desired, registry)


def heartbeats(d: Deployments, *beats: Heartbeat, now: float = 0.0) -> None:
    """What the manager does with a beat: the registry records it, the rollouts read it."""
    for b in beats:
        d.registry.observe(b, now)
        d.observe(b)


def refused(d: Deployments, what: str, header: dict) -> CommandError:
    with pytest.raises(CommandError) as info:
        d.command(what, header, REQUESTER, now=0.0)
    return info.value


def roll_out(d: Deployments, model: str, version: int, agents=("a", "b", "c"), start: float = 0.0) -> dict:
    """Every agent stages, then serves, `version`; returns the requester's answer."""
    heartbeats(d, *(beat(a, staged=[(model, version)]) for a in agents), now=start + 1)
    assert d.tick(start + 1).desired_changed and d.rollouts[model].phase == "switching"
    heartbeats(d, *(beat(a, serves=[(model, version)]) for a in agents), now=start + 2)
    actions = d.tick(start + 2)
    assert [requester for requester, _ in actions.answers] == [REQUESTER], actions
    return actions.answers[0][1]


def test_deploy_stages_on_every_agent_switches_when_all_staged_and_answers(tmp_path):
    d = make(tmp_path)
    actions = d.command("deploy", {"name": "m"}, REQUESTER, now=10.0)  # no version: the share's newest
    assert actions.desired_changed and actions.answers == []
    m = d.desired.models["m"]
    assert (m.version, m.staged) == (1, 2) and d.rollouts["m"].expected == {"a", "b", "c"}

    heartbeats(d, beat("a", serves=[("m", 1)], staged=[("m", 2)]), beat("b", staged=[("m", 2)]), now=11.0)
    assert d.tick(11.0).answers == [] and (m.version, m.staged) == (1, 2), "switched before every agent staged"
    heartbeats(d, beat("c", staged=[("m", 2)]), now=12.0)
    actions = d.tick(12.0)
    assert actions.desired_changed and actions.answers == []
    assert (m.version, m.staged, m.history) == (2, None, [1])

    heartbeats(d, beat("a", serves=[("m", 2)]), beat("b", serves=[("m", 1), ("m", 2)]), now=13.0)
    assert d.tick(13.0).answers == [], "answered before every agent switched"
    heartbeats(d, beat("c", serves=[("m", 2)]), now=14.0)
    actions = d.tick(14.0)
    assert not actions.desired_changed
    assert actions.answers == [
        (
            REQUESTER,
            {
                "model": "m",
                "version": 2,
                "previous": 1,
                "ok": True,
                "agents": {"a": "ok", "b": "ok", "c": "ok"},
                "left_out": {},
                "seconds": 4.0,
                "removed": False,
            },
        )
    ]
    assert d.rollouts == {}


def test_a_failure_aborts_everywhere_after_the_grace_period_and_the_report_names_every_agent(tmp_path):
    d = make(tmp_path)
    d.command("deploy", {"name": "m", "version": 2}, REQUESTER, now=0.0)
    heartbeats(d, beat("a", failed=[("m", 2, "sha256 mismatch")]), beat("b", staged=[("m", 2)]), now=1.0)
    assert d.tick(1.0).answers == []  # the failure is seen here: c has until 1 + ABORT_GRACE to report
    assert d.tick(1.0 + ABORT_GRACE).answers == [] and d.desired.models["m"].staged == 2
    actions = d.tick(1.0 + ABORT_GRACE + 0.1)
    assert actions.desired_changed
    m = d.desired.models["m"]
    assert (m.version, m.staged, m.history) == (1, None, []), "the old version must be kept"
    [(requester, report)] = actions.answers
    assert requester == REQUESTER and not report["ok"] and report["previous"] == 1
    assert report["agents"] == {"a": "sha256 mismatch", "b": "ok", "c": "no outcome before the rollout was aborted"}
    assert d.rollouts == {}


def test_a_failure_aborts_at_once_when_every_agent_has_reported(tmp_path):
    d = make(tmp_path)
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    heartbeats(
        d, beat("a", failed=[("m", 2, "cannot load")]), beat("b", staged=[("m", 2)]), beat("c", staged=[("m", 2)])
    )
    [(_, report)] = d.tick(0.5).answers
    assert report["agents"] == {"a": "cannot load", "b": "ok", "c": "ok"} and not report["ok"]
    assert (d.desired.models["m"].version, d.desired.models["m"].staged) == (1, None)


def test_a_failed_first_deploy_removes_the_model_from_the_desired_state(tmp_path):
    d = make(tmp_path, on_share={"m": [1], "new": [1]})
    d.command("deploy", {"name": "new"}, REQUESTER, now=0.0)
    assert d.desired.models["new"].version is None and d.desired.models["new"].staged == 1
    heartbeats(d, beat("a", failed=[("new", 1, "bad")]), beat("b", staged=[("new", 1)]), beat("c", staged=[("new", 1)]))
    actions = d.tick(1.0)
    assert actions.desired_changed and "new" not in d.desired.models and "m" in d.desired.models
    assert actions.answers[0][1]["previous"] is None and not actions.answers[0][1]["ok"]


def test_the_deadline_passing_aborts(tmp_path):
    d = make(tmp_path)
    d.command("deploy", {"name": "m", "rollout_timeout": 5}, REQUESTER, now=0.0)
    heartbeats(d, beat("a", staged=[("m", 2)]), beat("b", staged=[("m", 2)]), now=1.0)  # c never answers
    assert d.tick(5.0).answers == []
    actions = d.tick(5.1)
    assert actions.desired_changed and (d.desired.models["m"].version, d.desired.models["m"].staged) == (1, None)
    [(_, report)] = actions.answers
    assert report["agents"] == {"a": "ok", "b": "ok", "c": "not staged within 5 s"} and not report["ok"]


def test_a_rollout_waits_only_for_agents_the_broker_routes_to(tmp_path):
    """A heartbeat from nowhere (an agent id the broker never saw) must not hold a rollout up until its timeout."""
    d = make(tmp_path, agents=("a", "b", "c", "ghost"))
    d.broker_view = {"a", "b", "c"}
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    assert d.rollouts["m"].expected == {"a", "b", "c"}
    report = roll_out(d, "m", 2)
    assert report["ok"] and sorted(report["agents"]) == ["a", "b", "c"]
    assert report["left_out"] == {"ghost": "not connected to the broker"}

    d = make(tmp_path / "again", agents=("a", "b", "c", "ghost"))  # the broker not answering: all agents heard
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    assert d.rollouts["m"].expected == {"a", "b", "c", "ghost"}


def test_an_agent_that_joined_just_before_the_brokers_report_is_waited_for(tmp_path):
    """The broker reports the agents it routes to once a heartbeat interval: an agent that registered with both just
    before a report may not be in it yet. A deploy then waits for it rather than leaving it out (and finishing at
    once without it); a report a whole interval after it joined that still lacks it leaves it out."""
    d = make(tmp_path, agents=("a", "b", "new"))
    d.broker_view, d.report_interval = {"a", "b"}, 1.0
    joined = d.registry.agents["new"].joined
    d.broker_view_at = joined + 0.5
    assert (d.at_broker("a"), d.at_broker("new")) == (True, None)
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    assert d.rollouts["m"].expected == {"a", "b", "new"}
    d.broker_view_at = joined + 1.5
    assert d.at_broker("new") is False
    d.tick(1.0)
    assert d.rollouts["m"].expected == {"a", "b"}


def test_each_agent_has_its_own_staging_deadline_and_joiners_are_waited_for(tmp_path):
    d = make(tmp_path, agents=("a", "b"))
    d.broker_view = {"a", "b"}
    d.command("deploy", {"name": "m", "rollout_timeout": 5}, REQUESTER, now=0.0)
    heartbeats(d, beat("late"), now=4.0)  # a new agent starts serving mid-rollout: it must stage v2 too
    d.broker_view = {"a", "b", "late"}
    assert d.tick(4.0).answers == [] and d.rollouts["m"].expected == {"a", "b", "late"}
    heartbeats(d, beat("a", staged=[("m", 2)]), beat("b", staged=[("m", 2)]), now=4.5)
    assert d.tick(5.5).answers == [] and d.rollouts["m"].phase == "staging", "switched without the joiner"
    assert d.tick(9.0).answers == [], "the joiner's own deadline (4 + 5 s) has not passed"
    actions = d.tick(9.1)
    [(_, report)] = actions.answers
    assert report["agents"] == {"a": "ok", "b": "ok", "late": "not staged within 5 s"} and not report["ok"]
    assert (d.desired.models["m"].version, d.desired.models["m"].staged) == (1, None)


def test_an_agent_leaving_the_broker_mid_rollout_is_not_waited_for(tmp_path):
    d = make(tmp_path)
    d.broker_view = {"a", "b", "c"}
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    heartbeats(d, beat("a", staged=[("m", 2)]), beat("b", staged=[("m", 2)]), now=1.0)
    d.broker_view = {"a", "b"}  # c still beats to the manager, but the broker dropped it (a cut link, say)
    assert d.tick(1.0).desired_changed and d.rollouts["m"].phase == "switching"
    heartbeats(d, beat("a", serves=[("m", 2)]), beat("b", serves=[("m", 2)]), now=2.0)
    [(_, report)] = d.tick(2.0).answers
    assert report["ok"] and report["agents"] == {"a": "ok", "b": "ok"}
    assert report["left_out"] == {"c": "not connected to the broker"}


def test_an_agent_dying_mid_rollout_no_longer_counts(tmp_path):
    d = make(tmp_path)
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    heartbeats(d, beat("a", staged=[("m", 2)]), beat("b", staged=[("m", 2)]), now=EXPIRY + 1)
    for event in d.registry.expire(EXPIRY + 1):  # c, silent since 0
        d.agent_lost(event["agent"])
    assert sorted(d.registry.agents) == ["a", "b"]
    assert d.tick(EXPIRY + 1).desired_changed and d.rollouts["m"].phase == "switching"
    heartbeats(d, beat("a", serves=[("m", 2)]), beat("b", serves=[("m", 2)]), now=EXPIRY + 2)
    [(_, report)] = d.tick(EXPIRY + 2).answers
    assert report["ok"] and report["agents"] == {"a": "ok", "b": "ok"}


def test_agents_started_with_models_that_exclude_the_model_are_not_expected(tmp_path):
    d = make(tmp_path)
    heartbeats(d, beat("other", serves=[("x", 1)], serves_only=["x"]), beat("mine", serves_only=["m"]))
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    assert d.rollouts["m"].expected == {"a", "b", "c", "mine"}
    report = roll_out(d, "m", 2, agents=("a", "b", "c", "mine"))
    assert report["ok"] and sorted(report["agents"]) == ["a", "b", "c", "mine"]


def test_agents_that_already_have_the_version_count_at_once(tmp_path):
    d = make(tmp_path)
    heartbeats(d, *(beat(a, serves=[("m", 1)], staged=[("m", 2)]) for a in ("a", "b", "c")))
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    assert d.rollouts["m"].complete() and d.tick(0.1).desired_changed and d.desired.models["m"].version == 2


def test_deploying_the_deployed_version_answers_already_deployed_at_once(tmp_path):
    d = make(tmp_path)
    actions = d.command("deploy", {"name": "m", "version": 1}, REQUESTER, now=0.0)
    assert not actions.desired_changed and d.rollouts == {}
    [(requester, answer)] = actions.answers
    assert requester == REQUESTER and answer["note"] == "already deployed" and answer["ok"] and answer["version"] == 1


def test_rollback_to_the_previous_version_and_to_a_named_one(tmp_path):
    d = make(tmp_path, deployed={"m": ModelDeployment(2, history=[1])}, on_share={"m": [1, 2, 3]})
    d.command("rollback", {"name": "m"}, REQUESTER, now=0.0)
    assert d.desired.models["m"].staged == 1
    report = roll_out(d, "m", 1)
    assert report["ok"] and (report["version"], report["previous"]) == (1, 2)
    m = d.desired.models["m"]
    assert (m.version, m.history) == (1, [1, 2])

    d.command("rollback", {"name": "m", "to": 3}, REQUESTER, now=10.0)
    assert d.desired.models["m"].staged == 3
    assert roll_out(d, "m", 3, start=10.0)["ok"] and (m.version, m.history) == (3, [1, 2, 1])


def test_rollback_without_history_is_model_not_found(tmp_path):
    d = make(
        tmp_path,
        deployed={"m": ModelDeployment(1), "gone": ModelDeployment(2, history=[1])},
        on_share={"m": [1, 2], "gone": [2]},
    )
    for name in ("m", "gone", "unknown"):  # no history; history not on the share any more; not deployed at all
        error = refused(d, "rollback", {"name": name})
        assert (
            error.code == ErrorCode.MODEL_NOT_FOUND
            and str(error) == f"model '{name}' has no earlier version to roll back to"
        )
    assert d.rollouts == {}


def test_a_version_not_on_the_share_is_model_not_found(tmp_path):
    d = make(tmp_path)
    error = refused(d, "deploy", {"name": "m", "version": 7})
    assert error.code == ErrorCode.MODEL_NOT_FOUND and str(error) == "model 'm' has no version 7 in the share ([1, 2])"
    error = refused(d, "rollback", {"name": "m", "to": 9})
    assert error.code == ErrorCode.MODEL_NOT_FOUND and "no version 9" in str(error)
    error = refused(d, "deploy", {"name": "nothing"})
    assert (
        error.code == ErrorCode.MODEL_NOT_FOUND
        and str(error) == "model 'nothing' has no version None in the share (none)"
    )
    assert d.rollouts == {} and d.desired.models["m"].staged is None


def test_an_invalid_model_name_is_a_bad_request(tmp_path):
    d = make(tmp_path)
    for what in ("deploy", "rollback"):
        error = refused(d, what, {"name": "../x"})
        assert error.code == ErrorCode.BAD_REQUEST and "invalid model name" in str(error), (what, error)


def test_a_second_rollout_of_the_same_model_is_overloaded_and_others_go_on(tmp_path):
    d = make(
        tmp_path, deployed={"m": ModelDeployment(1), "echo": ModelDeployment(1)}, on_share={"m": [1, 2], "echo": [1, 2]}
    )
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    for what, header in (
        ("deploy", {"name": "m", "version": 1}),
        ("rollback", {"name": "m"}),
        ("undeploy", {"name": "m"}),
    ):
        error = refused(d, what, header)
        assert error.code == ErrorCode.OVERLOADED and "already in progress" in str(error), what
    assert d.command("deploy", {"name": "echo"}, REQUESTER, now=0.0).desired_changed and set(d.rollouts) == {
        "m",
        "echo",
    }
    assert d.desired.models["m"].staged == 2, "the refused commands changed the rollout"


def test_undeploy_and_undeploy_of_an_unknown_model(tmp_path):
    d = make(tmp_path)
    generation = d.desired.generation
    actions = d.command("undeploy", {"name": "m"}, REQUESTER, now=0.0)
    assert actions.desired_changed and actions.answers == [(REQUESTER, {"model": "m", "undeployed": True})]
    assert d.desired.models == {} and d.desired.generation > generation
    error = refused(d, "undeploy", {"name": "m"})
    assert error.code == ErrorCode.MODEL_NOT_FOUND and str(error) == "model 'm' is not deployed"


def test_undeploying_another_model_during_a_rollout_leaves_the_rollout_alone(tmp_path):
    d = make(
        tmp_path, deployed={"m": ModelDeployment(1), "echo": ModelDeployment(1)}, on_share={"m": [1, 2], "echo": [1]}
    )
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    d.command("undeploy", {"name": "echo"}, (b"other", 8), now=0.0)
    assert set(d.desired.models) == {"m"}
    assert roll_out(d, "m", 2)["ok"]


def test_a_rollout_whose_model_leaves_the_desired_state_ends_with_a_report(tmp_path):
    d = make(tmp_path)
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    del d.desired.models["m"]  # undeploy refuses a model being rolled out: this is the guard behind it
    actions = d.tick(1.0)
    assert d.rollouts == {} and [requester for requester, _ in actions.answers] == [REQUESTER]


def test_a_manager_without_a_share_refuses_commands(tmp_path):
    d = make(tmp_path, share=False)
    for what in ("deploy", "rollback", "undeploy"):
        error = refused(d, what, {"name": "m"})
        assert error.code == ErrorCode.BAD_REQUEST and "without --share" in str(error), what


def test_a_command_without_a_name_is_a_protocol_error(tmp_path):
    d = make(tmp_path)
    with pytest.raises(ProtocolError, match="name"):
        d.command("deploy", {"version": 2}, REQUESTER, now=0.0)


def test_deployments_view_shows_desired_served_and_rolling_out(tmp_path):
    d = make(tmp_path, agents=("a",))
    heartbeats(d, beat("b", serves=[("m", 1), ("echo", 1)]))
    d.command("deploy", {"name": "m"}, REQUESTER, now=0.0)
    assert d.describe() == {
        "m": {
            "version": 1,
            "staged": 2,
            "history": [],
            "agents": {"a": [1], "b": [1]},
            "rolling_out": True,
            # placement (a share's bare folders say nothing of it): every agent
            **{"replicas": None, "placed": None, "memory": None, "memory_from": None, "short": None},
        },
        "echo": {"version": None, "staged": None, "history": [], "agents": {}, "rolling_out": False},
    }


def test_a_version_published_for_a_failed_rollout_is_discarded(tmp_path):
    d = make(tmp_path)
    d.command("deploy", {"name": "m", "version": 2, "discard_on_failure": "version"}, REQUESTER, now=0.0)
    heartbeats(d, beat("a", failed=[("m", 2, "corrupt")]), beat("b", staged=[("m", 2)]), beat("c", staged=[("m", 2)]))
    actions = d.tick(1.0)
    assert actions.discard == [("m", 2, False)] and actions.answers[0][1]["removed"] is True
    d = make(tmp_path / "new", on_share={"m": [1], "fresh": [1]})
    d.command("deploy", {"name": "fresh", "discard_on_failure": "model"}, REQUESTER, now=0.0)
    heartbeats(d, *(beat(a, failed=[("fresh", 1, "bad")]) for a in ("a", "b", "c")))
    assert d.tick(1.0).discard == [("fresh", 1, True)]
    d = make(tmp_path / "ok")
    d.command("deploy", {"name": "m", "version": 2, "discard_on_failure": "version"}, REQUESTER, now=0.0)
    report = roll_out(d, "m", 2)
    assert report["ok"] and report["removed"] is False  # a good version stays
    assert refused(make(tmp_path / "bad"), "deploy", {"name": "m", "discard_on_failure": "all"}).code == "BAD_REQUEST"


# ---- a desired state that could not be saved (issue 18 point 4): undone, never half-done -----------------------

WHY = "could not save the desired state to /share/deployments.json: No space left on device"


def agreed(d: Deployments) -> DesiredState:
    """A copy of the desired state as saved (what the manager keeps as its last saved state)."""
    return DesiredState.from_wire(d.desired.to_wire())


def test_a_deploy_whose_staging_cannot_be_saved_is_undone_and_answered_with_the_error(tmp_path):
    d = make(tmp_path)
    saved = agreed(d)
    d.command("deploy", {"name": "m", "version": 2, "discard_on_failure": "version"}, REQUESTER, now=0.0)
    actions, reverted = d.revert(saved, WHY)
    assert reverted == {"m"} and d.rollouts == {} and d.desired.models["m"] == ModelDeployment(1)
    assert actions.desired_changed and actions.discard == [("m", 2, False)]
    [(requester, code, text, model)] = actions.errors
    assert requester == REQUESTER and code == ErrorCode.INTERNAL and model == "m"
    assert text == f"rollout of 'm' v2 undone: {WHY}; every agent keeps serving v1"
    assert d.rollout_counts() == {"ok": 0, "failed": 1, "in_progress": 0}
    d.command("deploy", {"name": "m", "version": 2}, REQUESTER, now=1.0)  # nothing left in progress
    assert d.rollouts["m"].version == 2


def test_a_switch_that_cannot_be_saved_unstages_everywhere_and_a_new_model_leaves_the_state(tmp_path):
    d = make(tmp_path, on_share={"m": [1, 2], "fresh": [1]})
    d.command("deploy", {"name": "m", "version": 2}, REQUESTER, now=0.0)
    d.command("deploy", {"name": "fresh"}, (b"other", 8), now=0.0)
    saved = agreed(d)  # the staging was saved: the file says staged 2 and fresh staged 1
    heartbeats(d, *(beat(a, staged=[("m", 2), ("fresh", 1)]) for a in ("a", "b", "c")), now=1.0)
    assert d.tick(1.0).desired_changed and d.desired.models["m"].version == 2  # switching: this save fails
    actions, reverted = d.revert(saved, WHY)
    assert reverted == {"m", "fresh"} and d.rollouts == {}
    assert d.desired.models == {"m": ModelDeployment(1)}, "nothing staged: agents drop what they staged"
    assert sorted((r, t.rsplit("; ", 1)[1]) for r, _, t, _ in actions.errors) == [
        ((b"other", 8), "'fresh' stays undeployed"),
        (REQUESTER, "every agent keeps serving v1"),
    ]


def test_a_failed_save_leaves_the_other_models_and_their_rollouts_alone(tmp_path):
    d = make(tmp_path, deployed={"m": ModelDeployment(1), "n": ModelDeployment(1)}, on_share={"m": [1, 2], "n": [1]})
    d.command("deploy", {"name": "m", "version": 2}, REQUESTER, now=0.0)
    saved = agreed(d)
    d.command("undeploy", {"name": "n"}, (b"other", 8), now=0.0)
    actions, reverted = d.revert(saved, WHY)
    assert reverted == {"n"} and actions.errors == [] and d.desired.models["n"] == ModelDeployment(1)
    assert d.rollouts["m"].version == 2 and d.desired.models["m"].staged == 2
