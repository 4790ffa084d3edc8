"""MeViS: the split reader and the ``valid_u`` evaluation.

Layout of a split folder (``valid_u``, ``valid``, ``train``)::

    S/meta_expressions.json   {"videos": {vid: {"expressions": {exp_id: {"exp": str, "obj_id": [..],
                                                                         "anno_id": [..]}},
                                                "frames": [frame, ...]}}}
    S/JPEGImages/<vid>/<frame>.jpg
    S/mask_dict.json          {anno_id: [COCO RLE {"size": [h, w], "counts": str} or null, one per frame]}
                              (valid_u and train only: valid is scored by the server)

Evaluation semantics follow the official script, github henghuiding/MeViS @
7c0620b9dc0ab7802747957f221674f175c8a47b ``tools/eval_mevis.py`` (with ``tools/metrics.py``, a copy of
the DAVIS-2017 metrics): the GT of an expression is the union of its ``anno_id`` masks (summed as
uint8, nonzero = foreground); the prediction ``<pred>/<vid>/<exp_id>/<frame>.png`` is read as OpenCV
grayscale (nonzero = foreground); per expression J and F are the means over *all* listed frames of the
per-frame :func:`eval.metrics.jaccard` and :func:`eval.metrics.f_measure` (no void; a frame where both
masks are empty scores 1); the final J and F are the unweighted means over expressions and
J&F = (J + F) / 2.

Deliberate differences: the official script scores a missing video as [0, 0] and crashes or silently
drops an expression with a missing frame; here any missing video, expression folder or frame is an
error that lists what is missing, and ``missing_as_empty`` scores each missing frame as an empty mask
instead (an empty prediction of a non-empty GT frame scores 0, of an empty GT frame 1). Expressions are
averaged in the order of ``meta_expressions.json`` (the official order depends on its worker
processes, which only moves the last bits of the mean).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as cocomask

from eval.metrics import f_measure, jaccard
from refstream_errors import DatasetLayoutError, RefStreamError

SPLITS = ("valid_u", "valid", "train")
LAYOUT = (
    "S/meta_expressions.json ({\"videos\": {vid: {\"expressions\": {exp_id: {\"exp\", \"obj_id\", \"anno_id\"}}, "
    "\"frames\": [..]}}}), S/JPEGImages/<vid>/<frame>.jpg and, for valid_u and train, S/mask_dict.json "
    "({anno_id: [COCO RLE or null per frame]})"
)
PRED_LAYOUT = "<pred>/<vid>/<exp_id>/<frame>.png, 0/255 grayscale PNGs, one per listed frame"


class MevisSplit:
    """A MeViS split folder (see the module docstring for the layout).

    Raises:
        DatasetLayoutError: the folder does not have the expected layout (the message shows it).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.root}: not a folder. Expected a MeViS split folder: {LAYOUT}.")
        meta = self.root / "meta_expressions.json"
        if not meta.is_file():
            hint = ""
            subs = [s for s in SPLITS if (self.root / s / "meta_expressions.json").is_file()]
            if subs:
                hint = f" (this looks like the MeViS root: give one of {', '.join(str(self.root / s) for s in subs)})"
            raise DatasetLayoutError(f"{self.root}: meta_expressions.json not found{hint}. Expected {LAYOUT}.")
        try:
            self.meta = json.loads(meta.read_text())["videos"]
            for vid, info in self.meta.items():
                info["frames"], info["expressions"]  # noqa: B018 - presence check
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetLayoutError(f"{meta}: not a MeViS meta_expressions.json ({exc!r}). Expected {LAYOUT}.") from exc
        self._masks = None

    @property
    def name(self) -> str:
        return self.root.name

    def videos(self) -> list[str]:
        return list(self.meta)

    def frames(self, video: str) -> list[str]:
        return list(self.meta[video]["frames"])

    def expressions(self, video: str) -> dict[str, dict]:
        """``{exp_id: {"exp": str, "obj_id": [...], "anno_id": [...]}}`` of a video."""
        return dict(self.meta[video]["expressions"])

    def has_masks(self) -> bool:
        return (self.root / "mask_dict.json").is_file()

    def mask_dict(self) -> dict:
        if self._masks is None:
            path = self.root / "mask_dict.json"
            if not path.is_file():
                raise DatasetLayoutError(
                    f"{self.root}: mask_dict.json not found, so this split cannot be scored offline (MeViS "
                    f"'valid' is scored by the evaluation server; valid_u and train ship masks). Expected {LAYOUT}.")
            try:
                self._masks = json.loads(path.read_text())
            except ValueError as exc:
                raise DatasetLayoutError(f"{path}: not JSON ({exc})") from exc
        return self._masks

    def gt_masks(self, video: str, exp_id: str) -> np.ndarray:
        """uint8 [T, H, W] GT of an expression: the union (uint8 sum) of its anno_ids' masks per frame."""
        masks = self.mask_dict()
        frames = self.frames(video)
        anno_ids = [str(a) for a in self.meta[video]["expressions"][exp_id].get("anno_id", [])]
        size = None
        for a in anno_ids:
            if a not in masks:
                raise DatasetLayoutError(f"{self.root / 'mask_dict.json'}: anno_id {a} of {video}/{exp_id} missing")
            if len(masks[a]) != len(frames):
                raise DatasetLayoutError(
                    f"{self.root / 'mask_dict.json'}: anno_id {a} has {len(masks[a])} masks, {video} {len(frames)} frames")
            size = size or next((tuple(r["size"]) for r in masks[a] if r), None)
        if size is None:
            size = self.frame_size(video)
        gt = np.zeros((len(frames), *size), dtype=np.uint8)
        for a in anno_ids:
            for t, rle in enumerate(masks[a]):
                if rle:
                    gt[t] += cocomask.decode(rle)
        return gt

    def frame_size(self, video: str) -> tuple[int, int]:
        """(H, W) of a video's first JPEG frame."""
        first = self.root / "JPEGImages" / video / f"{self.frames(video)[0]}.jpg"
        if not first.is_file():
            raise DatasetLayoutError(f"{first}: frame not found. Expected {LAYOUT}.")
        with Image.open(first) as image:
            return image.size[1], image.size[0]


def read_gray_png(path: Path) -> np.ndarray:
    """A prediction PNG as the official script reads it: ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)``."""
    import cv2  # lazy: OpenCV takes ~0.15 s to import; only reading prediction PNGs needs it

    array = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if array is None:
        raise RefStreamError(f"{path}: cannot read the PNG")
    return array


def missing_predictions(split: MevisSplit, pred: str | Path) -> list[str]:
    """Prediction paths (relative to ``pred``) the evaluation needs and that do not exist; a whole missing
    video or expression folder is listed once."""
    pred = Path(pred)
    missing = []
    for vid in split.videos():
        frames = split.frames(vid)
        if not (pred / vid).is_dir():
            missing.append(f"{vid}/ (video: {len(split.expressions(vid))} expressions x {len(frames)} frames)")
            continue
        for exp_id in split.expressions(vid):
            folder = pred / vid / exp_id
            if not folder.is_dir():
                missing.append(f"{vid}/{exp_id}/ (expression: {len(frames)} frames)")
                continue
            present = {p.name for p in folder.iterdir()}
            missing.extend(f"{vid}/{exp_id}/{f}.png" for f in frames if f"{f}.png" not in present)
    return missing


def _short_list(items: list[str], limit: int = 12) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"


def score_expression(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(J, F) of one expression: means over frames of the per-frame J and F."""
    return float(np.mean(jaccard(gt, pred))), float(np.mean(f_measure(gt, pred)))


_WORKER_SPLIT: MevisSplit | None = None


def _init_worker(split_root: str) -> None:
    global _WORKER_SPLIT
    _WORKER_SPLIT = MevisSplit(split_root)


def _score_in_worker(args) -> tuple[str, list[float]]:
    return _score_one(_WORKER_SPLIT, *args)


def _score_one(split: MevisSplit, pred: Path, vid: str, exp_id: str, missing_as_empty: bool) -> tuple[str, list[float]]:
    gt = split.gt_masks(vid, exp_id)
    frames = split.frames(vid)
    masks = np.zeros_like(gt)
    for t, frame in enumerate(frames):
        path = pred / vid / exp_id / f"{frame}.png"
        if not path.is_file():
            if missing_as_empty:
                continue
            raise DatasetLayoutError(f"{path}: prediction missing. Expected {PRED_LAYOUT}.")
        array = read_gray_png(path)
        if array.shape != gt.shape[1:]:
            raise RefStreamError(
                f"{path}: prediction is {array.shape[0]}x{array.shape[1]} but the GT is {gt.shape[1]}x{gt.shape[2]}")
        masks[t] = array
    j, f = score_expression(gt, masks)
    return f"{vid}_{exp_id}", [j, f]


def evaluate_mevis(split_root: str | Path, pred: str | Path, missing_as_empty: bool = False,
                   workers: int = 1) -> dict:
    """Score MeViS predictions on a split with masks (``valid_u``; see the module docstring).

    Returns:
        ``{"J": float, "F": float, "J&F": float, "per_expression": {"<vid>_<exp_id>": [J, F]}}``.

    Raises:
        DatasetLayoutError: wrong split layout, no ``mask_dict.json``, or predictions missing (all listed)
            unless ``missing_as_empty``.
    """
    split = MevisSplit(split_root)
    split.mask_dict()
    pred = Path(pred)
    if not pred.is_dir():
        raise DatasetLayoutError(f"{pred}: prediction folder not found. Expected {PRED_LAYOUT}.")
    if not missing_as_empty:
        missing = missing_predictions(split, pred)
        if missing:
            raise DatasetLayoutError(
                f"{pred}: {len(missing)} prediction(s) missing: {_short_list(missing)}. Expected {PRED_LAYOUT} "
                "(or pass --missing-as-empty to score missing frames as empty masks).")
    items = [(pred, vid, exp_id, missing_as_empty) for vid in split.videos() for exp_id in split.expressions(vid)]
    if workers > 1 and len(items) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                 initargs=(str(split.root),)) as pool:
            scored = list(pool.map(_score_in_worker, items, chunksize=4))
    else:
        scored = [_score_one(split, *item) for item in items]
    per_expression = dict(scored)
    if per_expression:
        j = float(np.mean([v[0] for v in per_expression.values()]))
        f = float(np.mean([v[1] for v in per_expression.values()]))
        jf = (j + f) / 2
    else:
        j = f = jf = math.nan
    return {"J": _num(j), "F": _num(f), "J&F": _num(jf), "per_expression": per_expression}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x
