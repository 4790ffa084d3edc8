"""Helpers shared by several test modules: random CLIP features, 4x4 patch layouts, golden files, waiting for a
condition and a free loopback port."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import torch

from pruning.clip_features import ClipFrameFeatures


def random_features(frames: int = 2, grid: int = 24, dim: int = 16, proj: int = 8, seed: int = 0) -> ClipFrameFeatures:
    """Seeded random hidden/q/k/v [F, 1+grid^2, dim] and patch embeddings [F, grid^2, proj]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (frames, 1 + grid * grid, dim)
    hidden, q, k, v = (torch.randn(shape, generator=gen) for _ in range(4))
    return ClipFrameFeatures(hidden, q, k, v, torch.randn(frames, grid * grid, proj, generator=gen))


def patches_of_cells(per_cell: dict[int, list[float]]) -> list[float]:
    """Lay out per-cell patch values on the 4x4 grid. Cell c = (r, col) holds patches
    (2r, 2col), (2r, 2col+1), (2r+1, 2col), (2r+1, 2col+1) in that order (cell 0 = patches 0, 1, 4, 5)."""
    out = [0.0] * 16
    for cell, vals in per_cell.items():
        r, c = divmod(cell, 2)
        for (dr, dc), val in zip([(0, 0), (0, 1), (1, 0), (1, 1)], vals):
            out[(2 * r + dr) * 4 + 2 * c + dc] = val
    return out


def load_golden(stem: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A golden pair ``stem.json`` (provenance, settings) + ``stem.npz`` (arrays, as tensors)."""
    meta = json.loads(stem.with_suffix(".json").read_text())
    arrays = np.load(stem.with_suffix(".npz"))
    return meta, {k: torch.from_numpy(arrays[k]) for k in arrays.files}


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition()`` every 50 ms until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
