"""Job payloads of the service: validated JSON (never pickle), and where inputs may come from.

A job names an input video (a path under one of the service's allowed roots, or an uploaded file copied
into the upload root within a size limit), one or more referring expressions and the pruning options of
``refstream run``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pydantic import Field

from refstream.errors import InputError
from refstream.options import JobOptions
from refstream.outputs import atomic_file

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


class JobRequest(JobOptions):
    """What a client asks for: the job's ``input`` plus every :class:`refstream.options.JobOptions` field
    (expressions, method, budget, variant, placement, frames, clip_length, stride, max_frames, decoder,
    clip_text, answer) with the same defaults and validation as ``refstream run``. The model, device and
    precision are the service's (``refstream serve --model``)."""

    input: str = Field(description="path of the video file or frame folder, under the service's allowed roots")

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobRequest":
        """Parse and validate a payload.

        Raises:
            ExpressionError: an empty expression; ConfigError: any other invalid or unknown field (named).
        """
        return cls.parse(text)


def new_job_id() -> str:
    """A fresh job id (32 hex digits)."""
    return uuid.uuid4().hex


def resolve_input(path: str | os.PathLike) -> Path:
    """``path`` absolute, with ``~``, symbolic links and ``..`` resolved.

    Raises:
        InputError: a symbolic-link loop (Python raises RuntimeError or OSError for it), named with the fix.
    """
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:
        raise InputError(f"{path}: the path cannot be resolved ({e}). Fix: remove the symbolic-link loop or name "
                         "the file itself.") from None


class InputPolicy:
    """Where job inputs may come from.

    Args:
        allowed_roots: folders whose files (at any depth) jobs may name. Paths are resolved (symlinks and
            ``..`` followed) before the check, so nothing outside escapes through them.
        upload_root: where uploaded files are copied (must be readable by every worker); it is allowed too.
        max_upload_bytes: size limit of an uploaded file.
    """

    def __init__(self, allowed_roots, upload_root=None, max_upload_bytes: int = 512 * 1024 * 1024):
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self.upload_root = Path(upload_root).resolve() if upload_root else None
        if self.upload_root is not None:
            self.allowed_roots.append(self.upload_root)
        self.max_upload_bytes = max_upload_bytes

    def check(self, path: str | os.PathLike) -> str:
        """Return the resolved path if it lies under an allowed root.

        Raises:
            InputError: the path is outside every allowed root (the message lists them).
        """
        resolved = resolve_input(path)
        for root in self.allowed_roots:
            if resolved == root or root in resolved.parents:
                return str(resolved)
        roots = ", ".join(str(r) for r in self.allowed_roots) or "(none configured)"
        raise InputError(
            f"{path}: refused, the service only reads inputs under its allowed roots ({roots}). "
            f"Fix: put the file under one of them, or upload it (submit --upload)."
        )

    def upload(self, path: str | os.PathLike) -> str:
        """Copy a local file into the upload root and return the stored path.

        Raises:
            InputError: no upload root, a missing file, or a file over the size limit.
        """
        source = Path(path)
        if self.upload_root is None:
            raise InputError(f"{path}: this service accepts no uploads; name a file under its allowed roots")
        if not source.is_file():
            raise InputError(f"{path}: no such file to upload")
        size = source.stat().st_size
        if size > self.max_upload_bytes:
            raise InputError(
                f"{path}: {size} bytes is over the upload limit of {self.max_upload_bytes} bytes; "
                f"put the file under an allowed root instead"
            )
        self.upload_root.mkdir(parents=True, exist_ok=True)
        target = self.upload_root / f"{new_job_id()}{source.suffix}"
        with source.open("rb") as src, atomic_file(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return str(target)
