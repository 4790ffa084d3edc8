"""Helpers for the slow tests that run the whole service as subprocesses (``test_service_faults.py``,
``test_service_load.py``): ``refstream serve`` processes that never outlive a test, polling, and the
submitted / finished / lost / duplicated counts read from Redis. No tests here.

Use the ``serves`` fixture in a test module with ``serves = serves_fixture()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refstream.bench.service import _descendants
from refstream.service.client import RefStreamClient
from refstream.service.metrics import metrics_key

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

    def start(self, *extra_args: str) -> subprocess.Popen:
        """Start one ``serve`` (tiny model, CPU, one worker, lease 3 s, no metrics server); ``extra_args`` are
        appended to its command line, e.g. ``"--pipeline", "pools"``. An option given again there replaces the
        default (``"--workers", "2"``, ``"--lease-ms", "10000"``: the last one wins), except ``--allowed-root``,
        which adds a root."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with open(self.logs / f"serve{len(self.procs)}.log", "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [REFSTREAM, "serve", "--redis-url", self.url, "--model", "tiny", "--device", "cpu", "--workers", "1",
                 "--allowed-root", str(self.root), "--lease-ms", "3000", "--metrics-port", "0", *extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def snapshot(self) -> None:
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


def serves_fixture():
    """The ``serves`` fixture (a :class:`Serves` on the test's redis-server, allow-list = the examples folder, logs
    in the test's tmp_path; every process under it is cleaned up after the test)."""

    @pytest.fixture
    def serves(redis_server, examples_dir, tmp_path):
        s = Serves(redis_server.url, examples_dir, tmp_path)
        yield s
        s.cleanup()

    return serves


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
