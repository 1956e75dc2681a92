"""torch's side of the share's files: the one place an exported program or an AOTInductor package is loaded, by the
agent (cluster/agent) and by the compile at publish (cluster/compile.py) alike.

torch.export.load unpickles entries of an archive, so a program is loaded only after cluster.model_check admitted
its bytes (the caller's job: it holds the bytes that were checked, and hands over those very bytes), its sample
inputs load with weights_only=True (torch would retry with weights_only=False), and every call of the loaded graph
is then checked to be an operator. A package is a shared library, native code by definition: it is loaded with
torch's C++ package loader from the bytes given (never torch's Python load_pt2, which would also load any program
or pickle an archive held; model_check refuses those anyway). See README, Trust model.
"""

from __future__ import annotations

import io
import math
import operator
import tempfile
import threading
import zipfile
from typing import IO, Any

import torch
import torch.utils._pytree as pytree

from cluster.model_config import RepositoryError
from cluster.repository import describe_error

# Held while torch loads a program or a package: torch.export.load sets a module-global deserializer (two loader
# threads, config.LOAD_THREADS, failed with "_CURRENT_DESERIALIZER is already set"), and both import torch._dynamo
# and torch._inductor on first use, which two threads at once leave half-initialised.
TORCH_LOAD = threading.RLock()
# What an exported program may call besides operators: the symbolic-shape helpers torch.export itself emits.
_HELPERS = {
    *(getattr(operator, op) for op in "getitem eq ne le ge lt gt neg pos mul add sub floordiv mod pow truediv".split()),
    operator.and_,
    operator.or_,
    operator.lshift,
    operator.rshift,
    operator.not_,
    operator.abs,
    math.trunc,
    math.floor,
    math.ceil,
    math.sqrt,
    *(getattr(torch, f) for f in "sym_not sym_int sym_float sym_ite sym_max sym_min sym_sqrt sym_sum".split()),
}


def load_program(stream: IO[bytes], where: str) -> Any:
    """torch.export.load of bytes cluster.model_check admitted (no pickled payloads, operators only), from a seekable
    file object (torch logs "Unable to load package" for a path not ending in .pt2, such as /proc/self/fd/N).
    RepositoryError, prefixed with `where`, for sample inputs that are not plain tensors or a call that is not an
    operator."""
    _sample_inputs_are_tensors(stream, where)
    stream.seek(0)
    with TORCH_LOAD:
        program = torch.export.load(stream)
    _only_operators(program, where)
    return program


def load_package(data: Any, device_index: int = -1) -> Any:
    """One instance of an AOTInductor package (its own loader: instances share nothing) from `data`: a sealed
    memfd's map (its `path`, /proc/self/fd/N) or bytes, written to a private temporary file that torch extracts.
    `device_index` -1: the current device."""
    path = getattr(data, "path", None)
    with TORCH_LOAD:  # the import too: it imports torch._inductor and torch._dynamo on first use
        from torch._inductor.package.package import AOTICompiledModel

        if path is not None:
            model = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, device_index))
        else:
            with tempfile.NamedTemporaryFile(suffix=".pt2") as file:  # mode 0600, removed once torch extracted it
                file.write(data)
                file.flush()
                loader = torch._C._aoti.AOTIModelPackageLoader(file.name, "model", False, 1, device_index)
                model = AOTICompiledModel(loader)
    model.package_bytes = len(data)  # its weights live in the library: what measure_memory counts for it
    return model


def _sample_inputs_are_tensors(stream: IO[bytes], where: str) -> None:
    """torch loads the sample inputs with weights_only=True, and if that fails, again with weights_only=False: load
    them here with weights_only=True first, so that a file which fails it is refused and torch's fallback (which
    would run the pickle) is never reached."""
    with zipfile.ZipFile(stream) as archive:
        entries = [n for n in archive.namelist() if n.endswith("/data/sample_inputs/model.pt")]
        for entry in entries:
            try:
                torch.load(io.BytesIO(archive.read(entry)), weights_only=True)
            except Exception as exc:
                raise RepositoryError(
                    f"{where}: its sample inputs are not plain tensors ({describe_error(exc, 300)}); refused"
                ) from None


def _only_operators(program: Any, where: str) -> None:
    """Every call in the program (and its sub-graphs) is a registered operator or a symbolic-shape helper, checked
    on what torch resolved, before anything runs (model_check checked the names)."""
    allowed = (torch._ops.OpOverload, torch._ops.HigherOrderOperator)

    def refuse(what: Any) -> RepositoryError:
        return RepositoryError(f"{where}: the program calls {what!r}, which is not an operator; refused")

    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op != "call_function":
                continue
            if not isinstance(node.target, allowed) and node.target not in _HELPERS:
                raise refuse(node.target)
            for arg in pytree.tree_leaves((node.args, node.kwargs)):  # operators passed to a call
                if callable(arg) and not isinstance(arg, (torch.fx.Node, torch.nn.Module, *allowed)):
                    if arg not in _HELPERS and not isinstance(arg, torch._ops.OpOverloadPacket):
                        raise refuse(arg)
