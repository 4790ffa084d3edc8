"""The service end to end: real redis-server, the tiny model, workers in-process and as Ray actors."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest
from service_procs import _until

from refstream.cli import main
from refstream.errors import ExpressionError
from refstream.service.client import JobNotDone, RefStreamClient
from refstream.service.queue import JobQueue, connect
from refstream.service.worker import QueueWorker, heartbeats


@pytest.fixture
def data_root(examples_dir):
    return examples_dir


def test_jobs_run_like_refstream_run_and_bad_jobs_fail_cleanly(redis_server, data_root, blackswan_dir, tmp_path):
    client = RefStreamClient(redis_server.url)
    good = client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81)
    corrupt = tmp_path / "allowed" / "corrupt.mp4"
    corrupt.parent.mkdir()
    corrupt.write_bytes(os.urandom(2048))
    bad = client.submit(str(corrupt), ["the black swan"])
    outside = client.submit(str(tmp_path / "elsewhere.mp4"), ["x"])
    with pytest.raises(ExpressionError):
        client.submit(str(blackswan_dir), ["  "])  # refused at submit: nothing queued
    worker = QueueWorker(redis_server.url, model="tiny", device="cpu",
                         allowed_roots=[data_root, tmp_path / "allowed"], lease_ms=5000)
    assert worker.run(max_jobs=3, block_ms=50) == 3
    assert client.status(good)["state"] == "done"
    assert client.status(bad)["state"] == "failed" and "corrupt.mp4" in client.status(bad)["error"]
    assert "allowed roots" in client.status(outside)["error"]
    with pytest.raises(JobNotDone, match="failed"):
        client.result(bad, tmp_path / "nope")
    files = client.result(good, tmp_path / "out")
    assert sorted(p.name for p in files) == ["masks.json", "overlay.mp4", "summary.json", "tokens.png"]
    status = client.status(good)
    assert status["frames_done"] == status["frames_total"] == 4 and "sam2" in status["stages"]

    # The same files as `refstream run` with the same options.
    assert main(["run", str(blackswan_dir), "-e", "the black swan", "--model", "tiny", "--max-frames", "4",
                 "--budget", "81", "--device", "cpu", "--quiet", "--out", str(tmp_path / "direct")]) == 0
    served = json.loads((tmp_path / "out" / "masks.json").read_text())
    direct = json.loads((tmp_path / "direct" / "masks.json").read_text())
    assert served["objects"] == direct["objects"] and served["pruning"] == direct["pruning"]
    assert worker.health()["redis"] is True
    beat = heartbeats(client.queue.r)["worker"]
    assert beat["pid"] == os.getpid() and beat["handled"] == 3 and beat["state"] == "idle"


def test_worker_stops_on_the_serve_stop_key(redis_server, data_root, blackswan_dir):
    """The supervisor stops single-threaded actors through Redis: the loop checks the key between jobs."""
    from refstream.service.worker import stop_key

    client = RefStreamClient(redis_server.url)
    jobs = [client.submit(str(blackswan_dir), ["the black swan"], max_frames=2, budget=81) for _ in range(2)]
    worker = QueueWorker(redis_server.url, model="tiny", device="cpu", allowed_roots=[data_root], serve_id="s1",
                         threads=1)
    assert worker.health()["threads"] == 1
    assert worker.run(max_jobs=1, block_ms=50) == 1
    client.queue.r.set(stop_key("refstream", "s1"), "1")
    assert worker.run(block_ms=50) == 0  # returns at once, the second job stays queued
    assert [client.status(j)["state"] for j in jobs] == ["done", "queued"]
    assert heartbeats(client.queue.r)["worker"]["state"] == "stopped"


def test_cli_verbs(redis_server, data_root, blackswan_dir, tmp_path, capsys):
    url = ["--redis-url", redis_server.url]
    assert main(["submit", *url, str(blackswan_dir), "-e", "the black swan", "--max-frames", "2"]) == 0
    job = capsys.readouterr().out.strip()
    assert main(["status", *url, job]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "queued"
    QueueWorker(redis_server.url, model="tiny", device="cpu", allowed_roots=[data_root]).run(max_jobs=1, block_ms=50)
    assert main(["result", *url, job, "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "masks.json").is_file()
    assert main(["cancel", *url, job]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["status", *url, "nosuchjob"]) == 2


@pytest.mark.slow
def test_ray_worker_killed_mid_job_is_restarted_and_the_job_finishes(redis_server, data_root, bedroom_mp4):
    """``--pipeline whole``: kill -9 a worker actor mid-job: Ray restarts it, the job is reclaimed after the
    lease and finishes once (the pools version: tests/test_service_pools.py)."""
    import ray

    from refstream.service.serve import serve

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    try:
        stop = threading.Event()
        actors = []
        thread = threading.Thread(target=serve, args=(redis_server.url,), kwargs=dict(
            workers=1, model="tiny", device="cpu", allowed_roots=[data_root], lease_ms=3000, stop_event=stop,
            on_start=actors.extend, log=lambda *_: None, pipeline="whole"))
        thread.start()
        client = RefStreamClient(redis_server.url)
        job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=120)
        _until(lambda: client.status(job)["frames_done"] >= 10, 120, "10 frames done")
        beat = heartbeats(client.queue.r)["worker-0"]  # the actor is busy: its heartbeat, not a method call
        assert beat["state"] == "running" and beat["threads"] >= 1
        pid = beat["pid"]
        os.kill(pid, signal.SIGKILL)
        status = client.wait(job, timeout_s=300)
        assert status["state"] == "done" and status["deliveries"] == 2
        assert len(json.loads(client.queue.r.get(f"refstream:result:{job}"))["files"]) == 4
        stop.set()
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        ray.shutdown()


def test_queue_depth_metric(redis_server, blackswan_dir):
    queue = JobQueue(connect(redis_server.url))
    client = RefStreamClient(redis_server.url)
    for _ in range(3):
        client.submit(str(blackswan_dir), ["x"])
    assert queue.depth() == {"pending": 0, "lag": 3}


def test_a_running_job_keeps_its_lease_between_progress_reports(redis_server, data_root, bedroom_mp4):
    """Frame progress is reported at most twice a second and CLIP may run long, so a lease shorter than the
    gaps would let another consumer take a job its worker is still running; the lease keeper renews it. Here
    a 300 ms lease and a second consumer polling for abandoned jobs all along: the job is never taken over."""
    queue = JobQueue(connect(redis_server.url), lease_ms=300)
    client = RefStreamClient(redis_server.url)
    job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=30)
    worker = QueueWorker(redis_server.url, model="tiny", device="cpu", allowed_roots=[data_root], lease_ms=300)
    stolen, done = [], threading.Event()

    def thief():
        while client.status(job)["state"] != "running":  # only the worker takes it new; then only reclaims
            time.sleep(0.01)
        while not done.is_set():
            if (delivery := queue.take("thief", block_ms=50)) is not None:
                stolen.append(delivery.job_id)
            time.sleep(0.05)

    t = threading.Thread(target=thief)
    t.start()
    try:
        assert worker.run(max_jobs=1, block_ms=50) == 1
    finally:
        done.set()
        t.join()
    assert stolen == [] and client.status(job)["state"] == "done" and client.status(job)["deliveries"] == 1


def _events(caplog, event: str) -> list:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def test_redis_away_in_heartbeats_and_the_abort_flag_is_logged_not_raised(redis_server, caplog):
    from refstream.service.worker import HeartbeatThread, RedisFlag

    client = connect(redis_server.url, retries=0)
    beat = HeartbeatThread(redis_server.url, "t", "decoder-9", lambda: {"role": "decode"}, every_s=3600)
    beat.r = connect(redis_server.url, retries=0)  # fail at once instead of retrying for seconds
    try:
        assert "decoder-9" in heartbeats(client, "t")
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="refstream.worker"):
            beat.beat()  # must not raise: a heartbeat never fails a job
            assert RedisFlag(client, "t:serve:x:abort", every_s=0).is_set() is False
    finally:
        beat.stop()
        redis_server.start()
    (failed,) = _events(caplog, "heartbeat.failed")
    assert failed.levelno == logging.WARNING and failed.consumer == "decoder-9" and failed.error
    (away,) = _events(caplog, "worker.redis_away")
    assert away.levelno == logging.WARNING and "t:serve:x:abort" in away.getMessage()


def test_a_failing_coordinator_loop_is_logged_with_its_consumer_and_restarted(redis_server, caplog):
    from refstream.service.streaming import _coordinate

    queue = JobQueue(connect(redis_server.url, retries=0))
    redis_server.stop()  # every take() fails: the loop logs it and starts again until told to stop
    stop = threading.Event()
    notes = []
    threading.Timer(1.2, stop.set).start()
    try:
        assert _coordinate(queue, "pools-coordinator-0", lambda *_: {}, stop,
                           lambda event, message, level, **fields: notes.append((event, level, fields))) == 0
    finally:
        redis_server.start()
    assert len(notes) >= 2 and {n[0] for n in notes} == {"serve.worker_error"}
    assert all(level == logging.WARNING and f["consumer"] == "pools-coordinator-0" and f["error"]
               for _, level, f in notes)


def test_whole_supervisor_retries_and_logs_its_stop_requests_while_redis_is_away(redis_server):
    from refstream.service.serve import _WholeSupervisor
    from refstream.service.worker import abort_key, stop_key

    control = JobQueue(connect(redis_server.url, retries=0))
    stop, abort = threading.Event(), threading.Event()
    notes = []
    supervisor = _WholeSupervisor(control, "sid", stop, abort, lambda event, *a, **f: notes.append(event))
    stop.set()
    abort.set()
    redis_server.stop()
    try:
        supervisor._send_requests()
        assert not supervisor.stop_sent and not supervisor.abort_sent
        assert notes == ["serve.abort_retry", "serve.stopping", "serve.stop_retry"]
        supervisor._delete_keys()  # logged, not raised: the keys expire on their own
        assert notes[-1] == "serve.cleanup_failed"
    finally:
        redis_server.start()
    supervisor._send_requests()  # Redis is back: both requests go through on the next turn
    assert supervisor.stop_sent and supervisor.abort_sent and notes[-1] == "serve.aborting"
    assert control.r.exists(stop_key(control.prefix, "sid"), abort_key(control.prefix, "sid")) == 2
    supervisor._delete_keys()
    assert control.r.exists(stop_key(control.prefix, "sid"), abort_key(control.prefix, "sid")) == 0


def test_stop_requests_are_noted_even_when_the_coordinators_already_ended():
    """A second SIGTERM can hand the jobs back and end the coordinator threads before the wait loop looks again:
    both requests are still logged once each (the slow SIGTERM test looks for serve.aborting)."""
    import threading

    from refstream.service.streaming import _wait_for_coordinators

    stop, abort = threading.Event(), threading.Event()
    stop.set()
    abort.set()
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    events = []
    _wait_for_coordinators([ended], stop, abort, lambda event, message, *a, **k: events.append(event))
    assert events == ["serve.stopping", "serve.aborting"]
