"""The pruning-method interface: :class:`Selection`, :class:`PruningMethod`, :func:`register`, unit helpers.

Methods (``pruning/methods/*``, and ``none``/``litelvlm`` in :mod:`pruning.registry`) subclass
:class:`PruningMethod` and register themselves with :func:`register`; :mod:`pruning.registry` imports them all
and looks them up by name (``get_method``). Keeping the interface here, below both, means a method module
never imports the registry that imports it.

Placements: under ``patch`` a method selects among the M = 576 patches (B per frame); under ``pooled`` among
the 144 cells of VideoGLaMM's pooled 12x12 grid (``round(B / 4)`` per frame), each cell's similarity being
the mean and its context score the sum of its 4 patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pruning.clip_features import ClipFrameFeatures
from refstream_errors import ConfigError

__all__ = [
    "PLACEMENTS",
    "PruningMethod",
    "Selection",
    "cells_for_budget",
    "check_placement",
    "pool_scores",
    "register",
    "registered",
    "to_units",
    "unit_layout",
]

PLACEMENTS = ("pooled", "patch")


@dataclass
class Selection:
    """Kept (or merged) visual tokens per frame: what a pruning method returns.

    Attributes:
        indices: int64 [F, K], the kept units in output order (patches on the 24x24 grid, or cells of the
            pooled 12x12 grid when ``unit == "cell"``). For a merged token it is the unit the token is
            anchored on (the merge target); ``-1`` marks a token tied to no single unit (an aggregate of
            pruned tokens, e.g. TRIM's or PruMerge's extra token).
        similarity_aware: bool [F, K], LiteLVLM's similarity-aware tokens (all False for other methods).
        unit: ``"patch"`` or ``"cell"``.
        grid: side of the grid ``indices`` live on (24 or 12).
        merge_weights: float [F, K, T] or None. Methods that MERGE tokens set it: output token k of frame f
            is ``sum_t merge_weights[f, k, t] * x[f, t]`` over the T units of that frame, for whatever
            per-unit features x are used (CLIP layer -2 patches under ``patch``, projected pooled cells
            under ``pooled``). None means plain selection (``x[f, indices[f, k]]``).
        merged_features: float [F, K, D] or None: for merging methods, the merged CLIP layer -2 features of
            the units (``merge_weights`` applied to the per-unit layer -2 hidden states).
        stage: ``"encoder"`` (selection before the LLM) or ``"llm"`` (the method prunes inside the LLM, e.g.
            FastV; then ``indices`` are filled in after the LLM has run).
    """

    indices: torch.Tensor
    similarity_aware: torch.Tensor
    unit: str
    grid: int
    merge_weights: torch.Tensor | None = None
    merged_features: torch.Tensor | None = None
    stage: str = "encoder"

    @property
    def kept_per_frame(self) -> int:
        """K, the visual tokens per frame after pruning."""
        return int(self.indices.shape[1])

    @property
    def merged(self) -> torch.Tensor:
        """bool [F, K]: tokens that combine several units (drawn outlined by ``refstream explain``)."""
        if self.merge_weights is None:
            return torch.zeros_like(self.indices, dtype=torch.bool)
        return (self.merge_weights != 0).sum(dim=-1) > 1

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Apply the selection to per-unit tokens.

        Args:
            tokens: float [F, T, C], one row per unit (T = grid * grid).

        Returns:
            float [F, K, C]: gathered rows, or the merge (``merge_weights @ tokens``) for merging methods.
        """
        if self.merge_weights is not None:
            return torch.matmul(self.merge_weights.to(tokens.dtype), tokens)
        return tokens.gather(1, self.indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class PruningMethod:
    """Base class of a visual-token pruning method (see the module docstring).

    Subclasses set the class attributes below, declare their options (with defaults) in ``options``,
    and implement :meth:`select`. ``get_method(name, **options)`` validates the options.
    """

    name = "base"
    needs_text = False  # needs the CLIP text_embeds of the texts
    needs_scores = False  # needs the last layer's q/k/v and patch_embeds
    needs_penultimate = False  # needs q/k of the layer producing hidden_states[-2] (attention at layer -2)
    stage = "encoder"  # "llm": prunes inside the LLM (FastV)
    options: dict = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ConfigError(f"pruning method {self.name!r} has no option {', '.join(unknown)}; its options: {known}")
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))

    def select(
        self, features: ClipFrameFeatures, text_embeds: torch.Tensor | None, budget: int, placement: str
    ) -> Selection:  # pragma: no cover - interface
        """Kept tokens per frame for ``budget`` (1..576 patch tokens per frame) under ``placement``.

        Args:
            features: per-frame CLIP features (what the method declared it needs is filled in).
            text_embeds: float [N, P] CLIP text embeddings, or None when ``needs_text`` is False.
            budget: tokens per frame, 1..576; under ``pooled`` the method keeps ``cells_for_budget(budget)``.
            placement: ``"pooled"`` or ``"patch"``.
        """
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


def registered() -> dict[str, type[PruningMethod]]:
    """The methods registered so far (name -> class); :func:`pruning.registry.available_methods` loads them all."""
    return dict(_REGISTRY)


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
    """Raise :class:`ConfigError` naming the choices when ``placement`` is not ``pooled`` or ``patch``."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")


def unit_layout(features: ClipFrameFeatures, placement: str, budget: int) -> tuple[str, int, int]:
    """(unit, grid side, tokens to keep per frame) for a placement and a patch budget.

    ``patch``: patches on the 24x24 grid, ``min(budget, 576)``; ``pooled``: cells on the 12x12 grid,
    :func:`cells_for_budget`.

    Raises:
        ConfigError: unknown placement; ValueError: budget < 1.
    """
    check_placement(placement)
    if isinstance(budget, bool) or int(budget) != budget or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    grid = features.grid
    if placement == "patch":
        return "patch", grid, min(int(budget), grid * grid)
    side = grid // 2
    return "cell", side, cells_for_budget(int(budget), side * side)


def to_units(values: torch.Tensor, grid: int, placement: str, reduce: str = "mean") -> torch.Tensor:
    """Per-patch values [F, M] or features [F, M, C] on the units of ``placement``.

    ``patch``: unchanged. ``pooled``: the 2x2 patches of each 12x12 cell combined by ``reduce``
    (``mean`` or ``sum``), in raster order -> [F, 144] or [F, 144, C].
    """
    if placement == "patch":
        return values
    side = grid // 2
    if values.dim() == 2:
        return pool_scores(values, grid, side, reduce)
    f, m, c = values.shape
    grid_view = values.transpose(1, 2).reshape(f, c, grid, grid)
    pooled = F.adaptive_avg_pool2d(grid_view, side).flatten(2).transpose(1, 2)
    return pooled * (grid // side) ** 2 if reduce == "sum" else pooled
