"""Triton's per-model statistics, counted on the agent (every request reaches an agent, whatever door it came in by).

Below both the agent (which counts) and the edge (which sums and serves them): neither imports the other for it.

One `ModelStats` per (model, version); all updates take its lock, since inference threads and the I/O thread both
record. `to_triton` gives Triton's `model_stats` entry (statistics extension); `merge` sums entries from several
agents. Durations are nanoseconds, as Triton's JSON; `inference_count` counts samples (batch rows), `execution_count`
forward passes, as Triton does.
"""

from __future__ import annotations

import threading
import time

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class ModelStats:
    """Counters of one (model, version): Triton's inference_stats, batch_stats and failures by reason."""

    def __init__(self, name: str, version: int | str) -> None:
        self.name = name
        self.version = str(version)
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.stats = {key: [0, 0] for key in DURATIONS}  # key -> [count, ns]
        self.failures: dict[str, int] = {}  # Triton's reason -> count
        self.batches: dict[int, list[int]] = {}  # batch size -> [count, input ns, infer ns, output ns]

    def record_success(self, samples: int, queue_s: float, input_s: float, infer_s: float, output_s: float) -> None:
        """One request answered; its share of the (batched) pass's times."""
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            self.inference_count += samples
            total = queue_s + input_s + infer_s + output_s
            for key, seconds in (
                ("success", total),
                ("queue", queue_s),
                ("compute_input", input_s),
                ("compute_infer", infer_s),
                ("compute_output", output_s),
            ):
                self.stats[key][0] += 1
                self.stats[key][1] += int(seconds * 1e9)

    def record_execution(self, batch_size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One forward pass over `batch_size` rows."""
        with self._lock:
            self.execution_count += 1
            entry = self.batches.setdefault(batch_size, [0, 0, 0, 0])
            entry[0] += 1
            entry[1] += int(input_s * 1e9)
            entry[2] += int(infer_s * 1e9)
            entry[3] += int(output_s * 1e9)

    def record_failure(self, reason: str, duration_s: float = 0.0) -> None:
        """One request failed: reason "BACKEND", "REJECTED", "CANCELED", "TIMEOUT" or "OTHER"."""
        with self._lock:
            self.stats["fail"][0] += 1
            self.stats["fail"][1] += int(duration_s * 1e9)
            self.failures[reason] = self.failures.get(reason, 0) + 1

    def describe(self) -> dict:
        """The heartbeat's form: Triton's entry plus "failures" ({reason: count}, for nv_inference_request_failure)."""
        entry = self.to_triton()
        with self._lock:
            entry["failures"] = dict(self.failures)
        return entry

    def to_triton(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {key: {"count": c, "ns": ns} for key, (c, ns) in self.stats.items()},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": {"count": e[0], "ns": e[1]},
                        "compute_infer": {"count": e[0], "ns": e[2]},
                        "compute_output": {"count": e[0], "ns": e[3]},
                    }
                    for size, e in sorted(self.batches.items())
                ],
            }


def merge(entries: list[dict]) -> dict:
    """Sum Triton entries of one (model, version) from several agents."""
    total = {**entries[0], "inference_stats": {k: dict(v) for k, v in entries[0]["inference_stats"].items()}}
    batches = {
        b["batch_size"]: {k: dict(v) if isinstance(v, dict) else v for k, v in b.items()}
        for b in entries[0]["batch_stats"]
    }
    for entry in entries[1:]:
        total["last_inference"] = max(total["last_inference"], entry["last_inference"])
        total["inference_count"] += entry["inference_count"]
        total["execution_count"] += entry["execution_count"]
        for key, value in entry["inference_stats"].items():
            slot = total["inference_stats"].setdefault(key, {"count": 0, "ns": 0})
            slot["count"] += value["count"]
            slot["ns"] += value["ns"]
        for b in entry["batch_stats"]:
            slot = batches.setdefault(b["batch_size"], {"batch_size": b["batch_size"]})
            for key in ("compute_input", "compute_infer", "compute_output"):
                part = slot.setdefault(key, {"count": 0, "ns": 0})
                part["count"] += b[key]["count"]
                part["ns"] += b[key]["ns"]
    total["batch_stats"] = [batches[size] for size in sorted(batches)]
    if any("failures" in entry for entry in entries):
        failures: dict[str, int] = {}
        for entry in entries:
            for reason, count in entry.get("failures", {}).items():
                failures[reason] = failures.get(reason, 0) + count
        total["failures"] = failures
    return total
