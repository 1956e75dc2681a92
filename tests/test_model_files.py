"""What a model file may hold (cluster.model_check), in-process: a real exported program loads; copies of it whose
entries torch would run (a pickled weight, pickled sample inputs, a pickled constant, a non-operator call, Python in
a sympy expression, guards_code, a native library) are refused at publish and again when an agent loads one dropped
on the share by hand, and the payload never runs. A torch.save file is told apart from TorchScript. The doors of a
real cluster (`cluster deploy`, the REST and gRPC repository routes, the share) are in
tests/test_repository_cluster.py::test_a_pt2_with_a_payload_is_refused_at_every_door."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch

from cluster.agent.loaded_model import load_model
from cluster.publish import publish_upload, publish_version
from cluster.repository import ModelRepository, RepositoryError
from tests import pt2_payloads

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    return pt2_payloads.exported_program(tmp_path_factory.mktemp("pt2") / "good.pt2")


BAD_FILES = {
    # name: (make(good, out, marker), what the refusal says)
    "pickled weight": (pt2_payloads.pickled_weight, "is stored as a pickle"),
    "pickled sample inputs": (pt2_payloads.pickled_sample_inputs, r"is a pickle naming (__builtin__|builtins)\.exec"),
    "opaque constant": (pt2_payloads.opaque_constant, "a Python object constant"),
    "non-operator call": (
        lambda good, out, marker: pt2_payloads.rewritten_program(good, out, pt2_payloads.non_operator),
        "calls 'torch.os.system', which is not an operator",
    ),
    "non-operator argument": (
        lambda good, out, marker: pt2_payloads.rewritten_program(good, out, pt2_payloads.operator_argument),
        "calls 'torch.os.system', which is not an operator",
    ),
    "python in sympy": (
        lambda good, out, marker: pt2_payloads.rewritten_program(good, out, pt2_payloads.sympy_python(marker)),
        "symbolic shape expression .* uses '__import__'|unexpected",
    ),
    "native library": (
        lambda good, out, marker: pt2_payloads.extra_entry(good, out, "data/aotinductor/model/model.so"),
        "AOTInductor compiled library",
    ),
}


def test_a_real_exported_program_passes_and_loads_without_torch_complaining(tmp_path, good_pt2):
    """Issue 18 point 9: torch logged "Unable to load package ... /proc/self/fd/N" on every .pt2 load, as the sealed
    copy's path does not end in .pt2 (torch's loggers write through torch's own handler: listen to the one logger)."""
    from cluster.model_check import check_model_file

    check_model_file("model.pt2", good_pt2.read_bytes(), "good")
    publish_version(tmp_path, "small", good_pt2, config=pt2_payloads.CONFIG)
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    torch_logger = logging.getLogger("torch.export.pt2_archive._package")
    torch_logger.addHandler(handler)
    try:
        model = load_model(ModelRepository(tmp_path), "small", 1)
    finally:
        torch_logger.removeHandler(handler)
    assert model.infer({"x": torch.ones(3, 4)})["y"].shape == (3, 2)
    assert not [m for m in heard if "Unable to load package" in m], heard


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_pt2_that_would_run_code_is_refused_at_publish_and_at_load(tmp_path, good_pt2, kind):
    make, says = BAD_FILES[kind]
    marker = tmp_path / "payload-ran"
    bad = make(good_pt2, tmp_path / "bad.pt2", marker)
    share = tmp_path / "share"
    with pytest.raises(RepositoryError, match=f"cannot publish model 'evil': .*({says})"):
        publish_version(share, "evil", bad, config=pt2_payloads.CONFIG)
    with pytest.raises(RepositoryError, match=says):
        publish_upload(share, "evil", "model.pt2", bad.read_bytes(), pt2_payloads.CONFIG)
    assert not (share / "models" / "evil").exists() or not ModelRepository(share).versions("evil")
    pt2_payloads.drop_on_share(share, "dropped", 1, bad, pt2_payloads.CONFIG)
    with pytest.raises(RepositoryError, match=f"model 'dropped' version 1: .*({says})"):
        load_model(ModelRepository(share), "dropped", 1)
    assert not marker.exists(), f"the payload of the {kind} ran"


def test_guards_code_in_a_program_is_never_run(tmp_path, good_pt2):
    """guards_code is Python source that ExportedProgram.module() compiles into the module it builds: the agent
    builds the module without it, so a program carrying it loads and serves, and the code never runs."""
    marker = tmp_path / "payload-ran"
    bad = pt2_payloads.rewritten_program(good_pt2, tmp_path / "guards.pt2", pt2_payloads.guards(marker))
    publish_version(tmp_path, "guarded", bad, config=pt2_payloads.CONFIG)
    model = load_model(ModelRepository(tmp_path), "guarded", 1)  # warms up: runs the module once
    assert model.infer({"x": torch.ones(3, 4)})["y"].shape == (3, 2)
    assert not marker.exists(), "guards_code from the file ran"


def test_sample_inputs_are_loaded_weights_only_before_torch_sees_them(tmp_path, good_pt2, monkeypatch):
    """Defence in depth: were the static scan to let a bad pickle through, the agent's own weights_only=True load
    refuses it, so torch's weights_only=False fallback is never reached."""
    import cluster.repository

    marker = tmp_path / "payload-ran"
    bad = pt2_payloads.pickled_sample_inputs(good_pt2, tmp_path / "bad.pt2", marker)
    pt2_payloads.drop_on_share(tmp_path, "dropped", 1, bad, pt2_payloads.CONFIG)
    monkeypatch.setattr(cluster.repository, "check_model_file", lambda *args: None)
    with pytest.raises(RepositoryError, match="sample inputs are not plain tensors"):
        load_model(ModelRepository(tmp_path), "dropped", 1)
    assert not marker.exists()


def test_a_torch_save_file_is_told_apart_from_torchscript(tmp_path, good_pt2):
    state = tmp_path / "state.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), state)
    with pytest.raises(RepositoryError, match=r"is a torch\.save file .* not TorchScript or torch\.export; .*jit"):
        publish_version(tmp_path, "m", state, config=pt2_payloads.CONFIG)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(RepositoryError, match=r"is a pickle .*torch\.export\.save"):
        publish_version(tmp_path, "m", legacy, config=pt2_payloads.CONFIG)
    with pytest.raises(RepositoryError, match=r"is a torch\.save file"):
        publish_version(tmp_path, "m", state.rename(tmp_path / "state.pt2"), config=pt2_payloads.CONFIG)
    misnamed = tmp_path / "program.pt"
    misnamed.write_bytes(good_pt2.read_bytes())
    with pytest.raises(RepositoryError, match="is a torch.export program, not TorchScript: publish it as a .pt2"):
        publish_version(tmp_path, "m", misnamed, config=pt2_payloads.CONFIG)


def test_a_program_saved_by_a_torch_below_the_floor_is_refused_with_the_torch_to_re_save_it_on(tmp_path, good_pt2):
    """torch.export.save pickles the weights before torch 2.9 (torch 2.8: data/weights/model.pt; 2.7 and older: a
    flat zip of serialized_*.pt), which the check refuses: the refusal says so, and which torch writes a file it
    admits. Both layouts are built as those torch releases write them (entry names from their torch/export)."""
    root, entries = pt2_payloads._entries(good_pt2)
    kept = {name: data for name, data in entries.items() if not name.startswith(("data/weights/", "data/constants/"))}
    state = pt2_payloads._torch_save({"linear.weight": torch.zeros(2, 4), "linear.bias": torch.zeros(2)})
    kept.update({"data/weights/model.pt": state, "data/constants/model.pt": pt2_payloads._torch_save({})})
    torch_2_8 = pt2_payloads._write(tmp_path / "torch-2.8.pt2", root, kept)
    with pytest.raises(RepositoryError, match=r"as torch 2\.8 saves it, whose weights are a pickle; .* torch >= 2\.9"):
        publish_version(tmp_path / "share", "old", torch_2_8, config=pt2_payloads.CONFIG)
    torch_2_7 = tmp_path / "torch-2.7.pt2"
    with zipfile.ZipFile(torch_2_7, "w") as archive:  # what torch 2.7's torch.export.save writes
        archive.writestr("serialized_exported_program.json", entries["models/model.json"])
        for name in ("state_dict", "constants", "example_inputs"):
            archive.writestr(f"serialized_{name}.pt", state)
        archive.writestr("version", "8.8")
    with pytest.raises(RepositoryError, match=r"in the pre-2\.8 format, .* on torch >= 2\.9"):
        publish_version(tmp_path / "share", "old", torch_2_7, config=pt2_payloads.CONFIG)
    assert not (tmp_path / "share" / "models" / "old").exists()


class Flatten(torch.nn.Module):
    """Takes batches of [3, 8, 8] images."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        return self.linear(torch.flatten(x, 1))


def test_a_warmup_failure_says_the_error_line_the_shapes_and_the_batch_dimension(tmp_path):
    """Issue 18 point 9: a Triton user's config (shape [3, 8, 8], max_batch_size 8) for a model that takes batches:
    TorchScript's error runs to a page of traceback with the error on its last line; the message keeps that line,
    says the warm-up inputs' shapes and that our shapes include the batch dimension."""
    model = tmp_path / "flatten.pt"
    torch.jit.save(torch.jit.script(Flatten().eval()), str(model))
    config = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 8, 8]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
        "max_batch_size": 8,
    }
    publish_version(tmp_path, "triton-habit", model, config=config)
    with pytest.raises(RepositoryError) as info:
        load_model(ModelRepository(tmp_path), "triton-habit", 1)
    text = str(info.value)
    assert "mat1 and mat2 shapes cannot be multiplied (3x64 and 192x10)" in text, text
    assert "warm-up failed on zeros shaped as config.json says ('x' FP32 [3, 8, 8])" in text, text
    assert "include the batch dimension" in text and "'x' has shape [-1, 3, 8, 8]" in text, text
    assert "Traceback of TorchScript" not in text and len(text) < 1000, text


TRITON_PBTXT = """
name: "resnet"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1000 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
"""


def test_a_tritons_config_pbtxt_is_read(tmp_path):
    """Issue 18 point 9: Triton's config.pbtxt (protobuf text) is read with the ModelConfig message tritonclient
    ships (a dependency) and becomes ours: the batch dimension Triton's dims leave out comes back as -1."""
    from cluster.model_config import ModelConfig, read_config_file

    path = tmp_path / "config.pbtxt"
    path.write_text(TRITON_PBTXT)
    config = read_config_file(path, "resnet")
    assert config == {
        "name": "resnet",
        "platform": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1000]}],
        "max_batch_size": 8,
        "max_queue_delay_us": 100,
        "instances": 2,
    }, config
    ModelConfig.from_dict(config, name="resnet")
    path.write_text('name: "resnet"\ninput [ { nmae: "x" } ]\n')  # a typo
    with pytest.raises(RepositoryError, match=r"config.pbtxt is neither JSON nor Triton's config.pbtxt .*nmae"):
        read_config_file(path, "resnet")
    (tmp_path / "config.json").write_text(json.dumps(pt2_payloads.CONFIG))
    assert read_config_file(tmp_path / "config.json") == pt2_payloads.CONFIG
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(RepositoryError, match="broken.json is not valid JSON"):
        read_config_file(tmp_path / "broken.json")


def test_cluster_deploy_takes_a_config_pbtxt(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    (tmp_path / "config.pbtxt").write_text(TRITON_PBTXT)
    (tmp_path / "model.pt").write_bytes(b"unused: the config is read first")
    args = ["deploy", str(tmp_path / "model.pt"), "--name", "resnet", "--config", str(tmp_path / "config.pbtxt")]
    manager = ["--manager", f"ipc://{tmp_path}/no-manager", "--timeout=-29.5", "--share", str(tmp_path / "share")]
    result = CliRunner().invoke(app, args + manager)
    assert "is not a model config" not in result.output and "Expecting value" not in result.output, result.output
    (tmp_path / "config.pbtxt").write_text("input [ { nmae: 1 } ]")
    result = CliRunner().invoke(app, args + manager)
    assert result.exit_code == 2 and "is neither JSON nor Triton's config.pbtxt" in result.output, result.output


SAME_FAILURE = {
    "model": "resnet",
    "version": 2,
    "previous": 1,
    "ok": False,
    "seconds": 1.5,
    "agents": {"agent-1": "warm-up failed: X", "agent-2": "warm-up failed: X", "agent-3": "sha256 mismatch"},
}


def test_a_failure_every_agent_shares_is_said_once(capsys):
    """Issue 18 point 9: a model that cannot load fails the same way on every agent: `cluster deploy` prints the
    reason once (each other agent: 'the same as ...'), and the edge's 400 names the agents with one reason each."""
    from cluster.cli import _print_rollout
    from tests.test_edge_app import FakeManager
    from tests.test_edge_repository import edge_client, load_body

    _print_rollout(SAME_FAILURE, "deploy")
    out = capsys.readouterr().out
    assert out.count("warm-up failed: X") == 1 and "the same as agent-1" in out and "sha256 mismatch" in out, out

    manager = FakeManager()

    async def report(what, timeout=5.0, data=None, **fields):
        return SAME_FAILURE

    manager.call = report
    with edge_client(manager) as http:
        error = http.post("/v2/repository/models/resnet/load", json=load_body(**{"file:2/model.pt": b"x"})).json()
    assert "agent-1, agent-2: warm-up failed: X; agent-3: sha256 mismatch" in error["error"], error
