"""The (video, expression) units of the benchmarks ``refstream bench run`` sweeps.

- ``ref-davis17``: the 4 ``davis_text_annotations`` sets are 4 runs ``anno_0..anno_3`` (ReferFormer's names,
  in the order Davis17_annot1, Davis17_annot1_full_video, Davis17_annot2, Davis17_annot2_full_video); a unit
  is one object's expression of one set, ``exp_id = "<k>_<obj_id>"``; predictions are indexed PNGs per run
  (objects merged by argmax against a 0.1 background, see :func:`refstream.bench.runs.merge_objects`).
- ``mevis``: a split folder (``valid_u`` with ``mask_dict.json`` is scored here, ``valid`` is zipped for the
  server); a unit is an ``exp_id`` of ``meta_expressions.json``; 0/255 PNG per expression and frame.
- ``refytvos``: the valid split (202 videos); a unit is an ``exp_id``; 0/255 PNGs zipped as
  ``Annotations/<vid>/<exp_id>/<frame>.png`` for the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.mevis import MevisSplit
from eval.ref_davis import ANNOTATION_FILES, open_ref_davis
from eval.refytvos import RefYTVOS
from refstream.errors import ConfigError, DatasetLayoutError

DATASETS = ("ref-davis17", "refytvos", "mevis")


@dataclass(frozen=True)
class Unit:
    """One (video, expression) unit: ``exp_id`` is unique within the video; ``obj_id`` / ``group`` are the
    Ref-DAVIS object id (its value in the merged PNG) and run (``anno_k``), None elsewhere."""

    video: str
    exp_id: str
    text: str
    obj_id: int | None = None
    group: str | None = None


@dataclass
class BenchDataset:
    name: str
    root: Path
    split: str
    units: list[Unit]
    video_paths: dict[str, Path]  # video -> its frame folder
    frames: dict[str, list[str]] = field(default_factory=dict)  # listed frame names (MeViS, Refer-YouTube-VOS)
    has_gt: bool = False
    kind: str = "binary"  # "binary": 0/255 PNG per unit; "merged": Ref-DAVIS probabilities merged per run

    def videos(self) -> list[str]:
        return list(dict.fromkeys(u.video for u in self.units))


def load_dataset(name: str, root: str | Path, split: str | None = None, videos: list[str] | None = None) -> BenchDataset:
    """Read a benchmark's units (optionally only ``videos``).

    Raises:
        DatasetLayoutError: wrong layout (the message shows the expected one); ConfigError: unknown name,
            split or video.
    """
    root = Path(root)
    if name == "ref-davis17":
        ds = _ref_davis(root, split or "valid")
    elif name == "mevis":
        ds = _mevis(root, split or "valid_u")
    elif name == "refytvos":
        ds = _refytvos(root, split or "valid")
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if videos:
        known = set(ds.videos())
        unknown = [v for v in videos if v not in known]
        if unknown:
            raise ConfigError(f"--video: not in {name} {ds.split}: {', '.join(unknown)}")
        ds.units = [u for u in ds.units if u.video in set(videos)]
    return ds


def _ref_davis(root: Path, split: str) -> BenchDataset:
    if split not in ("valid", "val"):
        raise ConfigError(f"Ref-DAVIS-17 has one split, valid (got --split {split})")
    ds = open_ref_davis(root)
    videos = ds.videos()
    wanted = set(videos)
    units, seen = [], set()
    for k, annotation in enumerate(ANNOTATION_FILES):
        for e in ds.expressions(annotation):
            key = (e.video, k, e.obj_id)
            if e.video not in wanted or key in seen:
                continue
            seen.add(key)
            units.append(Unit(e.video, f"{k}_{e.obj_id}", e.text, e.obj_id, f"anno_{k}"))
    order = {v: i for i, v in enumerate(videos)}
    units.sort(key=lambda u: order[u.video])  # stable: set order within a video
    return BenchDataset("ref-davis17", root, "valid", units, {v: ds.images / v for v in videos},
                        has_gt=True, kind="merged")


def _mevis(root: Path, split: str) -> BenchDataset:
    folder = root if (root / "meta_expressions.json").is_file() else root / split
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: MeViS split folder not found (give --root MEVIS --split {split}, or the split folder)")
    ds = MevisSplit(folder)
    units = [Unit(v, str(e), info["exp"]) for v in ds.videos() for e, info in ds.expressions(v).items()]
    return BenchDataset("mevis", folder, ds.name, units, {v: folder / "JPEGImages" / v for v in ds.videos()},
                        {v: ds.frames(v) for v in ds.videos()}, has_gt=ds.has_masks())


def _refytvos(root: Path, split: str) -> BenchDataset:
    if split != "valid":
        raise ConfigError(f"Refer-YouTube-VOS: only the valid split is supported (got --split {split})")
    ds = RefYTVOS(root)
    videos = ds.valid_videos()
    units = [Unit(v, str(e), info["exp"]) for v in videos for e, info in ds.expressions(v).items()]
    return BenchDataset("refytvos", ds.root, "valid", units, {v: ds.images / v for v in videos},
                        {v: ds.frames(v) for v in videos}, has_gt=False)
