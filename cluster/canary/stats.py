"""The judge's statistics, in plain Python and numpy (no scipy): the errors' mixture Bayes factor and Mann-Whitney U
from log-bucketed histograms.

Errors (Lindon et al., KDD 2022, "Rapid regression detection in software deployments through sequential testing"):
given how many errors a step saw, under H0 (both versions fail a request equally often) each error came from the
canary with probability rho = the canary's share of the step's answers, so the canary's errors are Binomial(e, rho).
The alternative is a one-sided mixture: p = rho + (1 - rho) q with q ~ Beta(a, b), so only a canary that fails MORE
often than stable gathers evidence. The step's Bayes factor (mixture likelihood over the H0 likelihood) is a
nonnegative martingale with mean 1 under H0 as errors arrive; a run's factor is the product of its steps' (each step
starts at 1 when the previous one ends), which is again one, so by Ville's inequality P(ever >= 1/alpha) <= alpha
however often it is looked at and however the weights change between steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

# The mixture over q = (p - rho) / (1 - rho), the canary's excess share of the errors: Beta(1, 2), density
# 2 (1 - q). Most of its mass is on modest regressions (at rho = 0.1 a 3x error rate is q = 0.17, 5x is q = 0.29),
# which need many errors to show, and it still reaches the gross ones (a canary that raises on a third of its inputs
# beside a stable that never does: q near 1) that need only a handful. Uniform Beta(1, 1) and Beta(1, 3) decide within
# 10% of it on the three cases of bench/canary_judge.py; the mixture changes the power, never the false alarm bound.
MIX_A = 1.0
MIX_B = 2.0


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def step_log_bf(x: int, e: int, rho: float, a: float = MIX_A, b: float = MIX_B) -> float:
    """log Bayes factor of one step: `x` of its `e` errors (failures) were the canary's, the canary had share `rho`
    of the step's answers. 0.0 (no evidence) without errors or without both versions answering.

    BF = sum_j C(x, j) ((1 - rho) / rho)^j B(a + j, b + e - x) / B(a, b), from expanding (rho + (1 - rho) q)^x
    under the Beta(a, b) mixture; every term is positive, summed in log space.
    """
    if e <= 0 or not 0.0 < rho < 1.0:
        return 0.0
    s = e - x
    log0 = _log_beta(a, b + s) - _log_beta(a, b)  # j = 0
    if x == 0:
        return log0
    j = np.arange(1, x + 1, dtype=np.float64)
    # term_j / term_{j-1} = (x - j + 1) / j * (1 - rho) / rho * (a + j - 1) / (a + b + s + j - 1)
    steps = np.log((x - j + 1) / j * (a + j - 1) / (a + b + s + j - 1)) + math.log((1.0 - rho) / rho)
    logs = np.concatenate(([log0], log0 + np.cumsum(steps)))
    top = float(logs.max())
    return top + math.log(float(np.exp(logs - top).sum()))


def step_log_glr(x, e, rho):
    """An upper bound of step_log_bf (the likelihood ratio at the best p >= rho), numpy-vectorised: a cheap filter
    for simulations (a factor below the threshold here cannot pass it)."""
    x, e, rho = np.asarray(x, float), np.asarray(e, float), np.asarray(rho, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(e > 0, x / np.maximum(e, 1), 0.0)
        ok = (e > 0) & (rho > 0) & (rho < 1) & (p > rho)
        s = e - x
        term_x = np.where(x > 0, x * np.log(np.where(ok, p / rho, 1.0)), 0.0)
        term_s = np.where(s > 0, s * np.log(np.where(ok, (1 - p) / (1 - rho), 1.0)), 0.0)
        return np.where(ok, term_x + term_s, 0.0)


def errors_log_bf(steps: Iterable[tuple[int, int, int, int]], a: float = MIX_A, b: float = MIX_B) -> float:
    """The run's log Bayes factor: the sum over steps of (canary failures, canary answers, stable failures, stable
    answers)."""
    total = 0.0
    for x, n_canary, y, n_stable in steps:
        n = n_canary + n_stable
        if n:
            total += step_log_bf(x, x + y, n_canary / n, a, b)
    return total


# ---- latency: Mann-Whitney U from histograms -------------------------------------------------------------------


def mann_whitney(canary: Mapping[int, float], stable: Mapping[int, float]) -> tuple[float, float, float]:
    """(U, its mean, its variance) under H0 for the canary's values against stable's, from two histograms over the
    same buckets: a pair in one bucket is a tie (counts 1/2), and the variance has the tie correction. U is large
    when the canary is slower."""
    n_c, n_s = sum(canary.values()), sum(stable.values())
    n = n_c + n_s
    if n_c <= 0 or n_s <= 0 or n < 2:
        return 0.0, 0.0, 0.0
    u = ties = below = 0.0
    for b in sorted(set(canary) | set(stable)):
        c, s = canary.get(b, 0), stable.get(b, 0)
        u += c * (below + 0.5 * s)
        below += s
        t = c + s
        ties += t**3 - t
    var = n_c * n_s / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    return u, n_c * n_s / 2.0, max(var, 0.0)


def stratified_z(pairs: Iterable[tuple[Mapping[int, float], Mapping[int, float]]]) -> float | None:
    """z of the U statistics summed over strata (van Elteren style, unweighted): each stratum compares like with
    like (one batch size). None when no stratum has both versions."""
    u = mean = var = 0.0
    for canary, stable in pairs:
        su, sm, sv = mann_whitney(canary, stable)
        u, mean, var = u + su, mean + sm, var + sv
    if var <= 0:
        return None
    return (u - mean) / math.sqrt(var)


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))
