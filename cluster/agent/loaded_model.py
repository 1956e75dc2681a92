"""Torch's side of the share: a verified version's bytes turned into a warmed-up module the agent can run.

cluster.repository (torch-free) decides what a version is and checks its files against the manifest; this module
takes the bytes it verified (ModelRepository.read_model: the very bytes that were hashed, never the file re-read)
and hands them to torch.jit.load or torch.export.load, never to pickle. Then it moves the module to the device and
warms it up on zeros at every batch size the config says (ModelConfig.batch_sizes: `warmup_batch_sizes`, else each
size 1..max_batch_size), on every instance, before the version is staged: the first real batch of a new size does
not pay for a first run (TorchScript's profiling and shape specialisation, allocator caches), and a model that
disagrees with its config is refused at load, not on a user request.

On Linux the bytes are not read into Python: the file is copied by the kernel into a memfd, sealed (no write, grow
or shrink from then on, by anyone), hashed through a read-only map and loaded by its /proc/self/fd path, so torch
reads it with its file reader. That keeps the guarantee (the bytes loaded are the bytes hashed) and took an agent's
load of a 100 MB TorchScript file from 0.58 to 0.34 s (median of 9, loaded 2-core machine; a BytesIO is copied
again into a std::string, then into the tensors). Elsewhere, or where memfds are refused, the bytes are read and
loaded from memory as before.

With `instances: N` in the config, the same verified bytes are loaded N times: N separate modules (no shared state
between them), so the agent's inference threads can run N requests of the model at once, one per copy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cluster.agent.memory import measure_memory
from cluster.agent.pipeline import Pipeline, as_model_inputs
from cluster.agent.programs import device_kind, load_compiled
from cluster.config import MODEL_COPY_CHUNK
from cluster.model_config import InputError, ModelConfig, shape_mismatch
from cluster.protocol import DATATYPES
from cluster.repository import ModelBytes, ModelRepository, RepositoryError, describe_error, package_file
from cluster.torch_files import TORCH_LOAD, load_program

log = logging.getLogger("cluster.agent")
# torch's dtypes carry numpy's names (torch.float32, torch.uint16, torch.bool, ...): derived from the one table.
DATATYPE_OF_TORCH = {getattr(torch, dtype.name): name for name, dtype in DATATYPES.items() if name != "BYTES"}


class LoadedModel:
    """A verified, warmed-up model, and the one place where the config's tensor names meet the module's positions."""

    def __init__(
        self, name: str, version: int, config: ModelConfig, module: Any, device: str = "cpu", copies: list | None = None
    ):
        self.name = name
        self.version = version
        self.config = config
        self.module = module
        self.device = device
        self.instances = [module, *(copies or [])]  # instance i runs on instances[i] (config `instances`)
        # what the heartbeat's `model_info` shows of this version (issue 22)
        self.runs = "torchscript" if config.platform == "torchscript" else "exported"  # or "aoti": a compiled package
        self.runs_why = ""  # why the compiled package is not what runs ("" when it is, or when there is none)
        self.warmup_s = 0.0  # seconds the warm-up took, every batch size and instance
        self.warmup_sizes: list[int] = []  # the batch sizes warmed
        self.memory = 0  # bytes one agent needs for it (config memory_mb, else measured at load)
        self.pipeline = Pipeline(config, self._where())  # decode, preprocess.pt2, postprocess.pt2 (issue 22)

    def metadata(self) -> dict:
        """Its inputs and outputs, for the broker's `model` queries (the edge's metadata and readiness), its whole
        config (the edge's model configuration extension) and what runs (`runs`)."""
        return dict(
            self.config.metadata(),
            version=self.version,
            max_queue_wait_ms=self.config.max_queue_wait_ms,
            config=self.config.to_dict(),
            runs=self.runs,
        )

    def info(self) -> dict:
        """This version's entry in the heartbeat's `model_info`."""
        return {
            "runs": self.runs,
            "runs_why": self.runs_why,
            "warmup_s": round(self.warmup_s, 4),
            "warmup_sizes": list(self.warmup_sizes),
            "memory": self.memory,
        }

    def __repr__(self) -> str:
        platform, device = self.config.platform, self.device
        return f"LoadedModel({self.name!r}, version={self.version}, platform={platform!r}, device={device!r})"

    def _where(self) -> str:
        return f"model '{self.name}' version {self.version}"

    def infer(self, inputs: dict[str, Any], instance: int = 0) -> dict[str, torch.Tensor]:
        """Run the module (copy `instance`) on named inputs (tensors; BYTES as numpy object arrays of bytes), through
        the version's pipeline (cluster/agent/pipeline.py); outputs come back named, on CPU and C-contiguous, ready
        for the codec."""
        values = []
        for spec in self.config.inputs:
            tensor = inputs.get(spec.name)
            if tensor is None:
                raise InputError(f"missing input '{spec.name}' for model '{self.name}'")
            values.append(tensor)
        extra = set(inputs) - {s.name for s in self.config.inputs}
        if extra:
            raise InputError(f"unknown input(s) {', '.join(map(repr, sorted(extra)))} for model '{self.name}'")

        with torch.inference_mode():
            args = self.pipeline.model_args(values, self.device, instance)
            result = self.instances[instance % len(self.instances)](*args)
            result = self.pipeline.outputs(result, instance)

        names = [s.name for s in self.config.outputs]
        if isinstance(result, torch.Tensor):
            values = [result]
        elif isinstance(result, (tuple, list)):
            values = list(result)
        elif isinstance(result, dict):
            if set(result) != set(names):
                raise RepositoryError(
                    f"{self._where()} returned outputs {sorted(map(str, result))}, config declares {names}"
                )
            values = [result[n] for n in names]
        else:
            raise RepositoryError(f"{self._where()} returned {type(result).__name__}, expected tensor(s)")
        if len(values) != len(names):
            raise RepositoryError(
                f"{self._where()} returned {len(values)} output(s), config declares {len(names)} {names}"
            )
        outputs = {}
        for name, value in zip(names, values):
            if not isinstance(value, torch.Tensor):
                raise RepositoryError(f"{self._where()}: output '{name}' is a {type(value).__name__}, not a tensor")
            outputs[name] = value.to("cpu").contiguous()
        return outputs

    def warmup(self, instance: int = 0) -> None:
        """Run copy `instance` on zeros at every batch size of ModelConfig.batch_sizes, checking the outputs at each;
        adds the time to `warmup_s` and notes the sizes in `warmup_sizes` (the heartbeat's model_info)."""
        sizes = self.config.batch_sizes()
        began = time.monotonic()
        for rows in sizes:
            self._warm(rows, instance)
        self.warmup_s += time.monotonic() - began
        self.warmup_sizes = sizes

    def _warm(self, rows: int, instance: int) -> None:
        """One run on zeros of `rows` rows, so a model that does not match its config is refused at load."""
        inputs = as_model_inputs(self.config.warmup_inputs(rows))
        try:
            outputs = self.infer(inputs, instance)
        except RepositoryError as exc:
            raise RepositoryError(f"warm-up failed: {exc}") from exc
        except Exception as exc:
            shapes = ", ".join(f"'{s.name}' {s.datatype} {list(inputs[s.name].shape)}" for s in self.config.inputs)
            raise RepositoryError(
                f"{self._where()}: warm-up failed on zeros shaped as config.json says ({shapes}): "
                f"{model_error(exc)}{_batch_hint(self.config)}"
            ) from exc
        for spec in self.config.outputs:
            tensor = outputs[spec.name]
            datatype = DATATYPE_OF_TORCH.get(tensor.dtype, str(tensor.dtype))
            if datatype != spec.datatype:
                raise RepositoryError(
                    f"{self._where()}: warm-up output '{spec.name}' has datatype {datatype}, "
                    f"config says {spec.datatype}"
                )
            problem = shape_mismatch(spec.shape, list(tensor.shape))
            if problem:
                raise RepositoryError(f"{self._where()}: warm-up output '{spec.name}': {problem} (as config.json says)")


def model_error(exc: BaseException) -> str:
    """An exception from a model as one line: for TorchScript, its error line, the last after a page of traceback
    (which a cut to length used to lose)."""
    text = str(exc).strip()
    if "Traceback of TorchScript" not in text:
        return describe_error(exc)
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    return last if len(last) <= 1000 else last[:1000] + " ..."


def _batch_hint(config: ModelConfig) -> str:
    """A model that fails on its warm-up inputs often expects a batch dimension the config's shapes leave out
    (Triton's dims do, when max_batch_size > 0; ours include it)."""
    unbatched = [s for s in config.inputs if not s.shape or s.shape[0] != -1]
    if not unbatched:
        return ""
    spec = unbatched[0]
    return (
        f". Shapes in config.json include the batch dimension: if the model takes batches of {spec.shape}, "
        f"'{spec.name}' has shape {[-1, *spec.shape]} (Triton's dims leave it out when max_batch_size > 0; "
        f"ours do not)"
    )


class _PackageWarmupError(RepositoryError):
    """The compiled package loaded but failed the warm-up: the exported program is loaded instead."""


def load_model(repository: ModelRepository, name: str, version: int, device: str = "cpu") -> LoadedModel:
    """Verify, load, warm up; RepositoryError says what is wrong with the version. A compiled package that fails
    the warm-up (programs._probe cannot try it where preprocess.pt2 or a decode step feeds the model, nor at every
    batch size) falls back to the exported program, as one that does not load does."""
    try:
        return _load(repository, name, version, device, package=True)
    except _PackageWarmupError as exc:
        why = f"{package_file(device_kind(device))} failed the warm-up ({exc}); running the exported program"
        log.warning("model %s v%d: %s", name, version, why)
    model = _load(repository, name, version, device, package=False)
    model.runs_why = why
    return model


def _load(repository: ModelRepository, name: str, version: int, device: str, package: bool) -> LoadedModel:
    with contextlib.ExitStack() as stack:
        verified = repository.read_model(name, version, reader=lambda path: _sealed_copy(path, stack))
        compiled, runs_why = ([], "") if not package else load_compiled(verified, device, verified.config.instances)
        module = compiled[0] if compiled else _module(verified, device)
        copies = compiled[1:] if compiled else [_module(verified, device) for _ in range(verified.config.instances - 1)]
        config = verified.config
        where = f"model '{name}' version {version}"
        pipeline = Pipeline.load(config, where, verified.has_file, _programs(verified, device), 1 + len(copies))
        # what a runner that shows no tensors counts (measure_memory): the package it loaded, else the model file
        loaded_bytes = getattr(module, "package_bytes", None) or len(verified.data)
        del verified  # the file's bytes: torch holds what it needs, the warm-up should not run beside a second copy
    model = LoadedModel(name, version, config, module, device, copies)
    model.pipeline = pipeline
    model.runs, model.runs_why = ("aoti" if compiled else model.runs), runs_why
    try:
        for instance in range(len(model.instances)):
            model.warmup(instance)
    except RepositoryError as exc:
        if compiled:
            raise _PackageWarmupError(str(exc)) from exc
        raise
    # every instance, and each instance's preprocess.pt2 / postprocess.pt2 (their weights are held as well)
    measured = measure_memory(model.instances, loaded_bytes) + measure_memory(pipeline.pre + pipeline.post)
    model.memory = config.memory_mb * 2**20 or measured
    sizes = model.warmup_sizes
    listed = f"{sizes[0]}-{sizes[-1]}" if sizes == list(range(sizes[0], sizes[-1] + 1)) and len(sizes) > 2 else sizes
    log.info(
        "model %s version %d warmed up in %.3f s: batch sizes %s (rows), %d instance(s)",
        name,
        version,
        model.warmup_s,
        listed,
        len(model.instances),
    )
    return model


class SealedMap(mmap.mmap):
    """A read-only map of a sealed memfd holding a verified model file: the bytes hashed, and `path` to load them by."""

    fd: int
    path: str

    def release(self) -> None:
        self.close()
        os.close(self.fd)


def _sealed_copy(path: Path, stack: contextlib.ExitStack) -> SealedMap | bytes:
    """The file copied by the kernel into a memfd sealed against any change (released with `stack`); its bytes where
    memfds or their seals are not available, or for an empty file (which cannot be mapped)."""
    fcntl = _fcntl()
    if fcntl is None or not hasattr(os, "memfd_create") or not Path("/proc/self/fd").is_dir():
        return path.read_bytes()
    try:
        fd = os.memfd_create(f"model-{path.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return path.read_bytes()
    try:
        size = 0
        with open(path, "rb") as src:
            while copied := os.sendfile(fd, src.fileno(), None, MODEL_COPY_CHUNK):
                size += copied
        if size == 0:
            os.close(fd)
            return b""
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        sealed = SealedMap(fd, size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    sealed.fd, sealed.path = fd, f"/proc/self/fd/{fd}"
    stack.callback(sealed.release)
    return sealed


def _fcntl():
    """fcntl where it has memfd seals (Linux, Python >= 3.9), else None."""
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl if hasattr(fcntl, "F_ADD_SEALS") else None


def _source(verified: ModelBytes):
    """What torch loads: the sealed file's path, or the bytes in a BytesIO."""
    if isinstance(verified.data, SealedMap):
        return verified.data.path
    return io.BytesIO(verified.data)


def _load_program(verified: ModelBytes) -> Any:
    """The version's exported program, loaded by cluster.torch_files from the verified bytes."""
    source = _source(verified)
    with open(source, "rb") if isinstance(source, str) else source as stream:
        return load_program(stream, f"model '{verified.name}' version {verified.version}: {verified.path}")


def _programs(verified: ModelBytes, device: str):
    """load(fname) for Pipeline.load: another exported program of the version (preprocess.pt2, postprocess.pt2),
    read with the same sealed reader, hashed and checked by model_check once (read_file), loaded like model.pt2 as
    many times as asked (one per instance)."""
    parts: dict[str, ModelBytes] = {}

    def load(fname: str) -> Any:
        if fname not in parts:
            data, config = verified.read_file(fname), replace(verified.config, platform="torch_export")
            parts[fname] = replace(verified, path=verified.path.parent / fname, data=data, config=config)
        return _module(parts[fname], device)

    return load


def _module(verified: ModelBytes, device: str) -> Any:
    platform = verified.config.platform
    try:
        if platform == "torchscript":
            module = torch.jit.load(_source(verified), map_location="cpu")
            if device != "cpu":
                module = module.to(device)
            module.eval()
            return module
        program = _load_program(verified)
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        with TORCH_LOAD:
            module = program.module(check_guards=False)  # guards_code is Python source from the file: never run it
        try:
            module.eval()
        except NotImplementedError:
            pass  # exported programs are traced in eval mode already; their modules refuse eval()
        return module
    except RepositoryError:
        raise
    except Exception as exc:
        raise RepositoryError(
            f"model '{verified.name}' version {verified.version}: cannot load {verified.path} ({platform}): "
            f"{model_error(exc)}"
        ) from exc
