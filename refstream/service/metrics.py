"""Prometheus metrics of the service, served by ``refstream serve`` on ``--metrics-port`` (``/metrics``).

Design: **Redis is the only source of truth; the exporter is stateless.**

Workers are Ray actors in other processes (often on other machines), so they cannot update a
``prometheus_client`` registry living in the ``serve`` process. Instead:

* Workers push per-job numbers into one Redis hash, ``{prefix}:metrics``, inside the pipelines the queue
  already runs (:class:`refstream.service.queue.JobQueue`): ``progress`` adds the frames finished since
  the last report (``HINCRBY frames_processed``); ``complete`` / ``fail`` / ``cancelled`` add one
  observation of the job's duration (take to end, label ``outcome`` = done, failed, cancelled, retried or returned)
  and, for finished jobs, one observation per pipeline stage of its ``stage_seconds``. An observation is
  ``HINCRBYFLOAT <series>|sum``, ``HINCRBY <series>|count`` and ``HINCRBY`` of the one (non-cumulative)
  bucket it falls in, so a job costs a handful of pipelined commands.
* The ``serve`` supervisor registers :class:`ServiceCollector`, a custom collector that reads Redis at
  scrape time and builds every metric family: counters and histograms from the hash (buckets made
  cumulative here), job counts by state from a ``SCAN`` of the job records, queue depth from
  ``XINFO GROUPS``, dead letters from ``XLEN``.

Why not Ray's metrics (``ray.util.metrics``): they go through each node's metrics agent and need the
cluster's Prometheus service discovery; they reset when an actor restarts. Why not an in-process counter
in the supervisor fed by a stream: it would reset (and need re-reading) every time ``serve`` restarts.
The hash survives worker crashes, ``serve`` restarts and (with AOF) Redis restarts, so counters are
monotonic for the life of the Redis data, several ``serve`` processes export the same values, and a
scrape never blocks a worker. When Redis does not answer, a scrape returns ``refstream_redis_up 0`` only.

Metrics (all prefixed ``refstream_``):

=====================================  =========  =================================================
``redis_up``                           gauge      1 when Redis answered this scrape
``jobs{state}``                        gauge      job records by state (queued, running, done, failed,
                                                  cancelled); records expire ``result_ttl_s`` after the end
``queue_depth{kind}``                  gauge      ``lag``: entries never delivered; ``pending``: delivered,
                                                  not yet acknowledged (running or abandoned)
``dead_letters``                       gauge      entries in the dead-letter stream
``frames_processed_total``             counter    frames segmented by all workers (``rate()`` = frames/s)
``job_duration_seconds{outcome}``      histogram  take-to-end time of each delivery
``stage_seconds{stage}``               histogram  per-stage seconds of finished jobs (decode, clip, ...)
``lease_renewal_failures_total``       counter    lease renewals that failed: Redis did not answer, or the
                                                  job's entry had been taken over by another consumer (or
                                                  acknowledged) when its worker renewed it
``workers``                            gauge      worker loops this ``serve`` process runs (when known)
``actors{role,state}``                 gauge      actors with a live heartbeat
=====================================  =========  =================================================

A renewal that fails because Redis is away cannot be counted in Redis at that moment: the queue keeps the
count in its process (:meth:`refstream.service.queue.JobQueue.unsent_renewal_failures`) and adds it to the
hash with its next command pipeline that goes through (the next progress report, or the job's end).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from redis.exceptions import RedisError

from refstream.service.heartbeat import heartbeats
from refstream.service.logs import log_event

log = logging.getLogger("refstream.metrics")

#: Upper bounds (seconds) of the histogram buckets, for job durations and stage times alike.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
OUTCOMES = ("done", "failed", "cancelled", "retried", "returned")
FRAMES_FIELD = "frames_processed"
RENEWAL_FAILURES_FIELD = "lease_renewal_failures"


def metrics_key(prefix: str) -> str:
    """The Redis hash holding the counters and histograms."""
    return f"{prefix}:metrics"


def _bucket(value: float) -> str:
    for bound in BUCKETS:
        if value <= bound:
            return repr(bound)
    return "+Inf"


def observe(pipe, key: str, series: str, value: float) -> None:
    """Queue one histogram observation of ``series`` (``job|done``, ``stage|sam2``) on a Redis pipeline."""
    value = max(0.0, float(value))
    pipe.hincrbyfloat(key, f"{series}|sum", value)
    pipe.hincrby(key, f"{series}|count", 1)
    pipe.hincrby(key, f"{series}|bucket|{_bucket(value)}", 1)


def record_frames(pipe, prefix: str, frames: int) -> None:
    """Queue ``frames`` more processed frames on a Redis pipeline."""
    if frames > 0:
        pipe.hincrby(metrics_key(prefix), FRAMES_FIELD, int(frames))


def record_renewal_failures(pipe, prefix: str, failures: int) -> None:
    """Queue ``failures`` more failed lease renewals on a Redis pipeline."""
    if failures > 0:
        pipe.hincrby(metrics_key(prefix), RENEWAL_FAILURES_FIELD, int(failures))


def record_job(pipe, prefix: str, outcome: str, seconds: float, stages: dict[str, float] | None = None) -> None:
    """Queue a job's duration (by outcome) and its stage seconds on a Redis pipeline."""
    key = metrics_key(prefix)
    observe(pipe, key, f"job|{outcome}", seconds)
    for stage, value in (stages or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            observe(pipe, key, f"stage|{stage}", value)


def parse_histograms(raw: dict[str, str], kind: str) -> dict[str, dict[str, Any]]:
    """``{label: {"buckets": [(le, cumulative count), ..., ("+Inf", count)], "sum": s, "count": n}}``."""
    series: dict[str, dict[str, Any]] = {}
    for field, value in raw.items():
        parts = field.split("|")
        if len(parts) < 3 or parts[0] != kind:
            continue
        entry = series.setdefault(parts[1], {"sum": 0.0, "count": 0, "per_bucket": {}})
        if parts[2] == "sum":
            entry["sum"] = float(value)
        elif parts[2] == "count":
            entry["count"] = int(value)
        elif parts[2] == "bucket" and len(parts) == 4:
            entry["per_bucket"][parts[3]] = int(value)
    out = {}
    for label, entry in series.items():
        running, buckets = 0, []
        for bound in BUCKETS:
            running += entry["per_bucket"].get(repr(bound), 0)
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", entry["count"]))
        out[label] = {"buckets": buckets, "sum": entry["sum"], "count": entry["count"]}
    return out


class ServiceCollector:
    """A ``prometheus_client`` collector that reads the service's state from Redis at every scrape.

    Args:
        queue: a :class:`refstream.service.queue.JobQueue` (its Redis client and key prefix).
        workers: optional callable giving the number of worker loops of this ``serve`` process.
    """

    def __init__(self, queue, workers: Callable[[], int] | None = None):
        self.queue = queue
        self.workers = workers

    def describe(self):
        return []  # values come from Redis at scrape time; nothing to pre-describe

    def collect(self):
        """Every metric family, read from Redis now (only ``refstream_redis_up 0`` when Redis does not answer)."""
        # lazy: only the serve process's exporter needs prometheus_client; the client verbs (submit,
        # status) import this module through the queue and need not load it
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("refstream_redis_up", "1 when Redis answered this scrape")
        try:
            state = self._read()
        except (RedisError, OSError) as exc:
            log_event(log, "metrics.redis_down", f"scrape: Redis did not answer ({exc})", logging.WARNING,
                      error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._queue_families(state)
        yield from self._counter_families(state["raw"])
        yield from self._histogram_families(state["raw"])
        yield from self._actor_families(state["beats"])

    def _read(self) -> dict[str, Any]:
        """Everything a scrape reports, from Redis: ``states``, ``depth``, ``dead``, ``raw`` (the metrics hash),
        ``beats``. Raises ``RedisError`` / ``OSError`` when Redis does not answer."""
        return {"states": self.queue.count_states(), "depth": self.queue.depth(),
                "dead": self.queue.r.xlen(self.queue.dead),
                "raw": self.queue.r.hgetall(metrics_key(self.queue.prefix)),
                "beats": heartbeats(self.queue.r, self.queue.prefix)}

    @staticmethod
    def _queue_families(state: dict[str, Any]):
        """Gauges of the queue: jobs by state, queue depth, dead letters."""
        from prometheus_client.core import GaugeMetricFamily  # lazy: see collect()

        jobs = GaugeMetricFamily("refstream_jobs", "Job records by state", labels=["state"])
        for name, count in state["states"].items():
            jobs.add_metric([name], count)
        yield jobs
        queue_depth = GaugeMetricFamily("refstream_queue_depth",
                                        "lag: entries never delivered; pending: delivered, not acknowledged",
                                        labels=["kind"])
        for kind in ("lag", "pending"):
            queue_depth.add_metric([kind], state["depth"][kind])
        yield queue_depth
        yield GaugeMetricFamily("refstream_dead_letters", "Entries in the dead-letter stream", value=state["dead"])

    @staticmethod
    def _counter_families(raw: dict[str, str]):
        """The counters of the metrics hash: frames processed, failed lease renewals."""
        from prometheus_client.core import CounterMetricFamily  # lazy: see collect()

        yield CounterMetricFamily("refstream_frames_processed", "Frames segmented by all workers",
                                  value=int(raw.get(FRAMES_FIELD, 0)))
        yield CounterMetricFamily("refstream_lease_renewal_failures",
                                  "Lease renewals that failed (Redis away, or the entry taken over by another "
                                  "consumer)",
                                  value=int(raw.get(RENEWAL_FAILURES_FIELD, 0)))

    @staticmethod
    def _histogram_families(raw: dict[str, str]):
        """Job durations by outcome and stage seconds (buckets made cumulative)."""
        from prometheus_client.core import HistogramMetricFamily  # lazy: see collect()

        durations = HistogramMetricFamily("refstream_job_duration_seconds",
                                          "Take-to-end seconds of each job delivery, by outcome", labels=["outcome"])
        for outcome, h in sorted(parse_histograms(raw, "job").items()):
            durations.add_metric([outcome], h["buckets"], h["sum"])
        yield durations
        stages = HistogramMetricFamily("refstream_stage_seconds", "Seconds per pipeline stage of finished jobs",
                                       labels=["stage"])
        for stage, h in sorted(parse_histograms(raw, "stage").items()):
            stages.add_metric([stage], h["buckets"], h["sum"])
        yield stages

    def _actor_families(self, beats: dict[str, dict]):
        """This serve's worker loops (when known) and the actors with a live heartbeat, by role and state."""
        from prometheus_client.core import GaugeMetricFamily  # lazy: see collect()

        if self.workers is not None:
            yield GaugeMetricFamily("refstream_workers", "Worker loops run by this serve process",
                                    value=self.workers())
        actors = GaugeMetricFamily("refstream_actors",
                                   "Actors with a live heartbeat (last beat < 60 s ago), by role and state",
                                   labels=["role", "state"])
        counts: dict[tuple[str, str], int] = {}
        for record in beats.values():
            key = (record.get("role", "worker"), record.get("state", "unknown"))
            counts[key] = counts.get(key, 0) + 1
        for (role, state), count in sorted(counts.items()):
            actors.add_metric([role, state], count)
        yield actors


def start_metrics_server(queue, port: int, host: str = "0.0.0.0", workers: Callable[[], int] | None = None):
    """Serve ``/metrics`` (Prometheus text format) from a daemon thread.

    ``port=0`` binds a free port (the command line treats ``--metrics-port 0`` as "off" and never calls this).

    Returns:
        ``(server, port)``: call ``server.shutdown()`` to stop it.
    """
    from prometheus_client import CollectorRegistry, start_http_server  # lazy: see ServiceCollector.collect

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(queue, workers))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
