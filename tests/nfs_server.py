"""A real NFS server for tests, on machines without kernel NFS: nfs-ganesha (userspace) plus rpcbind, on 127.0.0.1.

    from tests.nfs_server import ganesha_server, nfs_available
    ok, reason = nfs_available()
    if not ok: pytest.skip(reason)
    with ganesha_server(export_dir, workdir) as url:     # "nfs://127.0.0.1/export"
        ...

Why it looks the way it does (details in shared/reference/nfs-userspace.md):
* Graceless and a fresh RecoveryRoot: otherwise NFSv4 OPENs fail with NFS4ERR_GRACE for up to 90 s after start.
* Readiness is an actual read (`nfs-cat` of a probe file over NFSv3): listing can succeed while reads still fail.
* rpcbind (needed by NFSv3) is one per machine: an already running one is reused and left alone; one we start is
  stopped by us, and the files it leaves in /run are removed.
* Ports 2049 (NFS), 20048 (mountd) and 111 (rpcbind) are fixed, so one server runs at a time on a machine.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

BIND = "127.0.0.1"
NFS_PORT = 2049
RPCBIND_SOCKET = "/run/rpcbind.sock"
# What the daemons leave behind in /run; we remove those that were not there before we started them.
RPCBIND_LEFTOVERS = ("/run/rpcbind.lock", "/run/rpcbind.sock", "/run/rpcbind/rpcbind.xdr", "/run/rpcbind/portmap.xdr")
# /run/ganesha is created even with krb5 off; libblkid (ganesha's VFS plugin asks it for file system ids) adds its cache
GANESHA_LEFTOVERS = ("/run/ganesha", "/run/blkid/blkid.tab", "/run/blkid/blkid.tab.old", "/run/blkid")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0  # ganesha takes ~2 s to shut down cleanly


def plugin_dir() -> str | None:
    """Where the Debian package puts ganesha's FSAL plugins (the compiled-in default /usr/lib64/ganesha is wrong)."""
    found = sorted(glob.glob("/usr/lib/*/ganesha/libfsalvfs.so")) + sorted(glob.glob("/usr/lib*/ganesha/libfsalvfs.so"))
    return os.path.dirname(found[0]) if found else None


def nfs_available() -> tuple[bool, str]:
    """(True, "") when ganesha, its VFS plugin, rpcbind and the libnfs tools are installed, else (False, why)."""
    missing = [tool for tool in ("ganesha.nfsd", "rpcbind", "nfs-cat", "nfs-ls", "nfs-cp") if not shutil.which(tool)]
    if missing:
        return (
            False,
            f"not installed: {', '.join(missing)} (apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils)",
        )
    if plugin_dir() is None:
        return (
            False,
            "ganesha's VFS plugin libfsalvfs.so not found under /usr/lib/*/ganesha (apt-get install nfs-ganesha-vfs)",
        )
    return True, ""


def _connects(family: int, address) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
            return True
        except OSError:
            return False


def rpcbind_running() -> bool:
    """A live rpcbind answers on its unix socket; a stale socket file from a dead one refuses the connection."""
    return _connects(socket.AF_UNIX, RPCBIND_SOCKET)


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `condition` until true; fail early if `proc` exits, and show the end of its log either way."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:g} s{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(text)


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; by pid, never by name."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def ganesha_config(export_dir: Path, recovery_dir: Path, bind: str = BIND) -> str:
    return f"""
NFS_CORE_PARAM {{
    Bind_addr = {bind};
    NFS_Port = {NFS_PORT};  MNT_Port = 20048;
    Protocols = 3, 4;
    Enable_NLM = false;  Enable_RQUOTA = false;  Enable_UDP = false;
    mount_path_pseudo = true;
    Plugins_Dir = {plugin_dir()};
}}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSv4 {{
    Graceless = true;
    Lease_Lifetime = 10;
    RecoveryBackend = fs;  RecoveryRoot = {recovery_dir};
    Only_Numeric_Owners = true;
}}
EXPORT {{
    Export_Id = 1;  Path = {export_dir};  Pseudo = /export;
    Access_Type = RW;  Squash = No_Root_Squash;  SecType = sys;
    Protocols = 3, 4;  Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
"""


@contextlib.contextmanager
def ganesha_server(export_dir: str | os.PathLike, workdir: str | os.PathLike, bind: str = BIND) -> Iterator[str]:
    """Serve `export_dir` as nfs://<bind>/export for the duration of the block; config, logs and state go to
    `workdir`. Both daemons run as our children in their own process groups and are stopped by pid on exit."""
    export_dir, workdir = Path(export_dir).resolve(), Path(workdir)
    ok, reason = nfs_available()
    if not ok:
        raise RuntimeError(reason)
    if _connects(socket.AF_INET, (bind, NFS_PORT)):
        raise RuntimeError(f"{bind}:{NFS_PORT} is already in use: another NFS server runs here (stop it first)")
    workdir.mkdir(parents=True, exist_ok=True)
    recovery = workdir / "recovery"
    shutil.rmtree(recovery, ignore_errors=True)  # stale client records would bring back the grace period
    recovery.mkdir()
    conf = workdir / "ganesha.conf"
    conf.write_text(ganesha_config(export_dir, recovery, bind))
    url = f"nfs://{bind}/export"

    procs: list[subprocess.Popen] = []  # in start order; stopped in reverse
    ours: list[str] = []  # leftover paths that did not exist before we started the daemons
    try:
        if not rpcbind_running():
            ours += [p for p in RPCBIND_LEFTOVERS if not os.path.lexists(p)]
            rpc_log = workdir / "rpcbind.log"
            with open(rpc_log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        ["rpcbind", "-f"],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
            _wait_for(rpcbind_running, START_TIMEOUT, "rpcbind", procs[-1], rpc_log)
        ours += [p for p in GANESHA_LEFTOVERS if not os.path.lexists(p)]
        log = workdir / "ganesha.log"
        log.unlink(missing_ok=True)  # ganesha appends; the error check below must see this run's lines only
        with open(workdir / "ganesha.out", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        "ganesha.nfsd",
                        "-F",
                        "-f",
                        str(conf),
                        "-L",
                        str(log),
                        "-p",
                        str(workdir / "ganesha.pid"),
                        "-N",
                        "NIV_EVENT",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

        token = uuid.uuid4().hex
        probe = export_dir / f".probe-{token}"
        probe.write_text(token)
        probe_url = f"{url}/{probe.name}?version=3"

        def answers() -> bool:
            # A config error (e.g. a wrong Plugins_Dir) does not stop ganesha: it runs on with no export at all.
            if log.exists() and ":CONFIG :CRIT :" in log.read_text(errors="replace"):
                raise RuntimeError(f"ganesha.nfsd rejected {conf}{_tail(log)}")
            try:
                done = subprocess.run(["nfs-cat", probe_url], capture_output=True, timeout=5)
            except subprocess.TimeoutExpired:
                return False
            return done.returncode == 0 and done.stdout.decode(errors="replace") == token

        try:
            _wait_for(answers, START_TIMEOUT, f"ganesha serving {export_dir} at {url}", procs[-1], log)
        finally:
            probe.unlink(missing_ok=True)
        yield url
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        for path in ours:  # files before the folders that hold them
            with contextlib.suppress(OSError):  # a folder goes only if empty: never what another program keeps there
                os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
