"""DAVIS-2017 evaluation (unsupervised and semi-supervised) and Ref-DAVIS-17 (4 runs).

Semantics follow the official toolkit, github davisvideochallenge/davis2017-evaluation @
ac7c43fca936f9722837b7fbd337d284ba37004b (``davis2017/davis.py``, ``results.py``, ``evaluation.py``):

- GT: ``Annotations_unsupervised/480p/<seq>/*.png`` (unsupervised) or ``Annotations/480p`` (semi-supervised),
  palette PNGs with object ids, 255 = void; sequences from ``ImageSets/2017/<subset>.txt``
  (``ImageSets/2019`` for the unsupervised test-dev / test-challenge lists). The objects of a sequence
  are the ids ``1..max`` of its *first* annotated frame (as in the toolkit: an id that first appears
  later is not scored).
- Predictions: ``<results>/<seq>/<frame>.png`` for every GT frame, read with Pillow as indices
  (indexed PNG); the proposals are the ids ``1..max`` over all frames.
- unsupervised: every frame; void pixels are left out of J and F; at most 20 proposals; proposals are
  matched one-to-one to GT objects by the Hungarian algorithm (scipy ``linear_sum_assignment``) on the
  mean over frames of (J + F) / 2; a GT object left without a proposal is scored against an empty mask.
- semi-supervised: the first and last frames are dropped; prediction id k is GT object k; void pixels
  count as background (the toolkit passes no void mask in this mode); a prediction id above the number
  of GT objects is an error.
- Per object: mean / recall / decay of J and of F over frames (:func:`eval.metrics.db_statistics`);
  the reported J and F statistics are means over all objects of all sequences; ``J&F`` = (J mean + F
  mean) / 2.

Where this differs from the toolkit, on purpose: a missing or unreadable file is an error that lists
everything missing (the toolkit prints one name and exits); ``missing_as_empty`` scores missing
prediction frames as empty masks instead. ``per_object`` is keyed ``<seq>_<GT object id>`` with the
scores of the proposal matched to that object; the toolkit's ``M_per_object`` numbers the matched pairs
in proposal order, so its labels are permuted whenever the matching is (its overall numbers are not
affected, and ours equal them).

Ref-DAVIS-17 (:func:`evaluate_ref_davis17`): each of the 4 expression sets is predicted and scored as
a separate unsupervised run; the reported J, F and J&F are the means over the 4 runs (ReferFormer,
github wjn922/ReferFormer @ 06fc218f ``scripts/dist_test_davis.sh`` + ``eval_davis.py``, names the runs
``anno_0..anno_3``; ``tools/data/convert_davis_to_ytvos.py`` orders them Davis17_annot1,
Davis17_annot1_full_video, Davis17_annot2, Davis17_annot2_full_video).
"""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from eval.metrics import db_statistics, f_from_boundaries, jaccard, prepare_boundary
from refstream_errors import DatasetLayoutError, RefStreamError

VOID_LABEL = 255
MAX_PROPOSALS = 20
TASKS = ("unsupervised", "semi-supervised")
SUBSETS = ("train", "val", "test-dev", "test-challenge")
REF_DAVIS_RUNS = {
    "anno": ("anno_0", "anno_1", "anno_2", "anno_3"),
    "text": ("Davis17_annot1", "Davis17_annot1_full_video", "Davis17_annot2", "Davis17_annot2_full_video"),
}
LAYOUT = (
    "the DAVIS-2017 folder: D/JPEGImages/480p/<seq>/*.jpg, D/Annotations_unsupervised/480p/<seq>/*.png "
    "(unsupervised; D/Annotations/480p for semi-supervised) and D/ImageSets/2017/val.txt; D may also be a "
    "folder holding DAVIS/ (as Ref-DAVIS-17 is laid out), or ReferFormer's converted Ref-DAVIS layout "
    "D/valid/JPEGImages/<seq>, D/valid/Annotations/<seq>, D/meta_expressions/valid/meta_expressions.json"
)
RESULTS_LAYOUT = "R/<seq>/<frame>.png: indexed PNGs (value = object id, 0 = background), one per GT frame"


# -------------------------------------------------------------------------------------------- reading

def read_indexed_png(path: Path) -> np.ndarray:
    """A PNG as a 2-D integer array of its stored values (palette indices for indexed PNGs), as the
    toolkit reads it (``np.array(Image.open(path))``).

    Raises:
        RefStreamError: unreadable file or a colour (3-D) image.
    """
    try:
        with Image.open(path) as image:
            array = np.array(image)
    except (OSError, ValueError) as exc:
        raise RefStreamError(f"{path}: cannot read the PNG ({exc})") from exc
    if array.ndim != 2:
        raise RefStreamError(
            f"{path}: a {image.mode} image with shape {array.shape}; expected a single-channel indexed PNG "
            "(palette or grayscale) whose values are object ids"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


class DavisGT:
    """The ground truth of a DAVIS-2017 style dataset (see ``LAYOUT``).

    Args:
        root: the DAVIS folder, a folder holding ``DAVIS/``, or ReferFormer's converted Ref-DAVIS root.
        task: ``unsupervised`` (``Annotations_unsupervised``) or ``semi-supervised`` (``Annotations``).
        subset: the ``ImageSets`` list to read (``val`` by default).
        sequences: evaluate only these sequences (default: the whole list).

    Raises:
        DatasetLayoutError: the folder does not have the expected layout (the message shows it).
    """

    def __init__(self, root: str | Path, task: str = "unsupervised", subset: str = "val",
                 sequences: Iterable[str] | None = None, resolution: str = "480p"):
        if task not in TASKS:
            raise RefStreamError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
        if subset not in SUBSETS:
            raise RefStreamError(f"unknown subset {subset!r}; one of {', '.join(SUBSETS)}")
        self.task, self.subset = task, subset
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(f"{root}: not a folder. Expected {LAYOUT}.")
        annotations = "Annotations_unsupervised" if task == "unsupervised" else "Annotations"
        davis = root / "DAVIS" if (root / "DAVIS").is_dir() and not (root / "JPEGImages").is_dir() else root
        converted = root / "meta_expressions" / "valid" / "meta_expressions.json"
        if (davis / "JPEGImages").is_dir() or (davis / "ImageSets").is_dir() or not converted.is_file():
            self.root = davis
            self.images = davis / "JPEGImages" / resolution
            self.masks = davis / annotations / resolution
            year = "2019" if task == "unsupervised" and subset in ("test-dev", "test-challenge") else "2017"
            listing = davis / "ImageSets" / year / f"{subset}.txt"
            for part in (self.images, self.masks):
                if not part.is_dir():
                    raise DatasetLayoutError(f"{davis}: {part.relative_to(davis)} not found. Expected {LAYOUT}.")
            if not listing.is_file():
                raise DatasetLayoutError(
                    f"{davis}: the sequence list {listing.relative_to(davis)} not found. Expected {LAYOUT}.")
            names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        else:  # ReferFormer's converted layout: valid/{JPEGImages,Annotations}, meta_expressions/valid
            if task != "unsupervised":
                raise DatasetLayoutError(
                    f"{root}: the converted Ref-DAVIS layout holds only the unsupervised annotations; "
                    f"for the semi-supervised task give {LAYOUT.split(';')[0]}")
            self.root = root
            self.images = root / "valid" / "JPEGImages"
            self.masks = root / "valid" / "Annotations"
            for part in (self.images, self.masks):
                if not part.is_dir():
                    raise DatasetLayoutError(f"{root}: {part.relative_to(root)} not found. Expected {LAYOUT}.")
            try:
                names = list(json.loads(converted.read_text())["videos"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetLayoutError(f"{converted}: not a meta_expressions.json ({exc})") from exc
        if sequences is not None:
            wanted = list(sequences)
            unknown = [s for s in wanted if s not in names]
            if unknown:
                raise DatasetLayoutError(f"{self.root}: sequences not in the {subset} list: {', '.join(unknown)}")
            names = wanted
        self._sequences = names

    def sequences(self) -> list[str]:
        return list(self._sequences)

    def frame_ids(self, seq: str) -> list[str]:
        """Names (without ``.png``) of the GT frames of ``seq``: one per JPEG frame.

        Raises:
            DatasetLayoutError: no frames, or JPEG frames without a GT mask (listed).
        """
        images = sorted(p.stem for p in (self.images / seq).glob("*.jpg"))
        masks = sorted(p.stem for p in (self.masks / seq).glob("*.png"))
        if not images:
            raise DatasetLayoutError(f"{self.images / seq}: no JPEG frames. Expected {LAYOUT}.")
        if len(masks) < len(images):
            missing = sorted(set(images) - set(masks)) or images[len(masks):]
            raise DatasetLayoutError(
                f"{self.masks / seq}: {len(images)} frames but {len(masks)} GT masks; missing "
                f"{_short_list([m + '.png' for m in missing])}. The DAVIS evaluation needs a GT mask for "
                f"every frame. Expected {LAYOUT}.")
        return masks

    def load(self, seq: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(labels, void, frame_ids)``: labels uint8/uint16 [T, H, W] object ids with void set to 0,
        void bool [T, H, W]."""
        ids = self.frame_ids(seq)
        frames = [read_indexed_png(self.masks / seq / f"{i}.png") for i in ids]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            odd = [f"{i}.png {f.shape[0]}x{f.shape[1]}" for i, f in zip(ids, frames) if f.shape != frames[0].shape]
            raise DatasetLayoutError(
                f"{self.masks / seq}: GT masks differ in size (first {frames[0].shape[0]}x{frames[0].shape[1]}; "
                f"{_short_list(odd)})")
        labels = np.stack(frames)
        void = labels == VOID_LABEL
        labels[void] = 0
        return labels, void, ids


def _short_list(items: list[str], limit: int = 12) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"


def _read_results(results: Path, seq: str, ids: list[str], shape: tuple[int, int],
                  missing_as_empty: bool) -> np.ndarray:
    frames = []
    for i in ids:
        path = results / seq / f"{i}.png"
        if not path.is_file():
            if not missing_as_empty:
                raise DatasetLayoutError(f"{path}: prediction missing. Expected {RESULTS_LAYOUT}.")
            frames.append(np.zeros(shape, dtype=np.uint8))
            continue
        array = read_indexed_png(path)
        if array.shape != shape:
            raise RefStreamError(
                f"{path}: prediction is {array.shape[0]}x{array.shape[1]} but the GT is {shape[0]}x{shape[1]}")
        frames.append(array)
    return np.stack(frames)


def missing_predictions(gt: DavisGT, results: str | Path) -> list[str]:
    """Prediction files (relative to ``results``) that the evaluation needs and that do not exist."""
    results = Path(results)
    missing = []
    for seq in gt.sequences():
        ids = gt.frame_ids(seq)
        if gt.task == "semi-supervised":
            ids = ids[1:-1]
        if not (results / seq).is_dir():
            missing.append(f"{seq}/ (all {len(ids)} frames)")
            continue
        present = {p.stem for p in (results / seq).glob("*.png")}
        missing.extend(f"{seq}/{i}.png" for i in ids if i not in present)
    return missing


# ------------------------------------------------------------------------------------------- scoring

@dataclass
class ObjectScores:
    """Per-frame J and F of one GT object (after matching), with its name ``<seq>_<id>``."""

    name: str
    j: np.ndarray
    f: np.ndarray


def score_sequence_unsupervised(labels: np.ndarray, void: np.ndarray, pred: np.ndarray,
                                max_proposals: int = MAX_PROPOSALS, seq: str = "seq") -> list[ObjectScores]:
    """Score one sequence in the unsupervised protocol (Hungarian matching of proposals to objects).

    Args:
        labels: [T, H, W] GT ids (void already 0); the objects are ``1..labels[0].max()``.
        void: [T, H, W] bool void pixels (left out of J and F).
        pred: [T, H, W] predicted ids; the proposals are ``1..pred.max()``.

    Returns:
        one :class:`ObjectScores` per GT object, in the toolkit's order (matched pairs sorted by proposal).
    """
    # lazy: scipy.optimize takes ~0.5 s to import and only multi-object matching needs it
    from scipy.optimize import linear_sum_assignment

    n_gt = int(labels[0].max())
    n_res = int(pred.max())
    if n_res > max_proposals:
        raise RefStreamError(
            f"{seq}: the predictions hold id {n_res}, above the {max_proposals} proposals the unsupervised "
            "protocol allows")
    n_prop = max(n_res, n_gt)
    t = labels.shape[0]
    j_all = np.zeros((n_prop, n_gt, t))
    f_all = np.zeros((n_prop, n_gt, t))
    if n_gt == 0:
        return []
    # J of every (proposal, object) pair from one joint histogram per frame (exact integer counts)
    if int(labels.max()) > n_gt:  # ids absent from the first frame are not objects (as in the toolkit)
        labels = np.where(labels <= n_gt, labels, 0)
    bins = (n_gt + 1) * (n_res + 1)
    for i in range(t):
        code = labels[i].astype(np.intp) * (n_res + 1)
        code += pred[i]
        code[void[i]] = bins  # void pixels go to an extra bin that is dropped
        counts = np.bincount(code.ravel(), minlength=bins + 1)[:bins].reshape(n_gt + 1, n_res + 1)
        inter = counts[1:, 1:]                              # [n_gt, n_res]
        area_g = counts[1:].sum(axis=1)                     # [n_gt]
        area_p = counts[:, 1:].sum(axis=0)                  # [n_res]
        union = area_g[:, None] + area_p[None, :] - inter
        jf = np.ones((n_gt, n_res))
        nz = union > 0
        jf[nz] = inter[nz].astype(np.float64) / union[nz].astype(np.float64)
        j_all[:n_res, :, i] = jf.T
        j_all[n_res:, :, i] = np.where(area_g > 0, 0.0, 1.0)[None, :]
    # F of every pair from one prepared boundary (and dilation) per mask and frame
    gt_bounds = [[prepare_boundary(labels[i] == k, void[i]) for i in range(t)] for k in range(1, n_gt + 1)]
    res_bounds = [[prepare_boundary(pred[i] == k, void[i]) for i in range(t)] for k in range(1, n_res + 1)]
    res_bounds += [[None] * t] * (n_prop - n_res)
    for ii in range(n_gt):
        for jj in range(n_prop):
            f_all[jj, ii] = [f_from_boundaries(gt_bounds[ii][i], res_bounds[jj][i]) for i in range(t)]
    cost = (np.mean(j_all, axis=2) + np.mean(f_all, axis=2)) / 2
    rows, cols = linear_sum_assignment(-cost)
    return [ObjectScores(f"{seq}_{c + 1}", j_all[r, c], f_all[r, c]) for r, c in zip(rows, cols)]


def score_sequence_semisupervised(labels: np.ndarray, pred: np.ndarray, n_objects: int | None = None,
                                  seq: str = "seq") -> list[ObjectScores]:
    """Score one sequence in the semi-supervised protocol: prediction id k against GT object k, no void.

    ``labels`` and ``pred`` are the frames to score (the caller drops the first and last);
    ``n_objects`` defaults to ``labels[0].max()``.
    """
    n_gt = int(labels[0].max()) if n_objects is None else n_objects
    n_res = int(pred.max())
    if n_res > n_gt:
        raise RefStreamError(
            f"{seq}: the predictions hold id {n_res} but the sequence has {n_gt} object(s); in the "
            "semi-supervised protocol prediction id k is GT object k")
    out = []
    for k in range(1, n_gt + 1):
        g, p = labels == k, pred == k
        out.append(ObjectScores(f"{seq}_{k}", np.asarray(jaccard(g, p), dtype=np.float64),
                                np.asarray(_f_sequence(g, p), dtype=np.float64)))
    return out


def _f_sequence(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.array([f_from_boundaries(prepare_boundary(gt[i]), prepare_boundary(pred[i]))
                     for i in range(gt.shape[0])], dtype=np.float64)


def _evaluate_one(args) -> list[ObjectScores]:
    gt, results, seq, missing_as_empty = args
    labels, void, ids = gt.load(seq)
    n_gt = int(labels[0].max())
    if gt.task == "semi-supervised":
        if len(ids) < 3:
            raise DatasetLayoutError(
                f"{gt.masks / seq}: {len(ids)} frame(s); the semi-supervised protocol drops the first and last "
                "frames and needs at least 3")
        labels, ids = labels[1:-1], ids[1:-1]
        pred = _read_results(results, seq, ids, labels.shape[1:], missing_as_empty)
        return score_sequence_semisupervised(labels, pred, n_gt, seq)
    pred = _read_results(results, seq, ids, labels.shape[1:], missing_as_empty)
    return score_sequence_unsupervised(labels, void, pred, seq=seq)


def _num(x: float) -> float | None:
    """JSON-safe float: NaN becomes None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _mean(values: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.mean(values)) if values else math.nan


def summarize(objects: list[ObjectScores]) -> dict:
    """The JSON summary of scored objects: J and F mean/recall/decay (means over objects), J&F and
    ``per_object``. Values that are NaN in the toolkit are None."""
    stats = {"J": {"M": [], "R": [], "D": []}, "F": {"M": [], "R": [], "D": []}}
    per_object = {}
    for obj in objects:
        entry = {}
        for key, values in (("J", obj.j), ("F", obj.f)):
            m, r, d = db_statistics(values)
            stats[key]["M"].append(m)
            stats[key]["R"].append(r)
            stats[key]["D"].append(d)
            entry[key] = {"mean": _num(m), "recall": _num(r), "decay": _num(d)}
        per_object[obj.name] = entry
    out = {}
    for key in ("J", "F"):
        out[key] = {"mean": _num(_mean(stats[key]["M"])), "recall": _num(_mean(stats[key]["R"])),
                    "decay": _num(_mean(stats[key]["D"]))}
    out["J&F"] = _num((_mean(stats["J"]["M"]) + _mean(stats["F"]["M"])) / 2)
    out["per_object"] = per_object
    return out


def _run_map(fn: Callable, items: list, workers: int) -> list:
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def evaluate_davis(davis_root: str | Path, results: str | Path, task: str = "unsupervised",
                   subset: str = "val", sequences: Iterable[str] | None = None,
                   missing_as_empty: bool = False, workers: int = 1) -> dict:
    """Evaluate DAVIS-2017 predictions with the toolkit's semantics (see the module docstring).

    Returns:
        ``{"J": {"mean", "recall", "decay"}, "F": {...}, "J&F": float, "per_object": {"<seq>_<id>":
        {"J": {...}, "F": {...}}}}``.

    Raises:
        DatasetLayoutError: wrong GT layout, or prediction files missing (all listed) unless
            ``missing_as_empty``.
        RefStreamError: a prediction that cannot be scored (wrong size, colour PNG, too many ids).
    """
    gt = DavisGT(davis_root, task=task, subset=subset, sequences=sequences)
    results = Path(results)
    if not results.is_dir():
        raise DatasetLayoutError(f"{results}: results folder not found. Expected {RESULTS_LAYOUT}.")
    if not missing_as_empty:
        missing = missing_predictions(gt, results)
        if missing:
            raise DatasetLayoutError(
                f"{results}: {len(missing)} prediction file(s) missing: {_short_list(missing)}. Expected "
                f"{RESULTS_LAYOUT} (or pass --missing-as-empty to score them as empty masks).")
    per_seq = _run_map(_evaluate_one, [(gt, results, s, missing_as_empty) for s in gt.sequences()], workers)
    objects = [obj for seq_objects in per_seq for obj in seq_objects]
    return summarize(objects)


# --------------------------------------------------------------------------------------- Ref-DAVIS-17

def find_ref_davis_runs(results: str | Path) -> dict[str, Path]:
    """The 4 Ref-DAVIS-17 runs under ``results``: ``anno_0..anno_3`` or the 4 annotation-file names.

    Raises:
        DatasetLayoutError: neither complete set is there (the message lists what is missing).
    """
    results = Path(results)
    if not results.is_dir():
        raise DatasetLayoutError(f"{results}: results folder not found")
    found = {}
    for names in REF_DAVIS_RUNS.values():
        present = [n for n in names if (results / n).is_dir()]
        if len(present) == len(names):
            return {n: results / n for n in names}
        found[names] = present
    best = max(found, key=lambda names: len(found[names]))
    if found[best]:
        missing = [n for n in best if n not in found[best]]
        raise DatasetLayoutError(
            f"{results}: Ref-DAVIS-17 needs 4 runs; found {', '.join(found[best])} but not {', '.join(missing)}. "
            f"Expected R/<run>/<seq>/<frame>.png with runs {', '.join(REF_DAVIS_RUNS['anno'])} or "
            f"{', '.join(REF_DAVIS_RUNS['text'])}.")
    raise DatasetLayoutError(
        f"{results}: no Ref-DAVIS-17 runs found. Expected R/<run>/<seq>/<frame>.png with runs "
        f"{', '.join(REF_DAVIS_RUNS['anno'])} (ReferFormer) or {', '.join(REF_DAVIS_RUNS['text'])} (named after "
        "the davis_text_annotations files).")


def evaluate_ref_davis17(davis_root: str | Path, results: str | Path, missing_as_empty: bool = False,
                         workers: int = 1, sequences: Iterable[str] | None = None) -> dict:
    """Ref-DAVIS-17: the 4 runs scored as unsupervised DAVIS-2017 val, then averaged.

    Returns:
        the :func:`evaluate_davis` keys for the mean over runs (J / F statistics, J&F and
        ``per_object``, each the mean of the 4 runs' values) plus ``"runs": {name: evaluate_davis(...)}``.
    """
    runs = find_ref_davis_runs(results)
    gt = DavisGT(davis_root, task="unsupervised", subset="val", sequences=sequences)
    if not missing_as_empty:
        missing = [f"{name}/{m}" for name, path in runs.items() for m in missing_predictions(gt, path)]
        if missing:
            raise DatasetLayoutError(
                f"{results}: {len(missing)} prediction file(s) missing: {_short_list(missing)}. Expected "
                f"R/<run>/<seq>/<frame>.png (or pass --missing-as-empty to score them as empty masks).")
    per_run = {name: evaluate_davis(davis_root, path, task="unsupervised", subset="val", sequences=sequences,
                                    missing_as_empty=missing_as_empty, workers=workers)
               for name, path in runs.items()}
    return {**average_runs(list(per_run.values())), "runs": per_run}


def average_runs(runs: list[dict]) -> dict:
    """Mean over runs of J / F statistics, J&F and per-object statistics (None stays None)."""

    def avg(values):
        values = [v for v in values if v is not None]
        return _num(_mean(values)) if values else None

    out = {}
    for key in ("J", "F"):
        out[key] = {s: avg([r[key][s] for r in runs]) for s in ("mean", "recall", "decay")}
    out["J&F"] = avg([r["J&F"] for r in runs])
    names = [n for n in runs[0]["per_object"] if all(n in r["per_object"] for r in runs)]
    out["per_object"] = {
        n: {key: {s: avg([r["per_object"][n][key][s] for r in runs]) for s in ("mean", "recall", "decay")}
            for key in ("J", "F")}
        for n in names
    }
    return out
