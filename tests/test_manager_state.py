"""The manager's I/O shell in-process (issue 18 points 4, 8, 9): the real `Manager` handling queries and carrying
out rollouts on a tmp share, its answers and events captured (no loop, no other process). A desired state the share
refuses is undone and answered with the error; a bad model name in a publish is answered; publish_check judges a
publish before its file is sent. On real processes: tests/test_deploy.py::test_a_deploy_whose_state_cannot_be_saved*.
"""

from __future__ import annotations

import errno
import itertools
import json
import time

import pytest

from cluster import protocol
from cluster.config import Addresses
from cluster.desired import DEPLOYMENTS_FILE, DesiredState, ModelDeployment
from cluster.manager.manager import Manager
from cluster.protocol import Command
from cluster.role_settings import ManagerSettings

_ids = itertools.count()
CONFIG = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


@pytest.fixture
def share(tmp_path):
    """m v1 deployed, v2 on the share too (empty version folders are versions to the manager)."""
    for version in (1, 2):
        (tmp_path / "models" / "m" / str(version)).mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text(json.dumps(CONFIG))
    DesiredState({"m": ModelDeployment(1)}, generation=1).save(tmp_path)
    return tmp_path


@pytest.fixture
def manager(share):
    n = next(_ids)
    fields = ("broker_clients", "broker_agents", "manager_events", "manager_heartbeats", "manager_queries")
    manager = Manager(
        ManagerSettings(share=str(share), addresses=Addresses(**{f: f"inproc://state-{n}-{f}" for f in fields}))
    )
    manager.sent, manager.events_sent = [], []  # (command, header) answered; desired states published
    manager.answer = lambda peer, reply: manager.sent.append(
        (protocol.parse_preamble(reply[0]), protocol.unpack_header(reply[1]))
    )
    manager.publish = lambda event: manager.events_sent.append(event)
    yield manager
    manager.close()


def query(manager: Manager, what: str, data: bytes | None = None, **fields) -> tuple[Command, dict]:
    """One query through the manager's handler; its answer (None for one answered later)."""
    before = len(manager.sent)
    frames = [b"peer", *protocol.message(Command.QUERY, {"id": 7, "what": what, **fields})]
    manager.process_query(frames if data is None else [*frames, data])
    return manager.sent[before] if len(manager.sent) > before else None


def break_the_state_file(share) -> None:
    """A folder where deployments.json belongs: every save (temp file, rename over it) fails with EISDIR, even as
    root, while the rest of the share stays readable."""
    (share / DEPLOYMENTS_FILE).unlink()
    (share / DEPLOYMENTS_FILE).mkdir()


def last_desired(manager: Manager) -> dict:
    return [e for e in manager.events_sent if e["event"] == "desired"][-1]["state"]["models"]


def test_a_deploy_the_share_cannot_record_is_refused_with_the_path_and_undone(manager, share):
    break_the_state_file(share)
    cmd, header = query(manager, "deploy", name="m", version=2)
    path = share / DEPLOYMENTS_FILE
    assert cmd == Command.ERROR and header["code"] == "INTERNAL", header
    assert f"could not save the desired state to {path}: Is a directory" in header["message"], header
    assert "every agent keeps serving v1" in header["message"], header
    assert manager.deployments.rollouts == {} and manager.deployments.desired.models == {"m": ModelDeployment(1)}
    assert last_desired(manager)["m"]["staged"] is None, "agents are never told to stage v2"
    cmd, header = query(manager, "undeploy", name="m")
    assert cmd == Command.ERROR and "'m' is unchanged: could not save" in header["message"], header
    assert query(manager, "deployments")[1]["result"]["m"]["version"] == 1, "still answering"

    path.rmdir()  # the share is writable again: the next deploy goes ahead (nothing was left in progress)
    assert query(manager, "deploy", name="m", version=2) is None and manager.deployments.rollouts["m"].version == 2
    assert DesiredState.load(share).models["m"].staged == 2


def test_a_switch_the_share_cannot_record_unstages_everywhere_and_is_saved_when_it_can_be(manager, share):
    assert query(manager, "deploy", name="m", version=2) is None  # staging saved and published
    assert last_desired(manager)["m"]["staged"] == 2
    break_the_state_file(share)
    manager.carry_out(manager.deployments.tick(time.monotonic()))  # no agents: staged everywhere -> switch
    cmd, header = manager.sent[-1]
    assert cmd == Command.ERROR and "rollout of 'm' v2 undone: could not save the desired state" in header["message"]
    assert last_desired(manager)["m"] == {"version": 1, "staged": None, "history": []}, "agents drop v2"
    assert manager.deployments.rollouts == {} and manager._unsaved  # the file still says staged 2

    (share / DEPLOYMENTS_FILE).rmdir()
    manager.save_desired()  # what the loop does every STATE_SAVE_RETRY_S while unsaved
    saved = DesiredState.load(share).models["m"]
    assert (saved.version, saved.staged) == (1, None) and not manager._unsaved


def test_a_full_share_is_named_too(manager, share, monkeypatch):
    def full(self, share_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DesiredState, "save", full)
    cmd, header = query(manager, "deploy", name="m", version=2)
    assert cmd == Command.ERROR and header["message"].startswith(
        f"rollout of 'm' v2 undone: could not save the desired state to {share / DEPLOYMENTS_FILE}: No space left"
    ), header


def test_a_manager_starting_on_a_share_it_cannot_write_serves_and_a_rollout_it_lost_is_not_resumed(share, monkeypatch):
    DesiredState({"m": ModelDeployment(1, staged=2), "new": ModelDeployment(None, staged=1)}, 4).save(share)
    manager = Manager(ManagerSettings(share=str(share), addresses=Addresses(manager_queries="inproc://state-start")))
    try:
        assert manager.deployments.desired.models == {"m": ModelDeployment(1)}
        assert DesiredState.load(share).models == {"m": ModelDeployment(1)}, "agents drop the staged versions"
    finally:
        manager.close()

    def full(self, share_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    (share / DEPLOYMENTS_FILE).unlink()  # it would save the share's newest versions, and cannot: it starts anyway
    monkeypatch.setattr(DesiredState, "save", full)
    manager = Manager(ManagerSettings(share=str(share), addresses=Addresses(manager_queries="inproc://state-start2")))
    try:
        assert manager._unsaved and manager.deployments.desired.models == {"m": ModelDeployment(2)}
    finally:
        manager.close()


def test_publish_with_an_invalid_name_is_answered_bad_request(manager):
    for what, data in (("publish", b"bytes"), ("publish_check", None)):
        cmd, header = query(manager, what, data, name=".hidden", file="model.pt", config=CONFIG)
        assert cmd == Command.ERROR and header["code"] == "BAD_REQUEST", (what, header)
        assert "invalid model name '.hidden'" in header["message"], header


def test_publish_check_judges_a_publish_without_its_file(manager):
    cmd, header = query(manager, "publish_check", name="m", file="model.pt")
    assert cmd == Command.REPLY and header["result"] == {"ok": True}
    bad = {**CONFIG, "inputs": [{"name": "x", "datatype": "FP33", "shape": [-1, 4]}]}
    cmd, header = query(manager, "publish_check", name="m", file="model.pt", config=bad)
    assert cmd == Command.ERROR and header["code"] == "BAD_REQUEST" and "FP33" in header["message"], header
    cmd, header = query(manager, "publish_check", name="fresh", file="model.pt")
    assert cmd == Command.ERROR and "'fresh' is a new model: give its config" in header["message"], header
    cmd, header = query(manager, "publish_check", name="m", file="weights.bin")
    assert cmd == Command.ERROR and "model.pt" in header["message"], header
