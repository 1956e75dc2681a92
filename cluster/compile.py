"""Compile at publish (torch side): an exported program (model.pt2) into an AOTInductor package for one device kind,
with the batch dimension the config declares dynamic, checked against the program on a sample before it is
published. `cluster deploy --compile` calls compile_program; `python -m cluster.compile` runs it on its own.

A package is a shared library: native code that an agent runs with its rights. It is built here, from the
publisher's own file, and only ever reaches an agent through the share's manifest (see README, Trust model).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cluster.config import COMPILE_ATOL, COMPILE_MAX_BATCH, COMPILE_RTOL
from cluster.model_check import COMPILED_FILE, check_model_file
from cluster.model_config import ModelConfig, RepositoryError, TensorSpec
from cluster.protocol import DATATYPES
from cluster.repository import package_file
from cluster.torch_files import load_package, load_program

DEVICE_KINDS = ("cpu", "cuda")


def batch_bound(config: ModelConfig) -> int:
    """The largest batch a package is compiled for: the config's max_batch_size (rows), else COMPILE_MAX_BATCH."""
    return max(2, config.max_batch_size or COMPILE_MAX_BATCH)


def compile_program(
    program: str | Path, config: ModelConfig, out_dir: str | Path, device: str = "cpu", preprocess: bool = False
) -> tuple[Path, dict]:
    """(package path in `out_dir`, its compiled.json entry). RepositoryError when the program cannot be compiled
    with a dynamic batch dimension, or when the package does not answer like the program on a sample. With a
    decoded BYTES input or a `preprocess` program, the model's inputs are not the config's: they are read from the
    program itself (model_inputs)."""
    if device not in DEVICE_KINDS:
        raise RepositoryError(f"cannot compile for device {device!r}: expected one of {', '.join(DEVICE_KINDS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RepositoryError("cannot compile for cuda: torch sees no CUDA device on this machine")
    program = Path(program)
    where = f"cannot compile {program}"
    data = program.read_bytes()  # read once: the bytes checked are the bytes loaded
    check_model_file("model.pt2", data, where)  # what model_check admits, before torch.export.load
    started = time.monotonic()
    exported = load_program(io.BytesIO(data), where)
    if preprocess or any(spec.datatype == "BYTES" for spec in config.inputs):
        config = model_inputs(exported, config)
    bound = batch_bound(config)
    exported, batch = _dynamic(exported, config, _samples(config, min(3, bound)), bound, where)
    # checked at the smallest batch and at 3 rows (or the largest, if less)
    samples = [_samples(config, rows) for rows in sorted({batch[0], max(batch[0], min(3, batch[1]))})]
    if device == "cuda":
        from torch.export.passes import move_to_device_pass

        exported = move_to_device_pass(exported, "cuda")
        samples = [tuple(s.to("cuda") for s in sample) for sample in samples]
    out = Path(out_dir) / package_file(device)
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=str(out))
    except Exception as exc:
        raise RepositoryError(f"{where}: AOTInductor failed: {type(exc).__name__}: {str(exc)[:1000]}") from None
    _check_outputs(exported, out, samples, where, device)
    return out, {
        "device": device,
        "torch": torch.__version__,
        "arch": platform.machine(),
        "cuda_arch": _cuda_arch() if device == "cuda" else None,
        "batch": batch,
        "seconds": round(time.monotonic() - started, 2),
        "compiled": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rtol": COMPILE_RTOL,
        "atol": COMPILE_ATOL,
    }


def compiled_json(entries: dict[str, dict]) -> bytes:
    """compiled.json's bytes for {package file name: entry}."""
    return (json.dumps({"packages": entries}, indent=2, sort_keys=True) + "\n").encode()


def _cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _samples(config: ModelConfig, rows: int) -> tuple[torch.Tensor, ...]:
    """Random inputs shaped as the config says, `rows` in each leading -1 dimension (1 in other -1s)."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for spec in config.inputs:
        shape = [rows if i == 0 and d == -1 else (1 if d == -1 else d) for i, d in enumerate(spec.shape)]
        dtype = getattr(torch, DATATYPES[spec.datatype].name)
        if dtype.is_floating_point:
            samples.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            samples.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            samples.append(torch.randint(0, 8, shape, generator=generator).to(dtype))
    return tuple(samples)


def model_inputs(exported: Any, config: ModelConfig) -> ModelConfig:
    """The config with the program's own inputs (name, dtype, shape; the first dimension is the batch, -1): what
    the model takes after decode / preprocess.pt2 (cluster/agent/pipeline.py), not what the client sends."""
    datatypes = {getattr(torch, dtype.name): name for name, dtype in DATATYPES.items() if name != "BYTES"}
    names = _user_input_names(exported)
    specs = []
    for node in (n for n in exported.graph.nodes if n.op == "placeholder" and n.name in names):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dtype not in datatypes or value.dim() == 0:
            raise RepositoryError(f"cannot compile: the program's input '{node.name}' is not a batched tensor")
        dims = [d if isinstance(d, int) else _size_hint(exported, d) for d in value.shape[1:]]
        specs.append(TensorSpec(node.name, datatypes[value.dtype], [-1, *dims]))
    return replace(config, inputs=specs, decode=None)


def _size_hint(exported: Any, size: Any) -> int:
    """A concrete size for a dynamic dimension other than the batch (an image's height): its lowest allowed."""
    ranges = exported.range_constraints.get(size.node.expr)
    return max(2, int(ranges.lower)) if ranges is not None else 2


def _batched(config: ModelConfig) -> list[bool]:
    return [bool(spec.shape) and spec.shape[0] == -1 for spec in config.inputs]


def _dynamic(exported: Any, config: ModelConfig, samples: tuple, bound: int, where: str) -> tuple[Any, list[int]]:
    """The program with the config's leading -1 dimensions as one dynamic batch dimension, and its range [lo, hi]:
    as it is when the program already has them dynamic, else re-exported from its module with Dim("batch")."""
    batched = _batched(config)
    if not any(batched):
        return exported, [1, 1]
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name in _user_input_names(exported)]
    if len(user) != len(config.inputs):
        declared = len(config.inputs)
        raise RepositoryError(f"{where}: the program takes {len(user)} input(s), the config declares {declared}")
    leading = [node.meta["val"].shape[0] if is_batched else None for node, is_batched in zip(user, batched)]
    if all(isinstance(d, torch.SymInt) for d, b in zip(leading, batched) if b):
        symbol = next(d for d in leading if d is not None).node.expr
        ranges = exported.range_constraints.get(symbol)
        lo = int(ranges.lower) if ranges is not None else 1
        hi = int(ranges.upper) if ranges is not None and ranges.upper.is_finite else bound
        return exported, [lo, hi]
    batch = torch.export.Dim("batch", min=1, max=bound)
    shapes = tuple({0: batch} if b else None for b in batched)
    try:
        again = torch.export.export(exported.module(check_guards=False), samples, dynamic_shapes=shapes)
    except Exception as exc:
        raise RepositoryError(
            f"{where}: its batch dimension is static and re-exporting it with a dynamic batch dimension (1..{bound}) "
            f"failed: {type(exc).__name__}: {str(exc)[:600]}; export it with "
            "dynamic_shapes={0: torch.export.Dim('batch')} for each batched input"
        ) from None
    return again, [1, bound]


def _user_input_names(exported: Any) -> set[str]:
    from torch.export.graph_signature import InputKind

    return {
        spec.arg.name
        for spec in exported.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and hasattr(spec.arg, "name")
    }


def _check_outputs(exported: Any, package: Path, samples: list[tuple], where: str, device: str) -> None:
    """The package's outputs equal the program's on each of `samples`, within COMPILE_RTOL/ATOL, loaded as agents
    load it (cluster.torch_files)."""
    compiled = load_package(package.read_bytes(), 0 if device == "cuda" else -1)
    module = exported.module(check_guards=False)  # guards_code is Python from the file: never run
    for inputs in samples:
        with torch.inference_mode():
            expected = torch.utils._pytree.tree_leaves(module(*inputs))
            got = torch.utils._pytree.tree_leaves(compiled(*inputs))
        if len(got) != len(expected):
            raise RepositoryError(f"{where}: the package returns {len(got)} output(s), the program {len(expected)}")
        for i, (a, b) in enumerate(zip(got, expected)):
            try:
                torch.testing.assert_close(a, b, rtol=COMPILE_RTOL, atol=COMPILE_ATOL)
            except AssertionError as exc:
                raise RepositoryError(
                    f"{where}: the compiled package's output {i} differs from the exported program's on a sample "
                    f"(rtol {COMPILE_RTOL}, atol {COMPILE_ATOL}): {str(exc)[:400]}"
                ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m cluster.compile", description=__doc__.splitlines()[0])
    parser.add_argument("program", help="the exported program (model.pt2)")
    parser.add_argument("config", help="the model's config.json")
    parser.add_argument("out_dir", help="where model.aoti-<device>.pt2 and compiled.json are written")
    parser.add_argument("--device", default="cpu", choices=DEVICE_KINDS)
    parser.add_argument("--preprocess", action="store_true", help="the version has a preprocess.pt2")
    args = parser.parse_args(argv)
    try:
        data = json.loads(Path(args.config).read_text())
        name = data.get("name") if isinstance(data, dict) and isinstance(data.get("name"), str) else "model"
        config = ModelConfig.from_dict(data, name=name)
        path, entry = compile_program(args.program, config, args.out_dir, args.device, args.preprocess)
    except (OSError, ValueError, RepositoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.out_dir, COMPILED_FILE).write_bytes(compiled_json({path.name: entry}))
    print(json.dumps({path.name: entry}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
