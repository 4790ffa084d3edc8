"""[CLS] attention rebuilt from hooked q/k projections of ONE layer.

Methods that rank tokens by attention (VisionZip, VisPruner, PruMerge) read a single layer's map. Asking
the model for ``output_attentions`` would force the slow eager kernel in every layer; instead the
layer's ``q_proj``/``k_proj`` outputs are hooked (:class:`pruning.clip_features.ClipFeatureExtractor`)
and the CLS row is recomputed here exactly as CLIP's attention computes it.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """float [F, L, D] -> [F, H, L, D/H] (the head split of ``CLIPAttention``)."""
    f, length, d = x.shape
    if d % num_heads:
        raise ValueError(f"width {d} is not divisible by {num_heads} heads")
    return x.view(f, length, num_heads, d // num_heads).transpose(1, 2)


def cls_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head attention of the CLS query over all tokens, as ``CLIPAttention`` computes it.

    ``softmax_j(q_cls,h . k_j,h / sqrt(D/H))`` over the 1 + M keys (CLS key included), in float32.

    Args:
        q, k: float [F, 1+M, D], the layer's ``q_proj``/``k_proj`` outputs (bias included, unscaled).
        num_heads: H.

    Returns:
        float32 [F, H, 1+M]; each row sums to 1. Column 0 is the CLS key.
    """
    qh = split_heads(q[:, :1].float(), num_heads)  # [F, H, 1, d]
    kh = split_heads(k.float(), num_heads)  # [F, H, L, d]
    logits = torch.matmul(qh, kh.transpose(-2, -1)).squeeze(2) * qh.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def full_width_cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Single-head CLS attention over the full width (LLaVA-PruMerge's form).

    ``softmax_j(q_cls . k_j / sqrt(D))`` over the 1 + M keys (CLS key included), no head split
    (github 42Shawn/LLaVA-PruMerge @ 097c041, ``llava/model/multimodal_encoder/clip_encoder.py``,
    ``token_prune_merge_advanced``).

    Returns:
        float32 [F, 1+M].
    """
    logits = torch.matmul(q[:, :1].float(), k.float().transpose(-2, -1)).squeeze(1) * q.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def head_mean_keys(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Keys averaged over heads: float [F, 1+M, D] -> [F, 1+M, D/H] (VisionZip's key metric)."""
    return split_heads(k, num_heads).mean(dim=1)
