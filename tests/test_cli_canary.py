"""`cluster canary`, `promote`, `abort`, `rollouts [--watch]` and `deploy --canary` (issue 21), run with typer's
CliRunner against a real Manager (its loop in a thread, on 127.0.0.1, over a tmp share; no agents, so a run is
served at once), with a scripted judge standing in for cluster.canary.judge.Judge."""

from __future__ import annotations

import json
import threading

import pytest
import typer
from typer.testing import CliRunner

from cluster.canary.judge import Verdict
from cluster.cli import app
from cluster.cli.canary import look_line, parse_duration, parse_steps, run_fields
from cluster.config import Addresses
from cluster.desired import DesiredState, ModelDeployment
from cluster.manager.client import ManagerClient
from cluster.manager.manager import Manager
from cluster.role_settings import ManagerSettings
from cluster.sockets import bound_address

CONFIG = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


class ScriptedJudge:
    """`Judge(criteria).look(look)`: the next scripted verdict, then "continue" (called from the manager's thread)."""

    def __init__(self, *verdicts: Verdict, gate=lambda: True) -> None:
        self.verdicts = list(verdicts)
        self.lock = threading.Lock()
        self.gate = gate  # the verdicts wait until it says True

    def __call__(self, criteria):
        return self

    def look(self, look):
        with self.lock:
            if self.verdicts and self.gate():
                return self.verdicts.pop(0)
        return Verdict("continue", f"waiting ({look.weight}%)", {"versions": {1: {"requests": 7, "error_rate": 0.0}}})


@pytest.fixture
def live(tmp_path):
    """A running manager over a share with m v1 deployed and v2 on it; yields (manager, its query address)."""
    for version in (1, 2):
        (tmp_path / "models" / "m" / str(version)).mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text(json.dumps(CONFIG))
    DesiredState({"m": ModelDeployment(1)}, generation=1).save(tmp_path)
    local = {f: "tcp://127.0.0.1:0" for f in ("manager_events", "manager_heartbeats", "manager_queries")}
    manager = Manager(ManagerSettings(share=str(tmp_path), addresses=Addresses(**local)))
    manager.canaries.judge = ScriptedJudge()
    manager.canaries.settle_until = 0.0  # no agent will beat: a run need not wait an expiry to know that
    thread = threading.Thread(target=manager.run, daemon=True)
    thread.start()
    yield manager, bound_address(manager.queries)
    manager.stop()
    thread.join(10)
    assert not thread.is_alive(), "the manager did not stop"


def cli(*args: str) -> tuple[int, str]:
    out = CliRunner().invoke(app, list(args))
    return out.exit_code, out.output


def test_durations_and_steps():
    assert [parse_duration(t) for t in ("30s", "2m", "500ms", "1.5", "1h", " 7 ")] == [30, 120, 0.5, 1.5, 3600, 7]
    assert parse_steps("10,50,100") == [10, 50, 100]
    for bad in ("30x", "", "-1s", "s"):
        with pytest.raises(typer.BadParameter):
            parse_duration(bad)
    for bad in ("50,10", "0,100", "10,101", "ten"):
        with pytest.raises(typer.BadParameter):
            parse_steps(bad)
    fields = run_fields("10,100", "500ms", None, False, True, None, 0, None)  # --min-requests 0 is a value
    assert fields == {"steps": [10, 100], "step_seconds": 0.5, "shadow_only": False, "retry": False,
                      "criteria": {"min_requests": 0}}  # fmt: skip
    fields = run_fields(None, None, None, False, False, 0.05, None, None, ["latency_floor_ms=0", "p99_ratio=3.5"])
    assert fields["criteria"] == {"alpha": 0.05, "latency_floor_ms": 0, "p99_ratio": 3.5}
    for bad in ("latency_floor_ms", "no_such=1", "alpha=2", "p99_ratio=x"):
        with pytest.raises(typer.BadParameter, match="--criterion"):
            run_fields(None, None, None, False, False, None, None, None, [bad])


def test_canary_rollouts_and_promote(live):
    manager, address = live
    code, out = cli("canary", "m", "--version", "2", "--canary", "20,100", "--step", "2m", "--alpha", "0.05",
                    "--manager", address)  # fmt: skip
    assert code == 0 and "canary " in out and "of m v2 beside v1" in out and "120 s each" in out, out
    canary = manager.deployments.desired.models["m"].canary
    assert canary.steps == [20, 100] and canary.step_seconds == 120 and canary.criteria == {"alpha": 0.05}

    code, out = cli("rollouts", "m", "--manager", address)
    assert code == 0 and "m v2 vs v1" in out and "step 1/2 20%" in out and "start" in out, out
    code, out = cli("canary", "m", "--manager", address)
    assert code == 2 and "is running; promote or abort it first" in out, out

    code, out = cli("promote", "m", "--manager", address)
    assert code == 0 and "promoted m v2 (was v1)" in out, out
    assert DesiredState.load(manager.share).models["m"].version == 2
    code, out = cli("rollouts", "--manager", address)
    assert code == 0 and "PROMOTED: promoted by command" in out, out


def test_abort_and_a_promote_without_a_canary(live):
    manager, address = live
    assert cli("canary", "m", "--manager", address)[0] == 0
    code, out = cli("abort", "m", "--manager", address)
    assert code == 0 and "aborted the canary of m v2; v1 serves everything" in out, out
    code, out = cli("promote", "m", "--manager", address)
    assert code == 2 and "no canary of 'm' is running" in out, out
    code, out = cli("canary", "m", "--step", "soon", "--manager", address)
    assert code == 2 and "'soon' is not a duration" in out, out


def test_canary_wait_follows_the_run_to_its_outcome(live):
    manager, address = live
    polls = []  # the CLI's rollouts queries: the run stays at 10% until it has asked twice
    rollouts = manager.canaries.rollouts
    manager.canaries.rollouts = lambda name, now: polls.append(name) or rollouts(name, now)
    manager.canaries.judge = ScriptedJudge(
        Verdict("pass", "clean at 10%", {}), Verdict("pass", "clean", {}), gate=lambda: len(polls) >= 2
    )
    code, out = cli("canary", "m", "--wait", "--step", "0", "--manager", address)
    assert code == 0 and "PROMOTED: 50% passed: clean" in out, out
    assert "step 1/3 10% running" in out, out
    manager.canaries.judge = ScriptedJudge(Verdict("rollback", "errors: log BF 6.1 >= 4.6", {}))
    ManagerClient(address).call("rollback", timeout=10, name="m", to=1)  # (no agents: done at once)
    code, out = cli("canary", "m", "--version", "2", "--wait", "--manager", address)
    assert code == 1 and "ROLLED BACK: errors: log BF 6.1 >= 4.6" in out, out


def test_rollouts_watch_prints_each_new_look_until_the_run_is_over(live):
    manager, address = live
    manager.canaries.judge = ScriptedJudge(
        Verdict("continue", "one", {}), Verdict("continue", "two", {}), Verdict("rollback", "too slow", {})
    )
    ManagerClient(address).call("canary", timeout=10, name="m")
    code, out = cli("rollouts", "m", "--watch", "--manager", address)
    assert code == 0 and out.strip().splitlines()[-1].endswith("ROLLED BACK: too slow"), out
    code, out = cli("rollouts", "other", "--watch", "--manager", address)
    assert code == 0 and "no canary run of other to watch" in out, out


def test_deploy_with_canary_publishes_and_starts_a_canary(live, tmp_path):
    manager, address = live
    model = tmp_path / "model.pt"
    model.write_bytes(b"new bytes")
    code, out = cli("deploy", str(model), "--name", "m", "--canary", "10,50,100", "--shadow", "0.2",
                    "--manager", address)  # fmt: skip
    assert code == 0 and "published m version 3" in out and "of m v3 beside v1" in out and "shadow 0.2" in out, out
    assert manager.deployments.desired.models["m"].canary.version == 3
    code, out = cli("deploy", str(model), "--name", "m", "--shadow", "0.2", "--manager", address)
    assert code == 2 and "give --canary 10,50,100 (or --shadow-only)" in out, out


def test_a_look_line_has_the_figures():
    status = {
        "model": "m",
        "version": 2,
        "stable": 1,
        "steps": [10, 50, 100],
        "step": 1,
        "weight": 50,
        "phase": "running",
        "look": {
            "decision": "continue",
            "reason": "waiting",
            "figures": {
                "versions": {"1": {"requests": 900, "error_rate": 0.001, "p99_ms": 12.5}, "2": {"requests": 100}},
                "errors": {"log_bf": 1.2, "threshold": 4.6},
                "latency": {"basis": "service", "z": 0.4, "p": 0.34, "median_ratio": 1.02, "p99_ratio": 1.1},
                "shadow": {"pairs": 40, "drift_rate": 0.0, "top1_agreement": 1.0},
            },
        },
    }
    line = look_line(status)
    for part in (
        "m v2 vs v1",
        "step 2/3 50%",
        "v1: 900 req, 0.10% err, p99 12.5 ms",
        "v2: 100 req, - err, p99 - ms",
        "log BF 1.20/4.60",
        "U(service) z 0.40 p 0.34 ratio 1.02/1.10",
        "shadow 40 pairs, drift 0.00%, top-1 100.00%",
        "continue: waiting",
    ):
        assert part in line, (part, line)


def test_deploy_with_canary_and_share_publishes_there_then_starts_a_canary(live, tmp_path):
    manager, address = live
    model = tmp_path / "model.pt"
    model.write_bytes(b"other bytes")
    args = ["deploy", str(model), "--name", "m", "--canary", "25,100", "--share", manager.share, "--manager", address]
    code, out = cli(*args)
    assert code == 0 and "published m version 3" in out and "of m v3 beside v1" in out, out
    assert (tmp_path / "models" / "m" / "3").is_dir() and manager.deployments.desired.models["m"].canary.steps == [
        25,
        100,
    ]
    code, out = cli(*args)
    assert code == 2 and "a canary of 'm' (v3) is running" in out, out
    assert not (tmp_path / "models" / "m" / "4").exists(), "refused before publishing"
