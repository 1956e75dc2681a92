"""Answers across a broker restart (issue 18 point 2), measured on real processes:

    PYTHONPATH=. python3 bench/foreign_answers.py [tries]

Each try: a client sends a ~10 s `slow` request and leaves; the broker is killed and started again on the same port;
a fresh client asks the same agent (queued behind the slow one). Counts how often it got the earlier client's tensor."""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import zmq

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import protocol
from cluster.protocol import Command
from tests.harness import LocalCluster, wait_for
from tests.models import publish_slow, slow_rounds_per_second

META = [{"name": "x", "datatype": "FP32", "shape": [1, 1]}, {"name": "n", "datatype": "INT64", "shape": [1]}]


def view(client):
    return next((a for a in client.agents(timeout=2) if a["id"] == "slow-agent"), None)


def main(tries: int) -> None:
    work = Path(tempfile.mkdtemp())
    share = work / "share"
    share.mkdir()
    (share / "models").mkdir()
    publish_slow(share)
    rounds = int(slow_rounds_per_second() * 10)
    cluster = LocalCluster(share, work / "logs")
    foreign = own = other = 0
    try:
        cluster.start_manager()
        broker = cluster.start_broker()
        cluster.start_agent("slow-agent", "--models", "slow")
        cluster.wait_for_agents(1, model="slow", timeout=120)
        ctx = zmq.Context()
        for t in range(tries):
            if t:  # every try starts on a fresh broker, as the first: the leaving client's request is its first
                cluster.kill(broker)
                broker = cluster.start_broker()
                w = cluster.client()
                wait_for(lambda w=w: view(w), 30, "agent registered")
                w.close()
            first = ctx.socket(zmq.DEALER)
            first.setsockopt(zmq.LINGER, 1000)
            first.connect(cluster.addresses.broker_clients)
            header = {"id": 1, "model": "slow", "timeout": 120, "inputs": META}
            tensors = [np.full((1, 1), 100.0 + t, np.float32).tobytes(), np.array([rounds], np.int64).tobytes()]
            first.send_multipart(protocol.message(Command.REQUEST, header, tensors))
            first.close()
            watcher = cluster.client()
            wait_for(
                lambda watcher=watcher: (view(watcher) or {}).get("in_flight", 0) >= 1, 20, "slow request at the agent"
            )
            watcher.close()
            cluster.kill(broker)
            broker = cluster.start_broker()
            watcher = cluster.client()
            v = wait_for(lambda watcher=watcher: view(watcher), 30, "agent registered again")
            still = v["in_flight"] >= 1
            fresh = cluster.client()  # its first request has id 1, as the leaving client's had
            try:
                y = fresh.infer("slow", {"x": np.full((1, 1), 200.0 + t, np.float32), "n": np.array([1])}, timeout=40)
                got = float(y.as_numpy("y")[0, 0])
            except Exception as exc:
                got = repr(exc)[:80]
            if got == 200.0 + t:
                own += 1
            elif got == 100.0 + t:
                foreign += 1
            else:
                other += 1
            print(
                f"try {t + 1}: slow request still running at the restart: {still}; fresh client got {got}", flush=True
            )
            fresh.close()
            # let the agent finish whatever is left before the next try
            wait_for(lambda watcher=watcher: (view(watcher) or {}).get("in_flight", 1) == 0, 60, "agent idle")
            watcher.close()
        ctx.term()
    finally:
        cluster.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"fresh client got the earlier client's tensor in {foreign} of {tries} tries, its own in {own}, other {other}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
