"""Faults through the whole service: ``refstream serve`` as a subprocess (its own local Ray), a real
redis-server, the tiny model. Each test takes 30-60 s (two Ray starts), so they are marked slow:
``pytest -m slow tests/test_service_faults.py``.

(a) kill -9 of ``serve`` mid-job: its actors die with it; the next ``serve`` (a fresh local Ray) takes the job
    over after the lease and it finishes exactly once (2 deliveries, one result, one ``done``).
(b) redis-server restarted (AOF on, same port) while ``serve`` works through a batch: every job finishes, none
    lost (all done with a result, nothing pending) and none run to completion twice.
(c) SIGTERM to ``serve`` mid-job: it drains (the job it holds finishes; jobs not taken stay queued) and exits 0;
    the next ``serve`` finishes the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refstream.service.client import RefStreamClient
from refstream.service.metrics import metrics_key
from refstream.service.worker import heartbeats

pytestmark = pytest.mark.slow

REFSTREAM = str(Path(sys.executable).with_name("refstream"))


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Serves:
    """``refstream serve`` subprocesses; remembers every process under them so that none outlives the test
    (a serve killed with -9 leaves its Ray processes to be cleaned up here)."""

    def __init__(self, url: str, root: Path, logs: Path):
        self.url, self.root, self.logs = url, root, logs
        self.procs: list[subprocess.Popen] = []
        self.seen: dict[int, str] = {}

    def start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        log = open(self.logs / f"serve{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            [REFSTREAM, "serve", "--redis-url", self.url, "--model", "tiny", "--device", "cpu", "--workers", "1",
             "--allowed-root", str(self.root), "--lease-ms", "3000", "--metrics-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def snapshot(self) -> None:
        from refstream.bench.service import _descendants

        for proc in self.procs:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                if (start := _start_time(pid)) is not None:
                    self.seen.setdefault(pid, start)

    def log(self, i: int) -> str:
        return (self.logs / f"serve{i}.log").read_text(errors="replace")

    def cleanup(self) -> None:
        self.snapshot()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        time.sleep(0.5)
        for pid, start in self.seen.items():  # only the very processes seen under our serves
            if _start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def serves(redis_server, shared_data, tmp_path):
    s = Serves(redis_server.url, shared_data, tmp_path)
    yield s
    s.cleanup()


def _until(condition, timeout: float, what: str, serves: Serves | None = None, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{serves.log(-1)[-3000:]}" if serves else ""))
        if serves is not None:
            serves.snapshot()
        time.sleep(poll)
    return value


def _counts(client: RefStreamClient, jobs: list[str]) -> dict:
    """Submitted / finished / lost / duplicated, from Redis."""
    r = client.queue.r
    done = [j for j in jobs if client.status(j)["state"] == "done" and r.exists(f"refstream:result:{j}")]
    completions = int(r.hget(metrics_key("refstream"), "job|done|count") or 0)  # one per complete() call
    depth = client.queue.depth()
    print(f"\n{len(jobs)} submitted, {len(done)} finished, {len(jobs) - len(done)} lost, "
          f"{completions - len(done)} duplicated; deliveries {[client.status(j)['deliveries'] for j in jobs]}")
    return {"submitted": len(jobs), "finished": len(done), "lost": len(jobs) - len(done),
            "duplicated": completions - len(done), "pending": depth["pending"], "lag": depth["lag"],
            "dead": len(client.queue.dead_letters())}


def test_serve_killed_mid_job_the_next_serve_finishes_it_once(serves, redis_server, bedroom_mp4):
    client = RefStreamClient(redis_server.url)
    job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=120)
    first = serves.start()
    _until(lambda: client.status(job)["frames_done"] >= 5, 180, "the first serve to start the job", serves)
    serves.snapshot()
    worker_pid = heartbeats(client.queue.r)["worker-0"]["pid"]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    _until(lambda: _start_time(worker_pid) is None, 30, "the worker actor to die with its driver")
    frames_at_kill = client.status(job)["frames_done"]
    assert client.status(job)["state"] == "running" and frames_at_kill < 120

    second = serves.start()
    status = client.wait(job, timeout_s=300)
    assert status["state"] == "done" and status["deliveries"] == 2, serves.log(1)[-3000:]
    assert len(client.queue.result(job)["files"]) == 4
    assert _counts(client, [job]) == {"submitted": 1, "finished": 1, "lost": 0, "duplicated": 0, "pending": 0,
                                      "lag": 0, "dead": 0}
    assert heartbeats(client.queue.r)["worker-0"]["pid"] != worker_pid
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0


def test_redis_restart_mid_run_loses_and_duplicates_nothing(serves, redis_server, blackswan_dir):
    client = RefStreamClient(redis_server.url)
    jobs = [client.submit(str(blackswan_dir), ["the black swan"], max_frames=12, budget=81) for _ in range(8)]
    proc = serves.start()
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


def test_sigterm_drains_the_running_job_and_exits_0(serves, redis_server, bedroom_mp4, blackswan_dir):
    client = RefStreamClient(redis_server.url)
    long_job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=60)
    queued = [client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81) for _ in range(2)]
    first = serves.start()
    _until(lambda: client.status(long_job)["frames_done"] >= 3, 180, "the long job to start", serves)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=180) == 0, serves.log(0)[-3000:]
    state = client.status(long_job)["state"]
    assert state == "done"  # drained: the job it held finished before serve exited
    assert [client.status(j)["state"] for j in queued] == ["queued", "queued"]  # not taken: still queued
    assert "serve.stopping" in serves.log(0) or "stop requested" in serves.log(0)

    second = serves.start()
    _until(lambda: all(client.status(j)["state"] == "done" for j in queued), 180, "the queued jobs", serves)
    assert _counts(client, [long_job, *queued]) == {"submitted": 3, "finished": 3, "lost": 0, "duplicated": 0,
                                                     "pending": 0, "lag": 0, "dead": 0}
    assert [client.status(j)["deliveries"] for j in [long_job, *queued]] == [1, 1, 1]
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0
