"""``refstream explain``: which tokens each pruning method keeps, frame by frame, side by side.

The picture is a grid: one row per encoder frame (evenly spaced among the 16), one column per method,
each cell the CLIP view of the frame with the kept tokens drawn (similarity-aware red, other kept tokens
green, merged tokens yellow; see :func:`refstream.outputs.render_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from pruning.clip_features import ClipFeatureExtractor
from pruning.registry import get_method
from refstream.config import load_model_config
from refstream.errors import ConfigError
from refstream.options import JobOptions, parse_method_spec
from refstream.outputs import render_tokens
from video_pipeline.decode import open_video
from video_pipeline.plan import plan_frames
from video_pipeline.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, internvideo_preprocess
from workers.build import build_clip, build_model


def clip_views(pixels: torch.Tensor) -> np.ndarray:
    """CLIP-normalised frames float [F, 3, S, S] -> uint8 [F, S, S, 3] images (what CLIP sees)."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    images = (pixels.cpu().float() * std + mean).clamp(0, 1)
    return (images * 255).round().byte().permute(0, 2, 3, 1).numpy()


@dataclass
class MethodColumn:
    """One column of the grid: the method's label and its selection on the encoder frames."""

    label: str
    selection: object  # pruning.registry.Selection


def explain(
    input_path: str | Path,
    expressions: Sequence[str],
    methods: Sequence[str],
    budget: int,
    out: str | Path,
    *,
    model: str = "videoglamm",
    checkpoint: str | None = None,
    placement: str = "pooled",
    frames: int = 16,
    rows: int = 4,
    decoder: str = "decord",
    clip_text: str = "question",
) -> dict:
    """Draw the kept tokens of each method on ``rows`` encoder frames and save a PNG grid at ``out``.

    Returns:
        ``{"out": str, "rows": [frame index...], "methods": {label: kept_per_frame}}``.

    Raises:
        RefStreamError subclasses for bad input, unknown methods or missing weights.
    """

    JobOptions(expressions=list(expressions), budget=budget, frames=frames, clip_text=clip_text)  # validates
    if not methods:
        raise ConfigError("explain needs at least one --method")
    if rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {rows}")
    specs = [(spec, *parse_method_spec(spec)) for spec in methods]
    instances = [(label, get_method(name, **opts)) for label, name, opts in specs]
    config = load_model_config(model, checkpoint)
    with open_video(input_path, decoder) as source:
        plan = plan_frames(source.num_frames, frames)
        encoder_frames = source.read(plan.encoder_indices)
    pixels = clip_preprocess(encoder_frames)
    needs_llm = any(m.stage == "llm" for _, m in instances)
    if needs_llm:

        full = build_model(config)
        clip, tokenizer = full.clip, full.clip_tokenizer
    else:

        full = None
        clip, tokenizer = build_clip(config)
    extractor = ClipFeatureExtractor(clip, tokenizer)
    features = extractor.encode_frames(
        pixels,
        with_scores=any(m.needs_scores for _, m in instances),
        with_penultimate=any(m.needs_penultimate for _, m in instances),
    )
    texts = [e.strip() for e in expressions]
    if clip_text == "question":
        texts = [config.question.format(expression=t.lower()) for t in texts]
    text_embeds = extractor.encode_texts(texts) if any(m.needs_text for _, m in instances) else None
    columns = []
    for label, method in instances:
        selection = method.select(features, text_embeds, budget, placement)
        if method.stage == "llm":
            selection = _llm_selection(full, method, selection, features, encoder_frames, expressions, placement)
        columns.append(MethodColumn(label, selection))
    row_positions = sorted(set(np.linspace(0, len(plan.encoder_indices) - 1, rows).round().astype(int).tolist()))
    _save_grid(out, clip_views(pixels), columns, row_positions, [plan.encoder_indices[r] for r in row_positions], budget)
    return {
        "out": str(out),
        "rows": [plan.encoder_indices[r] for r in row_positions],
        "methods": {c.label: c.selection.kept_per_frame for c in columns},
    }


def _llm_selection(model, method, selection, features, encoder_frames, expressions, placement):
    """Run the LLM for methods that prune inside it (FastV) and return what it kept for the first expression."""

    clip_tokens = model.clip_tokens(features.hidden, selection, placement)
    iv2 = model.internvideo2_tokens(internvideo_preprocess(encoder_frames))
    visual = torch.cat([clip_tokens.flatten(0, 1), iv2.flatten(0, 1)])
    return method.apply_llm(model, visual, list(expressions), selection)


def _save_grid(out, views, columns, row_positions, frame_numbers, budget, scale: int = 1) -> None:

    side = views.shape[1] * scale
    header, label_w, pad = 34, 70, 4
    width = label_w + len(columns) * (side + pad)
    height = header + len(row_positions) * (side + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    for c, column in enumerate(columns):
        sel = column.selection
        extra = int((sel.indices[0] < 0).sum())
        title = f"{column.label}: {sel.kept_per_frame} tokens" + (f" ({extra} aggregate)" if extra else "")
        draw.text((label_w + c * (side + pad) + 4, 10), title, fill=(0, 0, 0))
    for r, (pos, number) in enumerate(zip(row_positions, frame_numbers)):
        y = header + r * (side + pad)
        draw.text((6, y + side // 2 - 6), f"frame {number}", fill=(0, 0, 0))
        for c, column in enumerate(columns):
            sel = column.selection
            tile = render_tokens(
                views[pos], sel.indices[pos].cpu().numpy(), sel.similarity_aware[pos].cpu().numpy(), sel.grid,
                scale=scale, merged=sel.merged[pos].cpu().numpy(),
            )
            canvas.paste(tile, (label_w + c * (side + pad), y))
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # --out out/explain.png in a fresh clone
    canvas.save(out)
