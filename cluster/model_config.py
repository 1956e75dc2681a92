"""A model's contract: what it takes and returns (its config.json), checked when it is published, when an agent
loads it, and against every request before the model runs.

Torch-free (numpy only), so the manager and `cluster deploy` can read configs without importing torch. Shapes
include the batch dimension (e.g. [-1, 8, 8], -1 = any size), not an implicit extra dimension as in Triton; as in
Triton, max_batch_size counts rows (the leading dimension): the most one forward pass of the agent's batcher holds,
and the most one request may send (or be split into, with `oversize: "split"`); 0 = no batching, no row limit.
Datatypes are the Open Inference Protocol names of cluster.protocol.DATATYPES.

RepositoryError is defined here, the lowest of the share's modules, because a bad config is the first thing that can
be wrong with a model on the share; everything else (cluster.repository, cluster.share, the agent's loader) raises
it or a subclass, so callers catch one error. Import it from cluster.repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.config import DECODE_MAX_PIXELS, MAX_DIMS
from cluster.protocol import DATATYPES

PLATFORMS = ("torchscript", "torch_export")

_CONFIG_KEYS = (
    "name",
    "platform",
    "inputs",
    "outputs",
    "max_batch_size",
    "max_queue_delay_us",
    "instances",
    "max_queue_wait_ms",
    "replicas",
    "memory_mb",
    "warmup_batch_sizes",
    "oversize",
    "decode",
)
OVERSIZE_POLICIES = ("refuse", "split")  # a request with more rows than max_batch_size: refused, or run in chunks
DECODE_FORMATS = ("image",)  # built-in decode steps of a BYTES input (JPEG/PNG -> uint8 tensor)
_DECODE_KEYS = ("format", "channels", "max_pixels")
_SPEC_KEYS = ("name", "datatype", "shape")


class RepositoryError(Exception):
    """A model or version on the share cannot be read, verified or loaded; the message says what and where."""


class InputError(ValueError):
    """A request's inputs do not fit the model's config (the agent answers BAD_REQUEST with this message)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shape_mismatch(expected: list[int], shape: list[int]) -> str | None:
    """What is wrong with `shape` against a config shape (-1 = any), or None if it fits."""
    if len(shape) != len(expected):
        return f"expected {len(expected)} dimensions {expected}, got {len(shape)} {shape}"
    for axis, (want, got) in enumerate(zip(expected, shape)):
        if want != -1 and want != got:
            return f"dimension {axis} must be {want}, got {got} (expected shape {expected}, got {shape})"
    return None


@dataclass
class TensorSpec:
    """One declared input or output; -1 in shape is a variable dimension."""

    name: str
    datatype: str
    shape: list[int]

    @classmethod
    def _from_dict(cls, d: Any, where: str) -> TensorSpec:
        if not isinstance(d, dict):
            raise RepositoryError(f"{where} must be an object with name, datatype and shape")
        unknown = sorted(set(d) - set(_SPEC_KEYS), key=str)
        if unknown:
            raise RepositoryError(
                f"{where} has unknown key(s) {', '.join(map(repr, unknown))} (allowed: name, datatype, shape)"
            )
        for key in _SPEC_KEYS:
            if key not in d:
                raise RepositoryError(f"{where} is missing '{key}'")
        name, datatype, shape = d["name"], d["datatype"], d["shape"]
        if not isinstance(name, str) or not name or len(name) > 256:
            raise RepositoryError(f"{where}.name must be a non-empty string of at most 256 characters, got {name!r}")
        where = f"{where} ('{name}')"
        if datatype not in DATATYPES:
            raise RepositoryError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        if not isinstance(shape, list) or not all(_is_int(x) and x >= -1 for x in shape):
            raise RepositoryError(f"{where}: shape must be a list of ints >= -1 (-1 = variable), got {shape!r}")
        if len(shape) > MAX_DIMS:
            raise RepositoryError(f"{where}: shape has {len(shape)} dimensions, the limit is {MAX_DIMS}")
        return cls(name, datatype, list(shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class ModelConfig:
    """A model's config.json: the contract the agent checks every request against before touching the model."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0  # most rows in a forward pass, and in a request (0 = no batching, no limit)
    max_queue_delay_us: int = 0  # how long the batcher may hold a request to fill a batch
    instances: int = 1  # copies of the model an agent loads, each run by its own inference thread
    max_queue_wait_ms: int = 0  # load shedding: longest expected wait in the broker's queue (0 = the broker's default)
    platform: str | None = None  # "torchscript" | "torch_export"; None = decided by the version's model file
    replicas: int | None = None  # agents that hold a copy (placement); None = every agent ("all")
    memory_mb: int = 0  # memory one agent needs to hold the model (all its instances); 0 = measured at load
    warmup_batch_sizes: list[int] | None = None  # batch sizes warmed before serving; None = every size it may see
    oversize: str = "refuse"  # a request of more rows than max_batch_size: "refuse" (BAD_REQUEST) or "split"
    decode: dict[str, dict] | None = None  # BYTES input -> built-in decode step ({"format": "image", ...})

    @classmethod
    def from_dict(cls, d: Any, name: str | None = None) -> ModelConfig:
        """Validate strictly, so a typo in config.json fails at load time rather than on the first request."""
        label = name if name is not None else (d.get("name") if isinstance(d, dict) else None)
        prefix = f"config of model '{label}'" if label else "model config"
        if not isinstance(d, dict):
            raise RepositoryError(f"{prefix} must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_CONFIG_KEYS), key=str)
        if unknown:
            raise RepositoryError(
                f"{prefix}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(_CONFIG_KEYS)})"
            )
        cfg_name = d.get("name")
        if cfg_name is not None and (not isinstance(cfg_name, str) or not cfg_name):
            raise RepositoryError(f"{prefix}: 'name' must be a non-empty string, got {cfg_name!r}")
        if name is not None and cfg_name is not None and cfg_name != name:
            raise RepositoryError(f"{prefix}: config.json names the model {cfg_name!r} but its folder is {name!r}")
        final_name = name if name is not None else cfg_name
        if final_name is None:
            raise RepositoryError(f"{prefix}: no model name (neither in the config nor given)")

        specs = {}
        for key in ("inputs", "outputs"):
            value = d.get(key)
            if not isinstance(value, list) or not value:
                raise RepositoryError(f"{prefix}: '{key}' must be a non-empty list, got {value!r}")
            items = [TensorSpec._from_dict(item, f"{prefix}: {key}[{i}]") for i, item in enumerate(value)]
            seen = set()
            for spec in items:
                if spec.name in seen:
                    raise RepositoryError(f"{prefix}: {key} name '{spec.name}' appears twice")
                seen.add(spec.name)
            specs[key] = items

        ints = {}
        for key, default, minimum in (
            ("max_batch_size", 0, 0),
            ("max_queue_delay_us", 0, 0),
            ("instances", 1, 1),
            ("max_queue_wait_ms", 0, 0),
        ):
            value = d.get(key, default)
            if not _is_int(value) or value < minimum:
                raise RepositoryError(f"{prefix}: '{key}' must be an int >= {minimum}, got {value!r}")
            ints[key] = value

        platform = d.get("platform")
        if platform is not None and platform not in PLATFORMS:
            raise RepositoryError(f"{prefix}: platform {platform!r} is not one of {', '.join(PLATFORMS)}")
        extra = _serving_keys(d, prefix, ints["max_batch_size"], specs["inputs"])
        _check_bytes(prefix, specs["inputs"], specs["outputs"], extra["decode"] or {})
        return cls(final_name, specs["inputs"], specs["outputs"], platform=platform, **ints, **extra)

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "instances": self.instances,
        }
        if self.max_queue_wait_ms:
            d["max_queue_wait_ms"] = self.max_queue_wait_ms
        if self.platform is not None:
            d["platform"] = self.platform
        if self.replicas is not None:
            d["replicas"] = self.replicas
        if self.memory_mb:
            d["memory_mb"] = self.memory_mb
        if self.warmup_batch_sizes is not None:
            d["warmup_batch_sizes"] = list(self.warmup_batch_sizes)
        if self.oversize != "refuse":
            d["oversize"] = self.oversize
        if self.decode:
            d["decode"] = {name: dict(step) for name, step in self.decode.items()}
        return d

    def batch_sizes(self) -> list[int]:
        """The batch sizes (rows) warmed before the version serves: the config's list, else every size the batcher
        may build (1..max_batch_size), else 1."""
        if self.warmup_batch_sizes is not None:
            return list(self.warmup_batch_sizes)
        return list(range(1, self.max_batch_size + 1)) if self.max_batch_size > 0 else [1]

    def check_inputs(self, metas: list[dict]) -> None:
        """Refuse a request the model cannot take, with a message the client can act on, before running it."""
        declared = {s.name: s for s in self.inputs}
        given = {m["name"]: m for m in metas}
        for name in given:
            if name not in declared:
                raise InputError(
                    f"unknown input '{name}': model '{self.name}' takes {', '.join(repr(n) for n in declared)}"
                )
        for spec in self.inputs:
            meta = given.get(spec.name)
            if meta is None:
                raise InputError(f"missing input '{spec.name}' ({spec.datatype} {spec.shape}) for model '{self.name}'")
            if meta["datatype"] != spec.datatype:
                raise InputError(f"input '{spec.name}': expected datatype {spec.datatype}, got {meta['datatype']}")
            problem = shape_mismatch(spec.shape, list(meta["shape"]))
            if problem:
                raise InputError(f"input '{spec.name}': {problem}")
        rows = request_rows(self, metas)
        if 0 < self.max_batch_size < rows and self.oversize != "split":
            raise InputError(
                f"the request has {rows} rows (its inputs' first dimension), more than model '{self.name}' takes: "
                f"max_batch_size is {self.max_batch_size} rows. Send at most {self.max_batch_size} rows a request, "
                f'or set "oversize": "split" in its config to have larger requests run in chunks'
            )

    def warmup_inputs(self, rows: int = 1) -> dict[str, np.ndarray]:
        """Zeros of the smallest shapes the config allows, with `rows` in the leading variable dimension when the
        model batches (max_batch_size > 0): warm-up exercises each batch size without guessing real sizes."""
        lead = rows if self.max_batch_size > 0 else 1
        return {
            s.name: self._warmup_input(
                s, [(lead if axis == 0 else 1) if d == -1 else d for axis, d in enumerate(s.shape)]
            )
            for s in self.inputs
        }

    def _warmup_input(self, spec: TensorSpec, shape: list[int]) -> np.ndarray:
        """Zeros; for a BYTES input, a small valid image in each element where the config decodes it (else b"")."""
        if spec.datatype != "BYTES":
            return np.zeros(shape, dtype=DATATYPES[spec.datatype])
        step = (self.decode or {}).get(spec.name)
        array = np.empty(shape, dtype=object)
        if step is None:
            array.fill(b"")
        else:
            from cluster.decode import tiny_image  # Pillow, only where an image is decoded

            array.fill(tiny_image(step["channels"]))
        return array

    def metadata(self) -> dict:
        """Open Inference Protocol model metadata (what GET /v2/models/<name> returns)."""
        return {
            "name": self.name,
            "platform": self.platform or "",
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }


def batched_inputs(config: Any) -> set[str]:
    """The inputs that carry a request's rows: those whose shape starts with a variable dimension, when the model
    batches (max_batch_size > 0); none otherwise."""
    if config.max_batch_size <= 0:
        return set()
    return {s.name for s in config.inputs if s.shape and s.shape[0] == -1}


def request_rows(config: Any, metas: list[dict]) -> int:
    """A request's rows (Triton's batch size): the first dimension its batched inputs share; 1 for a model that does
    not batch (each request is one execution) or has no batched input. InputError if the batched inputs disagree
    (their rows are stacked with other requests' and the outputs split back by them)."""
    batched = batched_inputs(config)
    if not batched:
        return 1
    rows = {m["name"]: m["shape"][0] for m in metas if m["name"] in batched and m["shape"]}
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"'{name}' {n}" for name, n in sorted(rows.items()))
        raise InputError(
            f"model '{config.name}' batches by rows, and its inputs' first dimensions (rows) differ: {listed}; "
            "every batched input of a request has the same number of rows"
        )
    return next(iter(rows.values()), 1)


def _serving_keys(d: dict, prefix: str, max_batch_size: int, inputs: list[TensorSpec]) -> dict:
    """replicas, memory_mb, warmup_batch_sizes, oversize and decode, checked (issue 22: placement, warm-up at every
    batch size, batching by rows, built-in decode)."""
    replicas = d.get("replicas", "all")
    if replicas != "all" and (not _is_int(replicas) or replicas < 1):
        raise RepositoryError(f"{prefix}: 'replicas' must be an int >= 1 or \"all\", got {replicas!r}")
    memory_mb = d.get("memory_mb", 0)
    if not _is_int(memory_mb) or memory_mb < 0:
        raise RepositoryError(f"{prefix}: 'memory_mb' must be an int >= 0 (0 = measured at load), got {memory_mb!r}")
    sizes = d.get("warmup_batch_sizes")
    if sizes is not None:
        top = max(1, max_batch_size)
        if not isinstance(sizes, list) or not sizes or not all(_is_int(n) and 1 <= n <= top for n in sizes):
            raise RepositoryError(
                f"{prefix}: 'warmup_batch_sizes' must be a non-empty list of ints from 1 to {top} "
                f"(max_batch_size), got {sizes!r}"
            )
        sizes = sorted(set(sizes))
    oversize = d.get("oversize", "refuse")
    if oversize not in OVERSIZE_POLICIES:
        raise RepositoryError(f"{prefix}: 'oversize' must be one of {', '.join(OVERSIZE_POLICIES)}, got {oversize!r}")
    decode = d.get("decode")
    if decode is not None:
        decode = _decode_steps(decode, prefix, {s.name: s for s in inputs})
    return {
        "replicas": None if replicas == "all" else replicas,
        "memory_mb": memory_mb,
        "warmup_batch_sizes": sizes,
        "oversize": oversize,
        "decode": decode,
    }


def _check_bytes(prefix: str, inputs: list[TensorSpec], outputs: list[TensorSpec], decode: dict) -> None:
    """A torch program takes and returns tensors only: a BYTES input needs a decode step; no output is BYTES."""
    for spec in inputs:
        if spec.datatype == "BYTES" and spec.name not in decode:
            raise RepositoryError(
                f"{prefix}: BYTES input '{spec.name}' needs a 'decode' step (e.g. \"decode\": {{\"{spec.name}\": "
                '{"format": "image"}}): a torch program takes tensors only'
            )
    for spec in outputs:
        if spec.datatype == "BYTES":
            raise RepositoryError(
                f"{prefix}: output '{spec.name}' is BYTES, which no torch program returns (return indices, e.g. INT64)"
            )


def _decode_steps(decode: Any, prefix: str, inputs: dict[str, TensorSpec]) -> dict[str, dict]:
    """{input: {"format": "image", "channels": 1 | 3, "max_pixels": n}}: each names a BYTES input."""
    if not isinstance(decode, dict) or not decode:
        raise RepositoryError(f"{prefix}: 'decode' must map BYTES input names to decode steps, got {decode!r}")
    steps = {}
    for name, step in decode.items():
        where = f"{prefix}: decode['{name}']"
        spec = inputs.get(name)
        if spec is None:
            raise RepositoryError(f"{where}: no input of that name (inputs: {', '.join(inputs)})")
        if spec.datatype != "BYTES":
            raise RepositoryError(f"{where}: the input's datatype is {spec.datatype}; only a BYTES input is decoded")
        if not isinstance(step, dict):
            raise RepositoryError(f"{where} must be an object with 'format' ({', '.join(DECODE_FORMATS)})")
        unknown = sorted(set(step) - set(_DECODE_KEYS), key=str)
        if unknown:
            raise RepositoryError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: {_DECODE_KEYS})")
        fmt = step.get("format")
        if fmt not in DECODE_FORMATS:
            raise RepositoryError(f"{where}: 'format' must be one of {', '.join(DECODE_FORMATS)}, got {fmt!r}")
        channels = step.get("channels", 3)
        if channels not in (1, 3):
            raise RepositoryError(f"{where}: 'channels' must be 1 (grey) or 3 (RGB), got {channels!r}")
        max_pixels = step.get("max_pixels", DECODE_MAX_PIXELS)
        if not _is_int(max_pixels) or not 1 <= max_pixels <= DECODE_MAX_PIXELS:
            raise RepositoryError(f"{where}: 'max_pixels' must be an int from 1 to {DECODE_MAX_PIXELS}")
        steps[name] = {"format": fmt, "channels": channels, "max_pixels": max_pixels}
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Triton's model configuration (its JSON form), as a Triton user's `load_model(..., config=...)` sends it
# ---------------------------------------------------------------------------------------------------------------

TRITON_PLATFORMS = {"pytorch_libtorch": "torchscript"}  # Triton's platform name -> ours
_TRITON_KEYS = {"name", "platform", "backend", "max_batch_size", "input", "output", "dynamic_batching"}
# the last two are Triton's own business, with no meaning here: accepted, not used
_TRITON_KEYS |= {"instance_group", "default_model_filename", "version_policy"}


def is_triton_config(d: Any) -> bool:
    """Triton's model config says `input` / `output` where ours says `inputs` / `outputs`."""
    return isinstance(d, dict) and ("input" in d or "output" in d) and "inputs" not in d and "outputs" not in d


def _triton_int(value: Any, where: str) -> int:
    """Triton's JSON writes 64-bit integers as strings ("dims": ["-1", "8"]): accept both, nothing else."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if _is_int(value):
        return value
    raise RepositoryError(f"{where}: expected an integer, got {value!r}")


def from_triton(d: dict, name: str | None = None) -> dict:
    """Our config.json (a dict, checked afterwards by ModelConfig.from_dict) from Triton's model config JSON.

    Triton's `max_batch_size` > 0 means every tensor has a leading batch dimension that `dims` leaves out: it comes
    back as -1. Dynamic batching is on when `dynamic_batching` is present (our `max_batch_size` > 1), with its
    `max_queue_delay_microseconds`; `instance_group` counts add up to `instances`. A key we cannot honour is refused
    rather than ignored, as in our own format."""
    where = f"Triton config of model '{name or d.get('name')}'"
    unknown = sorted(set(d) - _TRITON_KEYS, key=str)
    if unknown:
        raise RepositoryError(f"{where}: unsupported key(s) {', '.join(map(repr, unknown))}")
    platform = d.get("platform")
    if platform is None and d.get("backend") == "pytorch":
        platform = "pytorch_libtorch"
    if platform is not None and platform not in TRITON_PLATFORMS and platform not in PLATFORMS:
        raise RepositoryError(f"{where}: platform {platform!r} cannot be served here (pytorch_libtorch or torchscript)")
    batch = _triton_int(d.get("max_batch_size", 0), f"{where}: max_batch_size")
    lead = [-1] if batch > 0 else []

    def specs(key: str) -> list[dict]:
        items = d.get(key)
        if not isinstance(items, list):
            raise RepositoryError(f"{where}: '{key}' must be a list")
        out = []
        for i, item in enumerate(items):
            at = f"{where}: {key}[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("dims"), list):
                raise RepositoryError(f"{at}: needs 'name', 'data_type' and 'dims'")
            datatype = item.get("data_type")
            if not isinstance(datatype, str) or not datatype.startswith("TYPE_"):
                raise RepositoryError(f"{at}: data_type {datatype!r} is not a Triton TYPE_*")
            dims = [_triton_int(v, f"{at}: dims") for v in item["dims"]]
            datatype = "BYTES" if datatype == "TYPE_STRING" else datatype[5:]  # Triton's name for BYTES
            out.append({"name": item.get("name"), "datatype": datatype, "shape": lead + dims})
        return out

    ours: dict[str, Any] = {"inputs": specs("input"), "outputs": specs("output")}
    if name is not None or d.get("name") is not None:
        ours["name"] = name if name is not None else d["name"]
    if platform is not None:
        ours["platform"] = TRITON_PLATFORMS.get(platform, platform)
    dynamic = d.get("dynamic_batching")
    if dynamic is not None and batch > 1:
        if not isinstance(dynamic, dict):
            raise RepositoryError(f"{where}: dynamic_batching must be an object")
        ours["max_batch_size"] = batch
        delay = dynamic.get("max_queue_delay_microseconds", 0)
        ours["max_queue_delay_us"] = _triton_int(delay, f"{where}: max_queue_delay_microseconds")
    groups = d.get("instance_group")
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise RepositoryError(f"{where}: instance_group must be a list of objects")
        ours["instances"] = sum(_triton_int(g.get("count", 1), f"{where}: instance_group count") for g in groups)
    return ours


def read_config_file(path: Any, name: str | None = None) -> dict:
    """Our config.json (a dict, checked afterwards by ModelConfig.from_dict) from a file holding ours or Triton's,
    as JSON or as Triton's config.pbtxt (protobuf text). The protobuf text is read with the ModelConfig message
    tritonclient ships (a dependency of the edge, so always installed) and protobuf's text_format, so a Triton
    user's config.pbtxt works as it is. RepositoryError says what is wrong and where."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"cannot read {path}: {exc}") from None
    if path.suffix.lower() in (".pbtxt", ".prototxt") or (text.lstrip()[:1] not in ("{", "[") and text.strip()):
        config = _from_pbtxt(text, path)
    else:
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise RepositoryError(f"{path} is not valid JSON: {exc}") from None
    if is_triton_config(config):
        return from_triton(config, name)
    if not isinstance(config, dict):
        raise RepositoryError(f"{path}: a config is a JSON object, got {type(config).__name__}")
    return config


def _from_pbtxt(text: str, path: Any) -> dict:
    """Triton's config.pbtxt as the JSON form of its ModelConfig (what tritonclient's get_model_config returns)."""
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # a slim install without the edge extra (README, Install by role)
        raise RepositoryError(
            f"{path} is protobuf text (Triton's config.pbtxt), which needs tritonclient[grpc] to read ({exc}): "
            "pip install 'tritonclient[grpc]' (the edge extra has it), or write the config as config.json"
        ) from None
    try:
        message = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path} is neither JSON nor Triton's config.pbtxt (protobuf text): {exc}") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
