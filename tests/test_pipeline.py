"""End to end: `refstream run` on real video with the tiny model, its outputs, options and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refstream.cli import main
from refstream.config import load_model_config
from refstream.outputs import decode_rle
from refstream.pipeline import Pipeline, RunOptions, run_to_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> Pipeline:
    return Pipeline(load_model_config("tiny"), "cpu")


def masks_of(result) -> list[list[np.ndarray]]:
    return [[decode_rle(r) for r in per_expression] for per_expression in result.masks]


def test_bedroom_console_script_end_to_end(bedroom_mp4, tmp_path):
    """The README's run command, through the installed console script, in a fresh process."""
    exe = Path(sys.executable).with_name("refstream")
    proc = subprocess.run(
        [str(exe), "run", str(bedroom_mp4), "--expression", "the bed", "--model", "tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stderr and "random weights" in proc.stdout  # said plainly, on screen
    assert "segmenting" in proc.stderr  # the progress bar
    assert "200 frames" in proc.stdout and "stages:" in proc.stdout

    masks = json.loads((tmp_path / "masks.json").read_text())
    assert (masks["height"], masks["width"], masks["fps"]) == (540, 960, 30.0)
    assert masks["frames"] == [f"{i:05d}" for i in range(200)]
    assert masks["random_weights"] is True and "no meaning" in masks["note"]
    assert masks["model"] == "tiny"
    assert masks["pruning"] == {
        "method": "litelvlm", "variant": "paper", "budget": 196, "placement": "pooled", "kept_per_frame": 49,
        "unit": "cell", "clip_text": "question", "answer": "forced",
    }
    (obj,) = masks["objects"]
    assert obj["expression"] == "the bed" and len(obj["masks"]) == 200
    for rle in obj["masks"][::37]:
        assert rle["size"] == [540, 960] and isinstance(rle["counts"], str)
        assert decode_rle(rle).shape == (540, 960)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {"decode", "clip", "prune", "llm", "sam2", "write"}
    assert summary["visual_tokens_into_llm"] == 16 * 49 + 16 * 64
    assert summary["peak_rss_mb"] > 0 and summary["frames"] == 200

    import av

    with av.open(str(tmp_path / "overlay.mp4")) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == 200 and (frames[0].height, frames[0].width) == (540, 960)

    from PIL import Image

    assert Image.open(tmp_path / "tokens.png").size == (672, 672)


def test_blackswan_folder_two_expressions(tiny, blackswan_dir, tmp_path):
    options = RunOptions(expressions=["the black swan", "The water"], model="tiny")
    summary = run_to_folder(blackswan_dir, options, tmp_path, progress=False, pipeline=tiny)
    masks = json.loads((tmp_path / "masks.json").read_text())
    assert (masks["height"], masks["width"], masks["fps"]) == (480, 854, None)
    assert masks["frames"] == [f"{i:05d}" for i in range(50)]
    assert [o["expression"] for o in masks["objects"]] == ["the black swan", "The water"]
    assert all(len(o["masks"]) == 50 for o in masks["objects"])
    # Each expression gets its own [SEG] and so its own masks.
    first = [decode_rle(o["masks"][10]) for o in masks["objects"]]
    assert not np.array_equal(first[0], first[1])
    assert summary["frames"] == 50 and summary["pruning"]["kept_per_frame"] == 49


def test_method_none_equals_unpruned_and_full_budget(tiny, blackswan_dir):
    """Budget >= 576 with method none gives the unpruned path's masks; LiteLVLM at 576 keeps everything too."""
    base = dict(expressions=["the black swan"], model="tiny", max_frames=12)
    none = tiny.run(blackswan_dir, RunOptions(method="none", budget=576, **base), progress=False)
    full = tiny.run(blackswan_dir, RunOptions(method="litelvlm", budget=576, **base), progress=False)
    assert none.visual_tokens == full.visual_tokens == 16 * 144 + 16 * 64
    assert none.masks == full.masks

    # The unpruned path: clip_tokens without any selection.
    import torch

    from pruning.clip_features import ClipFeatureExtractor
    from video_pipeline.decode import open_video
    from video_pipeline.preprocess import clip_preprocess

    with open_video(blackswan_dir) as src:
        frames = src.read(list(range(12)) + [11] * 4)
    hidden = ClipFeatureExtractor(tiny.model.clip).encode_frames(clip_preprocess(frames), with_scores=False).hidden
    kept = torch.arange(144).expand(16, -1)
    assert torch.equal(tiny.model.clip_tokens(hidden, None, "pooled"), tiny.model.clip_tokens(hidden, kept, "pooled"))


def test_budgets_and_placements_change_the_llm_input(tiny, blackswan_dir):
    base = dict(expressions=["the black swan"], model="tiny", max_frames=6)
    pooled81 = tiny.run(blackswan_dir, RunOptions(budget=81, **base), progress=False)
    patch81 = tiny.run(blackswan_dir, RunOptions(budget=81, placement="patch", **base), progress=False)
    official = tiny.run(blackswan_dir, RunOptions(budget=81, variant="official", **base), progress=False)
    assert pooled81.pruning["kept_per_frame"] == 20 and pooled81.visual_tokens == 16 * 20 + 16 * 64
    assert patch81.pruning["kept_per_frame"] == 81 and patch81.visual_tokens == 16 * 81 + 16 * 64
    assert official.pruning["variant"] == "official"
    assert len(pooled81.masks[0]) == len(patch81.masks[0]) == 6


def test_stride_max_frames_and_pyav_decoder(tiny, bedroom_mp4):
    base = dict(expressions=["the bed"], model="tiny", stride=10, max_frames=7)
    decord_run = tiny.run(bedroom_mp4, RunOptions(decoder="decord", **base), progress=False)
    pyav_run = tiny.run(bedroom_mp4, RunOptions(decoder="pyav", **base), progress=False)
    assert decord_run.frames == ["00000", "00010", "00020", "00030", "00040", "00050", "00060"]
    assert pyav_run.frames == decord_run.frames
    agree = np.mean([np.mean(a == b) for a, b in zip(masks_of(decord_run)[0], masks_of(pyav_run)[0])])
    assert agree > 0.99  # identical pixels from both decoders (H.264, one keyframe)


def test_generate_mode_reports_the_answer(tiny, blackswan_dir):
    result = tiny.run(
        blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", max_frames=4, answer="generate"),
        progress=False,
    )
    assert isinstance(result.answers[0], str)
    assert len(result.masks[0]) == 4
    if "[SEG]" not in result.answers[0]:  # random weights rarely say [SEG]: no prompt -> empty masks
        assert all(not m.any() for m in masks_of(result)[0])


def test_clip_text_expression_changes_selection(tiny, blackswan_dir):
    base = dict(expressions=["the black swan"], model="tiny", max_frames=2)
    question = tiny.run(blackswan_dir, RunOptions(clip_text="question", **base), progress=False)
    bare = tiny.run(blackswan_dir, RunOptions(clip_text="expression", **base), progress=False)
    assert not np.array_equal(question.tokens_selection[0], bare.tokens_selection[0])


# ----------------------------------------------------------------------------- bad input: exit code 2


def run_cli(*args: str) -> int:
    return main(list(args))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: write(d / "empty.mp4", b""), "empty"),
        (lambda d: write(d / "noise.mp4", os.urandom(4096)), "noise.mp4"),
        (lambda d: write(d / "notes.txt", b"hello"), "notes.txt"),
        (lambda d: folder(d / "frames"), "frames"),
    ],
    ids=["missing", "empty", "corrupt", "unsupported", "no-frames"],
)
def test_bad_input_exits_2_naming_the_file(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert run_cli("run", str(path), "-e", "the bed", "--model", "tiny", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "refstream: error:" in err and message in err and "Fix" in err
    assert not (tmp_path / "out" / "masks.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-e", "   "], "expression is empty"),
        ([], "no referring expression"),
        (["-e", "x", "--budget", "0"], "--budget"),
        (["-e", "x", "--frames", "6"], "multiple of 4"),
        (["-e", "x", "--method", "magic"], "unknown pruning method"),
        (["-e", "x", "--model", "huge"], "neither a preset"),
        (["-e", "x", "--placement", "patch"], "--budget"),  # 16 x 196 patches + 1024 > 4096 positions
    ],
)
def test_bad_options_exit_2(bedroom_mp4, tmp_path, capsys, args, message):
    model = [] if "--model" in args else ["--model", "tiny"]
    code = run_cli("run", str(bedroom_mp4), *model, *args, "--max-frames", "2", "--out", str(tmp_path))
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_weights_exit_2_say_where_and_mention_tiny(bedroom_mp4, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REFSTREAM_CHECKPOINT", str(tmp_path / "VideoGLaMM"))
    assert run_cli("run", str(bedroom_mp4), "-e", "the bed", "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "VideoGLaMM") in err
    assert "mbzuai-oryx/VideoGLaMM" in err and "--model tiny" in err and "--checkpoint" in err


def test_dtype_choice(tmp_path, bedroom_mp4, capsys):
    import torch

    from refstream.pipeline import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype("auto", cuda) is torch.bfloat16
    assert resolve_dtype("float16", cuda) is torch.float16
    assert run_cli("run", str(bedroom_mp4), "-e", "x", "--model", "tiny", "--device", "cpu", "--dtype", "bfloat16",
                   "--out", str(tmp_path)) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
