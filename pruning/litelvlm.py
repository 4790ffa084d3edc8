"""LiteLVLM: training-free, text-guided visual-token pruning for pixel grounding.

Lee & Choi, "CLIP Tricks You: Training-free Token Pruning for Efficient Pixel Grounding in Large
Vision-Language Models" (ICML 2026). Two variants are implemented:

``paper``
    Section 4 of the paper. For each of the N texts, the B visual tokens with the LOWEST similarity to
    the text's CLIP [EOS] embedding (Eq. 4) are candidates; the similarity-aware set S is the
    intersection of the N candidate sets (for N = 1, the B // 2 lowest: "50% of the budget"). The
    remaining B - |S| tokens are the context-aware tokens with the highest [CLS] contribution (Eq. 5:
    ``|| softmax(Q_cls K^T / sqrt(d)) V ||`` with raw, un-normalised q and k of the full width d = D).
    Output in raster order (ascending patch index).

``official``
    Exactly what the released code selects: github sejong-rcv/LiteLVLM @ 5896153,
    ``model/llava/model/multimodal_encoder/clip_encoder.py`` (``ctx_aware_pruning``,
    ``sim_aware_pruning`` and ``forward``, L61-172). Per text the ``B // N`` lowest-similarity tokens;
    S = their sorted, de-duplicated union; context scores with L2-normalised q and k over the full width
    D and logits scaled by ``1 / sqrt(D)``; output = the ``B - |S|`` best context tokens (descending
    score) followed by S (ascending index), never re-sorted. With N > B, ``B // N = 0`` and all B tokens
    come from the context ranking; with B >= M and N >= 2 every token is kept but in this order.

Ties. ``torch.sort`` on CPU is not stable by default, and the released code runs in bf16 where many
scores tie, so its tie order is not reproducible. RefStream breaks every tie toward the LOWER patch
index: among equal similarities the lower index counts as "lower similarity" (selected first), among
equal context scores the lower index counts as the higher score. On float32/float64 inputs without
exact ties this returns the released code's indices in its order.

All functions are batched over frames (no per-frame Python loop) and work on any device and float dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

VARIANTS = ("paper", "official", "context-heavy")

#: Fraction of the budget given to similarity-aware tokens when there is a single text, per variant.
#: ``paper``: 50% (section 4.4); ``context-heavy``: 5% (the paper's LiteLVLM-double-dagger, Table 8).
SINGLE_TEXT_SIM_FRACTION = {"paper": 0.5, "context-heavy": 0.05}


def similarity_scores(patch_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Visual-text similarity, Eq. 4 of the paper: raw dot products (no normalisation).

    Args:
        patch_embeds: float [F, M, P], ``visual_projection(post_layernorm(hidden[:, 1:]))``.
        text_embeds: float [N, P], CLIP ``text_embeds`` of the N texts (not normalised).

    Returns:
        float [F, N, M]: ``sim[f, n, j] = text_embeds[n] . patch_embeds[f, j]``.

    Raises:
        ValueError: when the projection widths differ or a tensor has the wrong rank.
    """
    if patch_embeds.dim() != 3 or text_embeds.dim() != 2:
        raise ValueError(
            f"patch_embeds must be [F, M, P] and text_embeds [N, P]; got {tuple(patch_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    if patch_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"projection widths differ: patch_embeds P={patch_embeds.shape[-1]}, "
            f"text_embeds P={text_embeds.shape[-1]}"
        )
    # [F, 1, M, P] @ [N, P, 1] -> [F, N, M, 1]: the same matmul the released code runs per image.
    return torch.matmul(patch_embeds.unsqueeze(1), text_embeds.unsqueeze(-1)).squeeze(-1)


def context_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """[CLS] contribution of each patch, Eq. 5 of the paper.

    ``a = softmax_j(q_cls . k_j / sqrt(D))`` over the M patches (CLS key excluded), ``s[j] = || a_j v_j ||_2``.
    The ``official`` variant L2-normalises q and k first (released code, ``ctx_aware_pruning``); the
    ``paper`` variant uses them raw. Eq. 5 normalises over the non-retained set only; that rescales all
    scores by one constant and leaves the ranking unchanged, so the full softmax is used here.

    Args:
        q, k, v: float [F, 1+M, D], outputs of the last encoder layer's ``q_proj``/``k_proj``/``v_proj``
            (bias included, before the head split and before any scaling); row 0 is the CLS token.
        variant: ``"paper"``, ``"context-heavy"`` (same scores as ``paper``) or ``"official"``.

    Returns:
        float [F, M] context scores (higher = more contextual information).

    Raises:
        ValueError: unknown variant or mismatched shapes.
    """
    _check_variant(variant)
    if not (q.shape == k.shape == v.shape) or q.dim() != 3:
        raise ValueError(f"q, k, v must all be [F, 1+M, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    cls_q = q[:, :1, :]  # [F, 1, D]
    patch_k = k[:, 1:, :]  # [F, M, D]
    patch_v = v[:, 1:, :]  # [F, M, D]
    dim = cls_q.shape[-1]
    if variant == "official":
        cls_q = F.normalize(cls_q, dim=-1)
        patch_k = F.normalize(patch_k, dim=-1)
    logits = torch.matmul(cls_q, patch_k.transpose(-2, -1)) / (dim**0.5)  # [F, 1, M]
    attn = F.softmax(logits, dim=-1)
    return (attn.transpose(1, 2) * patch_v).norm(dim=-1)  # [F, M]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown LiteLVLM variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _rank_ascending(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` [..., M] ascending, ties toward the lower index (stable sort)."""
    return torch.sort(scores, dim=-1, descending=False, stable=True).indices


def _rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` [..., M] descending, ties toward the lower index (stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _lowest_mask(sim: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [..., M]: True for the ``count`` lowest entries of ``sim`` along the last dim."""
    mask = torch.zeros(sim.shape, dtype=torch.bool, device=sim.device)
    if count > 0:
        mask.scatter_(-1, _rank_ascending(sim)[..., :count], True)
    return mask


def select_from_scores(sim: torch.Tensor, ctx: torch.Tensor, budget: int, variant: str = "paper") -> torch.Tensor:
    """LiteLVLM's adaptive token selection (section 4.4) from precomputed scores.

    This is the selection core shared by patch-level pruning and pooled-cell pruning (where ``sim`` and
    ``ctx`` are pooled first).

    Args:
        sim: float [F, N, M] visual-text similarities (:func:`similarity_scores`).
        ctx: float [F, M] context scores (:func:`context_scores`).
        budget: tokens kept per frame, B >= 1. B >= M keeps every token (for ``official`` with N >= 2 in
            the released code's order, otherwise ``arange(M)``).
        variant: ``"paper"``, ``"context-heavy"`` or ``"official"`` (see the module docstring).

    Returns:
        int64 [F, min(B, M)] kept patch indices (0-based, CLS excluded) in output order: ascending for
        ``paper``/``context-heavy``; context tokens then similarity tokens for ``official``.

    Raises:
        ValueError: budget < 1, unknown variant, or shapes that do not match.
    """
    _check_variant(variant)
    if sim.dim() != 3 or ctx.dim() != 2 or sim.shape[0] != ctx.shape[0] or sim.shape[2] != ctx.shape[1]:
        raise ValueError(f"sim must be [F, N, M] and ctx [F, M]; got {tuple(sim.shape)} and {tuple(ctx.shape)}")
    if isinstance(budget, bool) or int(budget) != budget or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    n_frames, n_texts, n_tokens = sim.shape
    if n_texts < 1:
        raise ValueError("at least one text embedding is needed (N >= 1)")
    budget = min(int(budget), n_tokens)
    device = sim.device
    positions = torch.arange(n_tokens, device=device)

    if variant == "official":
        # Per text the B // N lowest; S = sorted unique union (clip_encoder.py, sim_aware_pruning).
        sim_mask = _lowest_mask(sim, budget // n_texts).any(dim=1)  # [F, M]
        n_sim = sim_mask.sum(dim=-1, keepdim=True)  # [F, 1]
        # Sort key: context candidates by their context rank, then S by index (forward(), L138-146).
        ctx_rank = torch.empty_like(positions.expand(n_frames, -1))
        ctx_rank.scatter_(-1, _rank_descending(ctx), positions.expand(n_frames, -1))
        key = torch.where(sim_mask, n_tokens + positions, ctx_rank)
        ordered = torch.sort(key, dim=-1).indices  # [F, M]: M - |S| context tokens, then S ascending
        # Output slot p takes ordered[p] for p < B - |S| (context) and ordered[p + M - B] after (all of S).
        slots = torch.arange(budget, device=device).expand(n_frames, -1)
        take = torch.where(slots < budget - n_sim, slots, slots + (n_tokens - budget))
        return ordered.gather(-1, take).to(torch.int64)

    # paper / context-heavy: intersection of the N per-text candidate sets.
    if n_texts == 1:
        n_sim = int(math.floor(budget * SINGLE_TEXT_SIM_FRACTION[variant]))
        sim_mask = _lowest_mask(sim[:, 0], n_sim)
    else:
        sim_mask = _lowest_mask(sim, budget).all(dim=1)
    n_fill = budget - sim_mask.sum(dim=-1, keepdim=True)  # [F, 1]
    # Context fill: best context scores among the tokens not in S.
    ctx_order = _rank_descending(ctx.masked_fill(sim_mask, float("-inf")))
    fill_rank = torch.empty_like(ctx_order)
    fill_rank.scatter_(-1, ctx_order, positions.expand(n_frames, -1))
    keep = sim_mask | ((fill_rank < n_fill) & ~sim_mask)
    # Raster order: kept tokens first (by index), then the rest.
    key = torch.where(keep, positions, n_tokens + positions)
    return torch.sort(key, dim=-1).indices[:, :budget].to(torch.int64)


def select_tokens(
    hidden: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patch_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    budget: int,
    variant: str = "paper",
) -> torch.Tensor:
    """Select the visual tokens LiteLVLM keeps in each frame.

    Args:
        hidden: float [F, 1+M, D], CLIP vision ``hidden_states[-2]``, row 0 = CLS. Only its shape is used
            (the features themselves enter through ``patch_embeds``); kept for the documented signature.
        q, k, v: float [F, 1+M, D], the last encoder layer's ``q_proj``/``k_proj``/``v_proj`` outputs (bias
            included, before the head split and before any scaling).
        patch_embeds: float [F, M, P], ``visual_projection(post_layernorm(hidden[:, 1:]))``.
        text_embeds: float [N, P], CLIP ``text_embeds`` of the N texts (not normalised).
        budget: int B, tokens kept per frame (B >= M keeps all).
        variant: ``"paper"`` (default), ``"official"`` (the released code, bit-exact on float32/float64
            inputs without exact ties) or ``"context-heavy"`` (the paper's LiteLVLM-double-dagger: 5%
            similarity-aware tokens when N = 1).

    Returns:
        int64 [F, min(B, M)]: 0-based patch indices (CLS excluded), in output order. Ties break toward the
        lower index.

    Raises:
        ValueError: shapes that do not match, budget < 1 or an unknown variant.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != q.shape[:2]:
        raise ValueError(f"hidden must be [F, 1+M, D] like q; got {tuple(hidden.shape)} and {tuple(q.shape)}")
    if patch_embeds.shape[:2] != (hidden.shape[0], hidden.shape[1] - 1):
        raise ValueError(
            f"patch_embeds must be [F, M, P] with F={hidden.shape[0]}, M={hidden.shape[1] - 1}; "
            f"got {tuple(patch_embeds.shape)}"
        )
    sim = similarity_scores(patch_embeds, text_embeds)
    ctx = context_scores(q, k, v, variant)
    return select_from_scores(sim, ctx, budget, variant)


def similarity_aware_mask(sim: torch.Tensor, budget: int, variant: str = "paper") -> torch.Tensor:
    """Bool [F, M]: which tokens LiteLVLM takes as similarity-aware (the set S) for ``budget``.

    Used to colour kept tokens (similarity-aware red, context-aware green) in ``tokens.png``.
    ``sim`` is float [F, N, M]; rules as in :func:`select_from_scores`.
    """
    _check_variant(variant)
    n_texts, n_tokens = sim.shape[1], sim.shape[2]
    budget = min(int(budget), n_tokens)
    if variant == "official":
        return _lowest_mask(sim, budget // n_texts).any(dim=1)
    if n_texts == 1:
        return _lowest_mask(sim[:, 0], int(math.floor(budget * SINGLE_TEXT_SIM_FRACTION[variant])))
    return _lowest_mask(sim, budget).all(dim=1)
