"""The benchmarks' helper processes that are not cluster roles: baselines (a bare pyzmq echo broker and its workers,
a bare SUB socket, bare FastAPI apps, the seed design's httpx load balancer), the edge under the same uvicorn
settings as those apps, and simulators (1,000 heartbeating agents, agents that answer at once without torch).

    python3 bench/sims.py ROLE [ARGS...] [--ready-file PATH]     # started by bench.lib.start_sim, not by hand

They are started like the cluster's roles, by `cluster.local.LocalCluster.spawn`. A role that listens (LISTENING)
binds port 0 and, once it serves, writes the addresses it got to its ready file (`cluster.serving.write_ready_file`;
uvicorn servers through `cluster.serving.serve_http`), so no port is picked by bind-and-release.
"""

# no `from __future__ import annotations`: FastAPI must see the real Request type in the servers' routes
import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python3 bench/sims.py` puts bench/ first on sys.path: put the repository root there instead, so that
    # `cluster` and `edge` come from this checkout whatever the working directory
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from cluster.serving import serve_http, write_ready_file  # noqa: E402

SIM_AGENT_CAPACITY = 4
HTTP_HOST = "127.0.0.1"
# one uvicorn configuration for every HTTP server in benchmark 3: the fastest ordinary FastAPI stack, uvloop and
# httptools (what uvicorn[standard] installs, and what the edge's "auto" picks when they are there)
UVICORN_SETTINGS = dict(workers=1, loop="uvloop", http="httptools", log_level="warning", access_log=False)


# ---- the bare pyzmq bus (baseline of benchmarks 1, 2 and 5) -------------------------------------------------------


def role_bare_broker(*, ready_file: str) -> None:
    """A ROUTER-ROUTER echo broker: no protocol, no validation, frames forwarded round-robin to READY workers."""
    ctx = zmq.Context()
    clients, workers = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    clients.bind("tcp://127.0.0.1:*")
    workers.bind("tcp://127.0.0.1:*")
    write_ready_file(
        ready_file,
        "bare-broker",
        {"front": clients.getsockopt_string(zmq.LAST_ENDPOINT), "back": workers.getsockopt_string(zmq.LAST_ENDPOINT)},
    )
    ready: list[bytes] = []
    turn = 0
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if workers in events:
            frames = workers.recv_multipart()
            if frames[1] == b"READY":
                ready.append(frames[0])
            else:
                clients.send_multipart(frames[1:])
        if clients in events and ready:
            frames = clients.recv_multipart()
            worker = ready[turn % len(ready)]
            turn += 1
            workers.send_multipart([worker, *frames])


def role_bare_worker(back: str) -> None:
    """A DEALER that sends every message back as it came."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(back)
    sock.send(b"READY")
    while True:
        sock.send_multipart(sock.recv_multipart())


# ---- HTTP servers (benchmark 3) ---------------------------------------------------------------------------------


def _serve(app, ready_file: str) -> None:
    """uvicorn with UVICORN_SETTINGS on port 0 of HTTP_HOST; once it serves, the ready file says where:
    {"url": "http://host:port"}."""
    serve_http(app, HTTP_HOST, 0, ready_file=ready_file, role="url", **UVICORN_SETTINGS)


def _live_route(app) -> None:
    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}


def role_serve_edge(broker: str, *, ready_file: str) -> None:
    """Our edge (edge.app.create_app) under the same uvicorn settings as the baselines."""
    from cluster.config import Addresses
    from cluster.role_settings import EdgeSettings
    from edge.app import create_app

    _serve(create_app(EdgeSettings(addresses=Addresses(broker_clients=broker))), ready_file)


def role_serve_bare(*, ready_file: str) -> None:
    """A bare FastAPI app answering the OIP echo request itself: the same JSON parsing and encoding as the edge
    (edge/oip.py), y = x, no bus."""
    from fastapi import FastAPI, Request, Response

    app = FastAPI()
    _live_route(app)
    try:
        from edge import oip
    except Exception:
        oip = None

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        body = await request.body()
        if oip is not None:
            try:
                parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH))
            except oip.InvalidRequest as exc:
                return Response(json.dumps({"error": str(exc)}), status_code=400, media_type="application/json")
            content, headers = oip.encode_infer_response(name, 1, {"y": parsed.inputs["x"]}, parsed)
            return Response(content, headers=headers)
        request_json = json.loads(body)
        tensor = request_json["inputs"][0]
        x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        out = {
            "model_name": name,
            "model_version": "1",
            "id": request_json.get("id"),
            "outputs": [{"name": "y", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
        }
        return Response(json.dumps(out), media_type="application/json")

    _serve(app, ready_file)


def role_serve_infer(model_path: str, *, ready_file: str) -> None:
    """One of the seed design's inference servers: FastAPI + the echo TorchScript model on the request's JSON data."""
    import torch
    from fastapi import FastAPI, Request, Response

    torch.set_num_threads(1)
    model = torch.jit.load(model_path)
    app = FastAPI()
    _live_route(app)

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        body = await request.json()
        tensor = body["inputs"][0]
        x = torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])
        with torch.inference_mode():
            y = model(x)
        out = {
            "model_name": name,
            "model_version": "1",
            "id": body.get("id"),
            "outputs": [{"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1).tolist()}],
        }
        return Response(json.dumps(out), media_type="application/json")

    _serve(app, ready_file)


def role_serve_lb(upstreams: str, *, ready_file: str) -> None:
    """The seed's load balancer: FastAPI forwarding each request round-robin with one shared httpx.AsyncClient."""
    import itertools
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI, Request, Response

    urls = itertools.cycle(upstreams.split(","))
    state = {}

    @asynccontextmanager
    async def lifespan(app):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan)
    _live_route(app)

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        upstream = await state["client"].post(
            f"{next(urls)}/v2/models/{name}/infer",
            content=await request.body(),
            headers={"Content-Type": "application/json"},
        )
        return Response(upstream.content, status_code=upstream.status_code, media_type="application/json")

    _serve(app, ready_file)


# ---- simulated agents (benchmark 6) -----------------------------------------------------------------------------


def _agent_status(agent_id: str, started: float, capacity: int, models: list[dict]) -> dict:
    """A heartbeat header as a real agent sends it (the protocol's one Heartbeat type)."""
    from cluster.protocol import Heartbeat

    return Heartbeat(
        agent_id,
        capacity,
        models,
        host=socket.gethostname(),
        pid=os.getpid(),
        device="cpu",
        uptime=round(time.monotonic() - started, 3),
        started=started,
        serving_since=started,
        interval=1.0,
    ).to_wire()


def role_bare_sub(*, ready_file: str) -> None:
    """The 6a baseline: receive every beat and msgpack-decode it into a dict, nothing else."""
    import msgpack

    from cluster.protocol import PREAMBLE, Command

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, PREAMBLE[Command.HEARTBEAT])
    sock.bind("tcp://127.0.0.1:*")
    write_ready_file(ready_file, "bare-sub", {"address": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    registry = {}
    while True:
        frames = sock.recv_multipart()
        beat = msgpack.unpackb(frames[1], raw=False)
        registry[beat["agent"]] = (beat, time.monotonic())


def role_sim_beats(connect: str, count: str, interval: str) -> None:
    """`count` agents, each heartbeating every `interval` seconds, from one PUB socket, spread evenly over time."""
    from cluster.protocol import PREAMBLE, Command, pack

    count, interval = int(count), float(interval)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    for address in connect.split(","):
        sock.connect(address)
    started = time.time()
    mono = time.monotonic()
    models = [{"name": "digits", "version": 1, "default": True}, {"name": "echo", "version": 1, "default": True}]
    ids = [f"sim-{socket.gethostname()}-{i:05d}" for i in range(count)]
    slice_s = 0.01
    per_slice = max(1, round(count * slice_s / interval))
    next_at = time.monotonic()
    i = 0
    while True:
        for _ in range(per_slice):
            status = _agent_status(ids[i % count], started, SIM_AGENT_CAPACITY, models)
            status["uptime"] = round(time.monotonic() - mono, 3)
            sock.send_multipart([PREAMBLE[Command.HEARTBEAT], pack(status)])
            i += 1
        next_at += slice_s
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def role_sim_agents(broker: str, prefix: str, count: str, capacity: str) -> None:
    """`count` simulated agents on DEALER sockets: READY with `echo`, a HEARTBEAT every second, and every REQUEST
    answered at once with a valid REPLY (same tensors back, renamed y)."""
    from cluster import protocol
    from cluster.protocol import PREAMBLE, Command, pack

    count, capacity = int(count), int(capacity)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ctx = zmq.Context()
    started = time.time()
    models = [{"name": "echo", "version": 1, "default": True}]
    metadata = [
        {
            "name": "echo",
            "platform": "torchscript",
            "version": 1,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
        }
    ]
    socks = {}
    for i in range(count):
        agent_id = f"{prefix}{i:04d}"
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, agent_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.connect(broker)
        socks[sock] = agent_id

    def ready(sock) -> None:
        header = _agent_status(socks[sock], started, capacity, models)
        header["metadata"] = metadata
        sock.send_multipart(protocol.message(Command.READY, header))

    for sock in socks:
        ready(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    reply_preamble, request_preamble = PREAMBLE[Command.REPLY], PREAMBLE[Command.REQUEST]
    next_beat = time.monotonic() + 1.0
    while not stop.is_set():
        for sock, _ in poller.poll(100):
            agent_id = socks[sock]
            for _ in range(64):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                preamble = frames[0].bytes
                if preamble[: protocol.PREAMBLE_BYTES] == request_preamble:
                    header = protocol.unpack_header(frames[1])
                    outputs = [{"name": "y", "datatype": m["datatype"], "shape": m["shape"]} for m in header["inputs"]]
                    reply = {
                        "id": header["id"],
                        "model": header["model"],
                        "version": 1,
                        "agent": agent_id,
                        "outputs": outputs,
                    }
                    key = preamble[protocol.PREAMBLE_BYTES : protocol.PREAMBLE_BYTES + protocol.ROUTE_BYTES]
                    sock.send_multipart([reply_preamble + key, pack(reply), *frames[2:]], copy=False)
                elif preamble == PREAMBLE[Command.DISCONNECT]:
                    ready(sock)
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + 1.0
            for sock, agent_id in socks.items():
                beat = _agent_status(agent_id, started, capacity, models)
                sock.send_multipart(protocol.message(Command.HEARTBEAT, beat))
    for sock in socks:
        try:
            sock.send_multipart(protocol.message(Command.DISCONNECT, {"reason": "simulator stopping"}), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        sock.close(linger=100)
    ctx.term()


ROLES = {
    "bare-broker": role_bare_broker,
    "bare-worker": role_bare_worker,
    "serve-edge": role_serve_edge,
    "serve-bare": role_serve_bare,
    "serve-infer": role_serve_infer,
    "serve-lb": role_serve_lb,
    "bare-sub": role_bare_sub,
    "sim-beats": role_sim_beats,
    "sim-agents": role_sim_agents,
}

LISTENING = {"bare-broker", "serve-edge", "serve-bare", "serve-infer", "serve-lb", "bare-sub"}  # take --ready-file


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="A benchmark helper process (bench/sims.py).")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("args", nargs="*", help="the role's own arguments")
    parser.add_argument("--ready-file", help="where a listening role reports its addresses once it serves")
    options = parser.parse_args(argv)
    if (options.ready_file is not None) != (options.role in LISTENING):
        parser.error(f"--ready-file is for the roles that listen ({', '.join(sorted(LISTENING))}), and they need it")
    ready = {} if options.ready_file is None else {"ready_file": options.ready_file}
    ROLES[options.role](*options.args, **ready)


if __name__ == "__main__":
    main(sys.argv[1:])
