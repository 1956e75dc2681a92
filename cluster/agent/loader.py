"""Loads model versions in a thread of its own, so the agent keeps serving (and heartbeating) during a load.

The agent's I/O thread asks for (name, version); the loader fetches it from the share (over NFS into the local
cache when the share is an nfs:// address), verifies its sha256 sums, loads it and runs the warm-up inference, then
queues the outcome and wakes the I/O thread with one byte on an inproc socket.
"""

from __future__ import annotations

import logging
import queue
import threading

import torch
import zmq

from cluster.agent.loaded_model import LoadedModel, load_model
from cluster.repository import ModelRepository, RepositoryError
from cluster.share import Share

log = logging.getLogger("cluster.agent")


def load_version(share: Share, name: str, version: int, device: str) -> LoadedModel:
    """Fetch, verify, load and warm up one version; RepositoryError (or its ShareError) if that cannot be done."""
    share.refresh_model(name)
    share.fetch_version(name, version)
    return load_model(ModelRepository(share.local_root), name, version, device)


class ModelLoader:
    def __init__(self, ctx: zmq.Context, wake_addr: str, share: Share, device: str) -> None:
        self.ctx = ctx
        self.wake_addr = wake_addr
        self.share = share
        self.device = device
        self.tasks: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        # (name, version, the LoadedModel or the error text)
        self.done: queue.SimpleQueue[tuple[str, int, object]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name="model-loader", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, name: str, version: int) -> None:
        self.tasks.put((name, version))

    def stop(self, timeout: float = 5.0) -> None:
        self.tasks.put(None)
        self.thread.join(timeout)

    def _work(self) -> None:
        torch.set_num_threads(1)  # loading and warm-up must not take cores from the inference workers
        wake = self.ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self.wake_addr)
        try:
            while (task := self.tasks.get()) is not None:
                name, version = task
                try:
                    outcome = load_version(self.share, name, version, self.device)
                except RepositoryError as exc:  # ShareError included
                    outcome = str(exc)
                except Exception as exc:  # anything else a broken model file can raise
                    outcome = f"{type(exc).__name__}: {exc}"
                self.done.put((name, version, outcome))
                wake.send(b"\x01")
        finally:
            wake.close()
