"""Random per-frame CLIP features for pruning tests (shared by several test modules)."""

from __future__ import annotations

import torch

from pruning.clip_features import ClipFrameFeatures


def random_features(frames: int = 2, grid: int = 24, dim: int = 16, proj: int = 8, seed: int = 0) -> ClipFrameFeatures:
    """Seeded random hidden/q/k/v [F, 1+grid^2, dim] and patch embeddings [F, grid^2, proj]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (frames, 1 + grid * grid, dim)
    hidden, q, k, v = (torch.randn(shape, generator=gen) for _ in range(4))
    return ClipFrameFeatures(hidden, q, k, v, torch.randn(frames, grid * grid, proj, generator=gen))
