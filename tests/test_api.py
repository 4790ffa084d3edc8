"""The Python API (refstream.load / Segmenter.segment / Segmenter.stream) on the tiny model and real frames."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refstream
from refstream.errors import ConfigError, ExpressionError, InputError, WeightsNotFoundError
from refstream.outputs import decode_rle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def segmenter():
    return refstream.load("tiny", device="cpu")


def readme_api_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_as_written():
    snippet = readme_api_snippet()
    assert len(snippet.strip().splitlines()) < 10
    out = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("(8, 540, 960) ['Sure, [SEG].'] 20 ")  # bool [T, H, W]; 81 tokens -> 20 cells
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2", "3"]
    assert all("(1, 540, 960)" in line for line in lines[1:])


def test_segment_stream_rle_and_run_agree(segmenter, blackswan_dir, tmp_path):
    expressions = ["the black swan", "the water"]
    options = dict(max_frames=5, stride=2, budget=81)
    result = segmenter.segment(blackswan_dir, expressions, **options)
    assert len(result.masks) == 2 and result.masks[0].dtype == bool
    assert result.masks[0].shape == (5, result.height, result.width) == (5, 480, 854)
    assert result.frame_indices == [0, 2, 4, 6, 8] and result.frames[:2] == ["00000", "00002"]
    assert result.expressions == expressions and len(result.answers) == 2
    assert result.pruning["budget"] == 81 and result.visual_tokens == 16 * 20 + 16 * 64
    assert set(result.timings) >= {"decode", "clip", "prune", "llm", "sam2"} and result.random_weights

    rle = segmenter.segment(blackswan_dir, expressions, masks="rle", **options)
    streamed = list(segmenter.stream(blackswan_dir, expressions, **options))
    assert [i for i, _ in streamed] == result.frame_indices
    for obj in range(2):
        assert np.array_equal(np.stack([decode_rle(r) for r in rle.masks[obj]]), result.masks[obj])
        assert np.array_equal(np.stack([m[obj] for _, m in streamed]), result.masks[obj])

    summary = segmenter.segment_to_folder(blackswan_dir, segmenter.options(expressions, **options), tmp_path / "out",
                                          progress=False)
    written = json.loads((tmp_path / "out" / "masks.json").read_text())
    assert summary["frames"] == 5 and written["objects"][1]["masks"] == rle.masks[1]


def test_stream_can_stop_early_and_the_segmenter_goes_on(segmenter, bedroom_mp4):
    stream = segmenter.stream(bedroom_mp4, "the bed", max_frames=50)
    first = next(stream)
    assert first[0] == 0 and first[1].shape == (1, 540, 960)
    stream.close()  # closes the video and the SAM2 session
    assert len(list(segmenter.stream(bedroom_mp4, "the bed", max_frames=2))) == 2


def test_bad_calls_name_the_problem(segmenter, tmp_path, blackswan_dir):
    with pytest.raises(ExpressionError, match="empty"):
        segmenter.segment(blackswan_dir, ["  "])
    with pytest.raises(ConfigError, match="budget=0: must be"):  # the API names arguments, not --flags
        segmenter.segment(blackswan_dir, "the swan", budget=0)
    with pytest.raises(ConfigError, match="unknown option 'bugdet'"):
        segmenter.segment(blackswan_dir, "the swan", bugdet=81)
    with pytest.raises(ConfigError, match="masks must be"):
        segmenter.segment(blackswan_dir, "the swan", masks="png")
    with pytest.raises(InputError, match="missing.mp4"):
        segmenter.segment(tmp_path / "missing.mp4", "the swan")


def test_load_presets_folders_and_bad_names(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        refstream.load("nano")
    with pytest.raises(ConfigError, match="dtype='float16' needs a CUDA GPU; on the CPU use dtype='float32'"):
        refstream.load("tiny", device="cpu", dtype="float16")
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path)):
        refstream.load(tmp_path, device="cpu")  # a folder = the VideoGLaMM checkpoint, here an empty one
    assert "random_weights=True" in repr(refstream.load("tiny", device="cpu"))


def test_import_refstream_stays_light():
    code = "import sys, refstream, refstream.errors; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_job_writer_without_a_folder_only_collects_rle(tmp_path):
    from refstream.outputs import JobWriter

    writer = JobWriter(None, 2)
    masks = np.zeros((2, 4, 6), dtype=bool)
    masks[1, 1:3, 2:5] = True
    writer.add(None, masks)
    assert [len(m) for m in writer.masks] == [1, 1]
    assert np.array_equal(decode_rle(writer.masks[1][0]), masks[1]) and not decode_rle(writer.masks[0][0]).any()
    with pytest.raises(ValueError, match="give it a folder"):
        writer.finish(None, device="cpu", started=0.0)
    assert list(tmp_path.iterdir()) == []
