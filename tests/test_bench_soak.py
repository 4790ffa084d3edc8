"""``refstream bench soak``: the plumbing at 12 jobs from 2 client processes (default suite), and the soak itself
(slow: ``pytest -m slow -s tests/test_bench_soak.py``): 250 jobs (``REFSTREAM_SOAK_JOBS=500``: the full 500) from 4
client processes through ``serve --pipeline pools``, every criterion of issue 13 asserted (0 lost, 0 duplicated, RSS, Redis memory, throughput,
nothing left behind). Real redis-server, a real ``serve`` subprocess with its local Ray, real client processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest

from refstream.bench.soak import (add_bench_soak_parser, first_sample_for, format_table, main_bench_soak, run_soak,
                                  verdicts)

CRITERIA = ["0 lost", "0 duplicated", "RSS after job", "Redis memory bounded", "throughput last", "no temp files left",
            "no processes left"]


def _skip_without_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")


def test_bench_soak_plumbing(blackswan_dir, tmp_path, capsys):
    """12 jobs x 2 frames, 2 clients: the table's fields, the counts, the limits serve published, the samples."""
    _skip_without_redis()
    parser = argparse.ArgumentParser()
    add_bench_soak_parser(parser.add_subparsers(dest="bench"))
    out = tmp_path / "soak.json"
    args = parser.parse_args(["soak", "--jobs", "12", "--clients", "2", "--max-frames", "2", "--result-ttl-s", "3",
                              "--video", str(blackswan_dir), "--json", str(out), "--timeout", "600"])
    code = main_bench_soak(args)
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == (0 if report["passed"] else 1)
    assert report["counts"] == {"submitted": 12, "finished": 12, "lost": 0, "duplicated": 0, "completions": 12,
                                "failed": 0, "redelivered": 0, "distinct_expressions": 12}
    assert report["limits"] == {"max_frames_per_job": 64, "max_pixels_per_frame": 7680 * 4320, "max_expressions": 4,
                                "max_expression_chars": 200}  # what the serve subprocess published
    names = {row["name"] for row in report["rss"]}
    assert {"serve", "redis-server", "client-0", "client-1", "ray::DecodeActor", "ray::EncoderActor",
            "ray::VideoGLaMMWorker", "raylet", "gcs_server"} <= names, names
    assert all(row["before"] and row["after"] for row in report["rss"] if row["name"] != "?")
    redis = report["redis"]
    assert set(redis) == {"before", "after_2", "after_6", "after_12", "after_ttl"}
    assert redis["after_ttl"]["results"] == redis["after_ttl"]["job_records"] == 0  # expired with the TTL
    assert redis["after_12"]["stream"] <= 12 and redis["after_12"]["dead"] == 0
    assert report["throughput"]["first"] > 0 and report["throughput"]["last"] > 0
    shutdown = report["shutdown"]
    assert shutdown["serve_exit"] == 0 and shutdown["processes_left"] == [] and shutdown["processes_seen"] >= 5
    assert shutdown["temp_files_left"] == []
    for row in ("refstream bench soak: 12 jobs x 2 frames", "hardware:", "versions: python", "limits published",
                "jobs: 12 submitted, 12 finished, 0 lost, 0 duplicated", "RSS after job 2", "used_memory MiB",
                "throughput: first 2 jobs", "shutdown: serve exit 0", "soak: "):
        assert row in table, row
    for name in CRITERIA:
        assert any(line[6:].startswith(name) for line in table.splitlines() if line[:4] in ("PASS", "FAIL")), name


def test_verdicts_fail_on_each_criterion():
    """Every criterion turns FAIL on a report that breaks it (the soak's exit code follows)."""
    mib = 2**20
    good_redis = {"before": {"used_memory": 1 * mib, "job_records": 0, "results": 0, "stream": 0, "dead": 0},
                  "after_250": {"used_memory": 9 * mib, "stream": 3, "dead": 0},
                  "after_500": {"used_memory": 9 * mib, "stream": 3, "dead": 0},
                  "after_ttl": {"used_memory": 1.5 * mib, "job_records": 0, "results": 0, "stream": 3, "dead": 0}}
    good = {"jobs": 500, "first_sample": 50, "mid_sample": 250, "window_jobs": 100,
            "counts": {"submitted": 500, "finished": 500, "lost": 0, "duplicated": 0, "redelivered": 0,
                       "distinct_expressions": 500},
            "rss": [{"name": "serve", "pid": 1, "before": 100, "after": 109, "ratio": 1.09}],
            "redis": good_redis, "throughput": {"first": 2.0, "last": 1.9, "ratio": 0.95},
            "shutdown": {"temp_files_left_count": 0, "temp_files_left": [], "processes_left": [], "serve_exit": 0,
                         "processes_seen": 9, "stop_s": 3.0}}
    assert [v["pass"] for v in verdicts(good)] == [True] * 7

    def broken(path, value):
        report = json.loads(json.dumps(good))
        target = report
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return [v["name"].split(" <=")[0].split(" >=")[0] for v in verdicts(report) if not v["pass"]]

    assert broken(("counts", "lost"), 1) == ["0 lost"]
    assert broken(("counts", "duplicated"), 1) == ["0 duplicated"]
    assert broken(("rss",), [{"name": "serve", "pid": 1, "before": 100, "after": 111, "ratio": 1.11}]) == \
        ["RSS after job 500"]
    restarted = [{"name": "serve", "pid": 1, "before": 100, "after": 100, "ratio": 1.0},
                 {"name": "ray::DecodeActor", "pid": 2, "before": 100, "after": None, "ratio": None},
                 {"name": "ray::DecodeActor", "pid": 3, "before": None, "after": 100, "ratio": None}]
    assert broken(("rss",), restarted) == ["RSS after job 500"]  # an actor restarted mid-run
    idle = [*restarted[:1], {"name": "ray::IDLE", "pid": 4, "before": 50, "after": None, "ratio": None}]
    assert broken(("rss",), idle) == []  # Ray's idle workers come and go
    assert broken(("redis", "after_500", "used_memory"), 11 * mib) == ["Redis memory bounded"]
    assert broken(("redis", "after_500", "stream"), 400) == ["Redis memory bounded"]  # not trimmed
    assert broken(("redis", "after_ttl", "results"), 3) == ["Redis memory bounded"]  # not expired
    assert broken(("throughput", "ratio"), 0.85) == ["throughput last 100"]
    assert broken(("shutdown", "temp_files_left_count"), 1) == ["no temp files left"]
    assert broken(("shutdown", "processes_left"), [{"pid": 7, "name": "raylet"}]) == ["no processes left"]


#: jobs of the slow soak test: 250 by default (RSS baseline after job 50, throughput windows of 50 jobs), because
#: 500 took about 20 min on the project's shared 2-core machine (docs/bench_soak.txt has a recorded 500-job run);
#: REFSTREAM_SOAK_JOBS=500 runs the full soak of the issue
SOAK_JOBS = int(os.environ.get("REFSTREAM_SOAK_JOBS", "250"))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 250 jobs took about 10 min, 500 about 20 min on the shared 2-core machine
def test_soak_from_4_client_processes(blackswan_dir):
    """The soak: SOAK_JOBS jobs x 4 frames from 4 client processes, every criterion PASS (on a shared 2-core
    machine the throughput ratio is the noisiest: others' load changes during the run)."""
    _skip_without_redis()
    report = run_soak(jobs=SOAK_JOBS, clients=4, video=str(blackswan_dir), timeout=3000)
    print(format_table(report))
    failed = {v["name"]: v["value"] for v in report["criteria"] if not v["pass"]}
    assert not failed, failed
    counts = report["counts"]
    assert counts["finished"] == SOAK_JOBS and counts["lost"] == counts["duplicated"] == 0


def test_a_serve_that_exits_at_start_ends_the_soak_at_once_with_its_log(blackswan_dir, tmp_path):
    """serve exits 2 at start (a model YAML that does not exist): the soak stops as soon as it has exited,
    with serve's own message, instead of waiting for actors that will never beat."""
    _skip_without_redis()
    import time

    from refstream.bench.soak import run_soak

    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)serve did not start: serve exited with 2.*no-such-model.*Use --model tiny") \
            as failure:
        run_soak(jobs=2, clients=1, video=str(blackswan_dir), model=str(tmp_path / "no-such-model.yaml"),
                 timeout=600)
    assert "Traceback" not in str(failure.value)  # checked before Ray starts: no actor died of it
    assert time.monotonic() - started < 120


def test_memory_parts_of_a_process_and_the_split_of_a_change():
    """The RSS sample has the private and shared parts (/proc/PID/status); touching shared memory moves only
    the shared part, and the report and the RSS verdict name both parts of the worst change."""
    import mmap

    from refstream.bench.soak import _memory, _rss_table

    before = _memory(os.getpid())
    assert set(before) == {"rss", "anon", "shmem", "file"} and before["rss"] > 0
    size = 32 * 2**20
    shm_file = f"/dev/shm/refstream-soak-test-{os.getpid()}"  # a shared mapping of tmpfs: RssShmem only
    with open(shm_file, "wb") as handle:
        handle.truncate(size)
    try:
        with open(shm_file, "r+b") as handle, mmap.mmap(handle.fileno(), size) as shared:
            for offset in range(0, size, mmap.PAGESIZE):
                shared[offset] = 1  # touch every page
            after = _memory(os.getpid())
    finally:
        os.remove(shm_file)
    assert after["shmem"] - before["shmem"] >= 0.9 * size
    assert abs(after["anon"] - before["anon"]) < 0.25 * size

    row = _rss_table({"x:1": {"pid": 1, "name": "x", **before}}, {"x:1": {"pid": 1, "name": "x", **after}})[0]
    assert row["shmem_delta"] == after["shmem"] - before["shmem"]
    assert row["anon_delta"] == after["anon"] - before["anon"]
    report = {"jobs": 500, "first_sample": 50, "mid_sample": 250, "window_jobs": 100,
              "counts": {"submitted": 500, "finished": 500, "lost": 0, "duplicated": 0, "redelivered": 0,
                         "distinct_expressions": 500}, "rss": [row], "redis": {},
              "throughput": {"first": 1.0, "last": 1.0, "ratio": 1.0},
              "shutdown": {"temp_files_left_count": 0, "temp_files_left": [], "processes_left": [], "serve_exit": 0,
                           "processes_seen": 1, "stop_s": 1.0}}
    rss_verdict = next(v for v in verdicts(report) if v["name"].startswith("RSS"))
    assert " private, " in rss_verdict["value"] and " shared)" in rss_verdict["value"], rss_verdict["value"]


def test_the_rss_baseline_is_job_50_from_250_jobs_on():
    """The issue's baseline (job 50) whenever the run is long enough; a fifth of the jobs for short runs."""
    assert [first_sample_for(n) for n in (1, 12, 100, 249, 250, 500, 5000)] == [1, 2, 20, 49, 50, 50, 50]
