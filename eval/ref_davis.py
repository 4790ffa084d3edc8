"""Reader for Ref-DAVIS-17 in the original layout: DAVIS-2017 + ``davis_text_annotations``.

Expected layout (docs/design.md, section Evaluation)::

    ROOT/
      DAVIS/JPEGImages/480p/<video>/<frame>.jpg
      DAVIS/Annotations_unsupervised/480p/<video>/<frame>.png   palette PNG, value = object id, 255 = void
      DAVIS/ImageSets/2017/val.txt                               optional: the video list
      davis_text_annotations/Davis17_annot1.txt, Davis17_annot1_full_video.txt,
                             Davis17_annot2.txt, Davis17_annot2_full_video.txt
                             lines: <video> <obj_id> "<expression>"  (annot2 files are latin-1)

A wrong layout raises :class:`refstream_errors.DatasetLayoutError` naming the missing part and the
expected layout.

:class:`RefDavisConverted` reads the same data in ReferFormer's converted layout (github
wjn922/ReferFormer @ 06fc218f, ``tools/data/convert_davis_to_ytvos.py``)::

    ROOT/valid/JPEGImages/<video>/<frame>.jpg
    ROOT/valid/Annotations/<video>/<frame>.png                 the Annotations_unsupervised masks
    ROOT/meta_expressions/valid/meta_expressions.json          {"videos": {video: {"expressions":
        {exp_id: {"exp": str, "obj_id": str}}, "frames": [..]}}}

where, per video, the expressions of the k-th object (objects sorted by ``obj_id`` as a string) are
exp_ids ``4k .. 4k+3`` in the order Davis17_annot1, Davis17_annot1_full_video, Davis17_annot2,
Davis17_annot2_full_video (which is why ReferFormer's runs anno_0..anno_3 are those files in that
order). :func:`open_ref_davis` picks the reader from the folder. Both readers fix the three video names
that the text files misspell (``clasic-car``, ``dog-scale``, ``motor-bike``), as ReferFormer does.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from refstream_errors import DatasetLayoutError

ANNOTATION_FILES = ("Davis17_annot1", "Davis17_annot1_full_video", "Davis17_annot2", "Davis17_annot2_full_video")
# video names the davis_text_annotations files misspell -> the DAVIS folder names
VIDEO_NAME_FIXES = {"clasic-car": "classic-car", "dog-scale": "dogs-scale", "motor-bike": "motorbike"}
LAYOUT = (
    "ROOT/DAVIS/JPEGImages/480p/<video>/*.jpg, ROOT/DAVIS/Annotations_unsupervised/480p/<video>/*.png and "
    "ROOT/davis_text_annotations/Davis17_annot1.txt (lines: <video> <obj_id> \"<expression>\")"
)


@dataclass(frozen=True)
class Expression:
    """One referring expression of one object: ``video``, ``obj_id`` (the GT palette value), ``text``."""

    video: str
    obj_id: int
    text: str


def read_text_annotations(path: Path) -> list[Expression]:
    """Parse a ``davis_text_annotations`` file (UTF-8, falling back to latin-1 as the annot2 files need).

    Raises:
        DatasetLayoutError: missing file or a line that is not ``<video> <obj_id> "<expression>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: annotation file not found. Expected layout: {LAYOUT}.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    expressions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = re.match(r'^\s*(\S+)\s+(\d+)\s+(.*)$', line)
        if not match:
            raise DatasetLayoutError(f'{path}:{number}: expected <video> <obj_id> "<expression>", got {line!r}')
        video, obj_id, rest = match.groups()
        try:
            parts = shlex.split(rest)
            phrase = " ".join(parts) if parts else ""
        except ValueError:
            phrase = rest.strip().strip('"')
        expressions.append(Expression(VIDEO_NAME_FIXES.get(video, video), int(obj_id), phrase))
    return expressions


class _FramesAndMasks:
    """Frame and mask access shared by both Ref-DAVIS layouts (``images``, ``masks`` and ``layout`` set by them)."""

    images: Path
    masks: Path
    layout: str

    def frames(self, video: str) -> list[Path]:
        """JPEG frames of a video, sorted by name."""
        frames = sorted((self.images / video).glob("*.jpg"))
        if not frames:
            raise DatasetLayoutError(f"{self.images / video}: no JPEG frames. Expected layout: {self.layout}.")
        return frames

    def mask(self, video: str, frame: str) -> np.ndarray | None:
        """uint8 [H, W] palette mask (object ids, 255 = void) of a frame, or None when it has no annotation."""
        path = self.masks / video / f"{frame}.png"
        if not path.is_file():
            return None
        return np.asarray(Image.open(path))


class RefDavis(_FramesAndMasks):
    """Ref-DAVIS-17 at ``root`` (see the module docstring for the layout).

    Raises:
        DatasetLayoutError: the layout is wrong (the message names what is missing and what is expected).
    """

    layout = LAYOUT

    def __init__(self, root: str | Path, resolution: str = "480p"):
        self.root = Path(root)
        self.images = self.root / "DAVIS" / "JPEGImages" / resolution
        self.masks = self.root / "DAVIS" / "Annotations_unsupervised" / resolution
        self.texts = self.root / "davis_text_annotations"
        for part in (self.images, self.masks, self.texts):
            if not part.is_dir():
                raise DatasetLayoutError(f"{self.root}: {part.relative_to(self.root)} not found. Expected layout: {LAYOUT}.")

    def videos(self) -> list[str]:
        """Video names: ``ImageSets/2017/val.txt`` when present (only those with frames), else every folder."""
        listing = self.root / "DAVIS" / "ImageSets" / "2017" / "val.txt"
        if listing.is_file():
            names = [n.strip() for n in listing.read_text().splitlines() if n.strip()]
            return [n for n in names if (self.images / n).is_dir()]
        return sorted(p.name for p in self.images.iterdir() if p.is_dir())

    def expressions(self, annotation: str = "Davis17_annot1") -> list[Expression]:
        """The expressions of one of the four annotation sets."""
        if annotation not in ANNOTATION_FILES:
            raise DatasetLayoutError(f"unknown annotation set {annotation!r}; one of {', '.join(ANNOTATION_FILES)}")
        return read_text_annotations(self.texts / f"{annotation}.txt")


CONVERTED_LAYOUT = (
    "ROOT/valid/JPEGImages/<video>/*.jpg, ROOT/valid/Annotations/<video>/*.png and "
    "ROOT/meta_expressions/valid/meta_expressions.json (ReferFormer's converted Ref-DAVIS-17)"
)


class RefDavisConverted(_FramesAndMasks):
    """Ref-DAVIS-17 (valid) in ReferFormer's converted layout; same interface as :class:`RefDavis`.

    Raises:
        DatasetLayoutError: the layout is wrong (the message names what is missing and what is expected).
    """

    layout = CONVERTED_LAYOUT

    def __init__(self, root: str | Path, split: str = "valid"):
        self.root = Path(root)
        self.images = self.root / split / "JPEGImages"
        self.masks = self.root / split / "Annotations"
        meta = self.root / "meta_expressions" / split / "meta_expressions.json"
        for part in (self.images, self.masks):
            if not part.is_dir():
                raise DatasetLayoutError(
                    f"{self.root}: {part.relative_to(self.root)} not found. Expected layout: {CONVERTED_LAYOUT}.")
        if not meta.is_file():
            raise DatasetLayoutError(
                f"{self.root}: {meta.relative_to(self.root)} not found. Expected layout: {CONVERTED_LAYOUT}.")
        try:
            self.meta = json.loads(meta.read_text())["videos"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetLayoutError(f"{meta}: not a meta_expressions.json ({exc!r})") from exc

    def videos(self) -> list[str]:
        """Videos of the meta file that have frames, in the meta file's order."""
        return [v for v in self.meta if (self.images / v).is_dir()]

    def expressions(self, annotation: str = "Davis17_annot1") -> list[Expression]:
        """The expressions of one of the four annotation sets: exp_id ``4k + index(annotation)``."""
        if annotation not in ANNOTATION_FILES:
            raise DatasetLayoutError(f"unknown annotation set {annotation!r}; one of {', '.join(ANNOTATION_FILES)}")
        which = ANNOTATION_FILES.index(annotation)
        out = []
        for video, info in self.meta.items():
            exps = info.get("expressions", {})
            for k in range(len(exps) // 4):
                entry = exps.get(str(4 * k + which))
                if entry is None:
                    raise DatasetLayoutError(f"{video}: expression {4 * k + which} missing from the meta file")
                out.append(Expression(video, int(entry["obj_id"]), entry["exp"]))
        return out


def open_ref_davis(root: str | Path):
    """:class:`RefDavis` or :class:`RefDavisConverted`, whichever layout ``root`` has.

    Raises:
        DatasetLayoutError: neither layout (the message shows both).
    """
    root = Path(root)
    if (root / "meta_expressions" / "valid" / "meta_expressions.json").is_file() and (root / "valid").is_dir():
        return RefDavisConverted(root)
    if (root / "DAVIS").is_dir() or (root / "davis_text_annotations").is_dir():
        return RefDavis(root)
    raise DatasetLayoutError(f"{root}: not a Ref-DAVIS-17 folder. Expected either {LAYOUT}, or {CONVERTED_LAYOUT}.")
