"""Registry of visual-token pruning methods, and the two placements of kept tokens.

A method turns per-frame CLIP features (and the texts' [EOS] embeddings) into the kept token indices of
each frame for a budget B. Under the ``patch`` placement it selects among the M = 576 patches (B per
frame); under ``pooled`` it selects among the 144 cells of VideoGLaMM's pooled 12x12 grid
(``round(B / 4)`` per frame), each cell's similarity being the mean and its context score the sum of
its 4 patches.

Register a new method with::

    @register("mymethod")
    class MyMethod(PruningMethod):
        def select(self, features, text_embeds, budget, placement, variant): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pruning.clip_features import ClipFrameFeatures
from refstream.errors import ConfigError

PLACEMENTS = ("pooled", "patch")


@dataclass
class Selection:
    """Kept tokens per frame.

    ``indices``: int64 [F, K] kept tokens in output order (patches, or cells of the pooled grid when
    ``unit == "cell"``); ``similarity_aware``: bool [F, K] marking LiteLVLM's similarity-aware tokens
    (all False for methods without that notion); ``grid``: side of the grid the indices live on (24 for
    patches, 12 for cells).
    """

    indices: torch.Tensor
    similarity_aware: torch.Tensor
    unit: str
    grid: int

    @property
    def kept_per_frame(self) -> int:
        return int(self.indices.shape[1])


class PruningMethod:
    """Base class: a visual-token pruning method (see the module docstring)."""

    name = "base"
    needs_text = False  # needs CLIP text_embeds
    needs_scores = False  # needs q/k/v and patch_embeds from the CLIP forward

    def select(
        self, features: ClipFrameFeatures, text_embeds: torch.Tensor | None, budget: int, placement: str, variant: str
    ) -> Selection:  # pragma: no cover - interface
        raise NotImplementedError


_REGISTRY: dict[str, type[PruningMethod]] = {}


def register(name: str) -> Callable[[type[PruningMethod]], type[PruningMethod]]:
    """Class decorator adding a :class:`PruningMethod` under ``name``."""

    def add(cls: type[PruningMethod]) -> type[PruningMethod]:
        if name in _REGISTRY:
            raise ValueError(f"pruning method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_methods() -> list[str]:
    """Names of the registered pruning methods."""
    return sorted(_REGISTRY)


def get_method(name: str) -> PruningMethod:
    """An instance of the registered method ``name``.

    Raises:
        ConfigError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of: {', '.join(available_methods())}")
    return _REGISTRY[name]()


def cells_for_budget(budget: int, num_cells: int = 144) -> int:
    """Pooled placement: B patch tokens become ``round(B / 4)`` cells (at least 1, at most ``num_cells``)."""
    return max(1, min(num_cells, round(budget / 4)))


def pool_scores(scores: torch.Tensor, grid: int, side: int, reduce: str) -> torch.Tensor:
    """Pool per-patch scores [..., grid*grid] onto the [..., side*side] cells (``mean`` or ``sum``)."""
    lead = scores.shape[:-1]
    pooled = F.adaptive_avg_pool2d(scores.reshape(-1, 1, grid, grid), side).reshape(*lead, side * side)
    if reduce == "sum":
        pooled = pooled * (grid // side) ** 2
    return pooled


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")


@register("none")
class NoPruning(PruningMethod):
    """Keep every token: all 576 patches (``patch``) or all 144 cells (``pooled``), in raster order."""

    def select(self, features, text_embeds, budget, placement, variant) -> Selection:
        check_placement(placement)
        frames, grid = features.hidden.shape[0], features.grid
        side = grid if placement == "patch" else grid // 2
        indices = torch.arange(side * side, device=features.hidden.device).expand(frames, -1).clone()
        unit = "patch" if placement == "patch" else "cell"
        return Selection(indices, torch.zeros_like(indices, dtype=torch.bool), unit, side)


@register("litelvlm")
class LiteLVLM(PruningMethod):
    """LiteLVLM (:mod:`pruning.litelvlm`): low-similarity tokens to the [EOS] embeddings + [CLS] context."""

    needs_text = True
    needs_scores = True

    def select(self, features, text_embeds, budget, placement, variant) -> Selection:
        from pruning import litelvlm

        check_placement(placement)
        if text_embeds is None:
            raise ValueError("litelvlm needs the CLIP text embeddings of the expressions")
        sim = litelvlm.similarity_scores(features.patch_embeds, text_embeds.to(features.patch_embeds.dtype))
        ctx = litelvlm.context_scores(features.q, features.k, features.v, variant)
        grid = features.grid
        if placement == "pooled":
            side = grid // 2
            sim, ctx = pool_scores(sim, grid, side, "mean"), pool_scores(ctx, grid, side, "sum")
            budget, unit, grid = cells_for_budget(budget, side * side), "cell", side
        else:
            unit = "patch"
        indices = litelvlm.select_from_scores(sim, ctx, budget, variant)
        sim_mask = litelvlm.similarity_aware_mask(sim, budget, variant)
        return Selection(indices, sim_mask.gather(1, indices), unit, grid)
