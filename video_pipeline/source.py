"""The frame-source interface shared by every reader: :class:`VideoSource` and :func:`input_error`.

:mod:`video_pipeline.decode` (frame folders, :func:`~video_pipeline.decode.open_video`) and
:mod:`video_pipeline.video_file` (PyAV and decord readers) both build on this module, so neither imports the
other's internals; ``video_pipeline.decode`` re-exports both names.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from refstream_errors import InputError

__all__ = ["VideoSource", "input_error"]


def input_error(path: Path | str, problem: str, fix: str) -> InputError:
    """Build an :class:`InputError` whose message reads ``"<path>: <problem>. Fix: <fix>."``."""
    return InputError(f"{path}: {problem.rstrip('.')}. Fix: {fix.rstrip('.')}.")


class VideoSource(ABC):
    """A readable sequence of RGB frames of one size.

    Attributes:
        path: the video file or frame folder.
        num_frames: number of frames ``T`` (>= 1).
        fps: average frames per second for a video file; ``None`` for a frame folder.
        height, width: original frame size in pixels.
        frame_names: one name per frame: ``"00000"``, ``"00001"``, ... for a video file, the file stems
            for a folder (used to name output masks).
        decoder_used: ``decord``, ``pyav`` (also when decord could not read the file and PyAV did) or
            ``frames`` (a folder of images).
        rotation: degrees (0, 90, 180, 270) the stored frames were turned counter-clockwise into display
            orientation (a video file's display matrix; ``height``/``width`` are the displayed size).
        frame_sizes: stored (width, height) sizes seen so far, first-appearance order (the first is the size
            every frame is read at, before ``rotation``; more than one after a mid-stream resolution change).
        frames_resized: frames read so far whose stored size differed from the first (resized to it).
        frames_damaged: frames read so far that the decoder reported errors for (FFmpeg concealed them), or
            None when the decoder cannot tell.

    Use as a context manager or call :meth:`close` to release the file handles.
    """

    path: Path
    num_frames: int
    fps: float | None
    height: int
    width: int
    frame_names: list[str]
    decoder_used: str = "frames"
    rotation: int = 0

    _closed: bool = False

    @property
    def frame_sizes(self) -> list[tuple[int, int]]:
        return [(self.width, self.height)]

    @property
    def frames_damaged(self) -> int | None:
        return 0

    @property
    def frames_resized(self) -> int:
        return 0

    def decode_report(self) -> dict:
        """What decoding did, for ``masks.json`` / ``summary.json``: ``decoder`` (:attr:`decoder_used`),
        ``rotation`` (degrees), ``frame_sizes`` (``"WxH"`` strings, stored sizes seen), ``resized_frames`` and
        ``frames_damaged`` (counts over the frames read so far; the latter None when unknown)."""
        return {"decoder": self.decoder_used, "rotation": int(self.rotation),
                "frame_sizes": [f"{w}x{h}" for w, h in self.frame_sizes], "resized_frames": int(self.frames_resized),
                "frames_damaged": self.frames_damaged}

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Read the frames at ``indices`` (any order, repeats allowed).

        Args:
            indices: frame indices in ``[0, num_frames)``.

        Returns:
            ``np.uint8`` array ``[len(indices), height, width, 3]``, RGB, in the order of ``indices``.

        Raises:
            IndexError: an index is out of range; TypeError: an index is not an integer;
            ValueError: the source is closed; InputError: the decoder failed (the message names the frame).
        """
        if self._closed:
            raise ValueError(f"{self.path}: read() on a closed {type(self).__name__}")
        wanted = [operator.index(i) for i in indices]
        for i in wanted:
            if not 0 <= i < self.num_frames:
                raise IndexError(f"{self.path}: frame index {i} is out of range [0, {self.num_frames})")
        if not wanted:
            return np.empty((0, self.height, self.width, 3), dtype=np.uint8)
        unique = sorted(set(wanted))
        frames = self._read_sorted(unique)
        if unique == wanted:
            return frames
        row = {frame_index: k for k, frame_index in enumerate(unique)}
        return frames[[row[i] for i in wanted]]

    def iter_chunks(self, indices: Sequence[int], chunk_size: int = 16) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield ``(chunk_indices, frames)`` for consecutive slices of ``indices`` (order kept).

        ``frames`` is ``uint8 [len(chunk_indices), H, W, 3]``; at most ``chunk_size`` frames are in
        memory at a time (plus what the decoder buffers). Sorted indices are decoded in one forward pass.

        Raises:
            ValueError: ``chunk_size < 1``; otherwise as :meth:`read`.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        indices = [operator.index(i) for i in indices]
        for start in range(0, len(indices), chunk_size):
            chunk = indices[start : start + chunk_size]
            yield chunk, self.read(chunk)

    @abstractmethod
    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        """Read sorted, unique, in-range indices -> ``uint8 [len(indices), H, W, 3]``."""

    def close(self) -> None:
        """Release file handles. Further reads raise ``ValueError``; closing twice is fine."""
        self._closed = True

    def __len__(self) -> int:
        return self.num_frames

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        fps = "None" if self.fps is None else f"{self.fps:g}"
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, num_frames={self.num_frames}, "
            f"size={self.width}x{self.height}, fps={fps})"
        )
