"""Prometheus /metrics and JSON logs of the service: real redis-server, tiny model, in-process worker (no Ray)."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import pytest

from refstream.service.client import RefStreamClient
from refstream.service.logs import configure_logging
from refstream.service.metrics import BUCKETS, start_metrics_server
from refstream.service.queue import JobQueue, connect
from refstream.service.worker import QueueWorker


def scrape(port: int) -> dict:
    """``{(sample name, frozenset(labels)): value}`` of one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def json_logs():
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    yield stream
    logger = logging.getLogger("refstream")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def test_metrics_after_jobs_and_json_logs(redis_server, examples_dir, blackswan_dir, tmp_path, json_logs):
    queue = JobQueue(connect(redis_server.url))
    server, port = start_metrics_server(queue, 0, "127.0.0.1", workers=lambda: 1)
    try:
        empty = scrape(port)
        assert value(empty, "refstream_redis_up") == 1
        assert value(empty, "refstream_frames_processed_total") == 0
        assert value(empty, "refstream_jobs", state="done") == 0

        client = RefStreamClient(redis_server.url)
        jobs = [client.submit(str(blackswan_dir), ["the black swan"], max_frames=n, budget=81) for n in (3, 4)]
        bad = client.submit(str(tmp_path / "outside.mp4"), ["x"])
        waiting = client.submit(str(blackswan_dir), ["the black swan"], max_frames=2)
        before = scrape(port)
        assert value(before, "refstream_jobs", state="queued") == 4
        assert value(before, "refstream_queue_depth", kind="lag") == 4

        worker = QueueWorker(redis_server.url, model="tiny", device="cpu", allowed_roots=[examples_dir], name="w0")
        assert worker.run(max_jobs=3, block_ms=50) == 3
        samples = scrape(port)
    finally:
        server.shutdown()
        server.server_close()

    assert [client.status(j)["state"] for j in jobs] == ["done", "done"] and client.status(bad)["state"] == "failed"
    assert value(samples, "refstream_frames_processed_total") == 3 + 4
    assert value(samples, "refstream_jobs", state="done") == 2
    assert value(samples, "refstream_jobs", state="failed") == 1
    assert value(samples, "refstream_jobs", state="queued") == 1  # `waiting` was not taken
    assert value(samples, "refstream_queue_depth", kind="lag") == 1
    assert value(samples, "refstream_queue_depth", kind="pending") == 0
    assert value(samples, "refstream_dead_letters") == 1  # bad input fails at once: a dead letter, not retried
    assert value(samples, "refstream_workers") == 1
    assert value(samples, "refstream_actors", role="worker", state="idle") == 1  # from w0's heartbeat
    # Job durations by outcome: 2 done, 1 failed; buckets cumulative, +Inf = count.
    assert value(samples, "refstream_job_duration_seconds_count", outcome="done") == 2
    assert value(samples, "refstream_job_duration_seconds_count", outcome="failed") == 1
    assert value(samples, "refstream_job_duration_seconds_bucket", outcome="done", le="+Inf") == 2
    done_sum = value(samples, "refstream_job_duration_seconds_sum", outcome="done")
    assert done_sum > 0
    counts = [value(samples, "refstream_job_duration_seconds_bucket", outcome="done", le=str(b)) for b in BUCKETS]
    assert counts == sorted(counts) and counts[-1] <= 2
    # Stage latencies: one observation per finished job and stage, sums = the jobs' stage seconds.
    stages = {}
    for job in jobs:
        for stage, seconds in client.status(job)["stages"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    assert "sam2" in stages and "decode" in stages
    for stage, total in stages.items():
        assert value(samples, "refstream_stage_seconds_count", stage=stage) == 2
        assert value(samples, "refstream_stage_seconds_sum", stage=stage) == pytest.approx(total, abs=1e-3)

    # JSON logs: one object per line with the structured fields.
    records = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert records and all({"ts", "level", "event", "message"} <= set(r) for r in records)
    done = [r for r in records if r["event"] == "job.done"]
    assert sorted(r["job_id"] for r in done) == sorted(jobs)
    assert all(r["consumer"] == "w0" and r["state"] == "done" and r["seconds"] > 0 for r in done)
    failed = [r for r in records if r["event"] == "job.failed"]
    assert len(failed) == 1 and failed[0]["job_id"] == bad and "allowed roots" in failed[0]["error"]
    assert failed[0]["level"] == "error"
    assert {r["job_id"] for r in records if r["event"] == "job.submitted"} == {*jobs, bad, waiting}
    assert any(r["event"] == "worker.ready" and r["consumer"] == "w0" for r in records)


def test_metrics_when_redis_is_down(redis_server):
    queue = JobQueue(connect(redis_server.url, retries=0))
    server, port = start_metrics_server(queue, 0, "127.0.0.1")
    try:
        assert value(scrape(port), "refstream_redis_up") == 1
        redis_server.stop()
        samples = scrape(port)
        assert value(samples, "refstream_redis_up") == 0
        assert not any(name == "refstream_jobs" for name, _ in samples)
    finally:
        server.shutdown()
        server.server_close()


def test_text_logs_and_serve_options(capsys):
    from refstream.cli import build_parser

    stream = io.StringIO()
    configure_logging("text", stream=stream)
    try:
        from refstream.service.logs import log_event

        log_event(logging.getLogger("refstream.queue"), "job.done", "job finished", job_id="abc", seconds=1.5)
    finally:
        logger = logging.getLogger("refstream")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    line = stream.getvalue().strip()
    assert " info job.done job_id=abc seconds=1.5 job finished" in line
    args = build_parser().parse_args(["serve", "--model", "tiny"])
    assert args.metrics_port == 9464 and args.log_format == "text"
    args = build_parser().parse_args(["serve", "--metrics-port", "0", "--log-format", "json"])
    assert args.metrics_port == 0 and args.log_format == "json"
    with pytest.raises(ValueError):
        configure_logging("xml")


def test_redis_password_is_redacted_in_logs():
    from refstream.service.security import mask_url  # serve logs the URL through it (was serve._redact)

    assert mask_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert mask_url("redis://user:s3cret@h/0") == "redis://user:***@h/0"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_serve_gpu_shares_default_to_one_videoglamm_and_one_encoder_actor_per_gpu():
    from refstream.cli import build_parser
    from refstream.service.cli import gpu_shares

    def shares(*argv):
        return gpu_shares(build_parser().parse_args(["serve", *argv]))

    assert shares("--device", "cuda") == (0.5, 0.5)  # pools (default): they share one GPU
    assert shares("--device", "cuda", "--pipeline", "whole") == (1.0, 0.0)
    assert shares("--device", "cpu") == shares() == (0.0, 0.0)
    assert shares("--device", "cuda", "--num-gpus", "1", "--encoder-gpus", "0.25") == (1.0, 0.25)
