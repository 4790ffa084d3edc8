"""eval.metrics: J, F, statistics and cIoU/gIoU, by hand and against values recorded from the official
DAVIS-2017 toolkit (github davisvideochallenge/davis2017-evaluation @ ac7c43fca936f9722837b7fbd337d284ba37004b).

``tests/golden/davis_metrics.json`` holds the masks (zlib + base64) and the values the official
``db_eval_iou`` / ``db_eval_boundary`` / ``db_statistics`` returned for them. Regenerate it with the
official code checked out somewhere (it needs opencv-python-headless and scikit-image)::

    python tools/goldens/davis_metrics.py /path/to/davis2017-evaluation
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from eval.metrics import boundary_map, ciou_giou, db_statistics, f_measure, jaccard

GOLDEN = Path(__file__).parent / "golden" / "davis_metrics.json"
TOL = 1e-12


# ----------------------------------------------------------------------------------- array encoding

def decode(d: dict | None):
    """An array written by ``tools/goldens/_common.py::encode`` (zlib + base64, booleans bit-packed)."""
    if d is None:
        return None
    raw = zlib.decompress(base64.b64decode(d["data"]))
    n = int(np.prod(d["shape"]))
    if d["dtype"] == "bool":
        return np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(bool).reshape(d["shape"])
    return np.frombuffer(raw, np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def _nan(x):
    return math.nan if x is None else x


# --------------------------------------------------------------------------------------- by hand

def _px(shape, *points):
    m = np.zeros(shape, dtype=bool)
    for y, x in points:
        m[y, x] = True
    return m


def test_boundary_of_single_pixels_and_full_frame():
    # a pixel is on the boundary when it differs from its right, lower or lower-right neighbour: the
    # boundary of one pixel is the 2x2 block toward the origin
    assert np.array_equal(np.argwhere(boundary_map(_px((6, 6), (2, 2)))), [[1, 1], [1, 2], [2, 1], [2, 2]])
    assert np.array_equal(np.argwhere(boundary_map(_px((6, 6), (0, 0)))), [[0, 0]])
    # bottom-right corner: the corner itself never is; the last row/column compare along themselves
    assert np.array_equal(np.argwhere(boundary_map(_px((6, 6), (5, 5)))), [[4, 4], [4, 5], [5, 4]])
    assert not boundary_map(np.ones((6, 6))).any()                      # full frame: no boundary
    assert np.array_equal(boundary_map(np.ones((1, 1))), [[False]])
    stripe = np.zeros((4, 5), bool)
    stripe[:, 0] = True                                                 # touches the left border
    assert np.array_equal(np.argwhere(boundary_map(stripe)), [[0, 0], [1, 0], [2, 0], [3, 0]])


def test_jaccard_by_hand():
    gt = np.zeros((6, 6), bool)
    gt[0:2, 0:2] = True
    pred = np.zeros((6, 6), bool)
    pred[1:3, 1:3] = True
    assert jaccard(gt, pred) == pytest.approx(1 / 7, abs=0)             # 1 shared pixel of 7
    assert jaccard(gt, gt) == 1.0
    assert jaccard(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0           # both empty
    assert jaccard(gt, np.zeros_like(gt)) == 0.0                        # one empty
    assert jaccard(gt * 7, pred.astype(np.float32) * -2) == 1 / 7       # any nonzero value is foreground
    void = np.zeros((6, 6), bool)
    void[2, :] = True                                                   # hides 3 of pred's pixels
    assert jaccard(gt, pred, void) == 1 / 5
    assert jaccard(gt, pred, np.ones((6, 6))) == 1.0                    # everything void: empty union
    out = jaccard(np.stack([gt, gt]), np.stack([pred, gt]))
    assert out.dtype == np.float64 and out.shape == (2,) and list(out) == [1 / 7, 1.0]
    assert isinstance(jaccard(gt, pred), float)


def test_f_measure_by_hand():
    # 6x6 frame: tolerance ceil(0.008 * sqrt(72)) = 1 pixel, i.e. the 4-neighbourhood
    gt = _px((6, 6), (2, 2))                       # boundary (1,1) (1,2) (2,1) (2,2)
    right = _px((6, 6), (2, 4))                    # boundary (1,3) (1,4) (2,3) (2,4): 2 of 4 within 1 px
    assert f_measure(gt, right) == 0.5
    diagonal = _px((6, 6), (3, 3))                 # boundary (2,2) (2,3) (3,2) (3,3): 3 of 4 each way
    assert f_measure(gt, diagonal) == 0.75
    far = _px((6, 6), (5, 0))
    assert f_measure(gt, far) == 0.0
    assert f_measure(gt, gt) == 1.0
    assert f_measure(np.zeros((6, 6)), np.zeros((6, 6))) == 1.0         # both empty
    assert f_measure(gt, np.zeros((6, 6))) == 0.0                       # one empty
    # a full-frame mask has no boundary, so against an empty mask F is 1 (while J is 0)
    assert f_measure(np.ones((6, 6)), np.zeros((6, 6))) == 1.0
    assert jaccard(np.ones((6, 6)), np.zeros((6, 6))) == 0.0
    # a larger tolerance matches the far pixel: bound_th >= 1 is in pixels
    assert f_measure(gt, right, bound_th=2) == 1.0
    # void pixels are removed from both masks before the boundaries are drawn
    void = _px((6, 6), (2, 4))
    assert f_measure(gt, gt | right, void) == 1.0
    out = f_measure(np.stack([gt, gt]), np.stack([right, diagonal]))
    assert out.dtype == np.float64 and list(out) == [0.5, 0.75]
    assert isinstance(f_measure(gt, right), float)


def test_tolerance_radius_at_common_resolutions():
    from eval.metrics import bound_radius

    assert bound_radius((480, 854)) == 8
    assert bound_radius((720, 1280)) == 12
    assert bound_radius((1080, 1920)) == 18
    assert bound_radius((480, 854), 3) == 3


def test_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        jaccard(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="void"):
        f_measure(np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="dimensions"):
        f_measure(np.zeros(3), np.zeros(3))


def test_db_statistics_by_hand():
    # 8 frames: bin edges round(linspace(1, 8, 5) + 1e-10) - 1 = [0, 2, 4, 5, 7] (the 1e-10 rounds 4.5
    # up), and each bin includes its right edge: first bin frames 0..2, last bin frames 5..7
    values = [1, 1, 1, 1, 0, 0, 0, 0]
    assert db_statistics(values) == (0.5, 0.5, 1.0)
    assert db_statistics([0.5, 0.51, 0.2, 0.9])[1] == 0.5               # recall: strictly above 0.5
    mean, recall, decay = db_statistics([0.2, np.nan, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and recall == 0.25                # NaN frames: skipped by the mean,
    assert decay == pytest.approx(0.2 - 0.5)                            # not recalled, skipped in bins


def test_db_statistics_uint8_bin_edge_quirk():
    # the toolkit casts the bin edges to uint8: at 256 frames the last edge + 1 wraps to 0, past 256
    # the last edge wraps, so the last bin is empty and decay is NaN
    for n in (256, 300):
        mean, recall, decay = db_statistics(np.linspace(1, 0, n))
        assert mean == pytest.approx(0.5) and math.isnan(decay)
    # at 255 frames the edges still fit: decay is defined
    assert db_statistics(np.linspace(1, 0, 255))[2] == pytest.approx(0.75, abs=0.01)
    # 511 frames: the edges 0, 128, 255, 383, 510 wrap to 0, 128, 255, 127, 254: the first bin is
    # frames 0..128 and the "last" bin frames 127..254
    values = np.arange(511, dtype=float)
    assert db_statistics(values)[2] == np.mean(values[0:129]) - np.mean(values[127:255])
    assert all(math.isnan(x) for x in db_statistics([]))


def test_ciou_giou():
    ciou, giou = ciou_giou([1, 2, 0], [2, 4, 0])                        # last: empty GT and prediction
    assert ciou == 3 / 6 and giou == (0.5 + 0.5 + 1) / 3
    assert ciou_giou([0], [5]) == (0.0, 0.0)
    assert math.isnan(ciou_giou([0], [0])[0]) and ciou_giou([0], [0])[1] == 1.0
    with pytest.raises(ValueError):
        ciou_giou([3], [2])
    with pytest.raises(ValueError):
        ciou_giou([1, 2], [2])


# ------------------------------------------------------------------------------- official golden

@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_frames_agree_with_official(golden):
    worst, n = 0.0, 0
    for case in golden["frames"]:
        gt, pred, void = decode(case["gt"]), decode(case["pred"]), decode(case["void"])
        j = jaccard(gt, pred, void)
        f = f_measure(gt, pred, void, bound_th=case["bound_th"])
        worst = max(worst, abs(j - case["J"]), abs(f - case["F"]))
        assert abs(j - case["J"]) <= TOL, (case["name"], j, case["J"])
        assert abs(f - case["F"]) <= TOL, (case["name"], f, case["F"])
        n += 1
    assert n >= 100 and worst <= TOL


def test_sequences_agree_with_official(golden):
    for case in golden["sequences"]:
        gt, pred, void = decode(case["gt"]), decode(case["pred"]), decode(case["void"])
        j = jaccard(gt, pred, void)
        f = f_measure(gt, pred, void, bound_th=case["bound_th"])
        assert j.shape == f.shape == (gt.shape[0],)
        np.testing.assert_allclose(j, case["J"], rtol=0, atol=TOL, err_msg=case["name"])
        np.testing.assert_allclose(f, case["F"], rtol=0, atol=TOL, err_msg=case["name"])


def test_statistics_agree_with_official(golden):
    for case in golden["statistics"]:
        values = np.array([_nan(v) for v in case["values"]], dtype=float)
        got = db_statistics(values)
        for name, ours, theirs in zip(("mean", "recall", "decay"), got, case["expected"]):
            theirs = _nan(theirs)
            if math.isnan(theirs):
                assert math.isnan(ours), (len(values), name)
            else:
                assert abs(ours - theirs) <= TOL, (len(values), name, ours, theirs)
