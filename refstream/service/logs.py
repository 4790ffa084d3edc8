"""Structured logs of the service: the stdlib ``logging`` module with a JSON-lines formatter.

Every service event is logged on a ``refstream.*`` logger (``refstream.queue``, ``refstream.worker``,
``refstream.serve``) with its fields passed as ``extra``::

    log_event(logger, "job.done", "job finished", job_id=..., consumer=..., state="done", seconds=1.2)

With ``--log-format json`` each record is one JSON object per line on stderr::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "event": "job.done", "job_id": "...",
     "consumer": "worker-0", "state": "done", "seconds": 1.2, "message": "job finished", "logger": "refstream.queue",
     "pid": 123}

Fields other than ``ts``, ``level``, ``event``, ``message``, ``logger`` and ``pid`` appear only when set
(``job_id``, ``consumer``, ``state``, ``seconds``, ``error``, ``deliveries``, ``frames``, ``workers``, ...).
``--log-format text`` prints ``ts level event key=value ... message`` instead.

Worker actors configure the same format in their own process (``QueueWorker(log_format=...)``). Ray forwards
their stderr to the ``serve`` process; with JSON logs ``serve`` sets ``RAY_DISABLE_WORKER_LOG_PREFIX=1`` and
``RAY_DEDUP_LOGS=0`` before Ray starts, so the forwarded lines stay pure JSON (no ``(pid=...)`` prefix, no
de-duplication).

Events: ``job.submitted``, ``job.taken``, ``job.done``, ``job.failed``, ``job.retry``, ``job.dead_letter``,
``job.cancelled``, ``job.returned``, ``job.actor_died``, ``worker.ready``, ``serve.started``, ``serve.worker_died``,
``serve.worker_error``, ``serve.stopping``, ``serve.aborting``, ``serve.stopped``, ``metrics.listening``.

Failures that do not stop the service are logged too, never swallowed: ``lease.renew_failed`` (warning, with
the job id; also counted in ``refstream_lease_renewal_failures_total``), ``lease.retry`` (the renewal thread
tries again), ``metrics.unsent``, ``metrics.redis_down`` (a scrape without Redis), ``heartbeat.failed`` and
``worker.redis_away`` (warning), ``serve.stop_retry`` / ``serve.abort_retry`` / ``serve.cleanup_failed``
(warning), ``serve.worker_ended`` (a worker loop failed while stopping), and at debug level the expected
ones: ``job.cancel_stream`` / ``job.close_decode`` (the stream had ended or the actor is gone),
``decode.failed`` (handed to the job, which fails with it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

FIELDS = ("job_id", "consumer", "state", "seconds", "error", "deliveries", "frames", "workers", "port", "redis")
LOGGER = "refstream"
_HANDLER_ATTR = "_refstream_handler"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _iso(record.created), "level": record.levelname.lower(),
               "event": getattr(record, "event", None) or record.name, "logger": record.name, "pid": record.process}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = round(value, 4) if isinstance(value, float) else value
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``ts level event key=value ... message``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_iso(record.created), record.levelname.lower(), getattr(record, "event", None) or record.name]
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                parts.append(f"{name}={round(value, 3) if isinstance(value, float) else value}")
        parts.append(record.getMessage())
        text = " ".join(str(p) for p in parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(fmt: str = "text", level: str | int = "INFO", stream=None) -> logging.Logger:
    """Route the ``refstream`` loggers to ``stream`` (default stderr) in ``json`` or ``text`` format.

    Idempotent: calling it again replaces the handler it installed before (not other handlers).
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_ATTR, False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_ATTR, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else level.upper())
    logger.propagate = False
    return logger


def log_event(logger: logging.Logger, event: str, message: str = "", level: int = logging.INFO, **fields) -> None:
    """Log ``event`` with structured ``fields`` (``job_id=``, ``consumer=``, ``state=``, ``seconds=``, ...)."""
    if logger.isEnabledFor(level):
        logger.log(level, message or event, extra={"event": event, **fields})


def quiet_ray_log_prefix() -> None:
    """Make Ray forward worker lines verbatim (must run before ``import ray`` starts a driver)."""
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
