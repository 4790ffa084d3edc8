"""Random visual-token selection: the ``random`` baseline (LiteLVLM Table 4 compares against it).

Per frame, K units (patches under ``patch``, pooled 12x12 cells under ``pooled``) are drawn uniformly
at random without replacement, K being the ``keep`` of :func:`pruning.registry.unit_layout`.

Determinism. One ``torch.Generator`` seeded with the ``seed`` option draws a float64 uniform matrix
[F, T] on the CPU; frame f keeps the K units with the smallest draws of row f. So

- the same seed, frame count and budget always give the same indices (on any device: the draws are made
  on the CPU and only the result is moved);
- different frames of one call get different, independent draws (different rows);
- frame f's draw depends only on (seed, f, T), not on how many frames follow it: selecting on the first
  n frames gives the first n rows of the selection on all F frames (a frame's draw does depend on its
  position in the call, so re-chunking a video shifts the draws of later chunks);
- a larger K keeps a superset of a smaller K's units for the same frame (nested budgets).

Ties between draws (probability ~T^2 / 2^53) go to the LOWER unit index (stable sort). Output is in
ascending unit index (raster) order.
"""

from __future__ import annotations

import numbers

import torch

from pruning.base import PruningMethod, Selection, register, unit_layout
from refstream_errors import ConfigError


def random_units(
    frames: int, units: int, keep: int, seed: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """K distinct units per frame, uniformly at random, seeded.

    Args:
        frames: F >= 0.
        units: T >= 1, units per frame.
        keep: K, 1..T (values above T are clamped to T).
        seed: seed of the ``torch.Generator`` (CPU) that draws all frames.
        device: where the returned tensor lives (default CPU).

    Returns:
        int64 [F, min(K, T)]: per frame, distinct unit indices in ascending order.

    Raises:
        ValueError: ``units < 1`` or ``keep < 1``.
    """
    if units < 1 or keep < 1:
        raise ValueError(f"units and keep must be >= 1, got units={units}, keep={keep}")
    keep = min(int(keep), int(units))
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.rand(frames, units, generator=gen, dtype=torch.float64)  # [F, T], row f = frame f
    chosen = torch.sort(draws, dim=-1, stable=True).indices[:, :keep]  # K smallest draws, ties -> lower index
    return torch.sort(chosen, dim=-1).values.to(device=device, dtype=torch.int64)


@register("random")
class RandomTokens(PruningMethod):
    """K units per frame uniformly at random (seeded), ascending index order. Option ``seed`` (int, 0)."""

    options = {"seed": 0}

    def __init__(self, **options):
        super().__init__(**options)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ConfigError(f"random: seed must be an integer, got {self.seed!r}")

    def select(self, features, text_embeds, budget, placement) -> Selection:
        """See :meth:`PruningMethod.select`. Needs only ``features.hidden`` (for F, the grid and the device)."""
        unit, side, keep = unit_layout(features, placement, budget)
        frames = features.hidden.shape[0]
        indices = random_units(frames, side * side, keep, self.seed, features.hidden.device)
        return Selection(indices, torch.zeros_like(indices, dtype=torch.bool), unit, side)
