"""The VideoGLaMM GPU worker as a Ray actor: pruned visual tokens and a frame stream in, masks per frame out.

The model step itself (LLM once, then SAM2 frame by frame) is :func:`workers.gpu_worker.segment_clip`; this
module is the Ray glue around it (loading through :class:`refstream.pipeline.Pipeline`, fetching object
references, heartbeats, restarts).

:class:`VideoGLaMMWorker` loads the model once (``num_gpus`` from the caller's resources: 1 with a GPU,
0 on CPU) and exposes:

- :meth:`segment_stream` (a Ray streaming generator): the visual tokens of a clip (CLIP tokens after
  pruning + InternVideo2 tokens, [V, H]) and the expressions go through the LLM once (one [SEG] per
  expression); then the SAM2 frames arrive as a list of object references to preprocessed chunks, fetched
  one at a time (never the whole video in memory), and one mask per frame and expression is yielded as
  soon as it is decoded;
- :meth:`health`: process id, device, whether CUDA works, frames processed.

With ``heartbeat=`` (Redis URL, key prefix, name) a thread in the actor also writes a heartbeat hash to Redis
every second (:class:`refstream.service.worker.HeartbeatThread`: ``role=videoglamm``, ``state`` idle/running,
``input`` = the running clip's label, ``handled`` clips, ``frames_done``), readable while the actor is busy.

On a CUDA error (device lost, out of memory, illegal access) the actor exits its process so that Ray
restarts it (``max_restarts``; the constructor reloads the model); the caller retries the clip.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterator, Sequence

import numpy as np
import torch

from refstream.config import load_model_config
from refstream.pipeline import Pipeline
from refstream.service.worker import HeartbeatThread
from workers.gpu_worker import is_cuda_error, segment_clip
from workers.sam2_decoder import Sam2VideoDecoder


log = logging.getLogger("refstream.service")


class VideoGLaMMWorker:
    """VideoGLaMM's LLM and SAM2 stages for one clip at a time (plain class; wrap it with :func:`gpu_worker_class`).

    Args:
        model: ``tiny``, ``videoglamm`` or a config YAML; checkpoint: the weights folder; device: cpu/cuda/auto.
        threads: torch intra-op threads in this process (None: leave torch's setting).
        heartbeat: ``{"redis_url": ..., "prefix": ..., "name": ...}`` to beat in Redis (None: no heartbeat).
        parts: ``all`` or ``decoder`` (no CLIP / InternVideo2 on the device: they run in encoder actors);
            see :func:`workers.build.build_model`.
    """

    def __init__(self, model: str = "videoglamm", checkpoint: str | None = None, device: str = "auto",
                 threads: int | None = None, heartbeat: dict | None = None, parts: str = "all"):
        if threads:  # torch intra-op threads in this process (None: leave torch's setting)
            torch.set_num_threads(int(threads))
        self.pipeline = Pipeline(load_model_config(model, checkpoint), device, parts=parts)
        self.frames_done = 0
        self.clips = 0
        self.state, self.label = "idle", ""
        self.started = time.time()
        self.heartbeat = None
        if heartbeat:
            self.heartbeat = HeartbeatThread(heartbeat["redis_url"], heartbeat.get("prefix", "refstream"),
                                             heartbeat["name"], self._beat_fields)

    def _beat_fields(self) -> dict:
        return {"role": "videoglamm", "state": self.state, "input": self.label, "handled": self.clips,
                "frames_done": self.frames_done, "device": str(self.pipeline.device),
                "threads": torch.get_num_threads()}

    def health(self) -> dict:
        """Liveness and device state."""
        cuda_ok = None
        if self.pipeline.device.type == "cuda":
            try:
                torch.cuda.synchronize()
                cuda_ok = True
            except RuntimeError as exc:
                log.warning("CUDA is not usable on %s: %s", self.pipeline.device, exc)
                cuda_ok = False
        return {"pid": os.getpid(), "device": str(self.pipeline.device), "cuda_ok": cuda_ok,
                "model": self.pipeline.config.name, "frames_done": self.frames_done,
                "uptime_s": time.time() - self.started}

    def sam2_input(self) -> dict:
        """What SAM2 frames must be preprocessed to (``size``, ``style``) and the model's ``name``,
        ``random_weights`` and ``device``."""
        return {"size": int(Sam2VideoDecoder(self.pipeline.model.sam2).image_size),
                "style": self.pipeline.sam2_style, "name": self.pipeline.config.name,
                "random_weights": self.pipeline.config.random_weights, "device": str(self.pipeline.device)}

    def segment_stream(self, visual_tokens: torch.Tensor, expressions: Sequence[str], video_size: tuple[int, int],
                       frame_chunks: Sequence, answer_mode: str = "forced", report_answers: bool = False,
                       fastv=None, label: str = "") -> Iterator[tuple[int, np.ndarray]]:
        """Answer once, then stream masks.

        Args:
            visual_tokens: float [V, H], the LLM-ready visual tokens of the clip (pruned CLIP tokens,
                frame-major, then InternVideo2 tokens), e.g. from ``VideoGLaMM.clip_tokens`` /
                ``internvideo2_tokens`` on a CLIP + pruning actor.
            expressions: the N referring expressions.
            video_size: (H, W) of the original frames (masks come back at this size).
            frame_chunks: object references (or tensors) of SAM2-preprocessed frames, each float32
                [t, 3, S, S]; the first frame of the first chunk is the anchor frame. Any iterable works, e.g.
                a :class:`ChunkFeed` that pulls the chunks one at a time from a decode actor (bounded memory).
            answer_mode: ``forced`` or ``generate``.
            report_answers: first yield ``(-1, report)``, ``report`` a dict with ``answers`` (the answer text
                per expression, for ``masks.json``), ``fastv_kept`` (int64 [F, keep] CLIP units FastV kept for
                the first expression, or None) and ``llm_layer_lengths`` (FastV: per expression, the sequence
                length each LLM layer processed; else None).
            fastv: :class:`pruning.methods.fastv.FastVSettings` to prune inside the LLM (FastV; then
                ``visual_tokens`` holds every CLIP token), or None.
            label: what the heartbeat shows as ``input`` while this clip runs (e.g. the job id).

        Yields:
            ``(frame_index, masks)`` with masks bool [N, H, W] (an expression whose answer has no [SEG] gets
            empty masks), one per frame, in order.
        """
        self.state, self.label = "running", label
        self.clips += 1
        try:
            yield from self._segment(visual_tokens, expressions, video_size, frame_chunks, answer_mode, report_answers,
                                     fastv)
        except Exception as exc:  # noqa: BLE001
            if is_cuda_error(exc):
                os._exit(1)  # let Ray restart the actor with a fresh CUDA context
            raise
        finally:
            self.state, self.label = "idle", ""

    def _segment(self, visual_tokens, expressions, video_size, frame_chunks, answer_mode, report_answers=False,
                 fastv=None):
        import ray  # lazy: Ray is only loaded in processes that run actors

        chunks = (ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref for ref in frame_chunks)
        for index, item in segment_clip(self.pipeline.model, visual_tokens, expressions, video_size, chunks,
                                        answer_mode, report_answers, fastv):
            if index >= 0:
                self.frames_done += 1
            yield index, item


class ChunkFeed:
    """An iterable of SAM2 chunks pulled one at a time from a decode actor's ``next_chunk(job_id)`` (which
    returns a chunk, or None at the end): pass it as ``frame_chunks`` so the worker fetches frames as it goes."""

    def __init__(self, decoder, job_id: str):
        self.decoder, self.job_id = decoder, job_id

    def __iter__(self):
        import ray  # lazy: Ray is only loaded in processes that run actors

        while True:
            chunk = ray.get(self.decoder.next_chunk.remote(self.job_id))
            if chunk is None:
                return
            yield chunk


def gpu_worker_class(num_gpus: float = 0.0, num_cpus: float = 1.0, max_restarts: int = -1):
    """:class:`VideoGLaMMWorker` as a Ray actor class with its resources and restart policy."""
    import ray  # lazy: Ray is only loaded in processes that run actors

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                      max_task_retries=0)(VideoGLaMMWorker)
