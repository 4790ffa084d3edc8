"""``refstream serve`` (default ``--pipeline pools``): one job split over pools of Ray actors, frames streamed
in chunks.

Three pools, each actor with ``max_restarts=-1`` (Ray restarts a crashed actor; its constructor reloads):

* :class:`DecodeActor` (``--decoders``, CPU): opens the video, plans the frames, returns the metadata and
  the 16 encoder frames, then decodes + SAM2-preprocesses the SAM2 frames in a background thread into a
  queue of at most ``ahead`` chunks (bounded in-flight work: a long video never sits in memory whole).
  ``next_chunk(job_id)`` hands out the next chunk (None at the end) and keeps its source frames for the
  overlay (``frames_chunk``); ``stats()`` reports ``max_ahead``, the most chunks it ever held queued.
* :class:`EncoderActor` (``--encoders``): CLIP (+ text), pruning, InternVideo2 and the projectors: the
  LLM-ready visual tokens [V, H] of the clip, the token selection (for ``tokens.png``) and timings. Methods
  that prune inside the LLM (FastV, ``selection.stage == "llm"``) send every CLIP token and their settings.
* :class:`refstream.service.gpu_worker.VideoGLaMMWorker` (``--workers``, ``num_gpus=1`` on CUDA): the LLM once (FastV
  inside it when asked), then the SAM2 stream; it PULLS the chunks from the decode actor
  (:class:`refstream.service.gpu_worker.ChunkFeed`) and streams ``(index, masks)`` back through a Ray streaming
  generator with backpressure: at most :data:`MASKS_AHEAD` frames' masks wait for the coordinator.

The queue consumer is a light coordinator in the ``serve`` process: ``jobs_in_flight`` threads (default two
per VideoGLaMM worker, so that the next job decodes and encodes while the current one is in SAM2) each run
:meth:`JobQueue.work` with :func:`run_pooled_job`, which RLE-encodes the masks as they arrive, writes the
overlay, reports ``frames_done`` to Redis and stores the same four files as ``refstream run`` (through the same
writer, :class:`refstream.outputs.JobWriter`, and result builder, :func:`refstream.outputs.job_result`). While a job
waits on an actor (encoding, or queued behind another job on a busy VideoGLaMM worker) a
:class:`refstream.service.queue.LeaseKeeper`
renews its lease, so a waiting job is never taken over. An actor dying mid-job (``RayActorError``), or its
node (the objects it held lost too: :func:`lost_to_a_death`), makes the job run again (once, on the least
busy actors of the pools, as soon as every actor answers again: Ray restarts a dead node's actors on the nodes
left, the actors being placed with ``SPREAD``); a second death fails it as transient, so it is retried after
the lease. A cancelled job stops its stream (``ray.cancel``) and its decoding.

Every pool actor beats in Redis (:class:`refstream.service.worker.HeartbeatThread`): ``worker-i``
(VideoGLaMM), ``encoder-i`` and ``decoder-i``, with their ``role``, ``pid`` and ``state``.

Ray is imported inside the functions that use it (it takes seconds to import, and this module's plain
classes run without it in tests).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue as queue_mod
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import replace

import numpy as np
import torch

from refstream.config import load_model_config
from refstream.errors import ConfigError, RefStreamError
from refstream.memory import release_freed_memory
from refstream.options import make_method
from refstream.outputs import JobResult, JobWriter, job_result
from refstream.pipeline import Pipeline, StageTimer, clip_view
from refstream.service.logs import log_event
from refstream.service.queue import JobQueue, LeaseKeeper, connect
from refstream.service.results import pack_outputs
from refstream.service.security import RedisSettings, as_settings
from refstream.service.gpu_worker import ChunkFeed, VideoGLaMMWorker
from refstream.service.worker import HeartbeatThread
from video_pipeline.decode import open_video, warn_decode_report
from video_pipeline.plan import plan_frames
from video_pipeline.preprocess import sam2_preprocess

logger = logging.getLogger("refstream.serve")


class _DecodeJob:
    """One job's decoding state: its source and plan, the chunks decoded (at most ``ahead`` waiting: ``slots``)."""

    def __init__(self, source, plan, ahead: int):
        self.source, self.plan = source, plan
        self.chunks: queue_mod.Queue = queue_mod.Queue()
        self.slots = threading.Semaphore(ahead)  # one per chunk the queue may hold: bounds the decoding ahead
        self.frames: deque = deque()  # source frames of chunks handed out, until the coordinator takes them
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.report: dict = {}  # the source's decode_report() once every chunk is decoded


class DecodeActor:
    """Decode + SAM2 preprocessing, a bounded queue of chunks per job (plain class; a threaded Ray actor).

    Args:
        ahead: chunks decoded ahead of the consumer at most (the queue's size).
        chunk_size: frames per chunk.
        threads: torch threads in this process; heartbeat: see :func:`_heartbeat`.
    """

    def __init__(self, ahead: int = 2, chunk_size: int = 8, threads: int | None = None,
                 heartbeat: dict | None = None):
        if threads:
            torch.set_num_threads(int(threads))
        self.ahead, self.chunk_size = max(1, int(ahead)), max(1, int(chunk_size))
        self.jobs: dict[str, _DecodeJob] = {}
        self.max_ahead = 0
        self.chunks_out = 0
        self.heartbeat = _heartbeat(heartbeat, lambda: {
            "role": "decode", "state": "running" if self.jobs else "idle", "jobs": len(self.jobs),
            "handled": self.chunks_out, "threads": _torch_threads()})

    def open(self, job_id: str, path: str, decoder: str, frames: int, stride: int, max_frames: int | None,
             sam2_size: int, sam2_style: str, max_pixels: int | None = None) -> tuple[dict, np.ndarray]:
        """Open the video, plan it, start decoding its SAM2 chunks.

        Returns:
            ``(meta, encoder_frames)``: ``meta`` has ``height``, ``width``, ``fps``, ``frame_names`` (of the SAM2
            frames) and ``seconds``; ``encoder_frames`` is uint8 [16, H, W, 3]. Call it with
            ``.options(num_returns=2)`` so that the frames go to the encoder actor as an object reference
            without passing through the caller.
        """
        started = time.perf_counter()
        source = open_video(path, decoder, *(() if max_pixels is None else (max_pixels,)))
        try:
            plan = plan_frames(source.num_frames, frames, stride, max_frames)
            encoder_frames = source.read(plan.encoder_indices)
        except BaseException:
            source.close()
            raise
        job = _DecodeJob(source, plan, self.ahead)
        self.jobs[job_id] = job
        threading.Thread(target=self._produce, args=(job, sam2_size, sam2_style), daemon=True).start()
        return ({"height": source.height, "width": source.width, "fps": source.fps,
                 "frame_names": [source.frame_names[i] for i in plan.sam2_indices],
                 "seconds": time.perf_counter() - started}, encoder_frames)

    def _produce(self, job: _DecodeJob, size: int, style: str) -> None:
        """Decode thread: SAM2-preprocess the planned frames chunk by chunk into the job's queue; an error is
        handed to the consumer (:meth:`next_chunk` raises it)."""
        try:
            for _, frames in job.source.iter_chunks(job.plan.sam2_indices, chunk_size=self.chunk_size):
                item = (sam2_preprocess(frames, style=style, size=size), frames)
                if not self._put(job, item):
                    return
            job.report = job.source.decode_report()  # before the end marker: read by decode_report()
            warn_decode_report(job.source.path, job.report, len(job.plan.sam2_indices))
            self._put(job, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer by next_chunk
            log_event(logger, "decode.failed", f"decoding failed ({exc.__class__.__name__}: {exc}); the job gets "
                      "the error at its next chunk", logging.DEBUG, error=str(exc))
            job.error = exc
            self._put(job, None)
        finally:
            job.source.close()

    def _put(self, job: _DecodeJob, item) -> bool:
        """Queue ``item`` once a slot is free; False when the job was closed meanwhile."""
        while not job.stop.is_set():
            if job.slots.acquire(timeout=0.2):
                job.chunks.put(item)
                self.max_ahead = max(self.max_ahead, job.chunks.qsize())
                return True
        return False

    def next_chunk(self, job_id: str):
        """The next SAM2-preprocessed chunk float32 [t, 3, S, S] of a job, or None after the last one."""
        job = self.jobs[job_id]
        item = job.chunks.get()
        job.slots.release()
        if item is None:
            if job.error is not None:
                raise job.error
            return None
        pixels, frames = item
        job.frames.append(frames)
        self.chunks_out += 1
        return pixels

    def decode_report(self, job_id: str) -> dict:
        """What decoding did, once :meth:`next_chunk` returned None (the job's last chunk):
        :meth:`video_pipeline.source.VideoSource.decode_report` (decoder, rotation, frame sizes, resized and
        damaged frames), for the job's ``summary.json`` as ``refstream run`` writes it."""
        return self.jobs[job_id].report

    def frames_chunk(self, job_id: str) -> np.ndarray:
        """Source frames uint8 [t, H, W, 3] of the oldest chunk handed out by :meth:`next_chunk` not taken yet."""
        return self.jobs[job_id].frames.popleft()

    def close(self, job_id: str) -> None:
        """Forget a job (stops its decoding thread)."""
        job = self.jobs.pop(job_id, None)
        if job is not None:
            job.stop.set()
        if not self.jobs:  # between jobs: the pages the job's decode thread freed go back to the OS
            release_freed_memory()

    def stats(self) -> dict:
        return {"pid": os.getpid(), "jobs": len(self.jobs), "max_ahead": self.max_ahead, "ahead": self.ahead,
                "chunks_out": self.chunks_out}


class EncoderActor:
    """CLIP + pruning + InternVideo2 + projectors: encoder frames in, LLM-ready visual tokens out."""

    def __init__(self, model: str = "tiny", checkpoint: str | None = None, device: str = "auto",
                 threads: int | None = None, heartbeat: dict | None = None):
        if threads:
            torch.set_num_threads(int(threads))
        self.pipeline = Pipeline(load_model_config(model, checkpoint), device, parts="encoder")  # no Phi-3, no SAM2
        self.state, self.handled = "idle", 0
        self.heartbeat = _heartbeat(heartbeat, lambda: {
            "role": "encode", "state": self.state, "handled": self.handled, "device": str(self.pipeline.device),
            "threads": torch.get_num_threads()})

    def health(self) -> dict:
        """Liveness: pid, device, jobs encoded."""
        return {"pid": os.getpid(), "device": str(self.pipeline.device), "handled": self.handled}

    def encode(self, encoder_frames: np.ndarray, expressions: list[str], method_spec: str, variant: str,
               budget: int, placement: str, clip_text: str) -> dict:
        """The clip's visual tokens for the VideoGLaMM worker.

        Args:
            encoder_frames: uint8 [16, H, W, 3], the encoder frames (VideoGLaMM's frame rule).
            expressions, method_spec, variant, budget, placement, clip_text: as ``refstream run``.

        Returns:
            ``(visual, info)``: ``visual`` float [V, H] (pruned CLIP tokens frame-major, then InternVideo2 tokens;
            FastV: every CLIP token), on CPU; ``info`` has ``fastv`` (:class:`pruning.methods.fastv.FastVSettings`
            or None), ``selection`` (the :class:`pruning.registry.Selection`, on CPU, without merge weights),
            ``visual_tokens``, ``seq_len``, ``view`` (uint8 [336, 336, 3], the first CLIP frame) and
            ``timings`` (seconds per stage). Call it with ``.options(num_returns=2)`` so that ``visual`` goes
            to the VideoGLaMM actor as an object reference without passing through the caller.
        """
        self.state, self.handled = "running", self.handled + 1
        try:
            return self._encode(encoder_frames, expressions, method_spec, variant, budget, placement, clip_text)
        finally:
            self.state = "idle"
            release_freed_memory()  # the activations freed in torch's threads' arenas (soak: RSS 1.28x without)

    def _encode(self, encoder_frames, expressions, method_spec, variant, budget, placement, clip_text):
        pipeline = self.pipeline
        timer = StageTimer()
        method = make_method(method_spec, variant)
        with torch.inference_mode():
            video = pipeline.encode_frames(encoder_frames, with_scores=method.needs_scores,
                                           with_penultimate=method.needs_penultimate, timer=timer)
            selection, visual = pipeline.visual_tokens(video, method, budget, placement, expressions, clip_text, timer)
        seq_len = max(pipeline.model.sequence_length(visual.shape[0], e) for e in expressions)
        view = clip_view(video.clip_pixels)
        fastv = getattr(selection, "fastv", None) if selection.stage == "llm" else None
        slim = replace(selection, indices=selection.indices.cpu(), similarity_aware=selection.similarity_aware.cpu(),
                       merge_weights=None, merged_features=None)  # what tokens.png and masks.json need
        return visual.cpu(), {"fastv": fastv, "selection": slim, "visual_tokens": int(visual.shape[0]),
                              "seq_len": int(seq_len), "view": view, "timings": dict(timer.seconds)}


MASKS_AHEAD = 16  # frames of masks a VideoGLaMM worker may yield ahead of the coordinator (backpressure)


def _torch_threads() -> int:
    return torch.get_num_threads()


def _heartbeat(settings: dict | None, fields):
    """A :class:`refstream.service.worker.HeartbeatThread` from ``{"redis_url", "prefix", "name"}`` (or None)."""
    if not settings:
        return None
    return HeartbeatThread(settings["redis_url"], settings.get("prefix", "refstream"), settings["name"], fields)


class Pools:
    """The three actor pools; :meth:`acquire` hands out the least busy actor of each.

    Args:
        decoders, encoders, workers: actors per pool (at least 1 each).
        model, checkpoint, device: the model every encoder / VideoGLaMM actor loads.
        num_gpus: GPUs per VideoGLaMM actor; encoder_gpus: GPUs per encoder actor (fractions share a GPU:
            0.5 + 0.5 puts one of each on a GPU); num_cpus: CPUs per actor (Ray resources).
        threads: torch threads in each actor.
        ahead, chunk_size: decode-ahead bound (chunks) and frames per chunk.
        redis_url, prefix: where the actors beat (:class:`refstream.service.security.RedisSettings` or a URL;
            None: no heartbeats).
    """

    ROLES = ("decoders", "encoders", "workers")

    def __init__(self, *, decoders: int = 1, encoders: int = 1, workers: int = 1, model: str = "tiny",
                 checkpoint: str | None = None, device: str = "auto", num_gpus: float = 0.0,
                 encoder_gpus: float = 0.0, num_cpus: float = 0.5, threads: int | None = None, ahead: int = 2,
                 chunk_size: int = 8, redis_url: RedisSettings | str | None = None, prefix: str = "refstream"):
        import ray  # lazy: see the module docstring

        def beat(name: str) -> dict | None:
            return {"redis_url": redis_url, "prefix": prefix, "name": name} if redis_url else None

        # SPREAD: on a cluster the actors of each pool go to different nodes (one node's loss takes fewer of
        # them), and an actor whose node died is restarted by Ray on a node that is left
        spread = dict(max_restarts=-1, max_task_retries=0, scheduling_strategy="SPREAD")
        Decode = ray.remote(max_concurrency=16, num_cpus=num_cpus, **spread)(DecodeActor)
        Encode = ray.remote(num_cpus=num_cpus, num_gpus=encoder_gpus, **spread)(EncoderActor)
        Worker = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, **spread)(VideoGLaMMWorker)
        self.decoders = [Decode.remote(ahead, chunk_size, threads, beat(f"decoder-{i}")) for i in range(max(1, decoders))]
        self.encoders = [Encode.remote(model, checkpoint, device, threads, beat(f"encoder-{i}"))
                         for i in range(max(1, encoders))]
        self.workers = [Worker.remote(model, checkpoint, device, threads, beat(f"worker-{i}"), parts="decoder")
                        for i in range(max(1, workers))]
        self._busy = {role: [0] * len(getattr(self, role)) for role in self.ROLES}
        self._turn = 0
        self._lock = threading.Lock()
        self.sam2 = ray.get(self.workers[0].sam2_input.remote())
        ray.get([w.health.remote() for w in self.workers] + [e.health.remote() for e in self.encoders]
                + [d.stats.remote() for d in self.decoders])

    def acquire(self) -> tuple:
        """``(decoder, encoder, worker)`` for the next job: in each pool the actor with the fewest jobs in
        flight (ties: round-robin). Give them back with :meth:`release`."""
        with self._lock:
            self._turn += 1
            picked = []
            for role in self.ROLES:
                busy = self._busy[role]
                n = len(busy)
                i = min(range(n), key=lambda k: (busy[k], (k - self._turn) % n))
                busy[i] += 1
                picked.append(getattr(self, role)[i])
            return tuple(picked)

    def release(self, actors: tuple) -> None:
        """Give back what :meth:`acquire` handed out."""
        with self._lock:
            for role, actor in zip(self.ROLES, actors):
                i = getattr(self, role).index(actor)
                self._busy[role][i] = max(0, self._busy[role][i] - 1)

    def wait_until_answering(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> bool:
        """Wait until every actor of the pools answers a ping (after a death: Ray has restarted it, possibly
        on another node once its node was found dead). Returns False after ``timeout_s`` seconds (the caller's
        next attempt then fails or waits in Ray's queue of the restarting actor)."""
        import ray  # lazy: see the module docstring

        deadline = time.monotonic() + timeout_s
        waiting = [a for role in self.ROLES for a in getattr(self, role)]
        while waiting and time.monotonic() < deadline:
            pings = {a.__ray_ready__.remote(): a for a in waiting}
            ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=max(0.1, deadline - time.monotonic()))
            answered = set()
            for ref in ready:
                try:
                    ray.get(ref)
                    answered.add(ref)
                except ray.exceptions.RayError:  # unavailable (its node not yet found dead) or restarting
                    pass
            waiting = [pings[ref] for ref in pings if ref not in answered]
            if waiting:
                time.sleep(poll_s)
        return not waiting


def run_pooled_job(pools: Pools, policy, request, progress, retries: int = 1, lease_ms: int = 60_000,
                   abort=None) -> dict:
    """One queued job through the pools; the result is that of :func:`refstream.service.worker.run_job`.

    An actor that dies mid-job (``RayActorError``), or a node that dies under it (its actors and the objects
    it held lost: :func:`lost_to_a_death`), makes the job start again, ``retries`` times, on the least busy
    actors once every actor of the pools answers again (:meth:`Pools.wait_until_answering`: Ray restarts the
    actors of a dead node on the nodes left); then the error goes up (the queue retries the job after its
    lease). The job keeps its delivery throughout: it finishes once, with the same outputs. The lease is renewed
    every ``lease_ms / 3`` while the job waits (:class:`refstream.service.queue.LeaseKeeper`). Once ``abort``
    (a ``threading.Event``) is set, the next progress report raises ``JobReturned`` (the job goes back to the
    queue unfinished; its stream is cancelled).

    Raises:
        RefStreamError subclasses for bad input (the job fails at once), JobCancelled, RayActorError.
    """
    with LeaseKeeper(progress, lease_ms / 3000, abort=abort) as keeper:
        for attempt in itertools.count():
            try:
                return _pooled_job_once(pools, policy, request, keeper)
            except lost_to_a_death() as exc:
                if attempt >= retries:
                    raise
                frames = getattr(getattr(progress, "delivery", None), "frames_reported", None)
                log_event(logger, "job.actor_died",
                          f"an actor or its node died mid-job ({exc.__class__.__name__}"
                          f"{f', at frame {frames}' if frames is not None else ''}); running it again once the "
                          "pools answer", logging.WARNING, job_id=keeper.job_id, frames=frames,
                          error=str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
                time.sleep(0.5)
                if not pools.wait_until_answering(timeout_s=max(180.0, lease_ms / 1000)):  # lease renewed
                    log_event(logger, "job.pools_waiting", "some pool actors do not answer yet; the next attempt "
                              "waits for them in Ray", logging.WARNING, job_id=keeper.job_id)


def lost_to_a_death() -> tuple[type[BaseException], ...]:
    """The Ray errors of an actor or node death, after which a job runs again: the actor died
    (``RayActorError``, also ``ActorUnavailableError`` while its node is not yet found dead), its worker
    process crashed, its node died, or an object it made was lost with its node (``ObjectLostError``:
    e.g. the visual tokens of an encoder actor whose node died)."""
    from ray import exceptions as e  # lazy: see the module docstring

    return (e.RayActorError, e.ObjectLostError, e.NodeDiedError, e.WorkerCrashedError)


def _cause(exc: BaseException) -> BaseException:
    """A Ray task error's own cause when it is a RefStreamError (bad input fails the job at once) or an
    actor's or node's death (:func:`lost_to_a_death`; e.g. the decode actor died under the VideoGLaMM worker:
    the job runs again)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, (RefStreamError, *lost_to_a_death())) else exc


def _pooled_job_once(pools: Pools, policy, request, progress) -> dict:
    """One attempt at a job on one actor of each pool: encode, stream the masks into the outputs, pack them.

    ``progress`` is the job's :class:`LeaseKeeper`. Returns ``{"summary", "files", "seconds"}``.
    """
    import ray  # lazy: see the module docstring

    path = policy.admit(request)  # allowed roots and the job limits, before anything runs
    options = request  # a JobRequest is the job's refstream.options.JobOptions, validated when it was parsed
    expressions = list(options.expressions)
    actors = pools.acquire()
    decoder, encoder, worker = actors
    decode_id = uuid.uuid4().hex  # the job's name on the decode actor
    started, timer = time.perf_counter(), StageTimer()
    stream = None
    try:
        meta, encoded, visual_ref = _open_and_encode(decoder, encoder, decode_id, path, options, expressions,
                                                     pools.sam2, timer, progress)
        progress.check()
        stream = _start_stream(worker, decoder, decode_id, visual_ref, expressions, meta, encoded, options,
                               request.input)
        with tempfile.TemporaryDirectory(prefix="refstream-job-") as tmp:
            with JobWriter(tmp, len(expressions), meta["width"], meta["height"], meta["fps"]) as writer:
                report = _receive_masks(stream, decoder, decode_id, writer, timer, progress)
                stream = None  # finished: nothing to cancel
                decode = ray.get(decoder.decode_report.remote(decode_id))
                result = _job_result(str(path), meta, report, encoded, options, pools.sam2, timer, writer.masks,
                                     decode)
                summary = writer.finish(result, device=pools.sam2["device"], started=started,
                                        extra={"pipeline": "pools"})
            files = pack_outputs(tmp)
    finally:
        _end_on_actors(stream, decoder, decode_id, getattr(progress, "job_id", None))
        pools.release(actors)
    total = len(meta["frame_names"])
    progress(frames_done=total, frames_total=total, stages=summary["stage_seconds"])
    return {"summary": summary, "files": files, "seconds": time.perf_counter() - started}


def _open_and_encode(decoder, encoder, decode_id: str, path, options, expressions: list[str],
                     sam2: dict, timer: StageTimer, progress) -> tuple[dict, dict, object]:
    """Open the video on the decode actor and encode its encoder frames on the encoder actor.

    Bulk data flows actor to actor as object references (encoder frames decoder -> encoder; the visual tokens
    stay a reference for the VideoGLaMM actor); this process only gets the small metadata. Reports
    ``frames_total`` once the video is planned.

    Returns:
        ``(meta, encoded, visual_ref)``: :meth:`DecodeActor.open`'s metadata, :meth:`EncoderActor.encode`'s
        info and the reference of its visual tokens.
    """
    import ray  # lazy: see the module docstring
    from ray.exceptions import RayTaskError

    try:
        meta_ref, frames_ref = decoder.open.options(num_returns=2).remote(
            decode_id, str(path), options.decoder, options.frames, options.stride, options.max_frames,
            sam2["size"], sam2["style"], options.max_pixels)
        visual_ref, info_ref = encoder.encode.options(num_returns=2).remote(
            frames_ref, expressions, options.method, options.variant, options.budget, options.placement,
            options.clip_text)
        meta = ray.get(meta_ref)
        timer.seconds["decode"] += meta["seconds"]
        progress(frames_done=0, frames_total=len(meta["frame_names"]))
        encoded = ray.get(info_ref)
    except RayTaskError as exc:
        raise _cause(exc) from exc
    for stage, seconds in encoded["timings"].items():
        timer.seconds[stage] += seconds
    return meta, encoded, visual_ref


def _start_stream(worker, decoder, decode_id: str, visual_ref, expressions: list[str], meta: dict, encoded: dict,
                  options, label: str):
    """Start the VideoGLaMM actor's mask stream (a Ray streaming generator; it pulls the SAM2 chunks from the
    decode actor, at most :data:`MASKS_AHEAD` frames of masks ahead of this process)."""
    return worker.segment_stream.options(
        num_returns="streaming", _generator_backpressure_num_objects=MASKS_AHEAD).remote(
        visual_ref, expressions, (meta["height"], meta["width"]), ChunkFeed(decoder, decode_id), options.answer,
        report_answers=True, fastv=encoded["fastv"], label=label, seed=options.seed, sam2_chunk=options.sam2_chunk)


def _receive_masks(stream, decoder, decode_id: str, writer: JobWriter, timer: StageTimer,
                   progress) -> dict:
    """Hand every frame's masks (with its source frame from the decode actor) to ``writer``, reporting
    ``frames_done`` twice a second at most (which renews the lease).

    Returns:
        The VideoGLaMM actor's report (``answers``, ``fastv_kept``, ``llm_layer_lengths``).
    """
    import ray  # lazy: see the module docstring
    from ray.exceptions import RayTaskError

    report: dict = {}
    frames: deque = deque()
    last = 0.0
    sam2_started = time.perf_counter()
    for ref in stream:
        try:
            index, value = ray.get(ref)
        except RayTaskError as exc:
            raise _cause(exc) from exc
        if index < 0:
            report = value
            continue
        if not frames:
            frames.extend(ray.get(decoder.frames_chunk.remote(decode_id)))
        writer.add(frames.popleft(), value)  # RLE + overlay; its seconds go to the "write" stage
        now = time.monotonic()
        if now - last > 0.5:  # progress (and lease renewal) twice a second at most
            last = now
            progress(frames_done=index + 1)
    timer.seconds["sam2"] += time.perf_counter() - sam2_started - writer.seconds
    return report


def _job_result(video: str, meta: dict, report: dict, encoded: dict, options, sam2: dict, timer: StageTimer,
                masks: list[list[dict]], decode: dict | None = None) -> JobResult:
    """The :class:`refstream.outputs.JobResult` of a pooled job through the one builder
    :func:`refstream.outputs.job_result` (FastV: the tokens it kept for the first expression replace the
    encoder's selection)."""
    selection = encoded["selection"]
    llm_info = {}
    if report.get("fastv_kept") is not None:  # FastV: what it kept for the first expression
        selection = selection.with_kept(report["fastv_kept"])
        llm_info = {"llm_layer_lengths": report["llm_layer_lengths"]}
    return job_result(
        video=video, height=meta["height"], width=meta["width"], fps=meta["fps"], frames=meta["frame_names"],
        options=options, answers=list(report.get("answers", [])), masks=masks, selection=selection,
        llm_info=llm_info, model=sam2["name"], random_weights=sam2["random_weights"],
        visual_tokens=encoded["visual_tokens"], llm_sequence_length=encoded["seq_len"], timings=dict(timer.seconds),
        tokens_view=encoded["view"], decode=decode)


def _end_on_actors(stream, decoder, decode_id: str, job_id: str | None) -> None:
    """Stop an unfinished mask stream (cancelled job, or an error here: the generator may wait on backpressure)
    and forget the job on the decode actor. Both are best effort: a failure is logged at debug level."""
    import ray  # lazy: see the module docstring

    if stream is not None:
        try:
            ray.cancel(stream)
        except Exception as exc:  # noqa: BLE001 - already finished or the actor is gone
            log_event(logger, "job.cancel_stream", f"could not cancel the mask stream ({exc.__class__.__name__}: "
                      f"{exc}); it already ended or its actor is gone", logging.DEBUG, job_id=job_id, error=str(exc))
    try:
        decoder.close.remote(decode_id)
    except Exception as exc:  # noqa: BLE001 - the actor may be gone
        log_event(logger, "job.close_decode", f"could not close the job on the decode actor "
                  f"({exc.__class__.__name__}: {exc}); the actor is gone", logging.DEBUG, job_id=job_id,
                  error=str(exc))


def check_resources(*, workers: int, encoders: int, decoders: int, num_gpus: float, encoder_gpus: float,
                    num_cpus: float, note=None, strict: bool | None = None) -> None:
    """Compare what the pools ask Ray for with what the cluster has now (Ray would leave the actors pending
    forever, and ``serve`` would wait with no word).

    Raises:
        ConfigError: on a local Ray (``strict``, default: no ``RAY_ADDRESS``-style cluster, i.e. one node)
            when the GPUs or CPUs asked for exceed the node's, naming the options to change. On a cluster
            (nodes may be added) the same finding is logged as a warning through ``note``.
    """
    import ray  # lazy: see the module docstring

    have = ray.cluster_resources()
    gpus = workers * num_gpus + encoders * encoder_gpus
    cpus = (workers + encoders + decoders) * num_cpus
    problems = []
    if gpus > have.get("GPU", 0.0) + 1e-9:
        problems.append(f"{workers} VideoGLaMM actor(s) x {num_gpus} GPU + {encoders} encoder actor(s) x "
                        f"{encoder_gpus} GPU = {gpus:g} GPU(s), but Ray has {have.get('GPU', 0.0):g}: lower --workers "
                        "/ --encoders, or --num-gpus / --encoder-gpus (e.g. 0.5 each: one of each per GPU)")
    if cpus > have.get("CPU", 0.0) + 1e-9:
        problems.append(f"{workers + encoders + decoders} actor(s) x {num_cpus:g} CPU = {cpus:g} CPU(s), but Ray has "
                        f"{have.get('CPU', 0.0):g}: lower --workers / --encoders / --decoders")
    if not problems:
        return
    if strict is None:
        strict = len(ray.nodes()) <= 1
    message = "the actor pools do not fit this Ray cluster: " + "; ".join(problems)
    if strict:
        raise ConfigError(message)
    if note is not None:
        note("serve.resources", message + " (the actors wait until nodes with them join)", logging.WARNING)


def serve_pools(redis_url: RedisSettings | str, *, decoders: int = 1, encoders: int = 1, workers: int = 1, model: str = "tiny",
                checkpoint: str | None = None, device: str = "auto", policy=None, lease_ms: int = 60_000,
                max_deliveries: int = 3, num_gpus: float = 0.0, encoder_gpus: float = 0.0, num_cpus: float = 0.5,
                threads: int | None = None, stop_event: threading.Event, abort_event: threading.Event | None = None,
                on_start=None, note=None, ahead: int = 2, chunk_size: int = 8, serve_id: str = "pools",
                prefix: str = "refstream", jobs_in_flight: int | None = None,
                result_ttl_s: int = 7 * 24 * 3600) -> int:
    """Build the pools and run ``jobs_in_flight`` coordinator threads over the queue until ``stop_event``.

    ``jobs_in_flight`` defaults to ``2 * workers``: while one job is in SAM2 on a VideoGLaMM worker, the next
    is decoded and encoded. On ``stop_event`` each coordinator finishes the job it holds and stops (jobs not
    taken stay queued); once ``abort_event`` is set too, the jobs held go back to the queue at their next
    progress report instead of finishing. ``on_start(pools)`` is called once the actors are up. ``note(event,
    message, level, **fields)`` receives the events (default: logged on ``refstream.serve``). ``result_ttl_s``: how
    long results and job records live after a job ends (seconds). Returns the number of jobs handled.

    Raises:
        ConfigError: the pools do not fit a local Ray (:func:`check_resources`).
    """
    note = note or (lambda event, message, level=logging.INFO, **fields:
                    log_event(logger, event, message, level, **fields))
    check_resources(workers=workers, encoders=encoders, decoders=decoders, num_gpus=num_gpus,
                    encoder_gpus=encoder_gpus, num_cpus=num_cpus, note=note)
    pools = Pools(decoders=decoders, encoders=encoders, workers=workers, model=model, checkpoint=checkpoint,
                  device=device, num_gpus=num_gpus, encoder_gpus=encoder_gpus, num_cpus=num_cpus, threads=threads,
                  ahead=ahead, chunk_size=chunk_size, redis_url=redis_url, prefix=prefix)
    if on_start is not None:
        on_start(pools)
    slots = max(1, jobs_in_flight or 2 * max(1, workers))
    handled = [0] * slots

    def handler(request, progress) -> dict:
        return run_pooled_job(pools, policy, request, progress, lease_ms=lease_ms, abort=abort_event)

    def loop(slot: int) -> None:
        queue = JobQueue(connect(redis_url), prefix=prefix, lease_ms=lease_ms, max_deliveries=max_deliveries,
                         result_ttl_s=result_ttl_s)
        handled[slot] = _coordinate(queue, f"{serve_id}-coordinator-{slot}", handler, stop_event, note)

    threads_ = [threading.Thread(target=loop, args=(i,), daemon=True, name=f"refstream-coordinator-{i}")
                for i in range(slots)]
    for t in threads_:
        t.start()
    note("serve.started", f"pools: {decoders} decoder(s), {encoders} encoder(s), {workers} worker(s), "
         f"{slots} job(s) in flight on {as_settings(redis_url).masked}", workers=workers,
         redis=as_settings(redis_url).masked)
    _wait_for_coordinators(threads_, stop_event, abort_event, note)
    return sum(handled)


def _coordinate(queue: JobQueue, consumer: str, handler, stop_event: threading.Event, note) -> int:
    """One coordinator: :meth:`JobQueue.work` until ``stop_event``, restarted (and logged) when it fails
    (e.g. Redis away). Returns the jobs handled."""
    handled = 0
    while not stop_event.is_set():
        try:
            handled += queue.work(consumer, handler, stop=stop_event.is_set, block_ms=500)
        except Exception as exc:  # noqa: BLE001 - e.g. Redis away: wait and go on
            note("serve.worker_error", f"a coordinator loop failed ({exc.__class__.__name__}: {exc}); restarting it",
                 logging.WARNING, consumer=consumer, error=str(exc))
            time.sleep(0.5)
    return handled


def _wait_for_coordinators(threads: list[threading.Thread], stop_event: threading.Event,
                           abort_event: threading.Event | None, note) -> None:
    """Wait until every coordinator thread has ended, noting the first and the second stop request (each once,
    also when the threads end before the next look: a second SIGTERM hands the jobs back within moments)."""
    noted: set[str] = set()

    def note_requests() -> None:
        if stop_event.is_set() and "stop" not in noted:
            noted.add("stop")
            note("serve.stopping", "stop requested: the jobs held finish, jobs not taken stay queued")
        if abort_event is not None and abort_event.is_set() and "abort" not in noted:
            noted.add("abort")
            note("serve.aborting", "second stop request: running jobs go back to the queue")

    while any(t.is_alive() for t in threads):
        note_requests()
        for t in threads:
            t.join(timeout=0.5)
    note_requests()
