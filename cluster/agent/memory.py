"""What a loaded model costs in memory, and how much an agent offers (`--memory-budget`): what placement fills.

A measure, not an accounting of the allocator: the bytes of every instance's parameters, buffers and constants
(an exported program's lifted constants, a TorchScript module's attributes). A callable torch does not show the
tensors of (an AOTInductor package runner) counts the size of the file(s) it was loaded from, once per instance.
Config `memory_mb` overrides both (LoadedModel.memory).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cluster.sizes import host_memory, parse_bytes

log = logging.getLogger("cluster.agent")


def memory_budget(setting: str | None, device: str) -> int:
    """Bytes of models this agent may hold: the setting (8Gi, 512M, ...), else the device's memory (CUDA) or the
    host's RAM."""
    if setting:
        return parse_bytes(setting)
    if device.startswith("cuda"):
        try:
            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
        except Exception as exc:  # no CUDA here: the agent fails on its first load and says why
            log.warning("cannot read the memory of %s (%s): budget from the host's RAM", device, exc)
    return host_memory()


def _tensor_bytes(obj: Any) -> int | None:
    """Bytes of the distinct tensors an instance holds, or None when it shows none (not an nn.Module / ScriptModule)."""
    tensors: dict[int, torch.Tensor] = {}
    found = False
    for method in ("parameters", "buffers"):
        getter = getattr(obj, method, None)
        if callable(getter):
            found = True
            for t in getter():
                tensors[id(t)] = t
    if isinstance(obj, torch.nn.Module):
        for module in obj.modules():
            for value in vars(module).values():  # an exported module's lifted constants are plain attributes
                if isinstance(value, torch.Tensor):
                    tensors.setdefault(id(value), value)
    if not found:
        return None
    seen: set = set()
    total = 0
    for t in tensors.values():
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.device)
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse): its elements
            total += t.numel() * t.element_size()
    return total


def measure_memory(instances: list, loaded_bytes: int = 0) -> int:
    """Bytes the instances hold: each one's tensors, or `loaded_bytes` (the size of the file(s) it was loaded from)
    for one that shows none."""
    total = 0
    for instance in instances:
        size = _tensor_bytes(instance)
        total += loaded_bytes if size is None else size
    return total
