"""Odd inputs through a whole run (issue 13): rotated, resized and damaged videos in masks.json / summary.json /
overlay.mp4, ``--max-pixels``, checks before the model loads, and options named in the caller's language.

The runs share one tiny model (``refstream.load("tiny")``) and write through
:meth:`refstream.Segmenter.segment_to_folder`, the same :func:`refstream.pipeline.run_to_folder` as
``refstream run``; the command line itself runs where its own behaviour is under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest

import refstream
from refstream.cli import main
from refstream.errors import ConfigError, InputError
from refstream.options import JobOptions
from test_inputs_decode import flip_bytes, pattern_video, rotated, stored_frames

REPO = Path(__file__).resolve().parents[1]
#: ``refstream ARGS`` in a fresh interpreter, importing this checkout (the console script may belong to another)
REFSTREAM = [sys.executable, "-c", "import sys; from refstream.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    plain = pattern_video(folder / "plain.mp4", "64x36")
    a = pattern_video(folder / "a.ts", "64x36", 1.5, fmt="mpegts")
    b = pattern_video(folder / "b.ts", "80x48", 1.5, pattern="testsrc2", fmt="mpegts")
    (folder / "ab.ts").write_bytes(a.read_bytes() + b.read_bytes())
    clean = pattern_video(folder / "clean.mp4", "160x90", 3, pattern="testsrc2", extra=("-g", "10"))
    return {"plain": plain, "rot90": rotated(plain, folder / "rot90.mp4", 90), "sizes": folder / "ab.ts",
            "clean": clean, "damaged": flip_bytes(clean, folder / "flipped.mp4")}


@pytest.fixture(scope="module")
def segmenter():
    return refstream.load("tiny", device="cpu")


def run_folder(segmenter, video: Path, out: Path, **options) -> tuple[dict, dict]:
    segmenter.segment_to_folder(video, JobOptions(expressions=["the pattern"], **options), out, progress=False)
    return json.loads((out / "summary.json").read_text()), json.loads((out / "masks.json").read_text())


def overlay_size(out: Path) -> tuple[int, int]:
    with av.open(str(out / "overlay.mp4")) as container:
        frame = next(container.decode(video=0))
    return frame.width, frame.height


def test_a_rotated_video_runs_in_display_orientation(segmenter, videos, tmp_path):
    _, turns = stored_frames(videos["rot90"])
    summary, masks = run_folder(segmenter, videos["rot90"], tmp_path / "out", max_frames=3)
    assert (masks["width"], masks["height"]) == (36, 64)  # stored 64x36, shown turned a quarter
    assert {tuple(m["size"]) for m in masks["objects"][0]["masks"]} == {(64, 36)}
    assert overlay_size(tmp_path / "out") == (36, 64)
    assert summary["rotation"] == masks["rotation"] == turns * 90 == 90
    assert summary["frames_damaged"] == 0 and summary["resized_frames"] == 0 and summary["decoder"] == "decord"


def test_a_resolution_change_is_recorded(segmenter, videos, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="refstream.decode"):
        summary, masks = run_folder(segmenter, videos["sizes"], tmp_path / "out", stride=5)
    assert (masks["width"], masks["height"]) == (64, 36) and overlay_size(tmp_path / "out") == (64, 36)
    assert summary["frames"] == 6  # frames 0, 5, ... 25: 15, 20 and 25 are 80x48
    assert summary["resized_frames"] == masks["resized_frames"] == 3
    assert summary["frame_sizes"] == masks["frame_sizes"] == ["64x36", "80x48"]
    assert summary["decoder"] == "pyav"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # decord is not used for it; 3 frames were resized
    assert "size changes mid-stream" in lines[0] and "3 of 6 frames were stored at another size (80x48)" in lines[1]


def test_damaged_frames_are_counted_in_one_warning(segmenter, videos, tmp_path, caplog, capfd):
    """The damage sits in the middle third (frames 10-20); a clean file's 0 is checked by the rotated run and by
    tests/test_inputs_decode.py."""
    with caplog.at_level("WARNING", logger="refstream.decode"):
        summary, _ = run_folder(segmenter, videos["damaged"], tmp_path / "out", stride=5)
    err = capfd.readouterr().err
    assert "error while decoding" not in err and "[h264" not in err  # FFmpeg's raw lines (fd 2) stay silent
    lines = [r.getMessage() for r in caplog.records if "decoding errors" in r.getMessage()]
    assert len(lines) == 1 and f"{summary['frames_damaged']} of 6 frames had decoding errors" in lines[0]
    assert summary["frames_damaged"] > 0 and summary["decoder"] == "pyav"


@pytest.mark.slow
def test_refstream_run_on_a_damaged_file_prints_one_warning(videos, tmp_path):
    """The command line itself: exit 0, FFmpeg's lines absent from stderr, the one warning line present."""
    out = tmp_path / "out"
    proc = subprocess.run([*REFSTREAM, "run", str(videos["damaged"]), "-e", "the pattern",
                           "--model", "tiny", "--device", "cpu", "--quiet", "--stride", "5", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error while decoding" not in proc.stderr and "[h264" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    warning = [line for line in proc.stderr.splitlines() if "decoding errors" in line]
    assert len(warning) == 1 and f"{summary['frames_damaged']} of 6 frames" in warning[0]
    assert summary["frames_damaged"] > 0


# ------------------------------------------------------------------------------------------- --max-pixels
def test_max_pixels_is_checked_before_decoding_and_named_in_each_language(segmenter, videos, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(videos["plain"]), "-e", "x", "--model", "tiny", "--device", "cpu", "--quiet",
                 "--max-pixels", "2000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "64x36 = 2,304 pixels, above the limit of 2,000" in err and "raise the limit: --max-pixels 2304" in err
    assert not out.exists()
    with pytest.raises(InputError, match="raise the limit: max_pixels=2304"):  # the Python API names the argument
        segmenter.segment(videos["plain"], "x", max_pixels=2000)
    assert segmenter.segment(videos["plain"], "x", max_pixels=2304, max_frames=1).masks[0].shape == (1, 36, 64)
    assert "--max-pixels N" in subprocess.run([*REFSTREAM, "run", "--help"], cwd=REPO,
                                              capture_output=True, text=True).stdout


# ------------------------------------------------------------------------------ before the model loads
def test_every_check_without_a_model_runs_before_the_model_is_built(videos, tmp_path):
    """Bad options and inputs exit 2 with no out folder, and the model builder (workers.build, which
    refstream.pipeline imports) was never even imported: the structural proof that no model was built."""
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    cases = [["--stride", "0"], ["--max-frames", "0"], ["--method", "bogus"], ["--max-pixels", "100"],
             ["--budget", "0"], ["--clip-length", "0"]]
    code = textwrap.dedent(f"""
        import json, sys
        from refstream.cli import main
        runs = []
        base = ["run", {str(videos["plain"])!r}, "-e", "x", "--model", "tiny", "--device", "cpu", "--quiet"]
        for extra in {cases!r}:
            runs.append(main(base + extra + ["--out", {str(tmp_path / "out")!r}]))
        runs.append(main(["run", {str(not_a_video)!r}, "-e", "x", "--model", "tiny", "--out",
                          {str(tmp_path / "out2")!r}]))
        print(json.dumps({{"codes": runs, "built": "workers.build" in sys.modules,
                          "pipeline": "refstream.pipeline" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * (len(cases) + 1), "built": False, "pipeline": False}, proc.stderr
    for flag in ("--stride 0", "--max-frames 0", "--method 'bogus'", "above the limit of 100", "--budget 0",
                 "--clip-length 0", "not a video FFmpeg can read"):
        assert flag in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.mp4"]  # no out folder, no staging folder


# ------------------------------------------------------------------------------------ the caller's language
def test_options_are_named_as_flags_on_the_command_line_and_as_arguments_in_the_api(tmp_path, capsys):
    from refstream_errors import api_errors, option, option_style, render_options

    text = f"read it with {option('decoder', 'pyav')} or lower {option('max_pixels', 2304)}; see {option('out')}"
    assert render_options(text, "cli") == "read it with --decoder pyav or lower --max-pixels 2304; see --out"
    assert render_options(text, "api") == "read it with decoder='pyav' or lower max_pixels=2304; see out"
    assert render_options(option("expressions", ["the black swan"]), "cli") == '--expression "the black swan"'
    error = InputError(text)
    assert str(error) == render_options(text, "cli")  # nothing set: flags (refstream's own commands)
    with option_style("api"):
        assert str(error) == render_options(text, "api")
    with pytest.raises(ConfigError) as api:
        refstream.Segmenter.options("x", budget=0, decoder="pyav")
    assert str(api.value).startswith("invalid option: budget=0: must be an integer >= 1")
    with pytest.raises(ConfigError, match="out='.*' is an existing file"):
        (tmp_path / "file").write_text("x")
        refstream.Segmenter(None).segment_to_folder(tmp_path, JobOptions(expressions=["x"]), tmp_path / "file")
    assert main(["run", str(tmp_path), "-e", "x", "--budget", "0", "--out", str(tmp_path / "o")]) == 2
    assert "invalid option: --budget 0: must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(InputError, match="open it with decoder='pyav'"):  # a decord failure as the API reports it
        with api_errors():
            raise InputError(f"x: decord cannot open the video. Fix: open it with {option('decoder', 'pyav')}")
    with option_style("cli"), pytest.raises(InputError, match="open it with --decoder pyav"):
        with api_errors():  # the API called by refstream run: still flags
            raise InputError(f"x: decord cannot open the video. Fix: open it with {option('decoder', 'pyav')}")
