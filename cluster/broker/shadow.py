"""The broker's comparison thread: shadow answer pairs (canary.ShadowPair) compared off the broker's loop.

The loop hands each pair over with `submit` (never blocks: past SHADOW_COMPARE_QUEUE pairs, or SHADOW_COMPARE_BYTES
of their answers, waiting, the pair is dropped and counted: large outputs must not pile up in the broker); the
thread calls cluster.canary.compare.compare on it into a fresh ShadowDigest and adds that to the run's digest
under the split's lock (the loop takes it to read a digest's wire form), so a comparison never holds the lock for
long and a failed one counts nothing but "not compared". The pair holds the answers' frames as received (bytes and
zmq.Frame, which keep their buffers alive) until it has been compared.
"""

from __future__ import annotations

import logging
import queue
import threading

from cluster.canary import compare as comparison
from cluster.canary.digest import ShadowDigest
from cluster.config import SHADOW_COMPARE_BYTES, SHADOW_COMPARE_QUEUE
from cluster.logs import BadInputLog

log = logging.getLogger("cluster.broker")
failures = BadInputLog(log, per_second=1)  # a comparison that raises says so, rate-limited

STOP_TIMEOUT_S = 2.0  # close() waits this long at most for a comparison in progress


class ShadowComparer:
    def __init__(self, split, limit: int = SHADOW_COMPARE_QUEUE, max_bytes: int = SHADOW_COMPARE_BYTES) -> None:
        self.split = split  # its lock guards the digests; its `not_compared` counts what was not compared
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, limit))  # (pair, its answers' bytes)
        self.max_bytes = max_bytes
        self.queued_bytes = 0  # the answers' bytes queued or in the thread's hands (the loop adds, the thread takes)
        self._bytes_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, pair) -> None:
        """From the broker's loop: compare this pair soon (the thread starts with the first one)."""
        size = sum(len(f) for f in pair.stable) + sum(len(f) for f in pair.mirrored)
        with self._bytes_lock:
            room = not self.queued_bytes or self.queued_bytes + size <= self.max_bytes
            if room:
                self.queued_bytes += size
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow-compare", daemon=True)
            self._thread.start()
        try:
            if not room:
                raise queue.Full
            self.queue.put_nowait((pair, size))
        except queue.Full:
            self.split.not_compared["queue full"] += 1
            pair.stable = pair.mirrored = None
            if room:
                self._taken(size)

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
            item = self.queue.get()
            if item is None:
                return
            try:
                self.compare(item[0])
            finally:
                self._taken(item[1])

    def _taken(self, size: int) -> None:
        with self._bytes_lock:
            self.queued_bytes -= size

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
