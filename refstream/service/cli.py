"""Command-line verbs of the service: ``submit``, ``status``, ``result``, ``cancel``, ``serve`` and
``dead-letters list|requeue|purge``.

The same names exist on :class:`refstream.service.client.RefStreamClient` for Python callers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

from refstream.errors import ConfigError
from refstream.options import JobOptions, add_option_arguments
from refstream.service.logs import configure_logging, quiet_ray_log_prefix

DEFAULT_REDIS_URL = os.environ.get("REFSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0")


def _roots(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]


def add_service_parsers(sub) -> None:
    """Add the service verbs (:data:`SERVICE_COMMANDS`) to the ``refstream`` subcommands."""
    _add_submit_parser(sub)
    _add_job_parsers(sub)
    _add_serve_parser(sub)
    _add_dead_letters_parser(sub)


def _redis_url_option(p: argparse.ArgumentParser) -> None:
    """The Redis connection options of every service verb (:class:`refstream.service.security.RedisSettings`)."""
    p.add_argument("--redis-url", "--redis", dest="redis_url", default=DEFAULT_REDIS_URL,
                   help="redis[s]://[user[:password]@]host:port/db (default $REFSTREAM_REDIS_URL); logged with the "
                        "password masked")
    p.add_argument("--redis-password-file", default=None, metavar="FILE",
                   help="read the Redis password from FILE (default $REFSTREAM_REDIS_PASSWORD) instead of the URL")
    p.add_argument("--redis-ca", default=os.environ.get("REFSTREAM_REDIS_CA"), metavar="FILE",
                   help="rediss://: CA certificate(s) the server's certificate must chain to (verified)")
    p.add_argument("--redis-cert", default=os.environ.get("REFSTREAM_REDIS_CERT"), metavar="FILE",
                   help="rediss://: client certificate (servers with --tls-auth-clients yes)")
    p.add_argument("--redis-key", default=os.environ.get("REFSTREAM_REDIS_KEY"), metavar="FILE",
                   help="rediss://: the client certificate's private key")


def _add_submit_parser(sub) -> None:
    """``refstream submit``: the job's input, expressions and run options, upload and wait."""
    p = sub.add_parser("submit", help="queue a job on the service; prints the job id")
    _redis_url_option(p)
    p.add_argument("input", help="a video under the service's allowed roots (or a local file with --upload)")
    add_option_arguments(p, JobOptions)  # the job's options: the same flags, defaults and checks as refstream run
    p.add_argument("--upload", action="store_true", help="copy the file into the service's upload root first")
    p.add_argument("--upload-root", default=os.environ.get("REFSTREAM_UPLOAD_ROOT"))
    p.add_argument("--max-upload-mb", type=int, default=512)
    p.add_argument("--wait", action="store_true", help="wait until the job ends and print its status")
    p.add_argument("--timeout", type=float, default=3600)


def _add_job_parsers(sub) -> None:
    """``refstream status`` / ``result`` / ``cancel`` of one job id."""
    p = sub.add_parser("status", help="a job's state, frames done of total, per-stage times, error")
    _redis_url_option(p)
    p.add_argument("id")
    p = sub.add_parser("result", help="write a finished job's files (as refstream run does)")
    _redis_url_option(p)
    p.add_argument("id")
    p.add_argument("--out", required=True, metavar="DIR")
    p = sub.add_parser("cancel", help="cancel a queued or running job")
    _redis_url_option(p)
    p.add_argument("id")


def _add_serve_parser(sub) -> None:
    """``refstream serve``: Ray, the pipeline and its pools, resources, input policy, queue, metrics, logs."""
    p = sub.add_parser("serve", help="run queue workers (Ray actors) until SIGTERM")
    _redis_url_option(p)
    p.add_argument("--address", default=None, help="join a Ray cluster (auto or ray://host:port)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker actors (whole) / VideoGLaMM actors and jobs in flight (pools)")
    p.add_argument("--pipeline", default="pools", choices=["pools", "whole"],
                   help="pools (default): decode, CLIP+pruning and VideoGLaMM actor pools, frames streamed in "
                        "chunks; whole: each worker actor runs whole jobs in one process")
    p.add_argument("--decoders", type=int, default=1, help="decode actors (--pipeline pools)")
    p.add_argument("--encoders", type=int, default=1, help="CLIP + pruning actors (--pipeline pools)")
    p.add_argument("--jobs-in-flight", type=int, default=None,
                   help="jobs taken at once (--pipeline pools; default 2 per --workers: the next job decodes and "
                        "encodes while the current one is in SAM2)")
    p.add_argument("--model", default="videoglamm")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per worker actor (pools: per VideoGLaMM actor; default with --device cuda: 0.5 in pools, "
                        "1 in whole; else 0)")
    p.add_argument("--encoder-gpus", type=float, default=None,
                   help="GPUs per encoder actor (pools; default 0.5 with --device cuda, so one VideoGLaMM and one "
                        "encoder actor share a GPU; else 0)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs per actor, also its torch threads (default on a local Ray: this machine's cores / "
                        "--workers, pools: / (--workers + --encoders); 1 with --address)")
    p.add_argument("--allowed-root", action="append", default=_roots(os.environ.get("REFSTREAM_ALLOWED_ROOTS")),
                   help="folder jobs may read from (repeatable; default $REFSTREAM_ALLOWED_ROOTS)")
    p.add_argument("--upload-root", default=os.environ.get("REFSTREAM_UPLOAD_ROOT"))
    p.add_argument("--max-upload-mb", type=int, default=512)
    p.add_argument("--lease-ms", type=int, default=60_000)
    p.add_argument("--max-deliveries", type=int, default=3)
    p.add_argument("--result-ttl-s", type=int, default=7 * 24 * 3600, metavar="S",
                   help="seconds results and job records live after a job ends (default 7 days)")
    # limits at the door: published to Redis, so `submit` refuses a past-limit job; workers check again
    p.add_argument("--max-frames-per-job", type=int, default=0, metavar="N",
                   help="largest job taken: frames to segment (after --stride/--max-frames; default 0 = no limit)")
    p.add_argument("--max-pixels-per-frame", type=int, default=0, metavar="N",
                   help="largest frame taken, width x height (default 0 = no limit of the service; the decoder "
                        "refuses frames above 8K, 33,177,600 pixels)")
    p.add_argument("--max-expressions", type=int, default=16, metavar="N",
                   help="expressions per job (default 16; 0 = no limit)")
    p.add_argument("--max-expression-chars", type=int, default=1000, metavar="N",
                   help="characters per expression (default 1000; 0 = no limit)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("REFSTREAM_METRICS_PORT", 9464)),
                   help="serve Prometheus /metrics on this port (default 9464; 0 = off)")
    p.add_argument("--metrics-host", default=os.environ.get("REFSTREAM_METRICS_HOST", "0.0.0.0"),
                   help="address the metrics server binds (default 0.0.0.0)")
    p.add_argument("--log-format", default=os.environ.get("REFSTREAM_LOG_FORMAT", "text"), choices=["json", "text"],
                   help="json: one JSON object per line (ts, level, event, job_id, consumer, state, seconds, error)")
    p.add_argument("--log-level", default=os.environ.get("REFSTREAM_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _add_dead_letters_parser(sub) -> None:
    """``refstream dead-letters list|requeue|purge``: inspect and replay the jobs that failed."""
    p = sub.add_parser("dead-letters", help="list, requeue or purge the dead jobs (failed: bad input, or retries "
                                            "used up)")
    dsub = p.add_subparsers(dest="dead_action", required=True)
    q = dsub.add_parser("list", help="job id, reason, error, deliveries, time of each dead job")
    _redis_url_option(q)
    q.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    for action, text in (("requeue", "put dead jobs back on the queue (fresh delivery count; each runs once)"),
                         ("purge", "delete dead jobs and their records")):
        q = dsub.add_parser(action, help=text)
        _redis_url_option(q)
        q.add_argument("ids", nargs="*", metavar="JOB_ID")
        q.add_argument("--all", action="store_true", help="every dead job")


SERVICE_COMMANDS = ("submit", "status", "result", "cancel", "serve", "dead-letters")


def limits_from_args(args: argparse.Namespace):
    """``serve``'s :class:`refstream.service.jobs.JobLimits` from its ``--max-*`` flags (0 = no limit).

    Raises:
        ConfigError: a negative limit (named, with its flag).
    """
    from refstream.service.jobs import LIMIT_FLAGS, JobLimits  # lazy: see run_service_command

    values = {}
    for name, (flag, _, _) in LIMIT_FLAGS.items():
        value = getattr(args, name)
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0 (0 = no limit), got {value}. Fix: pass {flag} 0 or a positive "
                              "number.")
        values[name] = value or None
    return JobLimits(**values)


def gpu_shares(args: argparse.Namespace) -> tuple[float, float]:
    """GPUs per VideoGLaMM (or whole-job) actor and per encoder actor for ``serve``: ``--num-gpus`` /
    ``--encoder-gpus`` when given; else with ``--device cuda`` 0.5 + 0.5 in pools (one of each shares a GPU)
    and 1 + 0 in whole; 0 + 0 on the CPU."""
    cuda, pools = args.device == "cuda", args.pipeline == "pools"
    num_gpus = args.num_gpus if args.num_gpus is not None else ((0.5 if pools else 1.0) if cuda else 0.0)
    encoder_gpus = args.encoder_gpus if args.encoder_gpus is not None else (0.5 if cuda and pools else 0.0)
    return num_gpus, encoder_gpus


def run_service_command(args: argparse.Namespace) -> int:
    """Run one of :data:`SERVICE_COMMANDS`."""
    # lazy: ``refstream`` imports this module to build its parser; Redis (client) and Ray, torch (serve) load
    # only when a service verb runs
    from redis.exceptions import AuthenticationError, NoPermissionError

    from refstream.service.client import RefStreamClient
    from refstream.service.security import RedisSettings, check_connection, describe_error

    redis_settings = RedisSettings.from_args(args)
    # a wrong password / CA / cert fails here, fast and clearly (exit 2); serve waits for a Redis that is away
    check_connection(redis_settings, unavailable_ok=args.command == "serve")
    try:
        return _run(args, redis_settings, RefStreamClient)
    except (AuthenticationError, NoPermissionError) as exc:  # later on, e.g. an ACL user lacking a command
        raise describe_error(redis_settings, exc) from None


def _run(args: argparse.Namespace, redis_settings, RefStreamClient) -> int:
    if args.command == "serve":
        from refstream.service.serve import serve  # lazy: see above

        configure_logging(args.log_format, args.log_level)
        if args.log_format == "json":
            quiet_ray_log_prefix()  # before Ray starts: forwarded worker lines stay pure JSON
        num_gpus, encoder_gpus = gpu_shares(args)
        num_cpus = args.num_cpus if args.num_cpus is not None else (1.0 if args.address else None)
        limits = limits_from_args(args)
        serve(redis_settings, address=args.address, workers=args.workers, model=args.model,
              checkpoint=args.checkpoint, device=args.device, allowed_roots=args.allowed_root,
              upload_root=args.upload_root, max_upload_bytes=args.max_upload_mb * 1024 * 1024,
              lease_ms=args.lease_ms, max_deliveries=args.max_deliveries, num_gpus=num_gpus, num_cpus=num_cpus,
              metrics_port=args.metrics_port or None, metrics_host=args.metrics_host,
              log_format=args.log_format, log_level=args.log_level, pipeline=args.pipeline,
              decoders=args.decoders, encoders=args.encoders, jobs_in_flight=args.jobs_in_flight,
              encoder_gpus=encoder_gpus, limits=limits, result_ttl_s=args.result_ttl_s)
        return 0
    if args.command == "dead-letters":
        return _dead_letters(args, RefStreamClient(redis_settings).queue)
    client = RefStreamClient(redis_settings, upload_root=getattr(args, "upload_root", None),
                             max_upload_bytes=getattr(args, "max_upload_mb", 512) * 1024 * 1024)
    if args.command == "submit":
        options = {name: getattr(args, name) for name in JobOptions.model_fields if hasattr(args, name)}
        job = client.submit(args.input, options.pop("expressions", []), upload=args.upload, **options)
        print(job)
        if args.wait:
            status = client.wait(job, timeout_s=args.timeout)
            print(json.dumps(status, indent=2))
            return 0 if status["state"] == "done" else 1
        return 0
    if args.command == "status":
        print(json.dumps(client.status(args.id), indent=2))
        return 0
    if args.command == "result":
        paths = client.result(args.id, args.out)
        print(f"wrote {', '.join(p.name for p in paths)} to {args.out}")
        return 0
    if args.command == "cancel":
        print("cancelled" if client.cancel(args.id) else "already finished")
        return 0
    raise ValueError(args.command)


def _dead_letters(args: argparse.Namespace, queue) -> int:
    """``refstream dead-letters list|requeue|purge`` on ``queue`` (a :class:`refstream.service.queue.JobQueue`).

    Raises:
        ConfigError: ``requeue`` / ``purge`` with neither job ids nor ``--all``, or with both.
        JobNotFound: a job id not in the dead letters (nothing is changed).
    """
    if args.dead_action == "list":
        dead = queue.dead_letters()
        if args.json:
            print(json.dumps(dead, indent=2))
            return 0
        print(format_dead_letters(dead) if dead else "no dead letters")
        return 0
    if bool(args.ids) == bool(args.all):
        raise ConfigError(f"dead-letters {args.dead_action}: name the jobs (JOB_ID ...) or pass --all, not both. "
                          f"Fix: see the ids with `refstream dead-letters list`.")
    ids = None if args.all else args.ids
    done = queue.requeue_dead(ids) if args.dead_action == "requeue" else queue.purge_dead(ids)
    verb = "requeued" if args.dead_action == "requeue" else "purged"
    for dead in done:
        print(f"{verb} {dead['id']}")
    print(f"{len(done)} dead job(s) {verb}")
    return 0


def format_dead_letters(dead: list[dict]) -> str:
    """The ``dead-letters list`` table: job id, reason, deliveries, time (UTC) and the error's first line."""
    rows = [("JOB_ID", "REASON", "DELIVERIES", "TIME (UTC)", "ERROR")]
    for d in dead:
        when = (datetime.datetime.fromtimestamp(float(d["time"]), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                if d.get("time") else "?")
        error = (d.get("error") or "").splitlines()[0] if d.get("error") else ""
        rows.append((d["id"], d.get("reason") or "retries", str(d.get("deliveries", "")), when, error))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
