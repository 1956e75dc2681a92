"""Publishing to the model repository on the share: adding a version (a model file, or bytes a client sent) so that
readers see it complete or not at all, and taking a rejected one off again. What a model and a version are, and
reading them, is cluster/repository.py's; a publish writes by exactly those rules (a dot-named `.tmp-XXXX` folder,
fsynced, renamed to its number; a manifest of sha256 sums; the config the version was published with).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.atomic import atomic_write, fsync_dir, write_new_file
from cluster.config import COMPILE_TIMEOUT_S, MAX_VERSION, limits
from cluster.model_check import COMPILED_FILE, check_model_file
from cluster.model_config import ModelConfig, RepositoryError
from cluster.repository import (
    CHUNK,
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILES,
    PREPROCESS_FILE,
    PROGRAM_FILES,
    ModelRepository,
    check_name,
    check_version,
    is_int,
    package_file,
    versions_of,
)


def config_file_bytes(config: ModelConfig) -> bytes:
    """A config as publish_version writes it (so that equal configs have equal bytes, and equal sha256 sums)."""
    return (json.dumps(config.to_dict(), indent=2) + "\n").encode()


def publish_version(
    share_dir: str | os.PathLike,
    name: str,
    model_path: str | os.PathLike,
    config: dict | None = None,
    version: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    data: bytes | None = None,
    programs: Mapping[str, str | os.PathLike | bytes] | None = None,
    extra: Mapping[str, str | os.PathLike | bytes] | None = None,
) -> int:
    """Add a version so that agents scanning the share see it complete or not at all; returns its number.

    The model file is `model_path` (a .pt or .pt2 file), or, with `data`, those bytes under `model_path`'s name (the
    manager publishing what a client sent over the bus, e.g. a Triton load with files). The folder is built as
    <models>/<name>/.tmp-<random>/ (not a version: see the module docstring), fsynced, and renamed into place;
    rename onto an existing non-empty version fails, so two publishers cannot overwrite each other.
    `programs` (preprocess.pt2 / postprocess.pt2) and `extra` (a compiled package and compiled.json): the version's
    other files, {name in the folder: a path or the bytes}, checked by model_check and hashed into the manifest like
    the model file.
    """
    check_name(name)
    model_path = Path(model_path)
    suffix = model_path.suffix.lower()
    target_file = {".pt": "model.pt", ".pt2": "model.pt2"}.get(suffix)
    if target_file is None:
        raise RepositoryError(f"cannot publish {model_path}: expected a .pt (TorchScript) or .pt2 (torch.export) file")
    if data is None and not model_path.is_file():
        raise RepositoryError(f"cannot publish {model_path}: no such file")
    if version is not None and (not is_int(version) or not 1 <= version <= MAX_VERSION):
        raise RepositoryError(
            f"cannot publish model '{name}': version must be a number from 1 to {MAX_VERSION}, got {version!r}"
        )

    model_dir = ModelRepository(share_dir).model_dir(name)
    config_path = model_dir / CONFIG_FILE
    config_bytes = None
    if config is not None:
        parsed = ModelConfig.from_dict(config, name=name)
        expected_platform = MODEL_FILES[target_file]
        if parsed.platform is not None and parsed.platform != expected_platform:
            raise RepositoryError(
                f"cannot publish model '{name}': config says platform '{parsed.platform}' "
                f"but {model_path} is {expected_platform}"
            )
        config_bytes = config_file_bytes(parsed)
    elif not config_path.is_file():
        raise RepositoryError(f"cannot publish model '{name}': {config_path} does not exist and no config was given")
    where = f"cannot publish model '{name}': {model_path}"
    if data is not None:
        check_model_file(target_file, data, where)
    else:
        with open(model_path, "rb") as model_file:
            check_model_file(target_file, model_file, where)
    other_files = _version_files(name, {**(programs or {}), **(extra or {})})  # the bytes checked are published

    new_model_dir = not model_dir.is_dir()
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_publishes(model_dir)
    tmp = model_dir / f".tmp-{secrets.token_hex(8)}"
    wrote_config = False
    published = False
    try:
        os.mkdir(tmp, 0o777)  # not mkdtemp: its 0700 would hide the version from agents running as other users
        total = len(data) if data is not None else model_path.stat().st_size
        h = hashlib.sha256()
        done = 0
        if progress is not None:
            progress(0, total)
        fd = os.open(tmp / target_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with _chunks(model_path, data) as chunks, os.fdopen(fd, "wb", closefd=False) as dst:
                for chunk in chunks:
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
        for fname, content in other_files.items():
            write_new_file(tmp / fname, content)
            manifest["files"][fname] = hashlib.sha256(content).hexdigest()
        # Each version keeps the config it was published with, so a later version's config.json cannot change
        # what an older version's inputs and outputs are (a rollback gets exactly what was deployed before).
        version_config = config_bytes if config_bytes is not None else config_path.read_bytes()
        write_new_file(tmp / CONFIG_FILE, version_config)
        manifest["files"][CONFIG_FILE] = hashlib.sha256(version_config).hexdigest()
        write_new_file(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        fsync_dir(tmp)

        if config_bytes is not None:
            wrote_config = not config_path.exists()
            atomic_write(config_path, config_bytes)

        for _ in range(100):
            number = version
            if number is None:
                number = max(versions_of(os.listdir(model_dir)), default=0) + 1
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
        published = True
        fsync_dir(model_dir)
        return number
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not published and new_model_dir:  # a failed first publish leaves no empty model behind
            if wrote_config:
                config_path.unlink(missing_ok=True)
            try:
                model_dir.rmdir()  # only if empty: another publisher of the same new model may be at work in it
            except OSError:
                pass


def program_names(value: Any) -> list[str]:
    """A publish's `programs` header field (the files sent after the model file): distinct PROGRAM_FILES names."""
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or not all(isinstance(v, str) for v in value)
        or len(set(value)) != len(value)
        or not set(value) <= set(PROGRAM_FILES)
    ):
        raise RepositoryError(f"'programs' must list distinct names from {', '.join(PROGRAM_FILES)}, got {value!r}")
    return value


def _version_files(name: str, files: Mapping[str, str | os.PathLike | bytes]) -> dict[str, bytes]:
    """A version's other files (preprocess.pt2 / postprocess.pt2, a compiled package and compiled.json), each a path
    or its bytes: read once and checked by model_check, so the bytes checked are the bytes published."""
    allowed = (*PROGRAM_FILES, COMPILED_FILE, package_file("cpu"), package_file("cuda"))
    out = {}
    for fname, source in files.items():
        if fname not in allowed:
            raise RepositoryError(f"cannot publish model '{name}': {fname!r} is not one of {', '.join(allowed)}")
        try:
            content = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
        except OSError as exc:
            raise RepositoryError(f"cannot publish model '{name}': cannot read {source}: {exc}") from None
        check_model_file(fname, content, f"cannot publish model '{name}': {fname}")
        out[fname] = content
    return out


def remove_stale_publishes(model_dir: Path, older_than: float | None = None) -> list[str]:
    """Remove the `.tmp-*` (and `.rejected-*`) folders in a model's folder that nothing touched for `older_than`
    seconds: a publisher (or remove_version) killed mid-way; a live one touches its folder as it writes files.
    Returns their names."""
    older_than = limits().stale_publish_seconds if older_than is None else older_than
    removed = []
    now = time.time()
    try:
        entries = [
            e
            for e in os.scandir(model_dir)
            if e.name.startswith((".tmp-", ".rejected-")) and e.is_dir(follow_symlinks=False)
        ]
    except OSError:
        return removed
    for entry in entries:
        try:
            touched = max([entry.stat().st_mtime] + [f.stat().st_mtime for f in os.scandir(entry.path)])
        except OSError:
            continue  # gone already, or being removed by another publisher
        if now - touched > older_than:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


@contextmanager
def _chunks(path: Path, data: bytes | None) -> Iterator[Iterable[bytes | memoryview]]:
    """The model file's content in CHUNK-sized pieces: from `data` when given, else read from `path`."""
    if data is not None:
        view = memoryview(data)
        yield (view[i : i + CHUNK] for i in range(0, len(view), CHUNK))
        return
    with open(path, "rb") as src:
        yield iter(lambda: src.read(CHUNK), b"")


def compile_refusal(file_name: str, device: Any) -> str:
    """Why an upload cannot be compiled by this (torch-free) process's host; "" when it can."""
    if device not in ("cpu", "cuda"):
        return f"'compile' must be cpu or cuda (or true: cpu), got {str(device)[:40]!r}"
    if file_name != "model.pt2":
        return "only an exported program (model.pt2) can be compiled, not TorchScript"
    if importlib.util.find_spec("torch") is None:
        return "the manager's host has no torch to compile with: compile where the model is published, with " \
            "`cluster deploy MODEL.pt2 --compile --share SHARE`"  # fmt: skip
    return ""


def compile_upload(
    share_dir: Path, name: str, data: bytes, config: dict | None, device: str, folder: Path, preprocess: bool = False
) -> dict:
    """Compile an upload in a child process (`python -m cluster.compile`: torch stays out of the caller) with a
    deadline; {file name: path} of the package and compiled.json, in `folder`. RepositoryError if it fails."""
    program, config_path = folder / "model.pt2", folder / CONFIG_FILE
    program.write_bytes(data)
    parsed = (
        ModelConfig.from_dict(config, name=name) if config is not None else ModelRepository(share_dir).read_config(name)
    )
    config_path.write_bytes(config_file_bytes(parsed))
    argv = [sys.executable, "-m", "cluster.compile", str(program), str(config_path), str(folder), "--device", device]
    argv += ["--preprocess"] if preprocess else []  # the model's inputs are preprocess.pt2's outputs
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RepositoryError(f"cannot compile model '{name}': it took longer than {COMPILE_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RepositoryError(f"cannot compile model '{name}': {tail.removeprefix('error: ')[:1500]}")
    return {package_file(device): folder / package_file(device), COMPILED_FILE: folder / COMPILED_FILE}


def publish_upload(
    share_dir: str | os.PathLike,
    name: str,
    file_name: str,
    data: bytes,
    config: dict | None = None,
    version: int | None = None,
    programs: Mapping[str, bytes] | None = None,
    compile_for: str | None = None,
) -> tuple[int, bool]:
    """Publish a model file that arrived as bytes (the manager, for a client without the share); returns
    (version, published). Versions never change once published, so: asked for a version that exists with these very
    bytes (and this config, when one is given), that version is reused (published False: loading the same files
    twice is a no-op); one that exists with other content gets the next free number instead; a version not yet on
    the share is published under the number asked for. `compile_for` ("cpu", "cuda"): compiled first
    (compile_upload), unless the version asked for has these files and a package for that device kind already."""
    check_name(name)
    if file_name not in MODEL_FILES:
        raise RepositoryError(
            f"cannot publish model '{name}': the model file must be named {' or '.join(MODEL_FILES)}, got {file_name!r}"
        )
    repo = ModelRepository(share_dir)
    if version is not None and version in repo.versions(name):
        try:
            files = repo.verify(name, version)
        except RepositoryError:
            files = {}
        sent = {file_name: data, **(programs or {})}
        same_model = {f: files.get(f) for f in (file_name, *PROGRAM_FILES)} == {
            f: hashlib.sha256(sent[f]).hexdigest() if f in sent else None for f in (file_name, *PROGRAM_FILES)
        }
        same_config = config is None or (
            files.get(CONFIG_FILE)
            == hashlib.sha256(config_file_bytes(ModelConfig.from_dict(config, name=name))).hexdigest()
        )
        compiled = compile_for is None or package_file(compile_for) in files  # a compile asked: has that package
        if same_model and same_config and compiled:
            return version, False
        version = None  # taken by other content: the next number
    if compile_for is not None:
        with tempfile.TemporaryDirectory(prefix="cluster-compile-") as folder:
            preprocess = PREPROCESS_FILE in (programs or {})
            extra = compile_upload(Path(share_dir), name, data, config, compile_for, Path(folder), preprocess)
            published = publish_version(
                share_dir, name, file_name, config, version, data=data, programs=programs, extra=extra
            )
            return published, True
    return publish_version(share_dir, name, file_name, config, version, data=data, programs=programs), True


def remove_version(share_dir: str | os.PathLike, name: str, version: int, *, whole_model: bool = False) -> None:
    """Take a version off the share (one that a failed rollout rejected, just after it was published): renamed to a
    dot-folder first, so that no reader ever sees half of it, then deleted. `whole_model`: the model's folder goes
    too (a brand-new model whose first version was rejected leaves nothing behind)."""
    check_name(name)
    model_dir = ModelRepository(share_dir).model_dir(name)
    doomed = model_dir if whole_model else model_dir / str(check_version(name, version))
    parking = (model_dir.parent if whole_model else model_dir) / f".rejected-{secrets.token_hex(8)}"
    try:
        os.rename(doomed, parking)
    except FileNotFoundError:
        return
    fsync_dir(parking.parent)
    shutil.rmtree(parking, ignore_errors=True)
