"""The live tracking engine: the newest frame of a live source, segmented as it comes, re-prompted by text.

Three threads, no frame queue anywhere:

* the **source thread** (:mod:`refstream.live.sources`: a file or frame folder played in real time, a camera
  or network stream through PyAV, or the page's own camera) writes each decoded frame into a
  :class:`LatestFrameSlot` (size 1) with its frame id and capture time (Unix seconds) and into a ring buffer of
  the last 16 frames seen. A frame the tracker has not taken when the next one arrives is replaced and counted
  as a drop. While a stream reconnects the engine's state is ``reconnecting``;
* the **grounding thread** turns a prompt (one or more expressions) into [SEG] embeddings: the ring buffer's
  frames are the encoder frames, chosen by the same rule as ``refstream run``
  (:func:`video_pipeline.plan.encoder_positions`), then CLIP, the pruning method (one selection for every
  expression), InternVideo2 and the LLM answer (:meth:`refstream.pipeline.Pipeline.answer`). The objects being
  tracked keep being tracked meanwhile;
* the **tracking thread** always takes the newest frame; when a grounding has finished it opens a fresh
  :class:`workers.sam2_decoder.Sam2Stream` anchored on the grounding's newest frame (the prompt frame), then
  steps it frame by frame. SAM2 only ever runs on this thread (a stream's anchor hook is not thread-safe), and
  its memory bank stays bounded (:class:`workers.sam2_decoder.Sam2Stream`, ``prune_memory``).

The model calls (grounding, opening a SAM2 stream, each step) go through a
:class:`refstream.live.model.LiveModel`: in this process (:class:`refstream.live.model.LocalLiveModel`, the
default) or on the VideoGLaMM GPU worker Ray actor (:class:`refstream.live.model.RayLiveModel`,
``refstream live --ray``); the threads above are the same either way.

Every result carries the ``prompt_id`` of the prompt it answers (increasing with each prompt); results of an
older prompt are never emitted once a newer one is tracking. ``reground_every`` re-grounds the current
expressions every so many seconds (drift recovery). Docs: docs/design.md, section Data flow (Live tracking).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from refstream.errors import ExpressionError, RefStreamError
from refstream.live.model import Grounding, LiveModel, LocalLiveModel
from refstream.options import LiveOptions, clean_expressions, make_method
from refstream.pipeline import Pipeline
from refstream.live.sources import FrameSource, LatestFrameSlot, LiveFrame, open_source
from video_pipeline.plan import encoder_positions

log = logging.getLogger("refstream.live")


@dataclass
class LiveResult:
    """One processed frame.

    Attributes:
        frame_id, t_capture: of the frame (Unix seconds); ``t_done`` when its masks were ready.
        prompt_id: the prompt these masks answer (0: no prompt yet, no objects).
        expressions: N expressions; ``masks`` bool [N, H, W], one per expression.
        frame: uint8 [H, W, 3] RGB.
    """

    frame_id: int
    prompt_id: int
    t_capture: float
    t_done: float
    expressions: list[str]
    masks: np.ndarray
    frame: np.ndarray

    @property
    def height(self) -> int:
        return int(self.frame.shape[0])

    @property
    def width(self) -> int:
        return int(self.frame.shape[1])


@dataclass
class _Grounded:
    """A finished grounding, waiting for the tracking thread to anchor it."""

    prompt_id: int
    expressions: list[str]
    answer: Grounding | None  # None: cleared (no objects)
    anchor: LiveFrame | None
    view: np.ndarray | None = None


@dataclass
class LiveStats:
    """Counters of an engine (read them while it runs)."""

    processed: int = 0
    groundings: int = 0
    process_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=300))


class LiveEngine:
    """Tracks the objects that text prompts name on a live source (see the module docstring).

    Args:
        pipeline: a loaded :class:`refstream.pipeline.Pipeline` (e.g. ``refstream.load("tiny").pipeline``).
        source: what :func:`refstream.live.sources.open_source` takes (a file or frame folder, ``/dev/videoN``,
            a stream URL, ``browser``; the engine owns and stops it), or a started shared
            :class:`refstream.live.sources.FrameSource` (the engine only subscribes to it).
        options: :class:`refstream.options.LiveOptions`: the pruning and prompt options of ``refstream run``, the
            first prompt (``expressions``, optional), how to play the source (``fps``, ``loop``) and
            ``reground_every`` (seconds; None: never).
        on_result: called on the tracking thread with each :class:`LiveResult`.
        on_status: called with ``(state, prompt_id)``, state ``grounding`` | ``tracking`` | ``idle`` |
            ``reconnecting`` | ``error`` | ``ended``.
        model_lock: held while the model runs (grounding, each SAM2 step); engines that share one model must
            share one lock (CLIP's feature hooks and SAM2's anchor hook live on the model). Not used with ``model``.
        model: where the model calls go (:class:`refstream.live.model.LiveModel`); default
            ``LocalLiveModel(pipeline, model_lock)``. With a model ``pipeline`` may be None (e.g.
            :class:`refstream.live.model.RayLiveModel`: the model is in a Ray actor).

    Raises:
        InputError: the source cannot be opened. ConfigError / ExpressionError: bad options.
    """

    def __init__(self, pipeline: Pipeline, source, options: LiveOptions, *,
                 on_result: Callable[[LiveResult], None] | None = None,
                 on_status: Callable[[str, int], None] | None = None, model_lock: threading.Lock | None = None,
                 model: LiveModel | None = None):
        self.pipeline, self.options = pipeline, options
        self.method = make_method(options.method, options.variant)
        self.slot = LatestFrameSlot()
        self.ring: collections.deque = collections.deque(
            maxlen=pipeline.config.num_frames if model is None else model.num_frames)
        self.source = open_source(source, fps=options.fps, loop=options.loop, decoder=options.decoder,
                                  size=options.frame_size, options=options.source_options)
        self._owns_source = not isinstance(source, FrameSource)  # a source handed in is shared: not ours to stop
        self.source.subscribe(self.slot, self.ring, self._source_state)
        self.reground_every = options.reground_every
        self.on_result, self.on_status = on_result, on_status
        self.stats = LiveStats()
        self.model_lock = model_lock or threading.Lock()
        self.model: LiveModel = model if model is not None else LocalLiveModel(pipeline, self.model_lock)
        self.track_key = f"live-{uuid.uuid4().hex}"  # this engine's SAM2 stream in the model (one at a time)
        self.prompt_id = 0  # of the newest prompt asked for
        self.tracking_prompt_id = 0  # of the prompt whose masks are being emitted
        self.expressions: list[str] = []
        self.tokens_view: np.ndarray | None = None
        self._lock = threading.Lock()
        self._requests: collections.deque = collections.deque()  # prompts waiting for the grounding thread
        self._wake = threading.Event()
        self._grounded: _Grounded | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ground_loop, daemon=True, name="refstream-live-ground"),
                         threading.Thread(target=self._track_loop, daemon=True, name="refstream-live-track")]
        self._last_grounding = 0.0
        self.state = self._settled_state = "idle"
        if options.expressions:
            self.prompt(options.expressions)

    # ---------------------------------------------------------------------------------------------- control
    def start(self) -> "LiveEngine":
        if self._owns_source:
            self.source.start()
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the source and both threads (waits for a running grounding or SAM2 step to end)."""
        self._stop.set()
        self._wake.set()
        self.source.unsubscribe(self.slot, self._source_state)
        if self._owns_source:
            self.source.stop()
        self.slot.close()
        for t in ((self.source,) if self._owns_source else ()) + tuple(self._threads):
            if t.is_alive():
                t.join(timeout)

    def __enter__(self) -> "LiveEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def prompt(self, expressions) -> int:
        """Ground new expressions (they replace the objects tracked); returns the new ``prompt_id``.

        Raises:
            ExpressionError: no expression or an empty one (nothing changes).
        """
        if isinstance(expressions, str):
            expressions = [expressions]
        try:
            cleaned = clean_expressions(list(expressions))
        except ValueError as exc:
            raise ExpressionError(str(exc)) from None
        return self._ask(cleaned)

    def clear(self) -> int:
        """Stop tracking every object; returns the new ``prompt_id``."""
        return self._ask([])

    def _ask(self, expressions: list[str]) -> int:
        with self._lock:
            self.prompt_id += 1
            self._requests.append((self.prompt_id, expressions))
            self.expressions = expressions
        self._status("grounding" if expressions else "idle")
        self._wake.set()
        return self.prompt_id

    def _source_state(self, state: str) -> None:
        """The source dropped (``reconnecting``) or came back (``live``: the engine's own state again)."""
        if state == "reconnecting":
            self._status("reconnecting")
        elif self.state == "reconnecting":
            self._status(self._settled_state)

    def _status(self, state: str, prompt_id: int | None = None) -> None:
        if state in ("grounding", "tracking", "idle"):
            self._settled_state = state
        if state in ("grounding", "tracking", "idle") and self.source.state == "reconnecting":
            state = "reconnecting"  # the page keeps saying so until frames flow again
        self.state = state
        if self.on_status is not None:
            self.on_status(state, self.prompt_id if prompt_id is None else prompt_id)

    # -------------------------------------------------------------------------------------------- grounding
    def _ground_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            if self._stop.is_set():
                return
            request = None
            with self._lock:
                if self._requests:
                    request = self._requests[-1]  # only the newest prompt matters
                    self._requests.clear()
                elif (self.reground_every and self.expressions and self.tracking_prompt_id
                      and time.monotonic() - self._last_grounding >= self.reground_every):
                    self.prompt_id += 1
                    request = (self.prompt_id, list(self.expressions))
            if request is None:
                continue
            prompt_id, expressions = request
            try:
                grounded = self._ground(prompt_id, expressions)
            except RefStreamError as exc:
                log.warning("grounding prompt %d failed: %s", prompt_id, exc)
                self._status("error", prompt_id)
                continue
            if grounded is not None:
                with self._lock:
                    if prompt_id == self.prompt_id:  # a newer prompt replaces this one
                        self._grounded = grounded

    def _ground(self, prompt_id: int, expressions: list[str]) -> _Grounded | None:
        """Encoder frames from the ring buffer -> CLIP, pruning, InternVideo2, LLM: the [SEG] embeddings."""
        if not expressions:
            return _Grounded(prompt_id, [], None, None)
        while not self._stop.is_set() and not self.ring:
            if self.source.finished.wait(0.05) and not self.ring:
                return None
        frames = list(self.ring)
        if not frames:
            return None
        options = self.options
        chosen = [frames[p] for p in encoder_positions(len(frames), options.frames)]
        started = time.perf_counter()
        grounding = self.model.ground(np.stack([f.image for f in chosen]), expressions, options)
        self._last_grounding = time.monotonic()
        self.stats.groundings += 1
        log.info("grounded prompt %d (%s) in %.2f s", prompt_id, "; ".join(expressions),
                 time.perf_counter() - started)
        return _Grounded(prompt_id, expressions, grounding, frames[-1], grounding.view)

    # --------------------------------------------------------------------------------------------- tracking
    def _track_loop(self) -> None:
        tracking, expressions = False, []  # tracking: this engine's track is open in the model
        try:
            while not self._stop.is_set():
                with self._lock:
                    grounded, self._grounded = self._grounded, None
                if grounded is not None:
                    tracking, expressions = self._anchor(grounded)
                frame = self.slot.take(timeout=0.1)
                if frame is None:
                    if self.source.finished.is_set():  # nothing left untaken: the slot hands out every last frame
                        break
                    continue
                started = time.perf_counter()
                masks = self._masks(tracking, len(expressions), frame)
                if masks is None:  # the model failed this track (status "error" sent): no objects until a prompt
                    tracking, masks = False, np.zeros((len(expressions), *frame.image.shape[:2]), dtype=bool)
                self.stats.processed += 1
                self.stats.process_seconds.append(time.perf_counter() - started)
                if self.on_result is not None:
                    self.on_result(LiveResult(frame.frame_id, self.tracking_prompt_id, frame.t_capture, time.time(),
                                              list(expressions), masks, frame.image))
        finally:
            self.model.close_track(self.track_key)
            self._status("ended")

    def _anchor(self, grounded: _Grounded) -> tuple[bool, list[str]]:
        """Open a fresh SAM2 track with the prompt on the grounding's newest frame (the anchor frame), replacing
        the one open; returns (whether a track is open, the expressions)."""
        self.tracking_prompt_id = grounded.prompt_id
        if grounded.answer is None:
            self.model.close_track(self.track_key)
            self._status("idle", grounded.prompt_id)
            return False, []
        self.tokens_view = grounded.view
        try:
            self.model.open_track(self.track_key, grounded.answer, grounded.anchor.image)
        except RefStreamError as exc:
            log.warning("anchoring prompt %d failed: %s", grounded.prompt_id, exc)
            self._status("error", grounded.prompt_id)
            return False, grounded.expressions
        self._status("tracking", grounded.prompt_id)
        return True, grounded.expressions

    def _masks(self, tracking: bool, count: int, frame: LiveFrame) -> np.ndarray | None:
        """bool [N, H, W] for the tracked objects on ``frame`` (all False for an answer without [SEG], or with no
        track open); None when the model failed the track (logged, status ``error``; the track is closed)."""
        if not tracking:
            return np.zeros((count, *frame.image.shape[:2]), dtype=bool)
        try:
            return self.model.step(self.track_key, frame.image)
        except RefStreamError as exc:
            log.warning("tracking prompt %d failed on frame %d: %s", self.tracking_prompt_id, frame.frame_id, exc)
            self._status("error", self.tracking_prompt_id)
            return None
