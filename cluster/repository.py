"""The model repository on the share: its layout, every rule about it, and reading it (torch-free). Writing to it is
cluster/publish.py's (publish_version, publish_upload, remove_version), by these same rules.

    <share>/models/<name>/config.json          what the model takes and returns (cluster.model_config.ModelConfig)
    <share>/models/<name>/<N>/model.pt         TorchScript            (platform "torchscript")
    <share>/models/<name>/<N>/model.pt2        torch.export program   (platform "torch_export")
    <share>/models/<name>/<N>/preprocess.pt2   optional exported programs run before / after the model
    <share>/models/<name>/<N>/postprocess.pt2  (cluster/agent/pipeline.py; checked like model.pt2)
    <share>/models/<name>/<N>/config.json      the config this version was published with
    <share>/models/<name>/<N>/model.aoti-<kind>.pt2  AOTInductor package for device kind cpu|cuda (optional; model.pt2
                                               stays the model file, run where the package does not fit the agent)
    <share>/models/<name>/<N>/compiled.json    what each package was compiled for (cluster/compile.py)
    <share>/models/<name>/<N>/manifest.json    {"files": {"model.pt": "<sha256 hex>", ...}, "created": "<ISO time>"}

What a model and a version are, the same for every reader (ModelRepository here; LocalShare and NfsShare in
cluster.share; hence the manager, `cluster deploy` and the agents):
- a model is a folder under models/ whose name passes check_name (letters, digits, '_', '.', '-', not starting with
  '.'); ModelRepository.model_names() lists only those that also have a config.json;
- a version is a sub-folder of a model whose name is a canonical decimal number ("3", not "03" or "3a"). Nothing
  more is checked when listing: publish_version (cluster/publish.py) builds a version under a dot-named temp folder
  (`.tmp-XXXX`), fsyncs it and renames it into place, so a numbered folder is complete, and every load verifies the
  manifest anyway (looking for a model file would cost a round-trip per version on NFS for nothing);
- dot-named folders are publishes in progress, ignored everywhere.

Agents on many hosts read the share (often NFS) while an operator publishes to it, so a version folder is either
absent or complete, and files are replaced atomically (cluster/atomic.py). The manifest guards against a half-copied or
tampered file being loaded: ModelRepository.read_model hashes the very bytes it hands over. Those bytes are only ever
opened with torch.jit.load or torch.export.load (cluster.agent.loaded_model), never with pickle, because the share is
writable by more people than the agents' hosts trust; and since torch.export.load itself unpickles entries of an
archive, cluster.model_check refuses any archive that holds one, at publish and again in read_model.

Errors: RepositoryError (defined with the model contract in cluster.model_config) when something on the share is
missing, malformed or does not match its manifest; cluster.share.ShareError, a subclass, when the share itself cannot
be reached or read. `except RepositoryError` catches both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.config import MAX_VERSION
from cluster.model_check import PROGRAM_FILES, check_model_file
from cluster.model_config import ModelConfig, RepositoryError

MODELS_DIR = "models"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MODEL_FILES = {"model.pt": "torchscript", "model.pt2": "torch_export"}  # file name -> platform
PREPROCESS_FILE, POSTPROCESS_FILE = PROGRAM_FILES  # (model_check.PROGRAM_FILES: the checks name them first)
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # a folder name on every host: no dot-folders, no '/'
CHUNK = 1024 * 1024

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def package_file(kind: str) -> str:
    """The version-folder name of the AOTInductor package for device kind `kind` ("cpu" or "cuda")."""
    return f"model.aoti-{kind}.pt2"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def describe_error(exc: BaseException, limit: int = 1000) -> str:
    """One exception as text short enough for a log line (TorchScript errors can run to pages)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------------------------------
# Layout: names, versions, paths
# ---------------------------------------------------------------------------------------------------------------


def check_name(name: Any) -> str:
    """Model names end up in local paths and NFS URLs, so only plain folder names are allowed."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise RepositoryError(f"invalid model name {name!r} (letters, digits, '_', '.', '-'; at most 128)")
    return name


def check_version(name: str, version: Any) -> int:
    if not is_int(version) or not 0 <= version <= MAX_VERSION:
        raise RepositoryError(f"model '{name}': invalid version {version!r} (a number from 0 to {MAX_VERSION})")
    return version


def version_number(entry: str) -> int | None:
    """The version a folder name stands for; None for '.tmp-XXXX' folders, anything not a canonical number, and
    numbers past MAX_VERSION."""
    if entry.isascii() and entry.isdigit() and len(entry) <= len(str(MAX_VERSION)) and str(int(entry)) == entry:
        number = int(entry)
        return number if number <= MAX_VERSION else None
    return None


def model_path(name: str) -> str:
    """`models/<name>`, relative to the share's root (a local folder, or the tail of an NFS URL)."""
    return f"{MODELS_DIR}/{check_name(name)}"


def version_path(name: str, version: int) -> str:
    """`models/<name>/<version>`, relative to the share's root."""
    return f"{model_path(name)}/{check_version(name, version)}"


def sub_folders(folder: str | os.PathLike) -> list[str]:
    """Names of the folders in `folder` (OSError if it cannot be listed). scandir knows each entry's type from the
    listing itself on most file systems, NFS included, so this costs no stat per entry."""
    with os.scandir(folder) as entries:
        return [e.name for e in entries if e.is_dir()]


def model_names_of(entries: Iterable[str]) -> list[str]:
    """The model names among the folder names of models/, sorted."""
    return sorted(e for e in entries if MODEL_NAME_RE.fullmatch(e))


def versions_of(entries: Iterable[str]) -> list[int]:
    """The versions among the folder names of a model's folder, sorted (the rule: see the module docstring)."""
    return sorted(v for v in map(version_number, entries) if v is not None)


# ---------------------------------------------------------------------------------------------------------------
# Manifests and digests
# ---------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB models do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parse_manifest(data: bytes, where: str) -> dict[str, str]:
    """A manifest's file -> sha256 map, checked so that no entry can point outside its version folder (or at the
    manifest itself). `where` names the manifest in messages."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"{where}: not valid JSON: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise RepositoryError(f"{where}: no 'files' map of file name -> sha256")
    for fname, digest in files.items():
        if not isinstance(fname, str) or fname in ("", ".", "..", MANIFEST_FILE) or "/" in fname or "\\" in fname:
            raise RepositoryError(f"{where}: lists {fname!r}, which is not a plain file name")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise RepositoryError(f"{where}: no valid sha256 for '{fname}' ({digest!r})")
    return files


def read_manifest(folder: Path, where: str) -> dict[str, str]:
    """The checked manifest of a version folder; a folder without one is refused, so nothing unverified is loaded."""
    path = folder / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RepositoryError(
            f"{where}: no {MANIFEST_FILE} in {folder}; refusing to load an unverified model "
            f"(publish it with publish_version, which writes the manifest)"
        ) from None
    except OSError as exc:
        raise RepositoryError(f"{where}: cannot read {path}: {describe_error(exc)}") from None
    return parse_manifest(data, f"{where}: {path}")


def check_digest(path: Path, expected: str, where: str, data: bytes | None = None) -> None:
    """Refuse a file whose sha256 is not the manifest's; with `data`, hash those bytes (read from `path`) instead."""
    try:
        actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    except FileNotFoundError:
        raise RepositoryError(f"{where}: {path} is listed in {MANIFEST_FILE} but missing") from None
    except OSError as exc:
        raise RepositoryError(f"{where}: cannot read {path}: {describe_error(exc)}") from None
    if actual != expected:
        raise RepositoryError(
            f"{where}: sha256 mismatch for {path}: manifest says {expected}, file has {actual} "
            f"(corrupt, partly copied or modified after publishing)"
        )


def verify_folder(folder: Path, where: str) -> dict[str, str]:
    """Check every file a version folder's manifest lists against its sha256; returns the manifest's map."""
    files = read_manifest(folder, where)
    for fname, digest in files.items():
        check_digest(folder / fname, digest, where)
    return files


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelBytes:
    """A version's model file read into memory and checked against its manifest: load `data`, never re-read `path`,
    so a file swapped on the share after the check cannot slip through."""

    name: str
    version: int
    config: ModelConfig  # the config published with this version, its platform filled in
    path: Path  # where the bytes were read from (for messages)
    data: Any  # bytes, or the buffer read_model's reader returned
    files: dict[str, str] = field(default_factory=dict)  # the version's manifest: file name -> sha256
    # another file of the version (a compiled package, pre- and post-processing programs), read with the same reader
    # and hashed from the bytes returned, like `data`; RepositoryError if the manifest does not list it
    read_file: Callable[[str], Any] | None = None

    def has_file(self, fname: str) -> bool:
        return fname in self.files


class ModelRepository:
    """A share that is a folder on this host (a plain directory, a kernel NFS mount, an NfsShare's cache): what
    models and versions it holds, their configs, and their model files, verified."""

    def __init__(self, share_dir: str | os.PathLike):
        self.share_dir = Path(share_dir)
        self.models_dir = self.share_dir / MODELS_DIR

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.share_dir)!r})"

    def model_dir(self, name: str) -> Path:
        return self.share_dir / model_path(name)

    def model_names(self) -> list[str]:
        """Models with a config.json (a folder without one is a first publish in progress, or not a model)."""
        try:
            entries = sub_folders(self.models_dir)
        except FileNotFoundError:
            return []
        return [name for name in model_names_of(entries) if (self.models_dir / name / CONFIG_FILE).is_file()]

    def versions(self, name: str) -> list[int]:
        """The model's versions (the rule: see the module docstring); none for a model that does not exist."""
        try:
            return versions_of(sub_folders(self.model_dir(name)))
        except (FileNotFoundError, NotADirectoryError):
            return []

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
            raise RepositoryError(f"model '{name}': cannot read {path}: {describe_error(exc)}") from exc
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
            raise RepositoryError(
                f"model '{name}' version {version}: cannot read {path}: {describe_error(exc)}"
            ) from None
        check_digest(path, files[CONFIG_FILE], f"model '{name}' version {version}", raw)
        try:
            return ModelConfig.from_dict(json.loads(raw), name=name)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"{path} is not valid JSON: {exc}") from None
        except RepositoryError as exc:
            raise RepositoryError(f"{path}: {exc}") from None

    def version_config(self, name: str, version: int) -> ModelConfig:
        """The config published with this version (sha256-checked against its manifest); RepositoryError."""
        return self._version_config(name, version, self._manifest(name, version))

    def model_file_size(self, name: str, version: int) -> int:
        """Bytes of the version's model file, as listed in its manifest (0 when it lists none or it is gone)."""
        folder, files = self._version_dir(name, version), self._manifest(name, version)
        try:
            return max((folder / f).stat().st_size for f in MODEL_FILES if f in files)
        except (OSError, ValueError):
            return 0

    def _version_dir(self, name: str, version: int) -> Path:
        return self.share_dir / version_path(name, version)

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
            raise RepositoryError(
                f"model '{name}' version {version}: no model file ({' or '.join(MODEL_FILES)}) in {folder}"
            )
        if len(present) > 1:
            raise RepositoryError(
                f"model '{name}' version {version}: both model.pt and model.pt2 in {folder}; "
                f"set 'platform' in config.json"
            )
        return present[0]

    def _manifest(self, name: str, version: int) -> dict[str, str]:
        folder = self._version_dir(name, version)
        where = f"model '{name}' version {version}"
        if not folder.is_dir():
            raise RepositoryError(f"{where}: no such version folder {folder}")
        return read_manifest(folder, where)

    def verify(self, name: str, version: int) -> dict[str, str]:
        """Check every file the manifest lists against its sha256; returns the manifest's file -> sha256 map."""
        files = self._manifest(name, version)
        folder = self._version_dir(name, version)
        where = f"model '{name}' version {version}"
        if not any(f in files for f in MODEL_FILES if (folder / f).is_file()):
            raise RepositoryError(f"{where}: {MANIFEST_FILE} does not list the model file")
        for fname, digest in files.items():
            check_digest(folder / fname, digest, where)
        return files

    def read_model(self, name: str, version: int, reader: Callable[[Path], Any] | None = None) -> ModelBytes:
        """The version's model file and config, every file checked against the manifest. The model file is hashed
        from the very bytes returned, so a file swapped between the check and the load cannot slip through.
        `reader(path)` (default Path.read_bytes) may return any buffer that cannot change once returned."""
        where = f"model '{name}' version {version}"
        files = self._manifest(name, version)
        config = self._version_config(name, version, files)
        path, platform = self._model_file(name, version, config.platform)
        if path.name not in files:
            raise RepositoryError(f"{where}: {MANIFEST_FILE} does not list {path.name}; refusing to load it unverified")
        for fname, digest in files.items():
            if fname != path.name:
                check_digest(path.parent / fname, digest, where)
        try:
            data = path.read_bytes() if reader is None else reader(path)
        except OSError as exc:
            raise RepositoryError(f"{where}: cannot read {path}: {describe_error(exc)}") from None
        check_digest(path, files[path.name], where, data)
        check_model_file(path.name, data, f"{where}: {path}")  # again here: the share may be written by others

        def read_file(fname: str) -> Any:
            other = path.parent / fname
            if fname not in files:
                raise RepositoryError(f"{where}: {MANIFEST_FILE} does not list {fname}; refusing to load it unverified")
            try:
                content = other.read_bytes() if reader is None else reader(other)
            except OSError as exc:
                raise RepositoryError(f"{where}: cannot read {other}: {describe_error(exc)}") from None
            check_digest(other, files[fname], where, content)
            check_model_file(fname, content, f"{where}: {other}")  # a package's layout, compiled.json's schema
            return content

        return ModelBytes(name, version, replace(config, platform=platform), path, data, dict(files), read_file)
