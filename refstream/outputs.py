"""What a job writes, and the one writer every pipeline uses.

- ``masks.json``: COCO RLE per frame and expression (pycocotools; masks Fortran-ordered uint8, ``counts``
  decoded to str for JSON; docs/design.md, section Failure modes).
- ``overlay.mp4``: H.264 via PyAV, each expression's mask blended in its own colour.
- ``tokens.png``: one encoder frame (the 336x336 CLIP view) with the kept tokens drawn as boxes,
  similarity-aware red and context-aware green, as the paper's Figure 5.
- ``summary.json``: what ran (model, pruning, visual tokens), stage seconds, peak memory.

:class:`JobResult` is what one job produced, built by :func:`job_result` from the pipeline's parts;
:class:`JobWriter` turns the masks of each frame into RLE + an overlay frame as they stream, then writes the
JSON files and the token picture. ``refstream run``, the service (both pipelines) and the Python API all go
through these two, so every output folder has the same shape. :func:`atomic_file` is the one way files
are written so that a reader never sees half a file.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from refstream.errors import ConfigError
from refstream_errors import option

#: the stages of a job whose wall seconds ``summary.json`` reports, in order
STAGES = ("decode", "clip", "prune", "llm", "sam2", "write")
RANDOM_WEIGHTS_NOTE = "random weights (--model tiny): the masks carry no meaning"
#: the files a job writes into its output folder
OUTPUT_FILES = ("masks.json", "overlay.mp4", "tokens.png", "summary.json")

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
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_rle`: bool [H, W]."""
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success it is made readable (0644) and renamed
    over ``path`` (``os.replace``, atomic on POSIX), on error it is removed. Readers never see half a file.

    Args:
        path: the final file; its folder must exist.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).

    Yields:
        the open file object.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_out_folder(out: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """Refuse an output folder that cannot work, before any model loads or frame decodes.

    Refused: an existing file; a path under a file; the input frame folder itself or a folder inside it (the
    outputs would become frames of the next run); a folder whose nearest existing parent is not writable.

    Returns:
        ``out`` as a Path.

    Raises:
        ConfigError: naming ``--out`` (the ``out`` argument of the Python API), the problem and the fix.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option('out', str(out))} is an existing file, not a folder. Fix: pass a folder path (it is created).")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option('out', str(out))}: {parent} is a file, so no folder can be made under it. Fix: pass a path "
                          "whose parents are folders.")
    if input_path is not None and Path(input_path).is_dir():
        source = Path(input_path).resolve()
        if out.resolve() == source or source in out.resolve().parents:
            raise ConfigError(f"{option('out', str(out))} is inside the input frame folder {input_path}: the outputs would be "
                              "read as frames. Fix: pass a folder outside it.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option('out', str(out))}: cannot write in {parent} (permission denied). Fix: pass a writable folder.")
    return out


@contextmanager
def staged_folder(out: str | os.PathLike):
    """Write a job's files into a temporary folder beside ``out``; move them into ``out`` only on success.

    Yields the temporary folder. On an exception it is removed and ``out`` is left as it was (not created when
    it did not exist): a failed run leaves no empty or partial output folder. On success each file is moved
    with ``os.replace`` (atomic per file), replacing files of the same name in an existing ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        if not out.exists():
            os.replace(stage, out)
            return
        for item in stage.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_options: Any) -> None:
    """Write ``data`` as JSON to ``path`` through :func:`atomic_file` (``dump_options`` go to ``json.dump``)."""
    with atomic_file(path) as fh:
        json.dump(data, fh, **dump_options)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`, creating the missing parent folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`, creating the missing parent folders."""
    write_bytes_atomic(path, text.encode())


def logits_to_mask(logits, size: tuple[int, int]) -> np.ndarray:
    """SAM2 mask logits -> the object's binary mask, the one rule of every writer: ``logit > 0``.

    Args:
        logits: float [H, W] (torch tensor or numpy), or None for an answer without [SEG].
        size: (H, W), the frame size, for an all-background mask when ``logits`` is None.

    Returns:
        bool [H, W].
    """
    if logits is None:
        return np.zeros(size, dtype=bool)
    values = logits.numpy() if hasattr(logits, "numpy") else np.asarray(logits)
    return values > 0


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def blend_masks(frame: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Overlay masks on a frame.

    Inside mask n each pixel value v becomes ``int((1 - alpha) * v + alpha * colour)`` (float32, clipped to
    [0, 255], truncated), ``colour = PALETTE[n % len(PALETTE)]``; outside every mask the frame is unchanged.
    Masks are applied in order, each on the uint8 result of the ones before (where masks overlap, each
    truncation can move a value by 1 from blending in float throughout). The work is done only inside each
    mask's bounding box, through a 256-entry lookup table per colour (``cv2.LUT``, ``cv2.copyTo``): 7-13x
    faster than float arithmetic over the whole frame at 960x540.

    Args:
        frame: uint8 [H, W, 3] RGB.
        masks: bool [N, H, W], one per expression.
        alpha: opacity of the colour inside a mask, in [0, 1].

    Returns:
        a new uint8 [H, W, 3] array (``frame`` is not modified).
    """
    import cv2  # lazy: OpenCV takes ~0.15 s to import; only the overlay needs it here

    out = np.array(frame, dtype=np.uint8, order="C", copy=True)  # C order: OpenCV writes into its views
    for n, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        roi = out[box]  # a view: written in place
        blended = cv2.LUT(roi, _blend_table(n % len(PALETTE), alpha))
        cv2.copyTo(blended, np.ascontiguousarray(mask[box]).view(np.uint8), roi)  # writes into the view
    return out


@functools.lru_cache(maxsize=64)
def _blend_table(colour_index: int, alpha: float) -> np.ndarray:
    """uint8 [256, 1, 3]: entry v, channel c = ``int(clip((1 - alpha) * v + alpha * PALETTE[i][c]))``."""
    values = np.arange(256, dtype=np.float32)[:, None]
    table = np.clip((1 - alpha) * values + alpha * PALETTE[colour_index], 0, 255).astype(np.uint8)
    return table.reshape(256, 1, 3)


class OverlayWriter:
    """Streams frames with masks into an H.264 MP4 (PyAV, yuv420p; odd sizes are padded by one pixel).

    A preview, tuned for speed: x264 ``preset=superfast`` at CRF 23 (about 4.7 ms per 960x540 frame here vs 7.4
    ms with ``veryfast``, for files about 1.5x larger), and the RGB -> yuv420p conversion (BT.601, limited
    range, as FFmpeg's default) done by OpenCV's ``COLOR_RGB2YUV_I420`` (0.14 ms a frame vs 1.7 ms in
    swscale; values within 3 levels of swscale's).

    Args:
        path: output ``.mp4``.
        width, height: frame size in pixels.
        fps: frames per second (None -> 24, e.g. for a folder of frames).
    """

    def __init__(self, path: Path, width: int, height: int, fps: float | None):
        self.path = Path(path)
        self._container = av.open(str(self.path), mode="w")
        rate = Fraction(fps or 24).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": "23", "preset": "superfast"}
        self._size = (height, width)

    def write(self, frame: np.ndarray, masks: np.ndarray) -> None:
        """Add one frame: uint8 [H, W, 3] RGB with bool masks [N, H, W]."""
        image = blend_masks(frame, masks)
        pad_h, pad_w = self._stream.height - image.shape[0], self._stream.width - image.shape[1]
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        import cv2  # lazy: see blend_masks

        yuv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420)  # [H * 3 / 2, W] uint8 planes
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
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


# ------------------------------------------------------------------------------------ one job's result
@dataclass
class JobResult:
    """What one job produced; :meth:`JobWriter.finish` turns it into ``masks.json``, ``tokens.png`` and
    ``summary.json`` (the overlay is written while the frames stream). Built by :func:`job_result`."""

    video: str
    height: int
    width: int
    fps: float | None
    frames: list[str]
    expressions: list[str]
    answers: list[str]
    masks: list[list[dict]]  # per expression, per frame: COCO RLE (see encode_rle)
    pruning: dict  # the pruning report (see pruning_report)
    model: str
    random_weights: bool
    visual_tokens: int
    llm_sequence_length: int
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage (STAGES)
    tokens_view: np.ndarray | None = None  # uint8 [S, S, 3] CLIP view of one encoder frame
    tokens_selection: tuple | None = None  # (indices int [K], similarity_aware bool [K], grid)
    #: per clip (one entry without ``clip_length``): start position, frames, first/last source frame index,
    #: encoder source indices and the LLM answers (per expression)
    clips: list[dict] = field(default_factory=list)
    clip_length: int | None = None
    decoder: str | None = None  # the reader that decoded the frames (decord, pyav after a fallback, frames)
    #: what decoding did (VideoSource.decode_report): rotation (degrees), frame_sizes ("WxH" stored sizes seen),
    #: resized_frames, frames_damaged; empty when unknown (written to masks.json and summary.json)
    decode: dict = field(default_factory=dict)


def pruning_report(options, selection, llm_info: dict | None = None) -> dict:
    """The ``pruning`` entry of ``masks.json`` / ``summary.json``.

    Args:
        options: a :class:`refstream.options.JobOptions` (method, variant, budget, placement, clip_text,
            clip_length, answer, seed).
        selection: the :class:`pruning.registry.Selection` of the first clip (``kept_per_frame``, ``unit``).
        llm_info: extra facts from the LLM (FastV: ``llm_layer_lengths`` per expression, per layer).
    """
    report = {
        "method": options.method,
        "variant": options.variant if options.method == "litelvlm" else None,
        "budget": options.budget,
        "placement": options.placement,
        "kept_per_frame": selection.kept_per_frame,
        "unit": selection.unit,
        "clip_text": options.clip_text,
        **(llm_info or {}),
    }
    if options.clip_length is not None:
        report["clip_length"] = options.clip_length
    report["answer"] = options.answer
    if options.answer == "sample":
        report["seed"] = options.seed
    return report


def job_result(*, video: str, height: int, width: int, fps: float | None, frames: list[str], options,
               answers: list[str], masks: list[list[dict]], selection, llm_info: dict | None, model: str,
               random_weights: bool, visual_tokens: int, llm_sequence_length: int, timings: dict[str, float],
               tokens_view: np.ndarray | None, clips: list[dict] | None = None,
               decoder: str | None = None, decode: dict | None = None) -> JobResult:
    """The one builder of :class:`JobResult` (``refstream run``, the API, and both service pipelines).

    ``selection`` is the first clip's :class:`pruning.registry.Selection` (its first frame is drawn in
    ``tokens.png``); ``options`` the job's :class:`refstream.options.JobOptions`; ``decode`` the source's
    :meth:`video_pipeline.source.VideoSource.decode_report` (its ``decoder`` entry is used when ``decoder`` is
    not given).
    """
    decode = dict(decode or {})
    decoder = decoder or decode.pop("decoder", None)
    decode.pop("decoder", None)
    return JobResult(
        video=str(video), height=height, width=width, fps=fps, frames=list(frames),
        expressions=list(options.expressions), answers=list(answers), masks=masks,
        pruning=pruning_report(options, selection, llm_info), model=model, random_weights=random_weights,
        visual_tokens=int(visual_tokens), llm_sequence_length=int(llm_sequence_length), timings=dict(timings),
        tokens_view=tokens_view,
        tokens_selection=(selection.indices[0].cpu().numpy(), selection.similarity_aware[0].cpu().numpy(),
                          selection.grid),
        clips=list(clips or []), clip_length=options.clip_length,
        decoder=decoder, decode=decode,
    )


class JobWriter:
    """The one writer of a job's output folder: per frame COCO RLE + an overlay frame, at the end
    ``masks.json``, ``tokens.png`` and ``summary.json``.

    Use it as a context manager (the overlay is closed however the job ends)::

        with JobWriter(out, num_objects, width, height, fps) as writer:
            for frame, masks in ...:        # uint8 [H, W, 3], bool [N, H, W]
                writer.add(frame, masks)
            result = job_result(..., masks=writer.masks, ...)
            summary = writer.finish(result, device="cpu", started=t0)

    Args:
        out: output folder (created if missing), or None to only collect the RLE masks (no files; no
            :meth:`finish`).
        num_objects: N, the number of expressions.
        width, height: frame size in pixels (for the overlay).
        fps: frames per second of the overlay (None -> 24).
        overlay: write ``overlay.mp4`` (default True; never without ``out``).

    Attributes:
        masks: per object, per frame: COCO RLE dicts (what ``masks.json`` holds).
        seconds: wall seconds spent writing (RLE + overlay), added to the ``write`` stage by :meth:`finish`.
    """

    def __init__(self, out: str | os.PathLike | None, num_objects: int, width: int = 0, height: int = 0,
                 fps: float | None = None, overlay: bool = True):
        self.out = None if out is None else Path(out)
        self.masks: list[list[dict]] = [[] for _ in range(num_objects)]
        self.seconds = 0.0
        self._overlay = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            if overlay:
                self._overlay = OverlayWriter(self.out / "overlay.mp4", width, height, fps)

    def __enter__(self) -> "JobWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, frame: np.ndarray | None, masks: np.ndarray) -> None:
        """One frame: ``frame`` uint8 [H, W, 3] RGB (None without overlay) and ``masks`` bool [N, H, W]."""
        start = time.perf_counter()
        for i, mask in enumerate(masks):
            self.masks[i].append(encode_rle(mask))
        if self._overlay is not None:
            self._overlay.write(frame, masks)
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        """Finish the overlay video (idempotent)."""
        if self._overlay is not None:
            overlay, self._overlay = self._overlay, None
            overlay.close()

    def finish(self, result: JobResult, *, device: str, started: float, load_seconds: float = 0.0,
               extra: dict | None = None) -> dict:
        """Close the overlay, write ``masks.json``, ``tokens.png`` and ``summary.json``.

        Args:
            result: the job's :class:`JobResult` (its ``masks`` normally :attr:`masks`).
            device: where the model ran (``cpu``, ``cuda:0``).
            started: the job's ``time.perf_counter()`` start (``total_seconds`` counts from it).
            load_seconds: model load time, reported separately.
            extra: more summary fields (e.g. the service's ``pipeline``).

        Returns:
            the summary dictionary (also written to ``summary.json``).

        Raises:
            ValueError: the writer has no output folder (built with ``out=None``).
        """
        if self.out is None:
            raise ValueError("JobWriter(out=None) only collects masks: give it a folder to finish a job")
        self.close()
        t = time.perf_counter()
        note = RANDOM_WEIGHTS_NOTE if result.random_weights else None
        masks_json = {
            "video": result.video, "height": result.height, "width": result.width, "fps": result.fps,
            "frames": result.frames,
            "objects": [{"expression": e, "answer": a, "masks": m}
                        for e, a, m in zip(result.expressions, result.answers, result.masks)],
            "pruning": result.pruning, "model": result.model, "random_weights": result.random_weights,
            **result.decode,
        }
        if result.clip_length is not None:
            masks_json["clips"] = result.clips
        if note:
            masks_json["note"] = note
        write_json_atomic(self.out / "masks.json", masks_json)
        indices, sim_aware, grid = result.tokens_selection
        draw_tokens(result.tokens_view, indices, sim_aware, grid, self.out / "tokens.png")
        timings = {stage: round(result.timings.get(stage, 0.0), 4) for stage in STAGES}
        timings["write"] = round(timings["write"] + self.seconds + time.perf_counter() - t, 4)
        summary = {
            "video": result.video,
            "frames": len(result.frames),
            "expressions": result.expressions,
            "model": result.model,
            "random_weights": result.random_weights,
            "pruning": result.pruning,
            "visual_tokens_into_llm": result.visual_tokens,
            "llm_sequence_length": result.llm_sequence_length,
            **({"decoder": result.decoder} if result.decoder else {}),
            **result.decode,
            "stage_seconds": timings,
            "model_load_seconds": round(load_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "device": device,
            "outputs": list(OUTPUT_FILES if self.overlay_written else [f for f in OUTPUT_FILES if f != "overlay.mp4"]),
        }
        if result.clip_length is not None:
            summary["clip_length"] = result.clip_length
            summary["clips"] = len(result.clips)
        if note:
            summary["note"] = note
        summary.update(extra or {})
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    @property
    def overlay_written(self) -> bool:
        return (self.out / "overlay.mp4").is_file()
