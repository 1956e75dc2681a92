"""The digits demo data ships in the package (cluster/data/) and is read without scikit-learn, so an install does not
carry scikit-learn and scipy (~164 MB) for a 57 KB file (issue 24). These tests compare it with scikit-learn (a test
dependency only) and write the split file it is read with:

    python3 -m tests.test_digits_data    # rewrites cluster/data/digits_split.json from scikit-learn's split
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cluster.demo_models import TEST_SIZE, digits_split

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "cluster" / "data"


def sklearn_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The split as cluster.demo_models made it with scikit-learn up to issue 24 (x_train, y_train, x_test, y_test)."""
    data = load_digits()
    x = data.images.astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


def sklearn_split_indices() -> dict:
    """The rows of the data file in the split's train and test arrays, in their order: the same splitter on the same
    labels, given the row numbers in place of the images."""
    import sklearn

    y = load_digits().target
    train, test = train_test_split(np.arange(len(y)), test_size=TEST_SIZE, random_state=0, stratify=y)
    return {
        "made_by": (
            f"python3 -m tests.test_digits_data (scikit-learn {sklearn.__version__}): rows of digits.csv.gz in the "
            f"order of sklearn.model_selection.train_test_split(test_size={TEST_SIZE}, random_state=0, stratify=y)"
        ),
        "train": train.tolist(),
        "test": test.tolist(),
    }


def test_digits_split_is_scikit_learns_split_array_for_array():
    """The same four arrays as scikit-learn's loader and split (values, order, dtypes, shapes), so the demo model
    trained on them is the same model and accuracy figures stay comparable with those made before."""
    ours, theirs = digits_split(), sklearn_split()
    for name, a, b in zip(("x_train", "y_train", "x_test", "y_test"), ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.array_equal(a, b), f"{name} differs from scikit-learn's"
        assert a.flags.c_contiguous, name


def test_split_file_is_what_the_generator_writes():
    written = json.loads((DATA_DIR / "digits_split.json").read_text())
    expected = sklearn_split_indices()
    assert written["train"] == expected["train"] and written["test"] == expected["test"]


def test_data_file_is_scikit_learns_copy_with_the_checksum_its_readme_states():
    import sklearn.datasets

    data = (DATA_DIR / "digits.csv.gz").read_bytes()
    sklearn_copy = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    assert data == sklearn_copy.read_bytes(), f"cluster/data/digits.csv.gz is not the bytes of {sklearn_copy}"
    readme = (DATA_DIR / "README.md").read_text()
    stated = re.findall(r"sha256 ([0-9a-f]{64})", readme)
    assert stated == [hashlib.sha256(data).hexdigest()], f"README.md states {stated}"


def test_demo_model_builds_with_scikit_learn_and_scipy_blocked():
    """A fresh interpreter where any `import sklearn` or `import scipy` raises (as in an install without them)
    loads the split and trains the digits model (one epoch: the point is the imports, not the accuracy)."""
    code = """
        import sys
        sys.modules["sklearn"] = None
        sys.modules["scipy"] = None
        import torch
        from cluster.demo_models import TEST_SIZE, digits_split, train_digits

        x_train, y_train, x_test, y_test = digits_split()
        assert x_test.shape == (TEST_SIZE, 8, 8) and x_train.shape == (1797 - TEST_SIZE, 8, 8), x_test.shape
        model = train_digits(seed=0, epochs=1)
        print(tuple(model(torch.from_numpy(x_test[:4])).shape))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(4, 10)", done.stdout


if __name__ == "__main__":
    path = DATA_DIR / "digits_split.json"
    split = sklearn_split_indices()
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in split.items())
    path.write_text(text + "\n}\n")
    print(f"wrote {path}: {len(split['train'])} train and {len(split['test'])} test rows")
