"""The agent's view of the model share, whether it is a local folder or only reachable over NFS.

On real machines the share is a kernel NFS mount (or a plain folder), and the rest of the code reads
`<share>/models/...` directly. Where nothing can be mounted (containers, VMs without the nfs kernel module), an agent
can still read the share straight over NFS with the userspace libnfs tools (`nfs-ls`, `nfs-cat`, `nfs-cp`), mirroring
what it needs into a local cache laid out exactly like the share. Either way `Share.local_root` is a folder with the
share's layout, so `cluster.repository.ModelRepository(share.local_root)` works unchanged.

    share = open_share("nfs://10.0.0.5/export")        # or "/mnt/share", or "file:///mnt/share"
    share.refresh_model("mnist")                        # config.json into the cache
    folder = share.fetch_version("mnist", max(share.list_versions("mnist")))

Every rule about what the share holds (layout, model names, what a version is, manifests, digests, atomic writes)
is cluster.repository's; this module only reaches the files. Errors: ShareError when the share cannot be reached or
read; RepositoryError (ShareError's base class) when what it holds breaks a rule, e.g. a bad name or a file whose
sha256 is not its manifest's. `except RepositoryError` catches both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from cluster.atomic import atomic_write
from cluster.repository import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODELS_DIR,
    RepositoryError,
    check_digest,
    model_names_of,
    model_path,
    parse_manifest,
    sub_folders,
    verify_folder,
    version_path,
    versions_of,
)
from cluster.settings import xdg_dir


class ShareError(RepositoryError):
    """The share cannot be reached or read (a folder that cannot be listed, an NFS tool that fails or hangs, an
    address that is not a share); the message says what and where."""


def _check_relpath(relpath: str) -> str:
    """read_text takes paths relative to the share root; refuse anything that could climb out of it."""
    parts = Path(relpath).parts
    if not parts or Path(relpath).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ShareError(f"invalid share path {relpath!r} (must be relative, without '.' or '..')")
    return "/".join(parts)


class Share:
    """A model share as the agent sees it: `local_root` holds `models/<name>/...` once the model has been fetched."""

    local_root: Path

    def list_models(self) -> list[str]:
        """Folder names under models/ that are model names (cluster.repository.model_names_of), sorted."""
        raise NotImplementedError

    def list_versions(self, name: str) -> list[int]:
        """The model's versions by the one rule (cluster.repository.versions_of: canonical decimal folder names)."""
        raise NotImplementedError

    def read_text(self, relpath: str) -> str:
        raise NotImplementedError

    def refresh_model(self, name: str) -> None:
        """Bring `local_root/models/<name>/config.json` up to date with the share."""

    def fetch_version(self, name: str, version: int) -> Path:
        """The local folder holding a complete copy of the version (downloading and verifying it if needed)."""
        raise NotImplementedError


class LocalShare(Share):
    """A share that is already a folder on this host: a plain directory or a kernel NFS mount. Nothing is copied."""

    def __init__(self, root: str | os.PathLike):
        self.local_root = Path(root)

    def __repr__(self) -> str:
        return f"LocalShare({str(self.local_root)!r})"

    def _entries(self, folder: Path) -> list[str]:
        try:
            return sub_folders(folder)
        except OSError as exc:
            raise ShareError(f"cannot list {folder}: {exc}") from None

    def list_models(self) -> list[str]:
        return model_names_of(self._entries(self.local_root / MODELS_DIR))

    def list_versions(self, name: str) -> list[int]:
        return versions_of(self._entries(self.local_root / model_path(name)))

    def read_text(self, relpath: str) -> str:
        path = self.local_root / _check_relpath(relpath)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ShareError(f"cannot read {path}: {exc}") from None

    def fetch_version(self, name: str, version: int) -> Path:
        folder = self.local_root / version_path(name, version)
        if not folder.is_dir():
            raise ShareError(f"model '{name}' has no version {version} at {folder}")
        return folder


class NfsShare(Share):
    """A share read over NFS from userspace (libnfs-utils), mirrored on demand into a local cache folder.

    Every tool call has a deadline, since a dead NFS server otherwise hangs the agent forever. NFSv3 is the default:
    Debian's libnfs 4.0 has NFSv4 bugs (writes over ~3.9 KB fail) and v3 I/O is not held up by a server's grace
    period after a restart."""

    def __init__(self, url: str, cache_dir: str | os.PathLike, timeout: float = 30.0, copy_timeout: float = 600.0):
        parts = urlsplit(url)
        if parts.scheme != "nfs" or not parts.netloc or parts.path in ("", "/"):
            raise ShareError(f"not an NFS share address: {url!r} (expected nfs://host/export[/subpath])")
        query = dict(parse_qsl(parts.query))
        query.setdefault("version", "3")
        self.url = url
        self._base = f"nfs://{parts.netloc}{parts.path.rstrip('/')}"
        self._query = urlencode(query)
        self.local_root = Path(cache_dir)
        self.timeout = timeout  # listings and small files
        self.copy_timeout = copy_timeout  # one model file (large)

    def __repr__(self) -> str:
        return f"NfsShare({self.url!r}, cache_dir={str(self.local_root)!r})"

    def _url(self, relpath: str) -> str:
        return f"{self._base}/{relpath}?{self._query}"

    def _run(self, args: list[str], timeout: float) -> bytes:
        try:
            done = subprocess.run(args, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ShareError(f"{' '.join(args)}: no answer within {timeout:g} s") from None
        except FileNotFoundError:
            raise ShareError(f"{args[0]} not found: install libnfs-utils to read nfs:// shares") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
            if "MNT3ERR_ACCES" in err:  # libnfs mounts the URL's folder itself, so a missing folder reads as this
                err += "\n(the folder does not exist on the share, or the server does not let this host mount it)"
            raise ShareError(f"{' '.join(args)}: {err}")
        return done.stdout

    def _list_dirs(self, relpath: str) -> list[str]:
        """Names of the sub-folders of a share folder (`nfs-ls` prints `mode nlink uid gid size name` per entry)."""
        out = self._run(["nfs-ls", self._url(relpath)], self.timeout).decode(errors="replace")
        fields = (line.split(None, 5) for line in out.splitlines())
        return [f[5] for f in fields if len(f) == 6 and f[0].startswith("d")]

    def list_models(self) -> list[str]:
        return model_names_of(self._list_dirs(MODELS_DIR))

    def list_versions(self, name: str) -> list[int]:
        return versions_of(self._list_dirs(model_path(name)))

    def read_text(self, relpath: str) -> str:
        data = self._run(["nfs-cat", self._url(_check_relpath(relpath))], self.timeout)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ShareError(f"{self._url(relpath)}: not UTF-8 text: {exc}") from None

    def refresh_model(self, name: str) -> None:
        """Copy config.json into the cache, replacing the old one atomically (readers never see half a file)."""
        relpath = f"{model_path(name)}/{CONFIG_FILE}"
        data = self._run(["nfs-cat", self._url(relpath)], self.timeout)
        target = self.local_root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data, mode=0o644)  # 0644 whatever the umask: agents running as other users read it

    def fetch_version(self, name: str, version: int) -> Path:
        """Download into a dot-named temp folder, verify every sha256, then rename into place.

        The cache therefore only ever holds complete, verified versions (published versions are immutable, so a
        verified copy is reused without asking the server). A cached copy that no longer verifies is replaced."""
        relpath = version_path(name, version)
        dest = self.local_root / relpath
        if dest.is_dir():
            try:
                verify_folder(dest, f"cached copy of model '{name}' version {version}")
                return dest
            except RepositoryError:
                shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
        try:
            manifest_url = self._url(f"{relpath}/{MANIFEST_FILE}")
            manifest = self._run(["nfs-cat", manifest_url], self.timeout)
            files = parse_manifest(manifest, manifest_url)
            (tmp / MANIFEST_FILE).write_bytes(manifest)
            for fname, expected in files.items():
                url = self._url(f"{relpath}/{fname}")
                # nfs-cp refuses to overwrite a local file, and streams to disk where nfs-cat would go through memory
                self._run(["nfs-cp", url, str(tmp / fname)], self.copy_timeout)
                check_digest(tmp / fname, expected, url)
                os.chmod(tmp / fname, 0o644)  # nfs-cp creates 0640: agents running as other users could not read it
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the folder from agents running as other users
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():  # otherwise another process sharing this cache finished the same download first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def default_cache_dir(url: str) -> Path:
    """One cache folder per share address under the user's cache dir, so two shares never mix their files."""
    base = xdg_dir("XDG_CACHE_HOME", ".cache")
    return Path(base) / "cluster" / "shares" / hashlib.sha256(url.encode()).hexdigest()[:16]


def open_share(location: str, cache_dir: str | os.PathLike | None = None) -> Share:
    """A Share for a folder path, a file:// URL or an nfs://host/export[/subpath][?version=N] address."""
    scheme = urlsplit(location).scheme if "://" in location else ""
    if scheme == "":
        return LocalShare(location)
    if scheme == "file":
        return LocalShare(unquote(urlsplit(location).path))
    if scheme == "nfs":
        return NfsShare(location, cache_dir if cache_dir is not None else default_cache_dir(location))
    raise ShareError(f"unsupported share address {location!r} (a folder, file:///path or nfs://host/export)")
