"""The model calls of live tracking behind one small interface, in this process or in a Ray actor.

:class:`refstream.live.engine.LiveEngine` never touches the model itself: it asks a :class:`LiveModel` to

* :meth:`LiveModel.ground` a prompt: encoder frames (uint8 [T, H, W, 3] RGB, chosen by the engine) and the
  expressions -> CLIP, the pruning method (one selection for every expression), InternVideo2, the LLM answer ->
  a :class:`Grounding` (one [SEG] embedding per expression, or None, and the tokens view);
* :meth:`LiveModel.open_track` a SAM2 stream under a key (one per engine), anchored on the grounding's newest
  frame (the prompt frame), :meth:`LiveModel.step` it frame by frame (bool masks [N, H, W]) and
  :meth:`LiveModel.close_track` it.

Two implementations:

* :class:`LocalLiveModel`: a loaded :class:`refstream.pipeline.Pipeline` in this process; a lock serialises
  every model call (CLIP's feature hooks and SAM2's anchor hook live on the model, not on the call), so the
  engines of several sessions can share one model. ``refstream live`` without ``--ray`` uses it; the VideoGLaMM
  GPU worker actor (:class:`refstream.service.gpu_worker.VideoGLaMMWorker`, ``live_*`` methods) holds one too.
* :class:`RayLiveModel`: the same calls on that actor (``ray.get``, blocking: call it from the engine's
  threads, never from an event loop). Frames travel as uint8 arrays, masks come back bit-packed.

Errors: everything a session can cause (a track unknown, closed or evicted, the track limit reached, a frame
of another size than the anchor, the worker gone) is a :class:`LiveModelError`, a
:class:`refstream.errors.RefStreamError`: the engine reports it as status ``error`` and goes on; a failing
track is closed, the other tracks are untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from refstream.errors import RefStreamError
from refstream.options import LiveOptions, make_method
from refstream.outputs import logits_to_mask, render_tokens
from refstream.pipeline import Pipeline, clip_view
from video_pipeline.preprocess import sam2_preprocess
from workers.sam2_decoder import Sam2VideoDecoder

__all__ = ["Grounding", "LiveModel", "LiveModelError", "LocalLiveModel", "RayLiveModel", "pack_masks", "unpack_masks"]

log = logging.getLogger("refstream.live")


class LiveModelError(RefStreamError):
    """A live session's model call failed (unknown or evicted track, track limit, frame size changed, the
    worker died or timed out); the message says what to do. Other sessions are not affected."""


@dataclass
class Grounding:
    """A prompt turned into SAM2 prompts.

    Attributes:
        expressions: the N expressions.
        embeddings: per expression the [SEG] embedding, float [C] (C = SAM2 prompt size: 256 full, 128 tiny),
            or None when the answer has no [SEG] (that expression gets empty masks).
        texts: per expression the LLM's answer text.
        view: uint8 [336, 336, 3], the first CLIP input frame with the kept visual tokens drawn as ``tokens.png``
            draws them (:func:`refstream.outputs.render_tokens`: pruned areas dimmed, similarity-aware tokens
            red, context tokens green).
    """

    expressions: list[str]
    embeddings: list[torch.Tensor | None]
    texts: list[str]
    view: np.ndarray

    def to_cpu(self) -> "Grounding":
        """The same grounding with the embeddings on the CPU (to send it to another process)."""
        return Grounding(list(self.expressions), [None if e is None else e.detach().cpu() for e in self.embeddings],
                         list(self.texts), self.view)


class LiveModel(ABC):
    """The model calls of a :class:`refstream.live.engine.LiveEngine` (see the module docstring).

    Attributes:
        num_frames: encoder frames a grounding takes at most (the engine's ring buffer length; 16).
    """

    num_frames: int

    @abstractmethod
    def describe(self) -> dict:
        """``name``, ``random_weights``, ``device`` of the model and ``runs_in`` (``process`` or ``ray actor``);
        answered without a model call (safe on an event loop)."""

    @abstractmethod
    def ground(self, images: np.ndarray, expressions: list[str], options: LiveOptions) -> Grounding:
        """CLIP, pruning, InternVideo2 and the LLM over the encoder frames.

        Args:
            images: uint8 [T, H, W, 3] RGB, the encoder frames in time order (T <= ``num_frames``).
            expressions: N >= 1 cleaned expressions.
            options: the pruning and prompt options (``method``, ``variant``, ``budget``, ``placement``,
                ``answer``, ``clip_text``).

        Raises:
            ConfigError: bad method options. SequenceTooLongError: too many visual tokens for the LLM.
            LiveModelError: the worker failed.
        """

    @abstractmethod
    def open_track(self, key: str, grounding: Grounding, image: np.ndarray) -> None:
        """Open a SAM2 stream under ``key`` (closing the one there) anchored on ``image`` (uint8 [H, W, 3], the
        grounding's newest frame; its masks are not returned). Later frames must have the same H, W.

        Raises:
            LiveModelError: the track limit is reached, or the worker failed.
        """

    @abstractmethod
    def step(self, key: str, image: np.ndarray) -> np.ndarray:
        """The next frame (uint8 [H, W, 3]) of the track ``key``: bool masks [N, H, W], one per expression of its
        grounding (all False for an answer without [SEG]).

        Raises:
            LiveModelError: no such track (closed, evicted, or the worker restarted: prompt again), a frame of
                another size than the anchor, or the step failed (the track is then closed).
        """

    @abstractmethod
    def close_track(self, key: str) -> None:
        """Close the track ``key`` and free its SAM2 memory (nothing when there is none). Never raises."""


@dataclass
class _Track:
    stream: object | None  # a Sam2Stream, or None when no expression has a [SEG]
    prompted: list[int]  # indices of the expressions with a [SEG] (the stream's objects, in order)
    count: int  # N
    size: tuple[int, int]  # (H, W) of the anchor frame
    used: float  # time.monotonic() of the last step


class LocalLiveModel(LiveModel):
    """:class:`LiveModel` on a loaded :class:`refstream.pipeline.Pipeline` in this process.

    Every model call holds ``lock`` (share one lock between everything that uses this model). Tracks are kept
    in a dict by key; at most ``max_tracks`` open at once: when full, opening one evicts the least recently
    stepped track if it has been idle for ``idle_evict_s`` seconds (a session that went away without
    closing), else fails with :class:`LiveModelError`.

    Args:
        pipeline: a loaded pipeline with CLIP, InternVideo2, the LLM and SAM2 (``parts="all"``).
        lock: held during every model call (default: a new lock).
        max_tracks: SAM2 streams open at once (None: no limit).
        idle_evict_s: when full, a track idle this long may be evicted.
    """

    def __init__(self, pipeline: Pipeline, lock: threading.Lock | None = None, *, max_tracks: int | None = None,
                 idle_evict_s: float = 60.0):
        self.pipeline = pipeline
        self.lock = lock or threading.Lock()
        self.decoder = Sam2VideoDecoder(pipeline.model.sam2)
        self.num_frames = int(pipeline.config.num_frames)
        self.max_tracks, self.idle_evict_s = max_tracks, idle_evict_s
        self._tracks: dict[str, _Track] = {}
        #: frames stepped, over every track
        self.frames = 0

    def describe(self) -> dict:
        config = self.pipeline.config
        return {"name": config.name, "random_weights": config.random_weights, "device": str(self.pipeline.device),
                "runs_in": "process"}

    @property
    def tracks(self) -> int:
        """Tracks open now."""
        return len(self._tracks)

    def ground(self, images: np.ndarray, expressions: list[str], options: LiveOptions) -> Grounding:
        method = make_method(options.method, options.variant)
        pipeline = self.pipeline
        with self.lock:
            video = pipeline.encode_frames(np.ascontiguousarray(images), with_scores=method.needs_scores,
                                           with_penultimate=method.needs_penultimate)
            answer = pipeline.answer(video, method, options.budget, options.placement, list(expressions),
                                     options.answer, options.clip_text, seed=options.seed)
        answers = answer.answers
        selection = answer.selection
        view = np.asarray(render_tokens(clip_view(video.clip_pixels), selection.indices[0].cpu().numpy(),
                                        selection.similarity_aware[0].cpu().numpy(), selection.grid, scale=1))
        return Grounding(list(expressions), [a.embedding for a in answers], [a.text for a in answers], view)

    def open_track(self, key: str, grounding: Grounding, image: np.ndarray) -> None:
        prompted = [i for i, e in enumerate(grounding.embeddings) if e is not None]
        size = (int(image.shape[0]), int(image.shape[1]))
        with self.lock:
            self._close(key)
            self._make_room()
            stream = None
            if prompted:
                seg = torch.stack([grounding.embeddings[i] for i in prompted])
                stream = self.decoder.open_stream(seg.to(self.pipeline.device), size)
                try:
                    stream.step(self._pixels(image))  # the anchor frame carries the prompt
                except BaseException:
                    stream.close()
                    raise
            self._tracks[key] = _Track(stream, prompted, len(grounding.embeddings), size, time.monotonic())

    def step(self, key: str, image: np.ndarray) -> np.ndarray:
        size = (int(image.shape[0]), int(image.shape[1]))
        with self.lock:
            track = self._tracks.get(key)
            if track is None:
                raise LiveModelError(f"no live track {key!r} (closed, evicted, or the model worker restarted): "
                                     f"prompt again")
            if size != track.size:
                self._close(key)
                raise LiveModelError(f"the frame size changed from {track.size[1]}x{track.size[0]} to "
                                     f"{size[1]}x{size[0]} while tracking: prompt again")
            logits = None
            if track.stream is not None:
                try:
                    logits = track.stream.step(self._pixels(image))
                except BaseException:
                    self._close(key)  # a failed stream is not stepped again; other tracks go on
                    raise
            track.used = time.monotonic()
            self.frames += 1
        masks = np.zeros((track.count, *size), dtype=bool)
        if logits is not None:  # outside the lock: the model is free for the next call meanwhile
            for k, i in enumerate(track.prompted):
                masks[i] = logits_to_mask(logits[k].float().cpu(), size)
        return masks

    def close_track(self, key: str) -> None:
        with self.lock:
            self._close(key)

    def _close(self, key: str) -> None:
        track = self._tracks.pop(key, None)
        if track is not None and track.stream is not None:
            track.stream.close()

    def _make_room(self) -> None:
        if self.max_tracks is None or len(self._tracks) < self.max_tracks:
            return
        key, track = min(self._tracks.items(), key=lambda item: item[1].used)
        idle = time.monotonic() - track.used
        if idle < self.idle_evict_s:
            raise LiveModelError(f"the model already tracks for {len(self._tracks)} live sessions (its limit): "
                                 f"close another page, or start refstream live with a larger --max-sessions")
        self._close(key)

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> SAM2 input float [3, S, S] on the model's device and dtype."""
        pixels = sam2_preprocess(image[None], style=self.pipeline.sam2_style, size=self.decoder.image_size)[0]
        return pixels.to(self.pipeline.device, self.pipeline.model.dtype)


class RayLiveModel(LiveModel):
    """:class:`LiveModel` calls on a VideoGLaMM GPU worker actor (:func:`refstream.service.gpu_worker.gpu_worker_class`
    loaded with ``parts="all"``): ``live_ground``, ``live_open``, ``live_step``, ``live_close``.

    The calls block (``ray.get``): make them from plain threads (the engine's), never from an event loop. The
    actor runs one call at a time, so the sessions of every replica share it like the lock of
    :class:`LocalLiveModel`. Ray failures (actor died, timeout, an unexpected error in the actor) become
    :class:`LiveModelError`; a :class:`refstream.errors.RefStreamError` raised in the actor is raised as itself.

    Args:
        actor: the worker's actor handle.
        info: the actor's ``live_info()`` when already fetched (e.g. awaited on an event loop); else fetched here.
        timeout_s: the longest wait for one call.
    """

    def __init__(self, actor, info: dict | None = None, *, timeout_s: float = 300.0):
        self.actor, self.timeout_s = actor, timeout_s
        self.info = info if info is not None else self._get(actor.live_info.remote())
        self.num_frames = int(self.info["num_frames"])

    def describe(self) -> dict:
        return {"name": self.info["name"], "random_weights": self.info["random_weights"],
                "device": self.info["device"], "runs_in": "ray actor"}

    def ground(self, images: np.ndarray, expressions: list[str], options: LiveOptions) -> Grounding:
        return self._get(self.actor.live_ground.remote(np.ascontiguousarray(images), list(expressions), options))

    def open_track(self, key: str, grounding: Grounding, image: np.ndarray) -> None:
        self._get(self.actor.live_open.remote(key, grounding.to_cpu(), np.ascontiguousarray(image)))

    def step(self, key: str, image: np.ndarray) -> np.ndarray:
        packed, shape = self._get(self.actor.live_step.remote(key, np.ascontiguousarray(image)))
        return unpack_masks(packed, shape)

    def close_track(self, key: str) -> None:
        try:
            self._get(self.actor.live_close.remote(key), timeout_s=min(self.timeout_s, 30.0))
        except LiveModelError as exc:  # the worker is gone: its tracks went with it
            log.warning("closing live track %s: %s", key, exc)

    def _get(self, ref, timeout_s: float | None = None):
        import ray  # lazy: Ray is only loaded where a live app runs with --ray

        try:
            return ray.get(ref, timeout=timeout_s or self.timeout_s)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            if isinstance(cause, RefStreamError):
                raise cause from None
            raise LiveModelError(f"the model worker failed: {type(cause or exc).__name__}: "
                                 f"{str(cause or exc).strip().splitlines()[-1][:500]}") from None
        except ray.exceptions.GetTimeoutError:
            raise LiveModelError(f"the model worker did not answer in {timeout_s or self.timeout_s:.0f} s") from None
        except ray.exceptions.RayError as exc:  # the actor died, or its node
            text = str(exc).strip().splitlines()
            raise LiveModelError(f"the model worker is unavailable ({type(exc).__name__}: "
                                 f"{text[0][:300] if text else ''}): prompt again") from None


def pack_masks(masks: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """bool [N, H, W] -> (uint8 bits, shape): 8x fewer bytes to send between processes."""
    return np.packbits(masks, axis=None), tuple(int(s) for s in masks.shape)


def unpack_masks(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`pack_masks`: bool ``shape``."""
    count = int(np.prod(shape))
    return np.unpackbits(packed, count=count).reshape(shape).astype(bool)
