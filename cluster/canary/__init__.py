"""Canary and shadow rollouts: judged on live traffic, in seconds.

- histogram.py: the log-bucketed histograms every part shares (service times, compute times, shadow errors);
- digest.py: what a broker counts per (model, version) while a canary runs, and how the manager sums brokers;
- judge.py: the sans-IO judge: digests in, a decision (continue / pass the step / roll back) and its reason out;
- compare.py: the shadow comparison of two answers (run off the broker's hot path).

The broker's part (the split, retry on stable, the circuit breaker, shadow copies) is cluster/broker/canary.py; the
manager's (commands, steps, decisions, persistence) is cluster/manager/canaries.py; the desired state's `Canary` is in
cluster/desired.py.
"""
