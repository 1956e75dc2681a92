"""cluster.supervisor.Supervisor in-process, on a fake clock: backoff, its reset, crash-loop give-up, clean exits."""

from __future__ import annotations

import signal

import pytest

from cluster.config import RestartPolicy, restart_policy_from_env
from cluster.supervisor import CLEAN, GIVE_UP, RESTART, Supervisor, describe_status, is_clean

KILLED = -signal.SIGKILL
POLICY = RestartPolicy(backoff_initial=0.5, backoff_max=10.0, backoff_reset=10.0, crash_window=60.0, crash_restarts=5)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def _crash_and_restart(sup: Supervisor, clock: Clock, name: str, uptime: float, status: int = KILLED):
    """`name` runs `uptime` s, dies with `status`; if the decision is a restart, wait for it to be due and restart."""
    clock.advance(uptime)
    decision = sup.exited(name, clock(), status)
    if decision.action == RESTART:
        assert sup.due(clock()) == [] or decision.delay == 0, "due before its backoff"
        assert sup.next_due() == pytest.approx(clock() + decision.delay)
        clock.advance(decision.delay)
        assert sup.due(clock()) == [name]
        assert sup.due(clock()) == [], "a due restart is handed out once"
        sup.started(name, clock())
    return decision


def test_a_failure_is_restarted_with_a_backoff_that_doubles_up_to_the_maximum():
    clock = Clock()
    sup = Supervisor(RestartPolicy(backoff_initial=0.5, backoff_max=3.0, crash_restarts=100))
    sup.started("agent-1", clock())
    delays = [_crash_and_restart(sup, clock, "agent-1", uptime=0.2).delay for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert sup.given_up() == []


def test_the_backoff_starts_again_after_the_process_stayed_up_long_enough():
    clock = Clock()
    # no crash loop here, and no decay: only the reset
    sup = Supervisor(RestartPolicy(backoff_reset=10.0, backoff_decay=0.0, crash_restarts=100))
    sup.started("broker-1", clock())
    assert [_crash_and_restart(sup, clock, "broker-1", 1.0).delay for _ in range(3)] == [0.5, 1.0, 2.0]
    assert _crash_and_restart(sup, clock, "broker-1", uptime=9.9).delay == 4.0, "9.9 s is not long enough"
    assert _crash_and_restart(sup, clock, "broker-1", uptime=10.0).delay == 0.5, "10 s up resets the backoff"
    assert _crash_and_restart(sup, clock, "broker-1", uptime=1.0).delay == 1.0


def test_a_process_that_served_between_kills_restarts_fast():
    """Issue 18: the broker killed every 8-10 s (up about 8 s each time) waited 8.6 s to restart at the 5th kill,
    because only 10 s up reset the backoff. Each 2 s up now takes one doubling back (default policy)."""
    clock = Clock()
    sup = Supervisor(RestartPolicy(crash_restarts=100))
    sup.started("broker-1", clock())
    delays = [_crash_and_restart(sup, clock, "broker-1", uptime=8.0).delay for _ in range(8)]
    assert delays == [0.5] * 8, f"a process up 8 s between kills should restart at once each time: {delays}"
    # up 3 s between kills: one doubling taken back each time, so the delay stays low
    sup.started("broker-2", clock())
    delays = [_crash_and_restart(sup, clock, "broker-2", uptime=3.0).delay for _ in range(6)]
    assert max(delays) <= 1.0, delays


def test_a_process_that_dies_within_seconds_of_its_start_still_backs_off_and_is_given_up_on():
    clock = Clock()
    sup = Supervisor(RestartPolicy())  # the defaults: decay 2 s, crash loop 5 restarts in 60 s
    sup.started("manager-0", clock())
    decisions = [_crash_and_restart(sup, clock, "manager-0", uptime=1.5, status=1) for _ in range(6)]
    assert [d.delay for d in decisions[:5]] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert decisions[-1].action == GIVE_UP


def test_a_crash_loop_is_given_up_on_after_five_restarts_within_the_window():
    clock = Clock()
    sup = Supervisor(POLICY)
    sup.started("manager-0", clock())
    decisions = [_crash_and_restart(sup, clock, "manager-0", uptime=0.1, status=3) for _ in range(6)]
    assert [d.action for d in decisions] == [RESTART] * 5 + [GIVE_UP]
    assert [d.restarts for d in decisions] == [1, 2, 3, 4, 5, 5]
    assert decisions[-1].how == "exit status 3" and decisions[-1].status == 3
    assert sup.given_up() == ["manager-0"]
    assert sup.next_due() is None and sup.due(clock.advance(100)) == [], "a process given up on is not restarted"


def test_restarts_spread_wider_than_the_window_are_not_a_crash_loop():
    clock = Clock()
    sup = Supervisor(POLICY)
    sup.started("edge-4", clock())
    for _ in range(20):  # up 15 s each time: 4 restarts in any 60 s, never 5
        decision = _crash_and_restart(sup, clock, "edge-4", uptime=15.0)
        assert decision.action == RESTART and decision.delay == 0.5, decision
    assert sup.given_up() == []


def test_crash_loop_counts_within_the_window_even_with_reset_backoff():
    """Up 11 s each time (past the backoff reset) but 5 restarts within 60 s: still a crash loop."""
    clock = Clock()
    sup = Supervisor(POLICY)
    sup.started("agent-2", clock())
    decisions = [_crash_and_restart(sup, clock, "agent-2", uptime=11.0) for _ in range(6)]
    assert [d.delay for d in decisions[:5]] == [0.5] * 5
    assert decisions[-1].action == GIVE_UP


@pytest.mark.parametrize("status", [0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP, -signal.SIGPIPE])
def test_a_clean_exit_is_not_restarted(status):
    clock = Clock()
    sup = Supervisor(POLICY)
    sup.started("agent-1", clock())
    decision = sup.exited("agent-1", clock.advance(3.0), status)
    assert decision.action == CLEAN and decision.uptime == 3.0
    assert sup.next_due() is None and sup.due(clock.advance(100)) == [] and sup.given_up() == []


def test_processes_are_supervised_each_on_its_own():
    clock = Clock()
    sup = Supervisor(POLICY)
    for name in ("agent-1", "agent-2"):
        sup.started(name, clock())
    clock.advance(1.0)
    assert sup.exited("agent-1", clock(), KILLED).delay == 0.5
    assert sup.exited("agent-1", clock(), 1).action == RESTART  # a restart that failed at once
    assert sup.exited("agent-2", clock.advance(0.1), -signal.SIGSEGV).delay == 0.5, "agent-2's first failure"
    assert sup.due(clock.advance(0.5)) == ["agent-2"], "agent-1 waits 1 s, its second failure in a row"
    assert sup.due(clock.advance(0.5)) == ["agent-1"]


def test_describe_status():
    assert describe_status(0) == "exit status 0" and describe_status(3) == "exit status 3"
    assert describe_status(-9) == "killed by SIGKILL" and describe_status(-11) == "killed by SIGSEGV"
    assert describe_status(None) == "exit status unknown"
    assert is_clean(0) and is_clean(-15) and not is_clean(1) and not is_clean(-9) and not is_clean(None)


def test_restart_policy_from_the_environment():
    assert restart_policy_from_env({}) == RestartPolicy()
    policy = restart_policy_from_env({"CLUSTER_RESTART_BACKOFF_MAX": "5", "CLUSTER_RESTART_CRASH_RESTARTS": "3"})
    assert policy.backoff_max == 5.0 and policy.crash_restarts == 3
    with pytest.raises(ValueError):
        restart_policy_from_env({"CLUSTER_RESTART_BACKOFF_INITIAL": "20"})  # above the maximum
    with pytest.raises(ValueError):
        restart_policy_from_env({"CLUSTER_RESTART_CRASH_RESTARTS": "0"})
