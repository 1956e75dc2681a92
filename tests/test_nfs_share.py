"""The share as agents see it: a local folder, or a real NFS server (nfs-ganesha) read with the libnfs tools.

The NFS tests (marked `nfs`) serve a temp folder with nfs-ganesha on 127.0.0.1 (tests/nfs_server.py); they skip only
where ganesha, rpcbind or libnfs-utils are not installed. One server per class: it needs ports 2049/20048/111, so the
server of TestNfsShare must be gone before test_setup_script_userspace starts its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cluster.repository import RepositoryError
from cluster.share import LocalShare, NfsShare, ShareError, open_share
from tests.nfs_server import ganesha_server, nfs_available, rpcbind_running

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "nfs" / "setup_nfs.sh"
MODEL_BYTES = bytes(range(256)) * 40 + b"tail"  # 10 KB of known bytes; not a real model (nothing loads it here)
CONFIG = {
    "name": "tiny",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def publish(share: Path, name: str, version: int, data: bytes) -> Path:
    """Lay out one model version as the publisher does (config, version folder, manifest with sha256)."""
    folder = share / "models" / name / str(version)
    folder.mkdir(parents=True)
    (share / "models" / name / "config.json").write_text(json.dumps({**CONFIG, "name": name}))
    (folder / "model.pt").write_bytes(data)
    manifest = {"files": {"model.pt": hashlib.sha256(data).hexdigest()}, "created": "2024-01-01T00:00:00+00:00"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_share(root: Path) -> Path:
    """A share with model 'tiny' version 1, plus things an agent must ignore: a publish in progress (.tmp-xyz),
    a non-numeric folder, and a dot-folder among the models."""
    publish(root, "tiny", 1, MODEL_BYTES)
    tmp = root / "models" / "tiny" / ".tmp-xyz"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"half written")
    (root / "models" / "tiny" / "notes").mkdir()
    (root / "models" / ".tmp-abc").mkdir()
    return root


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    """True once `pid` has exited (a zombie waiting for PID 1 to reap it counts as exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def require_nfs() -> None:
    ok, reason = nfs_available()
    if not ok:
        pytest.skip(reason)


# --- local share -------------------------------------------------------------------------------------------------


def test_local_share(tmp_path):
    root = make_share(tmp_path / "share")
    for location in (str(root), f"file://{root}"):
        share = open_share(location)
        assert isinstance(share, LocalShare) and share.local_root == root
        assert share.list_models() == ["tiny"]
        assert share.list_versions("tiny") == [1]  # not .tmp-xyz, not notes
        share.refresh_model("tiny")  # nothing to do locally
        assert share.fetch_version("tiny", 1) == root / "models" / "tiny" / "1"
        assert json.loads(share.read_text("models/tiny/config.json"))["name"] == "tiny"
    with pytest.raises(ShareError, match="version 2"):
        share.fetch_version("tiny", 2)
    with pytest.raises(RepositoryError, match="invalid model name"):  # a rule of the repository, not an access error
        share.list_versions("../etc")
    assert issubclass(ShareError, RepositoryError)  # so callers catch both with one except
    with pytest.raises(ShareError, match="invalid share path"):
        share.read_text("../outside")


def test_dead_server_times_out(tmp_path):
    """A server that accepts connections and never answers must not hang the agent: every tool call has a deadline.
    (nfsport/mountport point libnfs straight at our silent socket, so this needs no NFS server; the URL's other
    query arguments reach the tools untouched.)"""
    if not shutil.which("nfs-ls"):
        pytest.skip("nfs-ls not installed (apt-get install libnfs-utils)")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        share = NfsShare(f"nfs://127.0.0.1/export?nfsport={port}&mountport={port}", tmp_path / "cache", timeout=0.5)
        started = time.monotonic()
        no_answer = r"(?s)nfs-ls nfs://127\.0\.0\.1/export/models\?nfsport=.*version=3.*no answer within 0\.5 s"
        with pytest.raises(ShareError, match=no_answer):
            share.list_models()
        assert time.monotonic() - started < 5


def test_open_share_rejects_other_schemes():
    with pytest.raises(ShareError, match="unsupported"):
        open_share("http://host/share")
    with pytest.raises(ShareError, match="not an NFS share address"):
        open_share("nfs://host")


# --- NFS share over a real server --------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def nfs_export(tmp_path_factory):
    """(url, export folder): ganesha serving a share with model 'tiny' v1, for every test of the class."""
    require_nfs()
    base = tmp_path_factory.mktemp("nfs")
    export = make_share(base / "export")
    with ganesha_server(export, base / "server") as url:
        yield url, export


@pytest.mark.nfs
@pytest.mark.usefixtures("nfs_export")
class TestNfsShare:
    def test_list_and_fetch(self, nfs_export, tmp_path):
        url, export = nfs_export
        assert url == "nfs://127.0.0.1/export"
        share = open_share(url, cache_dir=tmp_path / "cache")
        assert isinstance(share, NfsShare) and share.local_root == tmp_path / "cache"
        assert share.list_models() == ["tiny"]  # not .tmp-abc
        assert share.list_versions("tiny") == [1]  # not .tmp-xyz, not notes

        share.refresh_model("tiny")
        config = share.local_root / "models" / "tiny" / "config.json"
        assert json.loads(config.read_text())["name"] == "tiny"
        assert json.loads(share.read_text("models/tiny/config.json")) == json.loads(config.read_text())

        folder = share.fetch_version("tiny", 1)
        assert folder == share.local_root / "models" / "tiny" / "1"
        assert (folder / "model.pt").read_bytes() == MODEL_BYTES
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["files"]["model.pt"] == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
        assert sorted(p.name for p in (share.local_root / "models" / "tiny").iterdir()) == ["1", "config.json"]

        # A verified cached copy is used as is: same file, not downloaded again.
        inode = (folder / "model.pt").stat().st_ino
        assert share.fetch_version("tiny", 1) == folder
        assert (folder / "model.pt").stat().st_ino == inode

        # A cached copy that no longer verifies is replaced by a fresh download.
        (folder / "model.pt").write_bytes(b"rotten")
        assert (share.fetch_version("tiny", 1) / "model.pt").read_bytes() == MODEL_BYTES

    def test_tampered_file_is_refused(self, nfs_export, tmp_path):
        url, export = nfs_export
        model = export / "models" / "tiny" / "1" / "model.pt"
        original = model.read_bytes()
        try:
            with open(model, "r+b") as f:  # flip one byte on the server side, as a bad copy or an attacker would
                f.seek(100)
                f.write(bytes([original[100] ^ 0xFF]))
            share = open_share(url, cache_dir=tmp_path / "fresh-cache")
            with pytest.raises(RepositoryError, match=r"(?s)models/tiny/1/model\.pt.*sha256 mismatch"):
                share.fetch_version("tiny", 1)
            left = list((share.local_root / "models" / "tiny").iterdir())
            assert left == []  # neither the version nor its temp folder stays in the cache
        finally:
            model.write_bytes(original)

    def test_errors_carry_the_tools_message(self, nfs_export, tmp_path):
        url, export = nfs_export
        share = open_share(url, cache_dir=tmp_path / "cache")
        # libnfs mounts the folder named in the URL, so a missing folder fails the MOUNT call ("Permission denied")
        missing = (
            r"(?s)nfs-cat nfs://127\.0\.0\.1/export/models/tiny/7/manifest\.json\?version=3: .*MNT3ERR_ACCES"
            r".*does not exist"
        )
        with pytest.raises(ShareError, match=missing):
            share.fetch_version("tiny", 7)
        absent = r"(?s)nfs-ls nfs://127\.0\.0\.1/export/models/absent\?version=3: .*MNT3ERR_ACCES"
        with pytest.raises(ShareError, match=absent):
            share.list_versions("absent")
        with pytest.raises(ShareError, match="(?s)nfs-cat .*/models/absent/config.json.*MNT3ERR_ACCES"):
            share.refresh_model("absent")
        # ... while a missing file in an existing folder is a plain NOENT from the LOOKUP
        unfinished = export / "models" / "tiny" / "9"
        unfinished.mkdir()
        try:
            with pytest.raises(ShareError, match=r"(?s)nfs-cat .*/models/tiny/9/manifest\.json.*NFS3ERR_NOENT"):
                share.fetch_version("tiny", 9)
        finally:
            unfinished.rmdir()


# --- setup_nfs.sh ------------------------------------------------------------------------------------------------


def test_setup_script_syntax():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_setup_script_refuses_without_kernel_server(tmp_path):
    """Where nfs-kernel-server is missing the kernel mode must say so and change nothing (no /etc/exports line)."""
    if subprocess.run(["sh", "-c", "command -v exportfs"], capture_output=True).returncode == 0:
        pytest.skip("nfs-kernel-server is installed here: running the kernel mode would edit /etc/exports")
    if os.geteuid() != 0:
        pytest.skip("the kernel mode checks for root first")
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "export")], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "nfs-kernel-server" in done.stderr and "--userspace" in done.stderr
    assert not (tmp_path / "export").exists()


@pytest.mark.nfs
def test_setup_script_userspace(tmp_path):
    """--userspace for real: serves the folder, a second run starts nothing, --stop stops all and tidies /run."""
    require_nfs()
    state, export = tmp_path / "state", tmp_path / "export"
    run_files = ("/run/rpcbind.lock", "/run/rpcbind.sock", "/run/rpcbind/rpcbind.xdr", "/run/ganesha", "/run/blkid")
    run_files_before = {p for p in run_files if os.path.lexists(p)}
    rpcbind_before = rpcbind_running()

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120)

    started = ["--userspace", "--bind", "127.0.0.1", "--state", str(state), str(export)]
    pids: list[int] = []
    try:
        first = script(*started)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "nfs://127.0.0.1/export" in first.stdout
        pids = [int((state / f).read_text()) for f in ("ganesha.pid", "rpcbind.pid") if (state / f).exists()]
        assert (export / "models").is_dir()

        again = script(*started)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already running" in again.stdout
        assert int((state / "ganesha.pid").read_text()) == pids[0]

        publish(export, "tiny", 3, MODEL_BYTES)
        share = open_share("nfs://127.0.0.1/export", cache_dir=tmp_path / "cache")
        assert share.list_versions("tiny") == [3]
        assert (share.fetch_version("tiny", 3) / "model.pt").read_bytes() == MODEL_BYTES

        stop = script("--stop", "--state", str(state))
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert all(wait_gone(pid) for pid in pids)
        assert not (state / "ganesha.pid").exists()
        if not rpcbind_before:
            assert not rpcbind_running()
        assert {p for p in run_files if os.path.lexists(p)} <= run_files_before
    finally:
        script("--stop", "--state", str(state))
        for pid in pids:  # last resort if the script's --stop itself is broken
            if not wait_gone(pid, timeout=0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
