"""Model repository: config validation, input checks, the share's rules (names, versions, atomic writes), atomic
publishing, verification and safe loading (cluster.model_config, cluster.repository, cluster.agent.loaded_model).

Everything runs on tmp_path shares; digits is trained once per module (a few seconds on one core).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
from datetime import datetime

import numpy as np
import pytest
import torch

from cluster.agent.loaded_model import LoadedModel, load_model
from cluster.atomic import atomic_write
from cluster.codec import datatype_of
from cluster.config import MAX_VERSION
from cluster.demo_models import (
    DIGITS_CONFIG,
    ECHO_CONFIG,
    TEST_SIZE,
    digits_split,
    make_echo,
    train_digits,
    write_demo_models,
)
from cluster.model_config import InputError, ModelConfig, TensorSpec
from cluster.publish import publish_upload, publish_version
from cluster.repository import ModelRepository, RepositoryError, sha256_file
from cluster.share import LocalShare

# torch 2.13 deprecates torch.jit, but TorchScript is one of the two formats the repository serves.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _script_file(tmp_path, module: torch.nn.Module, filename: str = "model.pt") -> str:
    path = tmp_path / "src" / filename
    path.parent.mkdir(exist_ok=True)
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return str(path)


def _echo_file(tmp_path) -> str:
    path = tmp_path / "src" / "echo.pt"
    path.parent.mkdir(exist_ok=True)
    torch.jit.save(make_echo(), str(path))
    return str(path)


def _config(**changes) -> dict:
    d = copy.deepcopy(ECHO_CONFIG)
    d.update(changes)
    return d


class TwoOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x + 1


class DictOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"double": x * 2, "y": x}


class Flatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)


class TwoInputs(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - b


# ---------------------------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_metadata():
    cfg = ModelConfig.from_dict(DIGITS_CONFIG, name="digits")
    assert cfg.inputs == [TensorSpec("image", "FP32", [-1, 8, 8])]
    assert cfg.outputs == [TensorSpec("probs", "FP32", [-1, 10])]
    assert ModelConfig.from_dict(cfg.to_dict(), name="digits") == cfg
    assert cfg.metadata() == {
        "name": "digits",
        "platform": "torchscript",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
    }
    warm = cfg.warmup_inputs()
    assert list(warm) == ["image"]
    assert warm["image"].shape == (1, 8, 8) and warm["image"].dtype == np.float32 and not warm["image"].any()


def test_config_defaults_and_name_from_argument():
    cfg = ModelConfig.from_dict(
        {
            "inputs": [{"name": "a", "datatype": "INT64", "shape": []}],
            "outputs": [{"name": "b", "datatype": "BOOL", "shape": [0, 3]}],
        },
        name="m",
    )
    assert (cfg.name, cfg.max_batch_size, cfg.max_queue_delay_us, cfg.instances, cfg.platform) == ("m", 0, 0, 1, None)
    assert "platform" not in cfg.to_dict()


def _spec(**changes):
    s = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    s.update(changes)
    return s


@pytest.mark.parametrize(
    "config, message",
    [
        ([], "must be a JSON object"),
        (_config(inputs=[]), "'inputs' must be a non-empty list"),
        ({k: v for k, v in ECHO_CONFIG.items() if k != "outputs"}, "'outputs' must be a non-empty list"),
        (_config(inputs=[_spec(datatype="FP33")]), "datatype 'FP33' is not one of"),
        (_config(inputs=[_spec(datatype="BYTES")]), "BYTES input 'x' needs a 'decode' step"),
        (_config(outputs=[_spec(datatype="BYTES")]), "output 'x' is BYTES"),
        (_config(inputs=[_spec(shape=[-2, 4])]), "shape must be a list of ints >= -1"),
        (_config(inputs=[_spec(shape=[1.0, 4])]), "shape must be a list of ints >= -1"),
        (_config(inputs=[_spec(shape=[True])]), "shape must be a list of ints >= -1"),
        (_config(inputs=[_spec(shape="-1,4")]), "shape must be a list of ints >= -1"),
        (_config(inputs=[_spec(shape=[1] * 17)]), "17 dimensions"),
        (_config(inputs=[_spec(), _spec()]), "inputs name 'x' appears twice"),
        (_config(inputs=[_spec(name="")]), "inputs[0].name must be a non-empty string"),
        (_config(inputs=[{"name": "x", "datatype": "FP32"}]), "inputs[0] is missing 'shape'"),
        (_config(inputs=[_spec(dims=[1])]), "unknown key(s) 'dims'"),
        (_config(inputs=["x"]), "inputs[0] must be an object"),
        (_config(max_batchsize=4), "unknown key(s) 'max_batchsize'"),
        (_config(instances=0), "'instances' must be an int >= 1"),
        (_config(max_batch_size=-1), "'max_batch_size' must be an int >= 0"),
        (_config(max_queue_delay_us=1.5), "'max_queue_delay_us' must be an int >= 0"),
        (_config(platform="onnx"), "platform 'onnx' is not one of torchscript, torch_export"),
        (_config(name="other"), "names the model 'other' but its folder is 'echo'"),
    ],
)
def test_config_validation_errors(config, message):
    with pytest.raises(RepositoryError) as info:
        ModelConfig.from_dict(config, name="echo")
    assert message in str(info.value)
    assert "echo" in str(info.value)  # says which model


def test_read_config_errors_name_the_file(tmp_path):
    repo = ModelRepository(tmp_path)
    with pytest.raises(RepositoryError, match="no config.json"):
        repo.read_config("nothing")
    folder = repo.models_dir / "broken"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(RepositoryError, match="not valid JSON") as info:
        repo.read_config("broken")
    assert str(folder / "config.json") in str(info.value)
    (folder / "config.json").write_text(json.dumps(_config(name="broken", instances=-3)))
    with pytest.raises(RepositoryError, match="'instances' must be an int >= 1") as info:
        repo.read_config("broken")
    assert str(folder / "config.json") in str(info.value)
    with pytest.raises(RepositoryError, match="invalid model name"):
        repo.read_config("../etc")


# ---------------------------------------------------------------------------------------------------------------
# check_inputs
# ---------------------------------------------------------------------------------------------------------------

DIGITS = ModelConfig.from_dict(DIGITS_CONFIG, name="digits")


def _meta(name="image", datatype="FP32", shape=(3, 8, 8)):
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def test_check_inputs_accepts_any_variable_dim():
    DIGITS.check_inputs([_meta(shape=(1, 8, 8))])
    DIGITS.check_inputs([_meta(shape=(0, 8, 8))])
    DIGITS.check_inputs([_meta(shape=(1000, 8, 8))])


@pytest.mark.parametrize(
    "metas, message",
    [
        ([_meta(datatype="INT64")], "input 'image': expected datatype FP32, got INT64"),
        ([_meta(), _meta(name="extra")], "unknown input 'extra': model 'digits' takes 'image'"),
        ([_meta(name="img")], "unknown input 'img'"),
        ([], "missing input 'image'"),
        ([_meta(shape=(8, 8))], "input 'image': expected 3 dimensions [-1, 8, 8], got 2 [8, 8]"),
        ([_meta(shape=(1, 1, 8, 8))], "input 'image': expected 3 dimensions"),
        ([_meta(shape=(2, 8, 7))], "input 'image': dimension 2 must be 8, got 7"),
    ],
)
def test_check_inputs_errors(metas, message):
    with pytest.raises(InputError) as info:
        DIGITS.check_inputs(metas)
    assert message in str(info.value)


def test_check_inputs_two_inputs_missing_one():
    cfg = ModelConfig.from_dict(
        {"inputs": [_spec(name="a"), _spec(name="b")], "outputs": [_spec(name="c")]}, name="sub"
    )
    cfg.check_inputs([_meta("a", shape=(2, 4)), _meta("b", shape=(5, 4))])
    with pytest.raises(InputError, match="missing input 'b'"):
        cfg.check_inputs([_meta("a", shape=(2, 4))])
    assert isinstance(InputError("x"), ValueError)


# ---------------------------------------------------------------------------------------------------------------
# publish_version
# ---------------------------------------------------------------------------------------------------------------


def test_publish_writes_complete_version(tmp_path):
    src = _echo_file(tmp_path)
    calls = []
    n = publish_version(tmp_path, "echo", src, config=ECHO_CONFIG, progress=lambda *step: calls.append(step))
    assert n == 1
    repo = ModelRepository(tmp_path)
    folder = repo.models_dir / "echo" / "1"
    assert sorted(os.listdir(folder)) == ["config.json", "manifest.json", "model.pt"]
    assert [e for e in os.listdir(repo.models_dir / "echo") if e.startswith(".")] == []  # no temp folder left
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    assert manifest["files"] == {"model.pt": digest, "config.json": sha256_file(folder / "config.json")}
    assert (folder / "config.json").read_bytes() == (repo.models_dir / "echo" / "config.json").read_bytes()
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert sha256_file(folder / "model.pt") == digest
    assert (
        json.loads((repo.models_dir / "echo" / "config.json").read_text())
        == ModelConfig.from_dict(ECHO_CONFIG, name="echo").to_dict()
    )
    size = os.path.getsize(src)
    assert calls[0] == (0, size) and calls[-1] == (size, size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert repo.verify("echo", 1) == manifest["files"]


def test_publish_numbering_and_refusals(tmp_path):
    src = _echo_file(tmp_path)
    repo = ModelRepository(tmp_path)
    with pytest.raises(RepositoryError, match="config.json does not exist and no config was given"):
        publish_version(tmp_path, "echo", src)
    assert repo.model_names() == []
    assert publish_version(tmp_path, "echo", src, config=ECHO_CONFIG) == 1
    assert publish_version(tmp_path, "echo", src) == 2  # keeps the existing config.json
    assert publish_version(tmp_path, "echo", src, version=5) == 5
    assert publish_version(tmp_path, "echo", src) == 6
    with pytest.raises(RepositoryError, match="version 5 already exists"):
        publish_version(tmp_path, "echo", src, version=5)
    with pytest.raises(RepositoryError, match=r"expected a \.pt"):
        publish_version(tmp_path, "echo", tmp_path / "src" / "model.onnx")
    with pytest.raises(RepositoryError, match="invalid model name"):
        publish_version(tmp_path, "../evil", src, config=ECHO_CONFIG)
    with pytest.raises(RepositoryError, match="'inputs' must be a non-empty list"):
        publish_version(tmp_path, "echo", src, config=_config(inputs=[]))
    assert repo.versions("echo") == [1, 2, 5, 6]
    assert repo.latest_version("echo") == 6
    assert repo.latest_version("nothing") is None and repo.versions("nothing") == []
    (repo.models_dir / "echo" / "7").mkdir()  # a numbered folder is a version, even an empty one (one rule)
    assert publish_version(tmp_path, "echo", src) == 8  # never reuses a number a folder already has
    assert repo.versions("echo") == [1, 2, 5, 6, 7, 8]
    assert repo.model_names() == ["echo"]


def test_one_version_rule_for_every_reader(tmp_path):
    """A version is a folder named by a canonical decimal number, for ModelRepository and LocalShare alike (NfsShare
    applies the same function to its listing): publishes in progress, other names and files are not versions."""
    src = _echo_file(tmp_path)
    publish_version(tmp_path, "echo", src, config=ECHO_CONFIG, version=3)
    folder = tmp_path / "models" / "echo"
    for junk in (".tmp-abc", "08", "x9", "+4", "٣"):  # a publish in progress, non-canonical numbers, a non-ASCII digit
        (folder / junk).mkdir()
        (folder / junk / "model.pt").write_bytes(b"partial")
    (folder / "5").write_bytes(b"a file, not a folder")
    (folder / "12").mkdir()  # complete or not, a numbered folder is a version; loading it verifies it
    repo, share = ModelRepository(tmp_path), LocalShare(tmp_path)
    assert repo.versions("echo") == share.list_versions("echo") == [3, 12]
    assert repo.model_names() == share.list_models() == ["echo"]
    with pytest.raises(RepositoryError, match="no manifest.json"):
        repo.verify("echo", 12)


def test_atomic_write_replaces_whole_files_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "deployments.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new content")
    assert path.read_bytes() == b"new content" and os.listdir(tmp_path) == ["deployments.json"]
    previous = os.umask(0o077)
    try:
        atomic_write(path, b"shared", mode=0o644)  # an exact mode, whatever the umask (the agents' NFS cache)
        assert path.stat().st_mode & 0o777 == 0o644
        atomic_write(path, b"private")
        assert path.stat().st_mode & 0o777 == 0o600  # otherwise 0666 & ~umask, as open() would
    finally:
        os.umask(previous)
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "absent" / "x", b"...")
    assert os.listdir(tmp_path) == ["deployments.json"] and path.read_bytes() == b"private"


def test_publish_failure_leaves_nothing_behind(tmp_path):
    src = _echo_file(tmp_path)

    def boom(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_version(tmp_path, "echo", src, config=ECHO_CONFIG, progress=boom)
    repo = ModelRepository(tmp_path)
    assert not (repo.models_dir / "echo").exists(), "a failed first publish left an empty model folder"
    assert repo.versions("echo") == []


def test_failed_publishes_and_killed_publishers_leave_no_folders(tmp_path, monkeypatch):
    """Issue 18 point 8: a publish that fails (the share full) leaves neither its .tmp-* folder nor, for a new model,
    the model's folder or config.json; an existing model keeps what it had; a .tmp-* folder left by a publisher that
    was killed is removed by the next publish once it is stale, and one in progress is not."""
    import cluster.publish

    src = _echo_file(tmp_path)
    real_write = cluster.publish.write_new_file

    def disk_full(path, data, mode=None):
        if str(path).endswith("manifest.json"):
            raise OSError(28, "No space left on device")
        real_write(path, data, mode)

    monkeypatch.setattr(cluster.publish, "write_new_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        publish_version(tmp_path, "fresh", src, config=_config(name="fresh"))
    assert os.listdir(tmp_path / "models") == [], os.listdir(tmp_path / "models")
    monkeypatch.setattr(cluster.publish, "write_new_file", real_write)
    publish_version(tmp_path, "echo", src, config=ECHO_CONFIG)
    monkeypatch.setattr(cluster.publish, "write_new_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        publish_version(tmp_path, "echo", src)
    assert sorted(os.listdir(tmp_path / "models" / "echo")) == ["1", "config.json"]
    monkeypatch.setattr(cluster.publish, "write_new_file", real_write)

    model_dir = tmp_path / "models" / "echo"
    killed, working = model_dir / ".tmp-killed", model_dir / ".tmp-working"
    half_removed = model_dir / ".rejected-killed"  # remove_version killed between its rename and its rmtree
    for folder in (killed, working, half_removed):
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"half a file")
    hours_ago = time.time() - 2 * 3600
    for path in (killed / "model.pt", killed, half_removed / "model.pt", half_removed):
        os.utime(path, (hours_ago, hours_ago))
    assert publish_version(tmp_path, "echo", src) == 2
    assert sorted(os.listdir(model_dir)) == [".tmp-working", "1", "2", "config.json"]


def test_version_numbers_are_bounded(tmp_path):
    """Issue 18 point 8: a version is a number up to MAX_VERSION (2**31 - 1), everywhere."""
    src = _echo_file(tmp_path)
    for version in (999999999999999999, MAX_VERSION + 1, 0, -1):
        with pytest.raises(RepositoryError, match=f"version must be a number from 1 to {MAX_VERSION}"):
            publish_version(tmp_path, "echo", src, config=ECHO_CONFIG, version=version)
        with pytest.raises(RepositoryError, match=f"version must be a number from 1 to {MAX_VERSION}"):
            publish_upload(tmp_path, "echo", "model.pt", b"x", ECHO_CONFIG, version)
    assert not (tmp_path / "models" / "echo").exists()
    assert publish_version(tmp_path, "echo", src, config=ECHO_CONFIG, version=MAX_VERSION) == MAX_VERSION
    (tmp_path / "models" / "echo" / "999999999999999999").mkdir()  # put there by hand: not a version
    assert ModelRepository(tmp_path).versions("echo") == [MAX_VERSION]
    with pytest.raises(RepositoryError, match="invalid version 999999999999999999"):
        ModelRepository(tmp_path).verify("echo", 999999999999999999)


def test_model_names_sorted(tmp_path):
    src = _echo_file(tmp_path)
    for name in ("zeta", "alpha", "mid"):
        publish_version(tmp_path, name, src, config=_config(name=name))
    (tmp_path / "models" / "no-config").mkdir()
    assert ModelRepository(tmp_path).model_names() == ["alpha", "mid", "zeta"]


# ---------------------------------------------------------------------------------------------------------------
# verify and load
# ---------------------------------------------------------------------------------------------------------------


def test_verify_refuses_tampered_file(tmp_path):
    publish_version(tmp_path, "echo", _echo_file(tmp_path), config=ECHO_CONFIG)
    repo = ModelRepository(tmp_path)
    path = repo.models_dir / "echo" / "1" / "model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match="sha256 mismatch") as info:
        repo.verify("echo", 1)
    assert "model 'echo' version 1" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(RepositoryError, match="sha256 mismatch"):
        load_model(repo, "echo", 1)


def test_verify_refuses_missing_manifest_and_missing_file(tmp_path):
    publish_version(tmp_path, "echo", _echo_file(tmp_path), config=ECHO_CONFIG)
    publish_version(tmp_path, "echo", _echo_file(tmp_path))
    repo = ModelRepository(tmp_path)
    (repo.models_dir / "echo" / "1" / "manifest.json").unlink()
    for call in (repo.verify, functools.partial(load_model, repo)):
        with pytest.raises(RepositoryError, match="no manifest.json") as info:
            call("echo", 1)
        assert "unverified" in str(info.value)
    manifest = repo.models_dir / "echo" / "2" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["weights.bin"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(RepositoryError, match="weights.bin is listed in manifest.json but missing"):
        repo.verify("echo", 2)
    m["files"] = {"../../../config.json": "0" * 64}
    manifest.write_text(json.dumps(m))
    with pytest.raises(RepositoryError, match="not a plain file name"):
        repo.verify("echo", 2)
    with pytest.raises(RepositoryError, match="no such version folder"):
        repo.verify("echo", 9)


def test_load_corrupt_model_is_an_error_not_a_crash(tmp_path):
    src = tmp_path / "garbage.pt"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    publish_version(tmp_path, "echo", src, config=ECHO_CONFIG)  # manifest matches the garbage
    repo = ModelRepository(tmp_path)
    repo.verify("echo", 1)
    with pytest.raises(RepositoryError, match=r"model 'echo' version 1: cannot load .*model\.pt"):
        load_model(repo, "echo", 1)


def test_load_refuses_a_pickle(tmp_path):
    src = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, src)  # a plain torch.save zip, not TorchScript
    with pytest.raises(RepositoryError, match="is a torch.save file .*, not TorchScript or torch.export; save"):
        publish_version(tmp_path, "echo", src, config=ECHO_CONFIG)
    # The same file put on the share by hand, with a manifest that matches it: the agent says what it is, too.
    publish_version(tmp_path, "echo", _echo_file(tmp_path), config=ECHO_CONFIG)
    folder = ModelRepository(tmp_path).models_dir / "echo" / "1"
    (folder / "model.pt").write_bytes(src.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.pt"] = sha256_file(src)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match="model 'echo' version 1: .* is a torch.save file"):
        load_model(ModelRepository(tmp_path), "echo", 1)


@pytest.mark.parametrize(
    "module, outputs, message",
    [
        (None, [_spec(name="y", datatype="INT64", shape=[-1, -1])], "output 'y' has datatype FP32, config says INT64"),
        (Flatten(), [_spec(name="y", shape=[-1, -1])], "output 'y': expected 2 dimensions [-1, -1], got 1 [1]"),
        (None, [_spec(name="y", shape=[-1, 3])], "output 'y': dimension 1 must be 3"),
        (TwoOutputs(), [_spec(name="y", shape=[-1, -1])], "returned 2 output(s), config declares 1"),
        (DictOutputs(), [_spec(name="y", shape=[-1, -1])], "returned outputs ['double', 'y'], config declares ['y']"),
    ],
)
def test_outputs_disagreeing_with_config_fail_warmup(tmp_path, module, outputs, message):
    src = _echo_file(tmp_path) if module is None else _script_file(tmp_path, module)
    publish_version(tmp_path, "m", src, config=_config(name="m", outputs=outputs))
    with pytest.raises(RepositoryError) as info:
        load_model(ModelRepository(tmp_path), "m", 1)
    assert "model 'm' version 1" in str(info.value) and "warm-up" in str(info.value)
    assert message in str(info.value)


def test_model_raising_in_warmup(tmp_path):
    cfg = {"inputs": [_spec(name="a"), _spec(name="b", shape=[3, 4])], "outputs": [_spec(name="c")]}
    publish_version(tmp_path, "sub", _script_file(tmp_path, TwoInputs()), config=cfg)  # [1,4] - [3,4] -> [3,4] fine
    load_model(ModelRepository(tmp_path), "sub", 1)
    cfg["inputs"][1]["shape"] = [3, 5]  # [1,4] - [3,5] cannot broadcast
    publish_version(tmp_path, "sub", _script_file(tmp_path, TwoInputs()), config=cfg)
    with pytest.raises(RepositoryError, match=r"model 'sub' version 2: warm-up failed on zeros .*\): RuntimeError"):
        load_model(ModelRepository(tmp_path), "sub", 2)


def test_infer_maps_outputs_and_passes_inputs_in_config_order(tmp_path):
    cfg = {"inputs": [_spec(name="a"), _spec(name="b")], "outputs": [_spec(name="c")]}
    publish_version(tmp_path, "sub", _script_file(tmp_path, TwoInputs()), config=cfg)
    model = load_model(ModelRepository(tmp_path), "sub", 1)
    out = model.infer({"b": torch.ones(2, 4), "a": torch.full((2, 4), 5.0)})
    assert list(out) == ["c"] and torch.equal(out["c"], torch.full((2, 4), 4.0))
    with pytest.raises(InputError, match="missing input 'b'"):
        model.infer({"a": torch.ones(2, 4)})

    cfg = {"inputs": [_spec()], "outputs": [_spec(name="y"), _spec(name="double")]}
    publish_version(tmp_path, "dict", _script_file(tmp_path, DictOutputs()), config=cfg)
    model = load_model(ModelRepository(tmp_path), "dict", 1)
    out = model.infer({"x": torch.arange(8.0).reshape(2, 4)})
    assert list(out) == ["y", "double"]
    assert torch.equal(out["double"], torch.arange(8.0).reshape(2, 4) * 2)


def test_echo_round_trip(tmp_path):
    publish_version(tmp_path, "echo", _echo_file(tmp_path), config=ECHO_CONFIG)
    repo = ModelRepository(tmp_path)
    model = load_model(repo, "echo", 1, device="cpu")
    assert isinstance(model, LoadedModel)
    assert (model.name, model.version, model.device, model.config.platform) == ("echo", 1, "cpu", "torchscript")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 5), dtype=np.float32))
    out = model.infer({"x": x.t()})  # non-contiguous in, contiguous out
    assert list(out) == ["y"]
    assert out["y"].is_contiguous() and torch.equal(out["y"], x.t())
    assert out["y"].numpy().tobytes() == np.ascontiguousarray(x.t().numpy()).tobytes()
    assert repo.read_config("echo").metadata()["platform"] == "torchscript"


def test_torch_export_program(tmp_path):
    batch = torch.export.Dim("batch")
    example = (torch.ones(2, 4), torch.ones(2, 4))
    program = torch.export.export(TwoInputs(), example, dynamic_shapes=({0: batch}, {0: batch}))
    src = tmp_path / "sub.pt2"
    torch.export.save(program, str(src))
    cfg = {"inputs": [_spec(name="a"), _spec(name="b")], "outputs": [_spec(name="c")]}
    publish_version(tmp_path, "sub", src, config=cfg)
    repo = ModelRepository(tmp_path)
    assert sorted(os.listdir(repo.models_dir / "sub" / "1")) == ["config.json", "manifest.json", "model.pt2"]
    assert repo.read_config("sub").platform == "torch_export"
    model = load_model(repo, "sub", 1)
    assert model.config.platform == "torch_export"
    out = model.infer({"a": torch.full((3, 4), 2.0), "b": torch.ones(3, 4)})
    assert torch.equal(out["c"], torch.ones(3, 4))
    with pytest.raises(RepositoryError, match="config says platform 'torchscript' but"):
        publish_version(tmp_path, "sub", src, config=dict(cfg, platform="torchscript"))


# ---------------------------------------------------------------------------------------------------------------
# demo models
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_share(tmp_path_factory, trained_digits_file):
    """A share with the demo digits model (trained once per test run), published the way write_demo_models does it."""
    share = tmp_path_factory.mktemp("share")
    publish_version(share, "digits", trained_digits_file, config=DIGITS_CONFIG, version=1)
    return share


def test_training_leaves_torch_threads_as_they_were():
    threads = torch.get_num_threads()
    module = train_digits(seed=0, epochs=1)
    assert torch.get_num_threads() == threads, "training must not leave the process-wide setting changed"
    assert module(torch.zeros(2, 8, 8)).shape == (2, 10)


def test_digits_split_fits_the_demo_config_and_never_changes():
    """What tests and benchmarks send the digits model: arrays its config accepts, and a held-out split that is the
    same on every call (accuracy claims are compared on it) and holds out every class."""
    split = digits_split()
    x_train, y_train, x_test, y_test = split
    config = ModelConfig.from_dict(DIGITS_CONFIG)
    for x in (x_train, x_test):
        config.check_inputs([{"name": "image", "datatype": datatype_of(x), "shape": list(x.shape)}])
    assert len(x_test) == len(y_test) == TEST_SIZE and len(x_train) == len(y_train)
    assert sorted(np.unique(y_test)) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(digits_split(), split))


def test_digits_accuracy_through_repository(digits_share):
    model = load_model(ModelRepository(digits_share), "digits", 1)
    _, _, x_test, y_test = digits_split()
    model.config.check_inputs([{"name": "image", "datatype": "FP32", "shape": list(x_test.shape)}])
    probs = model.infer({"image": torch.from_numpy(x_test)})["probs"]
    assert probs.shape == (360, 10) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(dim=1), torch.ones(360), atol=1e-5)
    accuracy = float((probs.argmax(dim=1).numpy() == y_test).mean())
    assert accuracy >= 0.95, f"digits held-out accuracy {accuracy:.3f}"


def test_write_demo_models_is_idempotent(digits_share):
    assert write_demo_models(digits_share) == ["echo"]  # digits already there: not retrained
    assert write_demo_models(digits_share) == []
    repo = ModelRepository(digits_share)
    assert repo.model_names() == ["digits", "echo"]
    assert repo.versions("echo") == [1] and repo.versions("digits") == [1]
    out = load_model(repo, "echo", 1).infer({"x": torch.ones(2, 3)})
    assert torch.equal(out["y"], torch.ones(2, 3))


def test_remove_version_takes_a_rejected_version_or_a_new_model_off_the_share(tmp_path, digits_v1_file):
    from cluster.publish import remove_version

    share = tmp_path / "share"
    config = {**DIGITS_CONFIG, "name": "m"}
    for _ in range(2):
        publish_version(share, "m", digits_v1_file, config)
    remove_version(share, "m", 2)
    repo = ModelRepository(share)
    assert repo.versions("m") == [1] and not [p for p in (share / "models" / "m").iterdir() if p.name.startswith(".")]
    remove_version(share, "m", 2)  # already gone: nothing to do
    remove_version(share, "m", 1, whole_model=True)
    assert repo.model_names() == [] and not list((share / "models").iterdir())
