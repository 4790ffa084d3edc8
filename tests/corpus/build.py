"""The corpus of odd inputs (issue 13): a table of cases, each a small builder plus the outcome it must have.

Every case builds its input (with the ``ffmpeg`` command line, numpy and Pillow; at most 160x90 pixels and 30
frames) lazily into a folder and says what ``refstream run`` must do with it:

* exit 0: ``frames`` frames of ``size`` (width, height, in display orientation) whose pixels match
  ``reference(input)``, the frames decoded independently (PyAV, or Pillow for image files), to a tolerance;
* exit 2: a message matching every ``problem`` regex (the problem, also required of a failed service job) and
  every ``fix`` regex (the fix as the command line names it).

Never exit 1, a traceback or a hang. :func:`check_run_outputs` checks an output folder (``masks.json``,
``summary.json``, ``overlay.mp4``) against a case; :func:`check_message` an error message. The tests are in
``tests/test_corpus.py`` (``refstream run``) and ``tests/test_corpus_service.py`` (service jobs).

Source followed for the hostile inputs: the hostile-user report of issue 13 (its classes, one case or more
each) and the cases that already passed before it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
from PIL import Image

OVERLAY_LOSS = 6.0  # x264 (crf 23) on these small synthetic frames: mean luma error of the overlay
W, H = 64, 36  # the default size of a built video (<= 160x90)
LONG_EXPRESSION = ("the small red ball next to the dog " * 300)[:10000]  # 10,000 characters
INVISIBLE_EXPRESSION = "\u200b\u200b\u200b"  # zero-width spaces only


@dataclass(frozen=True)
class Expected:
    """What a run must do with a case.

    Attributes:
        exit: 0 (success) or 2 (bad input, the message names the problem and the fix). Never 1.
        frames: exit 0: frames segmented (masks per expression, overlay frames).
        size: exit 0: (width, height) of the output frames, display orientation.
        reference: exit 0: ``reference(input_path)`` -> uint8 [T, H, W, 3] RGB, the frames the run must see,
            decoded without the pipeline (PyAV / Pillow); None: pixels are not compared.
        compare: how many leading frames to compare with ``reference`` (None: all).
        tolerance: largest mean absolute difference (0-255 scale) between a frame the pipeline reads and the
            reference (the overlay, x264-compressed with 4:2:0 chroma, is compared in luma, within
            ``tolerance + OVERLAY_LOSS``).
        problem: exit 2: regexes the message must match (the problem); required of the service job's error too.
        fix: exit 2: regexes for the fix as ``refstream run`` words it (CLI flags); run only.
        damaged: exit 0: summary.json ``frames_damaged`` must be > 0 (True) or 0/absent (False).
        warnings: exit 0, run only: regex of a warning that must appear on exactly one stderr line (None: none
            checked).
        forbidden: run only: regexes no stderr line may match (raw FFmpeg decoder noise).
    """

    exit: int
    frames: int = 0
    size: tuple[int, int] = (0, 0)
    reference: Callable[[Path], np.ndarray] | None = None
    compare: int | None = None
    tolerance: float = 3.0
    problem: tuple[str, ...] = ()
    fix: tuple[str, ...] = ()
    damaged: bool = False
    warnings: str | None = None
    forbidden: tuple[str, ...] = ()


@dataclass(frozen=True)
class Built:
    """A built case: its input path, the run's arguments and the expected outcome.

    Attributes:
        input: the INPUT argument (a path; it may not exist).
        expressions: the ``--expression`` values.
        out: the ``--out`` folder to pass (None: a fresh folder the test chooses).
        expected: the :class:`Expected` outcome.
        service: whether the case makes sense as a service job (no ``--out`` there; the input must lie under the
            service's allowed roots).
        folder: the case's own folder (named after the case; :func:`check_message` hides it, so that a pattern
            cannot match the path instead of the message).
    """

    input: str
    expected: Expected
    expressions: tuple[str, ...] = ("the moving square",)
    out: str | None = None
    service: bool = True
    folder: str = ""


@dataclass(frozen=True)
class Case:
    """One row of :data:`CASES`: ``build(folder)`` makes the input inside ``folder`` and returns a
    :class:`Built`; ``encoder``: the FFmpeg encoder the builder needs (the only reason a case may be skipped)."""

    name: str
    klass: str
    build: Callable[[Path], Built]
    encoder: str | None = None


# --------------------------------------------------------------------------------------------------- tools
def ffmpeg(*args: str) -> None:
    """Run ``ffmpeg -y ARGS`` quietly; RuntimeError with its stderr when it fails."""
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed:\n{proc.stderr}")


@functools.cache
def encoders() -> frozenset[str]:
    """The video encoders of the ``ffmpeg`` on PATH (``ffmpeg -encoders``)."""
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30).stdout
    return frozenset(line.split()[1] for line in out.splitlines() if line.startswith(" V"))


def lavfi(out: Path, *codec: str, size: tuple[int, int] = (W, H), frames: int = 12, rate: int = 10,
          source: str = "testsrc2", extra_in: tuple[str, ...] = ()) -> Path:
    """``frames`` frames of the lavfi ``source`` (testsrc2: colour bars and a moving square) encoded with
    ``codec`` arguments into ``out``."""
    ffmpeg("-f", "lavfi", "-i", f"{source}=size={size[0]}x{size[1]}:rate={rate}", *extra_in, "-frames:v",
           str(frames), *codec, str(out))
    return out


H264 = ("-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast")


def pyav_frames(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Every frame of the first video stream decoded with PyAV, presentation order, uint8 [T, H, W, 3] RGB,
    rotated to display orientation by the stream's display matrix (``frame.rotation``: degrees
    counter-clockwise, as FFmpeg's autorotate shows it), and scaled to ``size`` (width, height) or to the first
    frame's size when a later frame differs (FFmpeg's swscale through PyAV)."""
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            turns = round((frame.rotation or 0) / 90) % 4
            if size is None:
                size = (frame.width, frame.height) if turns % 2 == 0 else (frame.height, frame.width)
            width, height = size if turns % 2 == 0 else size[::-1]
            rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
            out.append(np.ascontiguousarray(np.rot90(rgb, turns)))
    return np.stack(out)


def pillow_frames(files: list[Path]) -> np.ndarray:
    """Image files decoded with Pillow: RGB uint8 [T, H, W, 3]; 16-bit grey scaled from 0..65535 to 0..255
    (not clipped)."""
    out = []
    for f in files:
        with Image.open(f) as im:
            if im.mode.startswith("I;16") or im.mode == "I":
                grey = np.rint(np.asarray(im).astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
                out.append(np.repeat(grey[..., None], 3, axis=2))
            else:
                out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def folder_reference(path: Path) -> np.ndarray:
    """The JPEG/PNG frames of a folder, sorted by name, decoded with Pillow (:func:`pillow_frames`)."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return pillow_frames(files)


def rgb_frames(n: int = 6, size: tuple[int, int] = (W, H), seed: int = 0) -> list[np.ndarray]:
    """``n`` smooth, distinct RGB uint8 frames [H, W, 3] (gradients plus a moving block)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(n):
        img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, (40 * t + seed) % 256)],
                       axis=2).astype(np.uint8)
        img[(h // 4): (h // 2), (t * 5) % max(w - 8, 1):(t * 5) % max(w - 8, 1) + 8] = (255, 255, 255)
        frames.append(img)
    return frames


def frame_folder(folder: Path, images: list[Image.Image], suffix: str = ".png", **save) -> Path:
    """Save ``images`` as ``00000<suffix>``, ``00001<suffix>``, ... in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}{suffix}", **save)
    return folder


def huge_png(path: Path, width: int = 20000, height: int = 10000) -> Path:
    """A valid 1-bit black PNG of ``width`` x ``height`` (200 M pixels in ~25 MB of zeros, deflated to ~25 KB)
    written chunk by chunk (PNG spec: signature, IHDR, IDAT, IEND)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row * 100) for _ in range(height // 100)) + deflate.flush()
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
        fh.write(chunk(b"IDAT", idat))
        fh.write(chunk(b"IEND", b""))
    return path


def ok(frames: int, size: tuple[int, int] = (W, H), reference=pyav_frames, **more) -> Expected:
    """Exit 0 with ``frames`` frames of ``size``."""
    return Expected(exit=0, frames=frames, size=size, reference=reference, **more)


def refused(problem: tuple[str, ...], fix: tuple[str, ...] = (r"Fix: ",)) -> Expected:
    """Exit 2 with a message naming the problem and the fix."""
    return Expected(exit=2, problem=problem, fix=fix)


# --------------------------------------------------------------------------------------------------- cases
CASES: list[Case] = []


def case(klass: str, encoder: str | None = None):
    """Register the decorated builder in :data:`CASES` under its function name."""
    def register(fn: Callable[[Path], Built]) -> Callable[[Path], Built]:
        CASES.append(Case(fn.__name__, klass, fn, encoder))
        return fn
    return register


def good_video(d: Path) -> Path:
    """A plain 6-frame H.264 MP4 for the cases about something else (``--out``, expressions)."""
    return lavfi(d / "good.mp4", *H264, frames=6)


# --out problems: refused before the model loads; run only (a service job has no --out)
@case("--out")
def out_existing_file(d: Path) -> Built:
    target = d / "taken.txt"
    target.write_text("x")
    return Built(str(good_video(d)), refused((r"is an existing file, not a folder",), (r"Fix: pass a folder",)),
                 out=str(target), service=False)


@case("--out")
def out_read_only_folder(d: Path) -> Built:
    """A folder without write permission (mode 555). Root writes through modes, so for root the folder is one no
    process may create entries in: /proc/sys (a read-only mount in containers)."""
    locked = d / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root
        locked = Path("/proc/sys")
    return Built(str(good_video(d)), refused((r"permission denied|not writable|read-only",), (r"Fix: .*writable",)),
                 out=str(locked / "out"), service=False)


@case("--out")
def out_under_a_file(d: Path) -> Built:
    target = d / "plain.txt"
    target.write_text("x")
    return Built(str(good_video(d)), refused((r"is a file, so no folder can be made under it",),
                                             (r"Fix: pass a path whose parents are folders",)),
                 out=str(target / "sub" / "out"), service=False)


@case("--out")
def out_equals_input_frame_folder(d: Path) -> Built:
    folder = frame_folder(d / "frames", [Image.fromarray(f) for f in rgb_frames(3)])
    return Built(str(folder), refused((r"inside the input frame folder",), (r"Fix: pass a folder outside it",)),
                 out=str(folder), service=False)


# Valid files decord fails on: read through the automatic PyAV fallback
@case("decord fails", "libvpx-vp9")
def vp9_deadline_realtime(d: Path) -> Built:
    path = lavfi(d / "realtime.webm", "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", frames=3)
    return Built(str(path), ok(3))


@case("decord fails", "mjpeg")
def single_jpeg(d: Path) -> Built:
    path = d / "photo.jpg"
    Image.fromarray(rgb_frames(1)[0]).save(path, quality=95)
    return Built(str(path), ok(1, tolerance=4.0))


@case("decord fails")
def single_png(d: Path) -> Built:
    path = d / "picture.png"
    Image.fromarray(rgb_frames(1, seed=7)[0]).save(path)
    return Built(str(path), ok(1, reference=lambda p: pillow_frames([p])))


@case("decord fails", "libx264")
def raw_h264_stream(d: Path) -> Built:
    path = lavfi(d / "stream.h264", *H264, "-f", "h264", frames=3)
    return Built(str(path), ok(3))


@case("decord fails", "libx264")
def video_2x2(d: Path) -> Built:
    return Built(str(lavfi(d / "two.mp4", *H264, size=(2, 2), frames=3)), ok(3, size=(2, 2)))


# Rotation metadata: frames in display orientation
@case("rotation", "libx264")
def rotated_90_display_matrix(d: Path) -> Built:
    """A 64x36 video with a 90-degree display matrix (what ``ffmpeg -display_rotation 90 -i in.mp4 -c copy``
    writes; the ffmpeg 5 here writes the same matrix from the ``rotate`` tag): shown 36x64, turned
    counter-clockwise."""
    plain = lavfi(d / "upright.mp4", *H264, frames=3)
    path = d / "rotated.mp4"
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path))
    with av.open(str(path)) as c:  # the builder's own check: a real 90-degree display matrix
        assert next(c.decode(video=0)).rotation == 90
    return Built(str(path), ok(3, size=(H, W)))


# Resolution change mid-stream: every frame, resized to the first frame's size, never copies
@case("resolution change", "libx264")
def resolution_change_ts(d: Path) -> Built:
    first = lavfi(d / "part1.ts", *H264, "-f", "mpegts", frames=3)
    second = lavfi(d / "part2.ts", *H264, "-f", "mpegts", size=(96, 54), frames=3, source="smptehdbars")
    path = d / "two-sizes.ts"
    path.write_bytes(first.read_bytes() + second.read_bytes())
    # scaled by a different filter than the reference: a wider tolerance, still far below a copied frame's
    return Built(str(path), ok(6, tolerance=12.0))


# 16-bit grey frames: scaled, not white
@case("16-bit grey")
def grey16_png_folder(d: Path) -> Built:
    y, x = np.mgrid[0:H, 0:W]
    images = [Image.fromarray(((x * 1000 + y * 300 + t * 2000) % 60000).astype(np.uint16)) for t in range(3)]
    folder = frame_folder(d / "grey16", images)
    with Image.open(folder / "00000.png") as im:
        assert im.mode.startswith("I;16") or im.mode == "I"
    return Built(str(folder), ok(3, reference=folder_reference, tolerance=1.0))


# A frame above the pixel limit: refused from the headers
@case("pixel limit")
def png_20000x10000_in_folder(d: Path) -> Built:
    folder = frame_folder(d / "huge", [Image.fromarray(f) for f in rgb_frames(2)])
    huge_png(folder / "00002.png")
    return Built(str(folder), refused((r"\b20000 ?x ?10000\b", r"max.pixels|33,?177,?600"), (r"--max-pixels",)))


# Expressions
@case("expression")
def expression_10000_characters(d: Path) -> Built:
    # `run` counts its tokens against the LLM's room; a service with --max-expression-chars (serve's default
    # 1,000) refuses it at the door by its characters instead, naming that limit
    return Built(str(good_video(d)), refused((r"too long: [\d,]+ tokens|above this service's limit of [\d,]+",
                                              r"10,?000 characters", r"\d+ positions|limit"),
                                             (r"Fix: shorten the expression",)),
                 expressions=(LONG_EXPRESSION,))


@case("expression")
def expression_zero_width_spaces_only(d: Path) -> Built:
    return Built(str(good_video(d)), refused((r"no visible character", r"U\+200B"), (r"--expression",)),
                 expressions=(INVISIBLE_EXPRESSION,))


# A file cut inside moov
@case("truncated", "libx264")
def truncated_inside_moov(d: Path) -> Built:
    whole = lavfi(d / "whole.mp4", *H264, frames=12)  # moov after mdat (no faststart): cut inside it
    data = whole.read_bytes()
    moov = data.rfind(b"moov") - 4
    assert moov > 0
    path = d / "cut.mp4"
    path.write_bytes(data[: moov + (len(data) - moov) // 2])
    return Built(str(path), refused((r"truncated",), (r"Fix: ",)))


# Bit-flipped H.264: every frame, the damaged ones counted, one warning, no raw decoder noise
@case("damaged", "libx264")
def bit_flipped_h264(d: Path) -> Built:
    clean = lavfi(d / "clean.mp4", *H264, "-g", "30", frames=8)
    data = bytearray(clean.read_bytes())
    with av.open(str(clean)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    for pos, size in packets[4:]:  # P-frames after the fourth: the first frames stay intact
        for k in range(8, size - 2, max(size // 6, 3)):
            data[pos + k] ^= 0x5A
    path = d / "bitflip.mp4"
    path.write_bytes(bytes(data))
    return Built(str(path), ok(8, compare=4, damaged=True, warnings=r"damaged",
                               forbidden=(r"error while decoding MB", r"\[h264 @")))


# Cases that already passed
@case("already passes")
def missing_file(d: Path) -> Built:
    return Built(str(d / "nowhere" / "missing.mp4"), refused((r"no such file or folder",)))


@case("already passes")
def empty_file(d: Path) -> Built:
    path = d / "empty.mp4"
    path.write_bytes(b"")
    return Built(str(path), refused((r"empty \(0 bytes\)",)))


@case("already passes")
def audio_only(d: Path) -> Built:
    path = d / "sound.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=0.5", "-c:a", "aac", str(path))
    return Built(str(path), refused((r"no video stream",)))


@case("already passes")
def random_bytes_named_mp4(d: Path) -> Built:
    path = d / "noise.mp4"
    path.write_bytes(np.random.default_rng(13).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return Built(str(path), refused((r"not a video FFmpeg can read|corrupt",)))


@case("codec", "libx265")
def hevc(d: Path) -> Built:
    path = lavfi(d / "hevc.mp4", "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-x265-params",
                 "log-level=error", frames=3)
    return Built(str(path), ok(3))


@case("codec", "libaom-av1")
def av1(d: Path) -> Built:
    path = lavfi(d / "av1.mp4", "-c:v", "libaom-av1", "-cpu-used", "8", "-pix_fmt", "yuv420p", frames=3)
    return Built(str(path), ok(3))


@case("codec", "libvpx")
def vp8(d: Path) -> Built:
    return Built(str(lavfi(d / "vp8.webm", "-c:v", "libvpx", "-deadline", "good", "-cpu-used", "8", frames=3)),
                 ok(3))


@case("codec", "libx264")
def ten_bit_yuv420p10le(d: Path) -> Built:
    path = lavfi(d / "tenbit.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le", frames=3)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
    # PyAV's rgb24 conversion of 10-bit frames upsamples chroma unlike FFmpeg's command line (and decord):
    # ~4.8 mean difference on this synthetic picture's sharp colour edges (bicubic vs bilinear chroma)
    return Built(str(path), ok(3, tolerance=6.0))


@case("codec", "libx264")
def interlaced(d: Path) -> Built:
    path = lavfi(d / "interlaced.mp4", *H264, "-flags", "+ildct+ilme", "-x264opts", "tff=1", size=(W, 48), frames=3)
    # decord (and the ffmpeg command line) convert interlaced 4:2:0 chroma unlike PyAV's rgb24 reformat: ~9 mean
    # difference on this picture's sharp colour edges; a wrong or missing frame differs by far more
    return Built(str(path), ok(3, size=(W, 48), tolerance=10.0))


@case("size", "libx264")
def odd_size_97x55(d: Path) -> Built:
    # testsrc (RGB) keeps odd sizes (testsrc2 rounds them down); 4:4:4 so that H.264 can code them
    path = lavfi(d / "odd.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p", size=(97, 55),
                 frames=3, source="testsrc")
    with av.open(str(path)) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (97, 55)
    return Built(str(path), ok(3, size=(97, 55)))


@case("size", "libx264")
def one_frame_video(d: Path) -> Built:
    return Built(str(lavfi(d / "one.mp4", *H264, frames=1)), ok(1))


@case("size", "libx264")
def very_wide_160x8(d: Path) -> Built:
    return Built(str(lavfi(d / "wide.mp4", *H264, size=(160, 8), frames=3)), ok(3, size=(160, 8)))


@case("size", "libx264")
def very_tall_8x90(d: Path) -> Built:
    return Built(str(lavfi(d / "tall.mp4", *H264, size=(8, 90), frames=3)), ok(3, size=(8, 90)))


@case("frame folder")
def folder_of_mixed_sizes(d: Path) -> Built:
    images = [Image.fromarray(f) for f in rgb_frames(3)] + [Image.fromarray(rgb_frames(1, size=(48, 36))[0])]
    folder = frame_folder(d / "mixed", images)
    return Built(str(folder), refused((r"48x36", r"all frames of a video must have one size"),
                                      (r"Fix: resize the frames",)))


@case("frame folder")
def folder_with_a_non_image_file(d: Path) -> Built:
    folder = frame_folder(d / "with-notes", [Image.fromarray(f) for f in rgb_frames(3)])
    (folder / "notes.txt").write_text("not a frame")
    (folder / "Thumbs.db").write_bytes(os.urandom(64))
    return Built(str(folder), ok(3, reference=folder_reference, tolerance=0.0))


@case("frame folder")
def empty_folder(d: Path) -> Built:
    folder = d / "nothing"
    folder.mkdir()
    return Built(str(folder), refused((r"no JPEG/PNG frames",)))


@case("frame folder")
def grey_jpeg_folder(d: Path) -> Built:
    images = [Image.fromarray(f).convert("L") for f in rgb_frames(3)]
    return Built(str(frame_folder(d / "grey-jpeg", images, ".jpg", quality=95)),
                 ok(3, reference=folder_reference, tolerance=0.0))


@case("frame folder")
def cmyk_jpeg_folder(d: Path) -> Built:
    images = [Image.fromarray(f).convert("CMYK") for f in rgb_frames(3)]
    folder = frame_folder(d / "cmyk-jpeg", images, ".jpg", quality=95)
    with Image.open(folder / "00000.jpg") as im:
        assert im.mode == "CMYK"
    return Built(str(folder), ok(3, reference=folder_reference, tolerance=0.0))


@case("frame folder")
def rgba_png_folder(d: Path) -> Built:
    images = []
    for f in rgb_frames(3):
        alpha = np.full(f.shape[:2], 128, np.uint8)
        images.append(Image.fromarray(np.dstack([f, alpha]), "RGBA"))
    return Built(str(frame_folder(d / "rgba", images)), ok(3, reference=folder_reference, tolerance=0.0))


@case("frame folder")
def palette_png_folder(d: Path) -> Built:
    images = [Image.fromarray(f).quantize(32) for f in rgb_frames(3)]
    assert images[0].mode == "P"
    return Built(str(frame_folder(d / "palette", images)), ok(3, reference=folder_reference, tolerance=0.0))


@case("container", "gif")
def animated_gif(d: Path) -> Built:
    return Built(str(lavfi(d / "anim.gif", "-c:v", "gif", frames=3)), ok(3))


@case("container", "libx264")
def mkv_container(d: Path) -> Built:
    return Built(str(lavfi(d / "clip.mkv", *H264, frames=3)), ok(3))


@case("container", "libvpx-vp9")
def webm_vp9(d: Path) -> Built:
    return Built(str(lavfi(d / "clip.webm", "-c:v", "libvpx-vp9", "-deadline", "good", "-cpu-used", "8",
                           frames=3)), ok(3))


@case("container", "libx264")
def mov_container(d: Path) -> Built:
    return Built(str(lavfi(d / "clip.mov", *H264, frames=3)), ok(3))


@case("container", "mpeg4")
def avi_mpeg4(d: Path) -> Built:
    return Built(str(lavfi(d / "clip.avi", "-c:v", "mpeg4", "-q:v", "3", frames=3)), ok(3, tolerance=4.0))


@case("timing", "libx264")
def variable_frame_rate(d: Path) -> Built:
    path = d / "vfr.mp4"
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={W}x{H}:rate=10", "-frames:v", "6",
           "-vf", "setpts='N/10/TB+if(gt(N,3),0.37*(N-3)/TB,0)'", "-fps_mode", "passthrough", *H264, str(path))
    return Built(str(path), ok(6))


@case("timing", "libx264")
def b_frames(d: Path) -> Built:
    path = lavfi(d / "bframes.mp4", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "medium", "-bf", "3",
                 "-g", "6", frames=6)
    with av.open(str(path)) as c:  # the builder's own check: frames stored out of presentation order
        packets = [p for p in c.demux(video=0) if p.size]
        assert [p.pts for p in packets] != sorted(p.pts for p in packets)
    return Built(str(path), ok(6))


@case("naming", "libx264")
def unknown_extension(d: Path) -> Built:
    path = lavfi(d / "clip.mp4", *H264, frames=3)
    return Built(str(path.rename(d / "clip.unknownext")), ok(3))


@case("naming", "libx264")
def path_with_spaces_and_unicode(d: Path) -> Built:
    folder = d / "my videos Ünïcødé 日本"
    folder.mkdir()
    return Built(str(lavfi(folder / "clip — final (1) 🎬.mp4", *H264, frames=3)), ok(3))


@case("naming", "libx264")
def symlink_to_video(d: Path) -> Built:
    target = lavfi(d / "target.mp4", *H264, frames=3)
    link = d / "link.mp4"
    link.symlink_to(target)
    return Built(str(link), ok(3))


@case("naming")
def directory_named_like_a_video(d: Path) -> Built:
    folder = d / "movie.mp4"
    folder.mkdir()
    return Built(str(folder), refused((r"no JPEG/PNG frames",)))


@case("naming")
def fifo_named_like_a_video(d: Path) -> Built:
    path = d / "pipe.mp4"
    os.mkfifo(path)  # opening it would block: it must be refused without being opened
    return Built(str(path), refused((r"not a regular file",)))


@case("naming", "libx264")
def symlink_loop(d: Path) -> Built:
    a, b = d / "loop-a.mp4", d / "loop-b.mp4"
    a.symlink_to(b)
    b.symlink_to(a)
    return Built(str(a), refused((r"no such file|symbolic links|loop",)))


# --------------------------------------------------------------------------------------------------- corpus
class Corpus:
    """Builds the cases of :data:`CASES` lazily, each in its own sub-folder of ``root``, once.

    ``get(name)`` returns the :class:`Built` case; it raises :class:`MissingEncoder` when the case needs an
    FFmpeg encoder this ffmpeg lacks (the only reason a case is skipped).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._built: dict[str, Built] = {}

    def get(self, name: str) -> Built:
        if name not in self._built:
            spec = CASE_BY_NAME[name]
            if spec.encoder is not None and spec.encoder not in encoders():
                raise MissingEncoder(f"ffmpeg here has no {spec.encoder} encoder (ffmpeg -encoders)")
            folder = self.root / name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            self._built[name] = dataclasses.replace(spec.build(folder), folder=str(folder))
        return self._built[name]


class MissingEncoder(Exception):
    """The case needs an FFmpeg encoder that the ``ffmpeg`` here does not have."""


CASE_BY_NAME = {c.name: c for c in CASES}


# --------------------------------------------------------------------------------------------------- checks
def check_message(built: Built, message: str, *, cli: bool = True) -> None:
    """The message names the problem (every ``problem`` regex) and, for ``refstream run`` (``cli``), the fix
    (every ``fix`` regex); the case's folder is cut out of the message first (its name is the case's). AssertionError
    naming the missing pattern."""
    if built.folder:
        for folder in {built.folder, str(Path(built.folder).resolve())}:
            message = message.replace(folder, "<case folder>")
    for pattern in built.expected.problem + (built.expected.fix if cli else ()):
        assert re.search(pattern, message, re.IGNORECASE | re.DOTALL), \
            f"the message does not match {pattern!r}:\n{message}"


def check_run_outputs(built: Built, out: Path) -> dict:
    """Check a successful run's folder against the case: ``masks.json`` (frame count and size), ``summary.json``
    (frames, ``frames_damaged``) and ``overlay.mp4`` (frame count, size, and pixels against
    ``blend(reference, masks)``). Returns the summary."""
    from refstream.outputs import blend_masks, decode_rle

    exp = built.expected
    width, height = exp.size
    masks = json.loads((out / "masks.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert (masks["width"], masks["height"]) == exp.size, f"masks.json says {masks['width']}x{masks['height']}"
    assert summary["frames"] == len(masks["frames"]) == exp.frames, \
        f"{summary['frames']} frames segmented, {exp.frames} expected"
    for obj in masks["objects"]:
        assert len(obj["masks"]) == exp.frames and all(m["size"] == [height, width] for m in obj["masks"])
    damaged = summary.get("frames_damaged", 0)
    if exp.damaged:
        assert "frames_damaged" in summary and damaged > 0, \
            f"summary.json frames_damaged: {summary.get('frames_damaged')!r}"
    else:
        assert damaged == 0, f"summary.json frames_damaged = {damaged} for an intact input"
    with av.open(str(out / "overlay.mp4")) as container:
        overlay = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(overlay) == exp.frames, f"overlay.mp4 has {len(overlay)} frames, {exp.frames} expected"
    assert overlay[0].shape[:2] == (height + height % 2, width + width % 2)
    if exp.reference is not None:
        reference = exp.reference(Path(built.input))
        assert reference.shape == (exp.frames, height, width, 3), f"reference decode {reference.shape}"
        for t in range(exp.frames if exp.compare is None else min(exp.compare, exp.frames)):
            frame_masks = np.stack([decode_rle(obj["masks"][t]) for obj in masks["objects"]])
            want = luma(blend_masks(reference[t], frame_masks))
            diff = np.abs(luma(overlay[t][:height, :width]) - want).mean()
            assert diff <= exp.tolerance + OVERLAY_LOSS, \
                f"overlay frame {t} differs from the reference by {diff:.1f} (mean luma) on average"
    return summary


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of uint8 RGB [..., 3] as float32 [...] (0-255)."""
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def check_decoded_frames(built: Built, decoder: str = "decord") -> None:
    """The frames :func:`video_pipeline.decode.open_video` (the decoding API the run uses) reads match the
    reference decode: count, size and pixels (mean absolute difference <= ``tolerance``)."""
    from video_pipeline.decode import open_video

    exp = built.expected
    if exp.reference is None:
        return
    with open_video(built.input, decoder) as source:
        assert (source.num_frames, source.width, source.height) == (exp.frames, *exp.size), \
            f"open_video: {source.num_frames} frames of {source.width}x{source.height}"
        frames = source.read(range(source.num_frames))
    reference = exp.reference(Path(built.input))
    for t in range(exp.frames if exp.compare is None else min(exp.compare, exp.frames)):
        diff = np.abs(frames[t].astype(np.float32) - reference[t].astype(np.float32)).mean()
        assert diff <= exp.tolerance, f"frame {t} differs from the reference decode by {diff:.2f} on average"


__all__ = ["CASES", "CASE_BY_NAME", "Built", "Case", "Corpus", "Expected", "MissingEncoder", "check_decoded_frames",
           "check_message", "check_run_outputs", "encoders", "ffmpeg", "pyav_frames"]
