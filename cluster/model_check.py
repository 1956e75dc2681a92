"""What a model file may hold, checked without torch before anything loads it: at publish (`cluster deploy --share`,
the manager publishing an upload) and again on the verified bytes an agent is about to load.

torch.export.load is not safe on untrusted files (torch's own docs: "uses pickle under the hood"). In torch 2.13's
archive (torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py) these entries run Python:
- a weight or tensor constant whose payload config says `use_pickle` (torch.load(weights_only=False));
- `custom_obj_*` (TorchScript's unpickler) and `opaque_obj_*` (pickle.loads) constants;
- `data/sample_inputs/<m>.pt` (torch.load(weights_only=True), and weights_only=False if that fails), the legacy
  `data/weights/<m>.pt` / `data/constants/<m>.pt` (torch 2.8) and the pre-2.8 `serialized_*.pt` layout (the same);
- the program's JSON: a node's `target` (and an `as_operator` argument) is resolved by getattr from `torch`,
  `_operator` or `math` and called when the module runs (`torch.os.system` resolves); every `expr_str` goes to
  sympy.sympify (which evals); `guards_code` is Python that ExportedProgram.module() compiles into the module, so
  the agent calls module(check_guards=False) (the config's shapes are checked on every request anyway);
- `data/aotinductor/` is a compiled shared library (code by definition).
So an archive is admitted only if every entry is one of the known data entries, every payload is raw tensor bytes,
the sample inputs' pickle names no global outside the tensor-rebuilding allow-list (the agent also loads them with
weights_only=True itself first, so torch's fallback is never reached), every call and operator argument is an
operator (`torch.ops.<ns>.<op>[.<overload>]`) or one of the symbolic-shape helpers, and every sympy expression is
built from an allow-list of names. Anything else is refused with the entry named. The agent checks the calls again
on what torch resolved, before anything runs.

A TorchScript file (model.pt) is code by design (see the README's trust model); it is loaded by TorchScript's own
C++ unpickler, which resolves TorchScript types only. Here it is checked only to tell a `torch.save` file (a state
dict or a pickled module) from TorchScript, with how to make one.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import zipfile
from typing import IO, Any

from cluster.model_config import RepositoryError

MAKE_TORCHSCRIPT = (
    "save the model as TorchScript (torch.jit.script(model).save('model.pt'), or torch.jit.trace(model, example)"
    ".save('model.pt')) or as an exported program (torch.export.save(torch.export.export(model, example), "
    "'model.pt2'))"
)
_NEITHER = f"TorchScript or torch.export; {MAKE_TORCHSCRIPT}"

# A version's compiled packages (`cluster deploy --compile`) and what they were compiled for (cluster/compile.py).
AOTI_FILE_RE = re.compile(r"model\.aoti-(cpu|cuda)\.pt2")
COMPILED_FILE = "compiled.json"
# What aoti_compile_and_package writes (torch 2.13): the archive's bookkeeping, and under data/aotinductor/model/ the
# generated sources, their metadata, the shared library (weights inside it) and, for CUDA, its kernels.
_AOTI_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_AOTI_ENTRY = re.compile(
    r"data/aotinductor/model/[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\.(cpp|h|so|json|o|bin|cubin|fatbin|ptx|spv|hsaco)"
)
_AOTI_ROOT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")  # not "..", nothing with a "/" or "\\"
_COMPILED_KEYS = {"device", "torch", "arch", "cuda_arch", "batch", "seconds", "compiled", "rtol", "atol"}

# Entries of a torch.export archive, under its one root folder (torch 2.13: <root>/...).
_PT2_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
}
_PT2_PATTERNS = (
    re.compile(r"data/weights/weight_[0-9]+"),
    re.compile(r"data/constants/tensor_[0-9]+"),
    re.compile(r"extra/[^/]+"),  # extra files: read as text, never run
)
_PT2_REFUSED = (  # known entries that torch would run, and why (the first that matches is said)
    ("data/aotinductor/", "an AOTInductor compiled library (native code)"),
    ("data/executorch/", "an ExecuTorch program"),
    ("data/mtia", "an MTIA program"),
    ("xl_model_weights/", "externally stored weights"),
    ("data/constants/custom_obj_", "a TorchScript object constant (unpickled)"),
    ("data/constants/opaque_obj_", "a Python object constant (pickle.loads)"),
    ("data/weights/", "weights in torch's legacy pickled format (torch.load)"),
    ("data/constants/", "constants in torch's legacy pickled format (torch.load)"),
    ("models/", "a second exported program (only 'model' is served)"),
)
# Globals a torch.save of tensors (the sample inputs) may name: what torch.load(weights_only=True) admits for them.
_STORAGES = (
    "Float Double Half BFloat16 Long Int Short Char Byte Bool ComplexFloat ComplexDouble ComplexHalf "
    "QInt8 QUInt8 QInt32 QUInt4x2 QUInt2x4 UInt16 UInt32 UInt64 Float8_e4m3fn Float8_e5m2"
).split()
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("torch", "strided"),
    *(("torch", f"{s}Storage") for s in _STORAGES),
    *(("torch", dtype) for dtype in ("float16 float32 float64 bfloat16 int8 int16 int32 int64 uint8 bool").split()),
}
_UNSAFE_OPCODES = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"}

# torch.export.save writes weights as raw tensor bytes (model_weights_config.json) from torch 2.9; before, a pickle.
_RESAVE = "re-save it with torch.export.save on torch >= 2.9"
# A node's target: an operator (resolved in torch.ops, so only registered operators), or a symbolic-shape helper.
_OPERATOR_TARGET = re.compile(r"torch\.ops\.(?!.*__)[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)?")
_HELPER_TARGETS = {
    *(f"_operator.{op}" for op in "getitem eq ne le ge lt gt neg pos mul add sub floordiv mod pow truediv".split()),
    *(f"_operator.{op}" for op in ("and_", "or_", "lshift", "rshift", "not_", "abs")),
    *(f"math.{f}" for f in "trunc floor ceil sqrt".split()),
    *(f"torch.{f}" for f in "sym_not sym_int sym_float sym_ite sym_max sym_min sym_sqrt sym_sum".split()),
}
# sympy.sympify evals its string: only these names (sympy's srepr output and torch's own sympy functions), symbol
# names like s0 / u3, keyword arguments, numbers, plain string literals and operators may appear.
_SYMPY_NAMES = set(
    (
        "Symbol Dummy Integer Rational Float Add Mul Pow Max Min Mod Abs floor ceiling sqrt Eq Ne Lt Le Gt Ge "
        "StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Xor ITE Piecewise "
        "ExprCondPair true false True False None oo zoo nan NegativeOne Zero One Half Infinity NegativeInfinity "
        "BooleanTrue BooleanFalse Tuple "
        "FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv IntTrueDiv FloatTrueDiv "
        "LShift RShift IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat "
        "FloatPow PowByNatural Identity"
    ).split()
)
_SYMPY_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<number>[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?)|(?P<string>'[A-Za-z0-9_.+-]*')"
    r"|(?P<name>[A-Za-z][A-Za-z0-9_]*)(?P<kw>\s*=(?!=))?|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>~&|^])"
)
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")


# exported programs of a version: the model, and the programs chained before and after it (cluster/agent/pipeline.py)
PROGRAM_FILES = ("preprocess.pt2", "postprocess.pt2")  # exported programs chained before / after the model
PT2_FILES = ("model.pt2", *PROGRAM_FILES)  # every exported program a version may hold


def check_model_file(file_name: str, source: bytes | IO[bytes] | Any, where: str) -> None:
    """Refuse a model file that could run code when loaded, or that is not what its name says; RepositoryError
    names the entry and why. `source`: the bytes, or a seekable binary file (an mmap will do)."""
    stream = source if hasattr(source, "seekable") else _BufferReader(source)
    try:
        if file_name in PT2_FILES:
            _check_pt2(stream, where)
        elif file_name == "model.pt":
            _check_torchscript(stream, where)
        elif AOTI_FILE_RE.fullmatch(file_name):
            _check_aoti(stream, where)
        elif file_name == COMPILED_FILE:
            stream.seek(0)
            check_compiled(stream.read(), where)
    finally:
        if stream is not source:
            stream.close()


class _BufferReader(io.RawIOBase):
    """A seekable file over a buffer (bytes, an mmap), without copying it; close() releases the buffer."""

    def __init__(self, buffer: Any) -> None:
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, into: Any) -> int:
        n = max(0, min(len(into), len(self._view) - self._pos))
        into[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()
        super().close()


def _refuse(where: str, text: str) -> RepositoryError:
    return RepositoryError(f"{where}: {text}")


def _zip(stream: IO[bytes], where: str, what: str) -> zipfile.ZipFile:
    try:
        stream.seek(0)
        return zipfile.ZipFile(stream)
    except zipfile.BadZipFile:
        if _is_pickle(stream):  # torch.save's old (non-zip) format, or pickle.dump
            raise _refuse(where, f"is a pickle (torch.save or pickle.dump), not {what}; {MAKE_TORCHSCRIPT}") from None
        raise _refuse(where, f"is not {what} (not a zip archive); {MAKE_TORCHSCRIPT}") from None


def _is_pickle(stream: IO[bytes]) -> bool:
    """Whether the file starts with a whole pickle (read, never run: pickletools only lists its opcodes), so random
    bytes that happen to start with a PROTO opcode are not called a pickle."""
    stream.seek(0)
    if stream.read(1) != b"\x80" or stream.read(1) not in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return False
    stream.seek(0)
    try:
        for count, (opcode, _, _) in enumerate(pickletools.genops(stream)):
            if opcode.name == "STOP":
                return count > 1
    except Exception:
        return False
    return False


def _entries(archive: zipfile.ZipFile, where: str) -> tuple[str, list[str]]:
    """(root folder, entry names under it). torch reads entries by name through miniz, case-insensitively, while
    zipfile keeps the last of equal names: two entries that either could confuse are refused."""
    names = archive.namelist()
    seen: set[str] = set()
    for name in names:
        if name.lower() in seen:
            raise _refuse(where, f"the archive holds '{name}' twice")
        seen.add(name.lower())
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise _refuse(where, f"is not a torch archive (one root folder expected, found {sorted(roots)[:5]})")
    root = roots.pop()
    return root, [name[len(root) + 1 :] for name in names]


def _check_torchscript(source: Any, where: str) -> None:
    """A torch.save zip (data.pkl, no code/ and no constants.pkl) or an exported program named .pt gets a message
    saying what it is; anything else is left to TorchScript's loader (junk fails there, with torch's message)."""
    try:
        archive = _zip(source, where, "TorchScript")
    except RepositoryError as exc:
        if "is a pickle" in str(exc):
            raise
        return
    with archive:
        try:
            _, entries = _entries(archive, where)
        except RepositoryError:
            return
        if "archive_format" in entries and "models/model.json" in entries:
            raise _refuse(where, "is a torch.export program, not TorchScript: publish it as a .pt2 file")
        if "data.pkl" in entries and "constants.pkl" not in entries and not any(e.startswith("code/") for e in entries):
            raise _refuse(where, f"is a torch.save file (a state dict or a pickled module), not {_NEITHER}")


def _check_pt2(source: Any, where: str) -> None:
    archive = _zip(source, where, "a torch.export program (.pt2)")
    with archive:
        if any(n.rsplit("/", 1)[-1].startswith("serialized_") for n in archive.namelist()):
            raise _refuse(
                where, f"is a torch.export archive in the pre-2.8 format, whose state dict is a pickle; {_RESAVE}"
            )
        root, entries = _entries(archive, where)
        if "data/weights/model.pt" in entries and "data/weights/model_weights_config.json" not in entries:
            raise _refuse(
                where, f"is a torch.export archive as torch 2.8 saves it, whose weights are a pickle; {_RESAVE}"
            )
        if "archive_format" not in entries and "data.pkl" in entries:
            if "constants.pkl" in entries or any(e.startswith("code/") for e in entries):
                raise _refuse(where, "is TorchScript, not a torch.export program: publish it as a .pt file")
            raise _refuse(where, f"is a torch.save file (a state dict or a pickled module), not {_NEITHER}")
        for entry in entries:
            if entry.endswith("/") or entry in _PT2_FIXED or any(p.fullmatch(entry) for p in _PT2_PATTERNS):
                continue
            why = next(
                (why for prefix, why in _PT2_REFUSED if entry.startswith(prefix)), "not part of an exported program"
            )
            raise _refuse(
                where, f"refusing entry '{entry}' of the archive: {why}; a .pt2 may hold tensors and data only"
            )
        for needed in ("archive_format", "models/model.json", "data/weights/model_weights_config.json"):
            if needed not in entries:
                raise _refuse(where, f"is not a torch.export program: no '{needed}' in the archive")

        def read(entry: str) -> bytes:
            return archive.read(f"{root}/{entry}")

        if read("archive_format").strip() != b"pt2":
            raise _refuse(where, "is not a torch.export program (archive_format is not 'pt2')")
        for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config_entry = f"data/{kind}/model_{kind}_config.json"
            if config_entry in entries:
                _check_payload_config(_json(read(config_entry), where, config_entry), kind, prefix, entries, where)
        _check_program(_json(read("models/model.json"), where, "models/model.json"), where)
        if "data/sample_inputs/model.pt" in entries:
            _check_tensor_pickle(read("data/sample_inputs/model.pt"), where, "data/sample_inputs/model.pt")


def _json(data: bytes, where: str, entry: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _refuse(where, f"'{entry}' is not valid JSON: {exc}") from None


def _check_payload_config(config: Any, kind: str, prefix: str, entries: list[str], where: str) -> None:
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise _refuse(where, f"data/{kind}/model_{kind}_config.json has no 'config' map")
    for fqn, meta in items.items():
        if not isinstance(meta, dict):
            raise _refuse(where, f"{kind} entry '{fqn}' is not an object")
        path = meta.get("path_name")
        if meta.get("use_pickle") is not False:
            raise _refuse(
                where,
                f"{kind[:-1]} '{fqn}' ({path}) is stored as a pickle, which would run code when loaded; "
                "a .pt2 may hold raw tensor data only (plain tensors, not tensor subclasses or Python objects)",
            )
        if not isinstance(path, str) or not re.fullmatch(f"{prefix}[0-9]+", path):
            raise _refuse(where, f"{kind[:-1]} '{fqn}' names {path!r}, not a raw tensor entry")
        if f"data/{kind}/{path}" not in entries:
            raise _refuse(where, f"{kind[:-1]} '{fqn}' names {path}, which the archive does not hold")


def _check_program(program: Any, where: str) -> None:
    if not isinstance(program, dict):
        raise _refuse(where, "models/model.json is not an exported program")

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("target", "as_operator"):  # a node's call, an operator passed to one (resolved alike)
                    _check_target(item, where)
                elif key == "expr_str":
                    _check_sympy(item, where)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(program)


def _check_target(target: Any, where: str) -> None:
    if isinstance(target, str) and (target in _HELPER_TARGETS or _OPERATOR_TARGET.fullmatch(target)):
        return
    raise _refuse(where, f"the program calls {str(target)[:200]!r}, which is not an operator; refused")


def _check_sympy(expr: Any, where: str) -> None:
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise _refuse(where, "a symbolic shape expression is not a string of sensible length")
    position = 0
    while position < len(expr):
        token = _SYMPY_TOKEN.match(expr, position)
        if token is None:
            raise _refuse(where, f"symbolic shape expression {expr[:200]!r}: unexpected {expr[position:][:20]!r}")
        name = token.group("name")
        if name and not (token.group("kw") or name in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(name)):
            raise _refuse(where, f"symbolic shape expression {expr[:200]!r} uses {name!r}; refused")
        if name and token.group("kw") and "__" in name:
            raise _refuse(where, f"symbolic shape expression {expr[:200]!r} uses {name!r}; refused")
        position = token.end()


def _check_tensor_pickle(data: bytes, where: str, entry: str) -> None:
    """A torch.save of tensors and plain data (a zip holding data.pkl): every .pkl in it may name only the globals
    that rebuild tensors; no STACK_GLOBAL and the like, whose names a scan cannot see."""
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise _refuse(where, f"'{entry}' is not a torch.save zip archive") from None
    with inner:
        pickles = [n for n in inner.namelist() if n.endswith(".pkl")]
        if len({n.lower() for n in inner.namelist()}) != len(inner.namelist()):
            raise _refuse(where, f"'{entry}' holds an entry twice")
        for name in pickles:
            try:
                for opcode, arg, _ in pickletools.genops(inner.read(name)):
                    if opcode.name in _UNSAFE_OPCODES:
                        raise _refuse(where, f"'{entry}' uses pickle opcode {opcode.name}; refused")
                    if opcode.name == "GLOBAL":
                        module, _, attr = str(arg).partition(" ")
                        if (module, attr) not in _SAFE_GLOBALS:
                            raise _refuse(where, f"'{entry}' is a pickle naming {module}.{attr}; refused")
            except RepositoryError:
                raise
            except Exception as exc:  # a malformed pickle
                raise _refuse(where, f"'{entry}' is not a valid pickle of tensors: {exc}") from None


def _check_aoti(source: Any, where: str) -> None:
    """An AOTInductor package: native code by design (README, trust model), so only its own layout is admitted:
    no pickles, no exported programs, no weights outside the library."""
    archive = _zip(source, where, "an AOTInductor package")
    with archive:
        root, entries = _entries(archive, where)
        if not _AOTI_ROOT.fullmatch(root):  # torch's package loader extracts each entry under its temp dir by name
            raise _refuse(where, f"refusing the AOTInductor package's root folder {root[:80]!r}: not a plain name")
        for entry in entries:
            if entry.endswith("/") or entry in _AOTI_FIXED or _AOTI_ENTRY.fullmatch(entry):
                continue
            raise _refuse(
                where,
                f"refusing entry '{entry}' of the AOTInductor package: a package may hold only what "
                "torch._inductor.aoti_compile_and_package writes (no pickles, no programs, no external weights)",
            )
        if not any(e.startswith("data/aotinductor/model/") and e.endswith(".so") for e in entries):
            raise _refuse(where, "is not an AOTInductor package: no data/aotinductor/model/*.so")
        if "archive_format" not in entries or archive.read(f"{root}/archive_format").strip() != b"pt2":
            raise _refuse(where, "is not an AOTInductor package (archive_format is not 'pt2')")


def check_compiled(data: bytes, where: str) -> dict:
    """compiled.json: {"packages": {"model.aoti-<kind>.pt2": {"device": kind, "torch": str, "arch": str,
    "cuda_arch": str | None, "batch": [lo, hi], "seconds": number, "compiled": str, ...}}}; returns the packages."""
    doc = _json(data, where, COMPILED_FILE)
    packages = doc.get("packages") if isinstance(doc, dict) else None
    if not isinstance(packages, dict) or set(doc) != {"packages"}:
        raise _refuse(where, f'{COMPILED_FILE} must be {{"packages": {{file name: entry}}}}')
    for fname, entry in packages.items():
        match = AOTI_FILE_RE.fullmatch(fname) if isinstance(fname, str) else None
        if match is None:
            raise _refuse(where, f"{COMPILED_FILE} names {str(fname)[:80]!r}, not model.aoti-<cpu|cuda>.pt2")

        def bad(text: str, fname: str = fname) -> RepositoryError:
            return _refuse(where, f"{COMPILED_FILE}: '{fname}': {text}")

        if not isinstance(entry, dict):
            raise bad("not an object")
        if set(entry) - _COMPILED_KEYS or {"device", "torch", "arch", "batch"} - set(entry):
            raise bad(f"keys must be among {sorted(_COMPILED_KEYS)} with device, torch, arch and batch")
        if entry["device"] != match.group(1):
            raise bad(f"device {entry['device']!r} is not the file's ({match.group(1)})")
        for key in ("torch", "arch"):
            if not isinstance(entry[key], str) or not 0 < len(entry[key]) <= 100:
                raise bad(f"'{key}' must be a string")
        if entry.get("cuda_arch") is not None and not isinstance(entry["cuda_arch"], str):
            raise bad("'cuda_arch' must be a string or null")
        batch = entry["batch"]
        if not (
            isinstance(batch, list)
            and len(batch) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) for b in batch)
            and 0 <= batch[0] <= batch[1]
        ):
            raise bad(f"'batch' must be [lowest, highest] batch size, got {batch!r}")
        for key in ("seconds", "rtol", "atol"):
            value = entry.get(key, 0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise bad(f"'{key}' must be a number >= 0")
    return packages
