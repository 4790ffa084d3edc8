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
(``address="local"``), never one left over from an earlier ``serve`` that was killed.

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

from refstream.service.logs import log_event

logger = logging.getLogger("refstream.serve")


def serve(redis_url: str, *, address: str | None = None, workers: int = 1, model: str = "tiny",
          checkpoint: str | None = None, device: str = "auto", allowed_roots=(), upload_root=None,
          max_upload_bytes: int = 512 * 1024 * 1024, lease_ms: int = 60_000, max_deliveries: int = 3,
          num_gpus: float = 0.0, num_cpus: float | None = 1.0, stop_event: threading.Event | None = None,
          on_start=None, log=None, metrics_port: int | None = None, metrics_host: str = "0.0.0.0",
          log_format: str | None = None, log_level: str = "INFO", pipeline: str = "pools", decoders: int = 1,
          encoders: int = 1, jobs_in_flight: int | None = None, encoder_gpus: float = 0.0,
          abort_event: threading.Event | None = None) -> int:
    """Run the worker pool; returns the number of jobs handled when stopped.

    Args:
        metrics_port: serve ``/metrics`` on this port (0 = a free port; None = no metrics server).
        log_format: ``json``/``text`` logging in the worker actors (None: leave their logging alone).
        log: optional extra callable receiving each supervisor message as plain text.
        num_cpus: CPUs per worker actor, also its torch threads (None: this machine's cores / ``workers``;
            pools: cores / (``workers`` + ``encoders``)).
        pipeline: ``pools`` (default: decode / encoder / VideoGLaMM actor pools of ``decoders`` / ``encoders`` /
            ``workers``, frames streamed in chunks, ``jobs_in_flight`` jobs at once; see
            :mod:`refstream.service.streaming`; ``on_start`` then gets the :class:`Pools`) or ``whole`` (each
            worker actor runs whole jobs, :class:`refstream.service.worker.QueueWorker`).
        stop_event: set on the first SIGTERM/SIGINT: the jobs held finish, no new job is taken.
        abort_event: set on the second signal (after ``stop_event``): the running jobs are handed back to the
            queue unfinished at their next progress report (:meth:`JobQueue.release`); the next ``serve`` takes
            them at once.
        jobs_in_flight: ``pools`` only: jobs taken at once (default ``2 * workers``).
        num_gpus: GPUs per worker actor (``pools``: per VideoGLaMM actor); encoder_gpus: ``pools`` only, GPUs per
            encoder actor (CLIP and InternVideo2 run there).
        on_start: called with the list of actor handles once they are created (their heartbeats appear in
            Redis once the model is loaded; do not call their methods: they are busy running the loop).
    """
    import ray
    from ray.exceptions import RayActorError

    from refstream.service.queue import JobQueue, connect
    from refstream.service.worker import QueueWorker, abort_key, stop_key

    def note(event: str, message: str, level: int = logging.INFO, **fields) -> None:
        log_event(logger, event, message, level, **fields)
        if log is not None:
            log(f"refstream serve: {message}")

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # "local": always a fresh Ray of our own, never one left behind by a serve that was killed
            ray.init(address="local", include_dashboard=False, object_store_memory=200 * 1024 * 1024)
    if num_cpus is None:
        # whole: the workers run side by side; pools: the encoder and VideoGLaMM actors do (the next job is
        # encoded while the current one is in SAM2), and more torch threads than cores slow both down a lot
        # (refstream bench service on 2 cores: 0.51x in-process with 2 threads per actor, 0.91x with 1)
        sharing = workers if pipeline != "pools" else workers + encoders
        num_cpus = max(1.0, float((os.cpu_count() or 1) // max(1, sharing)))
    threads = max(1, int(num_cpus))
    stop_event = stop_event or threading.Event()
    abort_event = abort_event or threading.Event()

    def on_signal(*_) -> None:  # first signal: drain; second: hand the running jobs back to the queue
        (abort_event if stop_event.is_set() else stop_event).set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    serve_id = uuid.uuid4().hex[:12]
    control = JobQueue(connect(redis_url))
    if pipeline == "pools":
        from refstream.service.jobs import InputPolicy
        from refstream.service.streaming import serve_pools

        server = None
        if metrics_port is not None:
            from refstream.service.metrics import start_metrics_server

            server, port = start_metrics_server(control, metrics_port, metrics_host, workers=lambda: workers)
            note("metrics.listening", f"metrics on http://{metrics_host}:{port}/metrics", port=port)
        try:
            handled = serve_pools(
                redis_url, decoders=decoders, encoders=encoders, workers=workers, model=model, checkpoint=checkpoint,
                device=device, policy=InputPolicy(allowed_roots, upload_root, max_upload_bytes), lease_ms=lease_ms,
                max_deliveries=max_deliveries, num_gpus=num_gpus, encoder_gpus=encoder_gpus,
                num_cpus=min(num_cpus, 0.5), threads=threads,
                stop_event=stop_event, abort_event=abort_event, on_start=on_start, note=note, serve_id=serve_id,
                prefix=control.prefix,
                jobs_in_flight=jobs_in_flight)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
        note("serve.stopped", f"stopped after {handled} job(s)", frames=None, workers=0)
        return handled
    if pipeline != "whole":
        raise ValueError(f"pipeline must be 'whole' or 'pools', got {pipeline!r}")
    Actor = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=1, num_gpus=num_gpus,
                       num_cpus=num_cpus)(QueueWorker)
    actors = [
        Actor.remote(redis_url, model=model, checkpoint=checkpoint, device=device, allowed_roots=list(allowed_roots),
                     upload_root=upload_root, max_upload_bytes=max_upload_bytes, lease_ms=lease_ms,
                     max_deliveries=max_deliveries, name=f"worker-{i}", log_format=log_format, log_level=log_level,
                     prefix=control.prefix, serve_id=serve_id, threads=threads)
        for i in range(workers)
    ]
    if on_start is not None:
        on_start(actors)
    runs = {actor.run.remote(): actor for actor in actors}
    server = None
    if metrics_port is not None:
        from refstream.service.metrics import start_metrics_server

        server, port = start_metrics_server(control, metrics_port, metrics_host,
                                            workers=lambda: len(runs))
        note("metrics.listening", f"metrics on http://{metrics_host}:{port}/metrics", port=port)
    note("serve.started", f"{workers} worker(s) on {_redact(redis_url)}", workers=workers, redis=_redact(redis_url))
    handled = 0
    stopping = stop_sent = abort_sent = False
    key = stop_key(control.prefix, serve_id)
    try:
        while runs:
            if abort_event.is_set() and not abort_sent:
                try:  # the running jobs see this key at their next progress report and are handed back
                    control.r.set(abort_key(control.prefix, serve_id), "1", ex=24 * 3600)
                    abort_sent = True
                    note("serve.aborting", "second stop request: running jobs go back to the queue")
                except Exception:  # noqa: BLE001 - Redis away: try again on the next turn
                    pass
            if stop_event.is_set():
                if not stopping:
                    stopping = True
                    note("serve.stopping", "stop requested: workers finish their current job")
                if not stop_sent:
                    try:  # the work loops check this key between jobs
                        control.r.set(key, "1", ex=24 * 3600)
                        stop_sent = True
                    except Exception as exc:  # noqa: BLE001 - Redis away: try again on the next turn
                        note("serve.stop_retry", f"could not send the stop request ({exc}); retrying",
                             logging.WARNING, error=str(exc))
            ready, _ = ray.wait(list(runs), num_returns=1, timeout=0.5)
            for ref in ready:
                actor = runs.pop(ref)
                try:
                    handled += ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - RayActorError (died) or RayTaskError (e.g. Redis away)
                    if stop_event.is_set():
                        continue
                    died = isinstance(exc, RayActorError)
                    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
                    note("serve.worker_died" if died else "serve.worker_error",
                         f"a worker {'died' if died else 'loop failed'} ({exc.__class__.__name__}); restarting its loop",
                         logging.WARNING, error=first)
                    time.sleep(0.5)
                    runs[actor.run.remote()] = actor
                    continue
                if not stop_event.is_set():  # run() returned without a stop request: start it again
                    runs[actor.run.remote()] = actor
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        try:
            control.r.delete(key, abort_key(control.prefix, serve_id))
        except Exception:  # noqa: BLE001
            pass
    note("serve.stopped", f"stopped after {handled} job(s)", frames=None, workers=0)
    return handled


def _redact(url: str) -> str:
    """The Redis URL without its password (for logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
