"""Python client of the service, with the same verbs as the command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from refstream.errors import InputError, RefStreamError
from refstream.service.jobs import InputPolicy, JobLimitError, JobLimits, JobRequest, probe_input, resolve_input
from refstream.service.queue import JobQueue, connect
from refstream.service.results import write_result
from refstream.service.security import RedisSettings


log = logging.getLogger("refstream.client")

__all__ = ["JobLimitError", "JobLimits", "JobNotDone", "RefStreamClient"]


class JobNotDone(RefStreamError):
    """``result`` was asked for a job that has not finished successfully."""


class RefStreamClient:
    """Submit jobs and collect results.

    Args:
        redis_url: :class:`refstream.service.security.RedisSettings` (URL, password, TLS files) or a bare
            ``redis[s]://[user:password@]host:port/db``.
        upload_root: the service's upload folder (shared with the workers) for ``submit(upload=True)``.
        max_upload_bytes: size limit of an uploaded file.
    """

    def __init__(self, redis_url: RedisSettings | str, upload_root: str | None = None, max_upload_bytes: int = 512 * 1024 * 1024):
        self.queue = JobQueue(connect(redis_url))
        self.uploads = InputPolicy([], upload_root, max_upload_bytes)

    def submit(self, input: str, expressions: list[str], upload: bool = False, **options) -> str:
        """Queue a job; returns its id. Options are those of ``refstream run`` (method, budget, ...).

        The job is first checked against the limits ``serve`` published (:meth:`check_limits`).

        Raises:
            ExpressionError / ConfigError: an invalid request (nothing is queued); InputError: a bad upload or
            an input path that cannot be resolved (a symbolic-link loop); JobLimitError: the job is past one of
            the service's limits (nothing is queued).
        """
        local = resolve_input(input)
        payload = {"input": str(local), "expressions": list(expressions),
                   **{k: v for k, v in options.items() if v is not None}}
        request = JobRequest.from_json(json.dumps(payload))
        self.check_limits(request, local)
        if upload:
            request = request.model_copy(update={"input": self.uploads.upload(input)})
        return self.queue.submit(request)

    def check_limits(self, request: JobRequest, local: str | Path | None = None) -> None:
        """Refuse a job past the limits ``serve`` published in Redis (:class:`JobLimits`; none published: no
        check here, the worker still checks).

        The expressions are checked from the request; frames and frame size from a probe of ``local`` (default
        the request's input) when a frames or pixels limit is set and this machine can read the file
        (:func:`refstream.service.jobs.probe_input`: no frame is decoded but a file's first). An input that
        cannot be read here is left to the worker, which fails the job with video_pipeline's message.

        Raises:
            JobLimitError: naming the limit (``serve`` flag), its value and the job's value.
        """
        limits = self.queue.limits()
        if limits is None:
            return
        limits.check_request(request)
        path = Path(local if local is not None else request.input)
        if limits.needs_input and path.exists():
            try:
                frames, width, height = probe_input(path)
            except InputError as exc:  # the worker reports it (the same message) when it runs the job
                log.debug("%s: not probed at submit (%s); the worker checks it", path, exc)
                return
            limits.check_video(request, frames, width, height)

    def status(self, job_id: str) -> dict:
        """State (queued/running/done/failed/cancelled), frames done of total, stage times, error."""
        return self.queue.status(job_id)

    def wait(self, job_id: str, timeout_s: float = 3600) -> dict:
        """Block until the job ends; returns its status."""
        return self.queue.wait(job_id, timeout_s)

    def result(self, job_id: str, out: str | Path) -> list[Path]:
        """Write the job's output files into ``out`` (the same files as ``refstream run``).

        Raises:
            JobNotDone: the job is not done (the message gives its state and error).
        """
        result = self.queue.result(job_id)
        if result is None:
            status = self.queue.status(job_id)
            error = f": {status['error']}" if status.get("error") else ""
            raise JobNotDone(f"job {job_id} is {status['state']}{error}")
        return write_result(result, out)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it had already ended."""
        return self.queue.cancel(job_id)
