"""Every check of a job that needs no model, run before the model loads.

``refstream run`` (and :func:`refstream.pipeline.run_to_folder` when it loads the model itself) calls
:func:`preflight` first: a bad input, a bad option or an ``--out`` that cannot work then fails in about a second,
with exit code 2, before minutes of model loading, and leaves no output folder. The model-dependent checks (the
expression's token count against the LLM's positions, the weights) still come after the load.

This module imports neither the model builder (:mod:`workers.build`) nor :mod:`refstream.pipeline`: a test
checks that a refused run never imported them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from refstream.options import JobOptions, make_method
from refstream.outputs import check_out_folder


@dataclass(frozen=True)
class InputFacts:
    """What :func:`preflight` learnt about the input (from its headers and first frame; nothing else decoded).

    Attributes:
        num_frames: frames in the input; ``sam2_frames`` of them are segmented (after stride / max_frames).
        height, width: frame size in display orientation, pixels.
        rotation: degrees the stored frames are turned (a video's display matrix), 0 for frame folders.
        frame_sizes: stored sizes seen at the keyframes (``"WxH"``; more than one: the size changes mid-stream).
    """

    num_frames: int
    sam2_frames: int
    height: int
    width: int
    rotation: int
    frame_sizes: list[str]


def preflight(input_path: str | os.PathLike, options: JobOptions, out: str | os.PathLike | None = None) -> InputFacts:
    """Check a job without a model: ``out`` (:func:`refstream.outputs.check_out_folder`), the pruning method and
    its options, the input (:func:`video_pipeline.decode.open_video` with PyAV: container, video stream, frame
    size against ``options.max_pixels`` from the headers, frame count, first frame, rotation, resolution
    changes) and the frame plan (``frames``, ``stride``, ``max_frames``).

    The input is opened with PyAV whatever ``options.decoder`` says: these facts do not depend on the decoder,
    and a file decord cannot read is read with PyAV by the run itself (one warning, then).

    Returns:
        the :class:`InputFacts`.

    Raises:
        ConfigError: a bad ``out`` or option; InputError: a missing, unreadable, oversized or empty input.
    """
    from video_pipeline.decode import open_video  # lazy: PyAV and Pillow
    from video_pipeline.plan import plan_frames

    if out is not None:
        check_out_folder(out, input_path)
    make_method(options.method, options.variant)
    with open_video(Path(input_path), "pyav", options.max_pixels) as source:
        plan = plan_frames(source.num_frames, options.frames, options.stride, options.max_frames)
        report = source.decode_report()
        return InputFacts(num_frames=source.num_frames, sam2_frames=len(plan.sam2_indices), height=source.height,
                          width=source.width, rotation=report["rotation"], frame_sizes=report["frame_sizes"])
