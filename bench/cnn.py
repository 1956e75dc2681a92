"""Benchmark 11 (issue 23, item 5): a real model's figure. A ResNet-18 (bench/gpu.py's `resnet18`: BasicBlock x
[2, 2, 2, 2], 64-512 channels, 11.7 M parameters, seeded random weights, eval mode), FP32 [-1, 3, 224, 224] in and
[-1, 1000] out, served by one agent with dynamic batching (max_batch_size 32), one image per request, 1, 8 and 32
requests in flight through cluster.Client; against the same model file called in a loop in this process, batch 1
per call (and, informational, batch = requests in flight), with the same torch thread count, in the same run.

    python3 bench/suite.py --only cnn [--quick]     (or: python3 -m bench.cnn [--quick])

The set-up, and why (the suite's note repeats it):
- TorchScript, frozen (torch.jit.freeze: batch norms folded into the convolutions) and channels-last (NHWC, the
  layout oneDNN's CPU convolutions are fast in): how one ships a CNN for CPU inference with torch. Both sides load
  the same file. Not an exported .pt2: run eagerly it was 2.3x slower than TorchScript here (bench/pt2.py), and
  compiled (AOTInductor) it adds a C++ build to a benchmark meant to take 2 minutes. CPU per image on one thread,
  channels-last: 23.5 ms alone, 16 in a batch of 8, 21 in a batch of 32; with the plain NCHW layout 30 ms alone, 29
  at 4, 34 at 32 (cache): batching could not gain.
- One agent, --threads 1 --workers 1, and torch.set_num_threads(1) here: both sides get one core for the model.
  This machine has 2 cores: the other one runs the client, the broker and the agent's I/O thread (a few % of a core
  at these rates). Two agents, or two torch threads, would give the cluster twice the baseline's cores, or put
  OpenMP threads in a fight with the bus processes for 2 shared cores.
- max_queue_delay_us 2000: under a tenth of one image's forward pass (about 20-30 ms here), so a batch that waits
  for more loses little. The batcher waits only when it took two or more at once (1 in flight never waits), and at
  8 and 32 in flight the requests answered during a forward pass are back in the queue before it ends, so the wait
  rarely comes into play: with one worker, 32 in flight run as pairs of batches that add up to 32.
- The machine is shared, its load changes by the second: each served run lies between two rounds of the batch-1
  loop, which are its baseline; 32 in flight runs 5 times (full run) and the run with the median ratio is shown.
- images/s: the least-squares slope of answers counted against time over the window (at 32 in flight answers come
  in bursts of a batch, 0.1-0.7 s apart on a quiet machine: a count over a fixed window would be off by up to a burst).
- Every answer is checked: FP32 [1, 1000], equal (within RTOL / ATOL) to the in-process model's answer for the image
  it was asked about (requests cycle through IMAGES distinct seeded images). A wrong, failed or lost answer fails
  the benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # as in bench/suite.py: this checkout first

import numpy as np  # noqa: E402

from bench.lib import Row, Settings, Suite, cpu_seconds, local_cluster, log, percentile, ratio_row, table_text  # noqa: E402

TARGET_CNN_32_MIN_RATIO = 0.9  # 11c: images/s with 32 in flight through the bus >= 0.9x the in-process loop, batch 1

MODEL = "cnn"
IMAGE = 224
CLASSES = 1000
CONCURRENCY = (1, 8, 32)
MAX_BATCH = 32
QUEUE_DELAY_US = 2000
WARMUP_SIZES = [1, 2, 4, 8, 16, 32]  # the agent warms these (not all 32 sizes: ~10 s of start-up for nothing here)
TORCH_THREADS = 1
IMAGES = 4  # distinct images the requests cycle through: an answer given to the wrong request shows
# a batched pass adds in another order than a pass of one image: their logits (about 0.05 in size here) are ~1e-7
# apart; two different images' are ~1e-2 apart
RTOL, ATOL = 1e-4, 1e-5


@dataclass
class Windows:
    """Seconds measured (after warm-up) for each figure."""

    served: dict  # in flight -> (warm-up, window)
    rounds_32: int  # served runs at 32 in flight (the figure with a target)
    loop1: float  # each round of the batch-1 loop, before and after every served run
    loop_n_calls: int  # calls of the loop at batch = in flight (each 0.1-0.7 s)

    @classmethod
    def of(cls, s: Settings) -> Windows:
        if s.quick:
            return cls({1: (0.5, 2.0), 8: (0.5, 2.5), 32: (1.5, 3.0)}, 1, 1.5, 2)
        return cls({1: (1.0, 6.0), 8: (1.0, 6.0), 32: (2.0, 6.0)}, 5, 3.0, 4)


def _channels_last_class():
    import torch

    class ChannelsLastModel(torch.nn.Module):
        """The network with its input turned channels-last, as its weights are."""

        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.net(image.contiguous(memory_format=torch.channels_last))

    return ChannelsLastModel


def build_cnn(path: Path) -> tuple:
    """bench/gpu.py's ResNet-18, channels-last, scripted, frozen and saved to `path`; returns it loaded back from the
    file (as the agent loads it) and its parameter count (frozen, the weights are constants of the graph)."""
    import torch

    from bench.gpu import resnet18

    net = resnet18(CLASSES).to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in net.parameters())
    frozen = torch.jit.freeze(torch.jit.script(_channels_last_class()(net).eval()))
    torch.jit.save(frozen, str(path))
    return torch.jit.load(str(path)), params


def cnn_config() -> dict:
    return {
        "name": MODEL,
        "platform": "torchscript",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, IMAGE, IMAGE]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}],
        "max_batch_size": MAX_BATCH,
        "max_queue_delay_us": QUEUE_DELAY_US,
        "warmup_batch_sizes": WARMUP_SIZES,
        "instances": 1,
    }


# ---- the baseline: the model in a loop in this process ---------------------------------------------------------


def loop(model, x, seconds: float = 0.0, calls: int = 0) -> dict:
    """model(x) in a loop for `seconds` or `calls` calls (after one unmeasured call): the seconds of each call, the
    images it answered and the CPU seconds of this thread."""
    import torch

    times = []
    with torch.inference_mode():
        model(x)
        cpu = time.thread_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < calls:
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
        cpu = time.thread_time() - cpu
    return {"times": times, "images": len(x) * len(times), "cpu_s": cpu, "batch": len(x)}


def timed_loop(model, x, seconds: float = 0.0, calls: int = 0) -> dict:
    """loop(), with its figure in the progress log."""
    log(f"11 cnn: in-process loop, batch {len(x)}, " + (f"{seconds:g} s" if seconds else f"{calls} calls"))
    r = loop(model, x, seconds, calls)
    log(f"11 cnn: {r['images'] / sum(r['times']):.1f} images/s")
    return r


def pooled(loops: list[dict]) -> dict:
    """Loops of one batch size as one: images/s over all their calls, p99 of a call, CPU per image."""
    times = [t for r in loops for t in r["times"]]
    images = sum(r["images"] for r in loops)
    return {
        "images_s": images / sum(times),
        "p99_ms": percentile(times, 99) * 1e3,
        "cpu_ms": 1e3 * sum(r["cpu_s"] for r in loops) / images,
        "calls": len(times),
    }


# ---- through the bus ----------------------------------------------------------------------------------------------


def images_per_second(completed: list[float]) -> float:
    """The least-squares slope of answers counted against their arrival times: answers that come in bursts (a batch
    at a time) give the mean rate, where a count over a fixed window is off by up to a burst."""
    if len(completed) < 2:
        return float("nan")
    times = np.sort(np.asarray(completed))
    return float(np.polyfit(times - times[0], np.arange(len(times)), 1)[0])


def served(client, images: list, in_flight: int, warmup: float, seconds: float, cpu=None) -> dict:
    """Keep `in_flight` requests of one image each outstanding through Client.submit for warmup + seconds. Returns
    images/s, latencies and CPU per image (`cpu()`: CPU seconds of the serving processes) over the window, and every
    answer (image index, result) for the check."""
    done = threading.Semaphore(0)
    records: list[tuple[float, float]] = []  # (submitted, answered)
    answers: list[tuple[int, object]] = []
    errors: dict[str, int] = {}
    sent = 0

    def finished(future, t0: float, k: int) -> None:
        t1 = time.perf_counter()
        exc = future.exception()
        if exc is None:
            records.append((t0, t1))
            answers.append((k, future.result()))
        else:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        done.release()

    def submit() -> None:
        nonlocal sent
        k = sent % len(images)
        sent += 1
        t0 = time.perf_counter()
        client.submit(MODEL, {"image": images[k]}, timeout=60).add_done_callback(
            lambda f, t0=t0, k=k: finished(f, t0, k)
        )

    for _ in range(in_flight):
        submit()
    start = time.perf_counter() + warmup
    end = start + seconds
    cpu0 = None
    while (now := time.perf_counter()) < end:
        if cpu0 is None and now >= start and cpu:
            cpu0, cpu_t0 = cpu(), now
        if not done.acquire(timeout=60):
            raise RuntimeError(f"{MODEL}: no answer for 60 s with {in_flight} in flight")
        submit()
    cpu1, cpu_t1 = (cpu(), time.perf_counter()) if cpu0 is not None else (None, None)
    for _ in range(in_flight):
        if not done.acquire(timeout=60):
            raise RuntimeError(f"{MODEL}: requests in flight not answered within 60 s")
    rate = images_per_second([t1 for _, t1 in records if start <= t1 <= end])
    latencies = [t1 - t0 for t0, t1 in records if t0 >= start and t1 <= end]
    return {
        "sent": sent,
        "errors": errors,
        "answers": answers,
        "images_s": rate,
        "latencies": latencies,
        "cpu_ms": 1e3 * (cpu1 - cpu0) / (rate * (cpu_t1 - cpu_t0)) if cpu1 is not None else float("nan"),
    }


def wrong_answers(answers: list, expected: list) -> list[str]:
    """What is wrong with each answer that is not FP32 [1, CLASSES] equal to its image's expected logits."""
    wrong = []
    for k, result in answers:
        try:
            y = result.as_numpy("logits")
        except Exception as exc:  # a missing output
            wrong.append(f"image {k}: {type(exc).__name__}: {exc}")
            continue
        if y.dtype != np.float32 or y.shape != (1, CLASSES):
            wrong.append(f"image {k}: {y.dtype} {list(y.shape)}, not float32 [1, {CLASSES}]")
        elif not np.allclose(y, expected[k], rtol=RTOL, atol=ATOL):
            wrong.append(f"image {k}: logits off by up to {float(np.max(np.abs(y - expected[k]))):.3g}")
    return wrong


def batching_stats(client) -> dict:
    """The agent's batching counters for the model (batches, requests), from its last heartbeat."""
    for agent in client.agents(timeout=10):
        stats = (agent.get("batching") or {}).get(MODEL)
        if stats:
            return stats
    return {"batches": 0, "requests": 0}


# ---- the benchmark --------------------------------------------------------------------------------------------------


def measure(s: Settings) -> dict:
    """Every figure, in one run: the served runs (1, 8, then 32 in flight, Windows.rounds_32 times) each between two
    rounds of the batch-1 loop, the baseline it is compared with (the machine is shared: the load changes by the
    second); the loop at batch 8 and 32 after the first run at that level."""
    import torch

    from cluster import Client
    from cluster.publish import publish_version

    w = Windows.of(s)
    plan = [1, 8] + [32] * w.rounds_32
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)  # as the agent (--threads 1); the suite's other benchmarks get it back
    try:
        with tempfile.TemporaryDirectory(prefix="suite-cnn-") as tmp:
            tmp = Path(tmp)
            share, path = tmp / "share", tmp / "cnn.pt"
            model, params = build_cnn(path)
            publish_version(share, MODEL, path, config=cnn_config(), version=1)
            rng = np.random.default_rng(0)
            images = [rng.standard_normal((1, 3, IMAGE, IMAGE), dtype=np.float32) for _ in range(IMAGES)]
            with torch.inference_mode():
                for b in WARMUP_SIZES:  # warmed as the agent warms it
                    model(torch.zeros(b, 3, IMAGE, IMAGE))
                expected = [model(torch.from_numpy(x)).numpy() for x in images]
            one = torch.from_numpy(images[0])
            with local_cluster(share, tmp / "logs") as cluster:
                cluster.start_manager()
                broker = cluster.start_broker()
                agent = cluster.start_agent(
                    None, "--threads", str(TORCH_THREADS), "--workers", "1", "--capacity", str(2 * MAX_BATCH)
                )
                cluster.wait_for_agents(1, model=MODEL, timeout=180)
                pids = (agent.pid, broker.pid, os.getpid())

                def cpu() -> float:  # the agent, the broker, and this process (the client's I/O; the loop is idle)
                    return sum(cpu_seconds(pid) for pid in pids)

                loops1 = [timed_loop(model, one, seconds=w.loop1)]
                runs, loop_n = [], {}
                with Client(cluster.addresses.broker_clients, timeout=60) as client:
                    for n in plan:
                        warm, seconds = w.served[n]
                        log(f"11 cnn: through the bus, {n} in flight, {warm:g} + {seconds:g} s")
                        before = batching_stats(client)
                        run = served(client, images, n, warm, seconds, cpu)
                        p99 = percentile(run["latencies"], 99) * 1e3
                        log(f"11 cnn: {run['images_s']:.1f} images/s, p99 {p99:.1f} ms")
                        loops1.append(timed_loop(model, one, seconds=w.loop1))  # also a heartbeat's time
                        after = batching_stats(client)
                        taken = after["batches"] - before["batches"]
                        run["mean_batch"] = (after["requests"] - before["requests"]) / taken if taken else 0
                        runs.append((n, run))
                        if n > 1 and n not in loop_n:  # the informational baseline, near the run it goes with
                            batch = torch.from_numpy(np.concatenate([images[i % IMAGES] for i in range(n)]))
                            loop_n[n] = pooled([timed_loop(model, batch, calls=w.loop_n_calls)])
    finally:
        torch.set_num_threads(threads)
    problems = []
    for n, run in runs:
        if run["errors"]:
            problems.append(f"{n} in flight: failed requests {run['errors']}")
        answers = run.pop("answers")
        if len(answers) != run["sent"]:
            problems.append(f"{n} in flight: {run['sent'] - len(answers)} of {run['sent']} not answered")
        wrong = wrong_answers(answers, expected)
        if wrong:
            problems.append(f"{n} in flight: {len(wrong)} wrong answers, e.g. {wrong[0]}")
        run["checked"] = len(answers)
    if problems:
        raise RuntimeError("; ".join(problems))
    levels = {}
    for n in CONCURRENCY:
        # served run i lies between loop rounds i and i + 1, its baseline; of several runs at one level, the one with
        # the median ratio gives the figures (a run that met a burst of the machine's other load does not)
        at = [i for i, (m, _) in enumerate(runs) if m == n]
        ratios = sorted((runs[i][1]["images_s"] / pooled(loops1[i : i + 2])["images_s"], i) for i in at)
        median = ratios[len(ratios) // 2][1]
        mine = [runs[i][1] for i in at]
        latencies = [t for r in mine for t in r["latencies"]]
        levels[n] = {
            "images_s": runs[median][1]["images_s"],
            "loop1": pooled(loops1[median : median + 2]),
            "ratios": [round(v, 2) for v, _ in ratios],
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "cpu_ms": float(np.mean([r["cpu_ms"] for r in mine])),
            "mean_batch": float(np.mean([r["mean_batch"] for r in mine])),
            "checked": sum(r["checked"] for r in mine),
            "runs": len(mine),
        }
    return {"params": params, "levels": levels, "loop1": pooled(loops1), "loop_n": loop_n}


def rows(r: dict) -> list[Row]:
    out = []
    for n, level in r["levels"].items():
        letter = {1: "a", 8: "b", 32: "c"}[n]
        base = level["loop1"]
        target, check = "-", None
        if n == 32:
            target, check = f">= {TARGET_CNN_32_MIN_RATIO:g}x loop", lambda v: v >= TARGET_CNN_32_MIN_RATIO
        runs = f", the median of {level['runs']} runs by ratio" if level["runs"] > 1 else ""
        out.append(
            ratio_row(
                f"11{letter}. CNN ResNet-18 224x224, {n} in flight through the bus vs the model in a loop in-process, "
                f"batch 1 (images/s{runs})",
                level["images_s"],
                base["images_s"],
                1,
                target,
                check,
            )
        )
        out.append(
            ratio_row(
                f"11{letter}. CNN, {n} in flight, p99 (ms) vs a call of the loop at batch {n}",
                level["p99_ms"],
                (r["loop_n"].get(n) or base)["p99_ms"],
                1,
                "-",
            )
        )
    top = CONCURRENCY[-1]
    out.append(
        ratio_row(
            f"11c. CNN, {top} in flight, CPU per image (ms): agent + broker + client vs the loop, batch 1",
            r["levels"][top]["cpu_ms"],
            r["levels"][top]["loop1"]["cpu_ms"],
            1,
            "-",
        )
    )
    for n, loop_n in r["loop_n"].items():
        out.append(
            ratio_row(
                f"11d. CNN, {n} in flight through the bus vs the loop at batch {n} (images/s, informational)",
                r["levels"][n]["images_s"],
                loop_n["images_s"],
                1,
                "-",
            )
        )
    return out


def note(r: dict) -> str:
    levels = "; ".join(
        f"{n} in flight: mean batch {v['mean_batch']:.1f}, p50 {v['p50_ms']:.1f} ms, CPU per image {v['cpu_ms']:.1f} "
        f"ms (loop {v['loop1']['cpu_ms']:.1f}), {v['checked']} answers checked"
        + (f", ratios of the runs {v['ratios']}" if v["runs"] > 1 else "")
        for n, v in r["levels"].items()
    )
    return (
        f"11 cnn: ResNet-18 ({r['params'] / 1e6:.2f} M parameters), FP32 [-1, 3, {IMAGE}, {IMAGE}] -> [-1, {CLASSES}], "
        f"TorchScript, frozen, channels-last (bench/cnn.py says why); one agent --threads {TORCH_THREADS} --workers "
        f"1, max_batch_size {MAX_BATCH}, max_queue_delay_us {QUEUE_DELAY_US}; the baseline is the same file in a loop "
        f"in the suite's process with torch.set_num_threads({TORCH_THREADS}): one core for the model on each side "
        "(this machine has 2: the other runs the client, the broker and the agent's I/O; two agents, or two torch "
        "threads, would give the cluster twice the baseline's cores, or set OpenMP threads against the bus "
        "processes); each served run lies between two rounds of the batch-1 loop, its baseline (the load changes by "
        f"the second here). {levels}; the loop at batch 1: {r['loop1']['calls']} calls in all, "
        + ", ".join(
            f"at batch {n}: {v['calls']} calls, CPU per image {v['cpu_ms']:.1f} ms" for n, v in r["loop_n"].items()
        )
        + f"; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def run(suite: Suite) -> None:
    r = measure(suite.settings)
    suite.add(*rows(r))
    suite.note(note(r))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke check, about 30 s)")
    args = parser.parse_args(argv)
    suite = Suite(Settings.make(args.quick))
    run(suite)
    print(table_text(suite.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
