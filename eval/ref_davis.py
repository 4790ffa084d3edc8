"""Reader for Ref-DAVIS-17 in the original layout: DAVIS-2017 + ``davis_text_annotations``.

Expected layout (REFERENCE.md section 3)::

    ROOT/
      DAVIS/JPEGImages/480p/<video>/<frame>.jpg
      DAVIS/Annotations_unsupervised/480p/<video>/<frame>.png   palette PNG, value = object id, 255 = void
      DAVIS/ImageSets/2017/val.txt                               optional: the video list
      davis_text_annotations/Davis17_annot1.txt, Davis17_annot1_full_video.txt,
                             Davis17_annot2.txt, Davis17_annot2_full_video.txt
                             lines: <video> <obj_id> "<expression>"  (annot2 files are latin-1)

A wrong layout raises :class:`refstream.errors.DatasetLayoutError` naming the missing part and the
expected layout.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refstream.errors import DatasetLayoutError

ANNOTATION_FILES = ("Davis17_annot1", "Davis17_annot1_full_video", "Davis17_annot2", "Davis17_annot2_full_video")
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
        expressions.append(Expression(video, int(obj_id), phrase))
    return expressions


class RefDavis:
    """Ref-DAVIS-17 at ``root`` (see the module docstring for the layout).

    Raises:
        DatasetLayoutError: the layout is wrong (the message names what is missing and what is expected).
    """

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

    def frames(self, video: str) -> list[Path]:
        """JPEG frames of a video, sorted by name."""
        frames = sorted((self.images / video).glob("*.jpg"))
        if not frames:
            raise DatasetLayoutError(f"{self.images / video}: no JPEG frames. Expected layout: {LAYOUT}.")
        return frames

    def mask(self, video: str, frame: str) -> np.ndarray | None:
        """uint8 [H, W] palette mask (object ids, 255 = void) of a frame, or None when it has no annotation."""
        from PIL import Image

        path = self.masks / video / f"{frame}.png"
        if not path.is_file():
            return None
        return np.asarray(Image.open(path))

    def expressions(self, annotation: str = "Davis17_annot1") -> list[Expression]:
        """The expressions of one of the four annotation sets."""
        if annotation not in ANNOTATION_FILES:
            raise DatasetLayoutError(f"unknown annotation set {annotation!r}; one of {', '.join(ANNOTATION_FILES)}")
        return read_text_annotations(self.texts / f"{annotation}.txt")
