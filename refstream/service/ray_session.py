"""The local Ray a ``refstream serve`` starts, owned so that none of its processes outlives ``serve``.

``ray.init(address="local")`` starts a GCS, a raylet, a dashboard process, a log monitor, the dashboard and
runtime-env agents and the actors' worker processes. Killed with ``kill -9``, ``serve`` cannot stop them: the
GCS and raylet die with it (Ray ties them to the driver), but the agents and actor processes stay (measured:
the dashboard and runtime-env agents survive a ``kill -9`` of ``serve``, and the actors survive a clean exit
for seconds). :class:`LocalRaySession` therefore

* marks every process of the session: ``serve`` sets :data:`MARKER_ENV` to a fresh token in its environment
  before starting Ray, and every Ray process inherits it (GCS, raylet, agents, workers). The agents rename
  themselves (``setproctitle``), which blanks their ``/proc/<pid>/environ``, so the marker alone misses them;
* records the session in a state file ``<state dir>/serve-<token>.json`` (owner pid and its start time, the
  token, Ray's session folder, and the pids with their start times of every process under ``serve``,
  rewritten every :data:`RECORD_EVERY_S` seconds while it changes), in a folder of its own
  (:func:`state_dir`: ``$REFSTREAM_STATE_DIR``, else ``<tmp>/refstream-<uid>/serve``, mode 0700);
* on :meth:`~LocalRaySession.close` (``serve`` stopped by SIGTERM/SIGINT or returning) shuts Ray down, then
  kills whatever still carries the token, and removes the state file;
* before starting, reaps the sessions of dead owners (:func:`reap_dead_sessions`): a state file whose owner
  pid is gone (or reused: the start time differs) has every process it recorded (same pid and start time)
  and every process carrying its token killed (SIGKILL), and the file removed.

Processes are found only by what this module recorded (pid + start time) or wrote into their environment (the
token, ``/proc/<pid>/environ``, readable for processes of the same user), never by name: other Ray clusters on
the machine are never touched.
Linux only (``/proc``); elsewhere nothing is reaped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("refstream.serve")

MARKER_ENV = "REFSTREAM_SERVE_SESSION"
STATE_DIR_ENV = "REFSTREAM_STATE_DIR"
RECORD_EVERY_S = 2.0  # how often a live serve rewrites the pids of its session in its state file


def _remove_if_empty(folder: Path) -> None:
    """Remove the state folder (and the default one's ``refstream-<uid>`` parent) when nothing is left in it:
    a serve that stopped cleanly leaves no temp folder behind (``refstream bench soak`` checks). Another
    serve's state file keeps it; a race with a serve creating its file is harmless (it makes the folder again)."""
    for path in (folder, folder.parent if folder.parent.name == f"refstream-{os.getuid()}" else None):
        if path is None:
            return
        try:
            path.rmdir()
        except OSError:  # not empty (another serve's state), or gone
            return


def state_dir(folder: str | os.PathLike | None = None) -> Path:
    """The folder of the session state files: ``folder``, else ``$REFSTREAM_STATE_DIR``, else
    ``<tmp>/refstream-<uid>/serve``; created with mode 0700 (it names processes to kill)."""
    path = Path(folder or os.environ.get(STATE_DIR_ENV) or Path(tempfile.gettempdir()) / f"refstream-{os.getuid()}"
                / "serve")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None when it is gone:
    with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(root: int) -> dict[int, str]:
    """Every process under ``root`` (``/proc`` parent links) -> its :func:`start_time`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, str] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if (start := start_time(child)) is not None:
                out[child] = start
            stack.append(child)
    return out


def _alive(recorded: dict) -> list[int]:
    """The pids of ``{pid: start time}`` still running as the same process (not a reused pid)."""
    return [int(pid) for pid, start in recorded.items() if start is not None and start_time(int(pid)) == start]


def session_pids(token: str) -> list[int]:
    """Pids of the processes whose environment holds ``MARKER_ENV=token`` (this process left out)."""
    needle = f"{MARKER_ENV}={token}".encode()
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's process
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_session(token: str, recorded: dict | None = None, grace_s: float = 0.0) -> list[int]:
    """Kill every process carrying ``token`` and every process of ``recorded`` (``{pid: start time}``) still
    running: SIGTERM and up to ``grace_s`` seconds to exit when ``grace_s`` > 0, then SIGKILL (repeated while
    new ones appear, e.g. a worker started meanwhile). Returns the pids hit."""
    recorded = recorded or {}

    def targets() -> list[int]:
        return sorted(set(session_pids(token)) | set(_alive(recorded)))

    hit: list[int] = []
    if grace_s > 0:
        pids = targets()
        _signal(pids, signal.SIGTERM)
        hit += pids
        deadline = time.monotonic() + grace_s
        while targets() and time.monotonic() < deadline:
            time.sleep(0.1)
    for _ in range(20):
        pids = targets()
        if not pids:
            break
        _signal(pids, signal.SIGKILL)
        hit += [p for p in pids if p not in hit]
        time.sleep(0.1)
    return hit


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:  # already gone
            pass


def reap_dead_sessions(folder: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """Kill the processes left by ``serve`` processes that died without cleaning up (``kill -9``), and remove
    their state files; sessions whose owner is alive are left alone. Returns ``{token: pids killed}``."""
    reaped: dict[str, list[int]] = {}
    for path in sorted(state_dir(folder).glob("serve-*.json")):
        try:
            state = json.loads(path.read_text())
            token, owner, owner_start = state["token"], int(state["owner_pid"]), state["owner_start"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable serve state file %s (%s); left alone", path, exc)
            continue
        if owner_start is not None and start_time(owner) == owner_start:
            continue  # its serve is alive
        reaped[token] = kill_session(token, state.get("pids") or {})
        path.unlink(missing_ok=True)
        if reaped[token]:
            log.warning("killed %d process(es) left by a serve (pid %s) that died: %s", len(reaped[token]), owner,
                        state.get("session_dir") or token)
    return reaped


class LocalRaySession:
    """A local Ray started by this process and owned by it (see the module docstring).

    Args:
        folder: the state folder (default :func:`state_dir`).

    Use :meth:`start` once, :meth:`close` at the end (also safe when :meth:`start` failed half-way).
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = state_dir(folder)
        self.token = uuid.uuid4().hex
        self.path = self.folder / f"serve-{self.token}.json"
        self.session_dir: str | None = None
        self.reaped: dict[str, list[int]] = {}
        self.pids: dict[int, str] = {}  # every process seen under this one, with its start time
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._recorder: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            data = {"token": self.token, "owner_pid": os.getpid(), "owner_start": start_time(os.getpid()),
                    "session_dir": self.session_dir, "started": time.time(),
                    "pids": {str(pid): start for pid, start in self.pids.items()}}
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # a closing serve may remove it
            tmp = self.path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)

    def record(self) -> bool:
        """Add the processes now under this one to the state file (True when there were new ones)."""
        now = descendants(os.getpid())
        new = {pid: start for pid, start in now.items() if self.pids.get(pid) != start}
        if new and not self._closed.is_set():
            self.pids.update(new)
            self._write()
        return bool(new)

    def _record_loop(self) -> None:
        while not self._closed.wait(RECORD_EVERY_S):
            try:
                self.record()
            except OSError as exc:  # e.g. the state folder removed: the token still marks the processes
                log.warning("could not record the Ray session's processes in %s (%s)", self.path, exc)

    def start(self, **init_kwargs) -> None:
        """Reap dead serves' sessions, mark this process's environment, record the session, then
        ``ray.init(address="local", **init_kwargs)`` and keep recording its processes."""
        import ray  # lazy: Ray takes seconds to import

        self.reaped = reap_dead_sessions(self.folder)
        os.environ[MARKER_ENV] = self.token  # inherited by every process Ray starts from here
        self._write()  # before Ray starts: a serve killed during ray.init is reaped too
        ray.init(address="local", **init_kwargs)
        try:
            self.session_dir = ray._private.worker._global_node.get_session_dir_path()
        except AttributeError:  # private API moved: the token and the pids identify the processes
            self.session_dir = None
        self.record()
        self._write()
        self._recorder = threading.Thread(target=self._record_loop, daemon=True, name="refstream-ray-session")
        self._recorder.start()

    def close(self, grace_s: float = 3.0) -> list[int]:
        """Shut Ray down, kill what is left of the session (SIGTERM, then SIGKILL after ``grace_s``), remove the
        state file. Returns the pids that had to be killed."""
        import ray  # lazy: see start

        try:
            self.record()  # the workers started since the last turn
        except OSError:
            pass
        self._closed.set()
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            left = kill_session(self.token, {**self.pids, **descendants(os.getpid())}, grace_s=grace_s)
            if os.environ.get(MARKER_ENV) == self.token:
                del os.environ[MARKER_ENV]
            self.path.unlink(missing_ok=True)
            _remove_if_empty(self.path.parent)
        if left:
            log.debug("killed %d Ray process(es) left after ray.shutdown()", len(left))
        return left
