"""Baselines random, TRIM, PruMerge and PruMerge+: hand-checked small grids, full-size invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pruning.clip_features import ClipFrameFeatures
from pruning.methods.prumerge import (
    cls_patch_attention,
    key_neighbours,
    plus_grid_units,
    plus_split,
    prumerge_selection,
)
from pruning.methods.random_tokens import random_units
from pruning.methods.trim import iqr_outliers, text_similarity, trim_selection
from pruning.registry import get_method, to_units, unit_layout
from helpers import patches_of_cells, random_features
from refstream.errors import ConfigError




TEXT = torch.tensor([[1.0, 0.0]])


def trim_features(patch_sims: list[float]) -> ClipFrameFeatures:
    """One 4x4 frame whose patch j has similarity patch_sims[j] to TEXT."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 17, 4, generator=gen)
    patch = torch.zeros(1, 16, 2)
    patch[0, :, 0] = torch.tensor(patch_sims)
    patch[0, :, 1] = 5.0  # orthogonal to TEXT
    empty = torch.zeros(1, 17, 4)
    return ClipFrameFeatures(hidden, empty, empty, empty, patch)


# TRIM similarities: cell means c0 = 1.25, c1 = 0, c2 = 1, c3 = 2.
SIMS = patches_of_cells({0: [-10, 5, 5, 5], 1: [0, 0, 0, 0], 2: [1, 1, 1, 1], 3: [2, 2, 2, 2]})

# PruMerge: attention weights w_j (CLS weight 32, total 64, so a_j = w_j / 64) and key directions per cell.
WEIGHTS = patches_of_cells({0: [8, 1, 1, 1], 1: [2, 2, 2, 2], 2: [4, 1, 1, 1], 3: [1, 1, 1, 3]})
CELL_DIRS = {0: (1.0, 0.0, 0.0), 1: (0.8, 0.6, 0.0), 2: (0.0, 0.0, 1.0), 3: (0.0, 0.6, 0.8)}
CELL_OF = [int(c) for c in patches_of_cells({0: [0] * 4, 1: [1] * 4, 2: [2] * 4, 3: [3] * 4})]


def prumerge_features(frames: int = 1) -> ClipFrameFeatures:
    """4x4 frames, D = 4. q_cls = (2, 0, 0, 0) and k_j = (ln w_j, 10 u_cell(j)) give logits q.k / sqrt(4) =
    ln w_j, so a_j = w_j / 64 exactly. Keys of one cell point the same way (cosine >= 0.979), keys of different
    cells have cosine <= 0.85: the 3 nearest key neighbours of a patch are the other patches of its cell.
    Cell neighbours: c0 <-> c1 (cosine 0.8), c2 <-> c3."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(frames, 17, 4, generator=gen)
    q = torch.randn(frames, 17, 4, generator=gen)
    q[:, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    k = torch.zeros(frames, 17, 4)
    k[:, 0, 0] = math.log(32.0)
    for j in range(16):
        k[:, 1 + j, 0] = math.log(WEIGHTS[j])
        k[:, 1 + j, 1:] = 10 * torch.tensor(CELL_DIRS[CELL_OF[j]])
    v = torch.randn(frames, 17, 4, generator=gen)
    return ClipFrameFeatures(hidden, q, k, v, torch.randn(frames, 16, 2, generator=gen))


def hot(values: dict[int, float], size: int = 16) -> list[float]:
    row = [0.0] * size
    for j, val in values.items():
        row[j] = val
    return row


def assert_merged_consistent(sel, feats, placement):
    units = to_units(feats.hidden[:, 1:].float(), feats.grid, placement, "mean")
    torch.testing.assert_close(sel.merged_features.float(), sel.merge_weights @ units)
    torch.testing.assert_close(sel.gather(units), sel.merged_features.float())


# --------------------------------------------------------------------------------------------- IQR


class TestIqrOutliers:
    def test_hand_data(self):
        # Q1 = 2, Q3 = 4, fence 7: only 100 is an outlier; 7 sits ON the fence and is not (strict >)
        assert iqr_outliers(torch.tensor([1.0, 2, 3, 4, 100])).tolist() == [False] * 4 + [True]
        assert not iqr_outliers(torch.tensor([1.0, 2, 3, 4, 7])).any()
        # no lower fence: -100 is never an outlier
        assert iqr_outliers(torch.tensor([-100.0, 2, 3, 4, 5])).tolist() == [False] * 5

    def test_matches_numpy_percentiles_flattened_and_per_row(self):
        gen = np.random.default_rng(0)
        x = gen.standard_exponential((3, 577))  # heavy right tail: plenty of outliers
        q1, q3 = np.percentile(x, [25, 75])
        expected = x > q3 + 1.5 * (q3 - q1)
        got = iqr_outliers(torch.from_numpy(x))
        assert got.shape == (3, 577) and 0 < expected.sum() < x.size
        assert np.array_equal(got.numpy(), expected)
        q1, q3 = np.percentile(x, [25, 75], axis=1, keepdims=True)
        assert np.array_equal(iqr_outliers(torch.from_numpy(x), dim=1).numpy(), x > q3 + 1.5 * (q3 - q1))

    def test_empty_raises(self):
        with pytest.raises(ValueError):
            iqr_outliers(torch.empty(0))


# ------------------------------------------------------------------------------------------ random


class TestRandom:
    @pytest.mark.parametrize("placement", ["patch", "pooled"])
    @pytest.mark.parametrize("budget", [1, 100, 576])
    def test_count_unique_ascending(self, placement, budget):
        feats = random_features(frames=3)
        sel = get_method("random").select(feats, None, budget, placement)
        unit, side, keep = unit_layout(feats, placement, budget)
        assert sel.indices.shape == (3, keep) and sel.indices.dtype == torch.int64
        assert (sel.unit, sel.grid, sel.merge_weights) == (unit, side, None)
        for row in sel.indices.tolist():
            assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < side * side
        assert not sel.similarity_aware.any()
        if keep == side * side:
            assert torch.equal(sel.indices, torch.arange(keep).expand(3, -1))

    def test_seeded_deterministic_and_frames_differ(self):
        feats = random_features(frames=3)
        a = get_method("random").select(feats, None, 64, "patch").indices
        b = get_method("random", seed=0).select(feats, None, 64, "patch").indices
        c = get_method("random", seed=1).select(feats, None, 64, "patch").indices
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
        # same draws as a torch.Generator(seed) would give: K smallest uniforms of each row
        draws = torch.rand(3, 576, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert torch.equal(a, torch.sort(torch.argsort(draws, dim=-1)[:, :64], dim=-1).values)

    def test_prefix_of_frames_and_nested_budgets(self):
        five = random_units(5, 144, 20, seed=3)
        assert torch.equal(random_units(2, 144, 20, seed=3), five[:2])
        bigger = random_units(5, 144, 50, seed=3)
        for small, big in zip(five.tolist(), bigger.tolist()):
            assert set(small) <= set(big)

    def test_roughly_uniform(self):
        picks = random_units(2000, 144, 36, seed=7)
        counts = torch.bincount(picks.flatten(), minlength=144)
        assert counts.sum() == 2000 * 36
        assert int(counts.min()) > 400 and int(counts.max()) < 600  # mean 500, sd ~19

    def test_bad_seed(self):
        with pytest.raises(ConfigError):
            get_method("random", seed="x")


# -------------------------------------------------------------------------------------------- TRIM


class TestTrimHand:
    def test_similarity_is_mean_over_texts(self):
        patch = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
        texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        assert text_similarity(patch, texts).tolist() == [[1.5, 1.0]]

    def test_high_patch(self):
        feats = trim_features(SIMS)
        sel = get_method("trim").select(feats, TEXT, 4, "patch")
        # 3 highest: the 5s (patches 1, 4, 5); mean token over the other 13
        assert sel.indices.tolist() == [[1, 4, 5, -1]]
        rest = {j: 1 / 13 for j in range(16) if j not in (1, 4, 5)}
        expected = [hot({1: 1}), hot({4: 1}), hot({5: 1}), hot(rest)]
        torch.testing.assert_close(sel.merge_weights, torch.tensor([expected]))
        assert sel.merge_weights.dtype == torch.float32
        assert sel.merged.tolist() == [[False, False, False, True]]
        assert (sel.unit, sel.grid) == ("patch", 4) and not sel.similarity_aware.any()
        assert_merged_consistent(sel, feats, "patch")
        # the mean token is the plain mean of the unselected layer -2 features
        rest_idx = [1 + j for j in rest]
        torch.testing.assert_close(sel.merged_features[0, 3], feats.hidden[0, rest_idx].mean(dim=0))

    def test_high_ties_go_to_lower_index(self):
        # 4 highest: 5s, then the four 2s tie (patches 10, 11, 14, 15): 10 wins
        sel = get_method("trim").select(trim_features(SIMS), TEXT, 5, "patch")
        assert sel.indices.tolist() == [[1, 4, 5, 10, -1]]

    def test_low_is_the_official_direction(self):
        # 2 lowest: -10 (patch 0) then the 0s of cell 1 tie: patch 2
        sel = get_method("trim", direction="low").select(trim_features(SIMS), TEXT, 3, "patch")
        assert sel.indices.tolist() == [[0, 2, -1]]
        rest = hot({j: 1 / 14 for j in range(16) if j not in (0, 2)})
        torch.testing.assert_close(sel.merge_weights[0, 2], torch.tensor(rest))

    def test_pooled_uses_cell_means(self):
        feats = trim_features(SIMS)
        # budget 8 -> 2 cells: highest MEAN is c3 (2; the max would pick c0's 5s) + mean of c0, c1, c2
        sel = get_method("trim").select(feats, TEXT, 8, "pooled")
        assert (sel.unit, sel.grid) == ("cell", 2)
        assert sel.indices.tolist() == [[3, -1]]
        torch.testing.assert_close(sel.merge_weights, torch.tensor([[[0, 0, 0, 1.0], [1 / 3, 1 / 3, 1 / 3, 0]]]))
        assert_merged_consistent(sel, feats, "pooled")
        # low, budget 12 -> 3 cells: c1 (0), c2 (1) + mean token of c0, c3 (the min would pick c0's -10)
        sel = get_method("trim", direction="low").select(feats, TEXT, 12, "pooled")
        assert sel.indices.tolist() == [[1, 2, -1]]

    def test_budget_one_and_all(self):
        feats = trim_features(SIMS)
        one = get_method("trim").select(feats, TEXT, 1, "patch")
        assert one.indices.tolist() == [[-1]]
        torch.testing.assert_close(one.merge_weights, torch.full((1, 1, 16), 1 / 16))
        torch.testing.assert_close(one.merged_features[0, 0], feats.hidden[0, 1:].mean(dim=0))
        full = get_method("trim").select(feats, TEXT, 16, "patch")
        assert full.indices.tolist() == [list(range(16))]
        assert torch.equal(full.merge_weights[0], torch.eye(16)) and not full.merged.any()

    def test_errors(self):
        feats = trim_features(SIMS)
        with pytest.raises(ValueError, match="text"):
            get_method("trim").select(feats, None, 4, "patch")
        with pytest.raises(ConfigError):
            get_method("trim", direction="sideways")
        with pytest.raises(ConfigError):
            get_method("trim").select(feats, TEXT, 4, "cells")
        with pytest.raises(ValueError):
            trim_selection(torch.zeros(1, 16), 2, "middle")


# ---------------------------------------------------------------------------------------- PruMerge


class TestPruMergeHand:
    def test_crafted_attention(self):
        attn = cls_patch_attention(prumerge_features().q, prumerge_features().k)
        torch.testing.assert_close(attn, torch.tensor([WEIGHTS]) / 64)  # not renormalised: sums to 1/2

    def test_crafted_neighbours_are_cell_mates(self):
        feats = prumerge_features()
        nbrs = key_neighbours(feats.k[:, 1:], torch.arange(16).unsqueeze(0), 3)[0]
        for j in range(16):
            assert sorted(nbrs[j].tolist()) == [i for i in range(16) if CELL_OF[i] == CELL_OF[j] and i != j]

    def test_patch_merge_weights_by_hand(self):
        feats = prumerge_features()
        sel = get_method("prumerge", neighbours=3).select(feats, None, 3, "patch")
        # top-2 attention: patch 0 (8/64) then patch 8 (4/64), descending; extra token last
        assert sel.indices.tolist() == [[0, 8, -1]]
        a = [w / 64 for w in WEIGHTS]
        expected = [
            hot({0: 1, 1: a[1], 4: a[4], 5: a[5]}),
            hot({8: 1, 9: a[9], 12: a[12], 13: a[13]}),
            hot({j: a[j] for j in range(16) if j not in (0, 8)}),
        ]
        torch.testing.assert_close(sel.merge_weights, torch.tensor([expected]))
        assert sel.merged.all() and not sel.similarity_aware.any()
        assert (sel.unit, sel.grid) == ("patch", 4)
        assert_merged_consistent(sel, feats, "patch")
        # x_0 + sum a_j x_j over its neighbours, from the raw hidden rows
        x = feats.hidden[0, 1:]
        torch.testing.assert_close(sel.merged_features[0, 0], x[0] + (x[1] + x[4] + x[5]) / 64)

    def test_descending_attention_order_and_ties(self):
        sel = get_method("prumerge", neighbours=3).select(prumerge_features(), None, 8, "patch")
        # 8, 4, 3, then the 2s of cell 1 in index order (2, 3, 6, 7)
        assert sel.indices.tolist() == [[0, 8, 15, 2, 3, 6, 7, -1]]
        flat = prumerge_features()
        flat.q = torch.zeros_like(flat.q)  # uniform attention: ties everywhere -> lowest indices
        assert get_method("prumerge").select(flat, None, 5, "patch").indices.tolist() == [[0, 1, 2, 3, -1]]

    def test_pooled_sums_attention_and_averages_keys(self):
        feats = prumerge_features()
        # cell attention (sum): [11, 8, 7, 6] / 64; budget 8 -> 2 cells: c0 + extra; nearest cell key of c0: c1
        sel = get_method("prumerge", neighbours=1).select(feats, None, 8, "pooled")
        assert (sel.unit, sel.grid) == ("cell", 2)
        assert sel.indices.tolist() == [[0, -1]]
        torch.testing.assert_close(sel.merge_weights, torch.tensor([[[1, 8 / 64, 0, 0], [0, 8 / 64, 7 / 64, 6 / 64]]]))
        assert_merged_consistent(sel, feats, "pooled")
        # default 32 neighbours on 4 cells: every other cell
        sel = get_method("prumerge").select(feats, None, 8, "pooled")
        torch.testing.assert_close(sel.merge_weights[0, 0], torch.tensor([1, 8 / 64, 7 / 64, 6 / 64]))

    def test_budget_one_and_all(self):
        feats = prumerge_features()
        one = get_method("prumerge").select(feats, None, 1, "patch")
        assert one.indices.tolist() == [[-1]]
        torch.testing.assert_close(one.merge_weights, torch.tensor([[[w / 64 for w in WEIGHTS]]]))
        full = get_method("prumerge", neighbours=3).select(feats, None, 16, "patch")
        assert sorted(full.indices[0].tolist()) == list(range(16))  # no extra token
        assert full.indices[0, :3].tolist() == [0, 8, 15]

    def test_plus_patch_by_hand(self):
        feats = prumerge_features()
        sel = get_method("prumerge+", neighbours=3).select(feats, None, 6, "patch")
        # S = 5: ceil(5/4) = 2 attention units (0, 8); 3 grid units at positions floor(i*14/3) = 0, 4, 9 of the
        # 14 free units [1, 2, 3, 4, 5, 6, 7, 9, 10, ...] -> 1, 5, 11
        assert sel.indices.tolist() == [[0, 8, 1, 5, 11, -1]]
        a = [w / 64 for w in WEIGHTS]
        expected = [
            hot({0: 1, 1: a[1], 4: a[4], 5: a[5]}),
            hot({8: 1, 9: a[9], 12: a[12], 13: a[13]}),
            hot({1: 1, 0: a[0], 4: a[4], 5: a[5]}),
            hot({5: 1, 0: a[0], 1: a[1], 4: a[4]}),
            hot({11: 1, 10: a[10], 14: a[14], 15: a[15]}),
            hot({j: a[j] for j in range(16) if j not in (0, 8, 1, 5, 11)}),
        ]
        torch.testing.assert_close(sel.merge_weights, torch.tensor([expected]))
        assert_merged_consistent(sel, feats, "patch")

    def test_plus_pooled(self):
        # budget 16 -> 4 cells = all: ceil(4/4) = 1 attention cell (c0), then grid over c1, c2, c3; no extra
        sel = get_method("prumerge+", neighbours=1).select(prumerge_features(), None, 16, "pooled")
        assert sel.indices.tolist() == [[0, 1, 2, 3]]
        torch.testing.assert_close(sel.merge_weights[0, 2], torch.tensor([0, 0, 1, 6 / 64]))  # c2 <-> c3

    def test_plus_split_and_grid(self):
        assert plus_split(0) == (0, 0) and plus_split(1) == (1, 0) and plus_split(63) == (16, 47)
        assert plus_split(191) == (48, 143) and plus_split(10, 0.3) == (3, 7) and plus_split(8, 0.0) == (0, 8)
        taken = torch.zeros(2, 10, dtype=torch.bool)
        taken[0, [0, 1]] = True
        taken[1, [5, 9]] = True
        # free: [2..9] and [0..4, 6, 7, 8]; positions 0, 2, 5 (floor(i*8/3))
        assert plus_grid_units(taken, 3).tolist() == [[2, 4, 7], [0, 2, 6]]
        assert plus_grid_units(taken, 8).tolist() == [[2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 6, 7, 8]]
        with pytest.raises(ValueError):
            plus_grid_units(taken, 9)

    def test_errors(self):
        with pytest.raises(ConfigError):
            get_method("prumerge", neighbours=-1)
        with pytest.raises(ConfigError):
            get_method("prumerge+", attention_fraction=2)
        with pytest.raises(ConfigError):
            get_method("prumerge", attention_fraction=0.5)  # PruMerge has no grid
        feats = random_features(frames=1)
        feats.q = feats.hidden.new_empty(0)
        with pytest.raises(ValueError, match="q/k"):
            get_method("prumerge").select(feats, None, 64, "patch")


# ----------------------------------------------------------------------------------- full size


def reference_prumerge(feats: ClipFrameFeatures, keep: int, neighbours: int = 32) -> tuple[list, torch.Tensor]:
    """Plain per-frame loop following the original's steps (patch placement, K < 576, no ties)."""
    out_idx, out_w = [], []
    for f in range(feats.hidden.shape[0]):
        q, k = feats.q[f].double(), feats.k[f].double()
        a = torch.softmax(q[0] @ k.T / math.sqrt(q.shape[-1]), dim=-1)[1:]
        kept = torch.topk(a, keep - 1).indices.tolist()
        keys = F.normalize(k[1:], dim=-1)
        rows = []
        for i in kept:
            others = [j for j in range(576) if j != i]
            cos = keys[others] @ keys[i]
            row = torch.zeros(576, dtype=torch.float64)
            for t in torch.topk(cos, neighbours).indices.tolist():
                row[others[t]] = a[others[t]]
            row[i] = 1.0
            rows.append(row)
        pruned = torch.ones(576, dtype=torch.bool)
        pruned[kept] = False
        rows.append(a * pruned)
        out_idx.append(kept + [-1])
        out_w.append(torch.stack(rows))
    return out_idx, torch.stack(out_w)


METHODS = [("trim", {}), ("trim", {"direction": "low"}), ("prumerge", {}), ("prumerge+", {})]


class TestFullSize:
    def test_prumerge_matches_a_plain_loop(self):
        feats = random_features(frames=2, seed=4)
        sel = get_method("prumerge").select(feats, None, 40, "patch")
        idx, weights = reference_prumerge(feats, 40)
        assert sel.indices.tolist() == idx
        torch.testing.assert_close(sel.merge_weights.double(), weights, atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("name, opts", METHODS)
    @pytest.mark.parametrize("placement", ["patch", "pooled"])
    @pytest.mark.parametrize("budget", [1, 100, 576])
    def test_exact_count_structure_and_batching(self, name, opts, placement, budget):
        feats = random_features(frames=3, seed=5)
        text = torch.randn(2, 8, generator=torch.Generator().manual_seed(6))
        method = get_method(name, **opts)
        sel = method.select(feats, text, budget, placement)
        unit, side, keep = unit_layout(feats, placement, budget)
        units = side * side
        assert sel.indices.shape == (3, keep) and sel.indices.dtype == torch.int64
        assert (sel.unit, sel.grid) == (unit, side)
        assert sel.merge_weights.shape == (3, keep, units) and sel.merge_weights.dtype == torch.float32
        assert sel.merged_features.shape == (3, keep, 16) and not sel.similarity_aware.any()
        assert_merged_consistent(sel, feats, placement)
        anchors = sel.indices[sel.indices >= 0].view(3, -1)
        n_anchor = keep if keep == units else keep - 1
        assert anchors.shape[1] == n_anchor
        if keep < units:
            assert (sel.indices[:, -1] == -1).all()
        for row in anchors.tolist():
            assert len(set(row)) == len(row) and all(0 <= u < units for u in row)
        # each anchored row has weight 1 on its anchor
        if n_anchor:
            assert (sel.merge_weights[:, :n_anchor].gather(-1, anchors.unsqueeze(-1)) == 1).all()
        if name == "trim":
            torch.testing.assert_close(sel.merge_weights.sum(-1), torch.ones(3, keep))
        else:
            nonzero = (sel.merge_weights[:, :n_anchor] != 0).sum(-1)
            assert (nonzero == 1 + min(32, units - 1)).all()
        # batching over frames equals per-frame selection
        for f in range(3):
            one = ClipFrameFeatures(
                feats.hidden[f : f + 1], feats.q[f : f + 1], feats.k[f : f + 1], feats.v[f : f + 1],
                feats.patch_embeds[f : f + 1],
            )
            single = method.select(one, text, budget, placement)
            assert torch.equal(single.indices, sel.indices[f : f + 1])
            torch.testing.assert_close(single.merge_weights, sel.merge_weights[f : f + 1])

    def test_deterministic_and_dtype_preserved(self):
        feats = random_features(frames=2, seed=9)
        parts = (feats.hidden, feats.q, feats.k, feats.v, feats.patch_embeds)
        feats16 = ClipFrameFeatures(*(t.to(torch.bfloat16) for t in parts))
        text = torch.randn(1, 8, generator=torch.Generator().manual_seed(10))
        for name in ("trim", "prumerge", "prumerge+"):
            a = get_method(name).select(feats16, text, 64, "patch")
            b = get_method(name).select(feats16, text, 64, "patch")
            assert torch.equal(a.indices, b.indices) and torch.equal(a.merge_weights, b.merge_weights)
            assert a.merged_features.dtype == torch.bfloat16 and a.merge_weights.dtype == torch.float32

    def test_plus_order_attention_then_ascending_grid(self):
        feats = random_features(frames=2, seed=12)
        sel = get_method("prumerge+").select(feats, None, 64, "patch")  # S = 63: 16 attention + 47 grid
        attn = cls_patch_attention(feats.q, feats.k)
        for f in range(2):
            idx = sel.indices[f].tolist()
            assert idx[:16] == torch.argsort(attn[f], descending=True)[:16].tolist()
            assert idx[16:63] == sorted(idx[16:63]) and not set(idx[16:63]) & set(idx[:16])
            gaps = np.diff(idx[16:63])
            # spread over the frame: a gap is at most one free-list stride (ceil(560 / 47)) + the 16 attention units
            assert gaps.min() >= 1 and gaps.max() <= math.ceil(560 / 47) + 16 and idx[16] <= 16
        _, weights = prumerge_selection(attn, feats.k[:, 1:], 64, plus=True)
        assert torch.equal(weights, sel.merge_weights)

    def test_high_and_low_trim_are_the_top_and_bottom_similarities(self):
        feats = random_features(frames=2, seed=13)
        text = torch.randn(3, 8, generator=torch.Generator().manual_seed(14))
        sim = torch.einsum("fmp,np->fm", feats.patch_embeds, text) / 3
        for direction, descending in (("high", True), ("low", False)):
            sel = get_method("trim", direction=direction).select(feats, text, 50, "patch")
            expected = torch.sort(torch.argsort(sim, dim=-1, descending=descending)[:, :49], dim=-1).values
            assert torch.equal(sel.indices[:, :49], expected)

    def test_full_size_ties_go_to_lower_index(self):
        # 576 equal scores: an unstable CPU sort would return scattered indices here
        feats = random_features(frames=2, seed=15)
        zero_text = torch.zeros(1, 8)
        for direction in ("high", "low"):
            sel = get_method("trim", direction=direction).select(feats, zero_text, 30, "patch")
            assert sel.indices[:, :29].tolist() == [list(range(29))] * 2
        feats.q = torch.zeros_like(feats.q)  # uniform attention
        feats.k = torch.ones_like(feats.k)  # identical keys: every cosine ties
        sel = get_method("prumerge").select(feats, None, 30, "patch")
        assert sel.indices[:, :29].tolist() == [list(range(29))] * 2
        # neighbours of unit 0: units 1..32; of unit 1: 0, 2..32
        assert (sel.merge_weights[0, 0] != 0).nonzero().flatten().tolist() == list(range(33))
        assert (sel.merge_weights[0, 1] != 0).nonzero().flatten().tolist() == list(range(33))
        assert (sel.merge_weights[0, 5] != 0).nonzero().flatten().tolist() == list(range(33))
        sel = get_method("prumerge").select(feats, None, 40, "pooled")  # 10 cells
        assert sel.indices[:, :9].tolist() == [list(range(9))] * 2
