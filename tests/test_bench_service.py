"""``refstream bench service`` at tiny size: plumbing only (redis-server, serve with one Ray worker, in-process)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from refstream.bench.service import add_bench_service_parser, main_bench_service


@pytest.mark.parametrize("pipeline", ["pools", "whole"])
def test_bench_service_plumbing(pipeline, blackswan_dir, tmp_path, capsys):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    parser = argparse.ArgumentParser()
    add_bench_service_parser(parser.add_subparsers(dest="bench"))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["service", "--jobs", "2", "--max-frames", "2", "--rounds", "1",
                              "--video", str(blackswan_dir), "--json", str(out), "--pipeline", pipeline])
    assert main_bench_service(args) == 0
    table = capsys.readouterr().out
    for row in ("throughput, jobs/s", "throughput, frames/s", "first-mask latency", "peak RSS", "target:",
                "versions: python", "hardware:"):
        assert row in table
    report = json.loads(out.read_text())
    assert report["jobs"] == 2 and report["frames_per_job"] == 2
    for side in ("in_process", "service"):
        assert report[side]["frames"] == 4 and report[side]["jobs_per_s"] > 0 and report[side]["first_mask_s"] > 0
        assert report[side]["peak_rss_total"] > 0
    assert report["service"]["peak_rss"]["workers"] > 0 and report["service"]["peak_rss"]["redis-server"] > 0
    assert report["ratio"] > 0 and isinstance(report["meets_target"], bool) and report["pipeline"] == pipeline
    assert f"service (1 worker, {pipeline})" in table
    if pipeline == "pools":  # decode, encoder and VideoGLaMM actors are all counted as workers
        assert len(report["service"]["worker_threads"]) == 3
