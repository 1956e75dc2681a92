"""The shadow comparison: a mirrored answer against the stable version's answer to the same request, off the
broker's hot path (the broker's comparison thread calls `compare`).

Each answer is a REPLY as the broker received it after its route: [header frame, *tensor frames]. Outputs are matched
by name; names, shapes or dtypes that differ make the pair `mismatched`. Float outputs: the pair's max abs error and
max relative error (abs error over max(|stable|, atol)) go to the digest's histograms; [N, C] float scores also count
top-1 agreement per row. Integer and bool outputs: exact match. Nothing here unpickles: tensors are read with
numpy.frombuffer from the dtype names the protocol allows.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.canary.digest import ShadowDigest
from cluster.canary.judge import Criteria


def compare(stable: Sequence, mirrored: Sequence, into: ShadowDigest, criteria: Criteria) -> None:
    """Compare one pair of answers and count it in `into`. Malformed answers count as mismatched; never raises."""
    raise NotImplementedError  # (filled in by the judge's own commit)
