"""The agent's view of the model share, whether it is a local folder or only reachable over NFS.

On real machines the share is a kernel NFS mount (or a plain folder), and the rest of the code reads
`<share>/models/...` directly. Where nothing can be mounted (containers, VMs without the nfs kernel module), an agent
can still read the share straight over NFS with the userspace libnfs tools (`nfs-ls`, `nfs-cat`, `nfs-cp`), mirroring
what it needs into a local cache laid out exactly like the share. Either way `Share.local_root` is a folder with the
share's layout, so `cluster.repository.ModelRepository(share.local_root)` works unchanged.

    share = open_share("nfs://10.0.0.5/export")        # or "/mnt/share", or "file:///mnt/share"
    share.refresh_model("mnist")                        # config.json into the cache
    folder = share.fetch_version("mnist", max(share.list_versions("mnist")))

Layout and naming rules are those of `cluster.repository` (kept in step by hand, because importing it here would pull
in torch for the sake of a regex): model names are folder names, versions are canonical decimal folder names, and
anything starting with '.' is a publish in progress (`.tmp-XXXX`) to be ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

MODELS_DIR = "models"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # a folder name on every host: no dot-folders, no '/'
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


class ShareError(Exception):
    """The share cannot be read, or what it holds does not match its manifest; the message says what and where."""


def _check_name(name: str) -> str:
    """Model names end up in local paths and NFS URLs, so only plain folder names are allowed."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ShareError(f"invalid model name {name!r} (letters, digits, '_', '.', '-'; at most 128)")
    return name


def _check_version(version: int) -> str:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ShareError(f"invalid version {version!r}")
    return str(version)


def version_number(entry: str) -> int | None:
    """The version a folder name stands for; None for '.tmp-XXXX' folders and anything not a canonical number."""
    if entry.isascii() and entry.isdigit() and str(int(entry)) == entry:
        return int(entry)
    return None


def _check_relpath(relpath: str) -> str:
    """read_text takes paths relative to the share root; refuse anything that could climb out of it."""
    parts = Path(relpath).parts
    if not parts or Path(relpath).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ShareError(f"invalid share path {relpath!r} (must be relative, without '.' or '..')")
    return "/".join(parts)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB models do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parse_manifest(data: bytes, where: str) -> dict[str, str]:
    """A manifest's file -> sha256 map, checked so that no entry can point outside its version folder."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShareError(f"{where}: not valid JSON: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ShareError(f"{where}: no 'files' map of file name -> sha256")
    for fname, digest in files.items():
        if not isinstance(fname, str) or fname in ("", ".", "..", MANIFEST_FILE) or "/" in fname or "\\" in fname:
            raise ShareError(f"{where}: lists {fname!r}, which is not a plain file name")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise ShareError(f"{where}: no valid sha256 for '{fname}' ({digest!r})")
    return files


def _check_digest(path: Path, expected: str, where: str) -> None:
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ShareError(f"{where}: listed in {MANIFEST_FILE} but cannot be read: {exc}") from None
    if actual != expected:
        raise ShareError(f"{where}: sha256 mismatch: manifest says {expected}, file has {actual}")


def verify_version(folder: str | os.PathLike) -> dict[str, str]:
    """Check every file the folder's manifest lists against its sha256 (ShareError naming the file if one differs).

    NfsShare checks every download this way; LocalShare.fetch_version does not (the loader hashes the bytes it
    loads anyway), but callers that want the check on a local share can call this themselves."""
    folder = Path(folder)
    try:
        data = (folder / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise ShareError(f"cannot read {folder / MANIFEST_FILE}: {exc}") from None
    files = parse_manifest(data, str(folder / MANIFEST_FILE))
    for fname, expected in files.items():
        _check_digest(folder / fname, expected, str(folder / fname))
    return files


class Share:
    """A model share as the agent sees it: `local_root` holds `models/<name>/...` once the model has been fetched."""

    local_root: Path

    def list_models(self) -> list[str]:
        raise NotImplementedError

    def list_versions(self, name: str) -> list[int]:
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
            return [e.name for e in os.scandir(folder) if e.is_dir()]
        except OSError as exc:
            raise ShareError(f"cannot list {folder}: {exc}") from None

    def list_models(self) -> list[str]:
        return sorted(e for e in self._entries(self.local_root / MODELS_DIR) if MODEL_NAME_RE.fullmatch(e))

    def list_versions(self, name: str) -> list[int]:
        entries = self._entries(self.local_root / MODELS_DIR / _check_name(name))
        return sorted(v for v in map(version_number, entries) if v is not None)

    def read_text(self, relpath: str) -> str:
        path = self.local_root / _check_relpath(relpath)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ShareError(f"cannot read {path}: {exc}") from None

    def fetch_version(self, name: str, version: int) -> Path:
        folder = self.local_root / MODELS_DIR / _check_name(name) / _check_version(version)
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
        return sorted(e for e in self._list_dirs(MODELS_DIR) if MODEL_NAME_RE.fullmatch(e))

    def list_versions(self, name: str) -> list[int]:
        entries = self._list_dirs(f"{MODELS_DIR}/{_check_name(name)}")
        return sorted(v for v in map(version_number, entries) if v is not None)

    def read_text(self, relpath: str) -> str:
        data = self._run(["nfs-cat", self._url(_check_relpath(relpath))], self.timeout)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ShareError(f"{self._url(relpath)}: not UTF-8 text: {exc}") from None

    def refresh_model(self, name: str) -> None:
        """Copy config.json into the cache, replacing the old one atomically (readers never see half a file)."""
        relpath = f"{MODELS_DIR}/{_check_name(name)}/{CONFIG_FILE}"
        data = self._run(["nfs-cat", self._url(relpath)], self.timeout)
        target = self.local_root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_FILE}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def fetch_version(self, name: str, version: int) -> Path:
        """Download into a dot-named temp folder, verify every sha256, then rename into place.

        The cache therefore only ever holds complete, verified versions (published versions are immutable, so a
        verified copy is reused without asking the server). A cached copy that no longer verifies is replaced."""
        relpath = f"{MODELS_DIR}/{_check_name(name)}/{_check_version(version)}"
        dest = self.local_root / relpath
        if dest.is_dir():
            try:
                verify_version(dest)
                return dest
            except ShareError:
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
                _check_digest(tmp / fname, expected, url)
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
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
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
