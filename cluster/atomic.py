"""Durable, atomic file writes: a reader sees the old content or the new, never a partial file, and a rename is on
disk before the writer goes on. The share's publishes, the key directory, the desired deployments and the ready
files all write this way; it sits below them all (plain os calls, no cluster imports).
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
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


def write_new_file(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Create `path` (must not exist), write and fsync it. Its mode is 0666 & ~umask (not mkstemp's 0600, which other
    hosts' agents could not read), or exactly `mode` when given."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Replace `path` so that readers see the old or the new content, never a partial file: a dot-named temp file
    next to it, fsync, rename over the old one, fsync the folder."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(8)}"
    try:
        write_new_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
