"""Benchmark 8: cold start, for the `digits` demo model and a ~100 MB TorchScript MLP (random weights).

    python3 bench/cold_start.py [--rounds 5] [--quick] [--compare OTHER_CHECKOUT]   (suite: --only 8 or cold)

(a) `cluster agent` started as a fresh process (manager and broker already up) until a client's first request to
    the model is answered (the client retries every 10 ms while no agent serves it), next to a bare
    `python -c "import torch; m = torch.jit.load(F); m(x)"` process, start to exit, and a bare
    `python -c "import torch"`, the floor both pay; and an agent serving both models, until both answered (it
    loads them at once, config.LOAD_THREADS). From the agent's log: when its imports were done (a line our
    `cluster agent` writes), when its models were loaded, when it was up (connected, READY sent).
(b) `cluster deploy F --name M --share S` (a fresh CLI process: it publishes the file, then asks the manager for the
    two-phase rollout and waits for it) until every one of 2 agents serves the new version as its default (the
    broker's agent list, polled every 20 ms), and until the command exits; next to torch.jit.load of the same file
    alone (in this process, warm). From the command's output: when it had published, the rollout's own seconds.
Rounds alternate ours and the baselines; medians are reported, every round in the notes.

--compare DIR runs every measurement a second time, in the same rounds, with the processes (agents, manager, broker,
the deploy command) taken from another checkout of the project (e.g. `git worktree add /tmp/base main`): a before /
after comparison under the same load. Only the processes come from DIR; this script and its client are this one's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # as in bench/suite.py: this checkout first

import numpy as np  # noqa: E402

from bench.lib import Row, Settings, Suite, fmt, local_cluster, log, ratio_row, table_text  # noqa: E402
from bench.models import tensor_config  # noqa: E402

BIG_WIDTH = 2048
BIG_LAYERS = 6  # 6 x Linear 2048x2048 (+ bias): 100.7 MB of float32 weights
COLD_ROUNDS = 5
COLD_ROUNDS_QUICK = 2
DEPLOY_AGENTS = 2
FIRST_REQUEST_TIMEOUT = 120.0  # seconds an agent may take to answer its first request on a busy machine
POLL_S = 0.01  # between a client's tries while no agent serves the model yet
AGENTS_POLL_S = 0.02  # between looks at the broker's agent list during a rollout
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \w+ (.*)$")


def build_big(path: Path) -> None:
    """BIG_LAYERS x (Linear BIG_WIDTH x BIG_WIDTH, ReLU), random weights (seeded), scripted and saved."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = []
        for _ in range(BIG_LAYERS):
            layers += [nn.Linear(BIG_WIDTH, BIG_WIDTH), nn.ReLU()]
        torch.jit.save(torch.jit.script(nn.Sequential(*layers).eval()), str(path))


def make_models(tmp: Path) -> dict[str, dict]:
    """digits (trained here) and big100 as files; model name -> {file, config, input name, input shape}."""
    import torch

    from cluster.demo_models import DIGITS_CONFIG, train_digits

    digits = tmp / "digits.pt"
    torch.jit.save(train_digits(), str(digits))
    big = tmp / "big100.pt"
    build_big(big)
    return {
        "digits": {"file": digits, "config": DIGITS_CONFIG, "shape": (1, 8, 8), "input": "image"},
        "big100": {"file": big, "config": tensor_config("big100", BIG_WIDTH), "shape": (1, BIG_WIDTH), "input": "x"},
    }


def make_share(share: Path, models: dict[str, dict]) -> Path:
    from cluster.publish import publish_version

    for name, spec in models.items():
        publish_version(share, name, spec["file"], config=spec["config"], version=1)
    return share


@contextlib.contextmanager
def processes_from(root: Path | None):
    """LocalCluster starts its processes from `root` (another checkout) inside the block; None: this one."""
    import cluster.local

    before = cluster.local.PACKAGE_ROOT
    cluster.local.PACKAGE_ROOT = root or before
    try:
        yield
    finally:
        cluster.local.PACKAGE_ROOT = before


def bare_process(code: str) -> float:
    """Seconds from starting `python -c code` to its exit."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=FIRST_REQUEST_TIMEOUT)
    return time.perf_counter() - t


def log_times(text: str, t0: float) -> dict[str, float]:
    """Seconds after wall time t0 at which the agent's log says it had imported, loaded, come up."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0
        message = m.group(2)
        if "imported in" in message:
            found["imported"] = at
        elif re.search(r"agent \S+ loaded ", message):
            found["loaded"] = at
        elif re.search(r"agent \S+ up: ", message):
            found["up"] = at
    return found


def first_request(cluster, client, models: dict[str, dict], agent_id: str, root: Path | None) -> dict[str, float]:
    """Start a fresh agent serving only `models`; seconds until the client's first request to each of them has been
    answered ("answered") and the agent's own milestones (log_times)."""
    from cluster import ModelNotFoundError, NoAgentAvailableError

    waiting = {name: {spec["input"]: np.zeros(spec["shape"], np.float32)} for name, spec in models.items()}
    wall = time.time()
    t = time.perf_counter()
    with processes_from(root):
        proc = cluster.start_agent(
            agent_id, CLUSTER_MODELS=",".join(models), CLUSTER_LOG_LEVEL="INFO", CLUSTER_LOG_FORMAT="text"
        )
    try:
        while waiting:
            name, inputs = next(iter(waiting.items()))
            try:
                client.infer(name, inputs, timeout=FIRST_REQUEST_TIMEOUT)
                del waiting[name]
                answered = time.perf_counter() - t
            except (ModelNotFoundError, NoAgentAvailableError):
                if not proc.alive():
                    raise RuntimeError(f"{agent_id} exited with {proc.returncode}: {proc.log()[-600:]}") from None
                if time.perf_counter() - t > FIRST_REQUEST_TIMEOUT:
                    raise
                time.sleep(POLL_S)
    finally:
        cluster.stop(proc)
    return {"answered": answered, **log_times(proc.log(), wall)}


def serving_everywhere(client, model: str, version: int, agents: int) -> bool:
    serving = [
        a
        for a in client.agents(timeout=5)
        if any(m["name"] == model and m["version"] == version and m.get("default") for m in a.get("models", []))
    ]
    return len(serving) >= agents


def deploy_round(cluster, client, model: str, spec: dict, version: int, root: Path | None) -> dict[str, float]:
    """`cluster deploy` of the model's file as `version`: seconds until every agent serves it ("serving"), until the
    command printed that it had published ("published") and until it exited ("exited"); "rollout": the manager's
    own count, from the command's output."""
    served: list[float] = []
    stop = threading.Event()

    def watch(t0: float) -> None:
        while not stop.is_set():
            if serving_everywhere(client, model, version, DEPLOY_AGENTS):
                served.append(time.perf_counter() - t0)
                return
            time.sleep(AGENTS_POLL_S)

    argv = [
        sys.executable,
        "-m",
        "cluster",
        "deploy",
        str(spec["file"]),
        "--name",
        model,
        "--share",
        str(cluster.share),
    ]
    argv += ["--manager", cluster.addresses.manager_queries]
    env = cluster.env()
    env["PYTHONPATH"] = str(root or Path(__file__).resolve().parent.parent)
    t0 = time.perf_counter()
    watcher = threading.Thread(target=watch, args=(t0,), daemon=True)
    watcher.start()
    published = None
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        output = []
        for line in proc.stdout:
            output.append(line)
            if published is None and line.startswith("published "):
                published = time.perf_counter() - t0
    exited = time.perf_counter() - t0
    watcher.join(60)
    stop.set()
    text = "".join(output)
    if proc.returncode != 0 or not served or f"version {version}" not in text:
        raise RuntimeError(f"deploy of {model} v{version} failed ({proc.returncode}): {text}")
    rollout = re.search(r"done in ([\d.]+) s", text)
    return {
        "serving": served[0],
        "exited": exited,
        "published": published or float("nan"),
        "rollout": float(rollout.group(1)) if rollout else float("nan"),
    }


def jit_load_seconds(path: Path) -> float:
    import torch

    t = time.perf_counter()
    torch.jit.load(str(path), map_location="cpu")
    return time.perf_counter() - t


def med(rounds: list[dict], key: str) -> float:
    values = [r[key] for r in rounds if key in r]
    return float(np.median(values)) if values else float("nan")


def listed(rounds: list[dict], key: str, digits: int = 2) -> list:
    return [round(r[key], digits) if key in r else None for r in rounds]


def run(suite: Suite, rounds: int | None = None, compare: Path | None = None) -> None:
    from cluster.publish import remove_version

    rounds = rounds or (COLD_ROUNDS_QUICK if suite.settings.quick else COLD_ROUNDS)
    variants: dict[str, Path | None] = {"": None}
    if compare is not None:
        variants[f" [before: {compare}]"] = compare
    with tempfile.TemporaryDirectory(prefix="suite-cold-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        # `python -m cluster` looks in its working directory first: run every process from one without a checkout
        stack.callback(os.chdir, os.getcwd())
        os.chdir(tmp)
        log("8 cold start: training digits and building the 100 MB model")
        models = make_models(tmp)
        share = make_share(tmp / "share", models)
        cluster = stack.enter_context(local_cluster(share, tmp / "logs"))
        cluster.start_manager()
        cluster.start_broker()
        client = cluster.client(timeout=10)
        # (a) a fresh agent process to its first answer (to each model, for the agent serving both)
        cases = {name: {name: spec} for name, spec in models.items()}
        cases["digits+big100"] = models
        for case, served in cases.items():
            ours: dict[str, list] = {label: [] for label in variants}
            bare, import_torch = [], []
            code = "import torch\n" + "".join(
                f"torch.jit.load({str(spec['file'])!r})(torch.zeros({spec['shape']!r}))\n" for spec in served.values()
            )
            for r in range(rounds):
                log(f"8a cold start {case}: round {r + 1}/{rounds}")
                for n, (label, root) in enumerate(variants.items()):
                    ours[label].append(first_request(cluster, client, served, f"cold-{r}-{n}-{len(served)}", root))
                bare.append(bare_process(code))
                import_torch.append(bare_process("import torch"))
            for label, results in ours.items():
                suite.add(
                    ratio_row(
                        f"8a. `cluster agent` start to first answer, {case}{label} (s, median of {rounds})",
                        med(results, "answered"),
                        float(np.median(bare)),
                        2,
                        "-",
                    )
                )
                suite.note(
                    f"8a {case}{label}: first answer {listed(results, 'answered')} s after the agent's start; its log "
                    f"says: imports done {listed(results, 'imported')}, models loaded {listed(results, 'loaded')}, "
                    f"up {listed(results, 'up')} s"
                )
            suite.add(
                Row(
                    f"8a. bare `python -c 'import torch'` (s, median of {rounds}, during {case})",
                    fmt(np.median(import_torch), 2),
                    "-",
                )
            )
            suite.note(
                f"8a {case} baselines: python import torch + jit.load + forward {[round(v, 2) for v in bare]} s; "
                f"python import torch {[round(v, 2) for v in import_torch]} s"
            )
        # (b) a deploy rolled out to 2 agents, a cluster per variant (its own share)
        clusters = {}
        for n, (label, root) in enumerate(variants.items()):
            if n == 0:
                clusters[label] = cluster
                continue
            other = stack.enter_context(local_cluster(make_share(tmp / f"share-{n}", models), tmp / f"logs-{n}"))
            with processes_from(root):
                other.start_manager()
                other.start_broker()
            clusters[label] = other
        for label, root in variants.items():
            with processes_from(root):
                clusters[label].start_agents(DEPLOY_AGENTS)
        for label in variants:
            clusters[label].wait_for_agents(DEPLOY_AGENTS, timeout=FIRST_REQUEST_TIMEOUT, model="big100")
        clients = {label: client if c is cluster else c.client(timeout=10) for label, c in clusters.items()}
        for model, spec in models.items():
            results: dict[str, list] = {label: [] for label in variants}
            loads = []
            for r in range(rounds):
                version = r + 2
                log(f"8b deploy {model} v{version} to {DEPLOY_AGENTS} agents: round {r + 1}/{rounds}")
                for label, root in variants.items():
                    c = clusters[label]
                    results[label].append(deploy_round(c, clients[label], model, spec, version, root))
                    remove_version(c.share, model, version - 1)  # served no more: keep the share's size flat
                loads.append(jit_load_seconds(spec["file"]))
            for label, rs in results.items():
                suite.add(
                    ratio_row(
                        f"8b. `cluster deploy` to {DEPLOY_AGENTS} agents serving it, {model}{label} "
                        f"(s, median of {rounds})",
                        med(rs, "serving"),
                        float(np.median(loads)),
                        2,
                        "-",
                    ),
                    Row(f"8b. `cluster deploy` command exits, {model}{label}", fmt(med(rs, "exited"), 2), "-"),
                )
                suite.note(
                    f"8b {model}{label}: every agent serving {listed(rs, 'serving')} s after the command started; "
                    f"it had published at {listed(rs, 'published')}, exited at {listed(rs, 'exited')}; the "
                    f"manager's rollout took {listed(rs, 'rollout')} s"
                )
            suite.note(f"8b {model} baseline: torch.jit.load alone {[round(v, 3) for v in loads]} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds (default {COLD_ROUNDS})")
    parser.add_argument("--quick", action="store_true", help=f"{COLD_ROUNDS_QUICK} rounds")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout whose processes to run too")
    args = parser.parse_args()
    suite = Suite(Settings.make(args.quick))
    run(suite, args.rounds, args.compare.resolve() if args.compare else None)
    print(table_text(suite.rows))
    for note in suite.notes:
        print(f"- {note}")
    print(f"(load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
