"""Compile at publish (issue 22, item 1): an exported program compiled into an AOTInductor package, published beside
it, loaded by agents that match it and refused (the exported program runs instead) by those that do not.

The models are tests/pt2_models.py's CNN and transformer encoder (random weights). AOT compiles take seconds each:
the suite makes two (the session's `compiled` fixture: the encoder; `cluster deploy --compile`: the CNN)."""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cluster.model_check import check_compiled, check_model_file
from cluster.model_config import ModelConfig, RepositoryError
from cluster.publish import publish_version
from cluster.repository import ModelRepository
from tests import pt2_models
from tests.harness import REPO_ROOT, wait_for

# Compiled against eager: inductor fuses batch norm into the convolutions and reorders float sums.
RTOL, ATOL = 1e-3, 1e-4
LAYOUT = ["archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"]


def fake_package(path: Path, *extra: str) -> Path:
    """An archive with an AOTInductor package's layout (not a working library) and `extra` entries."""
    with zipfile.ZipFile(path, "w") as archive:
        for entry in LAYOUT:
            archive.writestr(f"model/{entry}", b"pt2" if entry == "archive_format" else b"0")
        archive.writestr("model/data/aotinductor/model/abc.wrapper.so", b"\x7fELF")
        archive.writestr("model/data/aotinductor/model/abc.wrapper_metadata.json", b"{}")
        for entry in extra:
            archive.writestr(f"model/{entry}", pickle.dumps({"a": 1}))
    return path


def entry(**changes) -> dict:
    base = {"device": "cpu", "torch": torch.__version__, "arch": "x86_64", "cuda_arch": None, "batch": [1, 32]}
    return {**base, **changes}


def test_model_check_admits_the_package_layout_and_refuses_pickles_and_programs(tmp_path):
    check_model_file("model.aoti-cpu.pt2", fake_package(tmp_path / "ok.pt2").read_bytes(), "here")
    for bad in ("data/aotinductor/model/weights.pkl", "models/model.json", "data/weights/weight_0", "data.pkl"):
        data = fake_package(tmp_path / "bad.pt2", bad).read_bytes()
        with pytest.raises(RepositoryError, match=rf"refusing entry '{bad}' of the AOTInductor package"):
            check_model_file("model.aoti-cpu.pt2", data, "here")
    with pytest.raises(RepositoryError, match="is a pickle"):
        check_model_file("model.aoti-cpu.pt2", pickle.dumps([1, 2]), "here")


def test_compiled_json_schema():
    assert check_compiled(json.dumps({"packages": {"model.aoti-cpu.pt2": entry()}}).encode(), "here")
    for doc, why in (
        ({"packages": {"model.aoti-cpu.pt2": entry(device="cuda")}}, "device 'cuda' is not the file's"),
        ({"packages": {"model.so": entry()}}, "not model.aoti-<cpu|cuda>.pt2"),
        ({"packages": {"model.aoti-cpu.pt2": entry(batch=[4, 1])}}, "'batch' must be"),
        ({"packages": {"model.aoti-cpu.pt2": entry(run="x")}}, "keys must be among"),
        ({"packages": {}, "more": 1}, "must be"),
    ):
        with pytest.raises(RepositoryError, match=why):
            check_compiled(json.dumps(doc).encode(), "here")
    with pytest.raises(RepositoryError, match="not valid JSON"):
        check_compiled(b"{", "here")


def test_publish_refuses_a_package_holding_a_pickle_and_publishes_nothing(tmp_path):
    model, config, sample = pt2_models.make("encoder")
    program = pt2_models.export(model, sample, tmp_path / "enc.pt2")
    evil = fake_package(tmp_path / "evil.pt2", "data/aotinductor/model/constants.pkl")
    share = tmp_path / "share"
    with pytest.raises(RepositoryError, match="refusing entry 'data/aotinductor/model/constants.pkl'"):
        publish_version(share, "enc", program, config, extra={"model.aoti-cpu.pt2": evil})
    assert ModelRepository(share).versions("enc") == []


def test_deploy_compile_refuses_torchscript(tmp_path):
    model, _, sample = pt2_models.make("cnn")
    scripted = pt2_models.script(model, sample, tmp_path / "cnn.pt")
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "deploy", str(scripted), "--name", "cnn", "--compile", "--share", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 2 and "--compile takes an exported program (.pt2), not TorchScript" in out.stderr


def test_the_load_route_compile_parameter():
    from edge.errors import HTTPError
    from edge.repository import compile_field

    assert [compile_field(v) for v in (None, False, "false", True, "true", "cpu", "CUDA")] == [
        None, None, None, "cpu", "cpu", "cpu", "cuda"
    ]  # fmt: skip
    with pytest.raises(HTTPError, match="parameter 'compile': must be true, false"):
        compile_field("gpu")


def test_the_manager_refuses_to_compile_torchscript_or_where_it_has_no_torch(monkeypatch):
    import importlib.util

    from cluster.publish import compile_refusal

    assert compile_refusal("model.pt2", "cpu") == ""
    assert "not TorchScript" in compile_refusal("model.pt", "cpu")
    assert "must be cpu or cuda" in compile_refusal("model.pt2", "tpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "compile where the model is published" in compile_refusal("model.pt2", "cpu")


@pytest.fixture(scope="session")
def compiled_encoder(tmp_path_factory):
    """(model, config, sample, program path, {package name: path, "compiled.json": path}): one compile per session."""
    from cluster.compile import compile_program, compiled_json

    folder = tmp_path_factory.mktemp("compiled-encoder")
    model, config, sample = pt2_models.make("encoder")
    program = pt2_models.export(model, sample, folder / "encoder.pt2")
    package, info = compile_program(program, ModelConfig.from_dict(config, name="enc"), folder)
    (folder / "compiled.json").write_bytes(compiled_json({package.name: info}))
    return model, config, sample, program, {package.name: package, "compiled.json": folder / "compiled.json"}


class BatchOfTwo(torch.nn.Module):
    """A model whose code fixes the batch at 2 (a reshape to 2 rows): no dynamic batch can be made of it."""

    def forward(self, x):
        return x.reshape(2, 4)[:, :2] * 2


def test_a_static_batch_program_that_cannot_be_made_dynamic_gets_a_clear_error(tmp_path):
    from cluster.compile import compile_program
    from tests.pt2_payloads import CONFIG

    program = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(BatchOfTwo(), (torch.zeros(2, 4),)), program)
    with pytest.raises(RepositoryError, match=r"its batch dimension is static and re-exporting it .* failed"):
        compile_program(program, ModelConfig.from_dict({**CONFIG, "max_batch_size": 8}, name="two"), tmp_path)


def infer(client, name: str, config: dict, x: torch.Tensor) -> np.ndarray:
    result = client.infer(name, {config["inputs"][0]["name"]: x.numpy()}, timeout=60)
    return result.as_numpy(config["outputs"][0]["name"])


def edge_get(cluster, path: str) -> dict:
    response = httpx.get(f"{cluster.edge_url}{path}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.cluster
def test_exported_and_compiled_models_are_served_and_a_foreign_package_falls_back(tmp_path, compiled_encoder):
    """One agent serves the CNN and the encoder, each as exported program and as compiled package (the CNN
    compiled by `cluster deploy --compile`), and a version whose compiled.json says another torch build: every answer
    equals the model run directly (rtol 1e-3, atol 1e-4), /agents and the edge's metadata say what runs."""
    from cluster.local import LocalCluster

    enc_model, enc_config, enc_sample, enc_program, enc_extra = compiled_encoder
    cnn_model, cnn_config, cnn_sample = pt2_models.make("cnn")
    cnn_program = pt2_models.export(cnn_model, cnn_sample, tmp_path / "cnn.pt2")
    share = tmp_path / "share"
    publish_version(share, "enc", enc_program, enc_config)
    publish_version(share, "enc-aoti", enc_program, enc_config, extra=enc_extra)
    publish_version(share, "cnn", cnn_program, cnn_config)
    foreign = tmp_path / "compiled.json"
    packages = json.loads(enc_extra["compiled.json"].read_bytes())["packages"]
    packages["model.aoti-cpu.pt2"]["torch"] = "1.0.0"
    foreign.write_text(json.dumps({"packages": packages}))
    publish_version(share, "enc-foreign", enc_program, enc_config, extra={**enc_extra, "compiled.json": foreign})
    cluster = LocalCluster(share, tmp_path / "logs")
    try:
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(1)
        cluster.start_edge()
        cluster.wait_for_agents(1, model="enc-foreign", timeout=120)
        config_file = tmp_path / "cnn.json"
        config_file.write_text(json.dumps(cnn_config))
        out = subprocess.run(
            [sys.executable, "-m", "cluster", "deploy", str(cnn_program), "--name", "cnn-aoti"]
            + ["--config", str(config_file), "--compile"],
            env=cluster.env(),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO_ROOT,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "compiled model.aoti-cpu.pt2" in out.stdout, out.stdout
        files = json.loads((share / "models" / "cnn-aoti" / "1" / "manifest.json").read_text())["files"]
        assert {"model.pt2", "model.aoti-cpu.pt2", "compiled.json", "config.json"} == set(files)
        # the edge's repository load route compiles too: the manager runs `python -m cluster.compile` in a child
        body = {
            "parameters": {
                "config": json.dumps(cnn_config),
                "file:1/model.pt2": base64.b64encode(cnn_program.read_bytes()).decode(),
                "compile": True,
            }
        }
        response = httpx.post(f"{cluster.edge_url}/v2/repository/models/cnn-route/load", json=body, timeout=300)
        assert response.status_code == 200, response.text
        files = json.loads((share / "models" / "cnn-route" / "1" / "manifest.json").read_text())["files"]
        assert {"model.pt2", "model.aoti-cpu.pt2", "compiled.json", "config.json"} == set(files)

        client = cluster.client()
        info = {}

        def model_info():
            agents = client.agents(timeout=5)
            info.update(agents[0].get("model_info") or {})
            return all(m in info for m in ("cnn", "cnn-aoti", "cnn-route", "enc", "enc-aoti", "enc-foreign"))

        wait_for(model_info, 60, "every model in the agent's model_info")
        runs = {m: info[m]["1"]["runs"] for m in info}
        assert runs == {"cnn": "exported", "cnn-aoti": "aoti", "cnn-route": "aoti", "enc": "exported",
                        "enc-aoti": "aoti", "enc-foreign": "exported"}, info  # fmt: skip
        why = info["enc-foreign"]["1"]["runs_why"]
        assert "model.aoti-cpu.pt2 refused: it was compiled with torch 1.0.0" in why and "exported program" in why
        assert info["enc-aoti"]["1"]["runs_why"] == ""

        for name, model, config, sample in (
            ("cnn", cnn_model, cnn_config, cnn_sample),
            ("cnn-aoti", cnn_model, cnn_config, cnn_sample),
            ("cnn-route", cnn_model, cnn_config, cnn_sample),
            ("enc", enc_model, enc_config, enc_sample),
            ("enc-aoti", enc_model, enc_config, enc_sample),
            ("enc-foreign", enc_model, enc_config, enc_sample),
        ):
            for x in (sample, sample[:1], torch.randn(7, *sample.shape[1:])):
                with torch.no_grad():
                    expected = model(x).numpy()
                got = infer(client, name, config, x)
                np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"{name} batch {len(x)}")

        status = subprocess.run(
            [sys.executable, "-m", "cluster", "status", "--timeout", "5"],
            env={**cluster.env(), "COLUMNS": "400"},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
        assert "cnn-aoti v1 (aoti)" in status.stdout and "enc-foreign v1 (exported)" in status.stdout, status.stdout
        (agent,) = edge_get(cluster, "/agents")
        assert agent["model_info"]["cnn-aoti"]["1"]["runs"] == "aoti", agent
        meta = edge_get(cluster, "/v2/models/cnn-aoti")
        assert meta["runs"] == "aoti", meta
        assert edge_get(cluster, "/v2/models/enc-foreign")["runs"] == "exported"
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def test_exported_programs_load_in_two_threads_at_once(tmp_path):
    """torch.export.load sets a module-global deserializer: two loader threads (config.LOAD_THREADS) used to fail
    with "_CURRENT_DESERIALIZER is already set" (cluster/torch_files.py TORCH_LOAD)."""
    from concurrent.futures import ThreadPoolExecutor

    from cluster.agent.loaded_model import load_model

    share = tmp_path / "share"
    for kind in ("cnn", "encoder"):
        model, config, sample = pt2_models.make(kind)
        program = pt2_models.export(model, sample, tmp_path / f"{kind}.pt2")
        for i in range(3):
            publish_version(share, f"{kind}-{i}", program, config)
    names = [f"{kind}-{i}" for i in range(3) for kind in ("cnn", "encoder")]
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda name: load_model(ModelRepository(share), name, 1), names))
    assert [m.runs for m in loaded] == ["exported"] * len(names)


def test_a_package_that_loads_but_cannot_run_the_warm_up_inputs_falls_back(monkeypatch, caplog):
    """A package that fails its first inference (here: the wrong input layout) is dropped for the exported program,
    with runs_why and a log line, instead of failing the version."""
    from cluster.agent import programs
    from cluster.repository import ModelBytes

    def wrong_layout(x):
        raise RuntimeError("input 0: expected 3 dimensions")

    config = ModelConfig.from_dict(pt2_models.CNN_CONFIG, name="cnn")
    verified = ModelBytes("cnn", 1, config, Path("model.pt2"), b"", {"compiled.json": "0" * 64})
    monkeypatch.setattr(programs, "compiled_runner", lambda verified, device: (lambda: wrong_layout, ""))
    with caplog.at_level("WARNING", logger="cluster.agent"):
        loaded, why = programs.load_compiled(verified, "cpu", 1)
    assert loaded == [] and "model.aoti-cpu.pt2 did not load (RuntimeError: input 0: expected 3 dimensions)" in why
    assert "running the exported program" in why and why in caplog.text


@pytest.mark.cluster  # not multi-process, but an AOT compile (seconds): kept out of the fast subset
def test_a_static_batch_program_is_re_exported_with_a_dynamic_batch_and_compiled(tmp_path):
    """The program's batch is static (exported at batch 2 without dynamic_shapes): compile re-exports its module with
    Dim("batch", 1..max_batch_size), so the package answers any batch in that range."""
    from cluster.compile import compile_program
    from tests.pt2_payloads import CONFIG, Small

    torch.manual_seed(0)
    model = Small().eval()
    program = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 4),)), program)
    config = ModelConfig.from_dict({**CONFIG, "max_batch_size": 8}, name="small")
    package, info = compile_program(program, config, tmp_path)
    assert info["batch"] == [1, 8] and info["device"] == "cpu" and info["torch"] == torch.__version__
    from cluster.torch_files import load_package

    compiled = load_package(package.read_bytes())  # as agents load it
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)


def test_grpc_load_passes_compile_and_rest_refuses_compile_without_the_file(monkeypatch):
    """gRPC's RepositoryModelLoad hands `compile` to the same load_model as REST (edge/repository.py); a `compile`
    with no model file is a 400 naming the parameter."""
    import asyncio

    from tritonclient.grpc import service_pb2

    from edge import repository
    from edge.errors import HTTPError
    from tests.test_grpc_edge import run

    seen = []

    async def load_model(edge, name, config, files, compile_for=None):
        seen.append((name, files, compile_for))

    async def scenario(stub, bus):
        load = service_pb2.RepositoryModelLoadRequest(model_name="m")
        load.parameters["file:1/model.pt2"].bytes_param = b"pt2"
        load.parameters["compile"].bool_param = True
        await stub.RepositoryModelLoad(load)

    monkeypatch.setattr(repository, "load_model", load_model)
    run(scenario)
    assert seen == [("m", {"file:1/model.pt2": b"pt2"}, "cpu")]
    monkeypatch.undo()
    with pytest.raises(HTTPError, match="parameter 'compile': send the exported program with it"):
        asyncio.run(repository.load_model(None, "m", None, {}, compile_for="cpu"))


@pytest.mark.cluster  # an AOT compile (seconds, in the manager's child process): kept out of the fast subset
def test_a_model_with_a_decoded_bytes_input_and_pre_post_programs_is_compiled_and_served_compiled(tmp_path):
    """The config's input is BYTES (decoded JPEGs through preprocess.pt2): the model's own inputs are the program's
    (float [N, 3, 32, 32]), not the config's. The manager's publish path compiles it, publishes the programs in
    the same version, and an agent runs the package inside the pipeline, answering like the modules run directly."""
    from cluster.agent.loaded_model import load_model
    from cluster.publish import publish_upload
    from tests import bytes_models

    (tmp_path / "programs").mkdir()
    programs = bytes_models.export_all(tmp_path / "programs")
    share = tmp_path / "share"
    sent = {f: programs[f].read_bytes() for f in ("preprocess.pt2", "postprocess.pt2")}
    data = programs["model.pt2"].read_bytes()
    version, published = publish_upload(
        share, "classifier", "model.pt2", data, bytes_models.CONFIG, 1, programs=sent, compile_for="cpu"
    )
    assert (version, published) == (1, True)
    files = set(json.loads((share / "models/classifier/1/manifest.json").read_text())["files"])
    assert {"model.aoti-cpu.pt2", "compiled.json", "preprocess.pt2", "postprocess.pt2"} <= files
    loaded = load_model(ModelRepository(share), "classifier", 1)
    assert loaded.runs == "aoti", loaded.runs_why
    images = bytes_models.sample_images(3)  # each of another size
    expected_class, expected_score = bytes_models.reference([bytes_models.decoded(i) for i in images])
    batch = np.empty(len(images), dtype=object)
    batch[:] = images
    out = loaded.infer({"image": batch})
    np.testing.assert_array_equal(out["class"].numpy(), expected_class)
    np.testing.assert_allclose(out["score"].numpy(), expected_score, rtol=RTOL, atol=ATOL)


def test_loading_the_same_files_with_compile_twice_reuses_the_compiled_version(tmp_path, monkeypatch):
    """Versions never change, and loading the same files twice is a no-op: with `compile` too, when the version
    asked for already holds these files and a package for that device kind. A version without one gets the next
    number (it cannot gain a package)."""
    from cluster import publish
    from cluster.compile import compiled_json
    from tests.pt2_payloads import CONFIG, Small

    compiles = []

    def compile_upload(share_dir, name, data, config, device, folder, preprocess=False):
        compiles.append(device)
        (folder / "compiled.json").write_bytes(compiled_json({"model.aoti-cpu.pt2": entry()}))
        return {
            "model.aoti-cpu.pt2": fake_package(folder / "model.aoti-cpu.pt2"),
            "compiled.json": folder / "compiled.json",
        }

    monkeypatch.setattr(publish, "compile_upload", compile_upload)
    program = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(Small().eval(), (torch.zeros(2, 4),)), program)
    data, share = program.read_bytes(), tmp_path / "share"
    assert publish.publish_upload(share, "small", "model.pt2", data, CONFIG, 1) == (1, True)  # not compiled
    assert publish.publish_upload(share, "small", "model.pt2", data, CONFIG, 1, compile_for="cpu") == (2, True)
    assert publish.publish_upload(share, "small", "model.pt2", data, CONFIG, 2, compile_for="cpu") == (2, False)
    assert publish.publish_upload(share, "small", "model.pt2", data, None, 2, compile_for="cpu") == (2, False)
    assert compiles == ["cpu"]


def test_model_check_refuses_a_package_whose_root_folder_climbs_out(tmp_path):
    """torch's package loader extracts entries to <temp dir>/<entry name>: a root folder named '..' would write the
    library outside its temporary folder. AOTInductor never writes one."""
    ok = fake_package(tmp_path / "ok.pt2")
    climbing = tmp_path / "climb.pt2"
    with zipfile.ZipFile(ok) as src, zipfile.ZipFile(climbing, "w") as dst:
        for info in src.infolist():
            dst.writestr("../" + info.filename.split("/", 1)[1], src.read(info))
    with pytest.raises(RepositoryError, match=r"refusing the AOTInductor package's root folder '\.\.'"):
        check_model_file("model.aoti-cpu.pt2", climbing.read_bytes(), "here")


def test_a_package_compiled_for_fewer_rows_than_max_batch_size_is_refused_for_the_exported_program():
    """A program exported with Dim("batch", max=8) compiles to a package for 1..8 rows; the package does not check
    its range when run, so with max_batch_size 32 the agent runs the exported program (whose own range check then
    names the problem at warm-up) instead of the package outside what it was built for."""
    from cluster.agent import programs
    from cluster.compile import compiled_json
    from cluster.repository import ModelBytes

    config = ModelConfig.from_dict({**pt2_models.CNN_CONFIG, "platform": "torch_export"}, name="cnn")  # 32 rows
    for batch, refused in (([1, 8], True), ([1, 32], False), ([1, 1024], False)):
        doc = compiled_json({"model.aoti-cpu.pt2": entry(arch=programs.platform.machine(), batch=batch)})
        files = {"compiled.json": "0" * 64, "model.aoti-cpu.pt2": "0" * 64}
        reads = {"compiled.json": doc, "model.aoti-cpu.pt2": b"package"}
        verified = ModelBytes("cnn", 1, config, Path("model.pt2"), b"", files, reads.__getitem__)
        runner, why = programs.compiled_runner(verified, "cpu")
        if refused:
            assert runner is None
            assert why == (
                "model.aoti-cpu.pt2 refused: it was compiled for batches of 1 to 8 rows, this model runs 1 to 32; "
                "running the exported program"
            )
        else:
            assert runner is not None and why == ""


def test_compile_reads_the_model_s_inputs_from_the_program_where_preprocess_feeds_it(tmp_path):
    """With preprocess.pt2 (here: 64 x 64 images resized to 32 x 32), the model's inputs are not the config's:
    `cluster deploy --compile --preprocess` and the manager's compile (`--preprocess`) take them from the program."""
    from cluster.compile import model_inputs
    from tests import bytes_models

    program = torch.export.load(bytes_models.export_all(tmp_path)["model.pt2"])
    config = ModelConfig.from_dict(
        {**pt2_models.CNN_CONFIG, "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]}, "c"
    )
    (spec,) = model_inputs(program, config).inputs
    assert (spec.datatype, spec.shape) == ("FP32", [-1, 3, bytes_models.SIDE, bytes_models.SIDE])
