"""``refstream serve``: start or join Ray and work through the queue until SIGTERM/SIGINT.

Two pipelines:

* ``pools`` (default, :mod:`refstream.service.streaming`): decode / encoder / VideoGLaMM actor pools, frames
  streamed in bounded chunks, masks streamed back with backpressure; coordinator threads in this process
  hold the queue deliveries (``jobs_in_flight`` of them). On SIGTERM every coordinator finishes the job it
  holds and stops.
* ``whole``: each worker is a Ray actor (:class:`refstream.service.worker.QueueWorker`) running whole jobs
  with ``max_restarts=-1``: when its process dies, Ray restarts it (the constructor reloads the model) and
  this supervisor starts its loop again; the job it held stays pending in Redis and is reclaimed after the
  lease. On SIGTERM the supervisor asks every worker to finish its current job and stop (jobs not taken stay
  queued), then exits. The actors are single-threaded (``max_concurrency=1``), so the supervisor never calls
  into a running actor: it asks them to stop through a Redis key (:func:`refstream.service.worker.stop_key`,
  checked by the work loop between jobs).

Actors report liveness in Redis heartbeat hashes (:func:`refstream.service.worker.heartbeats`) and set their
torch threads to their CPUs (``num_cpus``). Without ``address`` a fresh local Ray is started
(``address="local"``), never one left over from an earlier ``serve`` that was killed, and owned by this
``serve`` (:class:`refstream.service.ray_session.LocalRaySession`): on SIGTERM/SIGINT ``serve`` shuts it down
and kills whatever of it is left before it exits 0, and the next ``serve`` kills what a ``serve`` killed with
``kill -9`` left behind. With ``address`` (a cluster of several nodes) the actors are spread over the nodes
(``SPREAD``); when a node dies its actors are restarted by Ray on the nodes left and the jobs they held run
again (see :mod:`refstream.service.streaming`).

With ``metrics_port`` set, the supervisor also serves Prometheus ``/metrics`` (values read from Redis at
each scrape, see :mod:`refstream.service.metrics`). Events are logged on the ``refstream.serve`` logger
(:mod:`refstream.service.logs`); ``log_format`` is passed to the worker actors so they log the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager

from redis.exceptions import RedisError

from refstream.config import load_model_config
from refstream.service.jobs import InputPolicy, JobLimits
from refstream.service.logs import log_event
from refstream.service.metrics import start_metrics_server
from refstream.service.queue import JobQueue, connect
from refstream.service.security import RedisSettings, as_settings
from refstream.service.streaming import serve_pools
from refstream.service.worker import QueueWorker, abort_key, stop_key

logger = logging.getLogger("refstream.serve")
PIPELINES = ("pools", "whole")
STOP_KEY_TTL_S = 24 * 3600  # the stop / abort keys outlive a serve that dies before it deletes them


def serve(redis_url: RedisSettings | str, *, address: str | None = None, workers: int = 1, model: str = "tiny",
          checkpoint: str | None = None, device: str = "auto", allowed_roots=(), upload_root=None,
          max_upload_bytes: int = 512 * 1024 * 1024, lease_ms: int = 60_000, max_deliveries: int = 3,
          num_gpus: float = 0.0, num_cpus: float | None = 1.0, stop_event: threading.Event | None = None,
          on_start=None, log=None, metrics_port: int | None = None, metrics_host: str = "0.0.0.0",
          log_format: str | None = None, log_level: str = "INFO", pipeline: str = "pools", decoders: int = 1,
          encoders: int = 1, jobs_in_flight: int | None = None, encoder_gpus: float = 0.0,
          abort_event: threading.Event | None = None, limits=None, result_ttl_s: int = 7 * 24 * 3600) -> int:
    """Run the worker pool until stopped; returns the number of jobs handled.

    Args:
        redis_url: the queue's Redis: :class:`refstream.service.security.RedisSettings` (URL, password, TLS
            files) or a bare ``redis[s]://[user:password@]host:port/db`` (see
            :func:`refstream.service.queue.connect`); logged with the password masked.
        address: a Ray cluster to join (``auto``, ``ray://host:port``); None starts a fresh local Ray.
            Ignored when Ray is already initialised in this process.
        workers: ``whole``: worker actors; ``pools``: VideoGLaMM actors.
        model: model preset name (``tiny``, ``videoglamm``) or model YAML, loaded by every actor.
        checkpoint: weights folder (None: the preset's, or random weights for ``tiny``).
        device: ``cpu``, ``cuda`` or ``auto`` in the actors.
        allowed_roots: folders job inputs may come from (:class:`refstream.service.jobs.InputPolicy`).
        upload_root: the folder uploaded inputs are copied to (None: no uploads).
        max_upload_bytes: size limit of an uploaded input, bytes.
        lease_ms: a job idle this long (no progress, lease not renewed) is taken over by another worker, ms.
        max_deliveries: deliveries of a job before it goes to the dead letters.
        num_gpus: GPUs per worker actor (``pools``: per VideoGLaMM actor).
        num_cpus: CPUs per worker actor, also its torch threads (None: this machine's cores / ``workers``;
            ``pools``: cores / (``workers`` + ``encoders``)).
        stop_event: set on the first SIGTERM/SIGINT: the jobs held finish, no new job is taken (created
            when None). Signal handlers are installed only when ``serve`` runs in the main thread.
        on_start: ``whole``: called with the list of actor handles once they are created (their heartbeats
            appear in Redis once the model is loaded; do not call their methods: they are busy running the
            loop); ``pools``: called with the :class:`refstream.service.streaming.Pools` once they are up.
        log: optional extra callable receiving each supervisor message as plain text.
        metrics_port: serve ``/metrics`` on this port (0 = a free port; None = no metrics server).
        metrics_host: the address the metrics server binds.
        log_format: ``json``/``text`` logging in the ``whole`` worker actors (None: leave their logging alone).
        log_level: the actors' log level (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``).
        pipeline: ``pools`` (default: decode / encoder / VideoGLaMM actor pools of ``decoders`` / ``encoders`` /
            ``workers``, frames streamed in chunks, ``jobs_in_flight`` jobs at once; see
            :mod:`refstream.service.streaming`) or ``whole`` (each worker actor runs whole jobs,
            :class:`refstream.service.worker.QueueWorker`).
        decoders: ``pools`` only: decode actors.
        encoders: ``pools`` only: CLIP + pruning + InternVideo2 actors.
        jobs_in_flight: ``pools`` only: jobs taken at once (default ``2 * workers``).
        encoder_gpus: ``pools`` only: GPUs per encoder actor.
        abort_event: set on the second signal (after ``stop_event``): the running jobs are handed back to the
            queue unfinished at their next progress report (:meth:`JobQueue.release`); the next ``serve`` takes
            them at once (created when None).
        limits: the largest job taken (:class:`refstream.service.jobs.JobLimits`; None: no limits), published to
            Redis for ``submit`` and checked by the workers before each job.
        result_ttl_s: how long results and job records live after a job ends, seconds.

    Raises:
        ValueError: ``pipeline`` is neither ``pools`` nor ``whole`` (nothing is started).
        ConnectionError: ``address`` names a Ray cluster that cannot be reached (from ``ray.init``).
        redis.exceptions.RedisError: Redis does not answer at start (after the client's retries).
        refstream.errors.ConfigError: ``model`` is neither a preset nor a valid model YAML (before Ray starts);
            ``pools`` on a local Ray whose CPUs or GPUs cannot hold the actors asked
            for (:func:`refstream.service.streaming.check_resources`; the message names the options to lower).
        OSError: the metrics port cannot be bound.
        ray.exceptions.RayActorError: ``pools``: an actor died while loading its model (the pools are checked
            once at start; afterwards dead actors are restarted by Ray).
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be 'whole' or 'pools', got {pipeline!r}")
    load_model_config(model, checkpoint)  # a bad --model fails here (ConfigError, exit 2), not in the actors
    session = _start_ray(address)
    try:
        return _serve(redis_url, session=session, address=address, workers=workers, model=model,
                      checkpoint=checkpoint, device=device, allowed_roots=allowed_roots, upload_root=upload_root,
                      max_upload_bytes=max_upload_bytes, lease_ms=lease_ms, max_deliveries=max_deliveries,
                      num_gpus=num_gpus, num_cpus=num_cpus, stop_event=stop_event, on_start=on_start, log=log,
                      metrics_port=metrics_port, metrics_host=metrics_host, log_format=log_format,
                      log_level=log_level, pipeline=pipeline, decoders=decoders, encoders=encoders,
                      jobs_in_flight=jobs_in_flight, encoder_gpus=encoder_gpus, abort_event=abort_event,
                      limits=limits, result_ttl_s=result_ttl_s)
    finally:
        if session is not None:  # our own local Ray: shut down, and nothing of it left running
            session.close()


def _serve(redis_url, *, session, address, workers, model, checkpoint, device, allowed_roots, upload_root,
           max_upload_bytes, lease_ms, max_deliveries, num_gpus, num_cpus, stop_event, on_start, log, metrics_port,
           metrics_host, log_format, log_level, pipeline, decoders, encoders, jobs_in_flight, encoder_gpus,
           abort_event, limits, result_ttl_s) -> int:
    """:func:`serve` once Ray is up (same arguments)."""
    num_cpus = _actor_cpus(num_cpus, pipeline, workers, encoders)
    stop_event, abort_event = stop_event or threading.Event(), abort_event or threading.Event()
    _handle_signals(stop_event, abort_event)
    note = _notifier(log)
    serve_id = uuid.uuid4().hex[:12]
    redis_url = as_settings(redis_url)
    control = JobQueue(connect(redis_url))
    limits = limits or JobLimits()
    control.publish_limits(limits)  # read by submit: a past-limit job is refused before it is queued
    options = dict(model=model, checkpoint=checkpoint, device=device, lease_ms=lease_ms,
                   max_deliveries=max_deliveries, num_gpus=num_gpus, threads=max(1, int(num_cpus)),
                   result_ttl_s=result_ttl_s)
    if pipeline == "pools":
        with _metrics_server(control, metrics_port, metrics_host, note, workers=lambda: workers):
            handled = serve_pools(
                redis_url, decoders=decoders, encoders=encoders, workers=workers, encoder_gpus=encoder_gpus,
                policy=InputPolicy(allowed_roots, upload_root, max_upload_bytes, limits), num_cpus=min(num_cpus, 0.5),
                stop_event=stop_event, abort_event=abort_event, on_start=on_start, note=note, serve_id=serve_id,
                prefix=control.prefix, jobs_in_flight=jobs_in_flight, **options)
    else:
        actors = _whole_actors(redis_url, control.prefix, serve_id, workers, num_cpus,
                               allowed_roots=list(allowed_roots), upload_root=upload_root, max_upload_bytes=max_upload_bytes,
                               limits=limits, log_format=log_format,
                               log_level=log_level, **options)
        if on_start is not None:
            on_start(actors)
        supervisor = _WholeSupervisor(control, serve_id, stop_event, abort_event, note)
        supervisor.start(actors)
        with _metrics_server(control, metrics_port, metrics_host, note, workers=lambda: len(supervisor.runs)):
            note("serve.started", f"{workers} worker(s) on {redis_url.masked}", workers=workers,
                 redis=redis_url.masked)
            handled = supervisor.run()
    note("serve.stopped", f"stopped after {handled} job(s)", frames=None, workers=0)
    return handled


#: the local Ray's settings for a long-running service (config keys from ray-project/ray,
#: src/ray/common/ray_config_def.h; a cluster joined with ``--address`` keeps its own settings):
#:
#: - no task events (``task_events_report_interval_ms: 0``: workers record and send none). With Ray's default
#:   (events of up to 100,000 tasks kept in the GCS) gcs_server's RSS grew 1.22x from job 50 to job 500 in
#:   ``refstream bench soak``; with at most 2000 tasks kept, 1.10-1.14x (the GCS then counts the dropped
#:   ones); with none, 0.99-1.03x. Lost: ``ray list tasks`` (serve starts Ray without the dashboard anyway).
#: - the object store's memory (200 MiB, below) taken at start (``preallocate_plasma_memory``): the raylet,
#:   where plasma lives, otherwise touches new pages of it as objects come and go, and its RSS grew 1.10-1.16x
#:   over 500 jobs (+3 to +5 MiB, mostly those shared pages); taken at start, 1.006x. The footprint is then
#:   constant from the first job instead of growing towards the same bound (docs/bench_soak.txt, runs 8-11).
RAY_SYSTEM_CONFIG = {"task_events_report_interval_ms": 0, "preallocate_plasma_memory": True}

#: glibc malloc settings for the processes of serve's local Ray (the raylet, the GCS and the actors inherit
#: them; a value already in the environment wins): two arenas instead of 8 per core, and fixed mmap/trim
#: thresholds (glibc otherwise raises them after freeing a large block, and later large blocks stay in the heap
#: when freed). In ``refstream bench soak`` (500 jobs, docs/bench_soak.txt run 7) the decode, encoder and
#: VideoGLaMM actors' RSS fell from 905 / 689 / 622 MiB to 560 / 574 / 553 MiB after job 50, and their growth to
#: job 500 from up to 1.10x to at most 1.06x. glibc's tunables: man 3 mallopt (M_ARENA_MAX, M_MMAP_THRESHOLD,
#: M_TRIM_THRESHOLD).
RAY_PROCESS_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


@contextmanager
def _environment(values: dict[str, str]):
    """Set the variables of ``values`` that are not set yet for the duration of the block (processes started
    inside inherit them), then put the environment back as it was."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _start_ray(address: str | None):
    """Join ``address``, or start a fresh local Ray of our own (never one left behind by a ``serve`` that was
    killed); nothing when Ray is already initialised in this process.

    Returns:
        The :class:`refstream.service.ray_session.LocalRaySession` of a local Ray started here (None
        otherwise): its start reaps the processes left by a ``serve`` that was killed with ``kill -9``, and
        ``serve`` closes it on the way out so that no process of it outlives ``serve``.
    """
    import ray  # lazy: Ray takes seconds to import; the helpers of this module are used without it

    from refstream.service.ray_session import LocalRaySession, reap_dead_sessions

    if ray.is_initialized():
        return None
    if address:
        reap_dead_sessions()  # a local serve killed earlier on this machine leaves nothing behind either
        ray.init(address=address)
        return None
    session = LocalRaySession()
    try:
        with _environment(RAY_PROCESS_ENV):  # Ray's workers start later, from the raylet, which has them
            session.start(include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                          _system_config=RAY_SYSTEM_CONFIG)
    except BaseException:
        session.close()
        raise
    if session.reaped:
        logger.warning("killed the processes left by %d serve(s) that died: %s", len(session.reaped),
                       {token[:8]: pids for token, pids in session.reaped.items()})
    return session


def _actor_cpus(num_cpus: float | None, pipeline: str, workers: int, encoders: int) -> float:
    """CPUs per actor: ``num_cpus``, or this machine's cores shared by the actors that run side by side."""
    if num_cpus is not None:
        return num_cpus
    # whole: the workers run side by side; pools: the encoder and VideoGLaMM actors do (the next job is
    # encoded while the current one is in SAM2), and more torch threads than cores slow both down a lot
    # (refstream bench service on 2 cores: 0.51x in-process with 2 threads per actor, 0.91x with 1)
    sharing = workers if pipeline != "pools" else workers + encoders
    return max(1.0, float((os.cpu_count() or 1) // max(1, sharing)))


def _handle_signals(stop_event: threading.Event, abort_event: threading.Event) -> None:
    """SIGTERM/SIGINT: the first sets ``stop_event`` (drain), the second ``abort_event`` (hand the running jobs
    back to the queue). Only from the main thread (Python allows signal handlers nowhere else)."""
    def on_signal(*_) -> None:
        (abort_event if stop_event.is_set() else stop_event).set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)


def _notifier(log=None):
    """``note(event, message, level=INFO, **fields)``: log on ``refstream.serve`` (and pass the text to ``log``)."""
    def note(event: str, message: str, level: int = logging.INFO, **fields) -> None:
        log_event(logger, event, message, level, **fields)
        if log is not None:
            log(f"refstream serve: {message}")

    return note


@contextmanager
def _metrics_server(control: JobQueue, port: int | None, host: str, note, workers):
    """Serve ``/metrics`` while the block runs (nothing when ``port`` is None)."""
    if port is None:
        yield
        return
    server, bound = start_metrics_server(control, port, host, workers=workers)
    note("metrics.listening", f"metrics on http://{host}:{bound}/metrics", port=bound)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _whole_actors(redis_url: RedisSettings, prefix: str, serve_id: str, workers: int, num_cpus: float, *,
                  num_gpus: float, **worker_options) -> list:
    """``workers`` :class:`QueueWorker` Ray actors (restarted by Ray when they die, one call at a time);
    ``worker_options`` are QueueWorker's (model, checkpoint, device, input policy, queue, logging, threads)."""
    import ray  # lazy: see _start_ray

    Actor = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=1, num_gpus=num_gpus,
                       num_cpus=num_cpus, scheduling_strategy="SPREAD")(QueueWorker)  # one node's loss: fewer die
    return [Actor.remote(redis_url, name=f"worker-{i}", prefix=prefix, serve_id=serve_id, **worker_options)
            for i in range(workers)]


class _WholeSupervisor:
    """The ``whole`` pipeline's supervisor: keeps one ``run()`` loop going on every worker actor until stopped.

    A loop that ends without a stop request, or fails (the actor died: Ray restarts it; or e.g. Redis away),
    is started again. The actors are single-threaded and busy in their loop, so stop and abort requests go
    through Redis keys (:func:`stop_key`, :func:`abort_key`), sent again on the next turn while Redis is away.
    """

    def __init__(self, control: JobQueue, serve_id: str, stop_event: threading.Event,
                 abort_event: threading.Event, note):
        self.control, self.serve_id, self.note = control, serve_id, note
        self.stop_event, self.abort_event = stop_event, abort_event
        self.runs: dict = {}  # run() object ref -> actor
        self.handled = 0
        self.stopping = self.stop_sent = self.abort_sent = False

    def start(self, actors: list) -> None:
        """Start every actor's work loop."""
        for actor in actors:
            self.runs[actor.run.remote()] = actor

    def run(self) -> int:
        """Supervise until every loop has ended after a stop request; returns the jobs handled."""
        import ray  # lazy: see _start_ray

        try:
            while self.runs:
                self._send_requests()
                ready, _ = ray.wait(list(self.runs), num_returns=1, timeout=0.5)
                for ref in ready:
                    self._collect(ref)
        finally:
            self._delete_keys()
        return self.handled

    def _send_requests(self) -> None:
        """Pass the stop and abort requests on to the workers (once each; retried while Redis is away)."""
        if self.abort_event.is_set() and not self.abort_sent:
            # the running jobs see this key at their next progress report and are handed back
            self.abort_sent = self._set_key(abort_key(self.control.prefix, self.serve_id), "abort")
            if self.abort_sent:
                self.note("serve.aborting", "second stop request: running jobs go back to the queue")
        if self.stop_event.is_set():
            if not self.stopping:
                self.stopping = True
                self.note("serve.stopping", "stop requested: workers finish their current job")
            if not self.stop_sent:  # the work loops check this key between jobs
                self.stop_sent = self._set_key(stop_key(self.control.prefix, self.serve_id), "stop")

    def _set_key(self, key: str, what: str) -> bool:
        """Set a request key; False (logged) when Redis does not answer (the next turn tries again)."""
        try:
            self.control.r.set(key, "1", ex=STOP_KEY_TTL_S)
            return True
        except RedisError as exc:
            self.note(f"serve.{what}_retry", f"could not send the {what} request ({exc}); retrying",
                      logging.WARNING, error=str(exc))
            return False

    def _collect(self, ref) -> None:
        """A finished ``run()``: count its jobs, and start the loop again unless stopping."""
        import ray  # lazy: see _start_ray
        from ray.exceptions import RayActorError

        actor = self.runs.pop(ref)
        try:
            self.handled += ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - RayActorError (died) or RayTaskError (e.g. Redis away)
            died = isinstance(exc, RayActorError)
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
            if self.stop_event.is_set():
                self.note("serve.worker_ended", f"a worker {'died' if died else 'loop failed'} while stopping "
                          f"({exc.__class__.__name__}); not restarted", logging.WARNING, error=first)
                return
            self.note("serve.worker_died" if died else "serve.worker_error",
                      f"a worker {'died' if died else 'loop failed'} ({exc.__class__.__name__}); restarting its loop",
                      logging.WARNING, error=first)
            time.sleep(0.5)
            self.runs[actor.run.remote()] = actor
            return
        if not self.stop_event.is_set():  # run() returned without a stop request: start it again
            self.runs[actor.run.remote()] = actor

    def _delete_keys(self) -> None:
        """Remove this serve's stop / abort keys (they expire on their own when Redis does not answer)."""
        try:
            self.control.r.delete(stop_key(self.control.prefix, self.serve_id),
                                  abort_key(self.control.prefix, self.serve_id))
        except RedisError as exc:
            self.note("serve.cleanup_failed", f"could not delete the stop keys ({exc}); they expire in "
                      f"{STOP_KEY_TTL_S} s", logging.WARNING, error=str(exc))
