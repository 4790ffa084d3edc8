"""Limits at the door: the largest job ``serve`` accepts (frames, pixels per frame, expressions, characters per
expression), published to Redis and checked at ``submit`` (exit 2, the limit named, nothing queued) and again by
the worker before a job runs (a job that slipped past fails with the same message and never runs). Real
redis-server, real probes of the bundled blackswan folder (50 frames of 854x480) and a real worker loop."""

from __future__ import annotations

import argparse

import pytest

from refstream.cli import main
from refstream.errors import ConfigError
from refstream.service.cli import limits_from_args
from refstream.service.client import JobLimitError, JobLimits, RefStreamClient
from refstream.service.queue import JobQueue, connect
from refstream.service.worker import QueueWorker

# (limit, value, the submit flags past it, the job's value in the message, flags within the limit)
CASES = [
    ("max_frames_per_job", 20, [], "it would segment 50 frames", ["--max-frames", "20"]),
    ("max_pixels_per_frame", 400_000, ["--max-frames", "2"], "frames of 854x480 = 409,920 pixels per frame", None),
    ("max_expressions", 2, ["-e", "the water", "-e", "the sky"], "3 expressions", ["-e", "the water"]),
    ("max_expression_chars", 10, [], "expression 1 has 14 characters in one expression", None),
]
FLAGS = {"max_frames_per_job": "--max-frames-per-job", "max_pixels_per_frame": "--max-pixels-per-frame",
         "max_expressions": "--max-expressions", "max_expression_chars": "--max-expression-chars"}


def _keys(queue: JobQueue) -> list[str]:
    return sorted(k for k in queue.r.scan_iter(match="refstream:job:*"))


@pytest.mark.parametrize("name,value,past,shown,within", CASES, ids=[c[0] for c in CASES])
def test_submit_refuses_a_job_past_each_limit(redis_server, blackswan_dir, capsys, name, value, past, shown, within):
    queue = JobQueue(connect(redis_server.url))
    queue.publish_limits(JobLimits(**{name: value}))  # what serve does at start
    url = ["--redis-url", redis_server.url]
    base = ["submit", *url, str(blackswan_dir), "-e", "the black swan"]
    assert main([*base, *past]) == 2
    err = capsys.readouterr().err
    flag = FLAGS[name]
    assert f"job refused: {shown}, above this service's limit of {value:,}" in err, err
    assert f"(refstream serve {flag} {value})" in err and "Fix:" in err
    assert queue.r.xlen(queue.stream) == 0 and _keys(queue) == []  # nothing queued
    if within is not None:
        assert main([*base, *within]) == 0
        assert queue.r.xlen(queue.stream) == 1


def test_no_limits_published_means_no_check_at_submit_and_the_worker_refuses_with_the_same_message(
        redis_server, examples_dir, blackswan_dir):
    client = RefStreamClient(redis_server.url)
    limits = JobLimits(max_frames_per_job=20, max_expressions=1)
    # submitted before any serve published its limits: they slip past the door
    too_long = client.submit(str(blackswan_dir), ["the black swan"])
    too_many = client.submit(str(blackswan_dir), ["the black swan", "the water"], max_frames=2)
    fine = client.submit(str(blackswan_dir), ["the black swan"], max_frames=2, budget=81)
    client.queue.publish_limits(limits)
    with pytest.raises(JobLimitError) as refused_frames:
        client.submit(str(blackswan_dir), ["the black swan"])
    with pytest.raises(JobLimitError) as refused_expressions:
        client.submit(str(blackswan_dir), ["the black swan", "the water"], max_frames=2)

    worker = QueueWorker(redis_server.url, model="tiny", device="cpu", allowed_roots=[examples_dir],
                         limits=limits, threads=1)
    assert worker.run(max_jobs=3, block_ms=50) == 3
    frames, expressions = client.status(too_long), client.status(too_many)
    assert frames["state"] == expressions["state"] == "failed"
    assert frames["error"] == str(refused_frames.value)  # the worker's check gives submit's message
    assert expressions["error"] == str(refused_expressions.value)
    for status in (frames, expressions):  # never ran: no frame planned or done, no result
        assert status["frames_total"] == status["frames_done"] == 0 and status["stages"] == {}
    assert client.queue.result(too_long) is None and client.queue.result(too_many) is None
    assert client.status(fine)["state"] == "done"
    assert {d["id"]: d["reason"] for d in client.queue.dead_letters()} == {too_long: "failed", too_many: "failed"}


def test_limits_from_serve_flags_and_a_submit_path_the_client_cannot_read(redis_server, tmp_path):
    parser = argparse.ArgumentParser()
    for flag in FLAGS.values():
        parser.add_argument(flag, type=int, default=0)
    limits = limits_from_args(parser.parse_args(["--max-frames-per-job", "8", "--max-expressions", "0"]))
    assert limits == JobLimits(max_frames_per_job=8)
    assert JobLimits.from_mapping(limits.to_mapping()) == limits
    with pytest.raises(ConfigError, match="--max-expression-chars must be >= 0"):
        limits_from_args(parser.parse_args(["--max-expression-chars", "-1"]))
    with pytest.raises(ConfigError, match="max_frames_per_job must be an integer >= 1"):
        JobLimits(max_frames_per_job=0)
    client = RefStreamClient(redis_server.url)
    client.queue.publish_limits(JobLimits(max_frames_per_job=1))
    # not on this machine (e.g. a path only the workers see): accepted here, the worker probes it
    job = client.submit(str(tmp_path / "on-the-workers.mp4"), ["a dog"])
    assert client.status(job)["state"] == "queued"
