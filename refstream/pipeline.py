"""One job end to end: a video and referring expressions in, a mask for every frame out.

Stages (each timed, in seconds, in ``summary.json``):

``decode``  read frames (encoder frames once; SAM2 frames streamed in chunks)
``clip``    CLIP vision forward (with q/k/v hooks) and text towers
``prune``   token selection (registry method, per frame, batched)
``llm``     projectors, InternVideo2, Phi-3 prefill (or greedy decoding) -> one [SEG] per expression
``sam2``    SAM2 resize/normalise, anchor-frame prompt and memory propagation over every frame
``write``   RLE, overlay video, token picture, JSON

With ``clip_length`` (VideoGLaMM's Ref-DAVIS protocol: 64) the SAM2 frames are cut into consecutive clips and
each clip is a job of its own (encoder frames, features, LLM answer, fresh SAM2 stream); see :func:`clip_plans`.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pruning.clip_features import ClipFeatureExtractor
from refstream.config import ModelConfig, load_model_config
from refstream.errors import ConfigError, ExpressionError
from refstream_errors import option
from refstream.explain import clip_views
from refstream.options import JobOptions, RunOptions, SweepOptions, make_method, sam2_chunk_for
from refstream.overlap import BackgroundConsumer, BackgroundIterator
from refstream.outputs import JobResult, JobWriter, check_out_folder, job_result, logits_to_mask, staged_folder
from refstream.preflight import preflight
from video_pipeline.decode import MAX_PIXELS, open_video, warn_decode_report
from video_pipeline.plan import FramePlan, encoder_positions, plan_frames
from video_pipeline.preprocess import clip_preprocess, internvideo_preprocess, sam2_preprocess
from workers.build import build_model
from workers.sam2_decoder import Sam2VideoDecoder


class StageTimer:
    """Accumulates wall time per stage (seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a :class:`ConfigError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option('device', 'cuda')} was asked for but no CUDA GPU is visible; use "
                          f"{option('device', 'cpu')}")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Model precision: fp32 on CPU; bf16 (default) or fp16 on CUDA.

    Raises:
        ConfigError: an unknown name, or bf16/fp16 asked for on the CPU (slow or unsupported kernels there).
    """
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"{option('dtype')} must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    if device.type == "cpu" and dtype != "float32":
        raise ConfigError(f"{option('dtype', dtype)} needs a CUDA GPU; on the CPU use {option('dtype', 'float32')} "
                          "(or auto)")
    return DTYPES[dtype]


class Pipeline:
    """A loaded model ready to run jobs (the model is built once and reused across jobs).

    Args:
        config: the model configuration (``load_model_config``).
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``auto`` (float32 on CPU, bfloat16 on CUDA), ``float32``, ``bfloat16`` or ``float16``.
        parts: ``all``, ``encoder`` or ``decoder``: see :func:`workers.build.build_model` (the service's actor
            pools load only what their role needs).

    Raises:
        ConfigError: an unknown dtype, or a half-precision dtype on the CPU.
    """

    def __init__(self, config: ModelConfig, device: str = "auto", dtype: str = "auto", parts: str = "all"):
        self.config = config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = build_model(config, self.device, self.dtype, parts)
        #: SAM2 input resize: VideoGLaMM's own (longest side, then stretch; utils/sam_transforms.py), which the
        #: checkpoint was trained and evaluated with.
        self.sam2_style = "videoglamm"

    @classmethod
    def from_options(cls, options: RunOptions) -> "Pipeline":
        """Load the model that :class:`refstream.options.RunOptions` names (model, checkpoint, device, dtype)."""
        return cls(load_model_config(options.model, options.checkpoint), options.device, options.dtype)

    def overlap_for(self, options) -> bool:
        """Whether a job decodes and writes in background threads while SAM2 runs: ``options.overlap`` when
        given, else on with CUDA (the main thread waits on the GPU; the threads use the idle CPU) and off on
        the CPU, where torch's intra-op threads already occupy every core: on the 2-core CPU a writer thread
        beside them made the README job slower, 17.9 s vs 15.3 s (docs/bench_sam2_cpu.txt)."""
        if options.overlap is not None:
            return bool(options.overlap)
        return self.device.type == "cuda"

    def sam2_chunk_for(self, options) -> int:
        """Frames per SAM2 image-encoder batch: ``options.sam2_chunk`` when given, else 4 with CUDA and 1 on the
        CPU (:data:`refstream.options.SAM2_CHUNK_DEFAULTS`: batching measured slower there with the full-size
        SAM2)."""
        return sam2_chunk_for(options.sam2_chunk, self.device.type)

    # ----------------------------------------------------------------------------------- building blocks
    # ``run`` (one job) and ``run_sweep`` (several methods x budgets over one video, for ``refstream bench run``)
    # are both made of these steps; each expression-independent result is computed once per video and kept in
    # a :class:`VideoFeatures`.

    def open_source(self, input_path: str | Path, decoder: str = "decord", timer: "StageTimer | None" = None,
                    max_pixels: int | None = MAX_PIXELS):
        """Open a video file or frame folder (a :class:`video_pipeline.decode.VideoSource`; close it after);
        frames above ``max_pixels`` are refused from the headers."""
        timer = timer or StageTimer()
        with timer("decode"):
            return open_video(input_path, decoder, max_pixels)

    def encode_video(self, source, plan, *, with_scores: bool, with_penultimate: bool,
                     timer: "StageTimer | None" = None) -> "VideoFeatures":
        """Decode the encoder frames and run ONE CLIP vision forward (per 16 frames) capturing the hooks asked
        for: pass the union of what every method to be run needs (``needs_scores`` / ``needs_penultimate``).

        InternVideo2 tokens and CLIP text embeddings are computed lazily, once, by :meth:`internvideo2_tokens`
        and :meth:`text_embeds`, and cached on the returned :class:`VideoFeatures`.
        """
        timer = timer or StageTimer()
        with timer("decode"):
            encoder_frames = source.read(plan.encoder_indices)
        return self.encode_frames(encoder_frames, with_scores=with_scores, with_penultimate=with_penultimate,
                                  timer=timer, height=source.height, width=source.width, fps=source.fps, plan=plan,
                                  frame_names=[source.frame_names[i] for i in plan.sam2_indices])

    def encode_frames(self, encoder_frames: np.ndarray, *, with_scores: bool, with_penultimate: bool,
                      timer: "StageTimer | None" = None, height: int = 0, width: int = 0, fps=None, plan=None,
                      frame_names: Sequence[str] = ()) -> "VideoFeatures":
        """:meth:`encode_video` on frames already decoded (uint8 [16, H, W, 3], e.g. sent by a decode actor);
        the video metadata fields are optional."""
        timer = timer or StageTimer()
        with timer("clip"):
            clip_pixels = clip_preprocess(encoder_frames)
            extractor = ClipFeatureExtractor(self.model.clip, self.model.clip_tokenizer)
            features = extractor.encode_frames(clip_pixels, with_scores=with_scores, with_penultimate=with_penultimate)
        return VideoFeatures(
            height=height, width=width, fps=fps, plan=plan, frame_names=list(frame_names),
            encoder_frames=encoder_frames, clip_pixels=clip_pixels, clip=features, extractor=extractor,
        )

    def text_embeds(self, video: "VideoFeatures", texts: Sequence[str], timer: "StageTimer | None" = None) -> torch.Tensor:
        """CLIP ``text_embeds`` [N, P] of ``texts``; each distinct text goes through the text tower once per
        video (one batched forward for the texts not seen yet)."""
        timer = timer or StageTimer()
        with timer("clip"):
            new = [t for t in dict.fromkeys(texts) if t not in video.text_cache]
            if new:
                for text, row in zip(new, video.extractor.encode_texts(new)):
                    video.text_cache[text] = row
            return torch.stack([video.text_cache[t] for t in texts])

    def internvideo2_tokens(self, video: "VideoFeatures", timer: "StageTimer | None" = None) -> torch.Tensor:
        """InternVideo2 tokens [T, 64, H] of the encoder frames, computed once per video."""
        timer = timer or StageTimer()
        if video.iv2_tokens is None:
            with timer("llm"):
                video.iv2_tokens = self.model.internvideo2_tokens(internvideo_preprocess(video.encoder_frames))
        return video.iv2_tokens

    def clip_texts(self, expressions: Sequence[str], clip_text: str = "question") -> list[str]:
        """What the CLIP text tower reads for each expression (the templated question or the bare expression)."""
        return [self.model.question(e) if clip_text == "question" else e for e in expressions]

    def answer(self, video: "VideoFeatures", method, budget: int, placement: str, expressions: Sequence[str],
               answer_mode: str = "forced", clip_text: str = "question",
               timer: "StageTimer | None" = None, seed: int = 0) -> "AnswerResult":
        """Prune (one selection shared by ``expressions``; LiteLVLM's rule over N texts) and run the LLM.

        Args:
            video: the clip's :class:`VideoFeatures`.
            method: a :class:`pruning.registry.PruningMethod`.
            budget: visual tokens kept per frame, of 576 (pooled: ``round(budget / 4)`` of the 144 cells).
            placement: ``pooled`` or ``patch``.
            expressions: E referring expressions (stripped, non-empty).
            answer_mode: ``forced``, ``generate`` or ``sample`` (see :meth:`workers.videoglamm.VideoGLaMM.seg_answers`).
            clip_text: what CLIP's text tower reads (``question`` or ``expression``).
            seed: of ``sample``.

        Returns:
            an :class:`AnswerResult`.

        Raises:
            SequenceTooLongError: the visual tokens and the prompt exceed the LLM's positions.
        """
        timer = timer or StageTimer()
        model = self.model
        selection, visual = self.visual_tokens(video, method, budget, placement, expressions, clip_text, timer)
        with timer("llm"):
            llm_info = {}
            if selection.stage == "llm":  # prunes inside the LLM (FastV): indices come from the LLM's run
                answers, selection = method.run_llm(model, visual, list(expressions), selection, answer_mode, seed)
                llm_info = {"llm_layer_lengths": [a.layer_lengths for a in answers]}  # per expression, per layer
            else:
                answers = model.seg_answers(visual, list(expressions), answer_mode, seed=seed)
        seq_len = max(model.sequence_length(visual.shape[0], e) for e in expressions)
        return AnswerResult(answers=list(answers), selection=selection, visual_tokens=int(visual.shape[0]),
                            llm_sequence_length=seq_len, llm_info=llm_info)

    def visual_tokens(self, video: "VideoFeatures", method, budget: int, placement: str, expressions: Sequence[str],
                      clip_text: str = "question", timer: "StageTimer | None" = None):
        """Prune (one selection shared by ``expressions``) and build the LLM's visual input.

        Returns:
            ``(selection, visual)``: the :class:`pruning.registry.Selection` and float [V, H], the projected
            CLIP tokens kept (frame-major; FastV: every CLIP token) followed by the InternVideo2 tokens.
        """
        timer = timer or StageTimer()
        text_embeds = None
        if method.needs_text:
            text_embeds = self.text_embeds(video, self.clip_texts(expressions, clip_text), timer)
        with timer("prune"):
            selection = method.select(video.clip, text_embeds, budget, placement)
        iv2 = self.internvideo2_tokens(video, timer)
        with timer("llm"):
            clip_tokens = self.model.clip_tokens(video.clip.hidden, selection, placement)
            visual = torch.cat([clip_tokens.flatten(0, 1), iv2.flatten(0, 1)])
        return selection, visual

    def iter_logits(self, source, plan, answers: Sequence, timer: "StageTimer | None" = None,
                    progress: bool = False, desc: str = "segmenting", *, sam2_chunk: int = 1,
                    overlap: bool = False) -> Iterator[tuple[int, np.ndarray, list]]:
        """ONE streaming SAM2 pass for every answer (N objects in one session: each frame's image features are
        computed once for all of them), decoding the SAM2 frames in chunks of ``max(8, sam2_chunk)`` (bounded
        memory).

        Args:
            sam2_chunk: frames per SAM2 image-encoder batch (:meth:`workers.sam2_decoder.Sam2Stream.step_chunk`;
                1: frame by frame). The logits do not change (up to float rounding, see tests/test_sam2_batched.py).
            overlap: decode and SAM2-preprocess the next chunk in a background thread
                (:class:`refstream.overlap.BackgroundIterator`, one chunk ahead) while SAM2 runs; the model and
                every device transfer stay in this thread. The decode thread's seconds go to the ``decode``
                (reading) and ``sam2`` (resize/normalise) stages as before, so stages may overlap in time.

        Yields, per SAM2 frame in order, ``(position, frame, logits)``: the frame's position in
        ``plan.sam2_indices``, the source frame uint8 [H, W, 3], and per answer float32 [H, W] mask logits
        (``> 0`` = object) or None for an answer without [SEG]. Closing the generator ends the SAM2 session and
        the decode thread. An error of the decode thread is raised here, as raised there.
        """
        timer = timer or StageTimer()
        decoder = Sam2VideoDecoder(self.model.sam2, chunk_size=sam2_chunk)
        prompted = [i for i, a in enumerate(answers) if a.embedding is not None]
        stream = None
        if prompted:
            seg = torch.stack([answers[i].embedding for i in prompted])
            with timer("sam2"):
                stream = decoder.open_stream(seg, (source.height, source.width))
        bar = tqdm(total=len(plan.sam2_indices), desc=desc, unit="frame", disable=not progress, file=sys.stderr)
        reader = StageTimer()  # the decoding side's own seconds (another thread with ``overlap``)

        def read_chunks():
            chunks = source.iter_chunks(plan.sam2_indices, chunk_size=max(8, sam2_chunk))
            try:
                while True:
                    with reader("decode"):
                        item = next(chunks, None)
                    if item is None:
                        return
                    _, frames = item
                    with reader("sam2"):
                        pixels = (sam2_preprocess(frames, style=self.sam2_style, size=decoder.image_size)
                                  if stream is not None else None)
                    yield frames, pixels
            finally:
                chunks.close()

        chunks = BackgroundIterator(read_chunks(), maxsize=1, name="refstream-decode") if overlap else read_chunks()
        position = 0
        try:
            while True:
                item = next(chunks, None)  # its decode/resize seconds are counted by ``reader``
                if item is None:
                    break
                frames, pixels = item
                steps = stream.step_chunk(pixels) if stream is not None else None
                for frame in frames:
                    per_object: list = [None] * len(answers)
                    if steps is not None:
                        with timer("sam2"):
                            logits = next(steps)
                            for k, i in enumerate(prompted):
                                per_object[i] = logits[k].float().cpu()
                    yield position, frame, per_object
                    position += 1
                    bar.update(1)
        finally:
            chunks.close()
            bar.close()
            if stream is not None:
                stream.close()
            for stage, seconds in reader.seconds.items():
                timer.seconds[stage] += seconds

    def segment_logits(self, source, plan, answers: Sequence, on_frame, timer: "StageTimer | None" = None,
                       progress: bool = False, desc: str = "segmenting", *, sam2_chunk: int = 1,
                       overlap: bool = False) -> None:
        """:meth:`iter_logits` with a callback: ``on_frame(position, frame, logits)`` per frame, in order."""
        for position, frame, logits in self.iter_logits(source, plan, answers, timer, progress, desc,
                                                         sam2_chunk=sam2_chunk, overlap=overlap):
            on_frame(position, frame, logits)

    # ------------------------------------------------------------------------------------------------ one job
    def stream(self, input_path: str | Path, options: JobOptions, progress: bool = False,
               on_open: Callable | None = None) -> "JobStream":
        """One job as a stream of frames: iterate the returned :class:`JobStream` for a :class:`FrameMasks`
        per SAM2 frame (bounded memory: one chunk of frames and one clip's features at a time), then call
        :meth:`JobStream.result` for the job's :class:`refstream.outputs.JobResult`.

        ``on_open(source)`` is called once the input is open (e.g. to read its fps and size).

        With ``options.clip_length`` the SAM2 frames are cut into consecutive clips (:func:`clip_plans`), each
        run as its own job (encoder frames by VideoGLaMM's rule over the clip, CLIP features, pruning, LLM
        answer, fresh SAM2 stream anchored on the clip's first frame); ``JobResult.clips`` describes each clip.

        Raises (while iterating):
            RefStreamError subclasses for bad input (exit code 2 in the CLI).
        """
        return JobStream(self, input_path, options, progress, on_open)

    def run(self, input_path: str | Path, options: JobOptions, progress: bool = True, on_frames=None,
            on_open=None) -> JobResult:
        """Run one job to the end and return its :class:`refstream.outputs.JobResult` (masks as COCO RLE).

        ``on_open(source)`` is called once the input is open; ``on_frames(position, source_frame uint8 [H,W,3],
        masks bool [N,H,W])`` for every SAM2 frame as it finishes. See :meth:`stream`.

        Raises:
            RefStreamError subclasses for bad input (exit code 2 in the CLI).
        """
        job = self.stream(input_path, options, progress, on_open)
        collector = JobWriter(None, len(options.expressions))  # RLE only, no files
        sink = BackgroundConsumer(collector.add, maxsize=4) if self.overlap_for(options) else None  # RLE in a thread
        try:
            for item in job:
                with job.timer("write"):
                    if sink is not None:
                        sink.put(None, item.masks)
                    else:
                        collector.add(None, item.masks)
                    if on_frames is not None:
                        on_frames(item.position, item.frame, item.masks)
            if sink is not None:
                sink.finish()
                job.timer.seconds["write"] += collector.seconds
        finally:
            job.close()
            if sink is not None:
                sink.close()
        return job.result(collector.masks)

    # ------------------------------------------------------------------------------ sweep (bench run)
    def run_sweep(self, input_path: str | Path, expressions: Sequence[str], runs: Sequence[tuple[str, int]],
                  on_run_frame, *, options: "SweepOptions | None" = None, on_run_done=None,
                  on_run_start=None, progress: bool = False) -> "SweepResult":
        """Several (method, budget) runs over one video and its expressions, sharing every
        expression-independent result.

        Computed ONCE per video: the decoded encoder frames, one CLIP vision forward with every hook any of
        the methods needs, the InternVideo2 tokens, and the CLIP text embeddings (one per distinct text).
        Per run (method, budget): the pruning and the LLM; a text-dependent method (``needs_text``) prunes
        for each expression with its own text (one query = one expression, as the benchmarks score it),
        the others once for all expressions. Then all expressions of the run go through ONE SAM2 pass
        (N objects, image features once per frame); with ``options.sam2_pass == "video"`` all runs share a
        single SAM2 pass instead (every run's objects in one session).

        Args:
            expressions: the expressions of every run (unless a run names its own).
            runs: (method spec, budget) pairs, e.g. ``("litelvlm:official", 81)``, or (method spec, budget,
                expressions) triples for runs over their own subset of expressions.
            on_run_frame: ``on_run_frame(run_index, position, frame_name, logits)`` with ``logits`` a list
                (per expression) of float32 [H, W] logits or None (no [SEG]).
            on_run_start: ``on_run_start(run_index, info)`` once the run's answers are known (before SAM2),
                ``info`` = dict(visual_tokens=[per expression], answers=[...], kept_per_frame=int); with
                ``options.clip_length``, once per run, for its first clip.
            on_run_done: ``on_run_done(run_index, stage_seconds)`` after its SAM2 pass (of the last clip).

        With ``options.clip_length`` the SAM2 frames are cut into consecutive clips (:func:`clip_plans`) and
        everything above is done per clip (encoder frames by VideoGLaMM's rule over the clip, features,
        answers, fresh SAM2 streams anchored on the clip's first frame); ``on_run_frame`` positions run over
        the whole video.

        Returns:
            :class:`SweepResult` (frames, size, shared and per-run stage seconds).
        """
        options = options or SweepOptions()
        expressions = [e.strip() for e in expressions]
        runs = [(r[0], r[1], [e.strip() for e in r[2]] if len(r) > 2 else expressions) for r in runs]
        for _, _, subset in runs:
            if not subset or any(not e for e in subset):
                raise ExpressionError('a referring expression is empty: every unit needs a non-empty expression')
        methods = [make_method(spec, options.variant) for spec, _, _ in runs]
        shared = StageTimer()
        per_run = [StageTimer() for _ in runs]
        names: list[str] = []
        source = self.open_source(input_path, options.decoder, shared, options.max_pixels)
        with source:
            plan = plan_frames(source.num_frames, options.frames, options.stride, options.max_frames)
            clips = clip_plans(plan, options.clip_length, options.frames)
            for clip_index, clip in enumerate(clips):
                self._sweep_clip(source, clip, runs, methods, options, shared, per_run, names, on_run_frame,
                                 on_run_start if clip_index == 0 else None,
                                 on_run_done if clip_index == len(clips) - 1 else None, progress)
        return SweepResult(
            frames=names, height=source.height, width=source.width, shared_seconds=dict(shared.seconds),
            run_seconds=[dict(t.seconds) for t in per_run], clips=len(clips),
        )

    def _sweep_clip(self, source, plan, runs, methods, options: "SweepOptions", shared: StageTimer,
                    per_run: list[StageTimer], names: list[str], on_run_frame, on_run_start, on_run_done,
                    progress: bool) -> None:
        """:meth:`run_sweep` over one clip (the whole video without ``clip_length``): its own encoder frames,
        features, answers per run and SAM2 pass(es); frame positions continue from ``len(names)``."""
        video = self.encode_video(
            source, plan, with_scores=any(m.needs_scores for m in methods),
            with_penultimate=any(m.needs_penultimate for m in methods), timer=shared)
        if any(m.needs_text for m in methods):
            every = list(dict.fromkeys(e for _, _, subset in runs for e in subset))
            self.text_embeds(video, self.clip_texts(every, options.clip_text), shared)
        self.internvideo2_tokens(video, shared)
        all_answers = []
        for r, ((spec, budget, expressions), method) in enumerate(zip(runs, methods)):
            timer = per_run[r]
            if method.needs_text:
                parts = [self.answer(video, method, budget, options.placement, [e], options.answer,
                                     options.clip_text, timer, options.seed) for e in expressions]
                answers = [p.answers[0] for p in parts]
                tokens = [p.visual_tokens for p in parts]
                kept = parts[0].selection.kept_per_frame
            else:
                part = self.answer(video, method, budget, options.placement, expressions, options.answer,
                                   options.clip_text, timer, options.seed)
                answers, tokens, kept = part.answers, [part.visual_tokens] * len(expressions), part.selection.kept_per_frame
            all_answers.append(answers)
            if on_run_start is not None:
                on_run_start(r, {"visual_tokens": tokens, "answers": [a.text for a in answers],
                                 "kept_per_frame": kept})
        offset = len(names)
        clip_names = video.frame_names
        names += clip_names
        del video  # bounded memory: one clip's features at a time

        if options.sam2_pass == "video":
            flat = [a for answers in all_answers for a in answers]
            offsets = np.cumsum([0] + [len(a) for a in all_answers]).tolist()
            combined = StageTimer()

            def on_frame(position, frame, logits):
                for r in range(len(runs)):
                    on_run_frame(r, offset + position, clip_names[position], logits[offsets[r]:offsets[r + 1]])

            self.segment_logits(source, plan, flat, on_frame, combined, progress,
                                sam2_chunk=self.sam2_chunk_for(options), overlap=self.overlap_for(options))
            for r, timer in enumerate(per_run):  # one pass for all runs: its time split evenly
                for stage, seconds in combined.seconds.items():
                    timer.seconds[stage] += seconds / len(runs)
                if on_run_done is not None:
                    on_run_done(r, dict(timer.seconds))
        else:
            for r, answers in enumerate(all_answers):
                self.segment_logits(
                    source, plan, answers,
                    lambda position, frame, logits, r=r: on_run_frame(
                        r, offset + position, clip_names[position], logits),
                    per_run[r], progress, sam2_chunk=self.sam2_chunk_for(options),
                    overlap=self.overlap_for(options))
                if on_run_done is not None:
                    on_run_done(r, dict(per_run[r].seconds))



@dataclass
class SweepResult:
    """What :meth:`Pipeline.run_sweep` returns: the SAM2 frame names, the frame size (pixels), seconds per stage
    (shared by every run, and per run) and the number of clips the video was cut into (1: the whole video)."""

    frames: list[str]
    height: int
    width: int
    shared_seconds: dict[str, float]
    run_seconds: list[dict[str, float]]
    clips: int = 1


@dataclass
class VideoFeatures:
    """The expression-independent results of one video, computed once and reused by every run."""

    height: int
    width: int
    fps: float | None
    plan: object  # video_pipeline.plan.FramePlan
    frame_names: list[str]  # names of the SAM2 frames
    encoder_frames: np.ndarray  # uint8 [16, H, W, 3]
    clip_pixels: torch.Tensor  # CLIP-normalised encoder frames
    clip: object  # pruning.clip_features.ClipFrameFeatures (union of the hooks the methods need)
    extractor: object  # the ClipFeatureExtractor (for the text tower)
    iv2_tokens: torch.Tensor | None = None
    text_cache: dict = field(default_factory=dict)  # CLIP text -> text_embeds row [P]


def clip_plans(plan, clip_length: int | None, num_encoder_frames: int = 16) -> list:
    """Cut a :class:`video_pipeline.plan.FramePlan` into consecutive clips of ``clip_length`` SAM2 frames.

    VideoGLaMM's Ref-DAVIS evaluation (github mbzuai-oryx/VideoGLaMM @ 6b15b1e7f75009d0e1a858ac08e28021c4faaf11,
    ``VideoGLaMM/eval_referdavis_infer.py``: ``for clip_id in range(0, video_len, 64):
    clip_frames_ids = range(clip_id, min(clip_id + 64, video_len))``, then ``preprocess_vision`` and
    ``model.inference`` per clip) runs every clip as its own video: its encoder frames follow the usual rule
    over the clip (:func:`video_pipeline.plan.encoder_positions`: linspace when the clip has more than 16
    frames, else every frame with the last one repeated), it gets its own LLM answer and a fresh SAM2 state,
    and the clips' masks are concatenated. Clips are cut from ``plan.sam2_indices`` (after ``stride`` /
    ``max_frames``; the protocol itself uses stride 1).

    Args:
        plan: the whole video's plan.
        clip_length: SAM2 frames per clip (the last clip may be shorter), or None for one clip = ``plan``.
        num_encoder_frames: encoder frames per clip (VideoGLaMM: 16).

    Returns:
        a list of FramePlan, one per clip, whose ``sam2_indices`` concatenate to ``plan.sam2_indices``
        (``encoder_positions`` are relative to the clip).
    """
    if clip_length is None:
        return [plan]
    sam2 = list(plan.sam2_indices)
    clips = []
    for start in range(0, len(sam2), clip_length):
        frames = sam2[start:start + clip_length]
        positions = encoder_positions(len(frames), num_encoder_frames)
        clips.append(FramePlan(num_frames=plan.num_frames, stride=plan.stride, sam2_indices=frames,
                               encoder_indices=[frames[p] for p in positions], encoder_positions=positions))
    return clips


def clip_view(clip_pixels: torch.Tensor) -> np.ndarray:
    """The first CLIP input frame as a picture: float [F, 3, 336, 336] (CLIP-normalized) -> uint8 [336, 336, 3]
    (what ``tokens.png`` draws the kept tokens on)."""
    return clip_views(clip_pixels[:1])[0]


def run_to_folder(input_path: str | Path, options: RunOptions, out: str | Path, progress: bool = True,
                  pipeline: Pipeline | None = None, load_seconds: float = 0.0, on_frames=None, on_open=None) -> dict:
    """Run a job and write ``masks.json``, ``overlay.mp4``, ``tokens.png`` and ``summary.json`` into ``out``
    through the one :class:`refstream.outputs.JobWriter`: ``out`` is checked first
    (:func:`refstream.outputs.check_out_folder`), the files are written into a temporary folder beside it and
    moved in only when the job succeeded (:func:`refstream.outputs.staged_folder`).

    ``on_open(source)`` and ``on_frames(position, frame, masks)`` are called as in :meth:`Pipeline.run`, after
    the frame is handed to the writer (the service uses them for progress). ``pipeline`` is a loaded model (else
    one is loaded from ``options``, and its load time reported).

    With overlap (:meth:`Pipeline.overlap_for`: ``options.overlap``, by default on with CUDA only) the writer's
    per-frame work (RLE + overlay encoding) runs in a background thread
    (:class:`refstream.overlap.BackgroundConsumer`, at most 4 frames queued, in order) and the next frames are
    decoded in another (:meth:`Pipeline.iter_logits`) while SAM2 runs; an error in either thread fails the
    job here with its own exception, both threads are joined, and the staging folder is removed.

    Returns:
        The summary dictionary (also written to ``summary.json``).

    Raises:
        RefStreamError subclasses for bad input (exit code 2 in the CLI).
    """
    started = time.perf_counter()
    if pipeline is None:
        preflight(input_path, options, out)  # every check that needs no model, before the model loads
        loading = time.perf_counter()
        pipeline = Pipeline.from_options(options)
        load_seconds = time.perf_counter() - loading
    else:
        check_out_folder(out, input_path)  # before a frame decodes
        started -= load_seconds  # the model was loaded by the caller just before
    with staged_folder(out) as stage:  # a failed run leaves no empty or partial out folder
        job = pipeline.stream(input_path, options, progress, on_open)
        writer = sink = None
        try:
            for item in job:
                if writer is None:
                    writer = JobWriter(stage, len(options.expressions), job.width, job.height, job.fps)
                    if pipeline.overlap_for(options):  # RLE + overlay encoding in a thread, at most 4 frames behind SAM2
                        sink = BackgroundConsumer(writer.add, maxsize=4, name="refstream-writer")
                if sink is not None:
                    sink.put(item.frame, item.masks)
                else:
                    writer.add(item.frame, item.masks)
                if on_frames is not None:
                    on_frames(item.position, item.frame, item.masks)
            if sink is not None:
                sink.finish()  # every frame written (or the writer's error raised here)
            if writer is None:  # no SAM2 frame (cannot happen with a valid plan; kept for a clear error path)
                writer = JobWriter(stage, len(options.expressions), job.width, job.height, job.fps)
            return writer.finish(job.result(writer.masks), device=str(pipeline.device), started=started,
                                 load_seconds=load_seconds)
        finally:
            if sink is not None:
                sink.close()
            job.close()
            if writer is not None:
                writer.close()


@dataclass
class AnswerResult:
    """What :meth:`Pipeline.answer` returns: the LLM's answers over one clip's pruned visual tokens.

    Attributes:
        answers: per expression a :class:`workers.videoglamm.SegAnswer` (text; [SEG] embedding float
            [seg_dim] or None).
        selection: the :class:`pruning.registry.Selection` (FastV: what it kept inside the LLM).
        visual_tokens: V, the visual tokens that went into the LLM (CLIP kept + InternVideo2).
        llm_sequence_length: the longest LLM input over the expressions (prompt + visual + forced answer).
        llm_info: extra facts (FastV: ``llm_layer_lengths`` per expression, per layer).
    """

    answers: list
    selection: object
    visual_tokens: int
    llm_sequence_length: int
    llm_info: dict = field(default_factory=dict)


@dataclass
class FrameMasks:
    """One segmented frame of a :class:`JobStream`.

    Attributes:
        position: 0-based position among the job's SAM2 frames (after ``stride`` / ``max_frames``).
        frame_index: 0-based index of the frame in the source video.
        name: the frame's name (file stem of a frame folder, or its zero-padded index).
        frame: uint8 [H, W, 3] RGB, the source frame.
        masks: bool [N, H, W], one mask per expression (all False for an answer without [SEG]).
    """

    position: int
    frame_index: int
    name: str
    frame: np.ndarray
    masks: np.ndarray


class JobStream:
    """One job, frame by frame (built by :meth:`Pipeline.stream`).

    Iterating yields a :class:`FrameMasks` per SAM2 frame, in order. Per clip (the whole video without
    ``clip_length``) it decodes the encoder frames, runs CLIP, the pruning method and the LLM once, then
    streams SAM2 over the clip's frames; only one clip's features and one chunk of frames are held at a time.
    After the last frame, :meth:`result` builds the :class:`refstream.outputs.JobResult`. :meth:`close` (or
    leaving the iteration early) closes the video and the SAM2 session.

    Attributes:
        timer: the job's :class:`StageTimer` (wall seconds per stage).
        height, width, fps: of the source, once the first frame is out (after ``on_open``).
    """

    def __init__(self, pipeline: Pipeline, input_path: str | Path, options: JobOptions, progress: bool = False,
                 on_open: Callable | None = None):
        self.pipeline, self.input_path, self.options = pipeline, input_path, options
        self.timer = StageTimer()
        self.height = self.width = 0
        self.fps = None
        self.frame_names: list[str] = []
        self.clips: list[dict] = []
        self.visual_tokens = self.llm_sequence_length = 0
        self._first: tuple | None = None  # (AnswerResult, clip_pixels) of the first clip: what the job reports
        #: the source's decode_report() once the last frame is out (rotation, sizes, resized/damaged frames)
        self.decode: dict = {}
        self._frames = self._generate(progress, on_open)

    def __iter__(self) -> Iterator[FrameMasks]:
        return self._frames

    def __next__(self) -> FrameMasks:
        return next(self._frames)

    def close(self) -> None:
        """Stop early: closes the video and the SAM2 session (idempotent)."""
        self._frames.close()

    def _generate(self, progress: bool, on_open) -> Iterator[FrameMasks]:
        options, pipeline = self.options, self.pipeline
        method = make_method(options.method, options.variant)
        source = pipeline.open_source(self.input_path, options.decoder, self.timer, options.max_pixels)
        self._source = source
        with source:
            self.height, self.width, self.fps = source.height, source.width, source.fps
            if on_open is not None:
                on_open(source)
            plan = plan_frames(source.num_frames, options.frames, options.stride, options.max_frames)
            for clip_index, clip in enumerate(clip_plans(plan, options.clip_length, options.frames)):
                answer = self._answer_clip(source, clip, method)
                start = len(self.frame_names) - len(clip.sam2_indices)
                desc = "segmenting" if options.clip_length is None else f"segmenting clip {clip_index + 1}"
                for position, frame, logits in pipeline.iter_logits(source, clip, answer.answers, self.timer,
                                                                    progress, desc,
                                                                    sam2_chunk=pipeline.sam2_chunk_for(options),
                                                                    overlap=pipeline.overlap_for(options)):
                    with self.timer("sam2"):
                        masks = np.stack([logits_to_mask(lg, (self.height, self.width)) for lg in logits])
                    yield FrameMasks(position=start + position, frame_index=clip.sam2_indices[position],
                                     name=self.frame_names[start + position], frame=frame, masks=masks)
            self.decode = source.decode_report()
            warn_decode_report(source.path, self.decode, len(plan.sam2_indices))

    def _answer_clip(self, source, clip, method) -> AnswerResult:
        """Encoder frames, CLIP features, pruning and the LLM answer of one clip; records the clip."""
        options, pipeline = self.options, self.pipeline
        video = pipeline.encode_video(source, clip, with_scores=method.needs_scores,
                                      with_penultimate=method.needs_penultimate, timer=self.timer)
        answer = pipeline.answer(video, method, options.budget, options.placement, options.expressions,
                                 options.answer, options.clip_text, self.timer, options.seed)
        self.visual_tokens = max(self.visual_tokens, answer.visual_tokens)
        self.llm_sequence_length = max(self.llm_sequence_length, answer.llm_sequence_length)
        if self._first is None:
            self._first = (answer, video.clip_pixels)
        self.clips.append({"start": len(self.frame_names), "frames": len(clip.sam2_indices),
                           "source_frames": [clip.sam2_indices[0], clip.sam2_indices[-1]],
                           "encoder_indices": list(clip.encoder_indices),
                           "answers": [a.text for a in answer.answers]})
        self.frame_names += video.frame_names
        return answer  # the clip's features (video) are dropped here: bounded memory

    def result(self, masks: list[list[dict]]) -> JobResult:
        """The job's :class:`refstream.outputs.JobResult` with ``masks`` (per expression, per frame: COCO RLE),
        through the one builder :func:`refstream.outputs.job_result`.

        Raises:
            RuntimeError: the stream has not produced its first clip yet.
        """
        if self._first is None:
            raise RuntimeError("JobStream.result() before the job ran: iterate the stream first")
        answer, clip_pixels = self._first
        config = self.pipeline.config
        return job_result(
            video=str(self.input_path), height=self.height, width=self.width, fps=self.fps, frames=self.frame_names,
            options=self.options, answers=[a.text for a in answer.answers], masks=masks, selection=answer.selection,
            llm_info=answer.llm_info, model=config.name, random_weights=config.random_weights,
            visual_tokens=self.visual_tokens, llm_sequence_length=self.llm_sequence_length,
            timings=dict(self.timer.seconds), tokens_view=clip_view(clip_pixels), clips=self.clips,
            decode=self.decode or self._source.decode_report())
