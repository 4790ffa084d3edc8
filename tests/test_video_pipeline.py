"""Tests for video_pipeline: decoding (decord, PyAV, frame folders), frame plans, preprocessing.

Real files only: the bundled examples/bedroom.mp4 and DAVIS blackswan frames, plus small videos and broken files
written into tmp_path. Cases that could crash a native decoder run in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from refstream.errors import ConfigError, InputError
from video_pipeline.decode import FrameFolder, open_video
from video_pipeline.plan import FramePlan, encoder_positions, plan_frames
from video_pipeline.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_preprocess,
    internvideo_preprocess,
    sam2_longest_side_size,
    sam2_preprocess,
)

DECODERS = ["decord", "pyav"]
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- helpers


def write_video(path: Path, codec: str, options: dict[str, str], n: int = 60, fps: int = 25) -> Path:
    """A 64x48 video whose frame i is grey level 4*i, so a frame's index can be read off its pixels."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = options
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def frame_numbers(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / 4) for f in frames]


def remux_faststart(src: Path, dst: Path) -> Path:
    """Copy the video stream of ``src`` into an MP4 with the index (moov) before the data."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    return dst


def read_all_in_subprocess(path: Path) -> dict[str, str]:
    """Open ``path`` with each decoder and read every frame, in a child interpreter (a native crash
    there fails the test instead of killing pytest). Returns {decoder: "InputError: ..." | "ok N"}."""
    code = textwrap.dedent(
        f"""
        import json
        from refstream.errors import InputError
        from video_pipeline.decode import open_video
        result = {{}}
        for decoder in {DECODERS!r}:
            try:
                with open_video({str(path)!r}, decoder) as video:
                    n = sum(len(idx) for idx, _ in video.iter_chunks(range(video.num_frames), 32))
                result[decoder] = f"ok {{n}}"
            except InputError as e:
                result[decoder] = f"InputError: {{e}}"
        print(json.dumps(result))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"decoder process died (rc={proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gop_videos(tmp_path_factory) -> list[Path]:
    """Numbered videos with a keyframe every 10 frames: H.264 with B-frames in MP4, VP9 in WebM
    (WebM has no frame count in its header, so frames must be counted by demuxing)."""
    folder = tmp_path_factory.mktemp("gop")
    x264 = {"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "2", "crf": "10", "preset": "ultrafast"}
    vp9 = {"g": "10", "crf": "10", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
    return [
        write_video(folder / "gop_h264.mp4", "libx264", x264),
        write_video(folder / "gop_vp9.webm", "libvpx-vp9", vp9),
    ]


@pytest.fixture(scope="module")
def bedroom_frames(bedroom_mp4) -> np.ndarray:
    with open_video(bedroom_mp4, "pyav") as video:
        return video.read([0, 100, 199])


@pytest.fixture(scope="module")
def blackswan_frames(blackswan_dir) -> np.ndarray:
    with open_video(blackswan_dir) as video:
        return video.read([0, 25, 49])


# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("decoder", DECODERS)
def test_bedroom_metadata(bedroom_mp4, decoder):
    with open_video(bedroom_mp4, decoder) as video:
        assert (video.num_frames, video.width, video.height, video.fps) == (200, 960, 540, 30.0)
        assert len(video) == 200 and video.path == bedroom_mp4
        assert video.frame_names[:2] == ["00000", "00001"] and video.frame_names[-1] == "00199"
        assert len(video.frame_names) == 200


@pytest.mark.parametrize("decoder", DECODERS)
def test_blackswan_folder(blackswan_dir, decoder):
    with open_video(blackswan_dir, decoder) as video:  # the decoder is ignored for folders
        assert isinstance(video, FrameFolder)
        assert (video.num_frames, video.width, video.height, video.fps) == (50, 854, 480, None)
        assert video.frame_names == [f"{i:05d}" for i in range(50)]
        frames = video.read([49, 0])
    assert frames.dtype == np.uint8 and frames.shape == (2, 480, 854, 3)
    expected = np.asarray(Image.open(blackswan_dir / "00000.jpg").convert("RGB"))
    np.testing.assert_array_equal(frames[1], expected)


def test_decord_and_pyav_agree_on_bedroom(bedroom_mp4):
    with open_video(bedroom_mp4, "decord") as a, open_video(bedroom_mp4, "pyav") as b:
        assert a.num_frames == b.num_frames == 200
        chunks = zip(a.iter_chunks(range(200), 40), b.iter_chunks(range(200), 40), strict=True)
        diffs = [np.abs(fa.astype(np.int16) - fb).mean() for (_, fa), (_, fb) in chunks]
    assert len(diffs) == 5
    assert max(diffs) < 0.5  # measured: identical (0.0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_exact_frames_at_arbitrary_indices(gop_videos, decoder):
    wanted = [59, 3, 31, 30, 12, 0, 58, 3, 20, 21, 9, 10, 11, 40]
    for path in gop_videos:
        with open_video(path, decoder) as video:
            assert video.num_frames == 60 and video.fps == 25.0
            assert frame_numbers(video.read(wanted)) == wanted
            assert frame_numbers(video.read(sorted(set(wanted)))) == sorted(set(wanted))
            assert frame_numbers(video.read([5])) == [5]  # backwards after reading frame 59


@pytest.mark.parametrize("decoder", DECODERS)
def test_random_reads_match_sequential_bedroom(bedroom_mp4, decoder):
    wanted = [150, 3, 77, 3, 199, 0, 78]
    with open_video(bedroom_mp4, decoder) as video:
        frames = video.read(wanted)
        reference = {}
        for idx, chunk in video.iter_chunks(range(200), 50):
            reference.update((i, f) for i, f in zip(idx, chunk, strict=True) if i in wanted)
    for k, i in enumerate(wanted):
        np.testing.assert_array_equal(frames[k], reference[i])
    assert not np.array_equal(reference[77], reference[78])  # neighbours differ: the test can tell them apart


@pytest.mark.parametrize("decoder", DECODERS)
def test_iter_chunks_covers_indices_in_order(gop_videos, decoder):
    indices = [0, 7, 14, 21, 28, 35, 42, 49, 56, 2, 1]
    with open_video(gop_videos[0], decoder) as video:
        chunks = list(video.iter_chunks(indices, chunk_size=4))
        assert [len(idx) for idx, _ in chunks] == [4, 4, 3]
        assert [i for idx, _ in chunks for i in idx] == indices
        assert all(frames.shape == (len(idx), 48, 64, 3) for idx, frames in chunks)
        assert [n for _, frames in chunks for n in frame_numbers(frames)] == indices
        with pytest.raises(ValueError):
            next(video.iter_chunks(indices, chunk_size=0))


def test_iter_chunks_on_folder(blackswan_dir):
    with open_video(blackswan_dir) as video:
        seen = [(idx, frames.shape) for idx, frames in video.iter_chunks(range(0, 50, 5), chunk_size=3)]
    assert [i for idx, _ in seen for i in idx] == list(range(0, 50, 5))
    assert seen[-1] == ([45], (1, 480, 854, 3))


@pytest.mark.parametrize("decoder", DECODERS)
def test_read_edge_cases(gop_videos, decoder):
    video = open_video(gop_videos[0], decoder)
    assert video.read([]).shape == (0, 48, 64, 3)
    assert frame_numbers(video.read(np.array([2, 1], dtype=np.int64))) == [2, 1]
    with pytest.raises(IndexError, match="60"):
        video.read([60])
    with pytest.raises(IndexError):
        video.read([-1])
    with pytest.raises(TypeError):
        video.read([1.5])
    video.close()
    video.close()
    with pytest.raises(ValueError, match="closed"):
        video.read([0])


def test_decord_torch_bridge_still_gives_numpy(gop_videos):
    import decord

    decord.bridge.set_bridge("torch")
    try:
        with open_video(gop_videos[0], "decord") as video:
            frames = video.read([4, 8])
    finally:
        decord.bridge.set_bridge("native")
    assert isinstance(frames, np.ndarray) and frame_numbers(frames) == [4, 8]


def test_unknown_decoder(bedroom_mp4, blackswan_dir):
    for path in (bedroom_mp4, blackswan_dir):
        with pytest.raises(ConfigError, match="opencv"):
            open_video(path, "opencv")


def assert_input_error(path: Path, decoder: str, *words: str) -> None:
    with pytest.raises(InputError) as info:
        open_video(path, decoder)
    message = str(info.value)
    assert str(path) in message and "Fix:" in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("decoder", DECODERS)
def test_bad_files(tmp_path, decoder):
    assert_input_error(tmp_path / "missing.mp4", decoder, "no such file")
    (tmp_path / "empty.mp4").touch()
    assert_input_error(tmp_path / "empty.mp4", decoder, "empty")
    (tmp_path / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    assert_input_error(tmp_path / "text.mp4", decoder, "not a video")
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(200_000))
    assert_input_error(tmp_path / "random.mp4", decoder, "not a video")


@pytest.mark.parametrize("decoder", DECODERS)
def test_audio_only_file(tmp_path, decoder):
    import av

    path = tmp_path / "speech.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert_input_error(path, decoder, "no video stream", "audio")


def test_truncated_videos_never_crash(bedroom_mp4, tmp_path):
    data = bedroom_mp4.read_bytes()
    cut = tmp_path / "cut.mp4"  # bedroom.mp4 keeps its index at the end: 30% has no index at all
    cut.write_bytes(data[: len(data) * 3 // 10])
    fast = remux_faststart(bedroom_mp4, tmp_path / "fast.mp4")  # index first: 30% has 59 of 200 packets
    fast_cut = tmp_path / "fast_cut.mp4"
    fast_cut.write_bytes(fast.read_bytes()[: len(data) * 3 // 10])
    for path in (cut, fast_cut):
        for decoder, outcome in read_all_in_subprocess(path).items():
            assert outcome.startswith("InputError") or outcome.startswith("ok "), (decoder, outcome)
            assert outcome.startswith("ok ") or str(path) in outcome
    result = read_all_in_subprocess(fast_cut)
    assert all("truncated" in outcome for outcome in result.values()), result


def test_corrupt_data_names_the_frame(bedroom_mp4, tmp_path):
    data = bytearray(bedroom_mp4.read_bytes())
    start, stop = len(data) * 40 // 100, len(data) * 45 // 100
    data[start:stop] = np.random.default_rng(0).bytes(stop - start)
    path = tmp_path / "scrambled.mp4"
    path.write_bytes(bytes(data))
    for decoder, outcome in read_all_in_subprocess(path).items():
        assert outcome.startswith("InputError") and "frame " in outcome, (decoder, outcome)


def test_bad_folders(tmp_path, blackswan_dir):
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames here")
    assert_input_error(empty, "decord", "no JPEG/PNG")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("00000.jpg", "00001.jpg"):
        (mixed / name).write_bytes((blackswan_dir / name).read_bytes())
    Image.new("RGB", (640, 360)).save(mixed / "00002.png")
    with pytest.raises(InputError, match=r"00002\.png.*640x360.*854x480"):
        open_video(mixed)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00000.jpg").write_bytes((blackswan_dir / "00000.jpg").read_bytes())
    (broken / "00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=r"00001\.jpg.*not a readable image"):
        open_video(broken)


def test_folder_mixed_formats_sorted_by_name(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(folder / "b.png")
    Image.new("P", (8, 6)).save(folder / "a.png")  # palette image: converted to RGB
    Image.new("RGB", (8, 6), (200, 0, 0)).save(folder / "c.JPG")
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    with open_video(folder) as video:
        assert video.frame_names == ["a", "b", "c"]
        frames = video.read([1, 0])
    assert frames.shape == (2, 6, 8, 3)
    assert tuple(frames[0, 0, 0]) == (10, 20, 30)


# -------------------------------------------------------------------------------------------- plan


def test_plan_200_frames():
    plan = plan_frames(200)
    assert isinstance(plan, FramePlan)
    assert plan.sam2_indices == list(range(200))
    assert plan.encoder_indices == np.linspace(0, 199, 16, dtype=int).tolist()  # VideoGLaMM's expression
    assert plan.encoder_indices[0] == 0 and plan.encoder_indices[-1] == 199
    assert plan.encoder_positions == plan.encoder_indices


def test_plan_64_frame_clip_matches_videoglamm():
    expected = [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63]
    assert plan_frames(64).encoder_indices == expected


def test_plan_short_videos_repeat_the_last_frame():
    plan = plan_frames(5)
    assert plan.sam2_indices == [0, 1, 2, 3, 4]
    assert plan.encoder_indices == [0, 1, 2, 3, 4] + [4] * 11
    assert plan_frames(16).encoder_indices == list(range(16))
    assert plan_frames(1).encoder_indices == [0] * 16
    assert plan_frames(17).encoder_indices == np.linspace(0, 16, 16, dtype=int).tolist()


def test_plan_stride_and_max_frames():
    plan = plan_frames(200, stride=3)
    assert plan.sam2_indices == list(range(0, 200, 3))
    assert plan.encoder_positions == np.linspace(0, 66, 16, dtype=int).tolist()
    assert plan.encoder_indices == [plan.sam2_indices[p] for p in plan.encoder_positions]

    plan = plan_frames(200, stride=2, max_frames=10)
    assert plan.sam2_indices == list(range(0, 20, 2))
    assert plan.encoder_indices == list(range(0, 20, 2)) + [18] * 6
    assert plan.encoder_positions == list(range(10)) + [9] * 6

    assert plan_frames(10, max_frames=100).sam2_indices == list(range(10))
    assert len(plan_frames(100, num_encoder_frames=8).encoder_indices) == 8
    assert encoder_positions(3, 4) == [0, 1, 2, 2]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_frames": 0}, InputError),
        ({"num_frames": 10, "stride": 0}, ConfigError),
        ({"num_frames": 10, "max_frames": 0}, ConfigError),
        ({"num_frames": 10, "num_encoder_frames": 0}, ConfigError),
        ({"num_frames": 10, "stride": 1.5}, ConfigError),
        ({"num_frames": 10, "stride": True}, ConfigError),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match="Fix:"):
        plan_frames(**kwargs)


# -------------------------------------------------------------------------------------- preprocess


def normalised(rgb: tuple[int, int, int], mean, std) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


@pytest.mark.parametrize(
    "fn, size, mean, std",
    [
        (clip_preprocess, 336, CLIP_MEAN, CLIP_STD),
        (internvideo_preprocess, 224, IMAGENET_MEAN, IMAGENET_STD),
        (sam2_preprocess, 1024, IMAGENET_MEAN, IMAGENET_STD),
    ],
)
def test_preprocess_shapes_and_normalisation(fn, size, mean, std):
    rgb = (50, 128, 200)
    frames = np.empty((2, 90, 160, 3), np.uint8)
    frames[...] = rgb
    out = fn(frames)
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    expected = normalised(rgb, mean, std).view(1, 3, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_preprocess_chunking_does_not_change_results(blackswan_frames):
    for fn in (clip_preprocess, internvideo_preprocess):
        torch.testing.assert_close(fn(blackswan_frames, chunk_size=1), fn(blackswan_frames), atol=0, rtol=0)


def test_clip_matches_transformers_processor(blackswan_frames, bedroom_frames):
    from transformers import CLIPImageProcessorPil

    # openai/clip-vit-large-patch14-336 settings (CLIPImageProcessor falls back to this Pillow class
    # when torchvision is missing, which it is here)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    portrait = np.ascontiguousarray(blackswan_frames[:1, :, 200:520])  # 320x480: height > width
    for frames in (blackswan_frames, bedroom_frames, portrait):
        ours = clip_preprocess(frames)
        reference = processor(list(frames), return_tensors="pt")["pixel_values"]
        assert ours.shape == reference.shape == (len(frames), 3, 336, 336)
        diff = (ours - reference).abs()
        # Pillow rounds to uint8 between its two bicubic passes, torch once: one grey level (0.0150 at
        # the smallest std) on <0.5% of the values, two (0.0300) on ~1e-6 of them; measured max 0.0292-0.0300
        assert diff.max() < 0.031
        assert (diff > 0.016).float().mean() < 1e-4
        assert diff.mean() < 2e-4  # measured 4.4e-5 .. 9.3e-5


def test_internvideo_keeps_224_input_and_squashes_aspect():
    frames = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    out = internvideo_preprocess(frames)
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2) / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), atol=1e-5, rtol=0)
    # left half black, right half white: with no crop, the boundary stays in the middle of the output
    wide = np.zeros((1, 100, 400, 3), np.uint8)
    wide[:, :, 200:] = 255
    row = internvideo_preprocess(wide)[0, 0, 50]
    assert (row[:111] < 0).all() and (row[113:] > 0).all()


def test_internvideo_matches_opencv_resize(blackswan_frames, bedroom_frames):
    """The original runs ``cv2.resize(x, (224, 224))`` (INTER_LINEAR); ours is within 1 grey level of it."""
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    for frames in (blackswan_frames, bedroom_frames):
        reference = np.stack([cv2.resize(f, (224, 224)) for f in frames]).astype(np.float32) / 255
        reference = torch.from_numpy((reference - mean) / std).permute(0, 3, 1, 2)
        diff = (internvideo_preprocess(frames) - reference).abs()
        assert diff.max() < 1.01 / 255 / min(IMAGENET_STD)  # one grey level (measured 0.0175)
        assert (diff > 1e-4).float().mean() < 0.15  # measured 9-10% (OpenCV's fixed-point weights)


def pil_sam2_reference(frame: np.ndarray, style: str) -> torch.Tensor:
    """The reference pipelines written with Pillow + torch, step by step."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = Image.fromarray(frame)
    if style == "videoglamm":  # ResizeLongestSide (PIL bilinear) -> normalise -> F.interpolate bilinear
        h, w = sam2_longest_side_size(*frame.shape[:2])
        x = torch.from_numpy(np.array(image.resize((w, h), Image.BILINEAR))).permute(2, 0, 1).float()
        x = (x - 255 * mean) / (255 * std)
        return F.interpolate(x[None], (1024, 1024), mode="bilinear")[0]
    resample = Image.BICUBIC if style == "sam2" else Image.BILINEAR
    x = torch.from_numpy(np.array(image.resize((1024, 1024), resample))).permute(2, 0, 1).float()
    return (x / 255 - mean) / std


@pytest.mark.parametrize("style, tolerance", [("transformers", 1e-4), ("sam2", 0.036), ("videoglamm", 1e-4)])
def test_sam2_styles_match_their_references(blackswan_frames, style, tolerance):
    frame = blackswan_frames[0]
    ours = sam2_preprocess(frame[None], style=style)[0]
    assert ours.shape == (3, 1024, 1024)
    # bilinear matches Pillow exactly; bicubic is within 2 grey levels (0.035)
    assert (ours - pil_sam2_reference(frame, style)).abs().max() < tolerance


def test_preprocess_rejects_bad_input():
    with pytest.raises(TypeError):
        clip_preprocess(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(TypeError):
        clip_preprocess(torch.zeros((1, 8, 8, 3), dtype=torch.uint8))
    with pytest.raises(ValueError):
        internvideo_preprocess(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError):
        internvideo_preprocess(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError):
        internvideo_preprocess(np.zeros((1, 8, 8, 3), np.uint8), chunk_size=0)
    with pytest.raises(ConfigError, match="style"):
        sam2_preprocess(np.zeros((1, 8, 8, 3), np.uint8), style="opencv")


# ------------------------------------------------------------------------------- odd frames (issue 13)
def test_sixteen_bit_grey_frames_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from video_pipeline.decode import open_video

    folder = tmp_path / "frames16"
    folder.mkdir()
    ramp = (np.arange(64, dtype=np.uint32)[None, :].repeat(8, 0) * 1024).astype(np.uint16)  # 0 .. 64512
    for i in range(3):
        Image.fromarray(ramp).save(folder / f"{i:05d}.png")
    assert Image.open(folder / "00000.png").mode.startswith("I")  # a real 16-bit PNG
    with open_video(folder) as video:
        frames = video.read(range(3))
    assert frames.dtype == np.uint8 and frames.shape == (3, 8, 64, 3)
    expected = np.rint(ramp.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert (frames[0, :, :, 0] == expected).all() and (frames[..., 0] == frames[..., 2]).all()
    assert frames.max() < 255 and len(np.unique(frames)) > 50  # the old convert("RGB") made it all 255


def _png_claiming(path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims width x height (only the header is ever read)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_frames_above_the_pixel_limit_are_refused_from_the_header(tmp_path, bedroom_mp4):
    from refstream.errors import InputError
    from video_pipeline.decode import open_video

    folder = tmp_path / "huge"
    folder.mkdir()
    _png_claiming(folder / "00000.png", 20000, 10000)  # past Pillow's own bomb limit: our limit still speaks
    with pytest.raises(InputError, match=r"20000x10000 = 200,000,000 pixels, above the limit .*Fix: downscale.*"
                                         r"--max-pixels 200000000"):
        open_video(folder)
    _png_claiming(folder / "00000.png", 9000, 5000)  # above 8K, below Pillow's limit
    with pytest.raises(InputError, match=r"9000x5000 = 45,000,000 pixels, above the limit of 33,177,600"):
        open_video(folder)
    with pytest.raises(InputError, match=r"960x540 = 518,400 pixels, above the limit of 100,000.*ffmpeg"):
        open_video(bedroom_mp4, max_pixels=100_000)  # a video file: from the stream header
    with open_video(bedroom_mp4, max_pixels=None) as video:
        assert (video.width, video.height) == (960, 540)


def test_a_file_cut_inside_its_moov_box_is_called_truncated(tmp_path, bedroom_mp4):
    from refstream.errors import InputError
    from video_pipeline.decode import open_video

    fast = tmp_path / "fast.mp4"  # moov before mdat (as phones and web exports write it)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(bedroom_mp4), "-t", "1", "-c", "copy", "-movflags",
                    "+faststart", str(fast)], check=True)
    data = fast.read_bytes()
    moov = data.index(b"moov") - 4
    for cut in (moov + 128, moov + 600):  # FFmpeg sees a data track only / cannot open it at all
        cut_file = tmp_path / f"cut{cut}.mp4"
        cut_file.write_bytes(data[:cut])
        with pytest.raises(InputError, match=rf"truncated file: the 'moov' box at byte {moov} declares .* bytes but "
                                             r"the file ends after .*Fix: re-download"):
            open_video(cut_file)


@pytest.mark.parametrize("kind", ["single_jpeg", "raw_h264", "two_by_two"])
def test_files_decord_cannot_read_fall_back_to_pyav_with_one_warning(kind, tmp_path, bedroom_mp4, caplog):
    """decord fails on these (a single JPEG, a raw .h264 stream, a 2x2 video); PyAV reads them: the frames are
    PyAV's own, with one warning, and ``decoder_used`` says so."""
    path = {"single_jpeg": tmp_path / "one.jpg", "raw_h264": tmp_path / "raw.h264",
            "two_by_two": tmp_path / "tiny.mp4"}[kind]
    make = {"single_jpeg": ["-i", str(bedroom_mp4), "-frames:v", "1"],
            "raw_h264": ["-i", str(bedroom_mp4), "-t", "0.5", "-c:v", "libx264", "-an", "-f", "h264"],
            "two_by_two": ["-f", "lavfi", "-i", "testsrc=size=2x2:rate=10", "-t", "1", "-c:v", "libx264",
                           "-pix_fmt", "yuv444p"]}[kind]
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *make, str(path)], check=True)
    with caplog.at_level("WARNING", logger="refstream.decode"), open_video(path) as video:
        frames = video.read(range(video.num_frames))
        assert video.decoder_used == "pyav"
    assert len([r for r in caplog.records if "reading" in r.getMessage() and "PyAV" in r.getMessage()]) == 1
    with open_video(path, "pyav") as reference:
        assert np.array_equal(frames, reference.read(range(reference.num_frames)))


def test_the_decoder_used_is_recorded_in_the_summary(tmp_path, bedroom_mp4):
    from refstream.cli import main

    raw = tmp_path / "raw.h264"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(bedroom_mp4), "-t", "0.5", "-c:v", "libx264", "-an",
                    "-f", "h264", str(raw)], check=True)
    assert main(["run", str(raw), "-e", "the bed", "--model", "tiny", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["decoder"] == "pyav"
