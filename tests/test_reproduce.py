"""``refstream reproduce``: the paper's video tables as data, run end to end with the tiny model on the bundled
mini datasets (values meaningless; the table's shape, files and protocol checked), and the exits before any
work when weights or data are missing."""

from __future__ import annotations

import csv
import io
import json
from types import SimpleNamespace

from refstream.bench.reproduce import _markdown, _rows, load_paper_tables
from refstream.cli import main


def test_paper_tables_are_the_papers_numbers():
    tables = load_paper_tables()
    assert set(tables) == {"table2", "table3", "table7"}
    assert [t.dataset for t in tables.values()] == ["ref-davis17", "refytvos", "mevis"]
    for table in tables.values():
        assert [(r.method, r.budget) for r in table.rows] == [
            ("none", 576), ("vispruner", 196), ("litelvlm", 196), ("vispruner", 81), ("litelvlm", 81)]
        assert table.rows[0].rel == 100.0
        for row in table.rows:  # J&F = (J + F) / 2 and Rel. = J&F / the upper bound's, as printed (rounded)
            assert abs(row.JF - (row.J + row.F) / 2) <= 0.06
            assert abs(row.rel - 100 * row.JF / table.rows[0].JF) <= 0.15  # from unrounded J&F
    davis = tables["table2"].rows
    assert (davis[2].model, davis[2].JF, davis[2].rel) == ("LiteLVLM", 69.2, 99.5)  # "keeps 99.5% at 196"
    assert tables["table7"].rows[0].JF == 45.15


def test_reproduce_table2_end_to_end_with_tiny(examples_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["reproduce", "table2", "--root", str(examples_dir / "ref-davis17-mini"), "--out", str(out),
                 "--model", "tiny", "--device", "cpu", "--workers", "0", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Table 2. Performance comparison on Ref-DAVIS-17." in printed
    rows = list(csv.DictReader(io.StringIO((out / "reproduce_table2.csv").read_text())))
    assert [(r["model"], r["budget"]) for r in rows] == [
        ("VideoGLaMM", "576"), ("VisPruner", "196"), ("LiteLVLM", "196"), ("VisPruner", "81"), ("LiteLVLM", "81")]
    assert [r["paper_JF"] for r in rows] == ["69.5", "64.3", "69.2", "60.3", "66.1"]
    assert [float(r["visual_tokens"]) for r in rows] == [16 * 144 + 16 * 64, 16 * 49 + 16 * 64, 16 * 49 + 16 * 64,
                                                         16 * 20 + 16 * 64, 16 * 20 + 16 * 64]
    assert all(r["JF"] != "" and r["units"] == "4/4" for r in rows)  # scored here (DAVIS masks are public)
    md = (out / "reproduce_table2.md").read_text()
    assert md.count("\n| ") == 6 and "| J&F - paper |" in md
    for combo in ("none_576", "litelvlm_196", "litelvlm_81", "vispruner_196", "vispruner_81"):
        result = json.loads((out / "results" / f"{combo}.json").read_text())
        assert result["protocol"] == {"name": "videoglamm-ref-davis17", "clip_length": 64, "merge": "first-wins",
                                      "answer": "generate", "seed": 0, "off_protocol": False}


def test_no_public_masks_reads_score_on_the_server():
    table = load_paper_tables()["table3"]
    results = {"none_576": {"submission": "RUN/submissions/none_576.zip", "visual_tokens": 3328.0,
                            "frames_per_second": 2.0, "units": 3, "units_ok": 3, "J": None, "F": None, "J&F": None}}
    rows = _rows(table, results, scored=False)
    assert rows[0]["JF"] is None and rows[0]["paper_JF"] == 66.8 and rows[1]["units"] == "0/0"
    md = _markdown(table, rows, SimpleNamespace(name="refytvos", split="valid", has_gt=False))
    assert md.count("score on the server") == 5 and "submit RUN/submissions/none_576.zip" in md


def test_missing_weights_or_data_exit_2_naming_the_fix(tmp_path, capsys):
    assert main(["reproduce", "table2", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                 "--model", "tiny"]) == 2
    assert "not a Ref-DAVIS-17 folder. Expected" in capsys.readouterr().err
    assert main(["reproduce", "table7", "--root", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--checkpoint", str(tmp_path / "no-checkpoint")]) == 2
    err = capsys.readouterr().err
    assert "VideoGLaMM weights not found" in err and "no-checkpoint" in err and "--checkpoint DIR" in err
    assert not (tmp_path / "r").exists()  # nothing ran


def test_estimate_counts_the_data_and_runs_nothing(examples_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["reproduce", "table2", "--root", str(examples_dir / "ref-davis17-mini"), "--out", str(out),
                 "--estimate", "100"]) == 0  # the full model's FLOPs, no weights needed
    printed = capsys.readouterr().out
    assert "1 videos, 50 frames, 4 expressions" in printed and "PFLOPs" in printed and "at 100 TFLOP/s" in printed
    assert not out.exists()
    from refstream.bench.datasets import load_dataset
    from refstream.bench.reproduce import estimate

    table = load_paper_tables()["table2"]
    est = estimate(table, load_dataset("ref-davis17", examples_dir / "ref-davis17-mini"), tflops=50)
    assert est["total_flops"] == est["shared_flops"] + sum(r["flops"] for r in est["rows"])
    assert est["rows"][0]["flops"] > est["rows"][2]["flops"] > est["rows"][4]["flops"]  # fewer tokens, less LLM
    assert abs(est["seconds"] - est["total_flops"] / 50e12) < 1e-9
