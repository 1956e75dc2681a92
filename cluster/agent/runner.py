"""Inference workers: threads that run models, apart from the I/O thread that owns the bus sockets.

The I/O thread validates a request and puts a Job on the queue; a worker builds torch tensors over the received
frames (no copy), runs the model and pushes the answer frames to the I/O thread over an inproc socket of its own
(ZeroMQ sockets are not shared between threads). A forward pass of any length never delays a heartbeat.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import zmq

from cluster.codec import decode_tensors, encode_tensors, to_torch
from cluster.protocol import PREAMBLE, Command, ErrorCode, error_header, pack

log = logging.getLogger("cluster.agent")


@dataclass
class Job:
    route: bytes  # the broker's key, echoed in the answer
    request_id: Any  # the client's id, echoed in the answer header
    model: Any  # repository.LoadedModel
    metas: list[dict]  # validated input metas
    tensors: list  # the input frames (zmq.Frame), in meta order
    outputs: list[str] | None  # which outputs the client wants; None = all


class WorkerPool:
    """`count` threads taking Jobs from one queue; answers go out on the inproc socket at `results_addr`."""

    def __init__(self, ctx: zmq.Context, results_addr: str, agent_id: str, count: int = 1) -> None:
        self.ctx = ctx
        self.results_addr = results_addr
        self.agent_id = agent_id
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"inference-{i}", daemon=True) for i in range(max(1, count))
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self, timeout: float = 5.0) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join(timeout)

    def _work(self) -> None:
        out = self.ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(self.results_addr)
        try:
            while (job := self.jobs.get()) is not None:
                out.send_multipart(self.run(job), copy=False)
        finally:
            out.close()

    def run(self, job: Job) -> list:
        """The answer frames for one job: REPLY with the outputs, or ERROR saying why the model failed."""
        model = job.model
        try:
            arrays = decode_tensors(job.metas, job.tensors)
            device = getattr(model, "device", "cpu")
            inputs = {name: to_torch(a) if device == "cpu" else to_torch(a).to(device) for name, a in arrays.items()}
            outputs = model.infer(inputs)
            if job.outputs is not None:
                outputs = {name: outputs[name] for name in job.outputs}
            metas, frames = encode_tensors(outputs)
        except Exception as exc:  # the model's own failure: tell the client, keep serving
            log.warning("model %s v%s failed: %s: %s", model.name, model.version, type(exc).__name__, exc)
            text = f"model '{model.name}' version {model.version} failed: {type(exc).__name__}: {exc}"
            return [PREAMBLE[Command.ERROR], job.route, pack(error_header(job.request_id, ErrorCode.INFERENCE_FAILED, text, model.name))]
        header = {
            "id": job.request_id,
            "model": model.name,
            "version": model.version,
            "agent": self.agent_id,
            "outputs": metas,
        }
        return [PREAMBLE[Command.REPLY], job.route, pack(header), *frames]
