"""The Python API: load a model once, then segment videos by referring expressions.

>>> import refstream
>>> segmenter = refstream.load("tiny")                     # or "videoglamm", a config .yaml, a checkpoint folder
>>> result = segmenter.segment("examples/bedroom.mp4", ["the bed"], budget=81, max_frames=8)
>>> result.masks[0].shape                                  # bool [T, H, W] per expression
(8, 540, 960)
>>> for frame_index, masks in segmenter.stream("examples/bedroom.mp4", ["the bed"], max_frames=2):
...     print(frame_index, masks.shape)                    # bool [N, H, W] per frame, bounded memory
0 (1, 540, 960)
1 (1, 540, 960)

Shaped like facebookresearch/sam2's ``build_sam2_video_predictor`` + generator API and transformers'
``from_pretrained``: one build function taking a preset, a config path or a checkpoint folder, a device and a
dtype; results as plain numpy arrays. Every keyword option of :meth:`Segmenter.segment` is a field of
:class:`refstream.options.JobOptions` (same names, defaults and validation as ``refstream run``).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from refstream.config import PRESETS, load_model_config
from refstream.errors import ConfigError
from refstream_errors import api_errors
from refstream.options import JobOptions, ModelOptions
from refstream.outputs import JobWriter, decode_rle
from refstream.pipeline import Pipeline, run_to_folder


def _api(function):
    """Errors raised through a public API function name options as Python arguments (``decoder='pyav'``, not
    ``--decoder pyav``): :func:`refstream_errors.api_errors`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with api_errors():
            return function(*args, **kwargs)

    return wrapper


@dataclass
class Segmentation:
    """What :meth:`Segmenter.segment` returns.

    Attributes:
        masks: per expression, the masks of every segmented frame: bool numpy [T, H, W] (``masks="numpy"``), or
            a list of T COCO RLE dicts ``{"size": [H, W], "counts": str}`` (``masks="rle"``).
        expressions: the N expressions, stripped, in the order of ``masks``.
        answers: the LLM's answer text per expression (e.g. ``"Sure, [SEG]."``).
        frames: names of the T segmented frames; ``frame_indices`` their 0-based indices in the video.
        height, width: frame size in pixels; ``fps`` the source frame rate (None for a frame folder).
        pruning: the pruning report (method, variant, budget, placement, kept_per_frame, unit, ...).
        visual_tokens: visual tokens that went into the LLM; ``llm_sequence_length`` the LLM input length.
        timings: wall seconds per stage (decode, clip, prune, llm, sam2, write).
        random_weights: True for ``tiny``: the masks then carry no meaning.
    """

    masks: list
    expressions: list[str]
    answers: list[str]
    frames: list[str]
    frame_indices: list[int]
    height: int
    width: int
    fps: float | None
    pruning: dict
    visual_tokens: int
    llm_sequence_length: int
    timings: dict[str, float] = field(default_factory=dict)
    random_weights: bool = False
    clips: list[dict] = field(default_factory=list)


class Segmenter:
    """A loaded VideoGLaMM (with LiteLVLM pruning in front) that segments videos; build it with :func:`load`.

    The model is loaded once and reused by every call. Calls run one at a time (not thread-safe).

    Attributes:
        pipeline: the underlying :class:`refstream.pipeline.Pipeline` (``pipeline.device``, ``pipeline.dtype``,
            ``pipeline.config``).
        load_seconds: wall seconds the model took to load.
    """

    def __init__(self, pipeline: Pipeline, load_seconds: float = 0.0):
        self.pipeline = pipeline
        self.load_seconds = load_seconds

    def __repr__(self) -> str:
        config = self.pipeline.config
        return (f"Segmenter(model={config.name!r}, device={str(self.pipeline.device)!r}, "
                f"dtype={str(self.pipeline.dtype).removeprefix('torch.')!r}, random_weights={config.random_weights})")

    @staticmethod
    @_api
    def options(expressions: str | Sequence[str], **options: Any) -> JobOptions:
        """The validated :class:`refstream.options.JobOptions` of a call (a single string is one expression).

        Raises:
            ExpressionError: no expression or an empty one; ConfigError: a bad or unknown option.
        """
        if isinstance(expressions, str):
            expressions = [expressions]
        return JobOptions(expressions=list(expressions), **options)

    @_api
    def segment(self, video: str | os.PathLike, expressions: str | Sequence[str], *,
                masks: Literal["numpy", "rle"] = "numpy", progress: bool = False, **options: Any) -> Segmentation:
        """Segment the objects the ``expressions`` name in every frame of ``video``.

        Args:
            video: a video file (anything FFmpeg reads) or a folder of JPEG/PNG frames sorted by name.
            expressions: one referring expression or several (they share one pruning per frame; each gets its
                own masks).
            masks: ``"numpy"`` for bool [T, H, W] arrays per expression (T*H*W bytes each), ``"rle"`` for COCO
                RLE per frame (small; :func:`refstream.outputs.decode_rle` decodes one).
            progress: show a progress bar on stderr.
            **options: any :class:`refstream.options.JobOptions` field: ``method`` (``"litelvlm"``), ``budget``
                (196 visual tokens per frame of 576), ``placement``, ``variant``, ``frames``, ``clip_length``,
                ``stride``, ``max_frames``, ``decoder``, ``max_pixels`` (frames above it refused from the headers;
                default 8K), ``clip_text``, ``answer``.

        Returns:
            a :class:`Segmentation`.

        Raises:
            InputError: a missing, empty, corrupt or unsupported video. ExpressionError / ConfigError: bad
            options (named, with the fix). SequenceTooLongError: too many visual tokens for the LLM.
        """
        if masks not in ("numpy", "rle"):
            raise ConfigError(f"masks must be 'numpy' or 'rle', got {masks!r}")
        job_options = self.options(expressions, **options)
        job = self.pipeline.stream(video, job_options, progress)
        rle = JobWriter(None, len(job_options.expressions))  # collects COCO RLE, writes no files
        arrays: list[list[np.ndarray]] = [[] for _ in job_options.expressions]
        indices: list[int] = []
        try:
            for item in job:
                indices.append(item.frame_index)
                if masks == "rle":
                    rle.add(None, item.masks)
                else:
                    for i, mask in enumerate(item.masks):
                        arrays[i].append(mask)
        finally:
            job.close()
        result = job.result(rle.masks)
        if masks == "rle":
            out = rle.masks
        else:
            empty = np.zeros((0, result.height, result.width), dtype=bool)
            out = [np.stack(m) if m else empty for m in arrays]
        return Segmentation(
            masks=out, expressions=result.expressions, answers=result.answers, frames=result.frames,
            frame_indices=indices, height=result.height, width=result.width, fps=result.fps,
            pruning=result.pruning, visual_tokens=result.visual_tokens,
            llm_sequence_length=result.llm_sequence_length, timings=result.timings,
            random_weights=result.random_weights, clips=result.clips)

    def stream(self, video: str | os.PathLike, expressions: str | Sequence[str], *, progress: bool = False,
               **options: Any) -> Iterator[tuple[int, np.ndarray]]:
        """Segment frame by frame: yields ``(frame_index, masks)`` as SAM2 produces them.

        ``frame_index`` is the 0-based index of the frame in the video; ``masks`` is bool numpy [N, H, W], one
        per expression. Memory stays bounded however long the video is (one chunk of 8 decoded frames, one
        clip's features, SAM2's memory bank). Leaving the loop early closes the video and the SAM2 session.
        Options and errors as :meth:`segment`.
        """
        with api_errors():
            job = self.pipeline.stream(video, self.options(expressions, **options), progress)
            try:
                for item in job:
                    yield item.frame_index, item.masks
            finally:
                job.close()

    @_api
    def segment_to_folder(self, video: str | os.PathLike, options: JobOptions, out: str | os.PathLike,
                          progress: bool = True, on_frames=None, on_open=None) -> dict:
        """Segment and write ``masks.json``, ``overlay.mp4``, ``tokens.png`` and ``summary.json`` into ``out``
        (what ``refstream run`` and the service write). ``on_frames``/``on_open`` as
        :func:`refstream.pipeline.run_to_folder`.

        Returns:
            the summary dictionary (also written to ``summary.json``).
        """
        return run_to_folder(video, options, out, progress=progress, pipeline=self.pipeline,
                             load_seconds=self.load_seconds, on_frames=on_frames, on_open=on_open)


@_api
def load(model: str | os.PathLike = "videoglamm", *, checkpoint: str | os.PathLike | None = None,
         device: str = "auto", dtype: str = "auto") -> Segmenter:
    """Build a :class:`Segmenter`.

    Args:
        model: ``"tiny"`` (the whole architecture at a few million parameters with seeded random weights: runs
            anywhere, masks carry no meaning), ``"videoglamm"`` (the released model; weights from
            ``checkpoint``, CLIP and SAM2 from their Hugging Face ids or local copies), a path to a model config
            ``.yaml``, or the VideoGLaMM checkpoint folder itself (= ``"videoglamm"`` with ``checkpoint=model``).
        checkpoint: the VideoGLaMM checkpoint folder (overrides the config's).
        device: ``"auto"`` (CUDA when visible), ``"cpu"`` or ``"cuda"``.
        dtype: ``"auto"`` (float32 on the CPU, bfloat16 on CUDA), ``"float32"``, ``"bfloat16"``, ``"float16"``.

    Returns:
        the loaded :class:`Segmenter`.

    Raises:
        ConfigError: unknown preset, unreadable config, bad device/dtype. WeightsNotFoundError: weights missing
        where the config says (the message names the file and the fix).
    """
    model = str(model)
    if model not in PRESETS and Path(model).is_dir():
        model, checkpoint = "videoglamm", model
    options = ModelOptions(model=model, checkpoint=None if checkpoint is None else str(checkpoint),
                           device=device, dtype=dtype)
    started = time.perf_counter()
    config = load_model_config(options.model, options.checkpoint)
    pipeline = Pipeline(config, options.device, options.dtype)
    return Segmenter(pipeline, time.perf_counter() - started)


__all__ = ["Segmentation", "Segmenter", "decode_rle", "load"]
