"""Pruning registry: methods, placements, budget -> cells, score pooling, hand-checked pooled LiteLVLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pruning import litelvlm
from pruning.base import _REGISTRY
from pruning.clip_features import ClipFrameFeatures
from pruning.registry import (
    PLACEMENTS,
    PruningMethod,
    Selection,
    available_methods,
    cells_for_budget,
    get_method,
    pool_scores,
    register,
)
from helpers import patches_of_cells, random_features
from refstream.errors import ConfigError




def crafted_features(patch_sims: list[float], v_norms: list[float], dim: int = 4) -> ClipFrameFeatures:
    """One frame on a 4x4 grid. text_embeds = [[1, 0]] gives sim[j] = patch_sims[j]; q = 0 gives uniform
    attention, so the context score of patch j is v_norms[j] / 16 (both variants)."""
    m = len(patch_sims)
    assert m == len(v_norms) == 16
    hidden = torch.randn(1, 1 + m, dim)
    q = torch.zeros(1, 1 + m, dim)
    k = torch.randn(1, 1 + m, dim)
    v = torch.zeros(1, 1 + m, dim)
    v[0, 1:, 0] = torch.tensor(v_norms)
    v[0, 0, 0] = 100.0  # the CLS value never counts
    patch = torch.zeros(1, m, 2)
    patch[0, :, 0] = torch.tensor(patch_sims)
    patch[0, :, 1] = 5.0  # orthogonal to the text embedding
    return ClipFrameFeatures(hidden, q, k, v, patch)


TEXT = torch.tensor([[1.0, 0.0]])


class TestRegistry:
    def test_builtin_methods(self):
        assert {"none", "litelvlm"} <= set(available_methods())
        assert available_methods() == sorted(available_methods())
        assert get_method("none").name == "none"
        assert get_method("litelvlm").name == "litelvlm"
        assert get_method("litelvlm").needs_text and get_method("litelvlm").needs_scores
        assert not get_method("none").needs_text and not get_method("none").needs_scores

    def test_get_method_returns_fresh_instances(self):
        assert get_method("none") is not get_method("none")

    def test_unknown_method_names_the_choices(self):
        with pytest.raises(ConfigError) as info:
            get_method("nosuchmethod")
        msg = str(info.value)
        assert "'nosuchmethod'" in msg and "litelvlm" in msg and "none" in msg

    @pytest.mark.parametrize("name", ["none", "litelvlm"])
    def test_unknown_placement_names_the_choices(self, name):
        feats = random_features(frames=1)
        text = torch.randn(1, 8)
        with pytest.raises(ConfigError) as info:
            get_method(name).select(feats, text, 64, "cells")
        msg = str(info.value)
        assert "'cells'" in msg and "pooled" in msg and "patch" in msg
        assert PLACEMENTS == ("pooled", "patch")

    def test_register_and_duplicate(self):
        try:

            @register("_test_keep_first")
            class KeepFirst(PruningMethod):
                def select(self, features, text_embeds, budget, placement):
                    idx = torch.zeros(features.hidden.shape[0], 1, dtype=torch.long)
                    return Selection(idx, torch.zeros_like(idx, dtype=torch.bool), "patch", features.grid)

            assert "_test_keep_first" in available_methods()
            method = get_method("_test_keep_first")
            assert isinstance(method, KeepFirst) and method.name == "_test_keep_first"
            assert method.select(random_features(frames=3), None, 5, "patch").kept_per_frame == 1
            with pytest.raises(ValueError, match="already registered"):
                register("_test_keep_first")(KeepFirst)
            with pytest.raises(ValueError, match="already registered"):
                register("none")(KeepFirst)
        finally:
            _REGISTRY.pop("_test_keep_first", None)
        assert get_method("none").name == "none"


class TestCellsForBudget:
    @pytest.mark.parametrize(
        "budget, cells",
        [(576, 144), (1000, 144), (196, 49), (81, 20), (64, 16), (192, 48), (128, 32), (9, 2), (7, 2), (5, 1),
         (4, 1), (3, 1), (1, 1), (0, 1)],
    )
    def test_round_quarter_clamped(self, budget, cells):
        assert cells_for_budget(budget) == cells

    def test_num_cells_bounds(self):
        assert cells_for_budget(100, num_cells=4) == 4
        assert cells_for_budget(12, num_cells=4) == 3
        assert cells_for_budget(1, num_cells=4) == 1


class TestPoolScores:
    def test_24_to_12_mean_and_sum_by_hand(self):
        scores = torch.arange(576, dtype=torch.float64)
        mean = pool_scores(scores, 24, 12, "mean")
        total = pool_scores(scores, 24, 12, "sum")
        assert mean.shape == total.shape == (144,)
        for cell in (0, 1, 11, 12, 77, 143):
            r, c = divmod(cell, 12)
            patches = [(2 * r) * 24 + 2 * c, (2 * r) * 24 + 2 * c + 1, (2 * r + 1) * 24 + 2 * c, (2 * r + 1) * 24 + 2 * c + 1]
            assert mean[cell].item() == pytest.approx(sum(patches) / 4)
            assert total[cell].item() == pytest.approx(sum(patches))
        # closed form: 48 r + 2 c + 12.5
        r, c = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
        torch.testing.assert_close(mean, (48 * r + 2 * c + 12.5).flatten().double())

    def test_leading_dims_are_kept(self):
        gen = torch.Generator().manual_seed(3)
        scores = torch.randn(2, 3, 576, generator=gen)
        pooled = pool_scores(scores, 24, 12, "mean")
        assert pooled.shape == (2, 3, 144)
        expected = F.avg_pool2d(scores.reshape(6, 1, 24, 24), 2).reshape(2, 3, 144)
        torch.testing.assert_close(pooled, expected)
        torch.testing.assert_close(pool_scores(scores, 24, 12, "sum"), expected * 4)

    def test_small_grid(self):
        scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
        torch.testing.assert_close(pool_scores(scores, 4, 2, "mean"), torch.tensor([[3.5, 5.5, 11.5, 13.5]]))
        torch.testing.assert_close(pool_scores(scores, 4, 2, "sum"), torch.tensor([[14.0, 22, 46, 54]]))


class TestNone:
    @pytest.mark.parametrize("placement, count, unit, grid", [("pooled", 144, "cell", 12), ("patch", 576, "patch", 24)])
    @pytest.mark.parametrize("budget", [1, 64, 576, 2000])
    def test_keeps_everything_in_raster_order(self, placement, count, unit, grid, budget):
        feats = random_features(frames=3)
        sel = get_method("none").select(feats, None, budget, placement)
        assert sel.indices.dtype == torch.int64
        assert sel.indices.shape == (3, count)
        assert torch.equal(sel.indices, torch.arange(count).expand(3, -1))
        assert sel.similarity_aware.shape == (3, count) and not sel.similarity_aware.any()
        assert sel.similarity_aware.dtype == torch.bool
        assert (sel.unit, sel.grid, sel.kept_per_frame) == (unit, grid, count)

    def test_indices_are_writable_per_frame(self):
        sel = get_method("none").select(random_features(frames=2), None, 10, "pooled")
        sel.indices[0, 0] = 99  # a real tensor, not an expanded view sharing memory across frames
        assert sel.indices[1, 0] == 0


class TestLiteLVLMPooled:
    # Per-cell patch similarities and value norms on a 4x4 grid (4 cells of 2x2 patches).
    # Cell similarity (MEAN): c0 = 1.25 (one very low patch), c1 = 0, c2 = 1, c3 = 2.
    #   lowest mean = c1; lowest min would be c0.
    # Cell context (SUM of ||v|| / 16): c0 = 4 (one spike), c1 = 2, c2 = 12, c3 = 4.
    #   highest sum = c2; highest max would be c0.
    SIMS = patches_of_cells({0: [-10, 5, 5, 5], 1: [0, 0, 0, 0], 2: [1, 1, 1, 1], 3: [2, 2, 2, 2]})
    NORMS = patches_of_cells({0: [4, 0, 0, 0], 1: [0.5] * 4, 2: [3, 3, 3, 3], 3: [1, 1, 1, 1]})

    def test_mean_similarity_and_summed_context_pick_the_right_cells(self):
        feats = crafted_features(self.SIMS, self.NORMS)
        # budget 8 -> 2 cells; paper, one text: 1 similarity-aware cell + 1 context cell
        sel = get_method("litelvlm", variant="paper").select(feats, TEXT, 8, "pooled")
        assert (sel.unit, sel.grid) == ("cell", 2)
        assert sel.indices.tolist() == [[1, 2]]
        assert sel.similarity_aware.tolist() == [[True, False]]

    def test_official_single_text_is_all_similarity(self):
        feats = crafted_features(self.SIMS, self.NORMS)
        # official: B // N = 2 lowest mean similarities: c1 (0), c2 (1)
        sel = get_method("litelvlm", variant="official").select(feats, TEXT, 8, "pooled")
        assert sel.indices.tolist() == [[1, 2]]
        assert sel.similarity_aware.tolist() == [[True, True]]
        # budget 12 -> 3 cells: c1, c2, c0 (1.25) in index order
        sel = get_method("litelvlm", variant="official").select(feats, TEXT, 12, "pooled")
        assert sel.indices.tolist() == [[0, 1, 2]]

    def test_context_heavy_single_cell_is_context(self):
        feats = crafted_features(self.SIMS, self.NORMS)
        # context-heavy: floor(2 * 0.05) = 0 similarity cells; both from context: c2 (12), then c0/c3 tie
        # at 4 -> lower index c0
        sel = get_method("litelvlm", variant="context-heavy").select(feats, TEXT, 8, "pooled")
        assert sel.indices.tolist() == [[0, 2]]
        assert not sel.similarity_aware.any()

    def test_budget_rounds_to_cells(self):
        feats = crafted_features(self.SIMS, self.NORMS)
        method = get_method("litelvlm")
        assert method.select(feats, TEXT, 1, "pooled").kept_per_frame == 1
        assert method.select(feats, TEXT, 12, "pooled").kept_per_frame == 3
        assert method.select(feats, TEXT, 576, "pooled").indices.tolist() == [[0, 1, 2, 3]]

    def test_patch_placement_selects_patches(self):
        # patch level: budget 4, one text, paper: the 2 lowest-similarity patches (the -10 patch 0 and
        # then the first 0 of cell 1, patch 2) + 2 best context patches among the rest
        # (patch 0 has the 4-spike but is taken; the 3s of cell 2: patches 8, 9)
        feats = crafted_features(self.SIMS, self.NORMS)
        sel = get_method("litelvlm", variant="paper").select(feats, TEXT, 4, "patch")
        assert (sel.unit, sel.grid) == ("patch", 4)
        assert sel.indices.tolist() == [[0, 2, 8, 9]]
        assert sel.similarity_aware.tolist() == [[True, True, False, False]]

    def test_two_texts_intersection(self):
        feats = crafted_features(self.SIMS, self.NORMS)
        # second text = minus the first: its lowest cells are the highest of the first (c3, c0).
        texts = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        # 3 cells per text: text0 {c1, c2, c0}, text1 {c3, c0, c2}; intersection {c0, c2}; fill 1 from
        # context among {c1, c3}: c3 (4) > c1 (2)
        sel = get_method("litelvlm", variant="paper").select(feats, texts, 12, "pooled")
        assert sel.indices.tolist() == [[0, 2, 3]]
        assert sel.similarity_aware.tolist() == [[True, True, False]]

    def test_needs_text(self):
        with pytest.raises(ValueError, match="text"):
            get_method("litelvlm", variant="paper").select(random_features(frames=1), None, 64, "pooled")


class TestLiteLVLMFullSize:
    @pytest.mark.parametrize("variant", ["paper", "official", "context-heavy"])
    def test_pooled_equals_selection_on_independently_pooled_scores(self, variant):
        feats = random_features(frames=3, seed=5)
        text = torch.randn(2, 8, generator=torch.Generator().manual_seed(6))
        sel = get_method("litelvlm", variant=variant).select(feats, text, 196, "pooled")
        sim = torch.einsum("fmp,np->fnm", feats.patch_embeds, text)
        ctx = litelvlm.context_scores(feats.q, feats.k, feats.v, variant)
        sim_c = F.avg_pool2d(sim.reshape(-1, 1, 24, 24), 2).reshape(3, 2, 144)
        ctx_c = 4 * F.avg_pool2d(ctx.reshape(-1, 1, 24, 24), 2).reshape(3, 144)
        expected = litelvlm.select_from_scores(sim_c, ctx_c, 49, variant)
        assert sel.indices.shape == (3, 49)
        assert torch.equal(sel.indices, expected)
        mask = litelvlm.similarity_aware_mask(sim_c, 49, variant)
        assert torch.equal(sel.similarity_aware, mask.gather(1, expected))
        assert (sel.unit, sel.grid) == ("cell", 12)

    def test_patch_equals_select_tokens(self):
        feats = random_features(frames=2, seed=8)
        text = torch.randn(1, 8, generator=torch.Generator().manual_seed(9))
        sel = get_method("litelvlm", variant="paper").select(feats, text, 81, "patch")
        expected = litelvlm.select_tokens(feats.hidden, feats.q, feats.k, feats.v, feats.patch_embeds, text, 81, "paper")
        assert torch.equal(sel.indices, expected)
        assert sel.indices.shape == (2, 81) and (sel.unit, sel.grid) == ("patch", 24)
        # paper, one text: 40 similarity-aware tokens (floor(81/2)) per frame
        assert sel.similarity_aware.sum(dim=1).tolist() == [40, 40]

    @pytest.mark.parametrize("placement, count", [("pooled", 144), ("patch", 576)])
    @pytest.mark.parametrize("budget", [576, 1000])
    @pytest.mark.parametrize("texts", [1, 3])
    def test_budget_at_least_576_keeps_all_in_raster_order_for_paper(self, placement, count, budget, texts):
        feats = random_features(frames=2, seed=11)
        text = torch.randn(texts, 8, generator=torch.Generator().manual_seed(12))
        sel = get_method("litelvlm", variant="paper").select(feats, text, budget, placement)
        assert torch.equal(sel.indices, torch.arange(count).expand(2, -1))
        # same tokens as method "none"
        none = get_method("none").select(feats, None, budget, placement)
        assert torch.equal(sel.indices, none.indices)

    def test_similarity_flags_mark_lowest_similarity_cells(self):
        feats = random_features(frames=1, seed=13)
        text = torch.randn(1, 8, generator=torch.Generator().manual_seed(14))
        sel = get_method("litelvlm", variant="paper").select(feats, text, 64, "pooled")  # 16 cells, 8 similarity-aware
        sim = pool_scores(torch.einsum("fmp,np->fnm", feats.patch_embeds, text), 24, 12, "mean")[0, 0]
        flagged = sel.indices[0][sel.similarity_aware[0]].tolist()
        assert sorted(flagged) == sorted(torch.argsort(sim)[:8].tolist())
        assert len(set(sel.indices[0].tolist())) == 16
        assert sel.indices[0].tolist() == sorted(sel.indices[0].tolist())  # raster order (paper)


def test_methods_register_through_the_base_module():
    """The interface lives in pruning.base (no registry <-> methods cycle); registry re-exports it."""
    import pruning.base
    import pruning.registry

    for name in ("PruningMethod", "Selection", "register", "cells_for_budget", "unit_layout", "to_units"):
        assert getattr(pruning.registry, name) is getattr(pruning.base, name)
    assert set(available_methods()) == set(pruning.base.registered())
    assert {"none", "litelvlm", "fastv", "visionzip", "vispruner", "trim", "prumerge", "random"} <= set(
        available_methods())
