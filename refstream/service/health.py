"""Container health check of ``refstream serve``: ``python -m refstream.service.health``.

Healthy (exit 0) when the supervisor's ``/metrics`` answers on ``$REFSTREAM_METRICS_PORT`` (default 9464)
and reports ``refstream_redis_up 1``; exit 1 otherwise, with the reason on stderr. Used by the Dockerfiles'
``HEALTHCHECK``.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def check(port: int | None = None, host: str = "127.0.0.1", timeout: float = 5.0) -> str | None:
    """None when healthy, else the reason."""
    port = port or int(os.environ.get("REFSTREAM_METRICS_PORT", "9464"))
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    except OSError as exc:
        return f"metrics endpoint on port {port} does not answer: {exc}"
    for line in text.splitlines():
        if line.startswith("refstream_redis_up "):
            return None if float(line.split()[1]) == 1 else "Redis does not answer the service"
    return "no refstream_redis_up in /metrics"


def main() -> int:
    reason = check()
    if reason:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
