"""PyTorch 2 serving (issue 22): images/s and p99 of the same model as TorchScript, as an exported program run
eagerly and as an AOTInductor package (`cluster deploy --compile`), on CPU, in one run: through the cluster (one
agent, dynamic batching, CONCURRENCY requests of one image in flight) and called directly in a loop in this process
(the baseline: batch 1, and batches of max_batch_size, the most the agent can do with a batch). Both with one torch
thread (the agent's default, --threads 1): on a loaded 2-core machine, two OpenMP threads made every variant 5-50x
slower.

    python3 -m bench.pt2                      # the CNN and the transformer encoder (tests/pt2_models.py)
    python3 -m bench.pt2 --models cnn --seconds 5

Models: tests/pt2_models.py (random weights). Nothing is asserted: tests/test_pt2_compile.py checks the answers.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lib import closed_loop, local_cluster, log, percentile

CONCURRENCY = 32
RUNS = ("torchscript", "exported", "aoti")


def direct(call, x, seconds: float) -> dict:
    """`call(x)` in a loop for `seconds` (after 1 s of warm-up): images/s and p99 of one call."""
    import torch

    times = []
    with torch.inference_mode():
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            call(x)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            call(x)
            times.append(time.perf_counter() - t)
    return {"images_s": len(times) * len(x) / sum(times), "p99_ms": percentile(times, 99) * 1e3}


def prepare(kind: str, folder: Path, share: Path) -> tuple[dict, dict, object]:
    """Publish the model three times (name-<run>); the direct callables of each, the config and a sample."""
    import torch

    from cluster.compile import compile_program, compiled_json
    from cluster.model_config import ModelConfig
    from cluster.publish import publish_version
    from cluster.torch_files import load_package, load_program
    from tests import pt2_models

    model, config, sample = pt2_models.make(kind)
    config = {**config, "max_queue_delay_us": 2000}
    program = pt2_models.export(model, sample, folder / f"{kind}.pt2")
    scripted = pt2_models.script(model, sample, folder / f"{kind}.pt")
    out = folder / f"{kind}-aoti"
    out.mkdir()
    log(f"pt2: compiling {kind} (AOTInductor)")
    package, entry = compile_program(program, ModelConfig.from_dict(config, name=kind), out)
    (out / "compiled.json").write_bytes(compiled_json({package.name: entry}))
    log(f"pt2: {kind} compiled in {entry['seconds']:.1f} s")
    publish_version(share, f"{kind}-torchscript", scripted, config)
    publish_version(share, f"{kind}-exported", program, config)
    publish_version(
        share, f"{kind}-aoti", program, config, extra={package.name: package, "compiled.json": out / "compiled.json"}
    )
    # the baselines, loaded as agents load them (cluster.torch_files: the program's checks, torch's C++ package loader)
    exported = load_program(io.BytesIO(Path(program).read_bytes()), str(program))
    calls = {
        "torchscript": torch.jit.load(str(scripted)),
        "exported": exported.module(check_guards=False),
        "aoti": load_package(package.read_bytes()),
    }
    with torch.inference_mode():
        expected = model(sample)
        for runs, call in calls.items():
            if not torch.allclose(call(sample), expected, rtol=1e-3, atol=1e-4):
                raise RuntimeError(f"{kind} as {runs} does not answer like the model")
    return calls, config, sample


def run(kinds: list[str], seconds: float) -> list[tuple]:
    import torch

    from cluster import Client

    rows = []
    torch.set_num_threads(1)  # as the agent (--threads 1)
    with tempfile.TemporaryDirectory(prefix="bench-pt2-") as tmp:
        tmp = Path(tmp)
        share = tmp / "share"
        prepared = {kind: prepare(kind, tmp, share) for kind in kinds}
        with local_cluster(share, tmp / "logs") as cluster:
            cluster.start_manager()
            cluster.start_broker()
            cluster.start_agents(1, "--capacity", str(2 * CONCURRENCY))
            for kind in kinds:
                for runs in RUNS:
                    cluster.wait_for_agents(1, model=f"{kind}-{runs}", timeout=180)
            with Client(cluster.addresses.broker_clients, timeout=60) as client:
                info = client.agents()[0].get("model_info") or {}
                for kind, (calls, config, sample) in prepared.items():
                    name_in = config["inputs"][0]["name"]
                    one = sample[:1]
                    batch = torch.randn(config["max_batch_size"], *sample.shape[1:])
                    for runs in RUNS:
                        name = f"{kind}-{runs}"
                        shown = (info.get(name) or {}).get("1", {}).get("runs")
                        if shown != runs:
                            raise RuntimeError(f"{name}: the agent runs {shown!r}, not {runs!r}")
                        log(f"pt2: {name} direct, batch 1 and {len(batch)}")
                        d1 = direct(calls[runs], one, seconds)
                        dn = direct(calls[runs], batch, seconds)
                        log(f"pt2: {name} through the cluster, {CONCURRENCY} in flight")
                        c = closed_loop(client, name, {name_in: one.numpy()}, CONCURRENCY, seconds, 1.0)
                        rows.append((kind, runs, c["throughput"], c["p99_ms"], d1, dn))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,encoder", help="cnn, encoder or both")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds each figure is measured")
    args = parser.parse_args(argv)
    rows = run([k.strip() for k in args.models.split(",")], args.seconds)
    print(
        f"\n| model | runs | cluster, {CONCURRENCY} in flight: images/s | p99 ms | direct batch 1: images/s | p99 ms "
        "| direct max batch: images/s | p99 ms |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, runs, images, p99, d1, dn in rows:
        print(
            f"| {kind} | {runs} | {images:,.0f} | {p99:.1f} | {d1['images_s']:,.0f} | {d1['p99_ms']:.2f} "
            f"| {dn['images_s']:,.0f} | {dn['p99_ms']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
