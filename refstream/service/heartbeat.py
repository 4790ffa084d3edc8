"""Heartbeat records of the service's actors in Redis: their keys and how to read them.

Each actor (a whole-job :class:`refstream.service.worker.QueueWorker`, or a pool actor beating through
:class:`refstream.service.worker.HeartbeatThread`) keeps a hash ``{prefix}:worker:{name}`` with its ``pid``,
``host``, ``role``, ``state``, ``handled``, ``threads``, ``beat`` (Unix time of the last beat) and so on. The
hash expires :data:`HEARTBEAT_TTL_S` after the last beat, so a dead actor's record goes away.

A leaf module (it imports nothing of the project): the metrics exporter (:mod:`refstream.service.metrics`)
reads the heartbeats without importing the workers, which import the queue, which imports the metrics.
"""

from __future__ import annotations

HEARTBEAT_TTL_S = 60  # a worker's heartbeat hash expires this long after its last beat
HEARTBEAT_EVERY_S = 1.0  # beats at most this often


def heartbeat_key(prefix: str, name: str) -> str:
    """The Redis hash a worker named ``name`` keeps its heartbeat in."""
    return f"{prefix}:worker:{name}"


def heartbeats(client, prefix: str = "refstream") -> dict[str, dict]:
    """Every live worker's heartbeat (name -> fields; ``pid``, ``handled``, ``threads``, ``frames_done`` as int,
    ``beat``, ``started`` as float Unix times).

    Args:
        client: a ``redis.Redis`` with ``decode_responses=True``.
        prefix: the queue's key prefix.

    Raises:
        redis.exceptions.RedisError: Redis does not answer.
    """
    out = {}
    for key in client.scan_iter(match=heartbeat_key(prefix, "*"), count=100):
        record = client.hgetall(key)
        if not record:
            continue
        for field in ("pid", "handled", "threads", "frames_done"):
            if field in record:
                record[field] = int(record[field])
        for field in ("beat", "started"):
            if field in record:
                record[field] = float(record[field])
        out[record.get("name") or key.rsplit(":", 1)[-1]] = record
    return out
