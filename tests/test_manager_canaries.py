"""The manager's canary runs, in-process: `Canaries` beside `Deployments`, fed commands, heartbeats, the brokers'
digests and clock ticks (wall `now` passed explicitly), with a scripted judge standing in for
cluster.canary.judge.Judge. No sockets, no processes."""

from __future__ import annotations

import time

import pytest

from cluster.canary.digest import ModelDigest, StepDigest, VersionDigest
from cluster.canary.judge import Verdict
from cluster.desired import Canary, DesiredState, ModelDeployment
from cluster.manager.canaries import Canaries
from cluster.manager.deployments import CommandError
from cluster.protocol import CanaryDigest, ErrorCode, What
from tests.harness import wait_for
from tests.test_manager_logic import REQUESTER, beat, heartbeats, make

T0 = 1_000_000.0  # wall time of the tests' start


class ScriptedJudge:
    """Stands in for Judge: `Judge(criteria).look(look)` answers the next scripted verdict, then "continue"."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.looks = []
        self.criteria = []

    def __call__(self, criteria):
        self.criteria.append(criteria)
        return self

    def look(self, look):
        self.looks.append(look)
        return self.verdicts.pop(0) if self.verdicts else Verdict("continue", "not enough yet", {})


def setup(tmp_path, on_share=None, deployed=None, **kwargs) -> tuple[Canaries, ScriptedJudge]:
    d = make(tmp_path, deployed=deployed, on_share=on_share if on_share is not None else {"m": [1, 2, 3]})
    judge = ScriptedJudge()
    return Canaries(d, judge=judge, loading_timeout=60.0, look_interval=0.25, **kwargs), judge


def start(c: Canaries, now: float = T0, **fields) -> dict:
    actions = c.command(What.CANARY, {"name": "m", **fields}, REQUESTER, now)
    assert actions.desired_changed
    [(requester, status)] = actions.answers
    assert requester == REQUESTER
    return status


def serve_canary(c: Canaries, version: int = 2, agents=("a", "b", "c"), now: float = T0) -> None:
    heartbeats(c.deployments, *(beat(a, serves=[("m", 1), ("m", version)]) for a in agents), now=0.0)


def running(c: Canaries, now: float = T0 + 1, **fields) -> Canary:
    """A canary of v2 started, loaded everywhere and running at step 0."""
    start(c, now - 1, **{"version": 2, **fields})
    serve_canary(c)
    assert c.tick(now).desired_changed
    canary = c.desired.models["m"].canary
    assert canary.phase == "running" and canary.step == 0 and canary.step_started == now
    return canary


def digest(c: Canaries, broker: str, canary_id: str, ok=(0, 0), errors=(0, 0), seq=1, tripped=None, now=T0 + 2):
    """Broker `broker`'s cumulative digest at step 0: ok and errors per (stable v1, canary v2)."""
    step = StepDigest({1: VersionDigest(ok=ok[0], errors=errors[0]), 2: VersionDigest(ok=ok[1], errors=errors[1])})
    wire = ModelDigest(canary_id, {0: step}, tripped, 10).to_wire()
    return c.digest(CanaryDigest(broker, "inc-" + broker, seq, {"m": wire}), now)


def test_start_loading_running_pass_and_promote(tmp_path):
    c, judge = setup(tmp_path, on_share={"m": [1, 2]})
    status = start(c, steps=[10, 50, 100], step_seconds=5)
    m = c.desired.models["m"]
    assert (m.version, m.canary.version, m.canary.phase, m.canary.weight) == (1, 2, "loading", 0), "newest version"
    assert status["phase"] == "loading" and status["version"] == 2 and status["stable"] == 1
    assert status["outcome"] == "running" and not status["done"] and status["steps"] == [10, 50, 100]

    heartbeats(c.deployments, beat("a", serves=[("m", 1), ("m", 2)]), beat("b", serves=[("m", 1), ("m", 2)]))
    assert not c.tick(T0 + 1).desired_changed and m.canary.phase == "loading", "c does not serve it yet"
    heartbeats(c.deployments, beat("c", serves=[("m", 1), ("m", 2)]))
    assert c.tick(T0 + 2).desired_changed
    assert (m.canary.phase, m.canary.step, m.canary.weight, m.canary.step_started) == ("running", 0, 10, T0 + 2)
    assert [d["decision"] for d in m.canary.decisions] == ["start"]

    judge.verdicts = [Verdict("pass", "enough and clean", {"versions": {2: {"requests": 100, "p99_ms": float("nan")}}})]
    assert c.tick(T0 + 3).desired_changed
    look = judge.looks[-1]
    assert (look.stable, look.canary, look.step, look.weight, look.step_elapsed) == (1, 2, 0, 10, 1.0)
    assert (m.canary.step, m.canary.weight, m.canary.step_started) == (1, 50, T0 + 3)
    assert m.canary.decisions[-1] | {} == {
        "at": T0 + 3,
        "step": 0,
        "weight": 10,
        "decision": "pass",
        "reason": "enough and clean",
        "figures": {"2": {"requests": 100, "p99_ms": None}},  # keys the bus's msgpack takes, numbers JSON takes
    }

    judge.verdicts = [Verdict("pass", "clean at 50%", {})]  # the next weight is 100: promoted
    assert c.tick(T0 + 4).desired_changed
    assert (m.version, m.canary, m.history) == (2, None, [1])
    record = c.rollouts("m", T0 + 5)["canaries"]["m"]
    assert record["done"] and record["outcome"] == "promoted" and record["stable"] == 1 and record["version"] == 2
    assert record["weight"] == 100 and record["decisions"][-1]["weight"] == 50
    assert [d["decision"] for d in record["decisions"]] == ["start", "pass", "promote"]
    assert c.runs == {}


def test_a_run_with_no_next_step_promotes_on_its_last_pass(tmp_path):
    c, judge = setup(tmp_path)
    running(c, steps=[30])  # (v2 of 1, 2, 3)
    judge.verdicts = [Verdict("pass", "ok", {})]
    c.tick(T0 + 2)
    assert c.desired.models["m"].version == 2 and c.desired.models["m"].canary is None


def test_a_failure_while_loading_rolls_back_and_the_deadline_too(tmp_path):
    c, _ = setup(tmp_path)
    start(c, version=2)
    heartbeats(c.deployments, beat("a", failed=[("m", 2, "sha256 mismatch")]))
    assert c.tick(T0 + 1).desired_changed
    m = c.desired.models["m"]
    assert (m.version, m.canary) == (1, None)
    record = c.rollouts(None, T0 + 1)["canaries"]["m"]
    assert record["outcome"] == "rolled back"
    assert record["decisions"][-1]["reason"] == "a could not load v2: sha256 mismatch"

    heartbeats(c.deployments, beat("a"))  # the failure gone with the canary (agents drop it)
    start(c, T0 + 10, version=3)
    heartbeats(c.deployments, beat("a", serves=[("m", 1), ("m", 3)]))
    assert not c.tick(T0 + 10 + 59).desired_changed
    assert c.tick(T0 + 10 + 61).desired_changed and c.desired.models["m"].canary is None
    reason = c.rollouts("m", T0 + 72)["canaries"]["m"]["decisions"][-1]["reason"]
    assert reason == "not serving v3 within 60 s: b, c"


def test_the_judges_rollback_ends_the_run_and_stable_serves_everything(tmp_path):
    c, judge = setup(tmp_path)
    canary = running(c, criteria={"alpha": 0.05, "min_requests": 10})
    judge.verdicts = [Verdict("rollback", "errors: log BF 5.2 >= 3.0", {"errors": {"log_bf": 5.2}})]
    actions = digest(c, "b1", canary.id, ok=(100, 10), errors=(0, 5))
    assert actions.desired_changed
    assert judge.criteria[-1].alpha == 0.05 and judge.criteria[-1].min_requests == 10
    assert c.desired.models["m"].canary is None and c.desired.models["m"].version == 1
    record = c.rollouts("m", T0 + 3)["canaries"]["m"]
    assert record["outcome"] == "rolled back" and record["look"]["reason"] == "errors: log BF 5.2 >= 3.0"
    assert record["weight"] == 0 and record["decisions"][-1]["weight"] == 10
    assert record["decisions"][-1]["decision"] == "rollback"


def test_a_tripped_breaker_in_any_digest_rolls_back(tmp_path):
    c, judge = setup(tmp_path)
    canary = running(c)
    digest(c, "b1", canary.id, ok=(100, 10))
    assert c.desired.models["m"].canary is not None
    assert digest(c, "b2", canary.id, ok=(50, 3), errors=(0, 20), tripped="20 failures in a row").desired_changed
    assert c.desired.models["m"].canary is None
    reason = c.rollouts("m", T0 + 3)["canaries"]["m"]["decisions"][-1]["reason"]
    assert reason == "circuit breaker at broker b2: 20 failures in a row"


def test_digests_from_two_brokers_are_summed_and_an_old_runs_are_ignored(tmp_path):
    c, judge = setup(tmp_path)
    canary = running(c)
    digest(c, "b1", canary.id, ok=(100, 10), errors=(1, 2), seq=1)
    digest(c, "b1", canary.id, ok=(150, 15), errors=(1, 3), seq=2)  # cumulative: replaces seq 1
    digest(c, "b1", canary.id, ok=(120, 12), errors=(1, 2), seq=1)  # late: ignored
    digest(c, "b2", canary.id, ok=(50, 5), errors=(0, 1), seq=7)
    digest(c, "b3", "an-old-run-id", ok=(9999, 9999), errors=(999, 999))
    step = judge.looks[-1].steps[0]
    assert (step.versions[1].ok, step.versions[2].ok, step.versions[1].errors, step.versions[2].errors) == (
        200,
        20,
        1,
        4,
    )
    assert set(c.rollouts("m", T0 + 3)["canaries"]["m"]["brokers"]) == {"b1", "b2"}


def test_a_malformed_digest_is_dropped_and_the_others_kept(tmp_path):
    c, judge = setup(tmp_path)
    canary = running(c)
    good = ModelDigest(canary.id, {0: StepDigest({2: VersionDigest(ok=3)})}).to_wire()
    event = CanaryDigest("b1", "i", 1, {"m": {"canary": 5}, "other": good})
    assert not c.digest(event, T0 + 2).desired_changed and judge.looks == []
    c.digest(CanaryDigest("b1", "i", 2, {"m": good}), T0 + 2)
    assert judge.looks[-1].steps[0].versions[2].ok == 3


def test_promote_and_abort_commands(tmp_path):
    c, _ = setup(tmp_path)
    running(c)
    [(_, status)] = c.command(What.PROMOTE, {"name": "m"}, REQUESTER, T0 + 5).answers
    assert status["outcome"] == "promoted" and status["done"]
    m = c.desired.models["m"]
    assert (m.version, m.canary, m.history) == (2, None, [1])

    start(c, T0 + 10, version=3)
    actions = c.command(What.ABORT, {"name": "m"}, REQUESTER, T0 + 11)
    assert actions.desired_changed and actions.answers[0][1]["outcome"] == "aborted"
    assert (m.version, m.canary) == (2, None)
    assert [r["outcome"] for r in c.rollouts(None, T0 + 12)["finished"]] == ["promoted", "aborted"]


def refused(c: Canaries, what, header, now=T0) -> CommandError:
    with pytest.raises(CommandError) as info:
        c.command(what, header, REQUESTER, now)
    return info.value


def test_refusals(tmp_path):
    c, _ = setup(tmp_path, on_share={"m": [1, 2], "new": [1]}, deployed={"m": ModelDeployment(1)})
    assert refused(c, What.PROMOTE, {"name": "m"}).code == ErrorCode.MODEL_NOT_FOUND
    assert "no canary of 'm' is running" in str(refused(c, What.ABORT, {"name": "m"}))
    error = refused(c, What.CANARY, {"name": "new"})
    assert error.code == ErrorCode.BAD_REQUEST and "deploy a first version" in str(error)
    error = refused(c, What.CANARY, {"name": "m", "version": 1})
    assert error.code == ErrorCode.BAD_REQUEST and "stable version" in str(error)
    assert refused(c, What.CANARY, {"name": "m", "version": 7}).code == ErrorCode.MODEL_NOT_FOUND
    for bad in (
        {"criteria": {"alpha": 2}},
        {"criteria": {"nonsense": 1}},
        {"steps": [50, 10]},
        {"steps": [0, 100]},
        {"steps": "10,50"},
        {"shadow": 1.5},
        {"step_seconds": -1},
        {"retry": "yes"},
    ):
        assert refused(c, What.CANARY, {"name": "m", **bad}).code == ErrorCode.BAD_REQUEST, bad
    assert c.desired.models["m"].canary is None, "nothing changed by a refusal"

    c.deployments.command("deploy", {"name": "m", "version": 2}, REQUESTER, now=0.0)
    assert refused(c, What.CANARY, {"name": "m"}).code == ErrorCode.OVERLOADED, "a rollout in progress"


def test_a_canary_blocks_deploy_and_rollback_and_undeploy_ends_it(tmp_path):
    c, _ = setup(tmp_path)
    start(c)
    assert refused(c, What.CANARY, {"name": "m", "version": 3}).code == ErrorCode.OVERLOADED
    for what in ("deploy", "rollback"):
        with pytest.raises(CommandError) as info:
            c.deployments.command(what, {"name": "m", "version": 3, "to": 1}, REQUESTER, now=0.0)
        assert info.value.code == ErrorCode.OVERLOADED and "promote or abort it first" in str(info.value)
    c.deployments.command("undeploy", {"name": "m"}, REQUESTER, now=0.0)
    c.tick(T0 + 1)
    record = c.rollouts("m", T0 + 1)["canaries"]["m"]
    assert record["outcome"] == "aborted" and record["reason"] == "undeployed" and c.runs == {}


def test_shadow_only_runs_of_the_stable_version_end_without_promoting(tmp_path):
    c, judge = setup(tmp_path)
    status = start(c, version=1, shadow_only=True)
    assert status["shadow"] > 0 and status["weight"] == 0, "a default mirrored fraction"
    serve_canary(c, version=1)
    c.tick(T0 + 1)
    assert c.desired.models["m"].canary.phase == "running" and c.desired.models["m"].canary.weight == 0
    assert refused(c, What.PROMOTE, {"name": "m"}, T0 + 1).code == ErrorCode.BAD_REQUEST
    judge.verdicts = [Verdict("pass", "floor p99 rel err 1e-7", {})]
    c.tick(T0 + 2)
    m = c.desired.models["m"]
    assert (m.version, m.canary, m.history) == (1, None, [])
    assert c.rollouts("m", T0 + 3)["canaries"]["m"]["outcome"] == "no drift"

    start(c, T0 + 10, version=2, shadow_only=True, shadow=0.5)
    serve_canary(c, version=2)
    c.tick(T0 + 11)
    judge.verdicts = [Verdict("rollback", "23% of pairs beyond tolerance", {})]
    c.tick(T0 + 12)
    assert c.desired.models["m"].version == 1
    assert c.rollouts("m", T0 + 13)["canaries"]["m"]["outcome"] == "drift"


def test_a_restarted_manager_resumes_the_run_at_its_step_from_the_saved_state(tmp_path):
    c, judge = setup(tmp_path)
    canary = running(c, step_seconds=30)
    judge.verdicts = [Verdict("pass", "ok", {})]
    c.tick(T0 + 5)
    assert canary.step == 1
    c.desired.save(tmp_path)

    saved = DesiredState.load(tmp_path)  # what a restarted manager reads back (manager.load_desired_state)
    assert saved.models["m"].canary == canary
    again, judge2 = setup(tmp_path / "again", deployed=saved.models)
    digest(again, "b1", canary.id, ok=(10, 10), now=T0 + 20)
    look = judge2.looks[-1]
    assert (look.step, look.weight, look.step_elapsed) == (1, 50, 15.0), "the step and its clock go on"
    status = again.rollouts("m", T0 + 20)["canaries"]["m"]
    assert status["phase"] == "running" and status["started"] == T0 + 1 and not status["done"]


def test_the_manager_keeps_a_canary_when_it_reads_the_state_back(tmp_path):
    from cluster.manager.manager import Manager

    canary = Canary(2, [10, 50, 100], "abc", step=1, step_started=T0, phase="running")
    DesiredState({"m": ModelDeployment(1, staged=3, canary=canary)}, 4).save(tmp_path)
    state = Manager.load_desired_state(type("M", (), {"share": str(tmp_path)})())
    assert state.models["m"].canary == canary and state.models["m"].staged is None


def test_a_canary_whose_start_cannot_be_saved_is_undone(tmp_path):
    c, _ = setup(tmp_path)
    agreed = DesiredState.from_wire(c.desired.to_wire())
    start(c)
    undo, reverted = c.deployments.revert(agreed, "disk full")
    assert reverted == {"m"} and c.desired.models["m"].canary is None
    c.tick(T0 + 1)
    assert c.runs == {} and c.rollouts("m", T0 + 1)["canaries"]["m"]["outcome"] == "aborted"


def test_a_step_that_cannot_be_saved_goes_back_and_the_run_goes_on(tmp_path):
    c, judge = setup(tmp_path)
    canary = running(c)
    agreed = DesiredState.from_wire(c.desired.to_wire())
    judge.verdicts = [Verdict("pass", "ok", {})]
    c.tick(T0 + 5)
    assert c.desired.models["m"].canary.step == 1
    c.deployments.revert(agreed, "disk full")
    restored = c.desired.models["m"].canary
    assert restored.id == canary.id and restored.step == 0 and restored.phase == "running"
    c.tick(T0 + 6)
    assert c.runs["m"].id == canary.id


def test_a_promote_that_cannot_be_saved_restores_the_run(tmp_path):
    c, _ = setup(tmp_path)
    canary = running(c)
    agreed = DesiredState.from_wire(c.desired.to_wire())
    c.command(What.PROMOTE, {"name": "m"}, REQUESTER, T0 + 5)
    c.deployments.revert(agreed, "disk full")
    assert c.desired.models["m"].version == 1 and c.desired.models["m"].canary.id == canary.id
    status = c.rollouts("m", T0 + 6)["canaries"]["m"]
    assert status["outcome"] == "running" and [r["id"] for r in c.rollouts("m", T0 + 6)["finished"]] == []


def test_a_canary_with_no_agent_heard_keeps_loading_for_an_expiry_after_the_manager_starts(tmp_path):
    """A manager (re)started mid-load has heard no beat yet: "nobody to wait for" means nothing until an expiry has
    passed (every live agent has beaten by then), so the step's clock does not start with nobody serving it."""
    c, _ = setup(tmp_path, settle=3.0)
    c.deployments.registry.agents.clear()  # (no beat heard)
    start(c, time.time(), version=2)
    c.tick(time.time())
    assert c.desired.models["m"].canary.phase == "loading", "no beat heard yet: wait"
    serve_canary(c)
    c.tick(time.time())
    assert c.desired.models["m"].canary.phase == "running", "an agent serves it: no need to wait longer"


def test_an_undone_save_never_brings_back_a_canary_that_ended(tmp_path):
    """A rollback (or abort) the share would not save is not undone: ending a canary is always safe, where running
    a bad one again until the share takes the file is not. (A promote is undone: see above.)"""
    c, _ = setup(tmp_path)
    running(c)
    agreed = DesiredState.from_wire(c.desired.to_wire())
    c.command(What.ABORT, {"name": "m"}, REQUESTER, T0 + 5)
    _, reverted = c.deployments.revert(agreed, "disk full")
    assert c.desired.models["m"].canary is None and c.desired.models["m"].version == 1 and not reverted


def test_a_failing_judge_leaves_the_run_waiting_for_a_command(tmp_path):
    c, _ = setup(tmp_path)

    class Broken:
        def __init__(self, criteria):
            pass

        def look(self, look):
            raise NotImplementedError

    c.judge = Broken
    running(c)
    assert not c.tick(T0 + 5).desired_changed
    status = c.rollouts("m", T0 + 5)["canaries"]["m"]
    assert status["outcome"] == "running" and "judge failed" in status["look"]["reason"]
    c.command(What.ABORT, {"name": "m"}, REQUESTER, T0 + 6)
    assert c.desired.models["m"].canary is None


# ---- the manager's I/O shell, in-process (tests/test_manager_state.py's idiom: the real Manager, no loop) ----------

from cluster import protocol  # noqa: E402
from cluster.protocol import Command  # noqa: E402
from tests.test_manager_state import manager, query, share  # noqa: E402, F401


def test_the_manager_answers_canary_at_once_saves_it_and_shows_it_in_rollouts(manager, share):  # noqa: F811 (the fixtures)
    cmd, header = query(manager, "canary", name="m", steps=[20, 100], step_seconds=1.5, criteria={"alpha": 0.05})
    assert cmd == Command.REPLY, header
    status = header["result"]
    assert (status["model"], status["version"], status["stable"], status["phase"]) == (
        "m",
        2,
        1,
        "loading",
    )  # no agent heard yet: it waits for one (a manager just restarted has heard none)
    saved = DesiredState.load(share).models["m"].canary
    assert saved.id == status["id"] and saved.steps == [20, 100] and saved.criteria == {"alpha": 0.05}
    assert manager.events_sent[-1]["state"]["models"]["m"]["canary"]["id"] == status["id"], "published"
    cmd, header = query(manager, "rollouts", name="m")
    assert header["result"]["canaries"]["m"]["id"] == status["id"] and header["result"]["in_progress"] == 0
    cmd, header = query(manager, "deploy", name="m", version=2)
    assert cmd == Command.ERROR and header["code"] == "OVERLOADED" and "promote or abort" in header["message"]
    cmd, header = query(manager, "publish_check", name="m", file="model.pt")
    assert cmd == Command.ERROR and header["code"] == "OVERLOADED", header
    cmd, header = query(manager, "abort", name="m")
    assert cmd == Command.REPLY and header["result"]["outcome"] == "aborted"
    assert DesiredState.load(share).models["m"].canary is None
    cmd, header = query(manager, "abort", name="m")
    assert cmd == Command.ERROR and header["code"] == "MODEL_NOT_FOUND" and "no canary of 'm'" in header["message"]


def test_a_digest_on_the_heartbeat_socket_reaches_the_judge_and_a_trip_rolls_back(manager, share):  # noqa: F811 (the fixtures)
    judge = ScriptedJudge()
    manager.canaries.judge = judge
    status = query(manager, "canary", name="m")[1]["result"]
    manager.carry_out(manager.canaries.tick(time.time()))
    assert manager.deployments.desired.models["m"].canary.phase == "loading", "no agent serves it yet"
    serving = beat("a", serves=[("m", 1), ("m", 2)]).to_wire()
    manager.process_heartbeat(protocol.message(Command.HEARTBEAT, serving))
    manager.carry_out(manager.canaries.tick(time.time()))
    assert manager.deployments.desired.models["m"].canary.phase == "running"
    wire = ModelDigest(status["id"], {0: StepDigest({2: VersionDigest(ok=5)})}, None, 10).to_wire()
    event = CanaryDigest("b1", "i1", 1, {"m": wire}).to_wire()
    manager.process_heartbeat(protocol.message(Command.EVENT, event))
    assert judge.looks[-1].steps[0].versions[2].ok == 5
    wire["tripped"] = "25 of the last 50 failed"
    manager.process_heartbeat(protocol.message(Command.EVENT, CanaryDigest("b1", "i1", 2, {"m": wire}).to_wire()))
    assert DesiredState.load(share).models["m"].canary is None, "rolled back, and saved"
    status = query(manager, "rollouts")[1]["result"]["canaries"]["m"]
    assert status["outcome"] == "rolled back" and "circuit breaker at broker b1" in status["decisions"][-1]["reason"]


def test_a_publish_with_canary_starts_a_canary_of_the_new_version(manager, share):  # noqa: F811 (the fixtures)
    canary = {"steps": [10, 50, 100], "shadow": 0.2}
    cmd, header = query(manager, "publish_check", name="m", file="model.pt", canary={"steps": [50, 10]})
    assert cmd == Command.ERROR and header["code"] == "BAD_REQUEST" and "'steps' must rise" in header["message"]
    assert query(manager, "publish", b"new bytes", name="m", file="model.pt", canary=canary) is None
    wait_for(
        lambda: manager.finish_publishing(time.monotonic()) or "m" not in manager.publishing, 30, "the version written"
    )
    cmd, header = manager.sent[-1]
    assert cmd == Command.REPLY, header
    status = header["result"]
    assert (status["version"], status["stable"], status["shadow"]) == (3, 1, 0.2)
    assert status["phase"] == "loading", "waits for an agent to serve it"
    assert DesiredState.load(share).models["m"].version == 1, "not deployed: judged first"


def test_a_manager_restarted_mid_canary_resumes_it(share):  # noqa: F811 (the fixtures)
    from cluster.config import Addresses
    from cluster.manager.manager import Manager
    from cluster.role_settings import ManagerSettings

    canary = Canary(2, [10, 50, 100], "abcd", step=1, step_started=time.time() - 5, phase="running")
    DesiredState({"m": ModelDeployment(1, canary=canary)}, 4).save(share)
    again = Manager(ManagerSettings(share=str(share), addresses=Addresses(manager_queries="inproc://canary-restart")))
    try:
        judge = ScriptedJudge()
        again.canaries.judge = judge
        again.canaries.tick(time.time())
        assert judge.looks[-1].step == 1 and judge.looks[-1].weight == 50 and judge.looks[-1].step_elapsed >= 5
    finally:
        again.close()
