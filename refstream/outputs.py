"""What ``refstream run`` writes: COCO RLE masks, an overlay video, a picture of the kept tokens.

- ``masks.json``: COCO RLE per frame and expression (pycocotools; masks Fortran-ordered uint8, ``counts``
  decoded to str for JSON; docs/design.md, section Failure modes).
- ``overlay.mp4``: H.264 via PyAV, each expression's mask blended in its own colour.
- ``tokens.png``: one encoder frame (the 336x336 CLIP view) with the kept tokens drawn as boxes,
  similarity-aware red and context-aware green, as the paper's Figure 5.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: Colours of successive expressions in the overlay (RGB).
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
     [210, 245, 60]],
    dtype=np.float32,
)
SIMILARITY_COLOUR = (230, 30, 30)
CONTEXT_COLOUR = (40, 200, 60)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of one binary mask.

    Args:
        mask: bool or uint8 [H, W]; nonzero = object.

    Returns:
        ``{"size": [H, W], "counts": str}`` (pycocotools compressed RLE).
    """
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_rle`: bool [H, W]."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def blend_masks(frame: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Overlay masks on a frame.

    Args:
        frame: uint8 [H, W, 3] RGB.
        masks: bool [N, H, W], one per expression; expression n gets ``PALETTE[n % len(PALETTE)]``.
        alpha: opacity of the colour inside a mask.

    Returns:
        uint8 [H, W, 3].
    """
    out = frame.astype(np.float32)
    for n, mask in enumerate(masks):
        colour = PALETTE[n % len(PALETTE)]
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.clip(0, 255).astype(np.uint8)


class OverlayWriter:
    """Streams frames with masks into an H.264 MP4 (PyAV, yuv420p; odd sizes are padded by one pixel).

    Args:
        path: output ``.mp4``.
        width, height: frame size in pixels.
        fps: frames per second (None -> 24, e.g. for a folder of frames).
    """

    def __init__(self, path: Path, width: int, height: int, fps: float | None):
        import av
        from fractions import Fraction

        self.path = Path(path)
        self._container = av.open(str(self.path), mode="w")
        rate = Fraction(fps or 24).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": "23", "preset": "veryfast"}
        self._size = (height, width)

    def write(self, frame: np.ndarray, masks: np.ndarray) -> None:
        """Add one frame: uint8 [H, W, 3] RGB with bool masks [N, H, W]."""
        import av

        image = blend_masks(frame, masks)
        pad_h, pad_w = self._stream.height - image.shape[0], self._stream.width - image.shape[1]
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


MERGED_COLOUR = (250, 210, 40)


def render_tokens(
    view: np.ndarray, indices: np.ndarray, similarity_aware: np.ndarray, grid: int, scale: int = 2,
    merged: np.ndarray | None = None,
):
    """The CLIP view of one frame with its kept tokens drawn (the paper's Figure 5 style).

    Pruned areas are dimmed; kept tokens are shown at full brightness with a box: red for
    similarity-aware tokens, green for the others (LiteLVLM's context-aware tokens, or plain kept
    tokens of other methods), yellow for merged tokens (drawn at the unit they are anchored on).
    Tokens with index -1 (aggregates of pruned tokens) have no position and are not drawn.

    Args:
        view: uint8 [S, S, 3], the frame as CLIP sees it (336x336 after resize and centre crop).
        indices: int [K] kept token indices on a ``grid`` x ``grid`` raster (patches or pooled cells).
        similarity_aware: bool [K].
        grid: tokens per side (24 for patches, 12 for pooled cells).
        scale: upscaling of the view so that boxes stay visible.
        merged: bool [K] or None: tokens that merge several units.

    Returns:
        ``PIL.Image.Image`` (RGB, S*scale pixels square).
    """
    from PIL import Image, ImageDraw

    image = Image.fromarray(view).resize((view.shape[1] * scale, view.shape[0] * scale), Image.Resampling.NEAREST)
    dimmed = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), 0.6)
    draw = ImageDraw.Draw(dimmed)
    cell = image.size[0] / grid
    merged = np.zeros(len(indices), dtype=bool) if merged is None else merged
    boxes = []
    for index, is_sim, is_merged in zip(indices.tolist(), similarity_aware.tolist(), merged.tolist()):
        if index < 0:
            continue
        row, col = divmod(int(index), grid)
        box = (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
        dimmed.paste(image.crop(tuple(int(v) for v in box)), (int(box[0]), int(box[1])))
        colour = MERGED_COLOUR if is_merged else SIMILARITY_COLOUR if is_sim else CONTEXT_COLOUR
        boxes.append((box, colour))
    for box, colour in boxes:
        draw.rectangle(box, outline=colour, width=2)
    return dimmed


def draw_tokens(
    view: np.ndarray, indices: np.ndarray, similarity_aware: np.ndarray, grid: int, path: Path, scale: int = 2,
    merged: np.ndarray | None = None,
) -> None:
    """Save :func:`render_tokens` of one frame as a PNG at ``path``."""
    render_tokens(view, indices, similarity_aware, grid, scale, merged).save(path)
