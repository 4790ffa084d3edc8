"""One job end to end: a video and referring expressions in, a mask for every frame out.

Stages (each timed, in seconds, in ``summary.json``):

``decode``  read frames (encoder frames once; SAM2 frames streamed in chunks)
``clip``    CLIP vision forward (with q/k/v hooks) and text towers
``prune``   token selection (registry method, per frame, batched)
``llm``     projectors, InternVideo2, Phi-3 prefill (or greedy decoding) -> one [SEG] per expression
``sam2``    SAM2 resize/normalise, anchor-frame prompt and memory propagation over every frame
``write``   RLE, overlay video, token picture, JSON
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from refstream.config import ModelConfig, load_model_config
from refstream.errors import ConfigError, ExpressionError

STAGES = ("decode", "clip", "prune", "llm", "sam2", "write")
RANDOM_WEIGHTS_NOTE = "random weights (--model tiny): the masks carry no meaning"


@dataclass
class RunOptions:
    """Options of ``refstream run`` (see ``refstream run --help``)."""

    expressions: list[str]
    model: str = "videoglamm"
    checkpoint: str | None = None
    method: str = "litelvlm"
    variant: str = "paper"
    budget: int = 196
    placement: str = "pooled"
    frames: int = 16
    device: str = "auto"
    decoder: str = "decord"
    stride: int = 1
    max_frames: int | None = None
    clip_text: str = "question"
    answer: str = "forced"

    def validate(self) -> None:
        """Raise :class:`ExpressionError` / :class:`ConfigError` for bad options, naming the fix."""
        if not self.expressions:
            raise ExpressionError('no referring expression: pass --expression "the black swan"')
        for expression in self.expressions:
            if not expression or not expression.strip():
                raise ExpressionError('a referring expression is empty: pass --expression "the black swan"')
        if self.budget < 1:
            raise ConfigError(f"--budget must be >= 1 (got {self.budget}); 576 keeps every token")
        if self.frames < 4 or self.frames % 4:
            raise ConfigError(f"--frames must be a positive multiple of 4 (InternVideo2 takes 4-frame chunks), got {self.frames}")
        if self.clip_text not in ("question", "expression"):
            raise ConfigError(f"--clip-text must be 'question' or 'expression', got {self.clip_text!r}")
        if self.answer not in ("forced", "generate"):
            raise ConfigError(f"--answer must be 'forced' or 'generate', got {self.answer!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be cpu, cuda or auto, got {self.device!r}")


@dataclass
class JobResult:
    """What one job produced; :func:`write_outputs` turns it into files."""

    video: str
    height: int
    width: int
    fps: float | None
    frames: list[str]
    expressions: list[str]
    answers: list[str]
    masks: list[list[dict]]  # per expression, per frame: COCO RLE
    pruning: dict
    model: str
    random_weights: bool
    visual_tokens: int
    llm_sequence_length: int
    timings: dict[str, float] = field(default_factory=dict)
    tokens_view: np.ndarray | None = None  # uint8 [S, S, 3] CLIP view of one encoder frame
    tokens_selection: tuple | None = None  # (indices [K], similarity_aware [K], grid)


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
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


class Pipeline:
    """A loaded model ready to run jobs (the model is built once and reused across jobs).

    Args:
        config: the model configuration (``load_model_config``).
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    def __init__(self, config: ModelConfig, device: str = "auto"):
        from workers.build import build_model

        self.config = config
        self.device = resolve_device(device)
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = build_model(config, self.device, dtype)
        #: SAM2 input resize: VideoGLaMM's own (longest side, then stretch; utils/sam_transforms.py), which the
        #: checkpoint was trained and evaluated with.
        self.sam2_style = "videoglamm"

    @classmethod
    def from_options(cls, options: RunOptions) -> "Pipeline":
        return cls(load_model_config(options.model, options.checkpoint), options.device)

    def run(self, input_path: str | Path, options: RunOptions, progress: bool = True, on_frames=None,
            on_open=None) -> JobResult:
        """Run one job. ``on_open(source)`` is called once the input is open (e.g. to read its fps);
        ``on_frames(frame_index, source_frame uint8 [H,W,3], masks bool [N,H,W])`` is called
        for every SAM2 frame as it finishes (used to stream the overlay video).

        Raises:
            RefStreamError subclasses for bad input (exit code 2 in the CLI).
        """
        from pruning.clip_features import ClipFeatureExtractor
        from pruning.registry import get_method
        from refstream.explain import parse_method_spec
        from refstream.outputs import encode_rle
        from video_pipeline.decode import open_video
        from video_pipeline.plan import plan_frames
        from video_pipeline.preprocess import clip_preprocess, internvideo_preprocess
        from workers.sam2_decoder import Sam2VideoDecoder

        options.validate()
        method_name, method_options = parse_method_spec(options.method)
        if method_name == "litelvlm":
            method_options.setdefault("variant", options.variant)
        method = get_method(method_name, **method_options)
        timer = StageTimer()
        model = self.model
        expressions = [e.strip() for e in options.expressions]

        with timer("decode"):
            source = open_video(input_path, options.decoder)
        with source:
            if on_open is not None:
                on_open(source)
            plan = plan_frames(source.num_frames, options.frames, options.stride, options.max_frames)
            with timer("decode"):
                encoder_frames = source.read(plan.encoder_indices)
            with timer("clip"):
                clip_pixels = clip_preprocess(encoder_frames)
                extractor = ClipFeatureExtractor(model.clip, model.clip_tokenizer)
                features = extractor.encode_frames(
                    clip_pixels, with_scores=method.needs_scores, with_penultimate=method.needs_penultimate
                )
                text_embeds = None
                if method.needs_text:
                    texts = [model.question(e) if options.clip_text == "question" else e for e in expressions]
                    text_embeds = extractor.encode_texts(texts)
            with timer("prune"):
                selection = method.select(features, text_embeds, options.budget, options.placement)
            with timer("llm"):
                clip_tokens = model.clip_tokens(features.hidden, selection, options.placement)
                iv2_tokens = model.internvideo2_tokens(internvideo_preprocess(encoder_frames))
                visual = torch.cat([clip_tokens.flatten(0, 1), iv2_tokens.flatten(0, 1)])
                llm_info = {}
                if selection.stage == "llm":  # prunes inside the LLM (FastV): indices come from the LLM's run
                    answers, selection = method.run_llm(model, visual, expressions, selection, options.answer)
                    llm_info = {"llm_layer_lengths": [a.layer_lengths for a in answers]}  # per expression, per layer
                else:
                    answers = model.seg_answers(visual, expressions, options.answer)
            seq_len = max(model.sequence_length(visual.shape[0], e) for e in expressions)

            masks: list[list[dict]] = [[] for _ in expressions]
            self._segment(source, plan, answers, masks, timer, progress, on_frames, Sam2VideoDecoder, encode_rle)

        view = (clip_pixels[0] * torch.tensor(_CLIP_STD).view(3, 1, 1) + torch.tensor(_CLIP_MEAN).view(3, 1, 1))
        view = (view.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return JobResult(
            video=str(input_path),
            height=source.height,
            width=source.width,
            fps=source.fps,
            frames=[source.frame_names[i] for i in plan.sam2_indices],
            expressions=expressions,
            answers=[a.text for a in answers],
            masks=masks,
            pruning={
                "method": options.method,
                "variant": options.variant if options.method == "litelvlm" else None,
                "budget": options.budget,
                "placement": options.placement,
                "kept_per_frame": selection.kept_per_frame,
                "unit": selection.unit,
                "clip_text": options.clip_text,
                **llm_info,
            },
            model=self.config.name,
            random_weights=self.config.random_weights,
            visual_tokens=int(visual.shape[0]),
            llm_sequence_length=seq_len,
            timings=dict(timer.seconds),
            tokens_view=view,
            tokens_selection=(
                selection.indices[0].cpu().numpy(), selection.similarity_aware[0].cpu().numpy(), selection.grid
            ),
        )

    def _segment(self, source, plan, answers, masks, timer, progress, on_frames, decoder_cls, encode_rle) -> None:
        """Stream every SAM2 frame: decode a chunk, preprocess, propagate, encode RLE (bounded memory)."""
        from tqdm import tqdm

        from video_pipeline.preprocess import sam2_preprocess

        decoder = decoder_cls(self.model.sam2)
        prompted = [i for i, a in enumerate(answers) if a.embedding is not None]
        empty = np.zeros((source.height, source.width), dtype=bool)
        stream = None
        if prompted:
            seg = torch.stack([answers[i].embedding for i in prompted])
            with timer("sam2"):
                stream = decoder.open_stream(seg, (source.height, source.width))
        bar = tqdm(total=len(plan.sam2_indices), desc="segmenting", unit="frame", disable=not progress, file=sys.stderr)
        try:
            chunks = source.iter_chunks(plan.sam2_indices, chunk_size=8)
            while True:
                with timer("decode"):
                    item = next(chunks, None)
                if item is None:
                    break
                _, frames = item
                with timer("sam2"):
                    pixels = sam2_preprocess(frames, style=self.sam2_style, size=decoder.image_size) if stream is not None else None
                for j, frame in enumerate(frames):
                    per_object = [empty] * len(answers)
                    if stream is not None:
                        with timer("sam2"):
                            logits = stream.step(pixels[j].to(self.device, self.model.dtype))
                            for k, i in enumerate(prompted):
                                per_object[i] = (logits[k] > 0).cpu().numpy()
                    with timer("write"):
                        for i, mask in enumerate(per_object):
                            masks[i].append(encode_rle(mask))
                        if on_frames is not None:
                            on_frames(len(masks[0]) - 1, frame, np.stack(per_object))
                    bar.update(1)
        finally:
            bar.close()
            if stream is not None:
                stream.close()


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_to_folder(input_path: str | Path, options: RunOptions, out: str | Path, progress: bool = True,
                  pipeline: Pipeline | None = None, load_seconds: float = 0.0) -> dict:
    """Run a job and write ``masks.json``, ``overlay.mp4``, ``tokens.png`` and ``summary.json`` into ``out``.

    Returns:
        The summary dictionary (also written to ``summary.json``).
    """
    from refstream.outputs import OverlayWriter, draw_tokens, write_json_atomic

    started = time.perf_counter()
    options.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if pipeline is None:
        pipeline = Pipeline.from_options(options)
        load_seconds = time.perf_counter() - started
    else:
        started -= load_seconds  # the model was loaded by the caller just before
    writer: dict[str, OverlayWriter] = {}

    def on_open(source):
        writer["w"] = OverlayWriter(out / "overlay.mp4", source.width, source.height, source.fps)

    def on_frames(index, frame, masks):
        writer["w"].write(frame, masks)

    try:
        result = pipeline.run(input_path, options, progress=progress, on_frames=on_frames, on_open=on_open)
    finally:
        if "w" in writer:
            writer["w"].close()
    t = time.perf_counter()
    note = RANDOM_WEIGHTS_NOTE if result.random_weights else None
    masks_json = {
        "video": result.video,
        "height": result.height,
        "width": result.width,
        "fps": result.fps,
        "frames": result.frames,
        "objects": [
            {"expression": e, "answer": a, "masks": m}
            for e, a, m in zip(result.expressions, result.answers, result.masks)
        ],
        "pruning": result.pruning,
        "model": result.model,
        "random_weights": result.random_weights,
    }
    if note:
        masks_json["note"] = note
    write_json_atomic(out / "masks.json", masks_json)
    indices, sim_aware, grid = result.tokens_selection
    draw_tokens(result.tokens_view, indices, sim_aware, grid, out / "tokens.png")
    timings = {stage: round(result.timings.get(stage, 0.0), 4) for stage in STAGES}
    timings["write"] = round(timings["write"] + time.perf_counter() - t, 4)
    summary = {
        "video": result.video,
        "frames": len(result.frames),
        "expressions": result.expressions,
        "model": result.model,
        "random_weights": result.random_weights,
        "pruning": result.pruning,
        "visual_tokens_into_llm": result.visual_tokens,
        "llm_sequence_length": result.llm_sequence_length,
        "stage_seconds": timings,
        "model_load_seconds": round(load_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(pipeline.device),
        "outputs": ["masks.json", "overlay.mp4", "tokens.png", "summary.json"],
    }
    if note:
        summary["note"] = note
    write_json_atomic(out / "summary.json", summary)
    return summary
