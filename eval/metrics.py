"""Region (J) and boundary (F) similarity, their per-object statistics, and cIoU / gIoU.

The definitions are those of the DAVIS-2017 evaluation toolkit, read from
github davisvideochallenge/davis2017-evaluation @ ac7c43fca936f9722837b7fbd337d284ba37004b,
files ``davis2017/metrics.py`` (``db_eval_iou``, ``db_eval_boundary``, ``f_measure``, ``_seg2bmap``) and
``davis2017/utils.py`` (``db_statistics``). MeViS (henghuiding/MeViS @ 7c0620b9, ``tools/metrics.py``) and
VideoGLaMM ship identical copies. This module is an independent implementation that returns the same
numbers, bit for bit on every input we have tried (``tests/golden/davis_metrics*.json`` holds values
recorded from the official code on hand-made edge cases and random masks; ``tests/test_metrics.py``
checks them to 1e-12):

- **J** = ``|gt & pred & ~void| / |(gt | pred) & ~void|``; any nonzero value is foreground; an empty
  union scores 1.
- **F**: the boundary map of ``mask & ~void`` (the toolkit's ``_seg2bmap``: a pixel is on the boundary
  when it differs from its right, lower or lower-right neighbour, so boundaries sit half a pixel toward
  the origin; the last row compares only to the right, the last column only downwards, the bottom-right
  pixel never is; hence no boundary along the image border and none for a full-frame mask). A boundary
  pixel of one mask is matched when the other mask's boundary, dilated by a disk of radius
  ``ceil(bound_th * sqrt(H^2 + W^2))`` pixels (``bound_th`` itself when ``bound_th >= 1``), covers it:
  the disk is scikit-image's ``disk(r)`` (``X^2 + Y^2 <= r^2`` on ``arange(-r, r + 1)``) applied with
  OpenCV's ``dilate`` (anchor at the kernel centre, nothing outside the image); for an integer radius
  (always the case when ``bound_th < 1``) the same dilation is done as the union of a few rectangular
  dilations, which OpenCV computes faster than a disk. Precision = matched
  prediction boundary / prediction boundary, recall = matched GT boundary / GT boundary,
  ``F = 2PR / (P + R)`` (0 when ``P + R == 0``). Both boundaries empty -> 1; exactly one empty -> 0.
- **statistics** (``db_statistics``): mean, recall (fraction of frames with value > 0.5) and decay (mean
  of the first of 4 bins minus mean of the last), NaN-aware, with the toolkit's bin edges
  ``round(linspace(1, n, 5) + 1e-10) - 1`` cast to ``uint8`` (so they wrap for sequences longer than 255
  frames; kept on purpose so that decay agrees with the published numbers).

Why it is faster than the toolkit: the boundary of a mask can only lie inside the mask's bounding box
grown by one pixel toward the origin, so the boundary map is computed on that box only, and the
dilation (the cost that dominates) runs on that box grown by the disk radius instead of the frame.
Dilating a crop is exact: the dilated value at a pixel is the maximum over the disk of pixels *in the
image*, every boundary pixel lies in the crop, and outside the grown box the dilation is 0. The
prepared boundaries (:func:`prepare_boundary`) are reusable, so the DAVIS unsupervised matching scores
every (object, proposal) pair from one boundary and one dilation per mask and frame. ``refstream/bench/metrics.py`` times it next to the
official ``db_eval_boundary``.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

__all__ = [
    "jaccard", "f_measure", "boundary_map", "db_statistics", "ciou_giou", "bound_radius", "Boundary",
    "prepare_boundary", "f_from_boundaries",
]


# --------------------------------------------------------------------------------------------------- J

def _check_shapes(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None) -> None:
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} shapes differ")
    if void is not None and void.shape != gt.shape:
        raise ValueError(f"gt {gt.shape} and void {void.shape} shapes differ")
    if gt.ndim not in (2, 3):
        raise ValueError(f"masks must be [H, W] or [T, H, W], got {gt.ndim} dimensions")


def jaccard(gt, pred, void=None):
    """Region similarity J (intersection over union) of ``pred`` against ``gt``, ``void`` pixels ignored.

    Args:
        gt, pred: [H, W] or [T, H, W] arrays of any dtype; any nonzero value is foreground.
        void: optional array of the same shape; nonzero pixels are left out of both sets.

    Returns:
        a float for [H, W] input, a float64 array [T] for [T, H, W]. An empty union scores 1.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    void = None if void is None else np.asarray(void)
    _check_shapes(gt, pred, void)
    g = gt.astype(bool)
    p = pred.astype(bool)
    inter = g & p
    union = g | p
    if void is not None:
        keep = ~void.astype(bool)
        inter &= keep
        union &= keep
    axes = (-2, -1)
    n_inter = np.count_nonzero(inter, axis=axes)
    n_union = np.count_nonzero(union, axis=axes)
    if gt.ndim == 2:
        return 1.0 if n_union == 0 else float(int(n_inter) / int(n_union))
    out = np.ones(gt.shape[0], dtype=np.float64)
    nz = n_union > 0
    out[nz] = n_inter[nz].astype(np.float64) / n_union[nz].astype(np.float64)
    return out


# --------------------------------------------------------------------------------------------------- F

def bound_radius(shape: tuple[int, int], bound_th: float = 0.008) -> float:
    """The boundary tolerance in pixels for a frame of ``shape`` = (H, W), as the toolkit computes it.

    ``bound_th`` itself when ``bound_th >= 1``, else ``ceil(bound_th * sqrt(H^2 + W^2))``
    (8 at 480x854, 12 at 720x1280, 18 at 1080x1920).
    """
    if bound_th >= 1:
        return bound_th
    h, w = int(shape[0]), int(shape[1])
    return float(np.ceil(bound_th * np.sqrt(np.float64(h * h + w * w))))


@functools.lru_cache(maxsize=32)
def _disk(radius: float) -> np.ndarray:
    """uint8 disk footprint built as scikit-image's ``morphology.disk(radius)`` builds it."""
    line = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(line, line)
    kernel = np.array((x ** 2 + y ** 2) <= radius ** 2, dtype=np.uint8)
    kernel.setflags(write=False)
    return kernel


@functools.lru_cache(maxsize=32)
def _disk_rectangles(radius: int) -> tuple[np.ndarray, ...]:
    """Rectangular kernels whose union is the integer-radius disk (OpenCV dilates by rectangles fast).

    Row ``dy`` of the disk spans ``|dx| <= isqrt(r^2 - dy^2)``, a width that does not grow with ``|dy|``,
    so the rectangles ``|dx| <= w(d), |dy| <= d`` for the ``d`` where ``w`` drops cover exactly the disk.
    """
    import cv2  # lazy: OpenCV takes ~0.15 s to import; only the boundary measure needs it

    widths = [math.isqrt(radius * radius - d * d) for d in range(radius + 1)]
    rects = []
    for d in range(radius + 1):
        if d == radius or widths[d + 1] < widths[d]:
            rects.append(cv2.getStructuringElement(cv2.MORPH_RECT, (2 * widths[d] + 1, 2 * d + 1)))
    return tuple(rects)


def _dilate(img: np.ndarray, radius: float) -> np.ndarray:
    """``cv2.dilate(img, disk(radius))`` (pixels outside the image do not contribute)."""
    import cv2  # lazy: see _disk_rectangles

    if radius == int(radius) and 1 <= radius <= 256:
        rects = _disk_rectangles(int(radius))
        out = cv2.dilate(img, rects[0])
        for kernel in rects[1:]:
            cv2.max(out, cv2.dilate(img, kernel), dst=out)
        return out
    return cv2.dilate(img, _disk(radius))


def _boundary_into(seg: np.ndarray, out: np.ndarray) -> None:
    """Write the ``_seg2bmap`` boundary of the bool array ``seg`` into ``out`` (bool, same shape)."""
    c = seg[:-1, :-1]
    out[:-1, :-1] = (c != seg[:-1, 1:]) | (c != seg[1:, :-1]) | (c != seg[1:, 1:])
    out[-1, :-1] = seg[-1, :-1] != seg[-1, 1:]   # last row: right neighbour only
    out[:-1, -1] = seg[:-1, -1] != seg[1:, -1]   # last column: lower neighbour only
    out[-1, -1] = False


def boundary_map(mask) -> np.ndarray:
    """One-pixel-wide boundary map (bool [H, W]) of a 2-D mask, with the DAVIS ``_seg2bmap`` semantics."""
    seg = np.asarray(mask).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map takes a 2-D mask, got shape {seg.shape}")
    out = np.zeros(seg.shape, dtype=bool)
    if seg.size:
        _boundary_into(seg, out)
    return out


class Boundary:
    """The boundary of one mask (one frame), prepared for F against any other mask of the same shape.

    ``block`` is the bool boundary map of the rows ``y`` and columns ``x`` onward (every boundary pixel
    lies inside it; it is the mask's bounding box grown by one pixel toward the origin); ``dilated`` is
    the boundary dilated by the tolerance disk over ``block``'s box grown by the disk's reach (and
    clipped to the frame), starting at ``dy``, ``dx``: outside that box the dilation is 0. ``count`` is
    the number of boundary pixels. Build with :func:`prepare_boundary`; score with :func:`f_from_boundaries`.
    """

    __slots__ = ("y", "x", "block", "count", "dy", "dx", "dilated")

    def __init__(self, y, x, block, count, dy, dx, dilated):
        self.y, self.x, self.block, self.count = y, x, block, count
        self.dy, self.dx, self.dilated = dy, dx, dilated


def _reach(radius: float) -> int:
    """How far (pixels) the dilation by ``_disk(radius)`` can move a pixel, in any direction."""
    if radius == int(radius) and 1 <= radius <= 256:
        return int(radius)
    return max(_disk(radius).shape)


def prepare_boundary(mask, void=None, bound_th: float = 0.008) -> Boundary | None:
    """Boundary (and its dilation) of a 2-D mask with ``void`` removed; None when it has no boundary.

    Computing it once per mask lets the unsupervised DAVIS matching score every (object, proposal) pair
    without recomputing boundaries or dilations.
    """
    mask = np.asarray(mask)
    void = None if void is None else np.asarray(void)
    seg = _foreground(mask, void)
    rows = np.flatnonzero(seg.any(axis=1))
    if rows.size == 0:
        return None
    h, w = seg.shape
    r0, r1 = int(rows[0]), int(rows[-1])
    cols = np.flatnonzero(seg[r0:r1 + 1].any(axis=0))
    c0, c1 = int(cols[0]), int(cols[-1])
    # a boundary pixel differs from its right / lower / lower-right neighbour, so it lies in rows
    # r0-1..r1 and columns c0-1..c1; one more row and column (where the frame has them) are needed to
    # evaluate the last of those with the interior rule (the frame's own last row / column keep theirs).
    y0, x0 = max(r0 - 1, 0), max(c0 - 1, 0)
    sub = seg[y0:r1 + 2, x0:c1 + 2]
    full = np.empty(sub.shape, dtype=bool)
    _boundary_into(sub, full)
    block = full[: r1 - y0 + 1, : c1 - x0 + 1]
    count = int(np.count_nonzero(block))
    if count == 0:
        return None
    radius = bound_radius(seg.shape, bound_th)
    reach = _reach(radius)
    dy, dx = max(y0 - reach, 0), max(x0 - reach, 0)
    ey, ex = min(y0 + block.shape[0] + reach, h), min(x0 + block.shape[1] + reach, w)
    canvas = np.zeros((ey - dy, ex - dx), dtype=np.uint8)
    canvas[y0 - dy: y0 - dy + block.shape[0], x0 - dx: x0 - dx + block.shape[1]] = block
    dilated = _dilate(canvas, radius).view(bool)
    return Boundary(y0, x0, block, count, dy, dx, dilated)


def _matched(a: Boundary, b: Boundary) -> int:
    """Number of boundary pixels of ``a`` covered by the dilated boundary of ``b``."""
    y0, x0 = max(a.y, b.dy), max(a.x, b.dx)
    y1 = min(a.y + a.block.shape[0], b.dy + b.dilated.shape[0])
    x1 = min(a.x + a.block.shape[1], b.dx + b.dilated.shape[1])
    if y1 <= y0 or x1 <= x0:
        return 0
    return int(np.count_nonzero(a.block[y0 - a.y: y1 - a.y, x0 - a.x: x1 - a.x]
                                & b.dilated[y0 - b.dy: y1 - b.dy, x0 - b.dx: x1 - b.dx]))


def f_from_boundaries(gt: Boundary | None, pred: Boundary | None) -> float:
    """F of two prepared boundaries (of masks of the same frame shape, prepared with the same tolerance)."""
    if gt is None and pred is None:
        return 1.0
    if gt is None or pred is None:
        return 0.0
    precision = _matched(pred, gt) / float(pred.count)
    recall = _matched(gt, pred) / float(gt.count)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def _foreground(mask: np.ndarray, void: np.ndarray | None) -> np.ndarray:
    if void is None:
        return mask.astype(bool)
    keep = ~void.astype(bool)
    if mask.dtype.kind in "fc":
        # the toolkit computes ``mask * ~void`` before the cast: NaN * 0 stays NaN, i.e. foreground
        return (mask * keep).astype(bool)
    return mask.astype(bool) & keep


def _f_frame(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None, bound_th: float) -> float:
    return f_from_boundaries(prepare_boundary(gt, void, bound_th), prepare_boundary(pred, void, bound_th))


def f_measure(gt, pred, void=None, bound_th: float = 0.008):
    """Boundary similarity F of ``pred`` against ``gt`` (see the module docstring for the definition).

    Args:
        gt, pred: [H, W] or [T, H, W] arrays of any dtype; any nonzero value is foreground.
        void: optional array of the same shape; nonzero pixels are removed from both masks first.
        bound_th: tolerance as a fraction of the frame diagonal (< 1) or in pixels (>= 1).

    Returns:
        a float for [H, W] input, a float64 array [T] for [T, H, W].
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    void = None if void is None else np.asarray(void)
    _check_shapes(gt, pred, void)
    if gt.ndim == 2:
        return _f_frame(gt, pred, void, bound_th)
    out = np.empty(gt.shape[0], dtype=np.float64)
    for t in range(gt.shape[0]):
        out[t] = _f_frame(gt[t], pred[t], None if void is None else void[t], bound_th)
    return out


# ------------------------------------------------------------------------------------------ statistics

def db_statistics(values) -> tuple[float, float, float]:
    """Mean, recall and decay of per-frame values, as the DAVIS toolkit's ``utils.db_statistics``.

    - mean: NaN-aware mean;
    - recall: fraction of frames whose value is > 0.5, strictly (a NaN frame counts as not recalled);
    - decay: mean of the first quarter minus mean of the last quarter, with the quarters cut at
      ``round(linspace(1, n, 5) + 1e-10) - 1`` cast to uint8 (the toolkit's cast, which wraps past 255
      frames) and each bin including its right edge.

    Returns plain floats (NaN where the toolkit gives NaN, e.g. for no values).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(v)
        recall = np.nanmean(v > 0.5)
        edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.uint8)
        bins = [v[edges[i]:edges[i + 1] + 1] for i in range(4)]
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(mean), float(recall), float(decay)


# ------------------------------------------------------------------------------------- image metrics

def ciou_giou(intersections, unions) -> tuple[float, float]:
    """Referring image segmentation scores from per-mask intersection and union pixel counts.

    cIoU = sum(I) / sum(U) (cumulative IoU); gIoU = mean over masks of I / U, where a mask with U = 0
    (empty prediction and empty GT) scores 1. (LISA / GLaMM add 1e-10 to the cIoU denominator and 1e-5
    to each U in gIoU; this is the exact formula without those epsilons.) cIoU is NaN when every union
    is 0; both are NaN for no masks.
    """
    inter = np.asarray(intersections, dtype=np.float64).reshape(-1)
    union = np.asarray(unions, dtype=np.float64).reshape(-1)
    if inter.shape != union.shape:
        raise ValueError(f"{inter.size} intersections but {union.size} unions")
    if np.any(inter > union) or np.any(inter < 0):
        raise ValueError("each intersection must be between 0 and its union")
    if inter.size == 0:
        return math.nan, math.nan
    total_u = float(union.sum())
    ciou = float(inter.sum()) / total_u if total_u > 0 else math.nan
    per = np.ones_like(inter)
    nz = union > 0
    per[nz] = inter[nz] / union[nz]
    return ciou, float(per.mean())
