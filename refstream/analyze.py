"""``refstream analyze reversal``: the paper's Figure 2 (b, c) on any dataset with masks.

For every frame with a ground-truth mask and every referring expression of that object, the patches whose
14x14 cell (in CLIP's 336x336 view: shorter side to 336, centre crop) is covered by the object for more
than 50% are the [REF] tokens (section 3.2 of the LiteLVLM paper). Each [REF] token is ranked among all M
patches (0 = most similar) by its similarity

- to the [EOS] embedding: ``text_embeds . E_v[j]`` (Eq. 4), and
- to the [CLS] embedding: ``image_embeds . E_v[j]``, with ``image_embeds = visual_projection(
  post_layernorm(CLS of the last layer))`` (CLIP's image embedding, E^I of Eq. 2),

where ``E_v = visual_projection(post_layernorm(hidden_states[-2][:, 1:]))`` as LiteLVLM uses them. With
real CLIP weights the ranks crowd near M ("visual-text similarity reversal"); with the random ``tiny``
weights this only checks the plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pruning.clip_features import ClipFeatureExtractor
from video_pipeline.preprocess import clip_preprocess, clip_size_after_resize

PATCH = 14
CLIP_SIZE = 336


def mask_to_patch_coverage(mask: np.ndarray, patch: int = PATCH, size: int = CLIP_SIZE) -> torch.Tensor:
    """Fraction of each CLIP patch covered by a binary mask, in CLIP's view of the frame.

    The mask goes through the same geometry as ``video_pipeline.preprocess.clip_preprocess`` (shorter side
    to ``size``, centre crop with offsets ``(dim - size) // 2``), resized as a float map with area-style
    antialiasing (bilinear, antialias=True), then averaged over each ``patch`` x ``patch`` cell.

    Args:
        mask: bool/uint8 [H, W], nonzero = object.

    Returns:
        float32 [(size / patch) ** 2] coverage in [0, 1], raster order (576 for ViT-L/14-336).
    """

    h, w = mask.shape
    rh, rw = clip_size_after_resize(h, w, size)
    m = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]
    m = F.interpolate(m, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - size) // 2, (rw - size) // 2
    m = m[:, :, top : top + size, left : left + size]
    return F.avg_pool2d(m, patch).flatten()


def similarity_ranks(query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rank of each token by dot-product similarity to ``query`` (0 = most similar; ties to the lower index).

    Args:
        query: float [P]; tokens: float [M, P].

    Returns:
        int64 [M]: ``rank[j]`` = number of tokens ranked before token j.
    """
    scores = tokens @ query
    order = torch.sort(scores, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


@dataclass
class ReversalResult:
    """Ranks of all [REF] tokens: ``eos_ranks`` and ``cls_ranks`` int arrays, ``tokens`` (M), bookkeeping."""

    eos_ranks: np.ndarray
    cls_ranks: np.ndarray
    tokens: int
    frames: int
    expressions: int
    per_video: dict

    def summary(self, bins: int = 24) -> dict:
        """JSON-ready statistics: mean/median rank, fraction in the bottom half, histogram counts."""

        def stats(ranks: np.ndarray) -> dict:
            hist, edges = np.histogram(ranks, bins=bins, range=(0, self.tokens))
            return {
                "mean_rank": float(ranks.mean()) if ranks.size else None,
                "median_rank": float(np.median(ranks)) if ranks.size else None,
                "fraction_bottom_half": float((ranks >= self.tokens / 2).mean()) if ranks.size else None,
                "histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
            }

        return {
            "ref_tokens": int(self.eos_ranks.size),
            "tokens_per_frame": self.tokens,
            "frames": self.frames,
            "expressions": self.expressions,
            "eos": stats(self.eos_ranks),
            "cls": stats(self.cls_ranks),
            "per_video": self.per_video,
        }


@torch.inference_mode()
def reversal_analysis(
    dataset, clip, tokenizer, *, annotation: str = "Davis17_annot1", clip_text: str = "question",
    question: str = "What is {expression} in this video? Please respond with segmentation masks.",
    frames_per_video: int | None = None, min_coverage: float = 0.5, progress: bool = True,
) -> ReversalResult:
    """Collect [REF]-token ranks over a dataset.

    Args:
        dataset: an :class:`eval.ref_davis.RefDavis`.
        clip: ``transformers.CLIPModel``; tokenizer: its tokenizer.
        annotation: which expression set to read.
        clip_text: ``"question"`` (the LLM question, as ``refstream run`` feeds CLIP) or ``"expression"``.
        frames_per_video: annotated frames per video, evenly spaced (None = all).
        min_coverage: a patch is a [REF] token when the object covers MORE than this fraction of it.
    """


    extractor = ClipFeatureExtractor(clip, tokenizer)
    eos_all, cls_all, per_video = [], [], {}
    n_frames = n_expr = 0
    tokens = None
    expressions = [e for e in dataset.expressions(annotation) if e.video in set(dataset.videos())]
    for expr in tqdm(expressions, desc="expressions", disable=not progress):
        text = question.format(expression=expr.text.lower()) if clip_text == "question" else expr.text
        text_embed = extractor.encode_texts([text])[0].float()
        paths = [p for p in dataset.frames(expr.video) if dataset.mask(expr.video, p.stem) is not None]
        if frames_per_video and len(paths) > frames_per_video:
            paths = [paths[i] for i in np.linspace(0, len(paths) - 1, frames_per_video).round().astype(int)]
        video_eos, video_cls = [], []
        for path in paths:
            frame = np.asarray(Image.open(path).convert("RGB"))[None]
            out = clip.vision_model(pixel_values=clip_preprocess(frame).to(extractor.device, extractor.dtype),
                                    output_hidden_states=True)
            hidden = out.hidden_states[-2]
            patch_embeds = clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 1:]))[0].float()
            image_embed = clip.visual_projection(out.pooler_output)[0].float()
            tokens = patch_embeds.shape[0]
            coverage = mask_to_patch_coverage(dataset.mask(expr.video, path.stem) == expr.obj_id)
            ref = coverage > min_coverage
            video_eos.append(similarity_ranks(text_embed, patch_embeds)[ref].numpy())
            video_cls.append(similarity_ranks(image_embed, patch_embeds)[ref].numpy())
            n_frames += 1
        n_expr += 1
        eos = np.concatenate(video_eos) if video_eos else np.zeros(0, dtype=np.int64)
        cls = np.concatenate(video_cls) if video_cls else np.zeros(0, dtype=np.int64)
        eos_all.append(eos)
        cls_all.append(cls)
        key = f"{expr.video}_{expr.obj_id}"
        per_video[key] = {
            "expression": expr.text, "frames": len(paths), "ref_tokens": int(eos.size),
            "eos_mean_rank": float(eos.mean()) if eos.size else None,
            "cls_mean_rank": float(cls.mean()) if cls.size else None,
        }
    return ReversalResult(
        np.concatenate(eos_all) if eos_all else np.zeros(0, np.int64),
        np.concatenate(cls_all) if cls_all else np.zeros(0, np.int64),
        tokens or 576, n_frames, n_expr, per_video,
    )


def plot_reversal(result: ReversalResult, path: Path, title: str = "") -> None:
    """Two histograms, as the paper's Figure 2 (b) [REF]-[CLS] and (c) [REF]-[EOS] rank distributions."""
    import matplotlib  # lazy: matplotlib is slow to import and only this figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, ranks, name, colour in (
        (axes[0], result.cls_ranks, "[REF]-[CLS]", "#3b75af"),
        (axes[1], result.eos_ranks, "[REF]-[EOS]", "#c0392b"),
    ):
        ax.hist(ranks, bins=24, range=(0, result.tokens), color=colour, edgecolor="white")
        mean = f", mean {ranks.mean():.0f}" if ranks.size else ""
        ax.set_title(f"{name} similarity rank ({ranks.size} tokens{mean})")
        ax.set_xlabel(f"rank among {result.tokens} visual tokens (0 = most similar)")
        ax.set_xlim(0, result.tokens)
    axes[0].set_ylabel("[REF] tokens")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
