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
- :meth:`health`: process id, device, whether CUDA works, frames processed;
- live tracking (``refstream live --ray``, :class:`refstream.live.model.RayLiveModel` calls them):
  :meth:`live_ground` (encoder frames uint8 [T, H, W, 3] + expressions -> a
  :class:`refstream.live.model.Grounding`, [SEG] embeddings on the CPU), :meth:`live_open` /
  :meth:`live_step` / :meth:`live_close` (one SAM2 stream per session key, frames uint8 [H, W, 3] in, bit-packed
  bool masks [N, H, W] out), :meth:`live_info`. At most ``live_max_tracks`` streams are open at once (a full
  worker evicts a track idle for 60 s, else refuses); a failing session's stream is closed and the others go
  on. These run one call at a time like every method here (the actor's single thread serialises the model).

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
from refstream.errors import ConfigError
from refstream.live.model import Grounding, LocalLiveModel, pack_masks
from refstream.options import sam2_chunk_for
from refstream.options import LiveOptions
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
            see :func:`workers.build.build_model`. Live tracking needs ``all``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (:class:`refstream.pipeline.Pipeline`).
        live_max_tracks: live SAM2 streams open at once (the ``live_*`` methods).
    """

    def __init__(self, model: str = "videoglamm", checkpoint: str | None = None, device: str = "auto",
                 threads: int | None = None, heartbeat: dict | None = None, parts: str = "all",
                 dtype: str = "auto", live_max_tracks: int = 16):
        if threads:  # torch intra-op threads in this process (None: leave torch's setting)
            torch.set_num_threads(int(threads))
        self.pipeline = Pipeline(load_model_config(model, checkpoint), device, dtype, parts=parts)
        self.parts, self.live_max_tracks = parts, live_max_tracks
        self._live: LocalLiveModel | None = None
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
                       fastv=None, label: str = "", seed: int = 0,
                       sam2_chunk: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
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
            answer_mode: ``forced``, ``generate`` or ``sample`` (seeded by ``seed``).
            report_answers: first yield ``(-1, report)``, ``report`` a dict with ``answers`` (the answer text
                per expression, for ``masks.json``), ``fastv_kept`` (int64 [F, keep] CLIP units FastV kept for
                the first expression, or None) and ``llm_layer_lengths`` (FastV: per expression, the sequence
                length each LLM layer processed; else None).
            fastv: :class:`pruning.methods.fastv.FastVSettings` to prune inside the LLM (FastV; then
                ``visual_tokens`` holds every CLIP token), or None.
            label: what the heartbeat shows as ``input`` while this clip runs (e.g. the job id).
            sam2_chunk: frames per SAM2 image-encoder batch within each chunk (the job's ``sam2_chunk``; None:
                this actor's device's default, :meth:`refstream.pipeline.Pipeline.sam2_chunk_for`).

        Yields:
            ``(frame_index, masks)`` with masks bool [N, H, W] (an expression whose answer has no [SEG] gets
            empty masks), one per frame, in order.
        """
        self.state, self.label = "running", label
        self.clips += 1
        try:
            yield from self._segment(visual_tokens, expressions, video_size, frame_chunks, answer_mode, report_answers,
                                     fastv, seed, sam2_chunk)
        except Exception as exc:  # noqa: BLE001
            if is_cuda_error(exc):
                os._exit(1)  # let Ray restart the actor with a fresh CUDA context
            raise
        finally:
            self.state, self.label = "idle", ""

    def _segment(self, visual_tokens, expressions, video_size, frame_chunks, answer_mode, report_answers=False,
                 fastv=None, seed: int = 0, sam2_chunk: int | None = None):
        import ray  # lazy: Ray is only loaded in processes that run actors

        sam2_chunk = sam2_chunk_for(sam2_chunk, self.pipeline.device.type)
        chunks = (ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref for ref in frame_chunks)
        for index, item in segment_clip(self.pipeline.model, visual_tokens, expressions, video_size, chunks,
                                        answer_mode, report_answers, fastv, seed, sam2_chunk):
            if index >= 0:
                self.frames_done += 1
            yield index, item


    # ------------------------------------------------------------------------------------------- live tracking
    def live_info(self) -> dict:
        """What a :class:`refstream.live.model.RayLiveModel` needs: ``num_frames`` (encoder frames), ``name``,
        ``random_weights``, ``device``; and ``tracks`` open now, ``max_tracks``, ``frames`` stepped."""
        live = self._live_model()
        config = self.pipeline.config
        return {"num_frames": live.num_frames, "name": config.name, "random_weights": config.random_weights,
                "device": str(self.pipeline.device), "tracks": live.tracks, "max_tracks": live.max_tracks,
                "frames": live.frames}

    def live_ground(self, images: np.ndarray, expressions: list[str], options: LiveOptions) -> Grounding:
        """:meth:`refstream.live.model.LocalLiveModel.ground` here: images uint8 [T, H, W, 3] -> a Grounding with
        its [SEG] embeddings float [C] on the CPU."""
        return self._live_call(lambda live: live.ground(images, expressions, options).to_cpu())

    def live_open(self, key: str, grounding: Grounding, image: np.ndarray) -> None:
        """Open the SAM2 stream ``key`` anchored on ``image`` uint8 [H, W, 3] (replacing the one under ``key``)."""
        self._live_call(lambda live: live.open_track(key, grounding, image))

    def live_step(self, key: str, image: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """Step the stream ``key`` on ``image`` uint8 [H, W, 3]: bool masks [N, H, W] bit-packed
        (:func:`refstream.live.model.pack_masks`; ``unpack_masks`` reverses it)."""
        masks = self._live_call(lambda live: live.step(key, image))
        self.frames_done += 1
        return pack_masks(masks)

    def live_close(self, key: str) -> None:
        """Close the stream ``key`` (nothing when there is none)."""
        self._live_call(lambda live: live.close_track(key))

    def _live_model(self) -> LocalLiveModel:
        if self._live is None:
            if self.parts != "all":
                raise ConfigError(f"live tracking needs CLIP and InternVideo2 in the worker: load it with "
                                  f"parts='all' (this one has parts={self.parts!r})")
            self._live = LocalLiveModel(self.pipeline, max_tracks=self.live_max_tracks)
        return self._live

    def _live_call(self, call):
        try:
            return call(self._live_model())
        except Exception as exc:  # noqa: BLE001 - the failing track is closed already; others go on
            if is_cuda_error(exc):
                os._exit(1)  # let Ray restart the actor with a fresh CUDA context (the tracks are lost)
            raise


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
