"""The agent's GPU path (issue 13, point 7): a ResNet-18-sized convolutional TorchScript model with random weights,
served by one agent on `--device cuda`, batching off and on, against the same model called directly in a loop on the
same GPU (the ceiling).

    python3 bench/gpu.py                      # on a machine with a GPU: the full run (a few minutes)
    python3 bench/gpu.py --device cpu --quick  # the plumbing only, on any machine (small images, short runs)

What it prints, one line per figure, images/s and p99 beside the ceiling:
  - ceiling: the model on the GPU in a loop, batch sizes 1-64 (input copied to the GPU and the output back, as the
    agent does);
  - batching off (`resnet_single`): requests of b images each, IN_FLIGHT_PER_BATCH requests in flight, b = 1-64;
  - batching on (`resnet_batched`, max_batch_size 64): requests of one image, 1-64 in flight, the agent's batcher
    forming the batches (its mean batch is printed).

It refuses to run on `--device cuda` without a GPU rather than print CPU figures under a GPU label.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # as `python3 -m bench.gpu` does

import numpy as np  # noqa: E402

from bench.lib import closed_loop, local_cluster, log, percentile  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)
IN_FLIGHT_PER_BATCH = 4  # batching off: requests in flight, enough to keep the GPU fed while one travels
MAX_BATCH = 64
BATCH_DELAY_US = 2000  # the batcher waits at most this long to fill a batch


def resnet18(classes: int = 1000):
    """A ResNet-18 (BasicBlock x [2, 2, 2, 2], 64-512 channels, 11.7 M parameters) in plain torch, with seeded random
    weights, in eval mode: the shape of a real vision model without downloading one (torchvision is not a
    dependency). bench/cnn.py serves it too."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.down(x))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            widths, blocks, cin = (64, 128, 256, 512), [], 64
            for i, w in enumerate(widths):
                blocks += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
                cin = w
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, classes)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.blocks(self.stem(image))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ResNet18().eval()


def build_resnet18(path: Path, classes: int = 1000):
    """resnet18(classes), scripted and saved to `path`."""
    import torch

    module = torch.jit.script(resnet18(classes))
    torch.jit.save(module, str(path))
    return module


def resnet_config(name: str, size: int, max_batch: int) -> dict:
    return {
        "name": name,
        "platform": "torchscript",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
        "max_batch_size": max_batch,
        "max_queue_delay_us": BATCH_DELAY_US if max_batch else 0,
        "instances": 1,
    }


def ceiling(module, device: str, size: int, batch: int, seconds: float) -> dict:
    """The model called directly in a loop on `device`: host tensor in, host tensor out, as the agent runs it."""
    import torch

    model = module.to(device)
    x = torch.randn(batch, 3, size, size)
    latencies, end = [], None
    with torch.inference_mode():
        for _ in range(10):  # warm up: TorchScript optimizes after its profiling runs, cuDNN picks its algorithms
            model(x.to(device)).cpu()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(latencies) < 5:
            t = time.perf_counter()
            model(x.to(device)).cpu()  # .cpu() waits for the GPU
            latencies.append(time.perf_counter() - t)
    return {
        "images_per_s": batch * len(latencies) / sum(latencies),
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a plumbing check only)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes, comma-separated")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured run")
    parser.add_argument("--quick", action="store_true", help="32-pixel images, batches 1,4, 2 s runs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/gpu.py: no GPU here (torch {torch.__version__}, no CUDA); nothing measured", file=sys.stderr)
        return 2
    size, seconds = (32, 2.0) if args.quick else (args.size, args.seconds)
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",") if b]
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    from cluster import Client
    from cluster.publish import publish_version

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        share, model_path = tmp / "share", tmp / "resnet18.pt"
        module = build_resnet18(model_path)
        publish_version(share, "resnet_single", model_path, config=resnet_config("resnet_single", size, 0), version=1)
        batched = resnet_config("resnet_batched", size, MAX_BATCH)
        publish_version(share, "resnet_batched", model_path, config=batched, version=1)

        for b in batches:
            log(f"gpu: ceiling, batch {b}")
            rows.append(dict(kind="ceiling", batch=b, in_flight=1, **ceiling(module, args.device, size, b, seconds)))
        module = None
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the agent gets the GPU's memory to itself

        with local_cluster(share, tmp / "logs") as cluster:
            cluster.start_manager()
            cluster.start_broker()
            cluster.start_agent(None, "--device", args.device, "--capacity", str(MAX_BATCH), "--threads", "0")
            cluster.wait_for_agents(1, model="resnet_batched", timeout=300)
            rng = np.random.default_rng(0)
            with Client(cluster.addresses.broker_clients, timeout=120) as client:
                for b in batches:
                    log(f"gpu: batching off, requests of {b} images, {IN_FLIGHT_PER_BATCH} in flight")
                    x = {"image": rng.standard_normal((b, 3, size, size), dtype=np.float32)}
                    r = closed_loop(client, "resnet_single", x, IN_FLIGHT_PER_BATCH, seconds, 2.0)
                    rows.append(
                        dict(
                            kind="batching off",
                            batch=b,
                            in_flight=IN_FLIGHT_PER_BATCH,
                            images_per_s=r["throughput"] * b,
                            p99_ms=r["p99_ms"],
                        )
                    )
                one = {"image": rng.standard_normal((1, 3, size, size), dtype=np.float32)}
                for n in batches:
                    log(f"gpu: batching on, requests of 1 image, {n} in flight")
                    r = closed_loop(client, "resnet_batched", one, n, seconds, 2.0)
                    stats = [(a.get("batching") or {}).get("resnet_batched", {}) for a in client.agents()]
                    mean_batch = next((s.get("mean_batch") for s in stats if s.get("mean_batch")), None)
                    rows.append(
                        dict(
                            kind="batching on",
                            batch=1,
                            in_flight=n,
                            images_per_s=r["throughput"],
                            p99_ms=r["p99_ms"],
                            mean_batch=mean_batch,
                        )
                    )

    best_ceiling = {r["batch"]: r["images_per_s"] for r in rows if r["kind"] == "ceiling"}
    if args.json:
        print(json.dumps({"device": device_name, "size": size, "rows": rows}, indent=2))
        return 0
    print(f"ResNet-18, {size}x{size} images, device {args.device} ({device_name}), torch {torch.__version__}")
    print(f"{'run':<14} {'batch':>5} {'in flight':>9} {'images/s':>10} {'p99 ms':>9} {'vs ceiling':>10}  note")
    for r in rows:
        same = best_ceiling.get(r["batch"] if r["kind"] != "batching on" else min(r["in_flight"], MAX_BATCH))
        versus = f"{r['images_per_s'] / same:.2f}x" if same and r["kind"] != "ceiling" else "-"
        note = f"mean batch {r['mean_batch']:.1f}" if r.get("mean_batch") else ""
        print(
            f"{r['kind']:<14} {r['batch']:>5} {r['in_flight']:>9} {r['images_per_s']:>10.1f} {r['p99_ms']:>9.2f}"
            f" {versus:>10}  {note}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
