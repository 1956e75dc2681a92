"""The model repository on the share, in Triton's layout, and the only place model files are read or written.

    <share>/models/<name>/config.json          what the model takes and returns (ModelConfig)
    <share>/models/<name>/<N>/model.pt         TorchScript            (platform "torchscript")
    <share>/models/<name>/<N>/model.pt2        torch.export program   (platform "torch_export")
    <share>/models/<name>/<N>/manifest.json    {"files": {"model.pt": "<sha256 hex>"}, "created": "<ISO time>"}

Agents on many hosts read the share (often NFS) while an operator publishes to it, so a version folder must either
be absent or complete: publish_version builds it under a dot-named temp folder, fsyncs, then renames it into place.
The manifest guards against a half-copied or tampered file being loaded. Model files are only ever opened with
torch.jit.load or torch.export.load, never with pickle, because the share is writable by more people than the agents'
hosts trust.

Shapes in a config include the batch dimension (e.g. [-1, 8, 8]); max_batch_size is a hint for the agent's batcher,
not an implicit extra dimension as in Triton.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cluster.config import MAX_DIMS
from cluster.protocol import DATATYPES
from cluster.share import MODEL_NAME_RE, sha256_file, version_number

MODELS_DIR = "models"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MODEL_FILES = {"model.pt": "torchscript", "model.pt2": "torch_export"}  # file name -> platform
PLATFORMS = ("torchscript", "torch_export")
CHUNK = 1024 * 1024

_CONFIG_KEYS = ("name", "platform", "inputs", "outputs", "max_batch_size", "max_queue_delay_us", "instances")
_SPEC_KEYS = ("name", "datatype", "shape")

# torch's dtypes carry numpy's names (torch.float32, torch.uint16, torch.bool, ...): derived from the one table.
DATATYPE_OF_TORCH = {getattr(torch, dtype.name): name for name, dtype in DATATYPES.items()}


class RepositoryError(Exception):
    """A model or version on the share cannot be read, verified or loaded; the message says what and where."""


class InputError(ValueError):
    """A request's inputs do not fit the model's config (the agent answers BAD_REQUEST with this message)."""


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


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
    def _from_dict(cls, d: Any, where: str) -> "TensorSpec":
        if not isinstance(d, dict):
            raise RepositoryError(f"{where} must be an object with name, datatype and shape")
        unknown = sorted(set(d) - set(_SPEC_KEYS), key=str)
        if unknown:
            raise RepositoryError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))} (allowed: name, datatype, shape)")
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
    max_batch_size: int = 0  # largest batch the agent's batcher may build (0 = no batching)
    max_queue_delay_us: int = 0  # how long the batcher may hold a request to fill a batch
    instances: int = 1  # model instances an agent runs side by side
    platform: str | None = None  # "torchscript" | "torch_export"; None = decided by the version's model file

    @classmethod
    def from_dict(cls, d: Any, name: str | None = None) -> "ModelConfig":
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
        for key, default, minimum in (("max_batch_size", 0, 0), ("max_queue_delay_us", 0, 0), ("instances", 1, 1)):
            value = d.get(key, default)
            if not _is_int(value) or value < minimum:
                raise RepositoryError(f"{prefix}: '{key}' must be an int >= {minimum}, got {value!r}")
            ints[key] = value

        platform = d.get("platform")
        if platform is not None and platform not in PLATFORMS:
            raise RepositoryError(f"{prefix}: platform {platform!r} is not one of {', '.join(PLATFORMS)}")
        return cls(final_name, specs["inputs"], specs["outputs"], platform=platform, **ints)

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "instances": self.instances,
        }
        if self.platform is not None:
            d["platform"] = self.platform
        return d

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

    def warmup_inputs(self) -> dict[str, np.ndarray]:
        """Smallest inputs the config allows, so warm-up exercises the model without guessing real sizes."""
        return {
            s.name: np.zeros([1 if d == -1 else d for d in s.shape], dtype=DATATYPES[s.datatype])
            for s in self.inputs
        }

    def metadata(self) -> dict:
        """Open Inference Protocol model metadata (what GET /v2/models/<name> returns)."""
        return {
            "name": self.name,
            "platform": self.platform or "",
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def _fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or new entry in `path` durable; some file systems (NFS, Windows) refuse a directory fsync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (must not exist) with 0666 & ~umask, unlike mkstemp's 0600 that other hosts' agents cannot read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` so that readers see the old or the new content, never a partial file."""
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(8)}"
    try:
        _write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise RepositoryError(f"invalid model name {name!r} (letters, digits, '_', '.', '-'; at most 128)")
    return name


# ---------------------------------------------------------------------------------------------------------------
# Loaded model
# ---------------------------------------------------------------------------------------------------------------


class LoadedModel:
    """A verified, warmed-up model, and the one place where the config's tensor names meet the module's positions."""

    def __init__(self, name: str, version: int, config: ModelConfig, module: Any, device: str = "cpu"):
        self.name = name
        self.version = version
        self.config = config
        self.module = module
        self.device = device

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, version={self.version}, platform={self.config.platform!r}, device={self.device!r})"

    def _where(self) -> str:
        return f"model '{self.name}' version {self.version}"

    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the module on named inputs; outputs come back named, on CPU and C-contiguous, ready for the codec."""
        args = []
        for spec in self.config.inputs:
            tensor = inputs.get(spec.name)
            if tensor is None:
                raise InputError(f"missing input '{spec.name}' for model '{self.name}'")
            args.append(tensor if self.device == "cpu" else tensor.to(self.device))
        extra = set(inputs) - {s.name for s in self.config.inputs}
        if extra:
            raise InputError(f"unknown input(s) {', '.join(map(repr, sorted(extra)))} for model '{self.name}'")

        with torch.inference_mode():
            result = self.module(*args)

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
            raise RepositoryError(f"{self._where()} returned {len(values)} output(s), config declares {len(names)} {names}")
        outputs = {}
        for name, value in zip(names, values):
            if not isinstance(value, torch.Tensor):
                raise RepositoryError(f"{self._where()}: output '{name}' is a {type(value).__name__}, not a tensor")
            outputs[name] = value.to("cpu").contiguous()
        return outputs

    def warmup(self) -> None:
        """Run once on zeros so a model that does not match its config is refused at load, not on a user request."""
        inputs = {name: torch.from_numpy(array) for name, array in self.config.warmup_inputs().items()}
        try:
            outputs = self.infer(inputs)
        except RepositoryError as exc:
            raise RepositoryError(f"warm-up failed: {exc}") from exc
        except Exception as exc:
            raise RepositoryError(f"{self._where()}: warm-up failed: {_describe(exc)}") from exc
        for spec in self.config.outputs:
            tensor = outputs[spec.name]
            datatype = DATATYPE_OF_TORCH.get(tensor.dtype, str(tensor.dtype))
            if datatype != spec.datatype:
                raise RepositoryError(
                    f"{self._where()}: warm-up output '{spec.name}' has datatype {datatype}, config says {spec.datatype}"
                )
            problem = shape_mismatch(spec.shape, list(tensor.shape))
            if problem:
                raise RepositoryError(f"{self._where()}: warm-up output '{spec.name}': {problem} (as config.json says)")


def _describe(exc: BaseException, limit: int = 1000) -> str:
    """One exception as text short enough for a log line (TorchScript errors can run to pages)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------------------------------
# Repository
# ---------------------------------------------------------------------------------------------------------------


class ModelRepository:
    """Read side of the share: what models and versions exist, and loading one safely."""

    def __init__(self, share_dir: str | os.PathLike):
        self.share_dir = Path(share_dir)
        self.models_dir = self.share_dir / MODELS_DIR

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.share_dir)!r})"

    def model_dir(self, name: str) -> Path:
        return self.models_dir / _check_name(name)

    def model_names(self) -> list[str]:
        try:
            entries = os.listdir(self.models_dir)
        except FileNotFoundError:
            return []
        return sorted(
            e for e in entries if MODEL_NAME_RE.fullmatch(e) and (self.models_dir / e / CONFIG_FILE).is_file()
        )

    def versions(self, name: str) -> list[int]:
        """Published versions only: a folder without a model file is not (or no longer) a usable version."""
        folder = self.model_dir(name)
        try:
            entries = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            number = version_number(entry)
            if number is not None and any((folder / entry / f).is_file() for f in MODEL_FILES):
                found.append(number)
        return sorted(found)

    def latest_version(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def read_config(self, name: str) -> ModelConfig:
        """The validated config; a missing platform is taken from the latest version's model file."""
        config = self._read_config(name)
        if config.platform is None:
            latest = self.latest_version(name)
            if latest is not None:
                config.platform = self._model_file(name, latest, None)[1]
        return config

    def _read_config(self, name: str) -> ModelConfig:
        path = self.model_dir(name) / CONFIG_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise RepositoryError(f"model '{name}': no {CONFIG_FILE} at {path}") from None
        except OSError as exc:
            raise RepositoryError(f"model '{name}': cannot read {path}: {_describe(exc)}") from exc
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"model '{name}': {path} is not valid JSON: {exc}") from None
        try:
            return ModelConfig.from_dict(data, name=name)
        except RepositoryError as exc:
            raise RepositoryError(f"{path}: {exc}") from None

    def _version_config(self, name: str, version: int, files: dict[str, str]) -> ModelConfig:
        """The config published with this version (sha256-checked), or the model's config.json for older layouts."""
        path = self._version_dir(name, version) / CONFIG_FILE
        if CONFIG_FILE not in files:
            return self._read_config(name)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise RepositoryError(f"model '{name}' version {version}: cannot read {path}: {_describe(exc)}") from None
        self._check_digest(name, version, path, files[CONFIG_FILE], raw)
        try:
            return ModelConfig.from_dict(json.loads(raw), name=name)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"{path} is not valid JSON: {exc}") from None
        except RepositoryError as exc:
            raise RepositoryError(f"{path}: {exc}") from None

    def _version_dir(self, name: str, version: int) -> Path:
        if not _is_int(version) or version < 0:
            raise RepositoryError(f"model '{name}': invalid version {version!r}")
        return self.model_dir(name) / str(version)

    def _model_file(self, name: str, version: int, platform: str | None) -> tuple[Path, str]:
        """(path, platform) of the version's model file; the config's platform picks one if both files exist."""
        folder = self._version_dir(name, version)
        present = [(folder / f, p) for f, p in MODEL_FILES.items() if (folder / f).is_file()]
        if platform is not None:
            matching = [item for item in present if item[1] == platform]
            if not matching:
                raise RepositoryError(
                    f"model '{name}' version {version}: config says platform '{platform}' but {folder} has no "
                    f"{next(f for f, p in MODEL_FILES.items() if p == platform)}"
                )
            return matching[0]
        if not present:
            raise RepositoryError(f"model '{name}' version {version}: no model file ({' or '.join(MODEL_FILES)}) in {folder}")
        if len(present) > 1:
            raise RepositoryError(
                f"model '{name}' version {version}: both model.pt and model.pt2 in {folder}; set 'platform' in config.json"
            )
        return present[0]

    def _manifest(self, name: str, version: int) -> dict[str, str]:
        """The manifest's file -> sha256 map, after checking it cannot point outside the version folder."""
        folder = self._version_dir(name, version)
        where = f"model '{name}' version {version}"
        if not folder.is_dir():
            raise RepositoryError(f"{where}: no such version folder {folder}")
        path = folder / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise RepositoryError(
                f"{where}: no {MANIFEST_FILE} in {folder}; refusing to load an unverified model "
                f"(publish it with publish_version, which writes the manifest)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"{where}: cannot read {path}: {_describe(exc)}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not files:
            raise RepositoryError(f"{where}: {path} has no 'files' map of file name -> sha256")
        for fname, digest in files.items():
            if not isinstance(fname, str) or fname in ("", ".", "..") or os.path.basename(fname) != fname or "\\" in fname:
                raise RepositoryError(f"{where}: {path} lists {fname!r}, which is not a plain file name")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise RepositoryError(f"{where}: {path} has no valid sha256 for '{fname}' ({digest!r})")
        return files

    def verify(self, name: str, version: int) -> dict[str, str]:
        """Check every file the manifest lists against its sha256; returns the manifest's file -> sha256 map."""
        files = self._manifest(name, version)
        folder = self._version_dir(name, version)
        if not any(f in files for f in MODEL_FILES if (folder / f).is_file()):
            raise RepositoryError(f"model '{name}' version {version}: {MANIFEST_FILE} does not list the model file")
        for fname, digest in files.items():
            self._check_digest(name, version, folder / fname, digest, None)
        return files

    @staticmethod
    def _check_digest(name: str, version: int, path: Path, expected: str, data: bytes | None) -> None:
        where = f"model '{name}' version {version}"
        try:
            actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
        except FileNotFoundError:
            raise RepositoryError(f"{where}: {path} is listed in {MANIFEST_FILE} but missing") from None
        except OSError as exc:
            raise RepositoryError(f"{where}: cannot read {path}: {_describe(exc)}") from None
        if actual != expected:
            raise RepositoryError(
                f"{where}: sha256 mismatch for {path}: manifest says {expected}, file has {actual} "
                f"(corrupt, partly copied or modified after publishing)"
            )

    def load(self, name: str, version: int, device: str = "cpu") -> LoadedModel:
        """Verify, load, warm up. The model file is hashed from the very bytes handed to torch, so a file swapped
        between the check and the load cannot slip through."""
        where = f"model '{name}' version {version}"
        files = self._manifest(name, version)
        config = self._version_config(name, version, files)
        path, platform = self._model_file(name, version, config.platform)
        if path.name not in files:
            raise RepositoryError(f"{where}: {MANIFEST_FILE} does not list {path.name}; refusing to load it unverified")
        for fname, digest in files.items():
            if fname != path.name:
                self._check_digest(name, version, path.parent / fname, digest, None)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RepositoryError(f"{where}: cannot read {path}: {_describe(exc)}") from None
        self._check_digest(name, version, path, files[path.name], data)

        config = dataclasses.replace(config, platform=platform)
        try:
            if platform == "torchscript":
                module = torch.jit.load(io.BytesIO(data), map_location="cpu")
                if device != "cpu":
                    module = module.to(device)
                module.eval()
            else:
                program = torch.export.load(io.BytesIO(data))
                if device != "cpu":
                    from torch.export.passes import move_to_device_pass

                    program = move_to_device_pass(program, device)
                module = program.module()
                try:
                    module.eval()
                except NotImplementedError:
                    pass  # exported programs are traced in eval mode already; their modules refuse eval()
        except Exception as exc:
            raise RepositoryError(f"{where}: cannot load {path} ({platform}): {_describe(exc)}") from exc
        del data
        model = LoadedModel(name, version, config, module, device)
        model.warmup()
        return model


# ---------------------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------------------


def publish_version(
    share_dir: str | os.PathLike,
    name: str,
    model_path: str | os.PathLike,
    config: dict | None = None,
    version: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Add a version so that agents scanning the share see it complete or not at all; returns its number.

    The folder is built as <models>/<name>/.tmp-<random>/ (invisible to versions()), fsynced, and renamed into place;
    rename onto an existing non-empty version fails, so two publishers cannot overwrite each other.
    """
    _check_name(name)
    model_path = Path(model_path)
    suffix = model_path.suffix.lower()
    target_file = {".pt": "model.pt", ".pt2": "model.pt2"}.get(suffix)
    if target_file is None:
        raise RepositoryError(f"cannot publish {model_path}: expected a .pt (TorchScript) or .pt2 (torch.export) file")
    if not model_path.is_file():
        raise RepositoryError(f"cannot publish {model_path}: no such file")
    if version is not None and (not _is_int(version) or version < 1):
        raise RepositoryError(f"cannot publish model '{name}': version must be an int >= 1, got {version!r}")

    repo = ModelRepository(share_dir)
    model_dir = repo.models_dir / name
    config_path = model_dir / CONFIG_FILE
    config_bytes = None
    if config is not None:
        parsed = ModelConfig.from_dict(config, name=name)
        expected_platform = MODEL_FILES[target_file]
        if parsed.platform is not None and parsed.platform != expected_platform:
            raise RepositoryError(
                f"cannot publish model '{name}': config says platform '{parsed.platform}' but {model_path} is {expected_platform}"
            )
        config_bytes = (json.dumps(parsed.to_dict(), indent=2) + "\n").encode()
    elif not config_path.is_file():
        raise RepositoryError(f"cannot publish model '{name}': {config_path} does not exist and no config was given")

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{secrets.token_hex(8)}"
    os.mkdir(tmp, 0o777)  # not mkdtemp: its 0700 would hide the version from agents running as other users
    try:
        total = model_path.stat().st_size
        h = hashlib.sha256()
        done = 0
        if progress is not None:
            progress(0, total)
        fd = os.open(tmp / target_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with open(model_path, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                dst.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        manifest = {
            "files": {target_file: h.hexdigest()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # Each version keeps the config it was published with, so a later version's config.json cannot change
        # what an older version's inputs and outputs are (a rollback gets exactly what was deployed before).
        version_config = config_bytes if config_bytes is not None else config_path.read_bytes()
        _write_new_file(tmp / CONFIG_FILE, version_config)
        manifest["files"][CONFIG_FILE] = hashlib.sha256(version_config).hexdigest()
        _write_new_file(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp)

        if config_bytes is not None:
            _atomic_write(config_path, config_bytes)

        for _ in range(100):
            number = version
            if number is None:
                existing = [n for n in map(version_number, os.listdir(model_dir)) if n is not None]
                number = max(existing, default=0) + 1
            final = model_dir / str(number)
            if final.exists():
                if version is not None:
                    raise RepositoryError(f"cannot publish model '{name}': version {number} already exists at {final}")
                continue  # another publisher took it between listdir and here
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    if version is not None:
                        raise RepositoryError(
                            f"cannot publish model '{name}': version {number} already exists at {final}"
                        ) from None
                    continue
                raise
            break
        else:
            raise RepositoryError(f"cannot publish model '{name}': could not claim a version number")
        _fsync_dir(model_dir)
        return number
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
