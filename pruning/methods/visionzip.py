"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025).
Algorithm followed: github dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02
(tag v0.1.3 has the same algorithm files):

- ``visionzip/clip_encoder.py`` L41-83, ``CLIPVisionTower_VisionZip.forward`` (selection and merge);
- ``visionzip/utils.py`` L10-135 + L186-200 (the "metric": keys of encoder layer ``layers[-2]``
  averaged over the heads, head_dim wide);
- ``visionzip/main.py`` L5-28 and ``README.md`` (the 54 dominant + 10 contextual split for 64 tokens).

Per frame, on units u = 0..T-1 (patches under ``patch``, pooled cells under ``pooled``):

1. score ``s[u]`` = [CLS] attention of the layer at index -2 (the layer whose OUTPUT is
   ``hidden_states[-2]``; ``attentions[-2]`` in HF), SUMMED over the heads, CLS key column dropped
   (the softmax runs over all 1 + M keys, no renormalisation). Rebuilt from the hooked q/k projections
   (:func:`pruning.attention.cls_attention`), which equals the eager attention map.
2. dominant = the ``d`` units with the highest score, output in ASCENDING unit index.
3. the other ``Nf = T - d`` units in ascending index are the filtered list. Targets are the positions
   ``arange(0, Nf, step)[:C]`` with ``step = max(1, Nf // C)`` of that list (positions, not unit indices).
4. every other filtered unit goes to the target whose L2-normalised head-averaged layer -2 key is the
   most similar (cosine); ties go to the first (lowest-position) target.
5. contextual token j = ``x[target_j] + mean of x over the units assigned to j`` (the official code ADDS
   the target to the mean of its assigned units; with no assigned unit the mean is 0, so the token is
   ``x[target_j]``). As merge weights: 1 at the target, ``1 / n_j`` at each of its n_j assigned units.
6. output = the d dominant units (ascending index), then the C contextual tokens in target order.

Departures from VisionZip-on-LLaVA, all forced by VideoGLaMM or by budgets the paper never ran:

- **No CLS token.** VisionZip's ``dominant`` count includes the layer -2 CLS row, which LLaVA then
  feeds to the LLM. VideoGLaMM never feeds the CLS token (its projector sees ``hidden_states[-2][:, 1:]``
  and the pooled placement has no place for it), so here all K tokens are patches/cells: the slot
  VisionZip spends on CLS goes to one more dominant unit (e.g. 64 = 54 dominant units + 10 contextual,
  where VisionZip keeps CLS + 53 patches + 10).
- **Budget split.** ``d = clamp(floor(K * dominant_ratio + 0.5), 1, K)`` (half rounds up), ``C = K - d``.
  The default ratio 54/64 reproduces every published split (64 = 54+10, 128 = 108+20, 192 = 162+30) and
  gives 196 = 165+31 and 81 = 68+13 for the video budgets. K = 1 (and any K where the rounding leaves no
  contextual slot, e.g. K = 2 or 3 with the default ratio) keeps dominant units only; the official code
  would divide by zero with ``contextual = 0``.
- **Pooled placement.** Scores of the 4 patches of a cell are SUMMED, keys and hidden states AVERAGED
  (:func:`pruning.registry.to_units`); the same algorithm then runs on the 144 cells.
- **Ties.** ``torch.topk`` has no specified tie order; here the dominant ranking uses a stable sort, so
  among equal scores the LOWER unit index is taken first. Assignment ties go to the first target
  (``argmax`` returns the first maximum, as in the official code).
- **Zero keys.** The official code divides by the key norm without an epsilon (NaN for a zero key);
  here ``F.normalize`` (eps 1e-12) gives a zero vector, i.e. cosine 0 with every target.
- Scores, keys and merge weights are computed in float32 (the official code runs in the tower dtype).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from pruning.attention import cls_attention, head_mean_keys
from pruning.base import PruningMethod, Selection, register, to_units, unit_layout
from refstream_errors import ConfigError

#: VisionZip's README split for 64 tokens (54 dominant + 10 contextual); also gives 108+20 and 162+30.
DEFAULT_DOMINANT_RATIO = 54 / 64


def split_budget(keep: int, dominant_ratio: float = DEFAULT_DOMINANT_RATIO) -> tuple[int, int]:
    """(dominant, contextual) token counts for ``keep`` tokens per frame.

    ``dominant = clamp(floor(keep * dominant_ratio + 0.5), 1, keep)``, ``contextual = keep - dominant``.

    Raises:
        ValueError: keep < 1 or a ratio outside [0, 1].
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not 0.0 <= dominant_ratio <= 1.0:
        raise ValueError(f"dominant_ratio must lie in [0, 1], got {dominant_ratio}")
    dominant = min(keep, max(1, math.floor(keep * dominant_ratio + 0.5)))
    return dominant, keep - dominant


def penultimate_cls_scores(features, reduce: str) -> torch.Tensor:
    """[CLS] attention over the M patches at layer -2, reduced over heads: float32 [F, M].

    Args:
        features: :class:`pruning.clip_features.ClipFrameFeatures` with ``penultimate_q``/``penultimate_k``.
        reduce: ``"sum"`` (VisionZip) or ``"mean"`` (VisPruner) over the heads.

    Raises:
        ValueError: the penultimate projections were not captured.
    """
    if features.penultimate_q is None or features.penultimate_k is None:
        raise ValueError(
            "this method needs the q/k projections of the layer at index -2 "
            "(encode_frames(..., with_penultimate=True))"
        )
    attn = cls_attention(features.penultimate_q, features.penultimate_k, features.num_heads)[:, :, 1:]
    return attn.sum(dim=1) if reduce == "sum" else attn.mean(dim=1)


def dominant_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring units per frame, in ASCENDING unit index: int64 [F, count].

    ``scores`` is float [F, T]. Ties break toward the lower index (stable descending sort).
    """
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :count]
    return torch.sort(top, dim=-1).values


def visionzip_weights(
    scores: torch.Tensor, keys: torch.Tensor, keep: int, dominant_ratio: float = DEFAULT_DOMINANT_RATIO
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's selection and merge on T units, batched over frames (steps 2-6 of the module docstring).

    Args:
        scores: float [F, T], [CLS] attention of each unit at layer -2 (summed over heads).
        keys: float [F, T, Dk], head-averaged layer -2 keys of each unit (any Dk; only cosines are used).
        keep: K, tokens per frame, 1..T.
        dominant_ratio: share of K given to dominant units (:func:`split_budget`).

    Returns:
        ``(indices, weights)``: int64 [F, K] = the d dominant units (ascending) then the C target units
        (target order); float32 [F, K, T] merge weights: one-hot rows for dominant units; for contextual
        token j, 1 at its target plus ``1 / n_j`` at each of the n_j units assigned to it. Every unit
        appears in exactly one row when C >= 1.

    Raises:
        ValueError: shapes that do not match or keep outside 1..T.
    """
    if scores.dim() != 2 or keys.dim() != 3 or keys.shape[:2] != scores.shape:
        raise ValueError(f"scores must be [F, T] and keys [F, T, Dk]; got {tuple(scores.shape)}, {tuple(keys.shape)}")
    frames, units = scores.shape
    if not 1 <= keep <= units:
        raise ValueError(f"keep must lie in 1..{units}, got {keep}")
    device = scores.device
    n_dom, n_ctx = split_budget(keep, dominant_ratio)

    dom = dominant_units(scores, n_dom)  # [F, d]
    weights = torch.zeros(frames, keep, units, dtype=torch.float32, device=device)
    weights[:, :n_dom].scatter_(2, dom.unsqueeze(-1), 1.0)
    if n_ctx == 0:
        return dom, weights

    is_dom = torch.zeros(frames, units, dtype=torch.bool, device=device)
    is_dom.scatter_(1, dom, True)
    n_filtered = units - n_dom
    # Boolean indexing walks each row in order, so the filtered list is in ascending unit index.
    filtered = torch.arange(units, device=device).expand(frames, units)[~is_dom].view(frames, n_filtered)

    step = max(1, n_filtered // n_ctx)
    target_pos = torch.arange(0, n_filtered, step, device=device)[:n_ctx]  # positions in the filtered list
    is_target = torch.zeros(n_filtered, dtype=torch.bool, device=device)
    is_target[target_pos] = True
    merge_pos = torch.arange(n_filtered, device=device)[~is_target]
    targets = filtered[:, target_pos]  # [F, C] unit indices
    to_merge = filtered[:, merge_pos]  # [F, Nf - C] unit indices, ascending

    normed = F.normalize(keys.float(), dim=-1)
    width = normed.shape[-1]
    target_keys = normed.gather(1, targets.unsqueeze(-1).expand(-1, -1, width))
    merge_keys = normed.gather(1, to_merge.unsqueeze(-1).expand(-1, -1, width))
    assign = torch.matmul(merge_keys, target_keys.transpose(1, 2)).argmax(dim=-1)  # [F, Nf - C], first max
    one_hot = torch.zeros(frames, to_merge.shape[1], n_ctx, dtype=torch.float32, device=device)
    one_hot.scatter_(2, assign.unsqueeze(-1), 1.0)
    counts = one_hot.sum(dim=1, keepdim=True).clamp(min=1.0)  # [F, 1, C]

    ctx = weights[:, n_dom:]
    ctx.scatter_(2, targets.unsqueeze(-1), 1.0)
    ctx.scatter_add_(2, to_merge.unsqueeze(1).expand(-1, n_ctx, -1), (one_hot / counts).transpose(1, 2))
    return torch.cat([dom, targets], dim=1), weights


@register("visionzip")
class VisionZip(PruningMethod):
    """VisionZip (github dvlab-research/VisionZip @ 3151f6d): dominant units by layer -2 [CLS] attention
    summed over heads + contextual tokens merged onto uniformly strided targets by key cosine.

    Option ``dominant_ratio`` (default 54/64): share of the K tokens that are dominant. No CLS token is
    kept (see the module docstring for this and the other departures).
    """

    needs_penultimate = True
    options = {"dominant_ratio": DEFAULT_DOMINANT_RATIO}

    def __init__(self, **options):
        super().__init__(**options)
        ratio = self.dominant_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) <= 1.0:
            raise ConfigError(f"visionzip dominant_ratio must be a number in [0, 1], got {ratio!r}")
        self.dominant_ratio = float(ratio)

    def select(self, features, text_embeds, budget, placement) -> Selection:
        """Kept/merged tokens per frame (K = ``unit_layout(...)[2]``), see :func:`visionzip_weights`.

        Returns:
            :class:`Selection` with ``indices`` int64 [F, K] (dominant ascending, then merge targets),
            ``merge_weights`` float32 [F, K, T], ``merged_features`` [F, K, D] in the dtype of
            ``features.hidden`` (= ``merge_weights @ to_units(hidden[:, 1:], grid, placement, "mean")``),
            ``similarity_aware`` all False.

        Raises:
            ConfigError: unknown placement; ValueError: budget < 1 or missing penultimate projections.
        """
        unit, side, keep = unit_layout(features, placement, budget)
        grid = features.grid
        scores = to_units(penultimate_cls_scores(features, "sum"), grid, placement, "sum")
        keys = to_units(head_mean_keys(features.penultimate_k, features.num_heads)[:, 1:], grid, placement, "mean")
        indices, weights = visionzip_weights(scores, keys, keep, self.dominant_ratio)
        hidden_units = to_units(features.hidden[:, 1:], grid, placement, "mean")
        merged = torch.matmul(weights, hidden_units.float()).to(features.hidden.dtype)
        return Selection(
            indices,
            torch.zeros_like(indices, dtype=torch.bool),
            unit,
            side,
            merge_weights=weights,
            merged_features=merged,
        )
