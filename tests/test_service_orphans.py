"""No orphans: a ``refstream serve`` that started its own local Ray leaves no process of that Ray session behind,
neither after ``kill -9`` (the next ``serve`` kills what is left once it starts) nor after SIGTERM (it exits 0
with none left).

Processes are identified only by what this test recorded: the pids (with their start times) under the serve it
started, and the session token ``serve`` wrote into their environment; never by name (other Ray clusters run on
this machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from service_procs import REFSTREAM, _start_time, _until

from refstream.bench.service import _descendants
from refstream.service.ray_session import MARKER_ENV, STATE_DIR_ENV, session_pids


class _Serve:
    """A ``refstream serve`` subprocess on a local Ray of its own (whole pipeline, one worker: quick to start),
    its state files in ``state``; :meth:`pids` lists every process under it with its start time."""

    def __init__(self, url: str, root: Path, state: Path, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", MARKER_ENV)}
        env[STATE_DIR_ENV] = str(state)
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [REFSTREAM, "serve", "--redis-url", url, "--model", "tiny", "--device", "cpu", "--pipeline", "whole",
                 "--workers", "1", "--allowed-root", str(root), "--metrics-port", "0"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_started(self, timeout: float = 180) -> None:
        _until(lambda: "serve.started" in self.log.read_text(errors="replace") or self.proc.poll() is not None,
               timeout, "serve to start")
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]

    def pids(self) -> dict[int, str]:
        return {pid: start for pid in _descendants(self.proc.pid) if (start := _start_time(pid)) is not None}


def _alive(seen: dict[int, str]) -> list[int]:
    """The processes of ``seen`` still running (same pid and start time: not a reused pid)."""
    return [pid for pid, start in seen.items() if _start_time(pid) == start]


def _kill(seen: dict[int, str]) -> None:
    for pid in _alive(seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def serve_env(redis_server, examples_dir, tmp_path):
    """Start serves; every process seen under them is killed after the test (only those very processes)."""
    started: list[_Serve] = []
    seen: dict[int, str] = {}

    def start(name: str) -> _Serve:
        serve = _Serve(redis_server.url, examples_dir, tmp_path / "state", tmp_path / f"{name}.log")
        started.append(serve)
        return serve

    def remember(serve: _Serve) -> dict[int, str]:
        pids = serve.pids()
        seen.update(pids)
        return pids

    yield start, remember
    for serve in started:
        seen.update(serve.pids())
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait(timeout=10)
    _kill(seen)


def _ray_session(pids: dict[int, str]) -> dict[int, str]:
    """The processes of a serve's Ray (the raylet, GCS, agents, workers): those carrying its session token."""
    tokens = set()
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        tokens |= {e.split(b"=", 1)[1].decode() for e in environ if e.startswith(MARKER_ENV.encode() + b"=")}
    assert len(tokens) == 1, tokens
    marked = set(session_pids(tokens.pop()))
    return {pid: start for pid, start in pids.items() if pid in marked}


@pytest.mark.slow
def test_kill_9_of_serve_leaves_nothing_once_the_next_serve_is_up(serve_env, tmp_path):
    start, remember = serve_env
    first = start("first")
    first.wait_started()
    _until(lambda: len(first.pids()) >= 6, 60, "serve's Ray processes (GCS, raylet, agents, the worker actor)")
    before = remember(first)
    session = _ray_session(before)
    print(f"\nfirst serve pid {first.proc.pid}: {len(before)} processes under it, {len(session)} of its Ray session")
    assert len(session) >= 5  # gcs_server, raylet, dashboard + runtime-env agents, the worker actor, ...
    state_files = list((tmp_path / "state").glob("serve-*.json"))
    assert len(state_files) == 1 and json.loads(state_files[0].read_text())["owner_pid"] == first.proc.pid

    first.proc.kill()  # kill -9: no cleanup of its own
    first.proc.wait(timeout=10)
    time.sleep(2)
    left = _alive(before)
    print(f"after kill -9: {len(left)} of its processes still alive")
    assert left  # what this test is about: Ray's agents outlive a serve killed with -9

    second = start("second")
    second.wait_started()
    still = _alive(before)
    print(f"once the next serve is up: {len(still)} alive")
    assert still == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in still]
    assert "killed the processes left by 1 serve(s) that died" in second.log.read_text(errors="replace")
    assert [p.name for p in (tmp_path / "state").glob("serve-*.json")] != [state_files[0].name]


@pytest.mark.slow
def test_sigterm_exits_0_and_leaves_no_process_of_its_ray(serve_env, tmp_path):
    start, remember = serve_env
    serve = start("serve")
    serve.wait_started()
    _until(lambda: len(serve.pids()) >= 6, 60, "serve's Ray processes")
    before = remember(serve)
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=60) == 0
    left = _alive(before)
    print(f"\nSIGTERM: exit 0, {len(before)} processes before, {len(left)} left")
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]
    assert not (tmp_path / "state").exists()  # its state file and the emptied folder: no temp files left


def test_reap_kills_only_what_a_dead_owner_recorded_or_marked(tmp_path):
    """Quick, no Ray: a dead owner's recorded process and its marked one are killed, its state file removed; a
    live owner's session and an unrelated process are left alone."""
    from refstream.service.ray_session import reap_dead_sessions, start_time

    def sleeper(token: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        if token:
            env[MARKER_ENV] = token
        return subprocess.Popen(["sleep", "60"], env=env)

    dead_owner = subprocess.Popen(["sleep", "60"])
    dead_start = _start_time(dead_owner.pid)
    recorded, marked, unrelated, live_marked = sleeper(), sleeper("deadtoken"), sleeper(), sleeper("livetoken")
    procs = [dead_owner, recorded, marked, unrelated, live_marked]
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "serve-deadtoken.json").write_text(json.dumps({
            "token": "deadtoken", "owner_pid": dead_owner.pid, "owner_start": dead_start,
            "pids": {str(recorded.pid): _start_time(recorded.pid), str(unrelated.pid): "1"}}))  # "1": a reused pid
        (state / "serve-livetoken.json").write_text(json.dumps({
            "token": "livetoken", "owner_pid": os.getpid(), "owner_start": start_time(os.getpid()), "pids": {}}))
        dead_owner.kill()
        dead_owner.wait()
        reaped = reap_dead_sessions(state)
        assert sorted(reaped["deadtoken"]) == sorted([recorded.pid, marked.pid]) and "livetoken" not in reaped
        assert recorded.wait(timeout=5) == -signal.SIGKILL and marked.wait(timeout=5) == -signal.SIGKILL
        assert unrelated.poll() is None and live_marked.poll() is None
        assert [p.name for p in state.iterdir()] == ["serve-livetoken.json"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_state_folder_is_removed_once_empty_and_kept_while_another_serve_has_a_file(tmp_path):
    from refstream.service.ray_session import _remove_if_empty, state_dir

    root = tmp_path / f"refstream-{os.getuid()}"
    folder = state_dir(root / "serve")
    (folder / "serve-other.json").write_text("{}")
    _remove_if_empty(folder)
    assert (folder / "serve-other.json").is_file()  # another serve's state: kept
    (folder / "serve-other.json").unlink()
    _remove_if_empty(folder)
    assert not folder.exists() and not root.exists()  # the default layout's refstream-<uid> parent goes too
    plain = state_dir(tmp_path / "custom")
    _remove_if_empty(plain)
    assert not plain.exists() and tmp_path.exists()  # a parent of another name is never touched
