"""LLaVA-PruMerge and PruMerge+: [CLS]-attention token selection, key-neighbour merging, one extra token.

Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models".
Algorithm followed: github 42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a,
``llava/model/multimodal_encoder/clip_encoder.py`` (same content as 5632f5a, where it last changed):
``token_prune_merge_advanced`` L85-171 (PruMerge), ``token_prune_merge_advanced_plus`` L174-281
(PruMerge+, the repo's default, L300), ``outlier_dectection`` L34-47 (IQR, see
:func:`pruning.methods.trim.iqr_outliers`), ``complement_idx`` L12-25.

Per frame, on units u = 0..T-1 (patches under ``patch``, pooled cells under ``pooled``):

1. attention ``a[u]``: the CLS row of the LAST encoder layer's attention in PruMerge's single-head,
   full-width form, ``softmax_j(q_cls . k_j / sqrt(D))`` over all 1 + M keys (CLS key included), CLS
   column dropped and NOT renormalised (L109-112; :func:`pruning.attention.full_width_cls_attention`).
   Keys ``k_u`` = the last layer's ``k_proj`` outputs of the patches, L2-normalised (L129-130).
2. selection (S units): PruMerge: the S units with the highest ``a``, in DESCENDING attention order
   (``topk(sorted=True)``, L116). PruMerge+: ``S_a`` units by attention (descending) followed by ``S_g``
   spatially uniform units (ascending index), see :func:`plus_grid_units`.
3. merge (L139-165): every selected unit i becomes ``x_i + sum_{j in N(i)} a_j x_j`` where ``N(i)`` are the
   ``neighbours`` (32) units with the highest key cosine to i among ALL other T - 1 units (the other
   selected units included, as in the original), weighted by their raw attention (the division by the
   weight sum is commented out in the original, L163). ``x`` = layer -2 features (``hidden[:, 1:]``).
4. extra token (L168-169): ``sum_{j not selected} a_j x_j``, appended last, index ``-1``.

All as merge weights [F, K, T]: row of selected unit i = 1 at i plus ``a_j`` at each neighbour j; the extra
row = ``a`` on the unselected units. ``Selection.gather`` applies them to per-unit tokens and
``merged_features`` holds them applied to the (pooled) layer -2 hidden states.

Departures from the originals:

- **Fixed budget.** The originals are adaptive: S = the number of IQR outliers of ``a`` (upper fence
  ``Q3 + 1.5 IQR``, strict, over the batch-flattened attention). Here S = K - 1 and the extra token makes
  K tokens, so budgets compare fairly with other methods (the notes' recommended reading: the extra token
  counts). K = 1 gives only the extra token (attention-weighted sum of all units); K = T keeps all T units
  (merged) and drops the extra token, which would be a sum over nothing (the original appends a zero row).
- **PruMerge+ split.** The adaptive original adds ``arange(0, 575, int(int(1/ratio)/3))`` raster grid
  points (about 3x the outlier count, de-duplicated against the outliers), so about 1/4 of its tokens come
  from attention. Here ``S_a = ceil(S * attention_fraction)`` (default 1/4, i.e. ceil) and
  ``S_g = S - S_a``; the grid units are spread with a uniform raster stride over the units not taken by
  attention (:func:`plus_grid_units`), which yields exactly ``S_g`` distinct units (the original's grid
  count drifts with de-duplication and it never picks unit 575 because of its end bound).
- **Pooled placement.** Cell attention = SUM of its 4 patches' attention, cell keys and features = MEAN of
  its 4 patches' (then L2-normalised keys); the same algorithm runs on the 144 cells. ``neighbours``
  stays 32 (32 cells cover 128 patches); it is an option.
- **Ties.** ``torch.topk`` has no specified tie order; stable sorts put the LOWER unit index first among
  equal attention (selection and output order) and among equal key cosines (neighbours).
- **Small grids.** Fewer than ``neighbours + 1`` units: every other unit is a neighbour.
- **Precision.** Attention, keys and weights in float32 (the original runs in the tower dtype);
  ``merged_features`` is cast back to the hidden states' dtype. Zero keys normalise to zero (cosine 0)
  instead of NaN.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from pruning.attention import full_width_cls_attention
from pruning.base import PruningMethod, Selection, check_placement, register, to_units, unit_layout
from pruning.methods.trim import iqr_outliers  # noqa: F401  (the originals' adaptive rule, re-exported)
from refstream_errors import ConfigError

#: Neighbours merged into each selected token (hard-coded ``k=int(32)`` in the original, L156).
NEIGHBOURS = 32
#: PruMerge+ share of attention-selected tokens (the adaptive original's outlier:grid ratio is about 1:3).
ATTENTION_FRACTION = 0.25


def cls_patch_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """PruMerge's attention of the CLS query on each patch: float32 [F, M] (not renormalised).

    Args:
        q, k: float [F, 1+M, D], the last layer's ``q_proj``/``k_proj`` outputs (row 0 = CLS).

    Raises:
        ValueError: q, k not both [F, 1+M, D].
    """
    if q.dim() != 3 or q.shape != k.shape or q.shape[1] < 2:
        raise ValueError(f"q and k must both be [F, 1+M, D] with M >= 1; got {tuple(q.shape)} and {tuple(k.shape)}")
    return full_width_cls_attention(q, k)[:, 1:]


def rank_by_attention(attn: torch.Tensor) -> torch.Tensor:
    """int64 [F, T]: units by descending attention, ties toward the lower index (stable sort)."""
    return torch.sort(attn, dim=-1, descending=True, stable=True).indices


def plus_split(selected: int, attention_fraction: float = ATTENTION_FRACTION) -> tuple[int, int]:
    """PruMerge+ (attention, grid) counts for ``selected`` units: ``S_a = ceil(S * fraction)``, ``S_g = S - S_a``.

    E.g. S = 63 -> 16 + 47, 191 -> 48 + 143, 1 -> 1 + 0 (with the default 1/4).

    Raises:
        ValueError: selected < 0 or a fraction outside [0, 1].
    """
    if selected < 0:
        raise ValueError(f"selected must be >= 0, got {selected}")
    if not 0.0 <= attention_fraction <= 1.0:
        raise ValueError(f"attention_fraction must lie in [0, 1], got {attention_fraction}")
    n_attn = min(selected, math.ceil(selected * attention_fraction - 1e-9))
    return n_attn, selected - n_attn


def plus_grid_units(taken: torch.Tensor, count: int) -> torch.Tensor:
    """PruMerge+ spatial samples: ``count`` units with a uniform raster stride among the units not taken.

    The R untaken units of a frame, in ascending index, are indexed 0..R-1; positions
    ``floor(i * R / count)``, i = 0..count-1, are taken (a stride of R / count >= 1 starting at the first
    untaken unit, like the original's ``arange(0, 575, stride)`` minus the attention picks).

    Args:
        taken: bool [F, T], units already selected (the same count R' in every frame).
        count: units to add, 0 <= count <= T - R'.

    Returns:
        int64 [F, count], ascending unit indices, disjoint from ``taken``.

    Raises:
        ValueError: frames with different taken counts, or count larger than the untaken units.
    """
    frames, units = taken.shape
    n_taken = taken.sum(dim=-1)
    if frames and not bool((n_taken == n_taken[0]).all()):
        raise ValueError("every frame must have the same number of taken units")
    remaining = units - (int(n_taken[0]) if frames else 0)
    if count < 0 or count > remaining:
        raise ValueError(f"cannot place {count} grid units among {remaining} free units")
    positions = torch.arange(units, device=taken.device)
    free = torch.sort(torch.where(taken, units + positions, positions), dim=-1).values[:, :remaining]  # ascending
    steps = torch.div(torch.arange(count, device=taken.device) * remaining, max(count, 1), rounding_mode="floor")
    return free[:, steps].to(torch.int64)


def key_neighbours(keys: torch.Tensor, anchors: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """The ``neighbours`` units with the highest key cosine to each anchor, among all OTHER units.

    Args:
        keys: float [F, T, D] unit keys (normalised here).
        anchors: int64 [F, S] anchor units.
        neighbours: n >= 0; clamped to T - 1.

    Returns:
        int64 [F, S, min(n, T - 1)], by descending cosine; ties toward the lower unit index.
    """
    frames, units, dim = keys.shape
    n = min(int(neighbours), units - 1)
    unit_keys = F.normalize(keys.float(), dim=-1)  # [F, T, D]
    anchor_keys = unit_keys.gather(1, anchors.unsqueeze(-1).expand(-1, -1, dim))  # [F, S, D]
    cos = torch.matmul(anchor_keys, unit_keys.transpose(1, 2))  # [F, S, T]
    cos.scatter_(-1, anchors.unsqueeze(-1), float("-inf"))  # never your own neighbour
    return torch.sort(cos, dim=-1, descending=True, stable=True).indices[..., :n]


def prumerge_weights(
    attn: torch.Tensor, keys: torch.Tensor, selected: torch.Tensor, neighbours: int = NEIGHBOURS, extra: bool = True
) -> torch.Tensor:
    """PruMerge's merge as weights over the units.

    Args:
        attn: float [F, T] unit attention (raw, not renormalised).
        keys: float [F, T, D] unit keys.
        selected: int64 [F, S] selected units, in output order (S may be 0).
        neighbours: neighbours merged into each selected unit (clamped to T - 1).
        extra: append the extra token row (``attn`` on the unselected units).

    Returns:
        float32 [F, S (+1), T]: row s = 1 at ``selected[s]`` + ``attn[j]`` at each of its key neighbours j;
        the extra row = ``attn`` masked to the units not in ``selected``.
    """
    frames, units = attn.shape
    attn = attn.float()
    weights = attn.new_zeros(frames, selected.shape[1], units)
    if selected.shape[1]:
        nbrs = key_neighbours(keys, selected, neighbours)  # [F, S, n]
        nbr_attn = attn.gather(1, nbrs.flatten(1)).view_as(nbrs).to(weights.dtype)
        weights.scatter_(-1, nbrs, nbr_attn)
        weights.scatter_(-1, selected.unsqueeze(-1), 1.0)  # self is never its own neighbour
    if not extra:
        return weights
    unselected = torch.ones(frames, units, dtype=torch.bool, device=attn.device)
    unselected.scatter_(1, selected, False)
    return torch.cat([weights, (attn * unselected).unsqueeze(1)], dim=1)


def prumerge_selection(
    attn: torch.Tensor,
    keys: torch.Tensor,
    keep: int,
    neighbours: int = NEIGHBOURS,
    plus: bool = False,
    attention_fraction: float = ATTENTION_FRACTION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge / PruMerge+ at a fixed budget of K tokens per frame.

    Args:
        attn: float [F, T] unit attention; keys: float [F, T, D] unit keys.
        keep: K >= 1 (clamped to T). K < T: S = K - 1 selected units + the extra token; K = T: all T
            units selected, no extra token.
        neighbours: key neighbours merged per selected unit.
        plus: PruMerge+ (attention units + uniform grid units) instead of PruMerge (attention only).
        attention_fraction: PruMerge+ share of attention units (:func:`plus_split`).

    Returns:
        (indices, merge_weights): int64 [F, K] (selected units in output order: PruMerge descending
        attention; PruMerge+ attention units descending then grid units ascending; ``-1`` for the extra
        token) and float32 [F, K, T] (:func:`prumerge_weights`).

    Raises:
        ValueError: keep < 1 or shapes that do not match.
    """
    if attn.dim() != 2 or keys.dim() != 3 or keys.shape[:2] != attn.shape:
        raise ValueError(f"attn must be [F, T] and keys [F, T, D]; got {tuple(attn.shape)} and {tuple(keys.shape)}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    frames, units = attn.shape
    keep = min(int(keep), units)
    extra = keep < units
    n_sel = keep - 1 if extra else units
    ranked = rank_by_attention(attn)
    if plus:
        n_attn, n_grid = plus_split(n_sel, attention_fraction)
        by_attn = ranked[:, :n_attn]
        taken = torch.zeros(frames, units, dtype=torch.bool, device=attn.device)
        taken.scatter_(1, by_attn, True)
        selected = torch.cat([by_attn, plus_grid_units(taken, n_grid)], dim=1)
    else:
        selected = ranked[:, :n_sel]
    weights = prumerge_weights(attn, keys, selected, neighbours, extra)
    indices = torch.cat([selected, selected.new_full((frames, int(extra)), -1)], dim=1)
    return indices.to(torch.int64), weights


class _PruMergeBase(PruningMethod):
    """Shared ``select`` of PruMerge and PruMerge+ (see the module docstring)."""

    needs_scores = True
    plus = False

    def __init__(self, **options):
        super().__init__(**options)
        n = self.neighbours
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ConfigError(f"{self.name}: neighbours must be a non-negative integer, got {n!r}")

    def select(self, features, text_embeds, budget, placement) -> Selection:
        """See :meth:`PruningMethod.select`; sets ``merge_weights`` and ``merged_features``.

        Raises:
            ConfigError: unknown placement. ValueError: q/k missing (encode with scores), budget < 1.
        """
        check_placement(placement)
        hidden = features.hidden
        if features.q.dim() != 3 or features.q.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"{self.name} needs the last layer's q/k (encode the frames with scores)")
        unit, side, keep = unit_layout(features, placement, budget)
        grid = features.grid
        attn = to_units(cls_patch_attention(features.q, features.k), grid, placement, "sum")
        keys = to_units(features.k[:, 1:].float(), grid, placement, "mean")
        indices, weights = prumerge_selection(
            attn, keys, keep, self.neighbours, self.plus, getattr(self, "attention_fraction", ATTENTION_FRACTION)
        )
        units = to_units(hidden[:, 1:].float(), grid, placement, "mean")  # [F, T, D]
        merged = torch.matmul(weights, units).to(hidden.dtype)
        return Selection(indices, torch.zeros_like(indices, dtype=torch.bool), unit, side, weights, merged)


@register("prumerge")
class PruMerge(_PruMergeBase):
    """LLaVA-PruMerge at a fixed budget: K - 1 top-attention units merged with key neighbours + extra token.

    Option ``neighbours`` (32): key neighbours merged into each kept unit.
    """

    options = {"neighbours": NEIGHBOURS}


@register("prumerge+")
class PruMergePlus(_PruMergeBase):
    """PruMerge+: attention units + spatially uniform units, merged as PruMerge, + extra token.

    Options ``neighbours`` (32) and ``attention_fraction`` (0.25, the share of the K - 1 selected units
    taken by attention; the rest is the uniform grid).
    """

    options = {"neighbours": NEIGHBOURS, "attention_fraction": ATTENTION_FRACTION}
    plus = True

    def __init__(self, **options):
        super().__init__(**options)
        frac = self.attention_fraction
        if isinstance(frac, bool) or not isinstance(frac, numbers.Real) or not 0.0 <= frac <= 1.0:
            raise ConfigError(f"prumerge+: attention_fraction must be a number in [0, 1], got {frac!r}")
