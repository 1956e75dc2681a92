"""Loads model versions in threads of their own, so the agent keeps serving (and heartbeating) during a load.

The agent's I/O thread asks for (name, version); a loader thread fetches it from the share (over NFS into the local
cache when the share is an nfs:// address), verifies its sha256 sums, loads it and warms it up at every batch size
(loaded_model.load_model), then queues the outcome and wakes the I/O thread with one byte on an inproc socket.
config.LOAD_THREADS versions load at once, here and at start (`load_versions`): copying and hashing release the GIL,
so a small model deployed with a big one need not wait for it, and an agent serving several models is up sooner.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq

from cluster.agent.loaded_model import LoadedModel, load_model
from cluster.config import LOAD_THREADS
from cluster.repository import ModelRepository, RepositoryError
from cluster.share import Share

log = logging.getLogger("cluster.agent")


def load_version(share: Share, name: str, version: int, device: str) -> LoadedModel:
    """Fetch, verify, load and warm up one version; RepositoryError (or its ShareError) if that cannot be done."""
    share.refresh_model(name)
    share.fetch_version(name, version)
    return load_model(ModelRepository(share.local_root), name, version, device)


def try_load(share: Share, name: str, version: int, device: str) -> LoadedModel | str:
    """load_version, or the reason it failed."""
    try:
        return load_version(share, name, version, device)
    except RepositoryError as exc:  # ShareError included
        return str(exc)
    except Exception as exc:  # anything else a broken model file can raise
        return f"{type(exc).__name__}: {exc}"


def load_versions(
    share: Share, wanted: list[tuple[str, int]], device: str, threads: int = LOAD_THREADS
) -> list[tuple[str, int, LoadedModel | str]]:
    """try_load each (name, version), `threads` at once (one torch thread each; a single one runs in this thread, with
    its torch threads); outcomes in the order asked."""
    if len(wanted) <= 1 or threads <= 1:
        return [(name, version, try_load(share, name, version, device)) for name, version in wanted]
    with ThreadPoolExecutor(
        min(threads, len(wanted)), thread_name_prefix="model-loader", initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        outcomes = pool.map(lambda key: try_load(share, key[0], key[1], device), wanted)
        return [(name, version, outcome) for (name, version), outcome in zip(wanted, outcomes)]


class ModelLoader:
    def __init__(
        self, ctx: zmq.Context, wake_addr: str, share: Share, device: str, threads: int = LOAD_THREADS
    ) -> None:
        self.ctx = ctx
        self.wake_addr = wake_addr
        self.share = share
        self.device = device
        self.tasks: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        # (name, version, the LoadedModel or the error text)
        self.done: queue.SimpleQueue[tuple[str, int, object]] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"model-loader-{i}", daemon=True) for i in range(max(1, threads))
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def submit(self, name: str, version: int) -> None:
        self.tasks.put((name, version))

    def stop(self, timeout: float = 5.0) -> None:
        for _ in self.threads:
            self.tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        torch.set_num_threads(1)  # loading and warm-up must not take cores from the inference workers
        wake = self.ctx.socket(zmq.PUSH)  # one per thread: sockets are not thread-safe
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self.wake_addr)
        try:
            while (task := self.tasks.get()) is not None:
                name, version = task
                self.done.put((name, version, try_load(self.share, name, version, self.device)))
                wake.send(b"\x01")
        finally:
            wake.close()
