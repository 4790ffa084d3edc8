"""eval.metrics: J, F, statistics and cIoU/gIoU, by hand and against values recorded from the official
DAVIS-2017 toolkit (github davisvideochallenge/davis2017-evaluation @ ac7c43fca936f9722837b7fbd337d284ba37004b).

``tests/golden/davis_metrics.json`` holds the masks (zlib + base64) and the values the official
``db_eval_iou`` / ``db_eval_boundary`` / ``db_statistics`` returned for them. Regenerate it with the
official code checked out somewhere (it needs opencv-python-headless and scikit-image)::

    python tests/test_metrics.py --official /path/to/davis2017-evaluation
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

def encode(a) -> dict | None:
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype == bool:
        raw, dtype = np.packbits(a.ravel()).tobytes(), "bool"
    else:
        raw, dtype = np.ascontiguousarray(a).tobytes(), a.dtype.str
    return {"shape": list(a.shape), "dtype": dtype, "data": base64.b64encode(zlib.compress(raw, 9)).decode()}


def decode(d: dict | None):
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


# ------------------------------------------------------------------------- golden regeneration

def _blobs(rng, shape, n):
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
        ry, rx = rng.uniform(0.5, max(h / 2, 1)), rng.uniform(0.5, max(w / 2, 1))
        m ^= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return m


def build_frame_cases() -> list[dict]:
    """The 2-D cases: hand-made edge cases, then random ones (the masks are stored in the golden file)."""
    cases = []

    def add(name, gt, pred, void=None, bound_th=0.008):
        cases.append({"name": name, "gt": np.asarray(gt), "pred": np.asarray(pred),
                      "void": None if void is None else np.asarray(void), "bound_th": bound_th})

    s = (7, 9)
    z, o = np.zeros(s, bool), np.ones(s, bool)
    add("both empty", z, z)
    add("gt empty", z, _px(s, (3, 3)))
    add("pred empty", _px(s, (3, 3)), z)
    add("both full", o, o)
    add("full vs empty", o, z)
    add("full vs pixel", o, _px(s, (3, 4)))
    add("full minus corner", o, o & ~_px(s, (6, 8)))
    for p in [(0, 0), (0, 8), (6, 0), (6, 8), (3, 4)]:
        for q in [(0, 0), (6, 8), (3, 5), (4, 4), p]:
            add(f"pixel {p} vs {q}", _px(s, p), _px(s, q))
    for name, sl in [("top", np.s_[0, :]), ("bottom", np.s_[-1, :]), ("left", np.s_[:, 0]), ("right", np.s_[:, -1])]:
        m = z.copy()
        m[sl] = True
        add(f"border stripe {name}", m, np.roll(m, 1, axis=0 if name in ("top", "bottom") else 1))
        add(f"border stripe {name} vs itself", m, m)
    checker = (np.indices(s).sum(0) % 2).astype(bool)
    add("checkerboard", checker, ~checker)
    add("checkerboard vs full", checker, o)
    void = _px(s, (3, 3), (3, 4))
    add("void covers the difference", _px(s, (2, 2)), _px(s, (2, 2), (3, 3), (3, 4)), void)
    add("void covers everything", _px(s, (2, 2)), _px(s, (5, 5)), o)
    add("void covers gt", _px(s, (3, 3)), _px(s, (3, 3), (1, 1)), _px(s, (3, 3)))
    for shape in [(1, 1), (1, 6), (6, 1), (2, 2)]:
        rng = np.random.default_rng(len(cases))
        for k in range(3):
            add(f"tiny {shape} #{k}", rng.random(shape) < 0.5, rng.random(shape) < 0.5)
    add("uint8 labels", np.array([[0, 3, 3], [0, 200, 0], [1, 0, 0]], np.uint8),
        np.array([[0, 0, 9], [0, 1, 1], [0, 0, 4]], np.uint8))
    add("float values", np.array([[0.0, 0.5, -1.0], [0.0, 0.0, 2.0]]), np.array([[0.0, 1e-9, 0.0], [3.0, 0.0, 0.0]]))
    for th in (1, 2, 2.5, 3.7, 0.0, 0.05):
        rng = np.random.default_rng(100 + len(cases))
        add(f"bound_th {th}", _blobs(rng, (30, 40), 2), _blobs(rng, (30, 40), 2), bound_th=th)

    rng = np.random.default_rng(2024)
    shapes = [(3, 7), (17, 13), (24, 40), (48, 64), (60, 100)]
    for shape in shapes:
        for k in range(24):
            kind = k % 6
            if kind == 0:
                gt, pred = rng.random(shape) < rng.random(), rng.random(shape) < rng.random()
            elif kind == 1:
                gt, pred = _blobs(rng, shape, 3), _blobs(rng, shape, 3)
            elif kind == 2:
                gt = _blobs(rng, shape, 2)
                pred = np.roll(gt, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
            elif kind == 3:
                gt, pred = np.zeros(shape, bool), rng.random(shape) < 0.02
            elif kind == 4:
                gt, pred = np.ones(shape, bool), _blobs(rng, shape, 2)
            else:
                gt, pred = _blobs(rng, shape, 2), _blobs(rng, shape, 2) | (rng.random(shape) < 0.05)
            void = (rng.random(shape) < 0.05) if k % 2 else None
            add(f"random {shape} #{k}", gt, pred, void)
    for k in range(6):  # full resolution: tolerance 8 px
        gt = _blobs(rng, (480, 854), 2)
        pred = np.roll(gt, tuple(rng.integers(-12, 13, 2)), axis=(0, 1)) if k % 2 else _blobs(rng, (480, 854), 2)
        void = _blobs(rng, (480, 854), 1) & (rng.random((480, 854)) < 0.5) if k >= 4 else None
        add(f"480x854 #{k}", gt, pred, void)
    return cases


def build_sequence_cases() -> list[dict]:
    rng = np.random.default_rng(7)
    cases = []
    for k, shape in enumerate([(5, 24, 40), (9, 60, 100), (3, 120, 214)]):
        gt = np.stack([_blobs(rng, shape[1:], 2) for _ in range(shape[0])])
        pred = np.stack([np.roll(g, tuple(rng.integers(-4, 5, 2)), axis=(0, 1)) for g in gt])
        gt[0] = False
        pred[0] = False            # a both-empty frame
        pred[1] = False            # a one-empty frame
        void = (rng.random(shape) < 0.03) if k != 1 else None
        cases.append({"name": f"sequence {shape}", "gt": gt, "pred": pred, "void": void, "bound_th": 0.008})
    return cases


def build_statistics_cases() -> list[list[float]]:
    rng = np.random.default_rng(11)
    out = []
    for n in list(range(0, 13)) + [16, 50, 100, 254, 255, 256, 257, 300, 511, 512, 700]:
        v = rng.random(n)
        if n > 3 and n % 3 == 0:
            v[rng.integers(0, n, max(1, n // 6))] = np.nan
        out.append(v.tolist())
    out.append([0.5] * 8)
    out.append([np.nan] * 5)
    return out


def regenerate(official: Path) -> None:
    """Write ``GOLDEN`` from the official toolkit at ``official`` (a checkout of davis2017-evaluation)."""
    import platform
    import subprocess
    import sys
    import warnings

    sys.path.insert(0, str(official))
    import cv2
    import skimage
    from davis2017.metrics import db_eval_boundary, db_eval_iou
    from davis2017.utils import db_statistics as official_statistics

    warnings.simplefilter("ignore", RuntimeWarning)
    try:
        commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    frames = []
    for case in build_frame_cases():
        j = float(db_eval_iou(case["gt"], case["pred"], case["void"]))
        f = float(db_eval_boundary(case["gt"], case["pred"], case["void"], bound_th=case["bound_th"]))
        frames.append({"name": case["name"], "bound_th": case["bound_th"], "J": j, "F": f,
                       "gt": encode(case["gt"]), "pred": encode(case["pred"]), "void": encode(case["void"])})
    sequences = []
    for case in build_sequence_cases():
        j = db_eval_iou(case["gt"], case["pred"], case["void"])
        f = db_eval_boundary(case["gt"], case["pred"], case["void"], bound_th=case["bound_th"])
        sequences.append({"name": case["name"], "bound_th": case["bound_th"], "J": [float(x) for x in j],
                          "F": [float(x) for x in f], "gt": encode(case["gt"]), "pred": encode(case["pred"]),
                          "void": encode(case["void"])})
    statistics = []
    for values in build_statistics_cases():
        expected = official_statistics(np.array(values, dtype=float))
        statistics.append({"values": [None if math.isnan(v) else v for v in values],
                           "expected": [None if math.isnan(x) else float(x) for x in expected]})
    GOLDEN.write_text(json.dumps({
        "source": f"github davisvideochallenge/davis2017-evaluation @ {commit or 'ac7c43fca936f9722837b7fbd337d284ba37004b'}: "
                  "davis2017/metrics.py db_eval_iou, db_eval_boundary; davis2017/utils.py db_statistics",
        "generated_with": {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
                           "scikit-image": skimage.__version__},
        "regenerate": "python tests/test_metrics.py --official /path/to/davis2017-evaluation",
        "frames": frames, "sequences": sequences, "statistics": statistics,
    }, separators=(",", ":")))
    print(f"wrote {GOLDEN}: {len(frames)} frames, {len(sequences)} sequences, {len(statistics)} statistics")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="regenerate tests/golden/davis_metrics.json")
    parser.add_argument("--official", required=True, type=Path, help="checkout of davis2017-evaluation")
    regenerate(parser.parse_args().official)
