"""``refstream serve``: start or join Ray and run a pool of queue workers until SIGTERM/SIGINT.

Each worker is a Ray actor (:class:`refstream.service.worker.QueueWorker`) with ``max_restarts=-1``:
when its process dies, Ray restarts it (the constructor reloads the model) and this supervisor starts
its loop again; the job it held stays pending in Redis and is reclaimed after the lease. On SIGTERM the
supervisor asks every worker to finish its current job and stop (jobs not taken stay queued).
"""

from __future__ import annotations

import signal
import threading
import time


def serve(redis_url: str, *, address: str | None = None, workers: int = 1, model: str = "tiny",
          checkpoint: str | None = None, device: str = "auto", allowed_roots=(), upload_root=None,
          max_upload_bytes: int = 512 * 1024 * 1024, lease_ms: int = 60_000, max_deliveries: int = 3,
          num_gpus: float = 0.0, num_cpus: float = 1.0, stop_event: threading.Event | None = None,
          on_start=None, log=print) -> int:
    """Run the worker pool; returns the number of jobs handled when stopped."""
    import ray
    from ray.exceptions import RayActorError

    from refstream.service.worker import QueueWorker

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, object_store_memory=200 * 1024 * 1024)
    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop_event.set())
    Actor = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2, num_gpus=num_gpus,
                       num_cpus=num_cpus)(QueueWorker)
    actors = [
        Actor.remote(redis_url, model=model, checkpoint=checkpoint, device=device, allowed_roots=list(allowed_roots),
                     upload_root=upload_root, max_upload_bytes=max_upload_bytes, lease_ms=lease_ms,
                     max_deliveries=max_deliveries, name=f"worker-{i}")
        for i in range(workers)
    ]
    if on_start is not None:
        on_start(actors)
    runs = {actor.run.remote(): actor for actor in actors}
    log(f"refstream serve: {workers} worker(s) on {redis_url}")
    handled = 0
    while runs:
        if stop_event.is_set():
            for actor in set(runs.values()):
                try:
                    actor.stop.remote()
                except RayActorError:
                    pass
        ready, _ = ray.wait(list(runs), num_returns=1, timeout=0.5)
        for ref in ready:
            actor = runs.pop(ref)
            try:
                handled += ray.get(ref)
            except RayActorError as exc:
                if stop_event.is_set():
                    continue
                log(f"refstream serve: a worker died ({exc.__class__.__name__}); restarting its loop")
                time.sleep(0.5)
                runs[actor.run.remote()] = actor
                continue
            if not stop_event.is_set():  # run() returned without a stop request: start it again
                runs[actor.run.remote()] = actor
    log(f"refstream serve: stopped after {handled} job(s)")
    return handled
