"""Benchmarks: scripts that print a table with hardware and versions (never timed unit tests)."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

#: the unit files of a merged-objects sweep (Ref-DAVIS-17) store each object's probability as uint16
#: ``round(p * PROB_SCALE)``, zero at or below ``BACKGROUND_PROB`` (the actor writes them, the run reads them)
PROB_SCALE = 65535
BACKGROUND_PROB = 0.1


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as exc:
        logging.getLogger("refstream.bench").debug("cannot read /proc/cpuinfo (%s); using the platform's name", exc)
    return platform.processor() or "unknown"
