"""`refstream analyze reversal`, `refstream explain`, and the Ref-DAVIS reader they use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.ref_davis import RefDavis, read_text_annotations
from refstream.analyze import mask_to_patch_coverage, similarity_ranks
from refstream.cli import main
from refstream.errors import ConfigError, DatasetLayoutError
from refstream.options import parse_method_spec


def test_similarity_ranks_zero_is_most_similar_ties_to_lower_index():
    tokens = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert similarity_ranks(torch.tensor([1.0, 0.0]), tokens).tolist() == [3, 0, 2, 1]


def test_patch_coverage_follows_clip_geometry():
    # 480x854 frame -> 336x597 after resizing, centre crop columns 130..465 (offset (597-336)//2 = 130).
    mask = np.zeros((480, 854), dtype=bool)
    mask[:, : 854 // 2] = True  # left half of the frame
    cover = mask_to_patch_coverage(mask).view(24, 24)
    assert cover.shape == (24, 24)
    # In the crop the left half ends at x = 298.5 - 130 = 168.5 -> patches 0..11 covered, 12 partly, rest 0.
    assert torch.all(cover[:, :12] > 0.99) and torch.all(cover[:, 13:] < 0.01)
    assert 0 < float(cover[0, 12]) < 1
    assert mask_to_patch_coverage(np.zeros((100, 100), bool)).sum() == 0


def test_read_text_annotations_latin1_and_quotes(tmp_path):
    path = tmp_path / "Davis17_annot2.txt"
    path.write_bytes('dogs 2 "a brown dog on the l\xe9ft"\n\ncows 1 "the cow"\n'.encode("latin-1"))
    exprs = read_text_annotations(path)
    assert [(e.video, e.obj_id, e.text) for e in exprs] == [("dogs", 2, "a brown dog on the léft"), ("cows", 1, "the cow")]
    path.write_text("garbage line\n")
    with pytest.raises(DatasetLayoutError, match="expected <video> <obj_id>"):
        read_text_annotations(path)


def test_ref_davis_reader(examples_dir, tmp_path):
    d = RefDavis(examples_dir / "ref-davis17-mini")
    assert d.videos() == ["blackswan"] and len(d.frames("blackswan")) == 50
    assert set(np.unique(d.mask("blackswan", "00000"))) == {0, 1}
    assert d.expressions("Davis17_annot2")[0].text == "black swan with a red beak"
    with pytest.raises(DatasetLayoutError, match="JPEGImages"):
        RefDavis(tmp_path)


def test_analyze_reversal_cli(examples_dir, tmp_path, capsys):
    code = main(["analyze", "reversal", "--davis-root", str(examples_dir / "ref-davis17-mini"), "--out", str(tmp_path),
                 "--model", "tiny", "--frames-per-video", "5", "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "reversal.json").read_text())
    assert summary["frames"] == 5 and summary["tokens_per_frame"] == 576 and summary["random_weights"] is True
    assert summary["ref_tokens"] > 100  # the swan covers a good part of the frame
    assert sum(summary["eos"]["histogram"]["counts"]) == summary["ref_tokens"]
    assert 0 <= summary["eos"]["mean_rank"] < 576 and "plumbing" in summary["note"]
    assert (tmp_path / "reversal.png").stat().st_size > 10_000
    assert "[REF] tokens" in capsys.readouterr().out


def test_analyze_reversal_wrong_layout_exits_2(tmp_path, capsys):
    assert main(["analyze", "reversal", "--davis-root", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "tiny"]) == 2
    assert "Expected layout" in capsys.readouterr().err


def test_parse_method_spec():
    assert parse_method_spec("litelvlm") == ("litelvlm", {})
    assert parse_method_spec("litelvlm:official") == ("litelvlm", {"variant": "official"})
    assert parse_method_spec("random:seed=3") == ("random", {"seed": 3})
    assert parse_method_spec("visionzip:dominant_ratio=0.8") == ("visionzip", {"dominant_ratio": 0.8})
    with pytest.raises(ConfigError):
        parse_method_spec(":x")


def test_explain_cli_grid(blackswan_dir, tmp_path, capsys):
    out = tmp_path / "not-yet" / "grid.png"  # the folder is created, as README's `--out out/explain.png` needs
    code = main(["explain", str(blackswan_dir), "-e", "the black swan", "--method", "litelvlm", "--method",
                 "litelvlm:official", "--method", "none", "--budget", "81", "--model", "tiny", "--rows", "3",
                 "--out", str(out)])
    assert code == 0
    from PIL import Image

    image = Image.open(out)
    assert image.size == (70 + 3 * (336 + 4), 34 + 3 * (336 + 4))
    text = capsys.readouterr().out
    assert "litelvlm 20" in text and "none 144" in text and "[0, 26, 49]" in text  # encoder frames floor(linspace(0, 49, 16))[0, 8, 15]


def test_explain_unknown_method_exits_2(blackswan_dir, tmp_path, capsys):
    assert main(["explain", str(blackswan_dir), "-e", "x", "--method", "magic", "--model", "tiny",
                 "--out", str(tmp_path / "g.png")]) == 2
    assert "unknown pruning method" in capsys.readouterr().err


def test_bench_pruning_tiny_report(tmp_path, capsys, bedroom_mp4):
    """The benchmark's plumbing at tiny size (the real run uses full-size CLIP: `refstream bench pruning`)."""
    out = tmp_path / "bench.json"
    code = main(["bench", "pruning", "--size", "tiny", "--frames", "4", "--budget", "81", "--method", "litelvlm",
                 "--method", "visionzip", "--method", "fastv", "--repeats", "2", "--forward-repeats", "1",
                 "--video", str(bedroom_mp4), "--json", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["rows"]} == {"litelvlm", "visionzip", "fastv"}
    lite = [r for r in report["rows"] if r["method"] == "litelvlm"]
    assert {(r["placement"], r["kept"]) for r in lite} == {("pooled", 20), ("patch", 81)}
    assert all(r["select_ms"] > 0 for r in lite)
    assert [r for r in report["rows"] if r["method"] == "fastv"][0]["select_ms"] is None
    assert report["environment"]["torch"] and report["clip_forward_s"]["plain"] > 0
    text = capsys.readouterr().out
    assert "LiteLVLM selection" in text and "hardware:" in text
