"""Service workers: run queued jobs with the RefStream pipeline, as Ray actors.

Each :class:`QueueWorker` loads the model once and loops on :meth:`JobQueue.work`: take a job (new, or
abandoned past its lease by a dead worker), check its input against the allow-list, run it exactly as
``refstream run`` does, and store the four output files in the result. Ray restarts a crashed actor
(``max_restarts``); the job it held stays pending in Redis and is taken over after the lease, so a job
survives the death of its worker, of ``refstream serve`` itself, or a Redis restart (AOF on).

The actors are single-threaded (``max_concurrency=1``): nothing calls into an actor while it runs a job.
The supervisor talks to its workers through Redis instead:

* **stop**: ``serve`` sets ``{prefix}:serve:{serve_id}:stop`` (:func:`stop_key`); the work loop checks it
  between jobs. On a second signal ``serve`` also sets :func:`abort_key`: the running job is handed back to the
  queue at its next progress report (:meth:`refstream.service.queue.JobQueue.release`) (one ``EXISTS`` per loop turn, at most every ``block_ms``), finishes the job it holds and returns.
* **heartbeat**: each worker keeps a hash ``{prefix}:worker:{name}`` (:func:`heartbeat_key`) with its ``pid``,
  ``host``, ``node`` (Ray node id), ``device``, torch ``threads``, ``handled`` (jobs taken), ``state`` (idle/running/stopped), ``input`` (of the running job)
  and ``beat`` (Unix time of the last beat: every loop turn and on job progress, at most once a second). The
  hash expires :data:`HEARTBEAT_TTL_S` after the last beat, so a dead worker's record goes away;
  :func:`heartbeats` reads them all (:mod:`refstream.service.heartbeat`).

Redis errors in the stop check, the abort flag and the heartbeats never fail a job: each is logged
(``worker.redis_away`` / ``heartbeat.failed``, warning level) and tried again on the next turn.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time

import torch
from redis.exceptions import RedisError

from refstream.api import load
from refstream.pipeline import run_to_folder
from refstream.service.heartbeat import HEARTBEAT_EVERY_S, HEARTBEAT_TTL_S, heartbeat_key
from refstream.service.heartbeat import heartbeats  # noqa: F401 - re-exported: refstream.service.worker.heartbeats
from refstream.service.jobs import InputPolicy, JobRequest
from refstream.service.logs import configure_logging, log_event
from refstream.service.queue import JobQueue, LeaseKeeper, connect
from refstream.service.results import OUTPUT_FILES, pack_outputs
from refstream.service.results import write_result  # noqa: F401 - re-exported: refstream.service.worker.write_result
from refstream.service.security import RedisSettings

log = logging.getLogger("refstream.worker")

__all__ = ["OUTPUT_FILES", "HEARTBEAT_EVERY_S", "HEARTBEAT_TTL_S", "HeartbeatThread", "QueueWorker", "RedisFlag",
           "abort_key", "heartbeat_key", "heartbeats", "run_job", "stop_key", "write_result"]


def stop_key(prefix: str, serve_id: str) -> str:
    """The Redis key that asks the workers of one ``serve`` process to stop between jobs."""
    return f"{prefix}:serve:{serve_id}:stop"


def abort_key(prefix: str, serve_id: str) -> str:
    """The Redis key that asks the workers of one ``serve`` process to hand their running job back now."""
    return f"{prefix}:serve:{serve_id}:abort"


class RedisFlag:
    """``is_set()`` of a Redis key's existence, read at most every ``every_s`` seconds (False if Redis is away).

    Used as :class:`refstream.service.queue.LeaseKeeper`'s ``abort`` in worker actors, which cannot share an
    in-process event with ``serve``.
    """

    def __init__(self, client, key: str, every_s: float = 0.5):
        self.client, self.key, self.every_s = client, key, every_s
        self._value, self._read_at = False, 0.0

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._value and now - self._read_at >= self.every_s:
            self._read_at = now
            try:
                self._value = bool(self.client.exists(self.key))
            except RedisError as exc:
                log_event(log, "worker.redis_away", f"could not read {self.key} ({exc}); reading it again in "
                          f"{self.every_s:g} s", logging.WARNING, error=str(exc))
        return self._value


def ray_node_id() -> str | None:
    """This process's Ray node id (hex) when it runs in Ray (an actor, or a driver), else None; Ray is not
    imported for it."""
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - e.g. a Ray client session: no node id, the heartbeat goes on without
        return None


class HeartbeatThread:
    """Beats for an actor that is busy in one long call (the pool actors of ``serve --pipeline pools``).

    A daemon thread writes the hash :func:`heartbeat_key` ``(prefix, name)`` every ``every_s`` seconds with
    ``name``, ``pid``, ``host``, ``node`` (the Ray node id, :func:`ray_node_id`; absent outside Ray), ``beat``,
    ``started`` and whatever ``fields()`` returns (e.g. ``role``,
    ``state``, ``input``, ``handled``, ``device``, ``threads``); the hash expires :data:`HEARTBEAT_TTL_S` after
    the last beat. A Redis error is logged (``heartbeat.failed``) and the next beat tries again: a heartbeat
    never fails a job.

    Args:
        redis_url: the queue's Redis (:class:`refstream.service.security.RedisSettings` or a URL); prefix: the queue's key prefix; name: the record's name.
        fields: called at each beat (from the beat thread), returns str/int/float values.
    """

    def __init__(self, redis_url: RedisSettings | str, prefix: str, name: str, fields, every_s: float = HEARTBEAT_EVERY_S):
        self.r = connect(redis_url)
        self.key, self.name, self.fields, self.every_s = heartbeat_key(prefix, name), name, fields, every_s
        self.started = time.time()
        self.node = ray_node_id()
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{name}")
        self._thread.start()

    def beat(self) -> None:
        """Write the record now."""
        try:
            record = {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(), "beat": time.time(),
                      "started": self.started, **({"node": self.node} if self.node else {}),
                      **{k: v for k, v in self.fields().items() if v is not None}}
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(self.key, mapping=record)
            pipe.expire(self.key, HEARTBEAT_TTL_S)
            pipe.execute()
        except RedisError as exc:
            log_event(log, "heartbeat.failed", f"{self.name}: heartbeat not written ({exc}); the next beat tries "
                      "again", logging.WARNING, consumer=self.name, error=str(exc))

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()

    def stop(self) -> None:
        """Stop beating (the record expires on its own)."""
        self._stop.set()


def run_job(pipeline, policy: InputPolicy, request: JobRequest, progress) -> dict:
    """Run one job and return the result: the ``refstream run`` output files, base64-encoded.

    Raises:
        RefStreamError subclasses for bad input (the queue fails the job at once, no retries).
    """
    path = policy.admit(request)  # allowed roots and the job limits, before anything runs
    options = request  # a JobRequest is the job's refstream.options.JobOptions, validated when it was parsed
    done = {"frames": 0, "last": 0.0}

    def on_frames(index, frame, masks):
        done["frames"] = index + 1
        now = time.monotonic()
        if now - done["last"] > 0.5:  # progress (and lease renewal) twice a second at most
            done["last"] = now
            progress(frames_done=done["frames"])

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="refstream-job-") as tmp:
        summary = run_to_folder(path, options, tmp, progress=False, pipeline=pipeline, on_frames=on_frames,
                                on_open=lambda source: progress(frames_done=0, frames_total=_total(source, request)))
        files = pack_outputs(tmp)
    progress(frames_done=summary["frames"], frames_total=summary["frames"], stages=summary["stage_seconds"])
    return {"summary": summary, "files": files, "seconds": time.perf_counter() - started}


def _total(source, request: JobRequest) -> int:
    frames = len(range(0, source.num_frames, request.stride))
    return min(frames, request.max_frames) if request.max_frames else frames


class QueueWorker:
    """One worker: a model loaded once and a loop over the queue (plain class; wrapped as a Ray actor).

    Args:
        redis_url: the queue's Redis (:class:`refstream.service.security.RedisSettings` or a URL).
        model: model preset or YAML; checkpoint: weights folder; device: cpu/cuda/auto.
        allowed_roots, upload_root, max_upload_bytes: the input policy.
        lease_ms, max_deliveries, result_ttl_s: queue settings (see :class:`JobQueue`).
        log_format: ``json`` or ``text`` to configure the ``refstream`` loggers in this (actor) process;
            None leaves logging as it is (in-process use).
        prefix: the queue's key prefix.
        serve_id: the ``serve`` process this worker belongs to; the loop stops when that process sets
            :func:`stop_key` (None: only :meth:`stop` stops it).
        threads: torch intra-op threads in this process (None: leave torch's setting; ``serve`` passes the
            actor's CPUs).
        limits: the largest job taken (:class:`refstream.service.jobs.JobLimits`; None: no limits), checked
            before each job runs.
    """

    def __init__(self, redis_url: RedisSettings | str, model: str = "tiny", checkpoint: str | None = None, device: str = "auto",
                 allowed_roots=(), upload_root=None, max_upload_bytes: int = 512 * 1024 * 1024,
                 lease_ms: int = 60_000, max_deliveries: int = 3, result_ttl_s: int = 7 * 24 * 3600,
                 name: str = "worker", log_format: str | None = None, log_level: str = "INFO",
                 prefix: str = "refstream", serve_id: str | None = None, threads: int | None = None,
                 limits=None):
        if log_format is not None:
            configure_logging(log_format, log_level)
        if threads:
            torch.set_num_threads(int(threads))
        started = time.perf_counter()
        self.name = name
        self.queue = JobQueue(connect(redis_url), prefix=prefix, lease_ms=lease_ms, max_deliveries=max_deliveries,
                              result_ttl_s=result_ttl_s)
        self.stop_key = stop_key(prefix, serve_id) if serve_id else None
        self.abort = RedisFlag(self.queue.r, abort_key(prefix, serve_id)) if serve_id else None
        self.heartbeat_key = heartbeat_key(prefix, name)
        self._beat_at = 0.0
        self._state, self._job = "idle", ""
        self.policy = InputPolicy(allowed_roots, upload_root, max_upload_bytes, limits)
        self.pipeline = load(model, checkpoint=checkpoint, device=device).pipeline
        self._stop = False
        self.handled = 0
        self._started = time.time()
        self._node = ray_node_id()
        self.beat(force=True)
        log_event(log, "worker.ready", f"model {model} loaded on {self.pipeline.device}",
                  consumer=name, seconds=time.perf_counter() - started)

    def health(self) -> dict:
        """Liveness: the worker's name, pid, jobs handled, torch threads, and whether Redis answers.

        A method call: on a Ray actor it waits for the running job (actors run one call at a time); read the
        heartbeat (:func:`heartbeats`) for the state of a busy worker.
        """
        return {"name": self.name, "pid": os.getpid(), "handled": self.handled, "threads": torch.get_num_threads(),
                "device": str(self.pipeline.device), "redis": bool(self.queue.r.ping())}

    def beat(self, force: bool = False, pipe=None) -> None:
        """Write the heartbeat hash (at most every :data:`HEARTBEAT_EVERY_S` unless ``force``)."""
        now = time.time()
        if not force and now - self._beat_at < HEARTBEAT_EVERY_S:
            return
        self._beat_at = now
        own = pipe is None
        pipe = self.queue.r.pipeline(transaction=False) if own else pipe
        pipe.hset(self.heartbeat_key, mapping={
            "name": self.name, "role": "worker", "pid": os.getpid(), "host": socket.gethostname(),
            "device": str(self.pipeline.device),
            "threads": torch.get_num_threads(), "handled": self.handled, "state": self._state, "input": self._job,
            "beat": now, "started": self._started, **({"node": self._node} if self._node else {})})
        pipe.expire(self.heartbeat_key, HEARTBEAT_TTL_S)
        if own:
            pipe.execute()

    def _should_stop(self) -> bool:
        """The work loop's ``stop``: beat, and check the supervisor's stop key (one round trip)."""
        if self._stop:
            return True
        try:
            pipe = self.queue.r.pipeline(transaction=False)
            self.beat(pipe=pipe)
            if self.stop_key:
                pipe.exists(self.stop_key)
            replies = pipe.execute()
            if self.stop_key and replies and replies[-1]:
                self._stop = True
        except RedisError as exc:  # Redis away: keep going, take() waits for it (with its retries)
            log_event(log, "worker.redis_away", f"stop check and heartbeat failed ({exc}); going on",
                      logging.WARNING, consumer=self.name, error=str(exc))
        return self._stop

    def run(self, max_jobs: int | None = None, block_ms: int = 500) -> int:
        """Work until :meth:`stop`, the stop key (or ``max_jobs``); returns the jobs handled by this call."""
        try:
            return self.queue.work(self.name, self._handle, stop=self._should_stop, block_ms=block_ms,
                                   max_jobs=max_jobs)
        finally:  # a last beat: the loop is over (stopped) or waits for the next run() call (idle)
            self._state = "stopped" if self._stop else "idle"
            try:
                self.beat(force=True)
            except RedisError as exc:  # Redis away: the heartbeat expires on its own
                log_event(log, "heartbeat.failed", f"last heartbeat not written ({exc})", logging.WARNING,
                          consumer=self.name, error=str(exc))

    def _handle(self, request: JobRequest, progress) -> dict:
        """The queue handler: run one job with its lease renewed while a stage runs long without frame progress
        (e.g. CLIP on a CPU), beating on each progress report."""
        job_id = getattr(progress, "job_id", None)

        def beating_progress(**kwargs) -> None:
            progress(**kwargs)
            try:
                self.beat()
            except RedisError as exc:  # a heartbeat never fails a job
                log_event(log, "heartbeat.failed", f"heartbeat not written ({exc})", logging.WARNING,
                          job_id=job_id, consumer=self.name, error=str(exc))

        self.handled += 1
        self._state, self._job = "running", getattr(request, "input", "")
        try:
            with LeaseKeeper(beating_progress, self.queue.lease_ms / 3000, abort=self.abort, job_id=job_id) as keeper:
                return run_job(self.pipeline, self.policy, request, keeper)
        finally:
            self._state, self._job = "idle", ""

    def stop(self) -> None:
        """Finish the current job, then leave the loop (jobs not taken stay queued for others)."""
        self._stop = True
