"""Triton's model configuration extension (`GET /v2/models/{name}[/versions/{v}]/config`, gRPC ModelConfig): a
model's config as Triton's model config JSON, which tritonclient's `get_model_config` returns (and perf_analyzer and
model_analyzer read), translated from our config.json as the agents announce it.

Our shapes include the batch dimension; Triton's `dims` leave it out when `max_batch_size` > 0. A model with
batching on (our max_batch_size > 0) whose every input and output starts with a variable dimension is written as
Triton's max_batch_size with that dimension left out, and `dynamic_batching` with its delay; any other model as
max_batch_size 0 with its whole shapes, which is what it accepts. The inverse of cluster.model_config.from_triton.
"""

from __future__ import annotations

from typing import Any

TRITON_PLATFORM = {"torchscript": "pytorch_libtorch", "torch_export": "torch_export"}
DEFAULT_FILENAME = {"pytorch_libtorch": "model.pt", "torch_export": "model.pt2"}


def triton_model_config(meta: dict) -> dict[str, Any]:
    """Triton's model config JSON of a model, from the broker's `model` answer (its metadata, and `config`: the
    config.json its agents announced; without it, from the inputs and outputs alone)."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    name = meta.get("name") or config.get("name") or ""
    inputs = config.get("inputs") or meta.get("inputs") or []
    outputs = config.get("outputs") or meta.get("outputs") or []
    batch = int(config.get("max_batch_size") or 0)
    tensors = [*inputs, *outputs]
    batched = batch > 0 and bool(tensors) and all(list(t.get("shape") or [])[:1] == [-1] for t in tensors)
    platform = TRITON_PLATFORM.get(config.get("platform") or meta.get("platform") or "torchscript", "pytorch_libtorch")

    def spec(tensor: dict) -> dict:
        shape = [int(d) for d in tensor.get("shape") or []]
        return {
            "name": tensor.get("name", ""),
            "data_type": "TYPE_STRING"
            if tensor.get("datatype") == "BYTES"
            else "TYPE_" + str(tensor.get("datatype", "")),
            "dims": shape[1:] if batched else shape,
        }

    result: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "backend": "pytorch",
        "max_batch_size": batch if batched else 0,
        "input": [spec(t) for t in inputs],
        "output": [spec(t) for t in outputs],
        "instance_group": [{"name": name, "kind": "KIND_AUTO", "count": int(config.get("instances") or 1)}],
        "default_model_filename": DEFAULT_FILENAME[platform],
    }
    versions = meta.get("versions") or []
    if versions:
        result["version_policy"] = {"specific": {"versions": sorted(int(v) for v in versions)}}
    if batched:
        result["dynamic_batching"] = {"max_queue_delay_microseconds": int(config.get("max_queue_delay_us") or 0)}
    return result
