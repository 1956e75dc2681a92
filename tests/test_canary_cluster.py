"""Canary and shadow rollouts on real processes (issue 21, tests 1-6).

Each test starts a manager, a broker and two agents serving `scaled` (tests/models.py Scaled: y = 2x, one version per
behaviour: the same answers, raising for a third of its inputs, 3x slower, perturbed weights), keeps requests in
flight through one AsyncClient (bench/canary.py Load: request k carries k, its answer is checked) and drives canaries
through the manager's QUERY canary / rollouts. The scenarios of tests 2 and 3, and their figures, are
bench/canary.py's (`python3 -m bench.canary all` prints the same); here they are asserted. Steps are short
(step_seconds, min_requests through the criteria) so each test runs in seconds.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from scipy.stats import binom

from bench import canary as bench
from bench.canary import CanaryCluster, Load, decision
from tests.harness import REPO_ROOT, wait_for
from tests.models import Scaled

pytestmark = pytest.mark.cluster

# Test 2: the issue asks for a rollback within 2 s at about 1,000 req/s (start decision -> rollback decision). The
# judge's error test needs a few tens of canary errors at 10% x 1/3 of 1,000 req/s (33 errors/s).
DECIDE_BOUND_S = 2.0


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


def run_cli(cc: CanaryCluster, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        env=cc.cluster.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def test_good_canary_goes_10_50_100_with_no_failed_request_and_the_old_version_unloaded(workdir):
    """Through the CLI: `cluster canary --wait` follows the run and exits 0 once promoted; `cluster rollouts` shows
    its decisions."""
    with CanaryCluster(workdir, [Scaled(), Scaled()]) as cc:
        with Load(cc.cluster.addresses.broker_clients, in_flight=16, rate=400) as load:
            load.wait_answers(200)
            out = run_cli(cc, "canary", bench.MODEL, "--version", "2", "--canary", "10,50,100", "--step", "1s",
                          "--min-requests", "30", "--wait")  # fmt: skip
            print(f"\n$ cluster canary ... --wait\n{out.stdout}{out.stderr}")
            assert out.returncode == 0, out.stdout + out.stderr
            status = cc.wait_done(2, timeout=10)
            load.wait_answers(200)
        shown = run_cli(cc, "rollouts", bench.MODEL)
        print(f"$ cluster rollouts {bench.MODEL}\n{shown.stdout}{shown.stderr}")
        assert shown.returncode == 0 and "promote" in shown.stdout, shown.stdout + shown.stderr
        summary = load.summary()
        print(f"\ngood canary: {summary}; decisions {[(d['decision'], d['weight']) for d in status['decisions']]}")
        assert status["outcome"] == "promoted", status
        steps = [(d["decision"], d["weight"]) for d in status["decisions"]]
        assert steps == [("start", 10), ("pass", 10), ("promote", 50)], steps  # 100 is the promotion
        assert summary["failed"] == 0 and summary["wrong"] == 0, summary
        assert summary["versions"].get(2, 0) > 0, f"the canary answered nothing: {summary}"
        assert load.records[-1][2] == 2, "the last answers did not come from the promoted version"
        deployments = cc.manager.call("deployments")
        assert deployments[bench.MODEL]["version"] == 2, deployments
        wait_for(lambda: all(v == [2] for v in cc.served().values()), 15, "every agent to serve v2 only (v1 unloaded)")


@pytest.mark.parametrize("retry", [True, False], ids=["retry-on-stable", "retry-off"])
def test_raising_canary_is_rolled_back_within_2_s_at_full_load(workdir, retry):
    f = bench.raising_run(workdir, retry)
    bench.show_raising(f)
    print(f"\nraising canary, retry {retry}: {f}")
    assert f["outcome"] == "rolled back", f
    assert f["wrong"] == 0, f
    assert f["decide_s"] is not None and f["decide_s"] <= DECIDE_BOUND_S, (
        f"decided in {f['decide_s']} s (bound {DECIDE_BOUND_S} s): {f}"
    )
    assert f["rate"] >= 500, f"the load was {f['rate']:.0f} req/s, far under the 1,000 asked for: {f}"
    if retry:
        assert f["failed"] == 0, f"{f['failed']} requests failed with retry on stable: {f}"
    else:
        # every third canary request failed, each seen by its client, until the brokers heard the rollback: about
        # weight x 1/3 x rate x time to decide (plus what was in flight at the canary then)
        expected = f["expected_failures"]
        assert 0 < f["failed"] <= 3 * expected + bench.IN_FLIGHT, (
            f"{f['failed']} failed; expected about {expected:.0f}: {f}"
        )


@pytest.mark.parametrize("steps,basis", [((50, 100), "service"), ((10, 50, 100), "compute")], ids=["at-50", "at-10"])
def test_3x_slower_canary_is_rolled_back_on_latency_at_its_first_step(workdir, steps, basis):
    f = bench.slow_run(workdir, steps=steps)
    bench.show_slow(f)
    print(f"\n3x slower canary from {steps[0]}%: {f}")
    assert f["outcome"] == "rolled back", f
    assert f["rollback_weight"] == steps[0], f"rolled back at {f['rollback_weight']}%, not {steps[0]}%: {f}"
    assert "latenc" in (f["reason"] or "").lower(), f"not rolled back on latency: {f}"
    latency = ((f.get("looks") or {}).get("figures") or {}).get("latency") or {}
    assert latency.get("basis") == basis, f"latency judged on {latency.get('basis')}, not {basis}: {f}"
    # within one look of having enough answers (Criteria.latency_min, 30): the looks come every digest interval
    # (0.25 s), each with about rate x weight x 0.25 more canary answers; two looks' worth of slack
    one_look = f["rate"] * steps[0] / 100 * 0.25
    assert latency["canary_n"] <= 30 + 2 * one_look + 5, f"decided after {latency['canary_n']} canary answers: {f}"
    assert f["failed"] == 0, f
    assert f["decide_s"] is not None and f["decide_s"] < 10, f


def test_manager_killed_mid_canary_brokers_keep_the_split_the_breaker_trips_and_the_step_resumes(workdir):
    """A good canary at 50% (step_seconds 6) keeps getting its share while the manager is dead, and the restarted
    manager resumes the step where it was (it passes 6 s after the step began, not after the restart). Then an
    always-raising canary (retry off), started with no traffic, gets traffic only once the manager is dead: each
    broker's circuit breaker stops it after 20 failures in a row, and the restarted manager rolls it back."""
    step_seconds = 6.0
    with CanaryCluster(workdir, [Scaled(), Scaled(), Scaled(fail_every=1)]) as cc:
        manager = cc.cluster.procs[0]
        with Load(cc.cluster.addresses.broker_clients, in_flight=8, rate=300) as load:
            load.wait_answers(100)
            cc.canary(2, steps=[50, 100], step_seconds=step_seconds, criteria={"min_requests": 20})
            cc.wait_running(2)
            load.wait_answers(50, version=2)
            cc.cluster.kill(manager)
            killed, dead_since = time.time(), time.monotonic()
            load.wait_answers(200, version=2)  # the brokers keep the 50% split without the manager
            manager = cc.cluster.start_manager()
            restarted = time.time()
            while_dead = load.summary(since=dead_since, until=time.monotonic())
            resumed = cc.wait_status(lambda s: s["version"] == 2, 10, "the restarted manager to report the canary")
            done = cc.wait_done(2, timeout=30)
        start = decision(done, "start")
        print(
            f"\nmanager killed {killed - start['at']:.1f} s into the step, back at {restarted - start['at']:.1f} s;"
            f" decisions {done['decisions']}"
        )
        if not resumed["done"]:  # (it may pass at once, if the step's time was over)
            assert resumed["step"] == 0 and resumed["weight"] == 50 and resumed["phase"] == "running", resumed
        assert while_dead["versions"].get(2, 0) >= 200 and while_dead["versions"].get(1, 0) > 0, while_dead
        assert done["outcome"] == "promoted", done
        passed = decision(done, "pass") or decision(done, "promote")
        assert [d["decision"] for d in done["decisions"]].count("start") == 1, done["decisions"]
        assert passed["at"] - start["at"] < (restarted - start["at"]) + step_seconds - 1.0, (
            f"the step began again at the restart: {done['decisions']} (restarted at {restarted})"
        )
        assert load.summary()["failed"] == 0, load.summary()

        # the breaker, with the manager away
        cc.canary(3, steps=[50, 100], step_seconds=600.0, retry=False)
        cc.wait_running(3)
        cc.cluster.kill(manager)
        with Load(cc.cluster.addresses.broker_clients, in_flight=4, rate=300) as load:
            load.wait_answers(400)
            tripped_at = load.summary()["failed"]
            load.wait_answers(400)
            figures = load.summary()
        print(f"always-raising canary, manager dead, retry off: {figures}")
        breaker = 20  # Criteria.breaker_consecutive
        assert breaker <= figures["failed"] <= breaker + 4 + 4, f"the breaker did not stop the canary: {figures}"
        assert figures["failed"] == tripped_at, f"failures went on after the breaker tripped: {figures}"
        cc.cluster.start_manager()
        done = cc.wait_done(3, timeout=30)
        reason = decision(done, "rollback")["reason"]
        print(f"the restarted manager: {done['outcome']}: {reason}")
        # on the breaker's report, or on the error counts of a digest the broker queued while the manager was down
        # (it may be judged first): either way the canary is rolled back once the manager is back
        assert done["outcome"] == "rolled back" and ("breaker" in reason or "errors" in reason), done


def test_canary_share_at_10_percent_within_binomial_bounds(workdir):
    n = 2000
    with CanaryCluster(workdir, [Scaled(), Scaled()]) as cc:
        # the split is under test, not the judge: no latency verdict (at full load, an identical sub-millisecond
        # model's per-batch compute times differed by 1.5x and more at the 10% step: the judge rolled it back)
        cc.canary(2, steps=[10, 100], step_seconds=600.0, criteria={"latency_ratio": 1000})
        cc.wait_running(2)
        with Load(cc.cluster.addresses.broker_clients, in_flight=8) as probe:  # the brokers have the weight
            probe.wait_answers(1, version=2)
        with Load(cc.cluster.addresses.broker_clients, in_flight=8) as load:
            wait_for(lambda: load.count() >= n, 60, f"{n} answers")
        records = load.records[:n]
        canary = sum(1 for r in records if r[2] == 2)
        low, high = binom.ppf(0.0005, n, 0.1), binom.ppf(0.9995, n, 0.1)
        print(f"\ncanary answered {canary} of {n} unpinned requests at weight 10% (99.9% bounds {low:.0f}..{high:.0f})")
        assert all(r[3] == "ok" for r in records), [r for r in records if r[3] != "ok"][:5]
        assert low <= canary <= high, f"{canary} of {n} outside [{low}, {high}]; the run: {cc.status()}"
        pinned = [r for r in records if r[2] not in (1, 2)]
        assert not pinned, pinned[:5]


def test_shadow_with_perturbed_weights_drifts_and_a_shadow_of_itself_does_not(workdir):
    with CanaryCluster(workdir, [Scaled(), Scaled(scale=2.02)]) as cc:
        criteria = {"min_pairs": 100}
        with Load(cc.cluster.addresses.broker_clients, in_flight=8, rate=400) as load:
            load.wait_answers(100)
            cc.canary(2, shadow=0.5, shadow_only=True, step_seconds=1.0, criteria=criteria)
            drift = cc.wait_done(2, timeout=60)
            cc.canary(1, shadow=0.5, shadow_only=True, step_seconds=1.0, criteria=criteria)
            floor = cc.wait_done(1, timeout=60)
        summary = load.summary()
        shadow = lambda s: ((s.get("look") or {}).get("figures") or {}).get("shadow")  # noqa: E731
        print(
            f"\nshadow of v2 (outputs 1% off): {drift['outcome']} {shadow(drift)}; of v1 itself: {floor['outcome']}"
            f" {shadow(floor)}"
        )
        assert drift["outcome"] == "drift", drift
        assert floor["outcome"] == "no drift", floor
        assert summary["failed"] == 0 and summary["wrong"] == 0, summary
        assert set(summary["versions"]) == {1}, f"a shadow answer reached a client: {summary}"
        assert cc.manager.call("deployments")[bench.MODEL]["version"] == 1
