"""BYTES end to end, in-process (issue 22): the bus codec (Triton's length-prefixed layout, every length checked),
REST JSON and binary, gRPC, the built-in image decode (bombs and corrupt files refused), and the agent's pipeline
(decode -> preprocess.pt2 -> model -> postprocess.pt2) loaded from a share. The same through real processes and
tritonclient: tests/test_bytes_cluster.py."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.codec import decode_tensors, encode_tensors
from cluster.decode import DecodeError, decode_image, tiny_image
from cluster.model_config import InputError, ModelConfig, RepositoryError
from cluster.protocol import ProtocolError, validate_tensor_metas
from edge import oip
from edge.oip import InvalidRequest, parse_infer_request
from tests import bytes_models


def _objects(items: list, shape: list[int] | None = None) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape if shape is not None else [len(items)])


def _round_trip(tensors: dict) -> dict:
    metas, frames = encode_tensors(tensors)
    frames = [bytes(f) for f in frames]
    validate_tensor_metas(metas, frames)
    return decode_tensors(metas, frames)


# ---------------------------------------------------------------------------------------------------------------
# The bus
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=0, max_size=12), st.sampled_from([None, "rows"]))
def test_bytes_round_trip_on_the_bus(items, layout):
    shape = [len(items)] if layout is None or len(items) % 2 else [len(items) // 2, 2]
    array = _objects(items, shape)
    out = _round_trip({"t": array, "n": np.arange(3, dtype=np.int32)})
    assert out["t"].dtype == object and out["t"].shape == tuple(shape)
    assert out["t"].ravel().tolist() == items  # trailing NULs and empty elements kept
    assert out["n"].tolist() == [0, 1, 2]


def test_bytes_frame_is_tritons_layout_and_str_goes_as_utf8():
    tritonclient_utils = pytest.importorskip("tritonclient.utils")
    metas, frames = encode_tensors({"t": [["é", b"\x00ab\x00"]]})
    assert metas == [{"name": "t", "datatype": "BYTES", "shape": [1, 2]}]
    expected = tritonclient_utils.serialize_byte_tensor(_objects([b"\xc3\xa9", b"\x00ab\x00"])).item()
    assert bytes(frames[0]) == expected
    with pytest.raises(ValueError, match="must be bytes or str, not int"):
        encode_tensors({"t": _objects([b"a", 3])})


@pytest.mark.parametrize(
    "shape, frame, words",
    [
        ([2], struct.pack("<I", 1) + b"a", "runs past the end"),  # the second element's length is missing
        ([1], struct.pack("<I", 5) + b"abc", "says 5 bytes, 3 are left"),
        ([1], struct.pack("<I", 2**32 - 1) + b"abc", "says 4294967295 bytes"),
        ([1], struct.pack("<I", 1) + b"ab", "1 bytes after the 1 BYTES elements"),
        ([0], b"\x00", "after the 0 BYTES elements"),
        ([3], b"\x00\x00", "runs past the end"),
        ([10**8], b"", "runs past the end"),  # a huge shape costs nothing: the frame ends first
    ],
)
def test_malformed_bytes_frames_are_refused(shape, frame, words):
    """Each refused by the codec; validate_tensor_metas refuses at once (without reading the lengths) a frame too
    short for the shape's 4-byte prefixes, or bytes for no element."""
    metas = [{"name": "t", "datatype": "BYTES", "shape": shape}]
    with pytest.raises(ProtocolError, match=words) as caught:
        decode_tensors(metas, [frame])
    assert "tensor 't'" in str(caught.value)
    if len(frame) < 4 * math.prod(shape) or (not shape[0] and frame):
        with pytest.raises(ProtocolError, match="length-prefixed elements, the frame has"):
            validate_tensor_metas(metas, [frame])
    else:
        validate_tensor_metas(metas, [frame])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(0, 6), max_size=3))
def test_any_bytes_frame_is_decoded_or_refused(frame, shape):
    metas = [{"name": "t", "datatype": "BYTES", "shape": shape}]
    try:
        out = decode_tensors(validate_tensor_metas(metas, [frame]), [frame])["t"]
    except ProtocolError:
        return
    assert out.shape == tuple(shape) and all(isinstance(v, bytes) for v in out.ravel())


# ---------------------------------------------------------------------------------------------------------------
# The edge: REST JSON and binary, gRPC
# ---------------------------------------------------------------------------------------------------------------


def test_rest_json_bytes_are_strings_in_and_out():
    body = json.dumps(
        {"inputs": [{"name": "s", "shape": [2, 1], "datatype": "BYTES", "data": [["héllo"], [""]]}]}
    ).encode()
    request = parse_infer_request(body)
    assert request.inputs["s"].dtype == object and request.inputs["s"].tolist() == [["héllo".encode()], [b""]]
    content, headers = oip.encode_infer_response("m", 1, {"o": _objects([b"ok", "é".encode()])}, request)
    assert json.loads(content)["outputs"] == [{"name": "o", "datatype": "BYTES", "shape": [2], "data": ["ok", "é"]}]
    with pytest.raises(InvalidRequest, match="not UTF-8 text.*binary_data"):
        oip.encode_infer_response("m", 1, {"o": _objects([b"\xff"])}, request)


@pytest.mark.parametrize(
    "data, words",
    [
        ([1, 2], "BYTES data must be strings, got integer"),
        ([0.5] * 100_000, "BYTES data must be strings, got numbers"),  # a long array of numbers: read as a span
        (["a", 2], "must be strings, got integer"),
        (["a"], "needs 2"),
    ],
)
def test_rest_json_bytes_refusals(data, words):
    shape = [2] if len(data) < 10 else [len(data)]
    body = json.dumps({"inputs": [{"name": "s", "shape": shape, "datatype": "BYTES", "data": data}]}).encode()
    with pytest.raises(InvalidRequest, match=words):
        parse_infer_request(body)


def test_rest_binary_bytes_in_and_out():
    raw = struct.pack("<I", 3) + b"\xffab" + struct.pack("<I", 0)
    head = json.dumps(
        {
            "inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "o", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = parse_infer_request(head + raw, str(len(head)))
    assert request.inputs["s"].tolist() == [b"\xffab", b""]
    content, headers = oip.encode_infer_response("m", 1, {"o": request.inputs["s"]}, request)
    length = int(headers[oip.HEADER_LENGTH])
    (entry,) = json.loads(content[:length])["outputs"]
    assert entry == {"name": "o", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}
    assert content[length:] == raw
    bad = raw[:-2]  # the last length cut short
    head = json.dumps(
        {"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(bad)}}]}
    ).encode()
    with pytest.raises(InvalidRequest, match="input 's': BYTES element 1 of 2"):
        parse_infer_request(head + bad, str(len(head)))


def test_grpc_bytes_contents_raw_and_outputs():
    grpc_service = pytest.importorskip("edge.grpc_service")
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="s", datatype="BYTES", shape=[1, 2])
    tensor.contents.bytes_contents.extend([b"a\x00", b""])
    inputs, _, _ = grpc_service.parse_request(request)
    assert inputs["s"].dtype == object and inputs["s"].tolist() == [[b"a\x00", b""]]

    raw = service_pb2.ModelInferRequest(model_name="m")
    raw.inputs.add(name="s", datatype="BYTES", shape=[2])
    raw.raw_input_contents.append(serialize_byte_tensor(_objects([b"x", b"yz"])).item())
    inputs, _, _ = grpc_service.parse_request(raw)
    assert inputs["s"].tolist() == [b"x", b"yz"]

    response = grpc_service.encode_response(raw, "m", 1, {"o": inputs["s"]}, None)
    assert response.outputs[0].datatype == "BYTES"
    assert deserialize_bytes_tensor(response.raw_output_contents[0]).tolist() == [b"x", b"yz"]

    raw.raw_input_contents[0] = raw.raw_input_contents[0] + b"!"
    with pytest.raises(InvalidRequest, match="1 bytes after the 2 BYTES elements"):
        grpc_service.parse_request(raw)
    request.inputs[0].contents.bytes_contents.append(b"extra")
    with pytest.raises(InvalidRequest, match="needs 2 elements, contents hold 3"):
        grpc_service.parse_request(request)


# ---------------------------------------------------------------------------------------------------------------
# The built-in decode
# ---------------------------------------------------------------------------------------------------------------


def test_decode_png_exactly_and_jpeg_to_uint8_hwc():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(bytes_models.encode(rgb, "PNG"), 3, 100), rgb)
    grey = decode_image(bytes_models.encode(rgb, "PNG"), 1, 100)
    assert grey.shape == (5, 7, 1) and grey.dtype == np.uint8
    jpeg = decode_image(bytes_models.encode(rgb), 3, 100)
    assert jpeg.shape == (5, 7, 3) and jpeg.dtype == np.uint8
    assert decode_image(tiny_image(1), 1, 1000).shape == (16, 16, 1)


def test_decode_refuses_bombs_before_decoding_and_bad_files():
    bomb = bytes_models.bomb_png(30000)
    assert len(bomb) < 64 * 1024
    started = time.monotonic()
    with pytest.raises(DecodeError, match="refused before decoding") as caught:
        decode_image(bomb, 3, 4096 * 4096, "input 'image' element 0")
    assert time.monotonic() - started < 1.0  # nothing was decoded
    assert str(caught.value).startswith("input 'image' element 0: PNG")
    with pytest.raises(DecodeError, match=r"5000 x 5000 = 25000000 pixels is over this input's limit of 1000000"):
        decode_image(bytes_models.bomb_png(5000), 3, 1_000_000)
    jpeg = bytes_models.sample_images(1)[0]
    with pytest.raises(DecodeError, match="cannot decode this JPEG"):
        decode_image(jpeg[: len(jpeg) // 2], 3, 10**6)
    with pytest.raises(DecodeError, match="not a JPEG or PNG image"):
        decode_image(b"GIF89a" + b"\x00" * 20, 3, 10**6)
    assert issubclass(DecodeError, InputError)  # the agent answers BAD_REQUEST


def test_warmup_inputs_hold_a_decodable_image():
    config = ModelConfig.from_dict(dict(bytes_models.CONFIG, name="c"))
    (image,) = config.warmup_inputs()["image"]
    assert decode_image(image, 3, 10**6).shape == (16, 16, 3)


# ---------------------------------------------------------------------------------------------------------------
# The agent's pipeline, loaded from a share
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def share(classifier_programs, tmp_path_factory):
    share = tmp_path_factory.mktemp("bytes-share")
    assert bytes_models.publish_classifier(share, classifier_programs) == 1
    return share


@pytest.fixture(scope="module")
def loaded(share):
    from cluster.agent.loaded_model import load_model
    from cluster.repository import ModelRepository

    return load_model(ModelRepository(share), "classifier", 1)


def test_pipeline_decodes_preprocesses_and_postprocesses_like_the_modules_run_directly(loaded):
    from cluster.agent.pipeline import stack_rows

    images = bytes_models.sample_images(5)  # each of another size
    expected_class, expected_score = bytes_models.reference([bytes_models.decoded(i) for i in images])
    assert len(set(expected_class.ravel().tolist())) > 1  # the classes differ: the comparison means something
    batch = stack_rows([_objects(images[:2]), _objects(images[2:])])  # two requests batched by the agent
    out = loaded.infer({"image": batch})
    np.testing.assert_array_equal(out["class"].numpy(), expected_class)
    np.testing.assert_allclose(out["score"].numpy(), expected_score, rtol=1e-5, atol=1e-6)


def test_pipeline_refuses_bombs_and_corrupt_images_and_keeps_serving(loaded):
    good = bytes_models.sample_images(1)
    with pytest.raises(DecodeError, match="input 'image' element 1: PNG refused before decoding"):
        loaded.infer({"image": _objects([good[0], bytes_models.bomb_png(30000)])})
    with pytest.raises(DecodeError, match="input 'image' element 0: cannot decode this JPEG"):
        loaded.infer({"image": _objects([good[0][:100]])})
    out = loaded.infer({"image": _objects(good)})
    assert out["class"].shape == (1, 1)


def test_a_version_without_preprocess_stacks_images_of_one_size(classifier_programs, tmp_path):
    """decode alone: images of one size are stacked [N, H, W, C]; of different sizes, refused with the reason."""
    import torch

    from cluster.agent.loaded_model import load_model
    from cluster.publish import publish_version
    from cluster.repository import ModelRepository

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.float().mean(dim=(1, 2, 3)).unsqueeze(1)

    program = torch.export.export(
        Mean(), (torch.zeros(2, 4, 4, 1, dtype=torch.uint8),), dynamic_shapes=({0: torch.export.Dim("b", max=64)},)
    )
    torch.export.save(program, tmp_path / "mean.pt2")
    config = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "mean", "datatype": "FP32", "shape": [-1, 1]}],
        "max_batch_size": 4,
        "decode": {"image": {"format": "image", "channels": 1}},
    }
    publish_version(tmp_path / "share", "mean", tmp_path / "mean.pt2", config)
    with pytest.raises(RepositoryError, match="warm-up failed"):  # the tiny warm-up image is 16 x 16, not 4 x 4
        load_model(ModelRepository(tmp_path / "share"), "mean", 1)
    program = torch.export.export(
        Mean(),
        (torch.zeros(2, 4, 4, 1, dtype=torch.uint8),),
        dynamic_shapes=({0: torch.export.Dim("b", max=64), 1: torch.export.Dim("h"), 2: torch.export.Dim("w")},),
    )
    torch.export.save(program, tmp_path / "mean.pt2")
    publish_version(tmp_path / "share", "mean", tmp_path / "mean.pt2", config)
    model = load_model(ModelRepository(tmp_path / "share"), "mean", 2)
    grey = np.full((3, 5), 100, np.uint8)
    out = model.infer({"image": _objects([bytes_models.encode(grey, "PNG")] * 2)})
    np.testing.assert_allclose(out["mean"].numpy(), [[100.0], [100.0]])
    with pytest.raises(InputError, match="images of different sizes.*no preprocess.pt2"):
        model.infer({"image": _objects([bytes_models.encode(grey, "PNG"), tiny_image(1)])})


def test_programs_are_checked_at_publish_and_hashed_at_load(classifier_programs, share, tmp_path):
    from cluster.agent.loaded_model import load_model
    from cluster.publish import publish_version
    from cluster.repository import ModelRepository

    model = classifier_programs["model.pt2"]
    with pytest.raises(RepositoryError, match="preprocess.pt2"):
        publish_version(tmp_path, "x", model, bytes_models.CONFIG, programs={"preprocess.pt2": b"junk"})
    with pytest.raises(RepositoryError, match="'setup.py' is not one of preprocess.pt2, postprocess.pt2"):
        publish_version(tmp_path, "x", model, bytes_models.CONFIG, programs={"setup.py": b"print()"})
    copy = tmp_path / "copy"
    shutil.copytree(share, copy)
    swapped = copy / "models" / "classifier" / "1" / "postprocess.pt2"
    swapped.write_bytes(classifier_programs["preprocess.pt2"].read_bytes())  # another program under its name
    with pytest.raises(RepositoryError, match="postprocess.pt2"):
        load_model(ModelRepository(copy), "classifier", 1)


def test_the_agents_workers_answer_bad_bytes_with_bad_request_and_serve_the_rest_of_the_batch(loaded):
    """Three requests taken as one batch: good JPEGs, a BYTES frame whose second length runs past it (the I/O
    thread's cheap check passes it: the worker's decode refuses it), a bomb. The batch fails, each runs alone: the
    good one is answered, the two others get BAD_REQUEST saying why."""
    import zmq

    from cluster.agent.runner import Job, WorkerPool
    from cluster.protocol import PREAMBLE, Command, unpack_header

    images = bytes_models.sample_images(2)
    expected_class, _ = bytes_models.reference([bytes_models.decoded(i) for i in images])
    good = encode_tensors({"image": _objects(images)})
    bad_frame = struct.pack("<I", 1) + b"a" + struct.pack("<I", 9) + b"bcd"
    bad = ([{"name": "image", "datatype": "BYTES", "shape": [2]}], [bad_frame])
    bomb = encode_tensors({"image": _objects([bytes_models.bomb_png(30000)])})
    ctx = zmq.Context()
    results = ctx.socket(zmq.PULL)
    results.bind("inproc://bytes-results")
    pool = WorkerPool(ctx, "inproc://bytes-results", "test-agent")
    for i, (metas, frames) in enumerate((good, bad, bomb)):
        validate_tensor_metas(metas, frames)  # what the agent's I/O thread checks
        pool.submit(Job(bytes([i]) * 8, i, loaded, metas, [bytes(f) for f in frames], None))
    pool.start()
    answers = {}
    try:
        for _ in range(3):
            assert results.poll(20_000), "no answer from the worker"
            frames = results.recv_multipart()
            answers[frames[0][5]] = (frames[0][:5], unpack_header(frames[1]), frames[2:])
    finally:
        pool.stop()
        results.close()
        ctx.term()
    preamble, header, tensors = answers[0]
    assert preamble == PREAMBLE[Command.REPLY], header
    out = decode_tensors(header["outputs"], tensors)
    np.testing.assert_array_equal(out["class"], expected_class)
    for i, words in ((1, "BYTES element 1 of 2 says 9 bytes, 3 are left"), (2, "PNG refused before decoding")):
        preamble, header, _ = answers[i]
        assert preamble == PREAMBLE[Command.ERROR] and header["code"] == "BAD_REQUEST", header
        assert words in header["message"], header


def test_a_preprocess_without_decode_takes_every_input_and_gives_the_models_arguments():
    """No decoded input: preprocess.pt2 takes the inputs in the config's order and returns the model's arguments;
    postprocess.pt2 takes the model's outputs (plain callables stand in for the loaded classifier_programs)."""
    import torch

    from cluster.agent.pipeline import Pipeline

    config = ModelConfig.from_dict(
        {
            "name": "p",
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [-1]},
                {"name": "b", "datatype": "FP32", "shape": [-1]},
            ],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        }
    )
    pipeline = Pipeline(config, "model 'p'", pre=[lambda a, b: (a + b, a - b)], post=[lambda s, d: s * d])
    a, b = torch.tensor([3.0]), torch.tensor([1.0])
    args = pipeline.model_args([a, b], "cpu")
    assert [t.tolist() for t in args] == [[4.0], [2.0]]
    assert pipeline.outputs((args[0], args[1])).tolist() == [8.0]
    with pytest.raises(InputError, match="input 'a' is BYTES"):
        pipeline.model_args([_objects([b"x"]), b], "cpu")


def test_a_compiled_package_that_fails_the_warm_up_behind_preprocess_falls_back_to_the_exported_program(
    share, monkeypatch
):
    """The package's probe is skipped where preprocess.pt2 feeds the model, so the warm-up is the first run of the
    package: one that fails there (here: compiled for another image size) runs the exported program instead of
    failing the version, and says why."""
    from cluster.agent import loaded_model
    from cluster.repository import ModelRepository

    def package(x):
        raise RuntimeError(f"input 0: expected size 64 at dim 2, got {x.shape[2]}")

    monkeypatch.setattr(loaded_model, "load_compiled", lambda verified, device, n: ([package] * n, ""))
    model = loaded_model.load_model(ModelRepository(share), "classifier", 1)
    assert model.runs == "exported"
    assert "model.aoti-cpu.pt2 failed the warm-up" in model.runs_why and "expected size 64" in model.runs_why
    images = bytes_models.sample_images(2)
    expected_class, _ = bytes_models.reference([bytes_models.decoded(i) for i in images])
    np.testing.assert_array_equal(model.infer({"image": _objects(images)})["class"].numpy(), expected_class)


def test_many_images_that_together_pass_the_total_pixel_bound_are_refused(loaded, monkeypatch):
    """Each image under max_pixels, but together more than DECODE_MAX_TOTAL_PIXELS (many small files that each
    inflate to the per-image limit): refused as a bad request, naming the bound; fewer images still served."""
    from cluster.agent import pipeline

    monkeypatch.setattr(pipeline, "DECODE_MAX_TOTAL_PIXELS", 3 * 16 * 16, raising=False)
    with pytest.raises(DecodeError, match=r"element 3: the images of this request decode to more than 768 pixels"):
        loaded.infer({"image": _objects([tiny_image(3)] * 4)})
    assert loaded.infer({"image": _objects([tiny_image(3)] * 3)})["class"].shape == (3, 1)


def test_the_memory_measured_at_load_counts_the_pre_and_post_programs(share):
    """Placement fills budgets with LoadedModel.memory: a version's preprocess.pt2 and postprocess.pt2 hold weights
    too (here the normalisation's mean and std), one copy per instance."""
    from cluster.agent.loaded_model import load_model
    from cluster.repository import ModelRepository

    def tensor_bytes(module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    pre, net, post = bytes_models.modules()
    model = load_model(ModelRepository(share), "classifier", 1)
    assert tensor_bytes(pre) > 0
    assert model.memory == tensor_bytes(pre) + tensor_bytes(net) + tensor_bytes(post)
