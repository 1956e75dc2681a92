"""The whole benchmark suite in one command: every figure next to a baseline measured in the same run.

    python3 bench/suite.py [--quick] [--only 1,http,...] [--out bench/RESULTS.md]   (or python3 -m bench.suite ...)

Runs, each with its own processes on 127.0.0.1 (started by cluster.local.LocalCluster on ports the OS picked,
stopped by pid in try/finally):

 1. sequential round trip to `echo` (64 float32) through cluster.Client, 2 agents: p50/p99, vs a bare pyzmq
    ROUTER-ROUTER echo broker + 2 workers (bench/sims.py) on the same path;
 2. throughput with 64 requests in flight (agents --capacity 64), same set-up, vs the bare broker;
 3. HTTP with wrk (32 connections, OIP JSON body for `echo`, 64 floats): the edge vs (a) a bare FastAPI app that
    answers the same JSON itself and (b) the seed's design, a FastAPI load balancer forwarding with one shared
    httpx.AsyncClient round-robin to 2 FastAPI inference servers running the echo TorchScript model; the same
    uvicorn settings for every server (UVICORN_SETTINGS);
 4. dynamic batching on vs off for a TorchScript MLP (4 x Linear 2048x2048, >= 2 ms per sample on one thread),
    published twice (same weights), 64 in flight, 2 agents;
 5. 4 MiB tensors through `echo`, 8 in flight, 2 agents: payload bytes per second, vs the bare pyzmq path;
 6. scale: (a) the manager's CPU with 1,000 simulated agents heartbeating once a second, vs a bare SUB socket that
    decodes the same beats; (b) the broker with 100 simulated agents vs 2 (same simulator), 64 in flight;
 7. routing: 3 agents, one 10x slower for the same request (its own share), round-robin vs least-outstanding;
 8. cold start (bench/cold_start.py), digits and a 100 MB TorchScript MLP: a fresh `cluster agent` process to its
    first answer vs a bare `python -c "import torch; torch.jit.load(F)(x)"`, and `cluster deploy` to 2 agents
    serving the new version vs torch.jit.load of the file alone.
10. warm-up (bench/warmup.py): the first request at each batch size (1-16) after a fresh agent loads a ResNet-18-
    shaped TorchScript CNN warmed at every batch size, vs the same model warmed at size 1 only: first / steady latency.
11. a real model (bench/cnn.py): a ResNet-18 (224x224, TorchScript, max_batch_size 32) served by one agent at one
    torch thread, 1, 8 and 32 requests of one image in flight: images/s and p99 vs the same model file called in a
    loop in this process at one torch thread (batch 1; and batch = requests in flight, informational).

Prints one table (figure, ours, baseline, ratio, target, holds) to stdout, progress to stderr, and writes the same
table as Markdown, with the machine it ran on, to bench/out/RESULTS.md (not tracked; `--out bench/RESULTS.md` to
update the committed record). Targets are the TARGET_* constants at the top of
each benchmark's module. `--quick` shortens every run to a smoke check (about 2 minutes); the full run takes about
10. `--only` takes keys or names: 1 or echo (figures 1 and 2), 3 or http, 4 or batching, 5 or big, 6a or manager,
6b or broker, 7 or routing, 8 or cold, 10 or warmup, 11 or cnn.

Where things are: bench/lib.py (settings, table, starting processes, request loops, wrk), bench/models.py (the
models), bench/sims.py (baselines and simulators run as child processes), one module per benchmark (echo, http_edge,
batching, big, scale, routing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python3 bench/suite.py` puts bench/ first on sys.path: put the repository root there instead, as
    # `python3 -m bench.suite` does, so that `bench.*`, `cluster` and `edge` come from this checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import batching, big, cnn, cold_start, echo, http_edge, routing, scale, warmup  # noqa: E402
from bench.lib import BENCH_DIR, Row, Settings, Suite, log, machine_info, table_markdown, table_text  # noqa: E402

# (key, name, title, function): --only takes a key or a name
BENCHMARKS = [
    ("1", "echo", "1+2. echo round trip and throughput vs bare pyzmq", echo.run),
    ("3", "http", "3. HTTP edge vs bare FastAPI and the httpx design", http_edge.run),
    ("4", "batching", "4. dynamic batching on vs off", batching.run),
    ("5", "big", "5. 4 MiB tensors vs bare pyzmq", big.run),
    ("6a", "manager", "6a. manager with 1,000 simulated agents", scale.run_manager),
    ("6b", "broker", "6b. broker with 100 vs 2 simulated agents", scale.run_broker),
    ("7", "routing", "7. routing with a slow agent", routing.run),
    ("8", "cold", "8. cold start: a fresh agent's first answer, a deploy to 2 agents", cold_start.run),
    ("10", "warmup", "10. first request at each batch size, warmed at every size vs at 1", warmup.run),
    ("11", "cnn", "11. a ResNet-18 through the bus vs the model in a loop", cnn.run),
]


def write_markdown(path: Path, suite: Suite, info: dict, elapsed: float, argv: list[str]) -> None:
    missed = [r for r in suite.rows if r.holds == "no"]
    failed = [r for r in suite.rows if r.ours.startswith("failed")]
    text = [
        "# Benchmark results",
        "",
        f"`python3 bench/suite.py{' ' + ' '.join(argv) if argv else ''}` "
        f"({'quick smoke run' if suite.settings.quick else 'full run'}), {elapsed / 60:.1f} minutes. Every figure is "
        "next to a baseline measured in the same run on the same machine (2 shared cores: absolute numbers are noisy, "
        "ratios less so). Targets are the TARGET_* constants in each benchmark's module (`bench/*.py`).",
        "",
        table_markdown(suite.rows),
        "",
        f"Targets missed: {len(missed)}"
        + (" (" + "; ".join(r.figure for r in missed) + ")" if missed else "")
        + (f"; benchmarks failed: {len(failed)}" if failed else ""),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in suite.notes],
        "",
    ]
    path.write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="shorten every run (smoke check, about 2 minutes)")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated benchmarks to run, by key or name: " + ", ".join(f"{k}/{n}" for k, n, _, _ in BENCHMARKS),
    )
    parser.add_argument(
        "--out",
        default=str(BENCH_DIR / "out" / "RESULTS.md"),
        help="Markdown report (default bench/out/RESULTS.md, not tracked; --out bench/RESULTS.md updates the "
        "committed record)",
    )
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := only - {k for k, _, _, _ in BENCHMARKS} - {n for _, n, _, _ in BENCHMARKS}):
        parser.error(f"unknown benchmark(s) in --only: {', '.join(sorted(unknown))}")
    suite = Suite(Settings.make(args.quick))
    info = machine_info()
    log(f"{'quick' if args.quick else 'full'} run on {info['CPU']}, {info['cores']}")
    for key, name, title, bench in BENCHMARKS:
        if only and key not in only and name not in only:
            continue
        log(f"--- {title}")
        t = time.monotonic()
        try:
            bench(suite)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            log(f"{title} failed:\n{traceback.format_exc()}")
            suite.add(Row(title, f"failed: {reason}", "-", "-", "-", "failed"))  # rows it measured before failing stay
        log(f"--- {title}: {time.monotonic() - t:.0f} s")
    elapsed = time.monotonic() - suite.started
    info["load average at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(table_text(suite.rows))
    print(
        f"\n{'quick' if args.quick else 'full'} run: {elapsed:.0f} s; machine: {info['CPU']}, {info['cores']}, "
        f"{info['memory']}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_markdown(Path(args.out), suite, info, elapsed, sys.argv[1:])
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
