"""What a model file may hold (cluster.model_check), in-process: a real exported program loads; copies of it whose
entries torch would run (a pickled weight, pickled sample inputs, a pickled constant, a non-operator call, Python in
a sympy expression, guards_code, a native library) are refused at publish and again when an agent loads one dropped
on the share by hand, and the payload never runs. A torch.save file is told apart from TorchScript. The doors of a
real cluster (`cluster deploy`, the REST and gRPC repository routes, the share) are in
tests/test_repository_cluster.py::test_a_pt2_with_a_payload_is_refused_at_every_door."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cluster.agent.loaded_model import load_model
from cluster.repository import ModelRepository, RepositoryError, publish_upload, publish_version
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
    "python in sympy": (
        lambda good, out, marker: pt2_payloads.rewritten_program(good, out, pt2_payloads.sympy_python(marker)),
        "symbolic shape expression .* uses '__import__'|unexpected",
    ),
    "native library": (
        lambda good, out, marker: pt2_payloads.extra_entry(good, out, "data/aotinductor/model/model.so"),
        "AOTInductor compiled library",
    ),
}


def test_a_real_exported_program_passes_and_loads_without_torch_complaining(tmp_path, good_pt2, caplog):
    from cluster.model_check import check_model_file

    check_model_file("model.pt2", good_pt2.read_bytes(), "good")
    publish_version(tmp_path, "small", good_pt2, config=pt2_payloads.CONFIG)
    with caplog.at_level(logging.WARNING):
        model = load_model(ModelRepository(tmp_path), "small", 1)
    assert model.infer({"x": torch.ones(3, 4)})["y"].shape == (3, 2)
    assert not [r for r in caplog.records if "Unable to load package" in r.getMessage()], caplog.text


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
