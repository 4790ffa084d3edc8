"""`refstream bench stages`: per-stage seconds, FLOPs and memory of the model with random weights.

The default tests run the command on the tiny config (a few frames of the bundled video) and build single
stages of the full-size architecture; the slow ones time full-size stages.
"""

from __future__ import annotations

import json

import pytest
import torch

from refstream.bench.stages import (
    STAGES,
    PeakRSS,
    _free,
    available_mb,
    check_memory,
    materialize,
    parse_stages,
    plan_rows,
    rss_mb,
)
from refstream.cli import main
from refstream.config import load_model_config
from refstream.errors import ConfigError
from workers.stats import build_skeleton

TINY = ["bench", "stages", "--config", "configs/tiny.yaml", "--frames", "4", "--max-frames", "4", "--sam2-frames", "2"]


def _flops(capsys, method: str, budget: int) -> dict:
    assert main(["flops", "--model", "configs/tiny.yaml", "--frames", "4", "--method", method, "--budget", str(budget),
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full tiny run (every stage, the three default rows): (exit code, stdout, report)."""
    out = tmp_path_factory.mktemp("stages")
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(str(x) for x in a)))
    try:
        code = main(TINY + ["--json", str(out / "r.json"), "--out", str(out / "t.txt")])
    finally:
        capture.undo()
    return code, "\n".join(lines), json.loads((out / "r.json").read_text()), (out / "t.txt").read_text()


def test_tiny_run_reports_every_stage_per_row(tiny_run):
    code, stdout, report, table = tiny_run
    assert code == 0
    assert [(r["method"], r["budget"], r["placement"]) for r in report["rows"]] == [
        ("none", 576, "pooled"), ("litelvlm", 196, "pooled"), ("litelvlm", 81, "pooled")]
    columns = ["decode", "clip", "prune", "internvideo2", "projectors", "llm", "sam2_image_encoder",
               "sam2_memory_decoder", "write"]
    for row in report["rows"]:
        assert list(row["stages"]) == columns
        for name, stage in row["stages"].items():
            assert stage["seconds"] > 0, name
            assert stage["peak_rss_mb"] > 0, name
            assert stage["shared"] == (name not in ("prune", "projectors", "llm")), name
            if name in ("decode", "prune", "write"):
                assert stage["tflops"] is None and stage["gflops_per_s"] is None
            else:
                assert stage["tflops"] > 0
                assert stage["gflops_per_s"] == pytest.approx(stage["tflops"] * 1e3 / stage["seconds"])
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["cpu"] and env["threads"] >= 1
    assert report["settings"]["random_weights"].startswith("random weights")
    assert report["sam2"]["timed_frames"] == 2 and report["sam2"]["video_frames"] == 4
    assert report["sam2"]["extrapolated"] and len(report["sam2"]["per_frame_s"]) == 2
    assert "extrapolated from 2 frames" in table and "Table 6" in table and "hardware:" in table
    assert table.strip() in stdout
    assert not report["synthetic_inputs"]  # every stage ran: each got its input from the stage before


def test_tokens_into_llm_equal_refstream_flops(tiny_run, capsys):
    _, _, report, _ = tiny_run
    for row in report["rows"]:
        flops = _flops(capsys, row["method"], row["budget"])
        assert row["tokens_into_llm"] == flops["sequence_length"]
        assert row["visual_tokens"] == flops["visual_tokens"]
        assert row["flops_tf"]["llm_prefill"] == pytest.approx(flops["flops"]["llm_prefill"] / 1e12)
        assert row["stages"]["llm"]["tflops"] == pytest.approx(flops["flops"]["llm_prefill"] / 1e12)
        # SAM2 FLOPs are per frame in `refstream flops`: times the video's 4 frames here
        assert row["stages"]["sam2_image_encoder"]["tflops"] == pytest.approx(
            4 * flops["flops"]["sam2_image_encoder"] / 1e12)
    assert report["rows"][0]["tokens_into_llm"] > report["rows"][1]["tokens_into_llm"] > report["rows"][2]["tokens_into_llm"]


def test_ratios_are_against_the_unpruned_row(tiny_run):
    _, _, report, _ = tiny_run
    rows, summary = report["rows"], report["summary"]
    assert summary["complete"]
    ref = rows[0]
    ref_job = sum(s["seconds"] for s in ref["stages"].values())
    for row, entry in zip(rows, summary["rows"]):
        assert entry["prefill_s"] == row["stages"]["llm"]["seconds"]
        assert entry["prefill_ratio"] == pytest.approx(row["stages"]["llm"]["seconds"] / ref["stages"]["llm"]["seconds"])
        assert entry["prefill_flops_ratio"] == pytest.approx(row["flops_tf"]["llm_prefill"] / ref["flops_tf"]["llm_prefill"])
        assert entry["job_ratio"] == pytest.approx(sum(s["seconds"] for s in row["stages"].values()) / ref_job)
    assert summary["rows"][0]["prefill_ratio"] == 1.0 and summary["rows"][0]["job_ratio"] == 1.0
    assert summary["rows"][2]["prefill_flops_ratio"] < summary["rows"][1]["prefill_flops_ratio"] < 1.0


def test_skipped_stages_are_not_run_and_get_random_inputs(tmp_path, capsys):
    assert main(TINY + ["--stages", "llm,sam2", "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    for row in report["rows"]:
        assert list(row["stages"]) == ["llm", "sam2_image_encoder", "sam2_memory_decoder"]
    assert report["settings"]["stages"] == ["llm", "sam2"]
    # the LLM's [SEG] fed SAM2; the LLM's visual embeddings are random (projectors skipped)
    assert report["synthetic_inputs"] == ["LLM visual embeddings (projectors skipped)"]
    assert not report["summary"]["complete"]
    assert "whole job = the stages run only" in out
    # the prefill still sees the sequence length of `refstream flops`
    assert [r["tokens_into_llm"] for r in report["rows"]] == [
        _flops(capsys, r["method"], r["budget"])["sequence_length"] for r in report["rows"]]

    assert main(TINY + ["--stages", "projectors", "--quiet", "--json", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert [list(r["stages"]) for r in report["rows"]] == [["projectors"]] * 3
    assert report["synthetic_inputs"] == ["CLIP features (clip skipped)", "InternVideo2 features (internvideo2 skipped)"]
    assert "prefill_ratio" not in report["summary"]["rows"][0]


def test_merge_of_separate_stage_runs(tiny_run, tmp_path, capsys):
    """`--stages llm` and the rest in two processes, merged: one table whose ratios cover every stage."""
    for name, stages in (("llm", "llm"), ("rest", "decode,clip,prune,internvideo2,projectors,sam2,write")):
        assert main(TINY + ["--stages", stages, "--quiet", "--json", str(tmp_path / f"{name}.json")]) == 0
    capsys.readouterr()
    assert main(["bench", "stages", "--merge", str(tmp_path / "llm.json"), str(tmp_path / "rest.json"),
                 "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["settings"]["stages"] == list(STAGES) and merged["summary"]["complete"]
    assert merged["settings"]["merged_runs"] == [["llm"], ["decode", "clip", "prune", "internvideo2", "projectors",
                                                           "sam2", "write"]]
    assert [list(r["stages"]) for r in merged["rows"]] == [list(r["stages"]) for r in tiny_run[2]["rows"]]
    llm = json.loads((tmp_path / "llm.json").read_text())
    assert [r["stages"]["llm"] for r in merged["rows"]] == [r["stages"]["llm"] for r in llm["rows"]]
    ref = sum(s["seconds"] for s in merged["rows"][0]["stages"].values())
    assert merged["summary"]["rows"][2]["job_ratio"] == pytest.approx(
        sum(s["seconds"] for s in merged["rows"][2]["stages"].values()) / ref)
    assert "run of --stages llm" in out and "whole job = the stages run only" not in out
    # a stage measured twice, or runs of other options, are refused
    assert main(["bench", "stages", "--merge", str(tmp_path / "llm.json"), str(tmp_path / "llm.json")]) == 2
    assert "--stages" in capsys.readouterr().err
    other = json.loads((tmp_path / "rest.json").read_text())
    other["settings"]["frames"] = 8
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["bench", "stages", "--merge", str(tmp_path / "llm.json"), str(tmp_path / "other.json")]) == 2
    assert "frames" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--stages", "llm,bogus"], ["--stages", "bogus", "llm,sam2"]),
    (["--frames", "6"], ["--frames", "multiple of 4"]),
    (["--method", "fastv"], ["--method fastv", "refstream flops"]),
    (["--budget", "0"], ["--budget"]),
    (["--sam2-frames", "0"], ["--sam2-frames"]),
])
def test_bad_options_exit_2_naming_the_flag(argv, words, capsys):
    assert main(TINY + argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_rows_and_stage_names():
    assert plan_rows(["none", "litelvlm"], [576, 196, 81], ["pooled"]) == [
        ("none", 576, "pooled"), ("litelvlm", 196, "pooled"), ("litelvlm", 81, "pooled")]
    # the unpruned reference comes first even when not asked for; 576 adds no pruned row
    assert plan_rows(["litelvlm"], [81, 576], ["pooled", "patch"]) == [
        ("none", 576, "pooled"), ("litelvlm", 81, "pooled"), ("litelvlm", 81, "patch")]
    assert parse_stages("all") == STAGES and parse_stages("sam2, llm") == ("llm", "sam2")


def test_full_size_stage_is_built_alone():
    """One stage of the full-size model is materialised; every other module stays on the meta device."""
    config = load_model_config("videoglamm")
    parts = build_skeleton(config)
    before = rss_mb()
    sam2 = materialize(parts["sam2"], torch.device("cpu"), torch.float32, seed=0)
    grown = rss_mb() - before
    assert not any(t.is_meta for t in list(sam2.parameters()) + list(sam2.buffers()))
    # SAM2's random Fourier features are built from the prompt-encoder sub-config: rebuilt, not left empty
    pe = sam2.shared_image_embedding.positional_embedding
    assert torch.isfinite(pe).all() and pe.std() > 0.1
    norms = [m.weight for m in sam2.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(bool((w == 1).all()) for w in norms)
    weights = sam2.memory_attention.layers[0].self_attn.q_proj.weight
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    for name in ("clip", "internvideo2", "llm", "image_mm_projector", "mm_projector", "text_hidden_fcs"):
        assert all(p.is_meta for p in parts[name].parameters()), name
    size_mb = sum(p.numel() for p in sam2.parameters()) * 4 / 2**20  # 224.4 M parameters: 856 MiB
    assert 0.8 * size_mb < grown < 1.5 * size_mb  # this stage only; Phi-3 alone would be 14,600 MiB


def test_memory_check_names_the_fix():
    with pytest.raises(ConfigError, match=r"--stages llm.*--dtype bfloat16"):
        check_memory("llm", 10**15, torch.device("cpu"))
    check_memory("llm", 1, torch.device("cpu"))
    assert available_mb() > 0


def test_peak_rss_sees_a_short_allocation():
    with PeakRSS() as peak:
        start = peak.peak_mb
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        del block
    assert peak.peak_mb - start > 200


@pytest.mark.slow
def test_a_freed_stage_leaves_the_rss():
    """Full-size CLIP materialised, run on one frame, freed: the RSS returns to about where it was (the pages the
    forward's threads freed are trimmed, not kept by the allocator: about 0.5 GiB without the trim)."""
    from pruning.clip_features import ClipFeatureExtractor

    parts = build_skeleton(load_model_config("videoglamm"))
    before = rss_mb()
    clip = materialize(parts["clip"], torch.device("cpu"), torch.float32, seed=0)
    with torch.inference_mode():
        ClipFeatureExtractor(clip, None).encode_frames(torch.randn(2, 3, 336, 336), with_scores=True)
    assert rss_mb() - before > 1500  # 428 M parameters in fp32 + activations
    parts["clip"] = None
    del clip
    _free()
    assert rss_mb() - before < 200


@pytest.mark.slow
def test_full_size_sam2_stage(tmp_path):
    """Full-size SAM2 (Hiera-L, 1024 px) on 2 of 3 frames of the bundled video, extrapolated (about 2-3 min)."""
    assert main(["bench", "stages", "--stages", "sam2", "--sam2-frames", "2", "--max-frames", "3", "--quiet",
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    stage = report["rows"][0]["stages"]["sam2_image_encoder"]
    assert stage["tflops"] == pytest.approx(3 * 1.825, abs=0.01)
    assert report["sam2"]["extrapolated"] and stage["seconds"] > 0


@pytest.mark.slow
def test_full_size_llm_prefill(tmp_path):
    """Full-size Phi-3 (fp32: 13.9 GiB of weights) prefill at 4 encoder frames, unpruned and 81 pooled."""
    if (available_mb() or 0) < 17 * 1024:
        pytest.skip("needs about 17 GiB of free memory for Phi-3 in float32")
    assert main(["bench", "stages", "--stages", "llm", "--frames", "4", "--budget", "81", "--quiet",
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["summary"]["rows"]
    assert [r["tokens_into_llm"] for r in rows] == [882, 386]
    assert rows[1]["prefill_ratio"] < 1.0
