"""Open a video file or a folder of frames and read exact frames as RGB uint8 arrays.

Entry point: :func:`open_video`. It returns a :class:`VideoSource`:

* :class:`FrameFolder` for a folder of JPEG/PNG frames (DAVIS layout, sorted by file name),
* :class:`DecordVideo` or :class:`PyAVVideo` (see :mod:`video_pipeline.video_file`) for a video file.

Every source reads frames as ``uint8`` arrays of shape ``[T, H, W, 3]`` (RGB, original size) and
streams them with :meth:`VideoSource.iter_chunks` so that a long video never sits in memory whole.
Bad input raises :class:`refstream_errors.InputError` whose message names the file, the problem and the
fix; an unknown decoder name raises :class:`refstream_errors.ConfigError`.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from refstream_errors import ConfigError, InputError
from video_pipeline.source import VideoSource, input_error
from video_pipeline.video_file import MAX_PIXELS, DecordVideo, PyAVVideo, check_frame_size, probe

log = logging.getLogger("refstream.decode")

__all__ = [
    "DECODERS",
    "IMAGE_SUFFIXES",
    "DecordVideo",
    "FrameFolder",
    "PyAVVideo",
    "VideoSource",
    "MAX_PIXELS",
    "input_error",
    "open_video",
    "warn_decode_report",
]

DECODERS = ("decord", "pyav")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def to_rgb8(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB of any Pillow image: palette, grey, RGBA as Pillow converts them; 16- and 32-bit
    integer and float grey (``I;16*``, ``I``, ``F``) scaled from their full range, not clipped (Pillow's
    ``convert("RGB")`` clips them to 255: a 16-bit PNG turns white)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        grey = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode != "F" and grey.max(initial=0) <= 65535 else max(grey.max(initial=0), 1.0)
        if image.mode == "F" and grey.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(np.rint(grey / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _no_bomb_warning():
    """Pillow's DecompressionBombWarning silenced (the frame size was checked against ``max_pixels``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


@contextmanager
def _pillow_size_check_off():
    """Pillow's own decompression-bomb check off while a frame is opened: the frame size is checked against
    ``max_pixels`` (:func:`video_pipeline.video_file.check_frame_size`, from the header) instead, so the error
    names ``--max-pixels`` and a raised limit is honoured. Pillow reads ``Image.MAX_IMAGE_PIXELS`` at open; it
    is restored afterwards (a lock keeps overlapping readers from restoring each other's value)."""
    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


class FrameFolder(VideoSource):
    """Frames stored as JPEG/PNG files in one folder, ordered by file name (DAVIS ``JPEGImages`` layout).

    Files with other suffixes and hidden files are ignored; palette/grey/RGBA images are converted to RGB.
    ``fps`` is ``None``; ``frame_names`` are the file stems.

    Raises (at construction):
        InputError: no JPEG/PNG in the folder, an unreadable image, or frames of different sizes.
    """

    def __init__(self, path: Path | str, max_pixels: int | None = MAX_PIXELS):
        self.path = Path(path)
        try:
            entries = list(self.path.iterdir())
        except OSError as e:
            raise input_error(self.path, f"cannot list the folder ({e})", "check that the folder is readable") from e
        self.files = sorted(
            p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
        if not self.files:
            others = len(entries)
            raise input_error(
                self.path,
                f"folder has no JPEG/PNG frames ({others} other entries)",
                "pass a video file or a folder holding the frames as .jpg/.jpeg/.png files, "
                "e.g. DAVIS/JPEGImages/480p/<video>",
            )
        sizes = {}
        for f in self.files:
            try:
                with _pillow_size_check_off(), Image.open(f) as im:  # the header only: nothing is decoded here
                    sizes[f] = im.size
            except (UnidentifiedImageError, OSError) as e:
                raise input_error(f, f"frame is not a readable image ({e})", "replace or remove this file") from e
            check_frame_size(f, *sizes[f], max_pixels)
        self.width, self.height = sizes[self.files[0]]
        for f, size in sizes.items():
            if size != (self.width, self.height):
                raise input_error(
                    f,
                    f"frame is {size[0]}x{size[1]} but {self.files[0].name} is {self.width}x{self.height}; "
                    "all frames of a video must have one size",
                    "resize the frames to one size or remove the stray file",
                )
        self.num_frames = len(self.files)
        self.fps = None
        self.frame_names = [f.stem for f in self.files]

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        out = np.empty((len(indices), self.height, self.width, 3), dtype=np.uint8)
        for k, i in enumerate(indices):
            f = self.files[i]
            try:
                big = Image.MAX_IMAGE_PIXELS is not None and self.width * self.height > Image.MAX_IMAGE_PIXELS
                with _pillow_size_check_off() if big else _no_bomb_warning():  # size checked against max_pixels
                    with Image.open(f) as im:
                        rgb = to_rgb8(im)
            except OSError as e:
                raise input_error(f, f"cannot decode frame {i} ({e})", "replace or remove this file") from e
            if rgb.shape != out.shape[1:]:
                raise input_error(
                    f,
                    f"frame {i} changed size to {rgb.shape[1]}x{rgb.shape[0]} while reading",
                    "do not modify the frames while the video is being processed",
                )
            out[k] = rgb
        return out


def open_video(path: Path | str, decoder: str = "decord", max_pixels: int | None = MAX_PIXELS) -> VideoSource:
    """Open a video file (anything FFmpeg reads) or a folder of JPEG/PNG frames.

    Args:
        path: a video file, or a folder of frames sorted by name.
        decoder: ``"decord"`` (fast sequential/batch reads) or ``"pyav"`` (pure FFmpeg via PyAV);
            ignored for folders. Both give the same frame count and near-identical pixels. A file decord
            cannot open or decode, a file whose resolution changes mid-stream, and the rest of a file once
            decord's FFmpeg reports a damaged frame are read with PyAV instead, with one warning
            (``decoder_used`` says which). Frames come in display orientation (the display matrix's rotation
            applied) at the first frame's size (later frames of another size resized to it); see
            :meth:`VideoSource.decode_report`.
        max_pixels: the largest frame taken (pixels; default :data:`MAX_PIXELS`, 8K), checked from the headers
            before anything is decoded; None: no limit.

    Returns:
        A :class:`VideoSource` (:class:`FrameFolder`, :class:`DecordVideo` or :class:`PyAVVideo`).

    Raises:
        ConfigError: unknown ``decoder``.
        InputError: missing path, empty file, a folder without JPEG/PNG, frames of different sizes, frames
            above ``max_pixels``, a file that is not a video, a corrupt or truncated video, a file without a
            video stream.

    A video file is always validated with PyAV first (open the container, find a video stream, index the
    packets, decode the first frame) so that decord, which can crash the interpreter on corrupt input,
    only ever sees files FFmpeg has already parsed.
    """
    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}. Fix: use one of {', '.join(repr(d) for d in DECODERS)}.")
    path = Path(path)
    if not path.exists():
        raise input_error(
            path, "no such file or folder", "check the path; pass a video file or a folder of JPEG/PNG frames"
        )
    if path.is_dir():
        return FrameFolder(path, max_pixels)
    if not path.is_file():
        raise input_error(path, "not a regular file or folder", "pass a video file or a folder of JPEG/PNG frames")
    if path.stat().st_size == 0:
        raise input_error(path, "file is empty (0 bytes)", "re-download or re-export the video")
    info = probe(path, max_pixels)
    if decoder == "pyav":
        return PyAVVideo(path, info)
    if len(info.sizes) > 1:  # decord would repeat the last frame of the first size (checked: decord2 3.4.0)
        log.warning("%s: the frame size changes mid-stream (%s), which decord does not decode; reading it with "
                    "PyAV instead (frames resized to %dx%d)", path, ", ".join(f"{w}x{h}" for w, h in info.sizes),
                    info.width, info.height)
        return PyAVVideo(path, info)
    try:
        return DecordVideo(path, info)
    except InputError as e:  # PyAV has already parsed the file (probe) and decoded its first frame
        cause = e.__cause__ or e
        log.warning("%s: decord cannot open it (%s); reading it with PyAV instead", path,
                    str(cause).splitlines()[0][:200])
        return PyAVVideo(path, info)


def warn_decode_report(path: Path | str, report: dict, frames: int) -> None:
    """Log what decoding had to repair, one warning line each (``refstream.decode`` logger), after a job.

    Args:
        path: the input (named in the line).
        report: :meth:`VideoSource.decode_report` after the frames were read.
        frames: how many frames the job read (the denominator shown).
    """
    if report.get("frames_damaged"):
        log.warning("%s: %d of %d frames had decoding errors (damaged data, concealed by FFmpeg: masks there may be "
                    "off); summary.json frames_damaged counts them. Fix: re-download the file, or re-encode it: "
                    "ffmpeg -i <in> -c:v libx264 -pix_fmt yuv420p <out>.mp4", path, report["frames_damaged"], frames)
    if report.get("resized_frames"):
        sizes = report.get("frame_sizes") or ["?"]
        log.warning("%s: %d of %d frames were stored at another size (%s) and were resized to the first frame's %s",
                    path, report["resized_frames"], frames, ", ".join(sizes[1:]), sizes[0])
