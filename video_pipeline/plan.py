"""Which frames go to SAM2 and which to the CLIP / InternVideo2 encoders.

VideoGLaMM's rule (github.com/mbzuai-oryx/VideoGLaMM, commit 6b15b1e7f75009d0e1a858ac08e28021c4faaf11):

* ``VideoGLaMM/chat.py`` ``preprocess_vision``: SAM2 gets *every* frame of the clip; the encoders get
  ``np.linspace(0, T-1, NUM_FRAMES, dtype=int)`` of them **only when T > NUM_FRAMES** (float linspace,
  then cast to int, i.e. floor for these non-negative values), otherwise all T frames;
* ``VideoGLaMM/utils/enc_preprocessors.py`` ``EncPreprocessor_VideoGPTPlus.preprocess``: a list shorter than
  ``NUM_FRAMES`` is padded by appending its last frame until it has ``NUM_FRAMES`` frames;
* ``VideoGLaMM/model/videogpt_plus/constants.py``: ``NUM_FRAMES = 16`` (env ``NUM_FRAMES``).

So for ``T' <= 16`` the encoder frames are ``0, 1, ..., T'-1, T'-1, ..., T'-1`` (not a linspace with
repeats), and for ``T' > 16`` they are ``floor(linspace(0, T'-1, 16))``. Ref-DAVIS evaluation
(``VideoGLaMM/eval_referdavis_infer.py``) applies this per 64-frame clip.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from refstream_errors import ConfigError, InputError


@dataclass(frozen=True)
class FramePlan:
    """Frame indices for one clip.

    Attributes:
        num_frames: frames ``T`` in the source video.
        stride: step between SAM2 frames (1 = every frame).
        sam2_indices: source frame indices SAM2 segments, ascending: ``range(0, T, stride)[:max_frames]``.
        encoder_indices: source frame indices for the CLIP and InternVideo2 encoders, always
            ``num_encoder_frames`` long, non-decreasing (the last one repeats when there are too few frames);
            each is one of ``sam2_indices``.
        encoder_positions: positions of ``encoder_indices`` within ``sam2_indices``
            (``sam2_indices[encoder_positions[k]] == encoder_indices[k]``).
    """

    num_frames: int
    stride: int
    sam2_indices: list[int]
    encoder_indices: list[int]
    encoder_positions: list[int]


def _positive_int(name: str, value: object, error: type[Exception], fix: str = "pass a positive integer") -> int:
    message = f"{name} must be an integer >= 1, got {value!r}. Fix: {fix}."
    if isinstance(value, bool):
        raise error(message)
    try:
        number = operator.index(value)
    except TypeError:
        raise error(message) from None
    if number < 1:
        raise error(message)
    return number


def encoder_positions(num_sam2_frames: int, num_encoder_frames: int = 16) -> list[int]:
    """Positions (into a clip of ``num_sam2_frames`` frames) of the frames fed to the encoders.

    VideoGLaMM's rule: ``floor(np.linspace(0, n-1, k))`` when ``n > k``; otherwise ``0..n-1`` padded with
    ``n-1`` to length ``k``. Returns a list of ``k`` ints in ``[0, n)``. Raises ConfigError for ``n < 1``
    or ``k < 1``.
    """
    n = _positive_int("num_sam2_frames", num_sam2_frames, ConfigError)
    k = _positive_int("num_encoder_frames", num_encoder_frames, ConfigError)
    if n > k:
        return [int(p) for p in np.floor(np.linspace(0, n - 1, k))]
    return list(range(n)) + [n - 1] * (k - n)


def plan_frames(
    num_frames: int, num_encoder_frames: int = 16, stride: int = 1, max_frames: int | None = None
) -> FramePlan:
    """Plan the SAM2 and encoder frames of a clip of ``num_frames`` frames.

    Args:
        num_frames: frames in the source (``VideoSource.num_frames``), >= 1.
        num_encoder_frames: frames for CLIP / InternVideo2 (VideoGLaMM: 16), >= 1.
        stride: keep every ``stride``-th frame for SAM2, >= 1.
        max_frames: keep at most this many SAM2 frames (the first ones), >= 1, or ``None`` for all.

    Returns:
        A :class:`FramePlan`.

    Raises:
        InputError: ``num_frames < 1`` (an empty video).
        ConfigError: ``num_encoder_frames``, ``stride`` or ``max_frames`` not a positive integer.

    Source: VideoGLaMM (mbzuai-oryx/VideoGLaMM @ 6b15b1e7f75009d0e1a858ac08e28021c4faaf11),
    ``VideoGLaMM/chat.py::preprocess_vision`` and
    ``VideoGLaMM/utils/enc_preprocessors.py::EncPreprocessor_VideoGPTPlus`` (see the module docstring).
    """
    num_frames = _positive_int("num_frames", num_frames, InputError, "the video has no frames; check the input")
    stride = _positive_int("stride", stride, ConfigError)
    if max_frames is not None:
        max_frames = _positive_int("max_frames", max_frames, ConfigError)
    sam2 = list(range(0, num_frames, stride))[:max_frames]
    positions = encoder_positions(len(sam2), num_encoder_frames)
    return FramePlan(
        num_frames=num_frames,
        stride=stride,
        sam2_indices=sam2,
        encoder_indices=[sam2[p] for p in positions],
        encoder_positions=positions,
    )
