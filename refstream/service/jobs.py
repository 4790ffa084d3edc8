"""Job payloads of the service: validated JSON (never pickle), and where inputs may come from.

A job names an input video (a path under one of the service's allowed roots, or an uploaded file copied
into the upload root within a size limit), one or more referring expressions and the pruning options of
``refstream run``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

from pydantic import Field

from refstream.errors import ConfigError, InputError, RefStreamError
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
        limits: the largest job taken (:class:`JobLimits`; None: no limits), checked by :meth:`admit`.
    """

    def __init__(self, allowed_roots, upload_root=None, max_upload_bytes: int = 512 * 1024 * 1024,
                 limits: "JobLimits | None" = None):
        self.limits = limits or JobLimits()
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

    def admit(self, request: JobRequest) -> str:
        """The worker's check of a job before it runs: its input under an allowed root (:meth:`check`), then the
        :attr:`limits` (expressions; frames and frame size from a probe of the input when such a limit is set).
        Returns the resolved input path.

        Raises:
            InputError: outside the allowed roots, or an unreadable input; JobLimitError: past a limit (the same
                message ``submit`` gives).
        """
        path = self.check(request.input)
        self.limits.check_request(request)
        self.limits.check_input(request, path)
        return path

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


class JobLimitError(RefStreamError):
    """A job is larger than the service accepts (:class:`JobLimits`): refused at ``submit`` (nothing is queued)
    or, when it slipped past (no limits published yet, an unreachable input), failed by the worker before it
    runs, with the same message."""


#: ``JobLimits`` field -> (the ``refstream serve`` flag, what it counts, the client's fix)
LIMIT_FLAGS = {
    "max_frames_per_job": ("--max-frames-per-job", "frames",
                           "ask for fewer frames (submit --max-frames N or a larger --stride; Python: max_frames=, "
                           "stride=)"),
    "max_pixels_per_frame": ("--max-pixels-per-frame", "pixels per frame",
                             "downscale the video first, e.g. ffmpeg -i IN -vf scale=1280:-2 OUT"),
    "max_expressions": ("--max-expressions", "expressions", "split the expressions over several jobs"),
    "max_expression_chars": ("--max-expression-chars", "characters in one expression", "shorten the expression"),
}


@dataclass(frozen=True)
class JobLimits:
    """The largest job a service accepts (``refstream serve --max-frames-per-job`` ...); None = no limit.

    ``serve`` publishes them to the Redis hash ``{prefix}:limits`` (:meth:`refstream.service.queue.JobQueue.
    publish_limits`); ``submit`` reads them and refuses a past-limit job before anything is queued (probing the
    input's frames and size when it can reach the file, :func:`probe_input`), and the worker checks every job
    again before running it (its check is the authoritative one). Both raise the same :class:`JobLimitError`.

    Attributes:
        max_frames_per_job: frames a job may segment (after ``stride`` and ``max_frames``).
        max_pixels_per_frame: width x height of the input's frames, pixels.
        max_expressions: referring expressions in one job.
        max_expression_chars: characters (Unicode code points, after stripping) in one expression.
    """

    max_frames_per_job: int | None = None
    max_pixels_per_frame: int | None = None
    max_expressions: int | None = None
    max_expression_chars: int | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag = LIMIT_FLAGS[f.name][0]
                raise ConfigError(f"{f.name} must be an integer >= 1 or None (no limit), got {value!r}. "
                                 f"Fix: pass {flag} N with N >= 1, or 0 for no limit.")

    @classmethod
    def from_mapping(cls, mapping: dict | None) -> "JobLimits":
        """From the ``{prefix}:limits`` hash (strings; ``0``, empty or missing = no limit; unknown keys ignored)."""
        mapping = mapping or {}
        values = {}
        for f in fields(cls):
            raw = mapping.get(f.name)
            values[f.name] = int(raw) or None if raw not in (None, "") else None
        return cls(**values)

    def to_mapping(self) -> dict[str, int]:
        """The ``{prefix}:limits`` hash: every field, 0 for no limit."""
        return {f.name: getattr(self, f.name) or 0 for f in fields(self)}

    @property
    def needs_input(self) -> bool:
        """True when a limit needs the input's frames or frame size (:meth:`check_input`)."""
        return self.max_frames_per_job is not None or self.max_pixels_per_frame is not None

    def _refuse(self, name: str, actual: int, what: str = "") -> JobLimitError:
        flag, counted, fix = LIMIT_FLAGS[name]
        limit = getattr(self, name)
        return JobLimitError(
            f"job refused: {what}{actual:,} {counted}, above this service's limit of {limit:,} "
            f"(refstream serve {flag} {limit}). Fix: {fix}, or ask the operator to raise {flag}.")

    def check_request(self, request) -> None:
        """The limits a request shows by itself: expressions and their length.

        Raises:
            JobLimitError: naming the limit (the ``serve`` flag), its value and the job's value.
        """
        expressions = list(request.expressions)
        if self.max_expressions is not None and len(expressions) > self.max_expressions:
            raise self._refuse("max_expressions", len(expressions))
        if self.max_expression_chars is not None:
            for i, text in enumerate(expressions):
                if len(text) > self.max_expression_chars:
                    raise self._refuse("max_expression_chars", len(text), f"expression {i + 1} has ")

    def check_video(self, request, num_frames: int, width: int, height: int) -> None:
        """The limits on the input: frames the job would segment and pixels per frame.

        Args:
            request: the job's :class:`JobRequest` (``stride``, ``max_frames``).
            num_frames, width, height: of the input video (:func:`probe_input`).

        Raises:
            JobLimitError: naming the limit, its value and the job's value.
        """
        if self.max_pixels_per_frame is not None and width * height > self.max_pixels_per_frame:
            raise self._refuse("max_pixels_per_frame", width * height, f"frames of {width}x{height} = ")
        frames = planned_frames(num_frames, request.stride, request.max_frames)
        if self.max_frames_per_job is not None and frames > self.max_frames_per_job:
            raise self._refuse("max_frames_per_job", frames, "it would segment ")

    def check_input(self, request, path: str | os.PathLike) -> None:
        """:meth:`check_video` of the input at ``path`` (probed: :func:`probe_input`); nothing when no frames /
        pixels limit is set.

        Raises:
            JobLimitError: past a limit; InputError: the input cannot be read (from video_pipeline).
        """
        if self.needs_input:
            self.check_video(request, *probe_input(path))


def planned_frames(num_frames: int, stride: int = 1, max_frames: int | None = None) -> int:
    """Frames a job segments: every ``stride``-th of ``num_frames``, at most ``max_frames`` (as
    :func:`video_pipeline.plan.plan_frames` plans them)."""
    frames = len(range(0, num_frames, max(1, stride)))
    return min(frames, max_frames) if max_frames else frames


def probe_input(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(num_frames, width, height)`` of a video file or frame folder, cheaply: a file's container is indexed
    by :func:`video_pipeline.video_file.probe` (packets demuxed, only the first frame decoded); a folder's
    images by their headers (:class:`video_pipeline.decode.FrameFolder`). No pixel limit is applied here.

    Raises:
        InputError: missing path, not a video, corrupt, no frames (video_pipeline's messages).
    """
    from video_pipeline.decode import FrameFolder, input_error  # lazy: PyAV, Pillow, numpy
    from video_pipeline.video_file import probe

    path = Path(path)
    if path.is_dir():
        folder = FrameFolder(path, max_pixels=None)
        return folder.num_frames, folder.width, folder.height
    if not path.is_file():
        raise input_error(path, "no such file or folder", "check the path; pass a video file or a folder of frames")
    info = probe(path, max_pixels=None)
    return info.num_frames, info.width, info.height
