"""The Redis Streams job queue against a real redis-server on a free loopback port."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time

import pytest

from refstream.errors import ConfigError, ExpressionError, InputError
from refstream.service.jobs import InputPolicy, JobRequest
from refstream.service.queue import (JobCancelled, JobNotFound, JobProgress, JobQueue, JobReturned, LeaseKeeper,
                                     connect)


def request(**kw) -> JobRequest:
    return JobRequest(**{"input": "/data/v.mp4", "expressions": ["the bed"], **kw})


@pytest.fixture
def queue(redis_server):
    return JobQueue(connect(redis_server.url), lease_ms=200, max_deliveries=3, result_ttl_s=3600)


def ok_handler(req, progress):
    progress(frames_done=0, frames_total=2)
    progress(frames_done=2, frames_total=2, stages={"sam2": 0.1})
    return {"input": req.input, "expressions": req.expressions}


def test_payloads_are_validated_json():
    req = request(budget=81, placement="patch")
    assert JobRequest.from_json(req.to_json()) == req
    with pytest.raises(ExpressionError, match="empty"):
        JobRequest.from_json(json.dumps({"input": "x", "expressions": ["  "]}))
    with pytest.raises(ConfigError, match="budget"):
        JobRequest.from_json(json.dumps({"input": "x", "expressions": ["a"], "budget": 0}))
    with pytest.raises(ConfigError, match="pickle"):
        JobRequest.from_json(json.dumps({"input": "x", "expressions": ["a"], "pickle": "cos\nsystem"}))
    with pytest.raises(ConfigError):
        JobRequest.from_json(b"\x80\x04not json")


def test_input_policy_allow_list_and_upload(tmp_path):
    allowed = tmp_path / "videos"
    allowed.mkdir()
    (allowed / "a.mp4").write_bytes(b"x" * 10)
    policy = InputPolicy([allowed], upload_root=tmp_path / "uploads", max_upload_bytes=100)
    assert policy.check(allowed / "a.mp4") == str((allowed / "a.mp4").resolve())
    with pytest.raises(InputError, match="allowed roots"):
        policy.check(tmp_path / "secret.mp4")
    with pytest.raises(InputError, match="allowed roots"):
        policy.check(allowed / ".." / "secret.mp4")  # no escape through ..
    (tmp_path / "evil").symlink_to(tmp_path)
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"y")
    (allowed / "link.mp4").symlink_to(outside)
    with pytest.raises(InputError):
        policy.check(allowed / "link.mp4")  # symlink resolved before the check
    stored = policy.upload(allowed / "a.mp4")
    assert policy.check(stored) == stored and open(stored, "rb").read() == b"x" * 10
    big = tmp_path / "big.mp4"
    big.write_bytes(b"z" * 101)
    with pytest.raises(InputError, match="upload limit"):
        policy.upload(big)


def test_submit_status_work_result(queue):
    job = queue.submit(request())
    assert queue.status(job)["state"] == "queued" and queue.result(job) is None
    assert queue.depth()["lag"] == 1
    assert queue.work("w1", ok_handler, max_jobs=1) == 1
    status = queue.status(job)
    assert status["state"] == "done" and status["frames_done"] == 2 and status["stages"] == {"sam2": 0.1}
    assert queue.result(job) == {"input": "/data/v.mp4", "expressions": ["the bed"]}
    assert queue.depth() == {"pending": 0, "lag": 0}
    assert 0 < queue.r.ttl(f"refstream:result:{job}") <= 3600
    with pytest.raises(JobNotFound):
        queue.status("nope")


def test_submit_with_same_id_is_idempotent(queue):
    assert queue.submit(request(), job_id="abc") == queue.submit(request(), job_id="abc") == "abc"
    assert queue.r.xlen(queue.stream) == 1


def test_bad_job_fails_with_clear_error_others_finish(queue):
    from refstream.errors import InputError as Bad

    good1, bad, good2 = queue.submit(request()), queue.submit(request(input="/corrupt.mp4")), queue.submit(request())

    def handler(req, progress):
        if req.input == "/corrupt.mp4":
            raise Bad("/corrupt.mp4: not a video. Fix: pass a video file")
        return ok_handler(req, progress)

    queue.work("w1", handler, max_jobs=3)
    assert [queue.status(j)["state"] for j in (good1, bad, good2)] == ["done", "failed", "done"]
    assert "not a video" in queue.status(bad)["error"]
    # bad input is not retried: failed at once, a dead letter with reason "failed" after one delivery
    assert [(d["id"], d["reason"], d["deliveries"]) for d in queue.dead_letters()] == [(bad, "failed", "1")]
    assert queue.depth() == {"pending": 0, "lag": 0}


def test_dead_consumer_job_is_reclaimed_after_the_lease(queue):
    job = queue.submit(request())
    first = queue.take("dies", block_ms=10)  # delivered, never acknowledged: the worker "died"
    assert first.job_id == job and queue.status(job)["state"] == "running"
    assert queue.take("w2", block_ms=10) is None  # still leased
    time.sleep(0.3)
    assert queue.work("w2", ok_handler, max_jobs=1) == 1
    status = queue.status(job)
    assert status["state"] == "done" and status["deliveries"] == 2


def test_progress_renews_the_lease(queue):
    job = queue.submit(request())
    delivery = queue.take("slow", block_ms=10)
    for _ in range(4):
        time.sleep(0.1)
        queue.progress(delivery, "slow", frames_done=1)
    assert queue.take("thief", block_ms=10) is None  # idle never exceeded the lease
    queue.complete(delivery, {"ok": 1})
    assert queue.result(job) == {"ok": 1}


def test_a_returned_job_is_taken_again_at_once_ahead_of_new_jobs(redis_server):
    queue = JobQueue(connect(redis_server.url), lease_ms=60_000, max_deliveries=1)
    first = queue.submit(request(budget=81))
    later = queue.submit(request(budget=64))
    stop_now = threading.Event()

    def handler(req, progress):
        stop_now.set()  # e.g. serve got its second SIGTERM while the job ran
        with LeaseKeeper(progress, 10.0, abort=stop_now) as keeper:
            keeper(frames_done=3, frames_total=9)
        raise AssertionError("unreachable: the keeper raises JobReturned")

    assert queue.work("w1", handler, max_jobs=1) == 1
    status = queue.status(first)
    assert status["state"] == "queued" and status["frames_done"] == 0 and status["deliveries"] == 0
    again = queue.take("w2", block_ms=10)  # long before the 60 s lease: the returned job first, not `later`
    assert again is not None and again.job_id == first and again.deliveries == 1  # max_deliveries=1 still allows it
    queue.complete(again, {"ok": 1})
    assert queue.result(first) == {"ok": 1} and queue.take("w2", block_ms=10).job_id == later
    assert queue.depth()["pending"] == 1
    with pytest.raises(JobReturned):
        LeaseKeeper(lambda **_: None, 1.0, abort=stop_now).check()


def test_poison_job_goes_to_dead_letters(queue):
    job = queue.submit(request())

    def crash(req, progress):
        raise RuntimeError("segfault-like crash")

    for _ in range(3):
        queue.work("w", crash, max_jobs=1)
        time.sleep(0.25)
    assert queue.take("w", block_ms=10) is None  # fourth delivery -> dead letter
    status = queue.status(job)
    assert status["state"] == "failed" and "crash" in status["error"]
    (dead,) = queue.dead_letters()
    assert dead["id"] == job and "crash" in dead["error"]
    assert queue.depth()["pending"] == 0


def test_result_is_written_once(queue):
    job = queue.submit(request())
    slow = queue.take("slow", block_ms=10)
    time.sleep(0.3)
    fast = queue.take("fast", block_ms=10)  # reclaimed: both now hold the job
    assert fast.job_id == slow.job_id == job
    assert queue.complete(fast, {"by": "fast"}) is True
    assert queue.complete(slow, {"by": "slow"}) is False
    assert queue.result(job) == {"by": "fast"}


def test_cancel(queue):
    job = queue.submit(request())
    assert queue.cancel(job) is True
    assert queue.take("w", block_ms=10) is None  # skipped and acknowledged
    assert queue.status(job)["state"] == "cancelled" and queue.depth()["pending"] == 0

    running = queue.submit(request())
    delivery = queue.take("w", block_ms=10)
    queue.cancel(running)
    with pytest.raises(JobCancelled):
        queue.progress(delivery, "w", frames_done=1)
    queue.cancelled(delivery)
    assert queue.status(running)["state"] == "cancelled" and queue.cancel(running) is False


def test_survives_redis_restart_with_aof(redis_server):
    queue = JobQueue(connect(redis_server.url, retries=12), lease_ms=200)
    before = queue.submit(request())
    redis_server.stop()
    restarter = threading.Timer(0.5, redis_server.start)
    restarter.start()
    after = queue.submit(request())  # retried with backoff until the server is back
    restarter.join()
    queue.work("w", ok_handler, max_jobs=2)
    assert queue.status(before)["state"] == queue.status(after)["state"] == "done"


def _client_process(url: str, client: int, n: int, out) -> None:
    q = JobQueue(connect(url))
    out.put([q.submit(request(input=f"/v/{client}-{i}.mp4")) for i in range(n)])


def test_many_clients_no_job_lost_or_duplicated(redis_server):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(redis_server.url, c, n, out))
             for c, n in enumerate((13, 13, 12, 12))]
    for p in procs:
        p.start()
    ids = [job for _ in procs for job in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
    assert len(ids) == len(set(ids)) == 50
    queues = [JobQueue(connect(redis_server.url), lease_ms=200) for _ in range(2)]
    runs: list[str] = []

    def handler(req, progress):
        runs.append(req.input)
        return {"input": req.input}

    stop = threading.Event()
    workers = [threading.Thread(target=q.work, args=(f"w{i}", handler), kwargs={"stop": stop.is_set, "block_ms": 50})
               for i, q in enumerate(queues)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while any(queues[0].status(j)["state"] != "done" for j in ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for w in workers:
        w.join()
    results = [queues[0].result(j) for j in ids]
    assert all(r is not None for r in results)
    assert len(runs) == 50 and len(set(runs)) == 50  # each job ran exactly once


def _renewal_failures(queue: JobQueue) -> float:
    """``refstream_lease_renewal_failures_total`` as the Prometheus exporter reports it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from refstream.service.metrics import ServiceCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(queue))
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == "refstream_lease_renewal_failures_total":
                return sample.value
    raise AssertionError("no refstream_lease_renewal_failures_total in the metrics")


def _renewal_logs(caplog, job_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "lease.renew_failed"
            and getattr(r, "job_id", None) == job_id]


def test_a_lease_taken_over_is_a_logged_and_counted_renewal_failure(queue, caplog):
    job = queue.submit(request())
    slow = queue.take("slow", block_ms=10)
    assert _renewal_failures(queue) == 0
    time.sleep(0.3)  # past the 200 ms lease: another consumer takes the job over
    assert queue.take("thief", block_ms=10).job_id == job
    with caplog.at_level(logging.WARNING, logger="refstream.queue"):
        queue.progress(slow, "slow", frames_done=1)  # the renewal comes too late
    (record,) = _renewal_logs(caplog, job)
    assert record.levelno == logging.WARNING and "taken over by thief" in record.getMessage()
    assert record.consumer == "slow"
    assert _renewal_failures(queue) == 1 and queue.unsent_renewal_failures == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refstream.queue"):
        queue.progress(slow, "slow", frames_done=2)  # claimed back by the last renewal: no new failure
    assert _renewal_logs(caplog, job) == [] and _renewal_failures(queue) == 1


def test_renewal_while_redis_is_stopped_is_logged_then_counted_when_it_is_back(redis_server, caplog):
    queue = JobQueue(connect(redis_server.url, retries=1), lease_ms=60_000)
    job = queue.submit(request())
    delivery = queue.take("w", block_ms=10)
    progress = JobProgress(queue, delivery, "w")
    redis_server.stop()  # AOF on: the stream and the job survive the restart below
    try:
        with caplog.at_level(logging.DEBUG, logger="refstream.queue"):
            with LeaseKeeper(progress, 0.1) as keeper:  # renews every 0.1 s: each renewal fails
                deadline = time.monotonic() + 20
                while not _renewal_logs(caplog, job):
                    assert time.monotonic() < deadline, "no lease.renew_failed log"
                    time.sleep(0.05)
            assert keeper.cancelled is None
        record = _renewal_logs(caplog, job)[0]
        assert record.levelno == logging.WARNING and "Redis did not answer" in record.getMessage()
        retries = [r for r in caplog.records if getattr(r, "event", None) == "lease.retry"]
        assert retries and all(r.job_id == job for r in retries)  # the keeper says it goes on, with the job id
        failed = queue.unsent_renewal_failures
        assert failed >= 1
    finally:
        redis_server.start()
    progress(frames_done=1)  # Redis is back: the next report carries the count
    assert queue.unsent_renewal_failures == 0 and _renewal_failures(queue) == failed
    queue.complete(delivery, {"ok": 1})
    assert queue.status(job)["state"] == "done"
