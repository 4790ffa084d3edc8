"""Odd inputs at the decoder (issue 13): rotated phone videos, a resolution change mid-stream, damaged frames.

Every video is built here with ffmpeg (64x36 to 160x90, a few frames) and decoded for real with both
decoders; the references are PyAV's own stored frames and the ffmpeg command line's autorotation.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from video_pipeline.decode import open_video

DECODERS = ["decord", "pyav"]


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


def pattern_video(path: Path, size: str, seconds: float = 1.0, pattern: str = "testsrc", fmt: str | None = None,
            extra: tuple[str, ...] = ()) -> Path:
    """An H.264 test pattern (asymmetric, so a turn shows) at 10 fps."""
    ffmpeg("-f", "lavfi", "-i", f"{pattern}=size={size}:rate=10", "-t", str(seconds), "-c:v", "libx264",
           "-pix_fmt", "yuv420p", *extra, *(["-f", fmt] if fmt else []), str(path))
    return path


def rotated(source: Path, path: Path, degrees: int) -> Path:
    """``source`` with a display matrix (``-display_rotation`` where ffmpeg has it, else the older rotate tag);
    the stream is copied, so the stored frames are untouched."""
    try:
        ffmpeg("-display_rotation", str(degrees), "-i", str(source), "-c", "copy", str(path))
    except subprocess.CalledProcessError:  # ffmpeg < 6
        ffmpeg("-i", str(source), "-c", "copy", "-metadata:s:v", f"rotate={degrees}", str(path))
    return path


def stored_frames(path: Path) -> tuple[np.ndarray, int]:
    """Every frame as stored (PyAV, no rotation) and the file's display rotation in quarter turns
    counter-clockwise (FFmpeg's av_display_rotation_get, as PyAV's ``frame.rotation`` reads it)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return np.stack([f.to_ndarray(format="rgb24") for f in frames]), round(frames[0].rotation / 90) % 4


def autorotated(path: Path, width: int, height: int) -> np.ndarray:
    """The frames as the ffmpeg command line shows them (it applies the display matrix by default)."""
    raw = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return pattern_video(tmp_path_factory.mktemp("rot") / "plain.mp4", "64x36")


# ------------------------------------------------------------------------------------------------ rotation
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_videos_are_decoded_in_display_orientation(plain, tmp_path, decoder, degrees):
    path = rotated(plain, tmp_path / f"rot{degrees}.mp4", degrees)
    stored, turns = stored_frames(path)
    assert turns != 0 and stored.shape[1:3] == (36, 64)  # the matrix is there; the frames are stored unturned
    with open_video(path, decoder) as video:
        frames = video.read(range(video.num_frames))
        assert video.decoder_used == decoder  # decord turns it right itself: no fallback needed
        report = video.decode_report()
    expected = np.rot90(stored, turns, axes=(1, 2))
    assert frames.shape == expected.shape == (len(stored), *((64, 36) if degrees != 180 else (36, 64)), 3)
    tolerance = 0 if decoder == "pyav" else 2  # decord's FFmpeg converts to RGB on its own
    assert np.abs(frames.astype(int) - expected).max() <= tolerance
    assert report["rotation"] == turns * 90
    shown = autorotated(path, expected.shape[2], expected.shape[1])  # independent reference: the ffmpeg CLI
    assert np.abs(frames.astype(float) - shown).mean() < 1.5


# --------------------------------------------------------------------------------- size change mid-stream
@pytest.fixture(scope="module")
def size_change(tmp_path_factory) -> Path:
    """An MPEG-TS of a 64x36 segment (15 frames) followed by an 80x48 one (15 frames), concatenated."""
    folder = tmp_path_factory.mktemp("sizes")
    a = pattern_video(folder / "a.ts", "64x36", 1.5, fmt="mpegts")
    b = pattern_video(folder / "b.ts", "80x48", 1.5, pattern="testsrc2", fmt="mpegts")
    path = folder / "ab.ts"
    path.write_bytes(a.read_bytes() + b.read_bytes())
    return path


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_resolution_change_mid_stream_is_decoded_and_resized(size_change, decoder, caplog):
    with av.open(str(size_change)) as container:
        stored = list(container.decode(video=0))
    assert [(f.width, f.height) for f in stored] == [(64, 36)] * 15 + [(80, 48)] * 15
    expected = np.stack([f.to_ndarray(format="rgb24", width=64, height=36) for f in stored])  # PyAV + resize
    with caplog.at_level("WARNING", logger="refstream.decode"), open_video(size_change, decoder) as video:
        frames = video.read(range(video.num_frames))
        report = video.decode_report()
    assert np.array_equal(frames, expected)  # decord alone would repeat frame 14 for frames 15-29
    assert not any(np.array_equal(frames[i], frames[14]) for i in range(15, 30))
    assert report["frame_sizes"] == ["64x36", "80x48"] and report["resized_frames"] == 15
    assert report["decoder"] == "pyav"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == (1 if decoder == "decord" else 0)
    assert decoder == "pyav" or "frame size changes mid-stream (64x36, 80x48)" in warnings[0]


# ---------------------------------------------------------------------------------------- damaged frames
def flip_bytes(source: Path, path: Path, count: int = 40, seed: int = 0) -> Path:
    """``source`` with ``count`` bytes inverted in the middle third of its ``mdat`` (the coded frames)."""
    data = bytearray(source.read_bytes())
    start = data.index(b"mdat") + 4
    third = (len(data) - start) // 3
    rng = random.Random(seed)
    for _ in range(count):
        data[start + third + rng.randrange(third)] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("damaged")
    clean = pattern_video(folder / "clean.mp4", "160x90", 3, pattern="testsrc2", extra=("-g", "10"))
    return clean, flip_bytes(clean, folder / "flipped.mp4")


@pytest.mark.parametrize("decoder", DECODERS)
def test_damaged_frames_are_counted_and_ffmpeg_stays_quiet(damaged, decoder, capfd):
    clean, flipped = damaged
    with open_video(flipped, decoder) as video:
        frames = video.read(range(video.num_frames))
        report = video.decode_report()
    err = capfd.readouterr().err
    assert "error while decoding" not in err and "[h264" not in err, err[-2000:]  # fd 2: FFmpeg's own lines
    assert frames.shape == (30, 90, 160, 3)
    with av.open(str(flipped)) as container:  # PyAV's own flags: the frames FFmpeg decoded with errors, decoded
        container.streams.video[0].thread_type = "SLICE"  # one frame at a time (frame threads flag 6-9 of them)
        corrupt = sum(f.is_corrupt for f in container.decode(video=0))
    assert report["frames_damaged"] == corrupt > 0
    with open_video(clean, decoder) as video:
        video.read(range(video.num_frames))
        assert video.decode_report()["frames_damaged"] == 0 and video.decoder_used == decoder


def test_a_frame_past_pillows_bomb_limit_is_refused_by_max_pixels_and_a_raised_limit_is_honoured(tmp_path):
    """A 20000x10000 PNG (above twice Pillow's MAX_IMAGE_PIXELS, where Pillow raises DecompressionBombError at
    open) is refused by our limit, naming its size and ``--max-pixels``; with the limit raised, a 12000x8000
    frame (past Pillow's limit too) opens."""
    from PIL import Image

    from refstream_errors import InputError

    folder = tmp_path / "huge"
    folder.mkdir()
    Image.new("RGB", (64, 36)).save(folder / "00000.png")
    Image.new("1", (20000, 10000)).save(folder / "00001.png")  # 1 bit per pixel: a small file
    with pytest.raises(InputError, match=r"00001\.png: frames are 20000x10000 = 200,000,000 pixels.*max.pixels"):
        open_video(folder)
    raised = tmp_path / "raised"
    raised.mkdir()
    Image.new("1", (12000, 8000)).save(raised / "00000.png")
    video = open_video(raised, max_pixels=10**9)
    assert (video.width, video.height, video.num_frames) == (12000, 8000, 1)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own check is back on
