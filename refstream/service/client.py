"""Python client of the service, with the same verbs as the command line."""

from __future__ import annotations

import json
from pathlib import Path

from refstream.errors import RefStreamError
from refstream.service.jobs import InputPolicy, JobRequest, resolve_input
from refstream.service.queue import JobQueue, connect
from refstream.service.results import write_result
from refstream.service.security import RedisSettings


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

        Raises:
            ExpressionError / ConfigError: an invalid request (nothing is queued); InputError: a bad upload or
            an input path that cannot be resolved (a symbolic-link loop).
        """
        path = self.uploads.upload(input) if upload else str(resolve_input(input))
        payload = {"input": path, "expressions": list(expressions),
                   **{k: v for k, v in options.items() if v is not None}}
        request = JobRequest.from_json(json.dumps(payload))
        return self.queue.submit(request)

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
