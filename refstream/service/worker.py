"""Service workers: run queued jobs with the RefStream pipeline, as Ray actors.

Each :class:`QueueWorker` loads the model once and loops on :meth:`JobQueue.work`: take a job (new, or
abandoned past its lease by a dead worker), check its input against the allow-list, run it exactly as
``refstream run`` does, and store the four output files in the result. Ray restarts a crashed actor
(``max_restarts``); the job it held stays pending in Redis and is taken over after the lease, so a job
survives the death of its worker, of ``refstream serve`` itself, or a Redis restart (AOF on).
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path

from refstream.service.jobs import InputPolicy, JobRequest

OUTPUT_FILES = ("masks.json", "summary.json", "tokens.png", "overlay.mp4")


def run_job(pipeline, policy: InputPolicy, request: JobRequest, progress) -> dict:
    """Run one job and return the result: the ``refstream run`` output files, base64-encoded.

    Raises:
        RefStreamError subclasses for bad input (the queue fails the job at once, no retries).
    """
    from refstream.pipeline import RunOptions, run_to_folder

    path = policy.check(request.input)
    options = RunOptions(
        expressions=list(request.expressions), model=pipeline.config.name, method=request.method,
        variant=request.variant, budget=request.budget, placement=request.placement, frames=request.frames,
        stride=request.stride, max_frames=request.max_frames, clip_text=request.clip_text, answer=request.answer,
    )
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
        files = {name: base64.b64encode((Path(tmp) / name).read_bytes()).decode("ascii") for name in OUTPUT_FILES}
    progress(frames_done=summary["frames"], frames_total=summary["frames"], stages=summary["stage_seconds"])
    return {"summary": summary, "files": files, "seconds": time.perf_counter() - started}


def _total(source, request: JobRequest) -> int:
    frames = len(range(0, source.num_frames, request.stride))
    return min(frames, request.max_frames) if request.max_frames else frames


def write_result(result: dict, out: str | Path) -> list[Path]:
    """Unpack a job result into ``out``: the same files ``refstream run`` writes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in result["files"].items():
        path = out / name
        path.write_bytes(base64.b64decode(data))
        written.append(path)
    return written


class QueueWorker:
    """One worker: a model loaded once and a loop over the queue (plain class; wrapped as a Ray actor).

    Args:
        redis_url: the queue's Redis URL.
        model: model preset or YAML; checkpoint: weights folder; device: cpu/cuda/auto.
        allowed_roots, upload_root, max_upload_bytes: the input policy.
        lease_ms, max_deliveries, result_ttl_s: queue settings (see :class:`JobQueue`).
        log_format: ``json`` or ``text`` to configure the ``refstream`` loggers in this (actor) process;
            None leaves logging as it is (in-process use).
    """

    def __init__(self, redis_url: str, model: str = "tiny", checkpoint: str | None = None, device: str = "auto",
                 allowed_roots=(), upload_root=None, max_upload_bytes: int = 512 * 1024 * 1024,
                 lease_ms: int = 60_000, max_deliveries: int = 3, result_ttl_s: int = 7 * 24 * 3600,
                 name: str = "worker", log_format: str | None = None, log_level: str = "INFO"):
        import logging

        from refstream.config import load_model_config
        from refstream.pipeline import Pipeline
        from refstream.service.logs import configure_logging, log_event
        from refstream.service.queue import JobQueue, connect

        if log_format is not None:
            configure_logging(log_format, log_level)
        started = time.perf_counter()
        self.name = name
        self.queue = JobQueue(connect(redis_url), lease_ms=lease_ms, max_deliveries=max_deliveries,
                              result_ttl_s=result_ttl_s)
        self.policy = InputPolicy(allowed_roots, upload_root, max_upload_bytes)
        self.pipeline = Pipeline(load_model_config(model, checkpoint), device)
        self._stop = False
        self.handled = 0
        log_event(logging.getLogger("refstream.worker"), "worker.ready", f"model {model} loaded on {self.pipeline.device}",
                  consumer=name, seconds=time.perf_counter() - started)

    def health(self) -> dict:
        """Liveness: the worker's name, jobs handled, and whether Redis answers."""
        import os

        return {"name": self.name, "pid": os.getpid(), "handled": self.handled, "redis": bool(self.queue.r.ping())}

    def run(self, max_jobs: int | None = None, block_ms: int = 500) -> int:
        """Work until :meth:`stop` (or ``max_jobs``); returns the jobs handled by this call."""
        def handler(request, progress):
            return run_job(self.pipeline, self.policy, request, progress)

        handled = self.queue.work(self.name, handler, stop=lambda: self._stop, block_ms=block_ms, max_jobs=max_jobs)
        self.handled += handled
        return handled

    def stop(self) -> None:
        """Finish the current job, then leave the loop (jobs not taken stay queued for others)."""
        self._stop = True
