"""A finished job's result as stored in Redis: the ``refstream run`` output files, base64-encoded in JSON.

``{"summary": {...}, "files": {name: base64 text}, "seconds": float}``; :func:`pack_outputs` builds the
``files`` part from a job's output folder on the worker side, :func:`write_result` unpacks it on the client
side (``refstream result``). A leaf module, so that the client does not import the workers (and torch).
"""

from __future__ import annotations

import base64
from pathlib import Path

from refstream.outputs import OUTPUT_FILES  # the files every job writes, as ``refstream run`` does (no torch)


def pack_outputs(folder: str | Path) -> dict[str, str]:
    """``{name: base64 text}`` of the :data:`OUTPUT_FILES` in ``folder``.

    Raises:
        FileNotFoundError: one of the files is missing (the job did not write it).
    """
    folder = Path(folder)
    return {name: base64.b64encode((folder / name).read_bytes()).decode("ascii") for name in OUTPUT_FILES}


def write_result(result: dict, out: str | Path) -> list[Path]:
    """Unpack a job result into ``out`` (created if needed): the same files ``refstream run`` writes.

    Returns:
        The paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in result["files"].items():
        path = out / name
        path.write_bytes(base64.b64decode(data))
        written.append(path)
    return written
