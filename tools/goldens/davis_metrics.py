"""Rebuild ``tests/golden/davis_metrics.json`` with the official DAVIS-2017 toolkit.

    python tools/goldens/davis_metrics.py /path/to/davis2017-evaluation [--out FILE]

The checkout is https://github.com/davisvideochallenge/davis2017-evaluation at ac7c43f. Its
``davis2017/metrics.py`` (``db_eval_iou``, ``db_eval_boundary``) and ``davis2017/utils.py``
(``db_statistics``) are imported from the checkout and run, unchanged, on the masks built here from fixed
seeds (numpy ``default_rng``; the masks are stored in the golden too, so the test never rebuilds them).
Needs opencv-python-headless and scikit-image (the toolkit's own dependencies). No shims.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN_DIR, checkout_commit, encode, parser, versions, write_json  # noqa: E402

NAME = "davis2017-evaluation"
OUT = GOLDEN_DIR / "davis_metrics.json"


def _px(shape, *points):
    m = np.zeros(shape, dtype=bool)
    for y, x in points:
        m[y, x] = True
    return m


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


def main(argv=None) -> None:
    args = parser("rebuild tests/golden/davis_metrics.json with the official DAVIS-2017 metrics", NAME, OUT) \
        .parse_args(argv)
    commit = checkout_commit(NAME, args.checkout, args.commit)
    sys.path.insert(0, str(args.checkout.resolve()))
    import cv2
    import skimage
    from davis2017.metrics import db_eval_boundary, db_eval_iou
    from davis2017.utils import db_statistics as official_statistics

    warnings.simplefilter("ignore", RuntimeWarning)
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
    write_json(args.out, {
        "source": f"github davisvideochallenge/davis2017-evaluation @ {commit}: "
                  "davis2017/metrics.py db_eval_iou, db_eval_boundary; davis2017/utils.py db_statistics",
        "generated_with": {**versions(np), "opencv": cv2.__version__, "scikit-image": skimage.__version__},
        "regenerate": "python tools/goldens/davis_metrics.py /path/to/davis2017-evaluation",
        "frames": frames, "sequences": sequences, "statistics": statistics,
    })
    print(f"{len(frames)} frames, {len(sequences)} sequences, {len(statistics)} statistics")


if __name__ == "__main__":
    main()
