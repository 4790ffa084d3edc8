"""LiteLVLM selection: hand-checked small cases for both variants, ties, B >= M, N > B, and the released code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pruning.litelvlm import (
    context_scores,
    select_from_scores,
    select_tokens,
    similarity_aware_mask,
    similarity_scores,
)

# Eight tokens. Context scores, best first: 0 (.9), 2 (.8), 4 (.7), 6 (.6), 7 (.5), 5 (.3), 3 (.2), 1 (.1).
CTX = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.5]])


def sims(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([list(rows)], dtype=torch.float32)  # [1, N, 8]


def select(sim, budget, variant, ctx=CTX):
    return select_from_scores(sim, ctx, budget, variant)[0].tolist()


class TestSingleText:
    SIM = sims([5, 1, 7, 0, 3, 6, 2, 4])  # ascending: 3, 1, 6, 4, 7, 0, 5, 2

    def test_paper_half_similarity_half_context_in_raster_order(self):
        # 50% of B=4 -> S = {3, 1}; context fill from the rest: 0 (.9), 2 (.8).
        assert select(self.SIM, 4, "paper") == [0, 1, 2, 3]

    def test_paper_odd_budget_floors_the_similarity_share(self):
        # B=5: 2 similarity-aware {3, 1}, 3 context {0, 2, 4}.
        assert select(self.SIM, 5, "paper") == [0, 1, 2, 3, 4]

    def test_official_is_all_similarity(self):
        # Released code: B // 1 = 4 lowest, sorted unique, no context tokens.
        assert select(self.SIM, 4, "official") == [1, 3, 4, 6]

    def test_context_heavy_keeps_five_percent_similarity(self):
        sim = torch.arange(40, dtype=torch.float32).flip(0).view(1, 1, 40)  # lowest = highest index
        ctx = torch.arange(40, dtype=torch.float32).view(1, 40) * -1.0  # best context = lowest index
        out = select_from_scores(sim, ctx, 40 // 2, "context-heavy")[0].tolist()
        # floor(20 * 0.05) = 1 similarity-aware token (39), 19 context tokens (0..18).
        assert out == list(range(19)) + [39]


class TestThreeTexts:
    SIM = sims(
        [0, 1, 2, 3, 4, 5, 6, 7],  # 4 lowest {0,1,2,3}; lowest 1: {0}
        [3, 2, 1, 0, 7, 6, 5, 4],  # 4 lowest {0,1,2,3}; lowest 1: {3}
        [0, 9, 1, 9, 2, 9, 3, 9],  # 4 lowest {0,2,4,6}; lowest 1: {0}
    )

    def test_paper_intersection_then_context(self):
        # S = {0,2}; fill 2 by context among the rest: 4 (.7), 6 (.6).
        assert select(self.SIM, 4, "paper") == [0, 2, 4, 6]

    def test_official_union_of_b_over_n_then_context_first(self):
        # B // 3 = 1 per text -> S = {0, 3}; context first (descending): 2 (.8), 4 (.7); then S ascending.
        assert select(self.SIM, 4, "official") == [2, 4, 0, 3]

    def test_similarity_aware_mask_matches_selection_rules(self):
        paper = similarity_aware_mask(self.SIM, 4, "paper")[0].nonzero().flatten().tolist()
        official = similarity_aware_mask(self.SIM, 4, "official")[0].nonzero().flatten().tolist()
        assert paper == [0, 2] and official == [0, 3]


class TestTies:
    def test_equal_similarity_prefers_lower_index(self):
        flat = sims([1.0] * 8)
        assert select(flat, 4, "official") == [0, 1, 2, 3]
        # paper: S = {0, 1}; context fill 0/1 excluded -> best remaining 2 (.8), 4 (.7).
        assert select(flat, 4, "paper") == [0, 1, 2, 4]

    def test_equal_context_prefers_lower_index(self):
        flat_ctx = torch.ones(1, 8)
        two = sims([9, 9, 9, 9, 9, 0, 9, 9], [9, 9, 9, 9, 9, 0, 9, 9])
        assert select(two, 3, "official", flat_ctx) == [0, 1, 5]
        assert select(two, 3, "paper", flat_ctx) == [0, 1, 5]

    def test_ties_everywhere_are_deterministic(self):
        sim = torch.zeros(3, 2, 576)
        ctx = torch.zeros(3, 576)
        for variant in ("paper", "official"):
            out = select_from_scores(sim, ctx, 196, variant)
            assert torch.equal(out, select_from_scores(sim, ctx, 196, variant))
        assert select_from_scores(sim, ctx, 196, "official")[0].tolist() == list(range(98, 196)) + list(range(98))


class TestBudgetEdges:
    SIM = sims([0, 1, 2, 3, 4, 5, 6, 7], [0, 9, 1, 9, 2, 9, 3, 9])

    @pytest.mark.parametrize("budget", [8, 9, 576])
    def test_budget_at_least_m_keeps_all(self, budget):
        assert select(self.SIM, budget, "paper") == list(range(8))
        assert select(self.SIM[:, :1], budget, "official") == list(range(8))

    def test_official_budget_m_with_two_texts_reorders(self):
        # B // 2 = 4 per text -> S = {0,1,2,3} | {0,2,4,6}; the 2 left come by context: 7 (.5), 5 (.3).
        assert select(self.SIM, 8, "official") == [7, 5, 0, 1, 2, 3, 4, 6]

    def test_more_texts_than_budget(self):
        three = sims([0, 1, 2, 3, 4, 5, 6, 7], [3, 2, 1, 0, 7, 6, 5, 4], [0, 9, 1, 9, 2, 9, 3, 9])
        # official: B // N = 0 -> everything from context: 0 (.9), 2 (.8).
        assert select(three, 2, "official") == [0, 2]
        # paper: candidates {0,1} & {2,3} & {0,2} = {} -> context fill 0, 2.
        assert select(three, 2, "paper") == [0, 2]

    def test_budget_one(self):
        assert select(TestSingleText.SIM, 1, "paper") == [0]  # floor(0.5) = 0 similarity-aware -> best context
        assert select(TestSingleText.SIM, 1, "official") == [3]

    @pytest.mark.parametrize("budget", [0, -3, 2.5, True])
    def test_bad_budget_raises(self, budget):
        with pytest.raises(ValueError, match="budget"):
            select_from_scores(TestSingleText.SIM, CTX, budget, "paper")

    def test_unknown_variant_raises(self):
        with pytest.raises(ValueError, match="variant"):
            select_from_scores(TestSingleText.SIM, CTX, 4, "fastest")


class TestScores:
    def test_similarity_is_a_raw_dot_product(self):
        patch = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # [1, 2, 2]
        text = torch.tensor([[2.0, 1.0], [0.0, 5.0]])  # [2, 2]
        assert similarity_scores(patch, text).tolist() == [[[4.0, 5.0], [10.0, -5.0]]]

    def test_context_paper_uses_raw_qk_official_cosine(self):
        d = 2
        q = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # CLS query row 0
        k = torch.tensor([[[9.0, 9.0], [3.0, 0.0], [0.0, 1.0]]])  # CLS key (row 0) is excluded
        v = torch.tensor([[[7.0, 7.0], [3.0, 4.0], [1.0, 0.0]]])  # |v1| = 5, |v2| = 1
        e1, e2 = math.exp(6.0 / math.sqrt(d)), math.exp(0.0)
        paper = [e1 / (e1 + e2) * 5.0, e2 / (e1 + e2) * 1.0]
        c1, c2 = math.exp(1.0 / math.sqrt(d)), math.exp(0.0)
        official = [c1 / (c1 + c2) * 5.0, c2 / (c1 + c2) * 1.0]
        assert context_scores(q, k, v, "paper")[0].tolist() == pytest.approx(paper, rel=1e-6)
        assert context_scores(q, k, v, "official")[0].tolist() == pytest.approx(official, rel=1e-6)


def _random_inputs(frames=3, tokens=24, width=16, proj=8, texts=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(frames, tokens + 1, width), r(frames, tokens + 1, width), r(frames, tokens + 1, width), \
        r(frames, tokens + 1, width), r(frames, tokens, proj), r(texts, proj)


@pytest.mark.parametrize("variant", ["paper", "official", "context-heavy"])
@pytest.mark.parametrize("texts", [1, 3])
def test_batched_equals_per_frame_and_contract(variant, texts):
    hidden, q, k, v, pe, te = _random_inputs(texts=texts)
    out = select_tokens(hidden, q, k, v, pe, te, 10, variant)
    assert out.dtype == torch.int64 and out.shape == (3, 10)
    for f in range(3):
        one = select_tokens(hidden[f : f + 1], q[f : f + 1], k[f : f + 1], v[f : f + 1], pe[f : f + 1], te, 10, variant)
        assert torch.equal(one[0], out[f])
        assert len(set(out[f].tolist())) == 10  # no duplicates
    if variant != "official":
        assert torch.equal(out, out.sort(dim=-1).values)  # raster order


def test_paper_variant_prefers_low_similarity_and_high_context():
    hidden, q, k, v, pe, te = _random_inputs(texts=1, tokens=40)
    out = set(select_tokens(hidden, q, k, v, pe, te, 8, "paper")[0].tolist())
    sim = similarity_scores(pe, te)[0, 0]
    lowest4 = set(torch.argsort(sim)[:4].tolist())
    assert lowest4 <= out


def test_shape_errors_are_clear():
    hidden, q, k, v, pe, te = _random_inputs()
    with pytest.raises(ValueError, match="patch_embeds"):
        select_tokens(hidden, q, k, v, pe[:, :-1], te, 4)
    with pytest.raises(ValueError, match="projection widths"):
        select_tokens(hidden, q, k, v, pe, te[:, :-1], 4)


GOLDEN = Path(__file__).parent / "golden" / "litelvlm_official_released.json"


@pytest.mark.parametrize("case", range(8))
def test_official_matches_released_code(case):
    """Inputs and selections recorded by running the released LiteLVLM code (``tools/goldens/litelvlm_official.py``;
    see the file's "source" and "how")."""
    data = json.loads(GOLDEN.read_text())["cases"][case]
    dtype = getattr(torch, data["dtype"])
    t = {name: torch.tensor(data[name], dtype=dtype) for name in ("hidden", "q", "k", "v", "patch_embeds", "text_embeds")}
    out = select_tokens(t["hidden"], t["q"], t["k"], t["v"], t["patch_embeds"], t["text_embeds"], data["budget"], "official")
    assert out[0].tolist() == data["released_indices"]
