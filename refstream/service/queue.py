"""The job queue on Redis Streams: at-least-once delivery, leases, dead letters, idempotent results.

Keys (``prefix`` defaults to ``refstream``):

``{prefix}:jobs``         stream of submitted job ids (field ``id``), consumer group ``{prefix}-workers``
``{prefix}:job:{id}``     hash: ``state``, ``request`` (JSON), ``frames_done``, ``frames_total``, ``stages``
                          (JSON seconds per stage), ``error``, ``deliveries``, ``consumer``, timestamps
``{prefix}:result:{id}``  the result JSON, written once (``SET NX``) with a TTL
``{prefix}:dead``         dead-letter stream: jobs that failed (bad input: at once; otherwise ``max_deliveries``
                          times), with their last error, ``reason``, ``deliveries``, ``time`` and ``request``;
                          capped at ``dead_max`` entries (``XADD MAXLEN ~``)
``{prefix}:limits``       hash: the largest job ``serve`` accepts (:class:`refstream.service.jobs.JobLimits`)
``{prefix}:metrics``      hash of counters and histograms for Prometheus (see :mod:`refstream.service.metrics`)

Bounded memory: job records and results expire ``result_ttl_s`` after the job ends, and the job stream is
trimmed (:meth:`JobQueue.trim`, ``XTRIM MINID``) below its oldest entry still needed: the oldest one pending
(delivered, not acknowledged) or, when none is, the first not yet delivered. Workers trim at most every
``trim_every_s`` seconds, after an acknowledgement.

Delivery (at-least-once, as in the Redis Streams consumer-group documentation; docs/design.md, section Service delivery): a worker
takes an entry with ``XREADGROUP``; it stays pending until the worker ``XACK``s it, which happens only after
the result is durably written (or the job is marked failed/cancelled). A worker that dies leaves the entry
pending; once it has been idle longer than the lease, another worker takes it over with ``XAUTOCLAIM``. A
running job renews its lease on every progress report (``XCLAIM ... JUSTID``), so a long job is not stolen.
After ``max_deliveries`` deliveries the job goes to the dead-letter stream with its last error. A renewal that
fails (Redis away, or the entry already taken over by another consumer) is logged (``lease.renew_failed``) and
counted (``refstream_lease_renewal_failures_total``, see :mod:`refstream.service.metrics`). Results are
idempotent: the result key is written with ``SET NX``, so a job run twice (a reclaimed job whose first worker
was only slow) keeps its first result and never yields two different ones.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError
from redis.retry import Retry

from refstream.errors import RefStreamError
from refstream.service.jobs import FINAL_STATES, STATES, JobLimits, JobRequest, new_job_id
from refstream.service.logs import log_event
from refstream.service.metrics import record_frames, record_job, record_renewal_failures
from refstream.service.security import RedisSettings, as_settings

log = logging.getLogger("refstream.queue")


class JobNotFound(RefStreamError):
    """No job with that id (or its record has expired)."""


class JobCancelled(Exception):
    """Raised inside a handler's progress callback when the job was cancelled meanwhile."""


class JobReturned(Exception):
    """Raised by a handler to hand its job back to the queue unfinished (e.g. ``serve`` told to stop now):
    :meth:`JobQueue.work` then calls :meth:`JobQueue.release`."""


def connect(target: "RedisSettings | str", retries: int = 8):
    """A Redis client from :class:`refstream.service.security.RedisSettings` (or a bare URL), with
    reconnection and exponential backoff.

    ``redis://[user:password@]host:port/db`` (ACL user and password) or ``rediss://...`` for TLS; the settings
    add a password kept off the URL and the TLS files (CA, client certificate and key). Commands that hit a
    dropped connection are retried ``retries`` times with exponential backoff (about 25 ms to 2 s).
    """
    settings = as_settings(target)
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.025), retries)
    return redis.Redis.from_url(
        settings.url, decode_responses=True, retry=retry, retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=30, socket_connect_timeout=5, **settings.client_kwargs(),
    )


@dataclass
class Delivery:
    """One job handed to a worker: its id, request, stream entry id and how many times it was delivered."""

    job_id: str
    request: JobRequest
    entry_id: str
    deliveries: int
    consumer: str = ""
    taken_at: float = field(default_factory=time.monotonic)
    frames_reported: int = 0  # frames already added to the frames_processed counter
    stages: dict | None = None  # the last stage seconds reported (for the stage histograms)

    def elapsed(self) -> float:
        return time.monotonic() - self.taken_at


def _progress_fields(delivery: Delivery, frames_done: int | None, frames_total: int | None,
                     stages: dict | None) -> dict[str, Any]:
    """The job-record fields a progress report sets (and ``delivery.stages``, for the stage histograms)."""
    mapping: dict[str, Any] = {"updated": time.time()}
    if frames_done is not None:
        mapping["frames_done"] = frames_done
    if frames_total is not None:
        mapping["frames_total"] = frames_total
    if stages is not None:
        mapping["stages"] = json.dumps(stages)
        delivery.stages = dict(stages)
    return mapping


class JobProgress:
    """The ``progress`` :meth:`JobQueue.work` hands its handler: ``progress(frames_done=, frames_total=,
    stages=)`` records one delivery's progress and renews its lease (:meth:`JobQueue.progress`; raises
    :class:`JobCancelled`); ``job_id`` names the job (for logs)."""

    def __init__(self, queue: "JobQueue", delivery: Delivery, consumer: str):
        self.queue, self.delivery, self.consumer = queue, delivery, consumer

    @property
    def job_id(self) -> str:
        return self.delivery.job_id

    def __call__(self, **kwargs) -> None:
        self.queue.progress(self.delivery, self.consumer, **kwargs)


class JobQueue:
    """Client and worker side of the queue (the same names as the ``refstream`` verbs).

    Args:
        client: a ``redis.Redis`` with ``decode_responses=True`` (see :func:`connect`).
        prefix: key prefix.
        lease_ms: a delivered job idle longer than this is taken over by another worker.
        max_deliveries: deliveries before a job goes to the dead-letter stream.
        result_ttl_s: how long results and job records live after the job ends, seconds.
        dead_max: dead letters kept (about: ``XADD MAXLEN ~``); the oldest go first.
        trim_every_s: trim the job stream at most this often (seconds, after an acknowledgement; 0: every time).
    """

    def __init__(self, client, prefix: str = "refstream", lease_ms: int = 60_000, max_deliveries: int = 3,
                 result_ttl_s: int = 7 * 24 * 3600, dead_max: int = 10_000, trim_every_s: float = 2.0):
        self.r = client
        self.limits_key = f"{prefix}:limits"
        self.dead_max = dead_max
        self.trim_every_s = trim_every_s
        self._trimmed_at = float("-inf")
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"
        self.group = f"{prefix}-workers"
        self.dead = f"{prefix}:dead"
        self.lease_ms = lease_ms
        self.max_deliveries = max_deliveries
        self.result_ttl_s = result_ttl_s
        self._unsent = 0  # failed lease renewals not yet added to the metrics hash (Redis was away)
        self._unsent_lock = threading.Lock()
        self._ensure_group()

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            log.debug("consumer group %s already exists", self.group)

    # ------------------------------------------------------------------ client verbs
    def submit(self, request: JobRequest, job_id: str | None = None) -> str:
        """Queue a job; returns its id. With an existing ``job_id`` the call is idempotent (no second entry)."""
        job_id = job_id or new_job_id()
        now = time.time()
        created = self.r.hsetnx(self._job(job_id), "request", request.to_json())
        if not created:
            return job_id
        self.r.hset(self._job(job_id), mapping={
            "state": "queued", "frames_done": 0, "frames_total": 0, "stages": "{}", "error": "",
            "deliveries": 0, "created": now, "updated": now,
        })
        self.r.xadd(self.stream, {"id": job_id})
        log_event(log, "job.submitted", "job queued", job_id=job_id, state="queued")
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        """State, frames done of total, per-stage seconds, error, deliveries.

        Raises:
            JobNotFound: unknown or expired id.
        """
        record = self.r.hgetall(self._job(job_id))
        if not record:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or its record expired)")
        return {
            "id": job_id, "state": record.get("state"), "frames_done": int(record.get("frames_done", 0)),
            "frames_total": int(record.get("frames_total", 0)), "stages": json.loads(record.get("stages") or "{}"),
            "error": record.get("error") or None, "deliveries": int(record.get("deliveries", 0)),
            "request": json.loads(record["request"]) if record.get("request") else None,
        }

    def result(self, job_id: str) -> dict[str, Any] | None:
        """The job's result JSON, or None while it is not done."""
        text = self.r.get(self._result(job_id))
        return None if text is None else json.loads(text)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; returns False when it had already ended."""
        state = self.status(job_id)["state"]
        if state in FINAL_STATES:
            return False
        self.r.hset(self._job(job_id), mapping={"state": "cancelled", "updated": time.time()})
        log_event(log, "job.cancel_requested", "job cancelled by a client", job_id=job_id, state="cancelled")
        return True

    def wait(self, job_id: str, timeout_s: float = 600, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll until the job reaches a final state; returns its status."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status["state"] in FINAL_STATES:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status['state']} after {timeout_s} s")
            time.sleep(poll_s)

    def depth(self) -> dict[str, int]:
        """Queue depth: entries never delivered (``lag``) and delivered but not yet acknowledged."""
        info = {g["name"]: g for g in self.r.xinfo_groups(self.stream)}.get(self.group, {})
        return {"pending": int(info.get("pending", 0)), "lag": int(info.get("lag") or 0)}

    def count_states(self, batch: int = 1000) -> dict[str, int]:
        """Job records by state (``SCAN`` of ``{prefix}:job:*``; expired records are not counted)."""
        counts = {state: 0 for state in STATES}
        keys: list[str] = []

        def flush() -> None:
            pipe = self.r.pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, "state")
            for state in pipe.execute():
                if state is not None:
                    counts[state] = counts.get(state, 0) + 1
            keys.clear()

        for key in self.r.scan_iter(match=f"{self.prefix}:job:*", count=batch):
            keys.append(key)
            if len(keys) >= batch:
                flush()
        if keys:
            flush()
        return counts

    # ------------------------------------------------------------------ worker side
    def take(self, consumer: str, block_ms: int = 1000) -> Delivery | None:
        """Next job for ``consumer``: first one abandoned past the lease (XAUTOCLAIM), else a new one.

        Jobs already cancelled or done are acknowledged and skipped; a job delivered more than
        ``max_deliveries`` times goes to the dead-letter stream.
        """
        while True:
            entry = self._reclaim(consumer) or self._read_new(consumer, block_ms)
            if entry is None:
                return None
            entry_id, fields = entry
            job_id = fields.get("id")
            delivery = self._admit(consumer, entry_id, job_id)
            if delivery is not None:
                return delivery

    def _reclaim(self, consumer: str):
        _, entries, *_ = self.r.xautoclaim(self.stream, self.group, consumer, min_idle_time=self.lease_ms,
                                           start_id="0-0", count=1)
        entries = [e for e in entries if e and e[1] is not None]
        return entries[0] if entries else None

    def _read_new(self, consumer: str, block_ms: int):
        response = self.r.xreadgroup(self.group, consumer, {self.stream: ">"}, count=1, block=block_ms)
        if not response:
            return None
        return response[0][1][0]

    def _admit(self, consumer: str, entry_id: str, job_id: str | None) -> Delivery | None:
        record = self.r.hgetall(self._job(job_id)) if job_id else {}
        if not record or record.get("state") in FINAL_STATES or self.r.exists(self._result(job_id)):
            self.r.xack(self.stream, self.group, entry_id)  # nothing (left) to do
            self._maybe_trim()
            return None
        deliveries = self.r.hincrby(self._job(job_id), "deliveries", 1)
        if deliveries > self.max_deliveries:
            error = record.get("error") or "the worker died or timed out on every delivery"
            self._dead_letter(job_id, entry_id, error, deliveries - 1, "retries", record.get("request"))
            log_event(log, "job.dead_letter", "job sent to the dead letters", logging.ERROR, job_id=job_id,
                      consumer=consumer, state="failed", error=error, deliveries=deliveries - 1)
            return None
        self.r.hset(self._job(job_id), mapping={"state": "running", "consumer": consumer, "updated": time.time()})
        try:
            request = JobRequest.from_json(record["request"])
        except RefStreamError as exc:
            self.fail(Delivery(job_id, None, entry_id, deliveries, consumer), str(exc))  # type: ignore[arg-type]
            return None
        log_event(log, "job.taken", "job taken", job_id=job_id, consumer=consumer, state="running",
                  deliveries=deliveries)
        return Delivery(job_id, request, entry_id, deliveries, consumer)

    def progress(self, delivery: Delivery, consumer: str, frames_done: int | None = None,
                 frames_total: int | None = None, stages: dict | None = None) -> None:
        """Record progress and renew the lease (``XCLAIM ... JUSTID`` of the entry by ``consumer``).

        The renewal fails when Redis does not answer (the error goes up) or when the entry is no longer this
        consumer's: taken over by another consumer after the lease ran out, or acknowledged (the job ended
        elsewhere); then the entry is claimed back and the job goes on (its result is written once, see
        :meth:`complete`). Either failure is logged (``lease.renew_failed``, with the job id) and counted in
        ``refstream_lease_renewal_failures_total``.

        Raises:
            JobCancelled: the job was cancelled.
            redis.exceptions.RedisError: Redis did not answer (after the client's retries).
        """
        pipe = self.r.pipeline()
        pipe.hset(self._job(delivery.job_id), mapping=_progress_fields(delivery, frames_done, frames_total, stages))
        pipe.hget(self._job(delivery.job_id), "state")
        pipe.xpending_range(self.stream, self.group, min=delivery.entry_id, max=delivery.entry_id, count=1)
        pipe.xclaim(self.stream, self.group, consumer, min_idle_time=0, message_ids=[delivery.entry_id], justid=True)
        if frames_done is not None and frames_done > delivery.frames_reported:
            record_frames(pipe, self.prefix, frames_done - delivery.frames_reported)
            delivery.frames_reported = frames_done
        try:
            _, state, pending, *_ = self._execute(pipe)
        except RedisError as exc:
            self._renewal_failed(delivery, consumer, f"Redis did not answer ({exc.__class__.__name__}: {exc})")
            raise
        owner = pending[0]["consumer"] if pending else None
        if owner != consumer:
            self._renewal_failed(delivery, consumer, f"the job's entry had been taken over by {owner}" if owner
                                 else "the job's entry was no longer pending (acknowledged elsewhere)")
            self._send_unsent()
        if state == "cancelled":
            raise JobCancelled(delivery.job_id)

    @property
    def unsent_renewal_failures(self) -> int:
        """Failed lease renewals counted in this process but not yet in Redis (it did not answer since)."""
        return self._unsent

    def _renewal_failed(self, delivery: Delivery, consumer: str, reason: str) -> None:
        """Log a failed lease renewal and count it (sent with the next pipeline that goes through)."""
        with self._unsent_lock:
            self._unsent += 1
        log_event(log, "lease.renew_failed", f"lease renewal failed: {reason}", logging.WARNING,
                  job_id=delivery.job_id, consumer=consumer, error=reason, deliveries=delivery.deliveries)

    def _execute(self, pipe) -> list:
        """``pipe.execute()`` plus the failed lease renewals not yet in Redis (kept for later when it fails).

        The counter's ``HINCRBY`` goes last, so the replies of the caller's commands keep their places.
        """
        with self._unsent_lock:
            unsent, self._unsent = self._unsent, 0
        record_renewal_failures(pipe, self.prefix, unsent)
        try:
            return pipe.execute()
        except BaseException:
            with self._unsent_lock:
                self._unsent += unsent
            raise

    def _send_unsent(self) -> None:
        """Add the failed lease renewals counted here to Redis now (kept for later if Redis does not answer)."""
        try:
            self._execute(self.r.pipeline(transaction=False))
        except RedisError as exc:
            log_event(log, "metrics.unsent", f"{self._unsent} failed lease renewal(s) not counted in Redis yet "
                      f"({exc}); sent with the next command", logging.WARNING, error=str(exc))

    def complete(self, delivery: Delivery, result: dict[str, Any]) -> bool:
        """Write the result (first writer wins), mark the job done, then acknowledge the entry.

        Returns:
            True when this call wrote the result, False when an earlier delivery already had.
        """
        written = bool(self.r.set(self._result(delivery.job_id), json.dumps(result), nx=True, ex=self.result_ttl_s))
        seconds = delivery.elapsed()
        pipe = self.r.pipeline()
        pipe.hset(self._job(delivery.job_id), mapping={"state": "done", "error": "", "updated": time.time()})
        pipe.expire(self._job(delivery.job_id), self.result_ttl_s)
        pipe.xack(self.stream, self.group, delivery.entry_id)
        record_job(pipe, self.prefix, "done", seconds, delivery.stages)
        self._execute(pipe)
        self._maybe_trim()
        log_event(log, "job.done", "job finished", job_id=delivery.job_id, consumer=delivery.consumer or None,
                  state="done", seconds=seconds, frames=delivery.frames_reported, deliveries=delivery.deliveries)
        return written

    def fail(self, delivery: Delivery, error: str, permanent: bool = True) -> None:
        """Record an error. Permanent (bad input): failed, acknowledged and added to the dead letters now (reason
        ``failed``; no retries: :meth:`requeue_dead` once the input is fixed). Otherwise the entry stays pending
        and is retried after the lease, until ``max_deliveries`` sends it to the dead letters (``retries``)."""
        seconds = delivery.elapsed()
        self.r.hset(self._job(delivery.job_id), mapping={"error": error, "updated": time.time()})
        final = permanent or delivery.deliveries >= self.max_deliveries
        if final:
            self._dead_letter(delivery.job_id, delivery.entry_id, error, delivery.deliveries,
                              "failed" if permanent else "retries")
        else:
            self.r.hset(self._job(delivery.job_id), "state", "queued")
        pipe = self.r.pipeline(transaction=False)
        record_job(pipe, self.prefix, "failed" if final else "retried", seconds)
        self._execute(pipe)
        event = ("job.failed" if permanent else "job.dead_letter") if final else "job.retry"
        log_event(log, event, "job failed" if final else "job failed; it is retried after the lease",
                  logging.ERROR if final else logging.WARNING, job_id=delivery.job_id,
                  consumer=delivery.consumer or None, state="failed" if final else "queued", seconds=seconds,
                  error=error, deliveries=delivery.deliveries)

    def release(self, delivery: Delivery, reason: str = "returned to the queue") -> None:
        """Hand a job back unfinished: the next ``take()`` of any consumer gets it (ahead of new jobs).

        The entry stays pending (its place is kept) and its idle time is set past the lease (``XCLAIM ...
        IDLE``), so :meth:`take`'s XAUTOCLAIM picks it at once; the record goes back to ``queued``
        with no frames done, and this delivery does not count towards ``max_deliveries``.
        """
        seconds = delivery.elapsed()
        pipe = self.r.pipeline()
        pipe.hset(self._job(delivery.job_id), mapping={"state": "queued", "frames_done": 0, "updated": time.time()})
        pipe.hincrby(self._job(delivery.job_id), "deliveries", -1)
        pipe.xclaim(self.stream, self.group, delivery.consumer or "released", min_idle_time=0,
                    message_ids=[delivery.entry_id], idle=10 * self.lease_ms + 3_600_000, justid=True)
        record_job(pipe, self.prefix, "returned", seconds)
        self._execute(pipe)
        log_event(log, "job.returned", f"job {reason}", logging.WARNING, job_id=delivery.job_id,
                  consumer=delivery.consumer or None, state="queued", seconds=seconds)

    def cancelled(self, delivery: Delivery) -> None:
        """Acknowledge a job the worker stopped because it was cancelled."""
        seconds = delivery.elapsed()
        pipe = self.r.pipeline()
        pipe.xack(self.stream, self.group, delivery.entry_id)
        record_job(pipe, self.prefix, "cancelled", seconds)
        self._execute(pipe)
        self._maybe_trim()
        log_event(log, "job.cancelled", "job stopped: it was cancelled", job_id=delivery.job_id,
                  consumer=delivery.consumer or None, state="cancelled", seconds=seconds)

    def _dead_letter(self, job_id: str, entry_id: str, error: str, deliveries: int, reason: str,
                     request: str | None = None) -> None:
        """Fail the job, acknowledge its entry and add it to the dead letters (``reason``: ``failed`` for bad
        input, ``retries`` after ``max_deliveries``)."""
        now = time.time()
        if request is None:
            request = self.r.hget(self._job(job_id), "request")
        pipe = self.r.pipeline()
        pipe.xadd(self.dead, {"id": job_id, "error": error, "deliveries": deliveries, "reason": reason, "time": now,
                              "request": request or ""}, maxlen=self.dead_max, approximate=True)
        pipe.hset(self._job(job_id), mapping={"state": "failed", "error": error, "updated": now})
        pipe.expire(self._job(job_id), self.result_ttl_s)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self._maybe_trim()

    def dead_letters(self) -> list[dict[str, Any]]:
        """The dead-letter stream's entries, oldest first: ``id`` (the job's), ``error`` (its last),
        ``deliveries``, ``reason`` (``failed``: bad input, failed at once; ``retries``: failed ``max_deliveries``
        times), ``time`` (Unix seconds), ``request`` (JSON) and ``entry`` (the dead stream's entry id)."""
        return [{**fields, "entry": entry} for entry, fields in self.r.xrange(self.dead)]

    def _select_dead(self, job_ids) -> list[dict[str, Any]]:
        """The dead letters of ``job_ids`` (None: all).

        Raises:
            JobNotFound: a job id that is not in the dead letters (nothing is changed).
        """
        dead = self.dead_letters()
        if job_ids is None:
            return dead
        wanted = list(dict.fromkeys(job_ids))
        missing = [j for j in wanted if not any(d["id"] == j for d in dead)]
        if missing:
            raise JobNotFound(f"not in the dead letters: {', '.join(missing)}. Fix: see the job ids with "
                              f"`refstream dead-letters list`")
        return [d for d in dead if d["id"] in wanted]

    def requeue_dead(self, job_ids=None) -> list[dict[str, Any]]:
        """Put dead jobs back on the queue with a fresh record (state ``queued``, no deliveries, no error) and
        remove them from the dead letters; returns the dead letters requeued.

        Exactly once: each dead entry is claimed first (``SET NX`` of ``{prefix}:requeue:{entry}``), so two
        requeues at the same moment queue it once; then, in one transaction, the entry is deleted, the job record
        rewritten (no TTL any more) and the job id added to the job stream. A requeued job is a queued job like
        any other: it runs once (results are written once, see :meth:`complete`).

        Args:
            job_ids: the jobs to requeue (None: every dead letter).

        Raises:
            JobNotFound: a job id not in the dead letters (nothing is requeued).
        """
        requeued = []
        for dead in self._select_dead(job_ids):
            if not self.r.set(f"{self.prefix}:requeue:{dead['entry']}", "1", nx=True, ex=3600):
                continue  # another requeue has it
            request = dead.get("request") or self.r.hget(self._job(dead["id"]), "request")
            if not request:
                log_event(log, "job.requeue_skipped", "no request stored for this dead letter: left in place",
                          logging.WARNING, job_id=dead["id"])
                continue
            now = time.time()
            pipe = self.r.pipeline()
            pipe.xdel(self.dead, dead["entry"])
            pipe.delete(self._job(dead["id"]), self._result(dead["id"]))
            pipe.hset(self._job(dead["id"]), mapping={
                "request": request, "state": "queued", "frames_done": 0, "frames_total": 0, "stages": "{}",
                "error": "", "deliveries": 0, "created": now, "updated": now, "requeued": now})
            pipe.xadd(self.stream, {"id": dead["id"]})
            pipe.execute()
            requeued.append(dead)
            log_event(log, "job.requeued", "dead job put back on the queue", job_id=dead["id"], state="queued")
        return requeued

    def purge_dead(self, job_ids=None) -> list[dict[str, Any]]:
        """Delete dead letters and their job records; returns the dead letters removed.

        Args:
            job_ids: the jobs to purge (None: every dead letter).

        Raises:
            JobNotFound: a job id not in the dead letters (nothing is removed).
        """
        removed = []
        for dead in self._select_dead(job_ids):
            pipe = self.r.pipeline()
            pipe.xdel(self.dead, dead["entry"])
            pipe.delete(self._job(dead["id"]))
            if pipe.execute()[0]:
                removed.append(dead)
                log_event(log, "job.purged", "dead job deleted", job_id=dead["id"])
        return removed

    # ------------------------------------------------------------------ limits, trimming
    def publish_limits(self, limits: JobLimits) -> None:
        """Write ``serve``'s :class:`refstream.service.jobs.JobLimits` to ``{prefix}:limits`` (read by ``submit``)."""
        self.r.hset(self.limits_key, mapping=limits.to_mapping())

    def limits(self) -> JobLimits | None:
        """The :class:`refstream.service.jobs.JobLimits` ``serve`` published, or None when none did."""
        mapping = self.r.hgetall(self.limits_key)
        return JobLimits.from_mapping(mapping) if mapping else None

    def trim(self) -> int:
        """Trim the job stream below its oldest entry still needed; returns the entries removed.

        Needed are the entries pending (delivered, not acknowledged: their job may be reclaimed) and those not
        yet delivered (after the group's last-delivered id). Both are read in one transaction, the group's
        position first, so an entry delivered meanwhile is pending or after it. Entries only ever leave that
        set, so trimming below it (``XTRIM MINID``) never loses a job.
        """
        pipe = self.r.pipeline()
        pipe.xinfo_groups(self.stream)
        pipe.xpending(self.stream, self.group)
        groups, pending = pipe.execute()
        group = next((g for g in groups if g["name"] == self.group), None)
        if group is None:
            return 0
        ms, seq = (int(x) for x in group["last-delivered-id"].split("-"))
        keep = (ms, seq + 1)
        if pending.get("pending") and pending.get("min"):
            oldest = tuple(int(x) for x in pending["min"].split("-"))
            keep = min(keep, oldest)
        removed = self.r.xtrim(self.stream, minid=f"{keep[0]}-{keep[1]}", approximate=False)
        self._trimmed_at = time.monotonic()
        return int(removed or 0)

    def _maybe_trim(self) -> None:
        """:meth:`trim` when it has not run for ``trim_every_s`` (a failure is logged: trimming is never vital)."""
        if time.monotonic() - self._trimmed_at < self.trim_every_s:
            return
        try:
            self.trim()
        except RedisError as exc:
            self._trimmed_at = time.monotonic()
            log_event(log, "queue.trim_failed", f"could not trim the job stream ({exc}); trying again later",
                      logging.WARNING, error=str(exc))

    def work(self, consumer: str, handler: Callable[[JobRequest, Callable[..., None]], dict], *,
             stop: Callable[[], bool] = lambda: False, block_ms: int = 500, max_jobs: int | None = None) -> int:
        """Worker loop: take a job, run ``handler(request, progress)``, complete or fail it; repeat.

        ``progress(frames_done=, frames_total=, stages=)`` (a :class:`JobProgress`) renews the lease and raises
        :class:`JobCancelled` when the job was cancelled. A handler raising :class:`JobReturned` hands the job
        back unfinished (:meth:`release`). A :class:`RefStreamError` (bad input) fails the job
        at once; any other exception leaves it to be retried after the lease. A failed job never stops the
        loop. Returns the number of jobs handled.
        """
        handled = 0
        while not stop() and (max_jobs is None or handled < max_jobs):
            delivery = self.take(consumer, block_ms)
            if delivery is None:
                continue
            handled += 1
            try:
                result = handler(delivery.request, JobProgress(self, delivery, consumer))
            except JobCancelled:
                self.cancelled(delivery)
            except JobReturned as exc:
                self.release(delivery, str(exc) or "returned to the queue")
            except RefStreamError as exc:
                self.fail(delivery, str(exc), permanent=True)
            except Exception as exc:  # noqa: BLE001 - a failed job must never take the worker down
                self.fail(delivery, f"{exc.__class__.__name__}: {exc}", permanent=False)
            else:
                self.complete(delivery, result)
        return handled


class LeaseKeeper:
    """A job's ``progress`` made thread-safe, plus a thread that renews the lease while the job waits.

    :meth:`JobQueue.progress` renews a job's lease, but a job can go long without progress (CLIP of a long
    clip on a CPU, or a pooled job queued behind another on a busy VideoGLaMM actor; frame progress is also
    throttled to twice a second), so this thread calls ``progress()`` when nothing else did for ``every_s``
    seconds (``lease / 3`` in the service). A cancellation seen by the thread is raised by the next
    :meth:`check` or progress call of the job. A renewal that fails otherwise is logged and tried again on
    the next turn (:meth:`JobQueue.progress` has logged and counted a Redis failure already: here it is
    logged at debug level). Use as a context manager.

    Args:
        progress: the job's progress callable (a :class:`JobProgress`, or a wrapper of one).
        every_s: renew when nothing reported progress for this many seconds.
        abort: e.g. a ``threading.Event``; once set, :meth:`check` raises :class:`JobReturned`.
        job_id: the job's id in logs (default: ``progress.job_id`` when it has one).
    """

    def __init__(self, progress, every_s: float, abort=None, job_id: str | None = None):
        self._progress, self.every_s = progress, max(0.05, float(every_s))
        self.job_id = job_id if job_id is not None else getattr(progress, "job_id", None)
        self.abort = abort  # e.g. a threading.Event: once set, check() raises JobReturned
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.cancelled: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="refstream-lease")

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __call__(self, **kwargs) -> None:
        """The job's progress (renews the lease; raises JobCancelled)."""
        self.check()
        with self._lock:
            self._progress(**kwargs)
            self._last = time.monotonic()

    def check(self) -> None:
        """Raise the cancellation the renewal thread saw, or :class:`JobReturned` once ``abort`` is set."""
        if self.cancelled is not None:
            raise self.cancelled
        if self.abort is not None and self.abort.is_set():
            raise JobReturned("returned to the queue: serve was told to stop now")

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s / 4):
            if time.monotonic() - self._last < self.every_s:
                continue
            try:
                with self._lock:
                    self._progress()
                    self._last = time.monotonic()
            except JobCancelled as exc:
                self.cancelled = exc
                return
            except Exception as exc:  # noqa: BLE001 - e.g. Redis away: the next turn tries again
                log_event(log, "lease.retry", f"lease renewal failed ({exc.__class__.__name__}: {exc}); "
                          f"retrying in {self.every_s / 4:.2g} s",
                          logging.DEBUG if isinstance(exc, RedisError) else logging.WARNING,
                          job_id=self.job_id, error=str(exc))
