"""bench/cnn.py's own logic, in-process: the model it serves is a ResNet-18 that answers as the plain network does,
its images/s survive answers that come in bursts, and its answer check catches a wrong shape, a wrong value and an
answer meant for another image. (The benchmark itself: `python3 bench/suite.py --only cnn`.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bench import cnn


def test_the_served_cnn_is_a_resnet18_that_answers_as_the_plain_network(tmp_path):
    torch = pytest.importorskip("torch")
    from bench.gpu import resnet18

    model, params = cnn.build_cnn(tmp_path / "cnn.pt")
    assert 11_600_000 < params < 11_800_000  # ResNet-18: 11,689,512
    # 64x64 rather than 224x224 keeps the test fast; the network does not care (adaptive pooling)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y = model(x)
        plain = resnet18(cnn.CLASSES)(x)  # NCHW, not frozen: the same weights (seeded)
        one = model(x[:1])
    assert y.dtype == torch.float32 and tuple(y.shape) == (2, cnn.CLASSES)
    assert torch.allclose(y, plain, rtol=cnn.RTOL, atol=cnn.ATOL)
    assert torch.allclose(y[:1], one, rtol=cnn.RTOL, atol=cnn.ATOL)  # a batch answers as its rows alone
    config = cnn.cnn_config()
    assert config["max_batch_size"] == 32 and config["inputs"][0]["shape"] == [-1, 3, 224, 224]


def test_images_per_second_is_the_rate_when_answers_come_in_bursts():
    # bursts of 31 and 1 answers (a batcher's pattern at 32 in flight), one every 0.35 s: 32 images per 0.7 s
    times = []
    for cycle in range(14):
        base = cycle * 0.7
        times += [base + 0.001 * i for i in range(31)] + [base + 0.35]
    window = [t for t in times if 0.2 <= t <= 9.3]  # starts and ends mid-cycle, as a measured window does
    assert cnn.images_per_second(window) == pytest.approx(32 / 0.7, rel=0.03)
    assert np.isnan(cnn.images_per_second([1.0]))


def test_wrong_answers_catches_shape_type_value_and_another_images_answer():
    rng = np.random.default_rng(0)
    expected = [rng.standard_normal((1, cnn.CLASSES)).astype(np.float32) * 0.05 for _ in range(2)]

    def answer(array):
        return SimpleNamespace(as_numpy=lambda name: array)

    def missing(name):
        raise KeyError(name)

    good = expected[0] + np.float32(1e-7)
    answers = [
        (0, answer(good)),
        (1, answer(expected[1].copy())),
        (0, answer(expected[0].reshape(cnn.CLASSES))),  # wrong shape
        (0, answer(expected[0].astype(np.float64))),  # wrong type
        (0, answer(expected[1])),  # another image's answer
        (1, answer(expected[1] + np.float32(1e-3))),  # off
        (1, SimpleNamespace(as_numpy=missing)),  # no such output
    ]
    wrong = cnn.wrong_answers(answers, expected)
    assert len(wrong) == 5, wrong
    assert "float32 [1, 1000]" in wrong[0] and "float64" in wrong[1]
    assert "off by" in wrong[2] and "off by" in wrong[3] and "KeyError" in wrong[4]
