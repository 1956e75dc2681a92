"""`cluster deploy` fails fast (issue 18 point 9): with no manager at --manager it says so within seconds, before it
sends or publishes anything; a config or name it or the manager refuses is refused before the model file is sent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import DEPLOY_CHECK_TIMEOUT_S
from cluster.errors import BadRequestError
from cluster.manager.client import ManagerClient
from tests.harness import REPO_ROOT

CONFIG = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def nothing_listening() -> str:
    """The address of a port on 127.0.0.1 that nothing listens on (the OS picked it free, and we let it go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def files(tmp_path):
    model, config = tmp_path / "model.pt", tmp_path / "config.json"
    model.write_bytes(b"not a model, never sent")
    config.write_text(json.dumps(CONFIG))
    return model, config


@pytest.mark.parametrize("with_share", [False, True])
def test_deploy_with_no_manager_says_so_within_seconds_and_sends_nothing(files, tmp_path, with_share):
    model, config = files
    share = tmp_path / "share"
    share.mkdir()
    args = ["deploy", str(model), "--name", "m", "--config", str(config), "--manager", nothing_listening()]
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "cluster", *args, *(["--share", str(share)] if with_share else [])],
        capture_output=True,
        text=True,
        timeout=60,  # the old deploy waited out --timeout + 120 s (7 minutes) here
        cwd=REPO_ROOT,
    )
    took = time.monotonic() - start
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no answer from the manager at tcp://127.0.0.1:" in out.stderr and "is it running" in out.stderr, out.stderr
    assert took < DEPLOY_CHECK_TIMEOUT_S + 15, f"took {took:.1f} s"
    assert "sending" not in out.stdout and list(share.iterdir()) == [], "nothing sent or published"


def test_rollback_with_no_manager_says_so_within_seconds():
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "rollback", "m", "--manager", nothing_listening()],
        capture_output=True,
        text=True,
        timeout=60,  # the old rollback waited out --timeout + 30 s
        cwd=REPO_ROOT,
    )
    took = time.monotonic() - start
    assert out.returncode == 2 and "cannot roll back: no answer from the manager" in out.stderr, out.stderr
    assert took < DEPLOY_CHECK_TIMEOUT_S + 15, f"took {took:.1f} s"


class Recorder:
    """Stands in for ManagerClient.call: records (what, bytes sent, fields); publish_check answers `check`."""

    def __init__(self, check: Exception | None = None) -> None:
        self.calls: list[tuple] = []
        self.check = check

    def __call__(self, what, timeout=5.0, data=None, **fields):  # an instance on the class: never bound
        self.calls.append((what, None if data is None else len(data), fields))
        if what == "publish_check" and self.check is not None:
            raise self.check
        return {"ok": True}


@pytest.mark.parametrize(
    "config, says",
    [
        ({**CONFIG, "inputs": [{"name": "x", "datatype": "FP33", "shape": [-1, 4]}]}, "datatype 'FP33'"),
        ({**CONFIG, "inputs": [{"name": "x", "datatype": "FP32", "shape": "4"}]}, "shape"),
        ([1, 2], "a config is a JSON object"),
    ],
)
def test_a_bad_config_is_refused_before_the_manager_is_asked(files, monkeypatch, config, says):
    model, config_file = files
    config_file.write_text(json.dumps(config))
    recorder = Recorder()
    monkeypatch.setattr(ManagerClient, "call", recorder)
    out = CliRunner().invoke(app, ["deploy", str(model), "--name", "m", "--config", str(config_file)])
    assert out.exit_code == 2 and "is not a model config" in out.output and says in out.output, out.output
    assert recorder.calls == [], "nothing reached the manager"


def test_a_bad_name_is_refused_before_the_manager_is_asked(files, monkeypatch):
    model, config_file = files
    recorder = Recorder()
    monkeypatch.setattr(ManagerClient, "call", recorder)
    out = CliRunner().invoke(app, ["deploy", str(model), "--name", ".hidden", "--config", str(config_file)])
    assert out.exit_code == 2 and "invalid model name '.hidden'" in out.output, out.output
    assert recorder.calls == []


def test_what_the_manager_refuses_is_refused_before_the_file_is_sent(files, monkeypatch):
    model, _ = files
    recorder = Recorder(
        check=BadRequestError("'fresh' is a new model: give its config (inputs, outputs) with the file")
    )
    monkeypatch.setattr(ManagerClient, "call", recorder)
    out = CliRunner().invoke(app, ["deploy", str(model), "--name", "fresh"])
    assert out.exit_code == 2 and "cannot deploy: 'fresh' is a new model" in out.output, out.output
    assert recorder.calls == [("publish_check", None, {"name": "fresh", "file": "model.pt", "config": None})]
