"""Rebuild ``tests/golden/davis_metrics_eval.json`` with the official DAVIS-2017 and MeViS evaluation code.

    python tools/goldens/davis_metrics_eval.py /path/to/davis2017-evaluation --mevis /path/to/MeViS [--out FILE]

Checkouts: https://github.com/davisvideochallenge/davis2017-evaluation at ac7c43f and
https://github.com/henghuiding/MeViS at 7c0620b. Three parts, each written to disk as the official code
reads it (with the writers ``tests/test_eval_cli.py`` also uses) and scored by the official code:

* synthetic DAVIS-2017 sequences (fixed seeds, built here; stored in the golden as label maps) scored with
  ``davis2017/evaluation.py`` ``DAVISEvaluation.evaluate`` for both tasks; the unsupervised Hungarian
  assignment is recorded by wrapping the module's ``linear_sum_assignment`` (the result is passed through
  unchanged);
* a synthetic MeViS split (meta_expressions.json, mask_dict.json with COCO RLE, 0/255 PNG predictions) scored
  by running ``tools/eval_mevis.py`` as a subprocess (its own ``tools/metrics.py``, 64 worker processes);
* the bundled ``examples/ref-davis17-mini`` / ``examples/mevis-mini`` ground truth, shifted by a fixed offset
  per run, scored with both.

Needs opencv-python-headless, scikit-image, scipy, tqdm, pycocotools (the official code's dependencies).
No shims.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXPECTED, GOLDEN_DIR, REPO, URLS, checkout_commit, encode, use_repository, versions, write_json  # noqa: E402

OUT = GOLDEN_DIR / "davis_metrics_eval.json"


def _rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _labels(shape, *masks):
    out = np.zeros(shape, np.uint8)
    for k, m in enumerate(masks, 1):
        if m is not None:
            out[m] = k
    return out


def build_davis_sequences() -> dict[str, dict]:
    """Synthetic sequences (uint8 label maps): gt (255 = void), gt_semi, pred_unsupervised, pred_semi."""
    rng = np.random.default_rng(5)
    seqs = {}

    # hungarian: cost (J+F)/2 ~ [[0.6, 0.4], [0.4, 0]]: greedy takes (p1, A) first, the optimum swaps
    s = (40, 60)
    a, b = _rect(s, 5, 25, 4, 20), _rect(s, 10, 30, 40, 56)
    gt = np.stack([_labels(s, a, b)] * 5)
    pred = np.stack([_labels(s, np.roll(a, 1, axis=1))] * 3 + [_labels(s, b, a)] * 2)
    seqs["hungarian"] = {"gt": gt, "gt_semi": gt, "pred_unsupervised": pred, "pred_semi": np.stack([_labels(s, a, b)] * 5)}

    # void: a void band across both objects; predictions paint into it
    s = (48, 80)
    frames, preds, semi = [], [], []
    for t in range(5):
        o1, o2 = _disc(s, 20 + t, 20 + 2 * t, 10), _rect(s, 8, 40, 50, 70 - t)
        g = _labels(s, o1, o2)
        g[22:26, :] = 255
        frames.append(g)
        p = _labels(s, np.roll(o1, (1, t % 3), axis=(0, 1)), o2)
        p[22:26, 5:75] = 1
        preds.append(p)
        semi.append(_labels(s, np.roll(o1, 2, axis=1), np.roll(o2, -1, axis=0)))
    seqs["void"] = {"gt": np.stack(frames), "gt_semi": np.stack(frames), "pred_unsupervised": np.stack(preds),
                    "pred_semi": np.stack(semi)}

    # many: 3 objects, 5 proposals in another order, one of them junk and one tiny
    frames, preds, semi = [], [], []
    for t in range(6):
        o1, o2, o3 = _disc(s, 12, 12 + t, 8), _rect(s, 25, 45, 5, 30), _disc(s, 30, 60 - t, 12)
        frames.append(_labels(s, o1, o2, o3))
        junk = rng.random(s) < 0.02
        tiny = _rect(s, 0, 1, 78, 80)
        p = _labels(s, np.roll(o3, (t % 2, 1), axis=(0, 1)), o1 & ~_rect(s, 0, 12, 0, 80), o2 | _rect(s, 44, 48, 5, 40),
                    junk & ~(o1 | o2 | o3), tiny)
        preds.append(p)
        semi.append(_labels(s, np.roll(o1, -1, axis=0), o2 & (rng.random(s) < 0.9), None if t == 3 else o3))
    seqs["many"] = {"gt": np.stack(frames), "gt_semi": np.stack(frames), "pred_unsupervised": np.stack(preds),
                    "pred_semi": np.stack(semi)}

    # fewer: 3 objects, a single proposal (the others are scored against empty masks)
    s = (40, 60)
    o1, o2, o3 = _rect(s, 2, 12, 2, 20), _rect(s, 20, 38, 10, 30), _disc(s, 20, 48, 8)
    gt = np.stack([_labels(s, o1, o2, o3)] * 5)
    pred = np.stack([_labels(s, np.roll(o2, t - 2, axis=1)) for t in range(5)])
    seqs["fewer"] = {"gt": gt, "gt_semi": gt, "pred_unsupervised": pred, "pred_semi": pred}

    # late: object 2 appears after the first frame, so it is not an object of the sequence
    gt = np.stack([_labels(s, o1, None if t < 2 else o3) for t in range(5)])
    pred = np.stack([_labels(s, o1, o3) for t in range(5)])
    seqs["late"] = {"gt": gt, "gt_semi": gt, "pred_unsupervised": pred, "pred_semi": np.stack([_labels(s, o1)] * 5)}

    # long: 14 frames, the object leaves (empty GT frames) and the prediction degrades (decay)
    s = (30, 50)
    frames, preds = [], []
    for t in range(14):
        o = _disc(s, 15, 8 + 2 * t, 6) if t not in (6, 7) else np.zeros(s, bool)
        frames.append(_labels(s, o))
        p = np.roll(o, (t // 3, t // 2), axis=(0, 1))
        if t == 7:
            p = _disc(s, 3, 3, 2)           # a false positive on an empty GT frame
        preds.append(_labels(s, p))
    seqs["long"] = {"gt": np.stack(frames), "gt_semi": np.stack(frames), "pred_unsupervised": np.stack(preds),
                    "pred_semi": np.stack(preds)}

    # hires: 240x427 (tolerance 4 px), shifted predictions with ids swapped
    s = (240, 427)
    o1, o2 = _disc(s, 100, 120, 60), _rect(s, 50, 200, 250, 400)
    gt = np.stack([_labels(s, np.roll(o1, 3 * t, axis=1), o2) for t in range(3)])
    pred = np.stack([_labels(s, np.roll(o2, (2, -3), axis=(0, 1)), np.roll(o1, 3 * t + 5, axis=1)) for t in range(3)])
    semi = np.stack([_labels(s, np.roll(o1, 3 * t + 4, axis=1), np.roll(o2, 6, axis=0)) for t in range(3)])
    seqs["hires"] = {"gt": gt, "gt_semi": gt, "pred_unsupervised": pred, "pred_semi": semi}

    # noobj: the first frame has no object, so nothing is scored
    s = (30, 50)
    gt = np.stack([_labels(s, None if t == 0 else _disc(s, 15, 25, 5)) for t in range(4)])
    pred = np.stack([_labels(s, _disc(s, 15, 25, 5))] * 4)
    seqs["noobj"] = {"gt": gt, "gt_semi": gt, "pred_unsupervised": pred, "pred_semi": np.zeros_like(pred)}
    return seqs


def build_mevis_videos() -> dict:
    from pycocotools import mask as cocomask

    def rle(m):
        r = cocomask.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": [int(x) for x in r["size"]], "counts": r["counts"].decode()}

    rng = np.random.default_rng(9)
    videos = {}
    s, T = (40, 60), 4
    a0 = [_disc(s, 15, 15 + 3 * t, 7) for t in range(T)]
    a1 = [_rect(s, 20, 35, 30 + t, 50) if t != 2 else None for t in range(T)]
    union = [a0[t] | (a1[t] if a1[t] is not None else False) for t in range(T)]
    videos["v1"] = {
        "T": T, "H": s[0], "W": s[1],
        "expressions": {"0": {"exp": "the ball", "obj_id": [0], "anno_id": [0]},
                        "1": {"exp": "both things", "obj_id": [0, 1], "anno_id": [0, 1]},
                        "2": {"exp": "the box", "obj_id": [1], "anno_id": [1]}},
        "mask_dict": {"0": [rle(m) for m in a0], "1": [None if m is None else rle(m) for m in a1]},
        "pred": {"0": np.stack([np.roll(m, (1, 2), axis=(0, 1)) for m in a0]),
                 "1": np.stack([u | (rng.random(s) < 0.01) for u in union]),
                 "2": np.stack([_rect(s, 20, 35, 30, 50)] * T)},
    }
    s, T = (48, 64), 3
    a2 = [_rect(s, 5, 40, 10 + 5 * t, 30 + 5 * t) for t in range(T)]
    videos["v2"] = {
        "T": T, "H": s[0], "W": s[1],
        "expressions": {"0": {"exp": "the block", "obj_id": [2], "anno_id": [2]},
                        "1": {"exp": "the moving block", "obj_id": [2], "anno_id": [2]}},
        "mask_dict": {"2": [rle(m) for m in a2]},
        "pred": {"0": np.stack([np.roll(m, 2, axis=1) for m in a2]), "1": np.zeros((T, *s), bool)},
    }
    return videos


REAL_REF_DAVIS_SHIFT = (4, 9)
REAL_MEVIS_SHIFT = (2, 3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="rebuild tests/golden/davis_metrics_eval.json with the official "
                                            "DAVIS-2017 and MeViS evaluation code")
    p.add_argument("checkout", type=Path, help=f"a checkout of {URLS['davis2017-evaluation']} "
                                               f"(at {EXPECTED['davis2017-evaluation'][:7]})")
    p.add_argument("--mevis", required=True, type=Path, help=f"a checkout of {URLS['MeViS']} (at {EXPECTED['MeViS'][:7]})")
    p.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT.relative_to(REPO)})")
    p.add_argument("--commit", help="the DAVIS checkout's commit, when it is neither a git checkout nor has a COMMIT file")
    p.add_argument("--mevis-commit", help="the same for the MeViS checkout")
    p.add_argument("--examples", type=Path, default=REPO / "examples", help="the bundled examples folder")
    args = p.parse_args(argv)
    davis_commit = checkout_commit("davis2017-evaluation", args.checkout, args.commit)
    mevis_commit = checkout_commit("MeViS", args.mevis, args.mevis_commit)
    mevis_script = args.mevis.resolve() / "tools" / "eval_mevis.py"
    examples_dir = args.examples.resolve()

    use_repository()
    from test_eval_cli import RUNS_ANNO, _mevis_predictions, _ref_davis_results, write_davis, write_mevis

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(args.checkout.resolve()))
    import davis2017.evaluation as official_evaluation
    from davis2017.evaluation import DAVISEvaluation

    assignments: list = []
    original_lsa = official_evaluation.linear_sum_assignment

    def recording_lsa(cost):
        rows, cols = original_lsa(cost)
        assignments.append([[int(r), int(c)] for r, c in zip(rows, cols)])
        return rows, cols

    official_evaluation.linear_sum_assignment = recording_lsa

    def davis_official_run(davis_root: Path, results: Path, task: str) -> dict:
        assignments.clear()
        ev = DAVISEvaluation(davis_root=str(davis_root), task=task, gt_set="val")
        res = ev.evaluate(str(results))
        out = {k: {letter: [float(x) for x in res[k][letter]] for letter in ("M", "R", "D")} for k in ("J", "F")}
        if task == "unsupervised":
            out["assignment"] = dict(zip(ev.dataset.get_sequences(), [list(a) for a in assignments]))
        return out

    def mevis_official_run(split: Path, pred: Path) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            save = Path(tmp) / "out.json"
            proc = subprocess.run(
                [sys.executable, str(mevis_script), "--mevis_exp_path", str(split / "meta_expressions.json"),
                 "--mevis_mask_path", str(split / "mask_dict.json"), "--mevis_pred_path", str(pred),
                 "--save_name", str(save)],
                capture_output=True, text=True, check=True, cwd=tmp)
            per = {k: [float(v[0]), float(v[1])] for k, v in json.loads(save.read_text()).items()}
        vals = {line.split(":")[0]: float(line.split(":")[1]) for line in proc.stdout.splitlines()
                if line.split(":")[0] in ("J", "F", "J&F")}
        return {"per_expression": per, **vals}

    golden: dict = {
        "source": {
            "davis": f"github davisvideochallenge/davis2017-evaluation @ {davis_commit} "
                     "davis2017/evaluation.py DAVISEvaluation.evaluate (assignment recorded from its "
                     "linear_sum_assignment call)",
            "mevis": f"github henghuiding/MeViS @ {mevis_commit} tools/eval_mevis.py",
        },
        "generated_with": versions(np),
        "regenerate": "python tools/goldens/davis_metrics_eval.py /path/to/davis2017-evaluation --mevis /path/to/MeViS",
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seqs = build_davis_sequences()
        write_davis(tmp / "DAVIS", seqs, {"unsupervised": tmp / "res_uns", "semi": tmp / "res_semi"})
        golden["davis"] = {
            "sequences": {seq: {k: encode(v) for k, v in data.items()} for seq, data in seqs.items()},
            "official": {"unsupervised": davis_official_run(tmp / "DAVIS", tmp / "res_uns", "unsupervised"),
                         "semi-supervised": davis_official_run(tmp / "DAVIS", tmp / "res_semi", "semi-supervised")},
        }
        videos = build_mevis_videos()
        write_mevis(tmp / "valid_u", tmp / "pred", videos)
        golden["mevis"] = {
            "videos": {vid: {**{k: v for k, v in data.items() if k != "pred"},
                             "pred": {e: encode(p) for e, p in data["pred"].items()}} for vid, data in videos.items()},
            "official": mevis_official_run(tmp / "valid_u", tmp / "pred"),
        }
        # real data, perturbed
        results = _ref_davis_results(examples_dir, tmp / "real_ref", RUNS_ANNO, shift=REAL_REF_DAVIS_SHIFT)
        runs = {}
        for run in RUNS_ANNO:
            r = davis_official_run(examples_dir / "ref-davis17-mini" / "DAVIS", results / run, "unsupervised")
            runs[run] = {k: {letter: r[k][letter][0] for letter in ("M", "R", "D")} for k in ("J", "F")}
        golden["real"] = {"ref_davis17": {"shift": list(REAL_REF_DAVIS_SHIFT), "runs": runs}}
        pred = _mevis_predictions(examples_dir, tmp / "real_mevis", shift=REAL_MEVIS_SHIFT)
        golden["real"]["mevis"] = {"shift": list(REAL_MEVIS_SHIFT),
                                   **mevis_official_run(examples_dir / "mevis-mini" / "valid_u", pred)}
    write_json(args.out, golden)


if __name__ == "__main__":
    main()
