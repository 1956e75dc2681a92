"""The shadow comparison: a mirrored answer against the stable version's answer to the same request, off the
broker's hot path (the broker's comparison thread calls `compare`).

Each answer is a REPLY as the broker received it after its route: [header frame, *tensor frames]. Outputs are matched
by name; names, shapes or dtypes that differ make the pair `mismatched`. Float outputs: the pair's max abs error and
max relative error (abs error over max(|stable|, atol)) go to the digest's histograms; [N, C] float scores also count
top-1 agreement per row. Integer and bool outputs: exact match. Nothing here unpickles: tensors are read with
numpy.frombuffer from the dtype names the protocol allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cluster import protocol
from cluster.canary import histogram
from cluster.canary.digest import ShadowDigest
from cluster.canary.judge import Criteria
from cluster.codec import decode_tensors


def _outputs(answer: Sequence) -> dict[str, np.ndarray]:
    """name -> array of a REPLY's [header, *tensor frames]; ValueError (ProtocolError) when malformed."""
    if not answer:
        raise ValueError("no header frame")
    header = protocol.unpack_header(answer[0])
    frames = list(answer[1:])
    return decode_tensors(protocol.validate_tensor_metas(header.get("outputs"), frames, "outputs"), frames)


def _float_errors(a: np.ndarray, b: np.ndarray, atol: float) -> tuple[float, float]:
    """(max abs error, max relative error) of b against a; NaN or inf where the other is not: infinitely far."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - b64)
        same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))  # equal infinities, NaN in both
    diff[same] = 0.0
    diff[np.isnan(diff)] = np.inf
    if not diff.size:
        return 0.0, 0.0
    with np.errstate(invalid="ignore"):
        rel = diff / np.fmax(np.abs(a64), atol)  # fmax: a NaN in stable's answer divides by atol
    rel[np.isnan(rel)] = np.inf  # inf / inf: an infinite stable value against a finite one
    return float(diff.max()), float(rel.max())


def _add(hist: dict[int, int], value: float) -> None:
    """Count an error; an infinite one (NaN or inf against a number) in the last bucket."""
    if math.isfinite(value) and value < 1e200:
        histogram.add(hist, value, histogram.ERROR_BASE)
    else:
        hist[histogram.MAX_BUCKET] = hist.get(histogram.MAX_BUCKET, 0) + 1


def compare(stable: Sequence, mirrored: Sequence, into: ShadowDigest, criteria: Criteria) -> None:
    """Compare one pair of answers and count it in `into`. Malformed answers count as mismatched; never raises."""
    into.pairs += 1
    try:
        mine, theirs = _outputs(stable), _outputs(mirrored)
        if mine.keys() != theirs.keys() or any(
            mine[k].dtype != theirs[k].dtype or mine[k].shape != theirs[k].shape for k in mine
        ):
            into.mismatched += 1
            return
        max_abs = max_rel = 0.0
        floats = exact = inexact = False
        agree = rows = 0
        for name, a in mine.items():
            b = theirs[name]
            if a.dtype.kind == "f":
                floats = True
                abs_err, rel_err = _float_errors(a, b, criteria.atol)
                max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
                if a.ndim == 2 and a.shape[1] > 1 and a.shape[0]:
                    rows += a.shape[0]
                    agree += int((np.argmax(a, axis=1) == np.argmax(b, axis=1)).sum())
            else:
                exact = True
                inexact = inexact or not np.array_equal(a, b)
    except Exception:  # noqa: BLE001 - whatever an answer holds, the pair counts as mismatched (never raises)
        into.mismatched += 1
        return
    if floats:
        _add(into.abs_err, max_abs)
        _add(into.rel_err, max_rel)
    into.top1_agree += agree
    into.top1_rows += rows
    if exact:
        into.exact_pairs += 1
        into.exact += not inexact
