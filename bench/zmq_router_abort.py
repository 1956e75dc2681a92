"""Reproducer of a libzmq 4.3.5 abort (`Assertion failed: !_more (src/fq.cpp:80)`) in a ROUTER client connected to
several ROUTER brokers when one broker is killed (kill -9) under load. Standalone (pyzmq only): the driver starts
`--brokers` broker processes and one client process per run, the client kills one broker after `--before` seconds
of load, and the driver counts the runs whose client aborted (SIGABRT).

    python -m bench.zmq_router_abort --runs 40 [--immediate 0] [--no-events] [--blocking] [--brokers 3] ...

The abort under load is rare (about 1 run in 40-130 here); `half-read` makes it certain: the client's ROUTER reads
a broker's 3-frame message ahead (ZMQ_EVENTS), the broker is killed, the socket takes in its commands (ZMQ_EVENTS
again), then the message is read. With ZMQ_IMMEDIATE=1 libzmq ends the dropped connection's pipe at once (the
socket's hiccup handling) and the rest of the message is gone: abort. With 0 the message is read whole.

    python -m bench.zmq_router_abort half-read --runs 5 --immediate 1
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import subprocess
import sys
import time

import zmq


def broker(name: str, frames: int) -> None:
    payload = [b"p%d" % i * 20 for i in range(frames)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    while True:
        frames = sock.recv_multipart()
        try:
            if len(frames) == 2 and frames[1] == b"":
                sock.send_multipart([frames[0], b"H"])
            elif len(frames) >= 3:
                sock.send_multipart([frames[0], b"R", frames[2], *payload])
        except zmq.ZMQError:
            pass


def make_client(ctx, args, ports):
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    if args.handover:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if args.probe:
        sock.setsockopt(zmq.PROBE_ROUTER, 1)
    sock.setsockopt(zmq.IMMEDIATE, args.immediate)
    if args.heartbeat:
        sock.setsockopt(zmq.HEARTBEAT_IVL, 100)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 300)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED) if args.monitor else None
    for port in ports:
        sock.connect(f"tcp://127.0.0.1:{port}")
    return sock, monitor


class State:
    def __init__(self, names: list[bytes], in_flight: int) -> None:
        self.live: list[bytes] = []
        self.names = names
        self.out: dict[bytes, bytes] = {}  # request id -> broker
        self.next = 0
        self.done = 0
        self.in_flight = in_flight

    def pick(self) -> bytes | None:
        if not self.live:
            return None
        self.next += 1
        return self.live[self.next % len(self.live)]

    def lost(self, broker: bytes, post) -> None:
        """`broker` is gone: what was outstanding there is sent again (through `post`)."""
        if broker in self.live:
            self.live.remove(broker)
        for rid, b in list(self.out.items()):
            if b == broker:
                self.send(rid, post)

    def on_message(self, frames: list, post) -> None:
        """A broker's hello (it is live: waiting requests go to it) or an answer (the next request goes out)."""
        broker = frames[0]
        if frames[1] == b"H":
            if broker not in self.live:
                self.live.append(broker)
                for rid, b in list(self.out.items()):
                    if b == b"":
                        self.send(rid, post)
            return
        rid = frames[2]
        if self.out.pop(rid, None) is None:
            return
        self.done += 1
        self.send(str(self.done).encode() + b"-" + rid.split(b"-")[-1], post)

    def send(self, rid: bytes, post) -> None:
        broker = self.pick()
        if broker is None:
            self.out[rid] = b""
            return
        self.out[rid] = broker
        post(broker, [b"Q", rid, b"x" * 64])


def hello_unanswered(sock, names: list[bytes], live) -> None:
    """Without PROBE_ROUTER: an empty message to each broker that has not answered yet (it answers with its hello)."""
    for name in names:
        if name not in live:
            try:
                sock.send_multipart([name, b""], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass


async def client_async(args, ports, kill_pid) -> None:
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock, monitor = make_client(ctx, args, ports)
    names = [f"b{i}".encode() for i in range(len(ports))]
    st = State(names, args.in_flight)

    def post(broker: bytes, frames: list) -> bool:
        try:
            sent = sock.send_multipart([broker, *frames], zmq.NOBLOCK)
            exc = sent.exception() if sent.done() else None
        except zmq.ZMQError as error:
            exc = error
        if exc is None:
            return True
        if isinstance(exc, zmq.ZMQError) and exc.errno == errno.EHOSTUNREACH:
            lost(broker)
            return False
        raise exc

    def lost(broker: bytes) -> None:
        st.lost(broker, post)

    def send(rid: bytes) -> None:
        st.send(rid, post)

    async def reader() -> None:
        while True:
            st.on_message(await sock.recv_multipart(), post)

    async def checker() -> None:
        while True:
            await monitor.recv_multipart()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if args.events:
                    sock.getsockopt(zmq.EVENTS)
                for broker in list(st.live):
                    post(broker, [b""])
                await asyncio.sleep(0.005)

    async def prober() -> None:  # without PROBE_ROUTER: say hello to each broker until it answers
        while True:
            hello_unanswered(sock, names, st.live)
            await asyncio.sleep(0.02)

    tasks = [asyncio.ensure_future(reader())]
    if monitor is not None:
        tasks.append(asyncio.ensure_future(checker()))
    if not args.probe:
        tasks.append(asyncio.ensure_future(prober()))
    while len(st.live) < len(names):
        await asyncio.sleep(0.01)
    for i in range(args.in_flight):
        send(f"0-{i}".encode())
    await asyncio.sleep(args.before)
    os.kill(kill_pid, signal.SIGKILL)
    await asyncio.sleep(args.after)
    print(f"done {st.done} live {st.live}", flush=True)
    os._exit(0)


def client_blocking(args, ports, kill_pid) -> None:
    ctx = zmq.Context()
    sock, monitor = make_client(ctx, args, ports)
    names = [f"b{i}".encode() for i in range(len(ports))]
    st = State(names, args.in_flight)
    checking_until = 0.0

    def post(broker: bytes, frames: list) -> bool:
        try:
            sock.send_multipart([broker, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                lost(broker)
                return False
            raise

    def lost(broker: bytes) -> None:
        st.lost(broker, post)

    def send(rid: bytes) -> None:
        st.send(rid, post)

    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    if monitor is not None:
        poller.register(monitor, zmq.POLLIN)
    started = None
    killed = None
    last_probe = 0.0
    while True:
        now = time.monotonic()
        if not args.probe and len(st.live) < len(names) and now - last_probe > 0.02:
            last_probe = now
            hello_unanswered(sock, names, st.live)
        if started is None and len(st.live) == len(names):
            started = now
            for i in range(args.in_flight):
                send(f"0-{i}".encode())
        if started is not None and killed is None and now - started > args.before:
            killed = now
            os.kill(kill_pid, signal.SIGKILL)
        if killed is not None and now - killed > args.after:
            print(f"done {st.done} live {st.live}", flush=True)
            os._exit(0)
        if now < checking_until:
            if args.events:
                sock.getsockopt(zmq.EVENTS)
            for broker in list(st.live):
                post(broker, [b""])
        events = dict(poller.poll(5))
        if monitor is not None and monitor in events:
            monitor.recv_multipart()
            checking_until = time.monotonic() + 1.0
        if sock in events:
            for _ in range(100):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                st.on_message(frames, post)


def client(args) -> None:
    ports = [int(p) for p in args.ports.split(",")]
    if args.blocking:
        client_blocking(args, ports, args.kill)
    else:
        asyncio.run(client_async(args, ports, args.kill))


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--brokers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=3, help="frames in a reply after its id and request id")
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--immediate", type=int, default=1)
    parser.add_argument("--no-events", dest="events", action="store_false", help="no getsockopt(EVENTS) in checks")
    parser.add_argument("--no-handover", dest="handover", action="store_false")
    parser.add_argument("--no-probe", dest="probe", action="store_false")
    parser.add_argument("--no-heartbeat", dest="heartbeat", action="store_false")
    parser.add_argument("--no-monitor", dest="monitor", action="store_false")
    parser.add_argument("--blocking", action="store_true")
    parser.add_argument("--before", type=float, default=0.3)
    parser.add_argument("--after", type=float, default=0.5)


def forward(args) -> list[str]:
    out = [
        f"--brokers={args.brokers}",
        f"--frames={args.frames}",
        f"--in-flight={args.in_flight}",
        f"--immediate={args.immediate}",
    ]
    out += [f"--before={args.before}", f"--after={args.after}"]
    for flag, on in (
        ("--no-events", not args.events),
        ("--no-handover", not args.handover),
        ("--no-probe", not args.probe),
        ("--no-heartbeat", not args.heartbeat),
        ("--no-monitor", not args.monitor),
        ("--blocking", args.blocking),
    ):
        if on:
            out.append(flag)
    return out


def drive(args) -> None:
    aborts = other = 0
    for run in range(args.runs):
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "broker", f"b{i}", str(args.frames)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            for i in range(args.brokers)
        ]
        try:
            ports = [p.stdout.readline().strip().decode() for p in procs]
            child = subprocess.run(
                [sys.executable, __file__, "client", "--ports", ",".join(ports), "--kill", str(procs[0].pid)]
                + forward(args),
                capture_output=True,
                text=True,
                timeout=60,
            )
            if child.returncode == -signal.SIGABRT:
                aborts += 1
                tag = "ABORT " + (child.stderr.strip().splitlines() or [""])[0]
            elif child.returncode != 0:
                other += 1
                tag = f"rc {child.returncode} {child.stderr[-300:]}"
            else:
                tag = child.stdout.strip()
            if args.verbose or child.returncode != 0:
                print(f"run {run}: {tag}", flush=True)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    print(f"RESULT {' '.join(forward(args))}: {aborts} aborts, {other} other failures in {args.runs} runs", flush=True)


def half_read_once(immediate: int) -> None:
    proc = subprocess.Popen([sys.executable, __file__, "broker", "b0", "3"], stdout=subprocess.PIPE)
    port = proc.stdout.readline().strip().decode()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.IMMEDIATE, immediate)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    deadline = time.monotonic() + 10
    while True:  # the broker knows no name for us: say hello until our ROUTER knows it (b0)
        try:
            sock.send_multipart([b"b0", b"Q", b"1", b"x"])
            break
        except zmq.ZMQError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # read ahead: the reply's first frame
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    time.sleep(0.3)  # the disconnect reaches the socket's mailbox
    sock.getsockopt(zmq.EVENTS)  # the socket takes in its commands
    print(sock.recv_multipart(zmq.NOBLOCK), flush=True)
    os._exit(0)


def half_read(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--immediate", type=int, default=1)
    args = parser.parse_args(argv)
    aborts = 0
    for _ in range(args.runs):
        child = subprocess.run(
            [sys.executable, __file__, "half-read-once", str(args.immediate)], capture_output=True, timeout=60
        )
        aborts += child.returncode == -signal.SIGABRT
    print(f"RESULT half-read --immediate={args.immediate}: {aborts} aborts in {args.runs} runs", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "half-read":
        half_read(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "half-read-once":
        half_read_once(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "broker":
        broker(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser()
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        parser.add_argument("role")
        parser.add_argument("--ports", required=True)
        parser.add_argument("--kill", type=int, required=True)
        options(parser)
        client(parser.parse_args())
        return
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--verbose", action="store_true")
    options(parser)
    drive(parser.parse_args())


if __name__ == "__main__":
    main()
