"""``--out`` checked before the model loads, and written only when the job succeeded (issue 13)."""

from __future__ import annotations

import json
import shutil

from refstream.cli import main


def run(*argv: str) -> int:
    return main(["run", *argv, "--model", "tiny", "--device", "cpu", "--quiet"])


def test_out_that_cannot_work_is_refused_before_anything_runs(blackswan_dir, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert run(str(blackswan_dir), "-e", "a swan", "--out", str(a_file)) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert run(str(blackswan_dir), "-e", "a swan", "--out", str(a_file / "sub" / "out")) == 2
    assert "is a file, so no folder can be made under it" in capsys.readouterr().err
    frames = tmp_path / "frames"
    shutil.copytree(blackswan_dir, frames)
    before = sorted(p.name for p in frames.iterdir())
    for out in (frames, frames / "results"):
        assert run(str(frames), "-e", "a swan", "--out", str(out)) == 2
        assert "is inside the input frame folder" in capsys.readouterr().err
    assert sorted(p.name for p in frames.iterdir()) == before  # nothing written among the frames
    assert a_file.read_text() == "x"


def test_a_failed_run_leaves_no_out_folder_and_a_good_one_replaces_its_files(blackswan_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(str(blackswan_dir), "-e", "x" * 10000, "--max-frames", "4", "--out", str(out)) == 2
    assert "the referring expression is too long: 10000 tokens" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no empty or partial folder left behind
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "summary.json").write_text("old")
    assert run(str(blackswan_dir), "-e", "a swan", "--max-frames", "4", "--out", str(out)) == 0
    assert json.loads((out / "summary.json").read_text())["frames"] == 4  # replaced
    assert (out / "notes.txt").read_text() == "mine" and (out / "masks.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging folder is gone
