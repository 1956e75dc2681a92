"""Benchmark 10: the first request at each batch size after a model is loaded, warmed at one size vs at every size.

    python3 bench/warmup.py [--rounds 3] [--sizes 1,2,3,4,8,16] [--image 64] [--repeats 15] [--quick] [--json]
    (suite: --only 10 or warmup)

A ResNet-18-shaped TorchScript CNN (bench/gpu.py's, random weights) is published twice with max_batch_size 16:
`cnn_w1` with `warmup_batch_sizes: [1]` (warmed at one size, as every version was before issue 22) and `cnn_all`
with the default (warmed at every size 1..16 before it serves). Each round starts two fresh agents, one serving
each model (CLUSTER_MODELS: no process-wide cache is shared between the two), and waits until both serve: the
agent's load is the same code as a deploy's (verify, load, warm up, then stage). Then, one request in flight, the
first request of each size in --sizes goes to each model in turn (the first that model sees at that size), then
--repeats more of each (steady state: their median). Reported per size: first-request latency (median over rounds),
steady median, their ratio, for both models; and the warm-up time each agent reported (heartbeat model_info).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # as in bench/suite.py: this checkout first

import numpy as np  # noqa: E402

from bench.lib import Suite, local_cluster, log, ratio_row  # noqa: E402

MAX_BATCH = 16
SIZES = (1, 2, 3, 4, 8, 16)
IMAGE = 64  # pixels a side: a ResNet-18 pass of 1-16 such images takes ~10-60 ms on one CPU thread
ROUNDS, ROUNDS_QUICK = 3, 1
REPEATS, REPEATS_QUICK = 15, 5
SERVE_TIMEOUT = 180.0  # seconds two fresh agents may take to import torch, load and warm up on a busy machine
MODELS = {"cnn_w1": [1], "cnn_all": None}  # name -> warmup_batch_sizes (None: every size 1..MAX_BATCH)


def config(name: str, image: int, sizes: list[int] | None) -> dict:
    from bench.gpu import resnet_config

    cfg = dict(resnet_config(name, image, MAX_BATCH), max_queue_delay_us=0)
    if sizes is not None:
        cfg["warmup_batch_sizes"] = sizes
    return cfg


def one_round(cluster, client, image: int, sizes: list[int], repeats: int, n: int) -> dict:
    """Fresh agents for both models; first and steady latencies (s) per model and size, and each warm-up."""
    procs = [cluster.start_agent(f"warm-{name}-{n}", "--threads", "1", CLUSTER_MODELS=name) for name in MODELS]
    try:

        def serving() -> bool:
            served = {m for a in client.agents(timeout=5) for m in a.get("model_info", {})}
            return set(MODELS) <= served

        deadline = time.monotonic() + SERVE_TIMEOUT
        while not serving():
            if time.monotonic() > deadline or not all(p.alive() for p in procs):
                raise RuntimeError(f"the agents did not serve {sorted(MODELS)} in {SERVE_TIMEOUT:.0f} s")
            time.sleep(0.05)
        info = {m: v["1"] for a in client.agents(timeout=5) for m, v in a.get("model_info", {}).items()}
        rng = np.random.default_rng(n)
        inputs = {b: {"image": rng.standard_normal((b, 3, image, image), dtype=np.float32)} for b in sizes}
        first: dict[str, dict[int, float]] = {m: {} for m in MODELS}
        steady: dict[str, dict[int, list[float]]] = {m: {b: [] for b in sizes} for m in MODELS}
        for b in sizes:  # the first request of each size, both models in turn (noise falls on both alike)
            for name in MODELS:
                t = time.perf_counter()
                client.infer(name, inputs[b], timeout=60)
                first[name][b] = time.perf_counter() - t
        for _ in range(repeats):
            for b in sizes:
                for name in MODELS:
                    t = time.perf_counter()
                    client.infer(name, inputs[b], timeout=60)
                    steady[name][b].append(time.perf_counter() - t)
    finally:
        for proc in procs:
            cluster.stop(proc)
    return {
        "first": first,
        "steady": {m: {b: float(np.median(v)) for b, v in by_size.items()} for m, by_size in steady.items()},
        "warmup_s": {m: info[m]["warmup_s"] for m in MODELS},
        "warmup_sizes": {m: info[m]["warmup_sizes"] for m in MODELS},
    }


def measure(rounds: int, sizes: list[int], image: int, repeats: int) -> dict:
    from bench.gpu import build_resnet18
    from cluster.publish import publish_version

    with tempfile.TemporaryDirectory(prefix="bench-warmup-") as tmp:
        tmp = Path(tmp)
        share, path = tmp / "share", tmp / "cnn.pt"
        build_resnet18(path)
        for name, warm in MODELS.items():
            publish_version(share, name, path, config=config(name, image, warm), version=1)
        results = []
        with local_cluster(share, tmp / "logs") as cluster:
            cluster.start_manager()
            cluster.start_broker()
            client = cluster.client(timeout=60)
            for n in range(rounds):
                log(f"10 warm-up: round {n + 1}/{rounds} (two fresh agents)")
                results.append(one_round(cluster, client, image, sizes, repeats, n))
    summary: dict = {"image": image, "sizes": sizes, "rounds": rounds, "repeats": repeats, "models": {}}
    for name in MODELS:
        per_size = {}
        for b in sizes:
            first = float(np.median([r["first"][name][b] for r in results]))
            steady = float(np.median([r["steady"][name][b] for r in results]))
            per_size[b] = {"first_ms": first * 1e3, "steady_ms": steady * 1e3, "ratio": first / steady}
        summary["models"][name] = {
            "warmup_sizes": results[0]["warmup_sizes"][name],
            "warmup_s": float(np.median([r["warmup_s"][name] for r in results])),
            "sizes": per_size,
            "excess_ms": sum(max(0.0, s["first_ms"] - s["steady_ms"]) for s in per_size.values()),
            "worst_ratio": max(s["ratio"] for s in per_size.values()),
        }
    return summary


def text(summary: dict) -> str:
    lines = [
        f"ResNet-18-shaped TorchScript CNN, {summary['image']}x{summary['image']} images, max_batch_size {MAX_BATCH}, "
        f"one agent per model (1 torch thread), median of {summary['rounds']} round(s) of fresh agents, steady = "
        f"median of {summary['repeats']} later requests",
        f"{'batch':>5} | {'warmed at [1]: first':>20} {'steady':>8} {'ratio':>6} | "
        f"{'warmed at 1-16: first':>21} {'steady':>8} {'ratio':>6}",
    ]
    w1, everything = summary["models"]["cnn_w1"], summary["models"]["cnn_all"]
    for b in summary["sizes"]:
        a, c = w1["sizes"][b], everything["sizes"][b]
        lines.append(
            f"{b:>5} | {a['first_ms']:>17.1f} ms {a['steady_ms']:>5.1f} ms {a['ratio']:>5.2f}x | "
            f"{c['first_ms']:>18.1f} ms {c['steady_ms']:>5.1f} ms {c['ratio']:>5.2f}x"
        )
    for label, m in (("warmed at [1]", w1), ("warmed at 1-16", everything)):
        lines.append(
            f"{label}: warm-up {m['warmup_s']:.3f} s (sizes {m['warmup_sizes']}); first requests' excess over steady, "
            f"summed over sizes: {m['excess_ms']:.1f} ms; worst first/steady {m['worst_ratio']:.2f}x"
        )
    return "\n".join(lines)


def run(suite: Suite) -> None:
    quick = suite.settings.quick
    summary = measure(ROUNDS_QUICK if quick else ROUNDS, list(SIZES), IMAGE, REPEATS_QUICK if quick else REPEATS)
    ours, base = summary["models"]["cnn_all"], summary["models"]["cnn_w1"]
    sizes = f"batch sizes {','.join(map(str, SIZES))}"
    suite.add(
        ratio_row(
            f"10a. first request / steady latency after a load, worst of {sizes}: warmed at every size vs at 1",
            ours["worst_ratio"],
            base["worst_ratio"],
            2,
            "reported",
        ),
        ratio_row(
            f"10b. first requests' latency over steady, summed over {sizes} (ms): warmed at every size vs at 1",
            ours["excess_ms"],
            base["excess_ms"],
            1,
            "reported",
        ),
        ratio_row("10c. warm-up time at load (s): every size 1-16 vs 1", ours["warmup_s"], base["warmup_s"], 3, "-"),
    )
    suite.note("10 warm-up per size:\n" + text(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of fresh agents (median reported)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help=f"batch sizes, 1..{MAX_BATCH}, in order")
    parser.add_argument("--image", type=int, default=IMAGE, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="steady-state requests per size")
    parser.add_argument("--quick", action="store_true", help=f"{ROUNDS_QUICK} round, {REPEATS_QUICK} repeats")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.sizes.split(",") if b]
    if not sizes or not all(1 <= b <= MAX_BATCH for b in sizes):
        parser.error(f"--sizes: batch sizes from 1 to {MAX_BATCH}")
    rounds, repeats = (ROUNDS_QUICK, REPEATS_QUICK) if args.quick else (args.rounds, args.repeats)
    summary = measure(rounds, sizes, args.image, repeats)
    print(json.dumps(summary, indent=2) if args.json else text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
