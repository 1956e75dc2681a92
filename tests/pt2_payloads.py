"""Real torch.export programs, and copies with one entry replaced by something torch would run when loading: the
files an attacker with publish rights (or write access to the share) would hand the cluster. Each payload writes a
marker file; a test passes only if the marker never appears."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import torch

CONFIG = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x).relu()


class Payload:
    """Unpickling this writes `marker` (the stand-in for any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def exported_program(path: Path) -> Path:
    """A real torch.export program of Small, batch dimension dynamic, saved with torch.export.save."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Small().eval(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def _entries(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        return names[0].split("/", 1)[0], {n.split("/", 1)[1]: archive.read(n) for n in names}


def _write(path: Path, root: str, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(f"{root}/{name}", data)
    return path


def _torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pickled_weight(good: Path, out: Path, marker: Path) -> Path:
    """The issue's file: the first weight replaced by a pickle (use_pickle) whose unpickling runs the payload."""
    root, entries = _entries(good)
    config = json.loads(entries["data/weights/model_weights_config.json"])
    fqn, meta = next(iter(config["config"].items()))
    meta["use_pickle"] = True
    entries["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    entries[f"data/weights/{meta['path_name']}"] = _torch_save(Payload(marker))
    return _write(out, root, entries)


def pickled_sample_inputs(good: Path, out: Path, marker: Path) -> Path:
    """Sample inputs that fail weights_only=True, so torch falls back to weights_only=False and runs them."""
    root, entries = _entries(good)
    entries["data/sample_inputs/model.pt"] = _torch_save(Payload(marker))
    return _write(out, root, entries)


def opaque_constant(good: Path, out: Path, marker: Path) -> Path:
    """A constant stored as a Python object (opaque_obj_*): torch loads it with pickle.loads."""
    root, entries = _entries(good)
    entries["data/constants/model_constants_config.json"] = json.dumps(
        {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    ).encode()
    entries["data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
    return _write(out, root, entries)


def rewritten_program(good: Path, out: Path, change) -> Path:
    """The program's JSON changed by `change(program)` (e.g. a node calling a non-operator, a sympy expression
    with Python in it, guards_code)."""
    root, entries = _entries(good)
    program = json.loads(entries["models/model.json"])
    change(program)
    entries["models/model.json"] = json.dumps(program).encode()
    return _write(out, root, entries)


def extra_entry(good: Path, out: Path, name: str, data: bytes = b"\x7fELF") -> Path:
    root, entries = _entries(good)
    entries[name] = data
    return _write(out, root, entries)


def drop_on_share(share: Path, name: str, version: int, model: Path, config: dict) -> None:
    """A version written straight onto the share with a correct manifest, as anyone with write access could: no
    publish check ran, so only the agent's own check stands between the file and torch."""
    folder = share / "models" / name / str(version)
    folder.mkdir(parents=True)
    files = {"model.pt2": model.read_bytes(), "config.json": json.dumps(config).encode()}
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    (share / "models" / name / "config.json").write_bytes(files["config.json"])
    manifest = {"files": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def non_operator(program):
    program["graph_module"]["graph"]["nodes"][-1]["target"] = "torch.os.system"


def operator_argument(program):
    """An operator argument (resolved like a target, and called by the operator it is passed to)."""
    node = program["graph_module"]["graph"]["nodes"][-1]
    node["inputs"].append({"name": "op", "arg": {"as_operator": "torch.os.system"}, "kind": 1})


def sympy_python(marker):
    def change(program):
        sizes = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] = f"__import__('pathlib').Path('{marker}').write_text('ran') and Symbol('s0')"

    return change


def guards(marker):
    def change(program):
        program["guards_code"] = [f"__import__('pathlib').Path('{marker}').write_text('ran') or True"]

    return change
