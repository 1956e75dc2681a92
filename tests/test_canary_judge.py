"""The canary judge and the shadow comparison, in-process (issue 21, test 7 and the judge's rules): simulated digests
from bench/canary_judge.py (seeded, so nothing here can flake), and real REPLY frames for compare()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zmq

from bench.canary_judge import (
    CANARY,
    STABLE,
    Scenario,
    decision_times,
    digest_at,
    error_test_false_rollbacks,
    run_judged,
    simulate_step,
)
from cluster import protocol
from cluster.canary import histogram, stats
from cluster.canary.compare import compare
from cluster.canary.digest import ShadowDigest, StepDigest, VersionDigest
from cluster.canary.judge import Criteria, Judge, Look
from cluster.codec import encode_tensors

ALPHA = Criteria().alpha


def _bound(runs: int, alpha: float = ALPHA) -> float:
    """alpha plus 4 binomial standard deviations: an A/A rate past it is a real excess, not chance."""
    return alpha + 4 * math.sqrt(alpha * (1 - alpha) / runs)


# ---- the error test's statistic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("x, e, rho", [(3, 3, 0.1), (10, 40, 0.1), (5, 100, 0.1), (60, 100, 0.5), (0, 10, 0.3)])
def test_step_bayes_factor_is_the_one_sided_beta_mixture(x, e, rho):
    """The closed form equals the mixture integral (p = rho + (1 - rho) q, q ~ Beta(a, b)) done numerically."""
    a, b = stats.MIX_A, stats.MIX_B
    q = np.linspace(0, 1, 400_001)[1:-1]
    p = rho + (1 - rho) * q
    log_prior = (a - 1) * np.log(q) + (b - 1) * np.log1p(-q) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    log_lr = x * np.log(p / rho) + (e - x) * np.log((1 - p) / (1 - rho)) + log_prior
    top = log_lr.max()
    numeric = top + math.log(np.trapezoid(np.exp(log_lr - top), q))
    assert stats.step_log_bf(x, e, rho) == pytest.approx(numeric, abs=1e-3)
    assert stats.step_log_bf(x, e, rho) <= float(stats.step_log_glr(x, e, rho)) + 1e-9


def test_a_canary_with_fewer_errors_gathers_no_evidence():
    """One-sided: a canary failing less often than stable never rolls back, however many errors."""
    assert stats.step_log_bf(0, 1000, 0.1) < 0
    assert stats.step_log_bf(50, 1000, 0.1) < 0  # 5% of the errors at a 10% share
    assert stats.step_log_bf(0, 0, 0.1) == 0.0 and stats.step_log_bf(3, 3, 0.0) == 0.0


# ---- test 7: the false rollback rate over A/A runs, and the decision times -------------------------------------


def test_aa_false_rollback_rate_of_the_judge_is_at_most_alpha():
    """2,000 A/A runs through Judge.look every 0.25 s (canary 10% then 50%, 2 s a step, 1% errors and equal
    latency in both): rolled back at most alpha (+ 4 sigma) of the time, and the rest promoted."""
    runs = 2000
    results = run_judged(Scenario(step_seconds=2.0), runs, seed=101)
    rolled = [r for r in results if r["decision"] == "rollback"]
    promoted = sum(r["decision"] == "promote" for r in results)
    assert len(rolled) / runs <= _bound(runs), [r["reason"] for r in rolled][:5]
    assert promoted == runs - len(rolled), "an A/A run that was not rolled back must pass both steps"


def test_aa_false_rollback_rate_of_the_error_test_over_long_runs():
    """The error test alone over 2,000 A/A runs of 2 x 30 s steps (480 looks each, 2% errors): at most alpha."""
    runs = 2000
    rejected = error_test_false_rollbacks(Scenario(p_canary=0.02, p_stable=0.02), runs, seed=202)
    assert rejected / runs <= _bound(runs), rejected


def test_decision_time_for_a_canary_failing_a_third_of_its_requests():
    """33% vs 0% at 10% of 1,000 req/s: every run rolled back at the first look (0.25 s), well within 2 s."""
    d = decision_times(0.33, 0.0, runs=30, seed=303, horizon=2.0)
    assert d["decided"] == d["runs"] and d["max_s"] <= 2.0, d
    assert d["errors_basis"] == d["runs"] and d["canary_failures"] < 50, d


def test_decision_times_for_small_regressions():
    """3% vs 1% and 0.5% vs 0.1% at 10%: decided, in seconds to tens of seconds (bench/canary_judge.py reports)."""
    three = decision_times(0.03, 0.01, runs=20, seed=404, horizon=60.0)
    assert three["decided"] == 20 and three["median_s"] < 15, three
    half = decision_times(0.005, 0.001, runs=20, seed=505, horizon=90.0)
    assert half["decided"] >= 18 and half["median_s"] < 45, half
    assert three["median_s"] < half["median_s"]


# ---- latency ------------------------------------------------------------------------------------------------------


def _steps(sc: Scenario, seed: int, looks: int) -> tuple[dict[int, StepDigest], list[StepDigest]]:
    """A passed 10% step 0 (30 s) and step 1 at sc.weights[1], look by look."""
    rng = np.random.default_rng(seed)
    first = digest_at(simulate_step(rng, sc, sc.weights[0], 1, 120), 0, 119)
    sim = simulate_step(rng, sc, sc.weights[1], 1, looks)
    return {0: first}, [digest_at(sim, 0, t) for t in range(looks)]


def test_a_3x_slower_canary_is_rolled_back_on_latency_in_one_look_at_50():
    done, looks = _steps(Scenario(slow=3.0, p_canary=0.0, p_stable=0.0), seed=7, looks=1)
    verdict = Judge().look(Look(STABLE, CANARY, 1, 50, 0.25, 30.0, False, {**done, 1: looks[0]}))
    assert verdict.decision == "rollback" and "latency (service times)" in verdict.reason, verdict
    lat = verdict.figures["latency"]
    assert lat["basis"] == "service" and lat["canary_n"] >= 100 and lat["median_ratio"] >= 1.5, lat


def test_at_10_percent_latency_is_judged_on_compute_time_at_equal_batch_sizes():
    """At 10% a good canary's batches fill slowly, so its service times look slower: not rolled back (judged on
    compute time per batch size); a 3x slower one is, within 1 s; judged on service time the good one would be."""
    sc = Scenario(weights=(10, 10), p_canary=0.0, p_stable=0.0)
    judge = Judge()
    done, looks = _steps(sc, seed=8, looks=120)
    for t, step in enumerate(looks):
        verdict = judge.look(Look(STABLE, CANARY, 1, 10, (t + 1) * 0.25, 1e9, False, {**done, 1: step}))
        assert verdict.decision == "continue", (t, verdict)
    service = Judge(Criteria(compute_below=0)).look(Look(STABLE, CANARY, 1, 10, 30.0, 1e9, False, {1: looks[-1]}))
    assert service.decision == "rollback" and "service" in service.reason, service
    assert verdict.figures["latency"]["basis"] == "compute"

    done, looks = _steps(replace_slow(sc, 3.0), seed=9, looks=4)
    decisions = [
        judge.look(Look(STABLE, CANARY, 1, 10, (t + 1) * 0.25, 1e9, False, {**done, 1: step}))
        for t, step in enumerate(looks)
    ]
    assert decisions[-1].decision == "rollback" and "latency (compute times)" in decisions[-1].reason, decisions[-1]


def replace_slow(sc: Scenario, slow: float) -> Scenario:
    from dataclasses import replace

    return replace(sc, slow=slow)


def test_a_slightly_slower_canary_is_not_rolled_back_however_significant():
    """1.1x slower at 50% for 30 s: Mann-Whitney finds it (tiny p) but the effect is under latency_ratio."""
    done, looks = _steps(Scenario(slow=1.1, p_canary=0.0, p_stable=0.0), seed=10, looks=120)
    judge = Judge()
    for t, step in enumerate(looks):
        verdict = judge.look(Look(STABLE, CANARY, 1, 50, (t + 1) * 0.25, 1e9, False, {**done, 1: step}))
        assert verdict.decision == "continue", (t, verdict)
    lat = verdict.figures["latency"]
    assert lat["p"] < 1e-6 and lat["median_ratio"] < 1.5, lat


def _times(n: int, median_ms: float, slow: int, factor: float, seed: int) -> VersionDigest:
    """n lognormal service times around `median_ms`, the first `slow` of them `factor` x slower (a slow tail)."""
    times = np.random.default_rng(seed).lognormal(math.log(median_ms / 1e3), 0.1, n)
    times[:slow] *= factor
    return VersionDigest(ok=n, service=histogram.from_values(times.tolist()))


def test_the_p99_counts_as_an_effect_only_with_enough_answers():
    """An A/A canary on real processes was rolled back on the p99 of a few hundred answers (their few slowest) with a
    significant 1.1x median shift: below p99_min answers the median alone is the effect; past it a slow tail is."""
    judge = Judge()
    few = StepDigest({STABLE: _times(600, 10.0, 0, 1.0, 1), CANARY: _times(300, 11.0, 6, 3.0, 2)})
    verdict = judge.look(Look(STABLE, CANARY, 0, 50, 1.0, 30.0, False, {0: few}))
    lat = verdict.figures["latency"]
    assert verdict.decision == "continue", verdict
    assert lat["p"] < Criteria().latency_alpha and lat["p99_ratio"] >= 1.5, lat  # what used to roll it back
    many = StepDigest({STABLE: _times(4000, 10.0, 0, 1.0, 3), CANARY: _times(4000, 11.0, 80, 4.0, 4)})
    verdict = judge.look(Look(STABLE, CANARY, 0, 50, 1.0, 30.0, False, {0: many}))
    assert verdict.decision == "rollback" and "p99" in verdict.reason, verdict


def test_a_slowdown_under_the_floor_in_ms_is_not_rolled_back():
    """A sub-millisecond model's canary 1.6x slower (0.3 -> 0.48 ms, significant): under latency_floor_ms, no user
    notices it (and a version just loaded is that much slower at first); with the floor at 0 it is rolled back."""
    step = StepDigest({STABLE: _times(2000, 0.3, 0, 1.0, 7), CANARY: _times(2000, 0.48, 0, 1.0, 8)})
    look = Look(STABLE, CANARY, 0, 50, 1.0, 30.0, False, {0: step})
    verdict = Judge().look(look)
    assert verdict.decision == "continue" and verdict.figures["latency"]["median_ratio"] >= 1.5, verdict
    verdict = Judge(Criteria(latency_floor_ms=0.0)).look(look)
    assert verdict.decision == "rollback" and "median" in verdict.reason, verdict


# ---- the pass rule, figures, failures ---------------------------------------------------------------------------


def _version(ok: int, errors: int = 0, timeouts: int = 0, ms: float = 10.0) -> VersionDigest:
    return VersionDigest(ok=ok, errors=errors, timeouts=timeouts, service={histogram.bucket(ms / 1e3): ok})


def test_a_step_passes_with_enough_answers_and_time_only():
    judge = Judge(Criteria(min_requests=100))

    def look(canary_ok: int, elapsed: float):
        step = StepDigest({STABLE: _version(900), CANARY: _version(canary_ok)})
        return judge.look(Look(STABLE, CANARY, 0, 10, elapsed, 30.0, False, {0: step}))

    assert look(99, 31.0).decision == "continue" and "99/100 canary answers" in look(99, 31.0).reason
    assert look(100, 29.9).decision == "continue"
    verdict = look(100, 30.0)
    assert verdict.decision == "pass", verdict
    figures = verdict.figures
    assert set(figures) >= {"versions", "errors", "latency"}, figures
    assert figures["versions"]["2"] == {
        "requests": 100,
        "errors": 0,
        "error_rate": 0.0,
        "p50_ms": figures["versions"]["2"]["p50_ms"],
        "p99_ms": figures["versions"]["2"]["p99_ms"],
    }
    assert 9 < figures["versions"]["2"]["p50_ms"] < 11
    assert set(figures["errors"]) == {"log_bf", "threshold"} and figures["errors"]["threshold"] == pytest.approx(
        math.log(1 / ALPHA), abs=1e-3
    )
    # the figures travel in msgpack (string keys only)
    assert protocol.unpack_header(protocol.pack({"figures": figures}))["figures"] == figures


def test_timeouts_count_against_the_canary_and_the_judge_keeps_no_state():
    """A canary that hangs has no service times, only timeouts: they count as failures. The same look twice gives
    the same verdict (the manager may restart and look again)."""
    step = StepDigest({STABLE: _version(900, errors=1), CANARY: _version(80, timeouts=20)})
    look = Look(STABLE, CANARY, 0, 10, 1.0, 30.0, False, {0: step})
    judge = Judge()
    first, second = judge.look(look), judge.look(look)
    assert first.decision == "rollback" and first.reason.startswith("step 0 (10%): errors: canary 20/100"), first
    assert (second.decision, second.reason, second.figures) == (first.decision, first.reason, first.figures)


def test_evidence_of_earlier_steps_carries_into_the_next():
    """Evidence short of the threshold at 10% adds to that at 50% (the product of the steps' factors)."""
    step0 = StepDigest({STABLE: _version(9000, errors=9), CANARY: _version(1000, errors=6)})
    step1 = StepDigest({STABLE: _version(500, errors=1), CANARY: _version(500, errors=8)})
    judge = Judge()
    only0 = judge.look(Look(STABLE, CANARY, 0, 10, 1.0, 30.0, False, {0: step0}))
    only1 = judge.look(Look(STABLE, CANARY, 0, 50, 1.0, 30.0, False, {0: step1}))
    both = judge.look(Look(STABLE, CANARY, 1, 50, 1.0, 30.0, False, {0: step0, 1: step1}))
    assert only0.decision == only1.decision == "continue", (only0, only1)
    assert both.figures["errors"]["log_bf"] == pytest.approx(
        only0.figures["errors"]["log_bf"] + only1.figures["errors"]["log_bf"], abs=2e-3
    )
    assert both.decision == "rollback", both


# ---- shadow: compare() and drift --------------------------------------------------------------------------------


def _reply(**tensors) -> list:
    metas, frames = encode_tensors(tensors)
    header = {"id": 1, "model": "m", "version": 1, "agent": "a", "outputs": metas, "batch_size": 1, "queue_us": 0}
    return [protocol.pack(header), *frames]


def _compare(stable, mirrored, criteria: Criteria | None = None) -> ShadowDigest:
    d = ShadowDigest()
    compare(stable, mirrored, d, criteria or Criteria())
    return d


def test_compare_floats_top1_and_errors():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(16, 10)).astype(np.float32)
    same = _compare(_reply(probs=scores), _reply(probs=scores.copy()))
    assert (same.pairs, same.mismatched, same.top1_rows, same.top1_agree) == (1, 0, 16, 16)
    assert same.rel_err == {0: 1} and same.abs_err == {0: 1} and same.exact_pairs == 0

    other = scores.copy()
    other[0, np.argmax(scores[0])] -= 10.0  # row 0's top-1 changes
    d = _compare(_reply(probs=scores), _reply(probs=other))
    assert (d.top1_rows, d.top1_agree) == (16, 15)
    (abs_bucket,) = d.abs_err
    assert histogram.lower(abs_bucket, histogram.ERROR_BASE) <= 10.0 < histogram.lower(abs_bucket + 1, 1e-12)
    (rel_bucket,) = d.rel_err
    expected = 10.0 / abs(float(scores[0, np.argmax(scores[0])]))
    assert histogram.lower(rel_bucket, 1e-12) <= expected * 1.0001 and expected < histogram.lower(rel_bucket + 1, 1e-12)

    # 1-D floats: no top-1; NaN against a number is infinitely far; NaN in both is equal
    nan = np.array([1.0, np.nan, 3.0])
    d = _compare(_reply(y=nan), _reply(y=nan.copy()))
    assert d.rel_err == {0: 1} and d.top1_rows == 0
    d = _compare(_reply(y=nan), _reply(y=np.array([1.0, 2.0, 3.0])))
    assert d.rel_err == {histogram.MAX_BUCKET: 1} and d.mismatched == 0


def test_compare_integers_exactly_and_frames_of_any_kind():
    labels = np.array([3, 1, 4, 1, 5], np.int64)
    d = ShadowDigest()
    compare(_reply(k=labels), _reply(k=labels.copy()), d, Criteria())
    compare(_reply(k=labels), [memoryview(f) if i else f for i, f in enumerate(_reply(k=labels + 1))], d, Criteria())
    compare(_reply(ok=np.array([True, False])), _reply(ok=np.array([True, False])), d, Criteria())
    compare(_reply(k=labels), [zmq.Frame(bytes(f)) for f in _reply(k=labels)], d, Criteria())  # as received
    assert (d.pairs, d.exact_pairs, d.exact, d.mismatched) == (4, 4, 3, 0) and not d.rel_err

    half = np.array([[0.5, 0.25], [1.0, 2.0]], np.float16)
    d = _compare(_reply(h=half), _reply(h=half * np.float16(1.5)))
    assert (d.mismatched, d.top1_rows, d.top1_agree) == (0, 2, 2)
    (rel_bucket,) = d.rel_err
    assert histogram.lower(rel_bucket, 1e-12) <= 0.5 < histogram.lower(rel_bucket + 1, 1e-12)


@pytest.mark.parametrize(
    "mirrored",
    [
        _reply(y=np.zeros((2, 3), np.float32)),  # shape
        _reply(y=np.zeros((2, 2), np.float64)),  # dtype
        _reply(z=np.zeros((2, 2), np.float32)),  # name
        _reply(y=np.zeros((2, 2), np.float32), extra=np.zeros(1, np.int32)),  # an output more
        [b"\xc1 not msgpack"],  # a header that is not msgpack
        [protocol.pack({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2]}]})],  # its frame missing
        [protocol.pack({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2]}]}), b"123"],  # short frame
        [protocol.pack({"outputs": "y"})],
        [protocol.pack([1, 2])],
        [],
        None,
    ],
)
def test_compare_counts_what_does_not_match_as_mismatched_and_never_raises(mirrored):
    stable = _reply(y=np.zeros((2, 2), np.float32))
    d = _compare(stable, mirrored)
    assert (d.pairs, d.mismatched) == (1, 1) and not d.rel_err and not d.top1_rows
    d = _compare(mirrored, stable)
    assert (d.pairs, d.mismatched) == (1, 1)


def _shadow_run(noise: float, pairs: int, seed: int) -> StepDigest:
    """A shadow step: `pairs` mirrored answers with relative `noise`, and as many stable-vs-stable ones with the
    floor's noise (1e-7: batch composition, low bits)."""
    rng = np.random.default_rng(seed)
    step = StepDigest()
    for _ in range(pairs):
        scores = rng.normal(size=(8, 10)).astype(np.float32)
        floor = scores * (1 + rng.normal(scale=1e-7, size=scores.shape)).astype(np.float32)
        mirrored = scores * (1 + rng.normal(scale=noise, size=scores.shape)).astype(np.float32)
        compare(_reply(probs=scores), _reply(probs=floor), step.floor, Criteria())
        compare(_reply(probs=scores), _reply(probs=mirrored), step.shadow, Criteria())
    return step


def test_shadow_drift_is_judged_against_the_floor():
    """Perturbed weights (1% noise) drift; the same version mirrored (floor noise only) does not."""
    judge = Judge()
    drifting = judge.look(Look(STABLE, CANARY, 0, 0, 31.0, 30.0, True, {0: _shadow_run(1e-2, 60, seed=1)}))
    assert drifting.decision == "rollback" and "shadow drift" in drifting.reason, drifting
    shadow = drifting.figures["shadow"]
    assert shadow["pairs"] == 60 and shadow["beyond"] > 50 and 0.5 < shadow["drift_rate"] <= 1.0, shadow
    assert shadow["top1_agreement"] < 1.0 and shadow["floor_pairs"] == 60

    same = judge.look(Look(STABLE, STABLE, 0, 0, 31.0, 30.0, True, {0: _shadow_run(1e-7, 60, seed=2)}))
    assert same.decision == "pass" and "no drift in 60 shadow pairs" in same.reason, same
    assert same.figures["shadow"]["beyond"] == 0 and same.figures["shadow"]["top1_agreement"] == 1.0

    early = judge.look(Look(STABLE, STABLE, 0, 0, 31.0, 30.0, True, {0: _shadow_run(1e-7, 10, seed=3)}))
    assert early.decision == "continue" and "10/50 shadow pairs" in early.reason, early


def test_a_live_canary_whose_shadow_drifts_is_rolled_back():
    step = _shadow_run(1e-2, 60, seed=4)
    step.versions = {STABLE: _version(900), CANARY: _version(100)}
    verdict = Judge().look(Look(STABLE, CANARY, 0, 10, 1.0, 30.0, False, {0: step}))
    assert verdict.decision == "rollback" and "shadow drift" in verdict.reason, verdict
