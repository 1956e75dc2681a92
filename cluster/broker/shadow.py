"""The broker's comparison thread: shadow answer pairs (canary.ShadowPair) compared off the broker's loop.

The loop hands each pair over with `submit` (never blocks: past SHADOW_COMPARE_QUEUE pairs waiting, the pair is
dropped and counted); the thread calls cluster.canary.compare.compare on it into a fresh ShadowDigest and adds that
to the run's digest under the split's lock (the loop takes it to read a digest's wire form), so a comparison never
holds the lock for long and a failed one counts nothing but "not compared". The pair holds the answers' frames as
received (bytes and zmq.Frame, which keep their buffers alive) until it has been compared.
"""

from __future__ import annotations

import logging
import queue
import threading

from cluster.canary import compare as comparison
from cluster.canary.digest import ShadowDigest
from cluster.config import SHADOW_COMPARE_QUEUE
from cluster.logs import BadInputLog

log = logging.getLogger("cluster.broker")
failures = BadInputLog(log, per_second=1)  # a comparison that raises says so, rate-limited

STOP_TIMEOUT_S = 2.0  # close() waits this long at most for a comparison in progress


class ShadowComparer:
    def __init__(self, split, limit: int = SHADOW_COMPARE_QUEUE) -> None:
        self.split = split  # its lock guards the digests; its `not_compared` counts what was not compared
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, limit))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, pair) -> None:
        """From the broker's loop: compare this pair soon (the thread starts with the first one)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow-compare", daemon=True)
            self._thread.start()
        try:
            self.queue.put_nowait(pair)
        except queue.Full:
            self.split.not_compared["queue full"] += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass  # busy: it sees the stop after the pair in hand
        self._thread.join(STOP_TIMEOUT_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            pair = self.queue.get()
            if pair is None:
                return
            self.compare(pair)

    def compare(self, pair) -> bool:
        """Compare one pair into its digest; False (counted "compare failed") if the comparison raised."""
        counted = ShadowDigest()
        try:
            comparison.compare(pair.stable, pair.mirrored, counted, pair.criteria)
        except Exception as exc:  # noqa: BLE001 - one bad pair must not stop the thread
            self.split.not_compared["compare failed"] += 1
            failures.warning("shadow comparison of model %s failed: %r", pair.run.model, exc)
            return False
        finally:
            pair.stable = pair.mirrored = None  # the answers' memory goes now
        with self.split.lock:
            pair.into.add(counted)
        return True
