"""Registry of visual-token pruning methods (``none``, ``litelvlm`` and those of :mod:`pruning.methods`).

The interface (:class:`Selection`, :class:`PruningMethod`, :func:`register`, the placement helpers) lives in
:mod:`pruning.base` and is re-exported here; this module imports every built-in method, so
:func:`available_methods` and :func:`get_method` see them all.

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

import torch

import pruning.methods  # noqa: F401 - registers the built-in methods of pruning/methods/
from pruning import litelvlm
from pruning.base import (
    PLACEMENTS,
    PruningMethod,
    Selection,
    cells_for_budget,
    check_placement,
    pool_scores,
    register,
    registered,
    to_units,
    unit_layout,
)
from refstream_errors import ConfigError

__all__ = [
    "PLACEMENTS",
    "LiteLVLM",
    "NoPruning",
    "PruningMethod",
    "Selection",
    "available_methods",
    "cells_for_budget",
    "check_placement",
    "get_method",
    "pool_scores",
    "register",
    "to_units",
    "unit_layout",
]


def available_methods() -> list[str]:
    """Names of the registered pruning methods."""
    return sorted(registered())


def get_method(name: str, **options) -> PruningMethod:
    """An instance of the registered method ``name`` with ``options`` (e.g. ``variant="official"``).

    Raises:
        ConfigError: unknown name (the message lists the registered ones) or unknown option.
    """
    methods = registered()
    if name not in methods:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of: {', '.join(available_methods())}")
    return methods[name](**options)


@register("none")
class NoPruning(PruningMethod):
    """Keep every token: all 576 patches (``patch``) or all 144 cells (``pooled``), in raster order."""

    def select(self, features, text_embeds, budget, placement) -> Selection:
        check_placement(placement)
        frames, grid = features.hidden.shape[0], features.grid
        side = grid if placement == "patch" else grid // 2
        indices = torch.arange(side * side, device=features.hidden.device).expand(frames, -1).clone()
        unit = "patch" if placement == "patch" else "cell"
        return Selection(indices, torch.zeros_like(indices, dtype=torch.bool), unit, side)


@register("litelvlm")
class LiteLVLM(PruningMethod):
    """LiteLVLM (:mod:`pruning.litelvlm`): low-similarity tokens to the [EOS] embeddings + [CLS] context.

    Option ``variant``: ``paper`` (default), ``official`` or ``context-heavy``.
    """

    needs_text = True
    needs_scores = True
    options = {"variant": "paper"}

    def __init__(self, **options):
        super().__init__(**options)
        if self.variant not in litelvlm.VARIANTS:
            raise ConfigError(f"unknown LiteLVLM variant {self.variant!r}; choose one of: {', '.join(litelvlm.VARIANTS)}")

    def select(self, features, text_embeds, budget, placement) -> Selection:
        variant = self.variant

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
