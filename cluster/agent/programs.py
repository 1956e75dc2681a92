"""Which program runs a verified version on this agent: its AOTInductor package (`cluster deploy --compile`) when
compiled.json says it was built for this agent's device kind, torch build and CPU architecture (and CUDA
capability), else the exported program (model.pt2, always in the version), with the reason.

The package is loaded from the verified bytes (ModelBytes.read_file: the sealed memfd, by its /proc/self/fd path)
by cluster.torch_files.load_package (torch's C++ package loader). A package is native code: see README, Trust
model.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

import torch

from cluster.model_check import COMPILED_FILE, check_compiled
from cluster.repository import PREPROCESS_FILE, ModelBytes, RepositoryError, describe_error, package_file
from cluster.torch_files import load_package

log = logging.getLogger("cluster.agent")
_FALLBACK = "running the exported program"


def device_kind(device: str) -> str:
    """ "cuda" for cuda and cuda:N, else "cpu"."""
    return "cuda" if device.split(":")[0] == "cuda" else "cpu"


def mismatch(entry: dict, device: str) -> str:
    """Why a package compiled as `entry` (compiled.json) cannot run here; "" when it can. The torch version must be
    equal, local part included (2.13.0+cpu and 2.13.0+cu126 are different builds of libtorch: the package's library
    calls into it)."""
    kind = device_kind(device)
    if entry.get("device") != kind:
        return f"it was compiled for {entry.get('device')}, this agent runs on {kind}"
    if entry.get("torch") != torch.__version__:
        return f"it was compiled with torch {entry.get('torch')}, this agent has torch {torch.__version__}"
    if entry.get("arch") != platform.machine():
        return f"it was compiled for CPU architecture {entry.get('arch')}, this agent's is {platform.machine()}"
    if kind == "cuda":
        index = torch.device(device).index or 0
        here = "{}.{}".format(*torch.cuda.get_device_capability(index))
        if entry.get("cuda_arch") != here:
            return f"it was compiled for CUDA capability {entry.get('cuda_arch')}, this agent's GPU has {here}"
    return ""


def _outside(entry: dict, config: Any) -> str:
    """Why a package's batch range (compiled.json) leaves out batches this model may run; "" when it covers them.
    A package does not check its range when run: outside it, it runs code built on assumptions that do not hold."""
    lo, hi = entry["batch"]
    if config.max_batch_size <= 0 or lo == hi == 1:  # no row limit to cover, or a model without a batch dimension
        return ""
    if lo > 1 or hi < config.max_batch_size:
        return f"it was compiled for batches of {lo} to {hi} rows, this model runs 1 to {config.max_batch_size}"
    return ""


def compiled_runner(verified: ModelBytes, device: str) -> tuple[Any, str]:
    """(a callable that loads one instance of the package, "") when this version has a package that fits this
    agent; (None, why not) otherwise ("" when the version has no compiled package at all)."""
    if verified.config.platform != "torch_export" or not verified.has_file(COMPILED_FILE):
        return None, ""
    where = f"model '{verified.name}' version {verified.version}"
    fname = package_file(device_kind(device))
    try:
        packages = check_compiled(bytes(verified.read_file(COMPILED_FILE)), f"{where}: {COMPILED_FILE}")
    except RepositoryError as exc:
        return None, f"{COMPILED_FILE} is not valid ({exc}); running the exported program"
    entry = packages.get(fname)
    if entry is None or not verified.has_file(fname):
        compiled_for = ", ".join(sorted(packages)) or "nothing"
        return None, f"no package for {device_kind(device)} ({COMPILED_FILE} lists {compiled_for}); {_FALLBACK}"
    why = mismatch(entry, device) or _outside(entry, verified.config)
    if why:
        return None, f"{fname} refused: {why}; running the exported program"
    try:
        data = verified.read_file(fname)  # hashed and layout-checked (model_check) from the bytes returned
    except RepositoryError as exc:
        return None, f"{fname} refused: {exc}; running the exported program"
    index = torch.device(device).index if device_kind(device) == "cuda" else None
    return lambda: load_package(data, -1 if index is None else index), ""  # -1: the current device


def load_compiled(verified: ModelBytes, device: str, instances: int) -> tuple[list[Any], str]:
    """(the package's instances, "") when it fits this agent and loads; ([], why not) to run the exported program
    instead (logged)."""
    runner, why = compiled_runner(verified, device)
    if runner is not None:
        try:
            loaded = [runner() for _ in range(instances)]
            _probe(loaded[0], verified, device)
            log.info("model %s v%d runs its AOTInductor package", verified.name, verified.version)
            return loaded, ""
        except Exception as exc:
            why = f"{package_file(device_kind(device))} did not load ({describe_error(exc, 300)}); {_FALLBACK}"
    if why:
        log.warning("model %s v%d: %s", verified.name, verified.version, why)
    return [], why


def _probe(package: Any, verified: ModelBytes, device: str) -> None:
    """One inference on the config's warm-up inputs, so a package that loads but cannot run them (a batch range that
    leaves them out, another input layout) falls back to the exported program instead of failing the version. Not
    where the model's inputs are not the config's (a pre-processing program, BYTES): the warm-up checks those."""
    arrays = list(verified.config.warmup_inputs().values())
    if verified.has_file(PREPROCESS_FILE) or any(array.dtype == object for array in arrays):
        return
    inputs = [torch.from_numpy(array).to(device) for array in arrays]
    with torch.inference_mode():
        package(*inputs)
