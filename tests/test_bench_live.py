"""``refstream bench live`` at tiny size, short windows: plumbing and real numbers, not a timing test.

The browser row uses Debian's chromium driven by Playwright (never ``playwright install``), like
tests/test_live_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from refstream.bench.live import CHROMIUM, percentile
from refstream.cli import build_parser, main


def test_bench_live_short_run_writes_a_table_with_real_numbers(bedroom_mp4, tmp_path, capsys):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")
    out, report_file = tmp_path / "docs" / "bench_live.txt", tmp_path / "bench_live.json"
    assert main(["bench", "live", "--sizes", "426x240", "--seconds", "2", "--warmup", "0.5", "--repeats", "1",
                 "--video", str(bedroom_mp4), "--out", str(out), "--json", str(report_file)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text  # the file is the printed text
    for part in ("hardware:", "GPU none", "versions: python", "torch", "transformers", "fastapi", "uvicorn",
                 "Chromium", "web path overhead", "targets (issue 11", "TFLOPs per tracked frame"):
        assert part in text, part
    rows = {(m[1], m[2]): m[3].split() for m in re.finditer(r"^(\d+x\d+)\s+(in-process|browser)\s+(.*)$", text, re.M)}
    assert set(rows) == {("426x240", "in-process"), ("426x240", "browser")}
    assert float(rows["426x240", "browser"][0]) > 0 and float(rows["426x240", "browser"][1]) > 0  # fps
    assert rows["426x240", "in-process"][1] == "-"  # no display without the page

    report = json.loads(report_file.read_text())
    inproc, browser = report["rows"]
    assert (inproc["path"], browser["path"]) == ("in-process", "browser")
    for row in (inproc, browser):
        assert row["processed_fps"] > 0 and row["frames"] > 0 and 0 <= row["drop_pct"] < 100
        assert 0 < row["frame_ms_p50"] <= row["frame_ms_p95"] and row["frame_ms_mean"] > 0
        assert 0 < row["result_ms_p50"] <= row["result_ms_p95"]
    assert browser["display_fps"] > 0 and 0 < browser["display_ms_p50"] <= browser["display_ms_p95"]
    assert browser["display_ms_p50"] >= browser["result_ms_p50"] * 0.5  # painted after the result, same clock
    assert browser["display_source"] == "window samples" and browser["display_samples"] == browser["painted"]
    assert all(report["overhead"]["426x240"][k] > 0 for k in ("mean", "p50", "wall"))
    assert {t["name"].split(",")[0] for t in report["targets"]} >= {">= 15 processed fps at 240p (browser)"}
    assert len(report["targets"]) == 3 and all(isinstance(t["met"], bool) for t in report["targets"])
    flops = report["flops"]
    assert flops["per_frame"] == flops["image_encoder"] + flops["memory_attention"] > 1e12  # full SAM2: ~2.4 T
    assert flops["per_grounding"] > flops["per_frame"]


def test_bench_live_flags():
    args = build_parser().parse_args(["bench", "live"])
    assert (args.bench, args.sizes, args.seconds, args.warmup, args.repeats, args.fps) == (
        "live", ["426x240", "854x480"], 10.0, 2.0, 3, 30.0)
    assert (args.model, args.expression, args.no_browser, args.out, args.chromium) == (
        "tiny", "the bed", False, None, CHROMIUM)
    args = build_parser().parse_args(["bench", "live", "--sizes", "160x90", "640x360", "--seconds", "4.5",
                                      "--repeats", "1", "--no-browser", "--out", "x.txt", "-e", "the girl"])
    assert (args.sizes, args.seconds, args.repeats, args.no_browser, args.out, args.expression) == (
        ["160x90", "640x360"], 4.5, 1, True, "x.txt", "the girl")


def test_bench_live_refuses_bad_settings_before_loading_anything(tmp_path, capsys):
    assert main(["bench", "live", "--sizes", "426"]) == 2
    assert "426x240" in capsys.readouterr().err  # the message shows the form
    assert main(["bench", "live", "--repeats", "0"]) == 2
    assert main(["bench", "live", "--video", str(tmp_path / "missing.mp4")]) == 2
    assert "missing.mp4" in capsys.readouterr().err
    assert main(["bench", "live", "--chromium", str(tmp_path / "no-chromium"), "--sizes", "426x240",
                 "--seconds", "0.1", "--warmup", "0", "--repeats", "1"]) == 2
    assert "--no-browser" in capsys.readouterr().err


def test_percentile_is_the_pages_rule():
    assert percentile([], 0.5) == 0.0
    assert percentile([3, 1, 2], 0.5) == 2 and percentile(list(range(100)), 0.95) == 95
