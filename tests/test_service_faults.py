"""Faults through the whole service: ``refstream serve`` as a subprocess (its own local Ray), a real
redis-server, the tiny model. Each test takes 30-60 s (two Ray starts), so they are marked slow:
``pytest -m slow tests/test_service_faults.py``.

(a) kill -9 of ``serve`` mid-job: its actors die with it; the next ``serve`` (a fresh local Ray) takes the job
    over after the lease and it finishes exactly once (2 deliveries, one result, one ``done``).
(b) redis-server restarted (AOF on, same port) while ``serve`` works through a batch: every job finishes, none
    lost (all done with a result, nothing pending) and none run to completion twice.
(c) SIGTERM to ``serve`` mid-job: it drains (the jobs it holds finish; jobs not taken stay queued) and exits 0;
    the next ``serve`` finishes the rest.
(d) a second SIGTERM: the running job is handed back to the queue unfinished and the next ``serve`` takes it
    at once (no lease to wait for).

Each runs with both pipelines: ``pools`` (the default: decode / encoder / VideoGLaMM actors, 2 jobs in flight)
and ``whole`` (one worker actor running one whole job at a time).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from service_procs import _counts, _start_time, _until, serves_fixture

from refstream.service.client import RefStreamClient
from refstream.service.worker import heartbeats

pytestmark = pytest.mark.slow

serves = serves_fixture()


@pytest.fixture(params=["pools", "whole"])
def pipeline(request) -> tuple[str, str]:
    """The ``serve`` arguments choosing the pipeline."""
    return ("--pipeline", request.param)


def test_serve_killed_mid_job_the_next_serve_finishes_it_once(serves, pipeline, redis_server, bedroom_mp4):
    client = RefStreamClient(redis_server.url)
    job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=120)
    first = serves.start(*pipeline)
    _until(lambda: client.status(job)["frames_done"] >= 5, 180, "the first serve to start the job", serves)
    serves.snapshot()
    worker_pid = heartbeats(client.queue.r)["worker-0"]["pid"]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    _until(lambda: _start_time(worker_pid) is None, 30, "the worker actor to die with its driver")
    frames_at_kill = client.status(job)["frames_done"]
    assert client.status(job)["state"] == "running" and frames_at_kill < 120

    second = serves.start(*pipeline)
    status = client.wait(job, timeout_s=300)
    assert status["state"] == "done" and status["deliveries"] == 2, serves.log(1)[-3000:]
    assert len(client.queue.result(job)["files"]) == 4
    assert _counts(client, [job]) == {"submitted": 1, "finished": 1, "lost": 0, "duplicated": 0, "pending": 0,
                                      "lag": 0, "dead": 0}
    assert heartbeats(client.queue.r)["worker-0"]["pid"] != worker_pid
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0


def test_redis_restart_mid_run_loses_and_duplicates_nothing(serves, pipeline, redis_server, blackswan_dir):
    client = RefStreamClient(redis_server.url)
    jobs = [client.submit(str(blackswan_dir), ["the black swan"], max_frames=12, budget=81) for _ in range(8)]
    proc = serves.start(*pipeline)
    _until(lambda: sum(client.status(j)["state"] == "done" for j in jobs) >= 2, 180, "two jobs done", serves)
    _until(lambda: any(client.status(j)["state"] == "running" for j in jobs), 30, "a running job", serves)
    redis_server.stop()  # SIGTERM: redis-server flushes the AOF and exits
    time.sleep(1.0)
    redis_server.start()  # same port and folder: the AOF is loaded back
    _until(lambda: all(client.status(j)["state"] == "done" for j in jobs), 300, "all jobs done", serves, poll=0.3)
    counts = _counts(client, jobs)
    assert counts == {"submitted": 8, "finished": 8, "lost": 0, "duplicated": 0, "pending": 0, "lag": 0, "dead": 0}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0


def test_sigterm_drains_the_running_job_and_exits_0(serves, pipeline, redis_server, bedroom_mp4, blackswan_dir):
    client = RefStreamClient(redis_server.url)
    long_job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=60)
    short = [client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81) for _ in range(4)]
    first = serves.start(*pipeline)
    _until(lambda: client.status(long_job)["frames_done"] >= 3, 180, "the long job to start", serves)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=180) == 0, serves.log(0)[-3000:]
    assert client.status(long_job)["state"] == "done"  # drained: the job it held finished before serve exited
    # pools holds 2 jobs at once (the second waits for the VideoGLaMM actor): that one is drained too
    states = [(client.status(j)["state"], client.status(j)["deliveries"]) for j in short]
    assert all(state in (("done", 1), ("queued", 0)) for state in states), states  # nothing left half-done
    assert sum(state == ("queued", 0) for state in states) >= 2, states  # not taken: still queued
    assert "serve.stopping" in serves.log(0)

    second = serves.start(*pipeline)
    _until(lambda: all(client.status(j)["state"] == "done" for j in short), 180, "the queued jobs", serves)
    assert _counts(client, [long_job, *short]) == {"submitted": 5, "finished": 5, "lost": 0, "duplicated": 0,
                                                    "pending": 0, "lag": 0, "dead": 0}
    assert [client.status(j)["deliveries"] for j in [long_job, *short]] == [1] * 5
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0


def test_a_second_sigterm_hands_the_running_job_back_and_the_next_serve_takes_it(serves, pipeline, redis_server,
                                                                                bedroom_mp4):
    """(d) First SIGTERM: drain; a second one: the running job goes back to the queue unfinished (not waiting for
    the lease) and ``serve`` exits 0; the next ``serve`` takes it at once and it finishes once."""
    client = RefStreamClient(redis_server.url)
    job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=200)
    first = serves.start(*pipeline)
    _until(lambda: client.status(job)["frames_done"] >= 5, 180, "the job to start", serves)
    first.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, serves.log(0)[-3000:]
    status = client.status(job)
    assert status["state"] == "queued" and status["frames_done"] == 0 and status["deliveries"] == 0, status
    assert client.queue.result(job) is None and "serve.aborting" in serves.log(0)

    second = serves.start(*pipeline)
    status = client.wait(job, timeout_s=300)
    assert status["state"] == "done" and status["deliveries"] == 1 and status["frames_done"] == 200
    assert _counts(client, [job]) == {"submitted": 1, "finished": 1, "lost": 0, "duplicated": 0, "pending": 0,
                                      "lag": 0, "dead": 0}
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0
