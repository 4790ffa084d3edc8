"""VisPruner: important tokens by [CLS] attention plus diverse tokens by iterative duplicate removal.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(ICCV 2025). Algorithm followed: github Theia-4869/VisPruner @ aefa01adc7c7ce6334e880c88225e90cede760d1:

- ``llava/model/llava_arch.py`` L140-186, ``LlavaMetaForCausalLM.encode_images`` (the whole selection);
- ``llava/model/multimodal_encoder/clip_encoder.py`` L35-72 (``hidden_states[-2][:, 1:]`` and
  ``attentions[-2][:, :, 0, 1:]``, i.e. layer index -2 for LLaVA-1.5's ``mm_vision_select_layer``);
- ``llava/eval/model_vqa_loader.py`` L151-152 (``--important_ratio`` default 0.5); ``README.md`` L66-75
  (examples ``128 0.5`` and ``64 0.75``).

Per frame, on units u = 0..T-1 (patches under ``patch``, pooled cells under ``pooled``), K to keep:

1. score ``s[u]`` = [CLS] attention of the layer at index -2 (the layer whose OUTPUT is
   ``hidden_states[-2]``), averaged over the heads, CLS key column dropped (softmax over all 1 + M keys).
2. ``K_imp = floor(K * important_ratio)`` important units = the first ``K_imp`` of the descending score
   order; the rest of that order (still attention-descending) is the residual list; ``K_div = K - K_imp``.
3. while ``K_div > 0`` and the residual list R is longer than ``K_div``: ``r = min(8, R - K_div)``;
   split the CURRENT list by position into A (even positions 0, 2, ...) and B (odd positions);
   each A unit scores ``max_b cos(x_a, x_b)`` over B (cosine of the layer -2 hidden states
   ``hidden_states[-2]``, full width); the ``r`` highest-scoring A units are dropped; the new list is the
   kept A units in DESCENDING score order followed by all of B in their previous order.
4. kept = important units + the residual list, output as a mask: ASCENDING unit index. No merging.

Choices where the official code is silent or fails:

- **Odd R.** With an odd list the official index broadcast (``expand(-1, R // 2 - r)``) fails. Here A is
  every even position (``ceil(R / 2)`` units) and B every odd one, the natural generalisation.
- **r larger than A.** Near the end of a long removal (``R - K_div > ceil(R / 2)``, only when R <= 14)
  A has fewer than ``r`` units; the official code then keeps none of A or crashes. Here at most
  ``|A|`` units are dropped that round (all of A), and the loop continues; every round drops >= 1 unit,
  so it always ends with exactly ``K_div`` units.
- **Ratio.** ``important_ratio`` defaults to 0.5, the code default; the README uses 0.75 for 64 tokens.
- **Ties.** Every sort is stable: among equal attention scores the LOWER unit index ranks higher
  (important first); among equal duplicate scores the earlier position in the current list ranks higher
  (dropped first). The official ``argsort`` has no specified tie order.
- **Zero features.** The official code divides by the norm without an epsilon (NaN for a zero vector);
  here ``F.normalize`` (eps 1e-12) gives cosine 0.
- **Pooled placement.** Scores of the 4 patches of a cell are SUMMED and hidden states AVERAGED
  (:func:`pruning.registry.to_units`), then the same algorithm runs on the 144 cells.
- Scores and cosines are computed in float32 (the official code runs in the tower dtype).
- Cosines come from one float32 Gram matrix per frame ([F, T, T], 1.3 MiB per frame at T = 576) instead
  of the official per-round ``a @ b.T``; the values are the same up to float rounding.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from pruning.base import PruningMethod, Selection, register, to_units, unit_layout
from pruning.methods.visionzip import penultimate_cls_scores
from refstream_errors import ConfigError

#: Tokens dropped per duplicate-removal round (hard-coded in the official code).
MAX_DROP_PER_ROUND = 8
DEFAULT_IMPORTANT_RATIO = 0.5


def remove_duplicates(
    gram: torch.Tensor, residual: torch.Tensor, count: int, max_drop: int = MAX_DROP_PER_ROUND
) -> torch.Tensor:
    """VisPruner's iterative duplicate removal (step 3 of the module docstring), batched over frames.

    Args:
        gram: float [F, T, T], cosine similarities between all units of each frame.
        residual: int64 [F, R], the residual units in list order (attention-descending at the start).
        count: K_div, how many units to leave (0 leaves the list unchanged, as the official code does).
        max_drop: most units dropped per round (8 in the official code; smaller values only for tests).

    Returns:
        int64 [F, min(R, count)] (or [F, R] when count == 0): the remaining units in the final list order.
    """
    units = gram.shape[-1]
    flat = gram.reshape(gram.shape[0], units * units)
    while count > 0:
        length = residual.shape[1]
        drop = min(max_drop, length - count)
        if drop <= 0:
            break
        a, b = residual[:, 0::2], residual[:, 1::2]
        drop = min(drop, a.shape[1])
        pairs = (a.unsqueeze(-1) * units + b.unsqueeze(1)).flatten(1)  # [F, |A| * |B|] into the flat gram
        dup = flat.gather(1, pairs).view(a.shape[0], a.shape[1], b.shape[1]).max(dim=-1).values  # [F, |A|]
        order = torch.sort(dup, dim=-1, descending=True, stable=True).indices[:, drop:]
        residual = torch.cat([a.gather(1, order), b], dim=1)
    return residual


def vispruner_mask(
    scores: torch.Tensor, feats: torch.Tensor, keep: int, important_ratio: float = DEFAULT_IMPORTANT_RATIO
) -> torch.Tensor:
    """VisPruner's kept units as a mask, batched over frames.

    Args:
        scores: float [F, T], [CLS] attention of each unit at layer -2 (head mean; any positive rescaling
            gives the same result).
        feats: float [F, T, D], layer -2 hidden states of each unit.
        keep: K, tokens per frame, 1..T.
        important_ratio: r in [0, 1]; ``K_imp = floor(K * r)``.

    Returns:
        bool [F, T] with exactly K True entries per frame.

    Raises:
        ValueError: shapes that do not match, keep outside 1..T or ratio outside [0, 1].
    """
    if scores.dim() != 2 or feats.dim() != 3 or feats.shape[:2] != scores.shape:
        raise ValueError(f"scores must be [F, T] and feats [F, T, D]; got {tuple(scores.shape)}, {tuple(feats.shape)}")
    frames, units = scores.shape
    if not 1 <= keep <= units:
        raise ValueError(f"keep must lie in 1..{units}, got {keep}")
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must lie in [0, 1], got {important_ratio}")
    n_imp = int(keep * important_ratio)
    n_div = keep - n_imp
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    selected = order[:, :n_imp]
    if n_div > 0:
        normed = F.normalize(feats.float(), dim=-1)
        gram = torch.matmul(normed, normed.transpose(1, 2))
        selected = torch.cat([selected, remove_duplicates(gram, order[:, n_imp:], n_div)], dim=1)
    mask = torch.zeros(frames, units, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, selected, True)


@register("vispruner")
class VisPruner(PruningMethod):
    """VisPruner (github Theia-4869/VisPruner @ aefa01a): important units by layer -2 [CLS] attention
    (head mean) + diverse units by iterative duplicate removal on layer -2 hidden states; no merging.

    Option ``important_ratio`` (default 0.5, the code default; the README uses 0.75 for 64 tokens).
    """

    needs_penultimate = True
    options = {"important_ratio": DEFAULT_IMPORTANT_RATIO}

    def __init__(self, **options):
        super().__init__(**options)
        ratio = self.important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) <= 1.0:
            raise ConfigError(f"vispruner important_ratio must be a number in [0, 1], got {ratio!r}")
        self.important_ratio = float(ratio)

    def select(self, features, text_embeds, budget, placement) -> Selection:
        """Kept units per frame (K = ``unit_layout(...)[2]``) in ascending index, see :func:`vispruner_mask`.

        Returns:
            :class:`Selection` with ``indices`` int64 [F, K] ascending, ``similarity_aware`` all False,
            no merge weights.

        Raises:
            ConfigError: unknown placement; ValueError: budget < 1 or missing penultimate projections.
        """
        unit, side, keep = unit_layout(features, placement, budget)
        grid = features.grid
        scores = to_units(penultimate_cls_scores(features, "mean"), grid, placement, "sum")
        feats = to_units(features.hidden[:, 1:], grid, placement, "mean")
        mask = vispruner_mask(scores, feats, keep, self.important_ratio)
        frames, units = mask.shape
        indices = torch.arange(units, device=mask.device).expand(frames, units)[mask].view(frames, keep)
        return Selection(indices, torch.zeros_like(indices, dtype=torch.bool), unit, side)
