"""VisionZip and VisPruner: hand-checked selections/merges, the hooked layer -2 attention against eager
CLIP attention maps, both placements, every budget range, batching and determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pruning.attention import cls_attention, head_mean_keys
from pruning.clip_features import ClipFeatureExtractor, ClipFrameFeatures
from pruning.methods.visionzip import split_budget, visionzip_weights
from pruning.methods.vispruner import remove_duplicates, vispruner_mask
from pruning.registry import get_method, to_units, unit_layout
from refstream.errors import ConfigError


# --------------------------------------------------------------------------------------------------
# crafted inputs


def crafted(logits, mean_keys, hidden, heads: int = 2) -> ClipFrameFeatures:
    """One frame on a square grid with a known layer -2 [CLS] attention and known head-mean keys.

    Head 0: the CLS query is ``sqrt(dh) * e_0`` and patch j's key starts with ``logits[j]`` (the CLS key
    is 0), so head 0's CLS attention is ``softmax([0, logits])``. The other heads have a zero CLS query
    (uniform attention 1 / (1 + M)), and their keys are chosen so that the head mean of patch j's key is
    exactly ``mean_keys[j]``. Scores therefore rank as ``logits``.
    """
    logits = torch.as_tensor(logits, dtype=torch.float32)
    mean_keys = torch.as_tensor(mean_keys, dtype=torch.float32)
    hidden = torch.as_tensor(hidden, dtype=torch.float32)
    m, dh = mean_keys.shape
    width = heads * dh
    q = torch.zeros(1, 1 + m, width)
    q[0, 0, 0] = math.sqrt(dh)
    k = torch.zeros(1, 1 + m, width)
    k[0, 1:, 0] = logits
    head0 = k[0, 1:, :dh].clone()
    rest = heads * mean_keys - head0  # sum the other heads must contribute
    for h in range(1, heads):
        k[0, 1:, h * dh : (h + 1) * dh] = rest / (heads - 1)
    full_hidden = torch.cat([torch.full((1, hidden.shape[-1]), 7.0), hidden]).unsqueeze(0)  # CLS row never used
    empty = full_hidden.new_empty(0)
    return ClipFrameFeatures(full_hidden, empty, empty, empty, None, penultimate_q=q, penultimate_k=k, num_heads=heads)


def random_features(frames: int = 2, grid: int = 24, width: int = 16, dim: int = 12, heads: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    length = 1 + grid * grid
    hidden = torch.randn(frames, length, dim, generator=gen)
    q = torch.randn(frames, length, width, generator=gen)
    k = torch.randn(frames, length, width, generator=gen)
    empty = hidden.new_empty(0)
    return ClipFrameFeatures(hidden, empty, empty, empty, None, penultimate_q=q, penultimate_k=k, num_heads=heads)


def frame_slice(features: ClipFrameFeatures, f: int) -> ClipFrameFeatures:
    return ClipFrameFeatures(
        features.hidden[f : f + 1], features.q, features.k, features.v, None,
        penultimate_q=features.penultimate_q[f : f + 1], penultimate_k=features.penultimate_k[f : f + 1],
        num_heads=features.num_heads,
    )


def cell_patches(cell: int, grid: int = 4) -> list[int]:
    """The 4 patch indices of a pooled cell on a ``grid`` x ``grid`` patch grid."""
    r, c = divmod(cell, grid // 2)
    return [(2 * r + dr) * grid + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]


# --------------------------------------------------------------------------------------------------
# independent, loop-based transcriptions of the two algorithms (from the notes, not the batched code)


def naive_visionzip(scores: torch.Tensor, keys: torch.Tensor, keep: int, ratio: float):
    """One frame: scores [T], keys [T, dk] -> (indices list, weights [K, T] float64)."""
    units = scores.shape[0]
    s = scores.tolist()
    d = min(keep, max(1, math.floor(keep * ratio + 0.5)))
    c = keep - d
    dom = sorted(sorted(range(units), key=lambda u: (-s[u], u))[:d])
    weights = torch.zeros(keep, units, dtype=torch.float64)
    for row, u in enumerate(dom):
        weights[row, u] = 1.0
    if c == 0:
        return dom, weights
    filtered = [u for u in range(units) if u not in set(dom)]
    step = max(1, len(filtered) // c)
    tpos = list(range(0, len(filtered), step))[:c]
    targets = [filtered[p] for p in tpos]
    merge = [filtered[p] for p in range(len(filtered)) if p not in set(tpos)]
    kn = F.normalize(keys.double(), dim=-1)
    cosm = (kn @ kn.T).tolist()
    groups = {j: [] for j in range(c)}
    for u in merge:
        cos = [cosm[u][t] for t in targets]
        groups[cos.index(max(cos))].append(u)
    for j, t in enumerate(targets):
        weights[d + j, t] = 1.0
        for u in groups[j]:
            weights[d + j, u] += 1.0 / len(groups[j])
    return dom + targets, weights


def naive_vispruner(scores: torch.Tensor, feats: torch.Tensor, keep: int, ratio: float) -> list[int]:
    """One frame: scores [T], feats [T, D] -> kept units, ascending."""
    s = scores.tolist()
    n_imp = int(keep * ratio)
    n_div = keep - n_imp
    order = sorted(range(len(s)), key=lambda u: (-s[u], u))
    important, residual = order[:n_imp], order[n_imp:]
    fn = F.normalize(feats.double(), dim=-1)
    gram = fn @ fn.T
    while n_div > 0:
        r = min(8, len(residual) - n_div)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        dup = gram[a][:, b].max(dim=1).values.tolist()
        ranked = sorted(range(len(a)), key=lambda i: -dup[i])  # Python's sort is stable
        residual = [a[i] for i in ranked[min(r, len(a)) :]] + b
    return sorted(important + (residual if n_div > 0 else []))


# --------------------------------------------------------------------------------------------------
# the hooked layer -2 attention is CLIP's eager attention map


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=258,
                bos_token_id=256, eos_token_id=257, pad_token_id=257)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                  patch_size=14)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
        with torch.no_grad():
            layer = model.vision_model.encoder.layers[-2]
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(4.0)  # sharpen the attention so that the rankings are far from uniform
                proj.bias.normal_(0, 0.5)
            layer.layer_norm1.weight.uniform_(0.5, 1.5)
            layer.layer_norm1.bias.normal_(0, 0.5)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_outputs(tiny_clip):
    frames = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    feats = ClipFeatureExtractor(tiny_clip).encode_frames(frames, with_scores=False, with_penultimate=True)
    with torch.no_grad():
        out = tiny_clip.vision_model(pixel_values=frames, output_attentions=True, output_hidden_states=True)
    return feats, out


class TestHookedAttentionEqualsEager:
    def test_cls_attention_equals_attentions_minus_two(self, tiny_outputs):
        feats, out = tiny_outputs
        assert out.attentions[-2].shape == (3, 4, 17, 17)
        ours = cls_attention(feats.penultimate_q, feats.penultimate_k, feats.num_heads)
        torch.testing.assert_close(ours, out.attentions[-2][:, :, 0], atol=1e-6, rtol=1e-5)
        # and it is not the last layer's map (the hooks sit on layers[-2])
        assert not torch.allclose(ours, out.attentions[-1][:, :, 0], atol=1e-3)

    def test_head_mean_keys_are_layer_minus_two_keys(self, tiny_clip, tiny_outputs):
        feats, out = tiny_outputs
        layer = tiny_clip.vision_model.encoder.layers[-2]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))  # input of layers[-2]
        expected = keys.view(3, 17, 4, 8).mean(dim=2)
        torch.testing.assert_close(head_mean_keys(feats.penultimate_k, 4), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(feats.hidden, out.hidden_states[-2])  # output of that same layer

    def test_methods_on_eager_maps(self, tiny_outputs):
        feats, out = tiny_outputs
        attn = out.attentions[-2][:, :, 0, 1:]  # [F, H, 16]
        zip_sel = get_method("visionzip", dominant_ratio=0.5).select(feats, None, 8, "patch")
        top = attn.sum(dim=1).topk(4, dim=1).indices.sort(dim=1).values
        assert torch.equal(zip_sel.indices[:, :4], top)
        vis_sel = get_method("vispruner", important_ratio=1.0).select(feats, None, 5, "patch")
        assert torch.equal(vis_sel.indices, attn.mean(dim=1).topk(5, dim=1).indices.sort(dim=1).values)


# --------------------------------------------------------------------------------------------------
# VisionZip


class TestVisionZipSplit:
    @pytest.mark.parametrize(
        "keep, expected",
        [(1, (1, 0)), (2, (2, 0)), (3, (3, 0)), (4, (3, 1)), (16, (14, 2)), (48, (41, 7)), (64, (54, 10)),
         (81, (68, 13)), (128, (108, 20)), (192, (162, 30)), (196, (165, 31)), (576, (486, 90))],
    )
    def test_default_split(self, keep, expected):
        assert split_budget(keep) == expected

    def test_ratio_extremes(self):
        assert split_budget(10, 0.0) == (1, 9)
        assert split_budget(10, 1.0) == (10, 0)
        assert split_budget(10, 0.5) == (5, 5)

    @pytest.mark.parametrize("ratio", [-0.1, 1.5, "half", True])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ConfigError):
            get_method("visionzip", dominant_ratio=ratio)


# 4x4 grid, ratio 0.5, budget 6: dominant = the 3 highest logits {2, 5, 10}; the filtered list is
# [0, 1, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 15] (Nf = 13), step 13 // 3 = 4, target positions 0, 4, 8
# -> target units 0, 6, 11. Keys: targets (1,0), (0,1), (-1,0); unit 11 attracts nobody.
ZIP_LOGITS = [0, 0, 5, 0, 0, 4, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0]
ZIP_KEYS = {
    0: (1, 0), 6: (0, 1), 11: (-1, 0),  # targets
    1: (1, 0.1), 3: (0.1, 1), 4: (1, 1),  # 4 is a tie between targets 0 and 6 -> first target (0)
    7: (2, -0.5), 8: (0.3, 1), 9: (0.2, 2), 12: (1, 0.2), 13: (0, 3), 14: (0.5, 1), 15: (3, 0),
    2: (-1, 0), 5: (-1, 0), 10: (-1, 0),  # dominant units, would all go to target 11 if they were merged
}
# cos to (1,0) vs (0,1) vs (-1,0): 1 -> 0; 3 -> 6; 4 -> tie 0/6 -> 0; 7 -> 0; 8 -> 6; 9 -> 6; 12 -> 0;
# 13 -> 6; 14 -> 6; 15 -> 0.  Target 0 gets {1, 4, 7, 12, 15} (n=5), target 6 gets {3, 8, 9, 13, 14} (n=5).


def zip_crafted():
    keys = torch.tensor([ZIP_KEYS[u] for u in range(16)], dtype=torch.float32)
    hidden = torch.arange(16 * 3, dtype=torch.float32).view(16, 3) ** 1.5
    return crafted(ZIP_LOGITS, keys, hidden), hidden


class TestVisionZipHand:
    def test_indices_and_weights(self):
        feats, hidden = zip_crafted()
        sel = get_method("visionzip", dominant_ratio=0.5).select(feats, None, 6, "patch")
        assert sel.indices.tolist() == [[2, 5, 10, 0, 6, 11]]
        assert sel.unit == "patch" and sel.grid == 4 and sel.kept_per_frame == 6
        expected = torch.zeros(6, 16)
        expected[0, 2] = expected[1, 5] = expected[2, 10] = 1.0
        expected[3, 0] = expected[4, 6] = expected[5, 11] = 1.0
        for u in (1, 4, 7, 12, 15):
            expected[3, u] = 0.2
        for u in (3, 8, 9, 13, 14):
            expected[4, u] = 0.2
        assert sel.merge_weights.dtype == torch.float32 and sel.merge_weights.shape == (1, 6, 16)
        torch.testing.assert_close(sel.merge_weights[0], expected)
        assert sel.merged.tolist() == [[False, False, False, True, True, False]]
        assert not sel.similarity_aware.any()

    def test_merged_features_add_target_to_mean(self):
        feats, hidden = zip_crafted()
        sel = get_method("visionzip", dominant_ratio=0.5).select(feats, None, 6, "patch")
        ctx0 = hidden[0] + hidden[[1, 4, 7, 12, 15]].mean(0)
        ctx6 = hidden[6] + hidden[[3, 8, 9, 13, 14]].mean(0)
        expected = torch.stack([hidden[2], hidden[5], hidden[10], ctx0, ctx6, hidden[11]])
        torch.testing.assert_close(sel.merged_features[0], expected)
        torch.testing.assert_close(sel.gather(hidden.unsqueeze(0)), sel.merged_features)

    def test_dominant_ties_take_lower_index(self):
        logits = [0.0] * 16
        for u in (9, 3, 12):
            logits[u] = 2.0
        feats = crafted(logits, torch.randn(16, 2), torch.randn(16, 3))
        sel = get_method("visionzip", dominant_ratio=1.0).select(feats, None, 2, "patch")
        assert sel.indices.tolist() == [[3, 9]]
        sel = get_method("visionzip", dominant_ratio=1.0).select(feats, None, 4, "patch")
        assert sel.indices.tolist() == [[0, 3, 9, 12]]  # then the lowest index among the zero logits

    def test_budget_one_keeps_the_top_unit(self):
        feats, _ = zip_crafted()
        sel = get_method("visionzip").select(feats, None, 1, "patch")
        assert sel.indices.tolist() == [[2]]
        assert sel.merge_weights[0, 0].nonzero().flatten().tolist() == [2]

    def test_keep_all_is_a_permutation(self):
        feats, hidden = zip_crafted()
        sel = get_method("visionzip").select(feats, None, 576, "patch")
        assert sorted(sel.indices[0].tolist()) == list(range(16))
        assert torch.equal(sel.merge_weights[0], F.one_hot(sel.indices[0], 16).float())
        torch.testing.assert_close(sel.merged_features[0], hidden[sel.indices[0]])

    def test_pooled_hand(self):
        # cells on the 2x2 cell grid: cell 1 strongest, then cell 3 -> dominant [1, 3] (ratio 0.5, 3 cells);
        # filtered [0, 2], step 2 -> target cell 0, cell 2 merged into it.
        logits = [0.0] * 16
        for p in cell_patches(1):
            logits[p] = 5.0
        for p in cell_patches(3):
            logits[p] = 3.0
        hidden = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))
        feats = crafted(logits, torch.randn(16, 2), hidden)
        sel = get_method("visionzip", dominant_ratio=0.5).select(feats, None, 12, "pooled")
        assert (sel.unit, sel.grid) == ("cell", 2)
        assert sel.indices.tolist() == [[1, 3, 0]]
        torch.testing.assert_close(sel.merge_weights[0], torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0]]))
        cells = torch.stack([hidden[cell_patches(c)].mean(0) for c in range(4)])
        torch.testing.assert_close(sel.merged_features[0], torch.stack([cells[1], cells[3], cells[0] + cells[2]]))

    def test_weights_function_direct(self):
        # T = 5 units, keep 4 with ratio 0.5: dominant {3, 4}; filtered [0, 1, 2], step 3 // 2 = 1,
        # targets positions 0, 1 -> units 0, 1; unit 2 goes to the more similar of them (unit 1).
        scores = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.8]])
        keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [5.0, 5.0], [1.0, 1.0]]])
        idx, w = visionzip_weights(scores, keys, 4, 0.5)
        assert idx.tolist() == [[3, 4, 0, 1]]
        torch.testing.assert_close(
            w[0], torch.tensor([[0.0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 1, 0, 0]])
        )


# --------------------------------------------------------------------------------------------------
# VisPruner


def hand_gram(pairs: dict[tuple[int, int], float], units: int = 8) -> torch.Tensor:
    gram = torch.eye(units)
    for (i, j), value in pairs.items():
        gram[i, j] = gram[j, i] = value
    return gram.unsqueeze(0)


GRAM = hand_gram({(3, 1): 0.9, (4, 0): 0.5, (5, 2): 0.7, (7, 6): 0.1, (1, 6): 0.3, (2, 0): 0.2})


class TestVisPrunerDuplicateRemoval:
    def test_two_rounds_by_hand(self):
        # R=8, drop 2: A=[3,4,5,7] scores .9 .5 .7 .1, B=[1,0,2,6]; drop 3, 5 -> [4, 7, 1, 0, 2, 6].
        # R=6, drop 2: A=[4,1,2] scores .5 .3 .2, B=[7,0,6]; drop 4, 1 -> [2, 7, 0, 6]; R=4 = count: stop.
        residual = torch.tensor([[3, 1, 4, 0, 5, 2, 7, 6]])
        assert remove_duplicates(GRAM, residual, 4, max_drop=2).tolist() == [[2, 7, 0, 6]]

    def test_third_round_tie_drops_the_earlier_position(self):
        # R=4, drop 1: A=[2,0] both score 0 against B=[7,6]: the earlier list position (2) is dropped.
        residual = torch.tensor([[3, 1, 4, 0, 5, 2, 7, 6]])
        assert remove_duplicates(GRAM, residual, 3, max_drop=2).tolist() == [[0, 7, 6]]

    def test_odd_lengths(self):
        # R=7: A=[3,4,5,7] (.9 .5 .7 0) vs B=[1,0,2] -> drop 3, 5 -> [4, 7, 1, 0, 2]
        # R=5: A=[4,1,2] (.5 0 .2) vs B=[7,0] -> drop 4, 2 -> [1, 7, 0]
        # R=3: A=[1,0] (0 0) vs B=[7] -> drop 1 (tie, earlier position) -> [0, 7]
        residual = torch.tensor([[3, 1, 4, 0, 5, 2, 7]])
        assert remove_duplicates(GRAM, residual, 2, max_drop=2).tolist() == [[0, 7]]

    def test_drop_capped_at_a(self):
        # default max 8: R=8, count 4 -> drop min(8, 4) = 4 = |A|: all of A goes, B stays in order.
        residual = torch.tensor([[3, 1, 4, 0, 5, 2, 7, 6]])
        assert remove_duplicates(GRAM, residual, 4).tolist() == [[1, 0, 2, 6]]
        # count 1: drop 7 > |A| = 4 -> A goes (4 dropped), then [1,0,2,6] -> [0, 6] ... -> 1 unit left
        out = remove_duplicates(GRAM, residual, 1)
        assert out.shape == (1, 1)
        # R=4 [1,0,2,6]: drop min(8,3)=3 > |A|=2: A=[1,2] dropped -> [0, 6]; R=2: A=[0] dropped -> [6]
        assert out.tolist() == [[6]]

    def test_count_zero_or_reached_leaves_list(self):
        residual = torch.tensor([[3, 1, 4, 0]])
        assert remove_duplicates(GRAM, residual, 0).tolist() == [[3, 1, 4, 0]]
        assert remove_duplicates(GRAM, residual, 4).tolist() == [[3, 1, 4, 0]]

    def test_batched_frames_are_independent(self):
        g2 = hand_gram({(0, 1): 0.8, (2, 3): 0.4, (5, 6): 0.6})
        r1 = torch.tensor([[3, 1, 4, 0, 5, 2, 7, 6]])
        r2 = torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0]])
        both = remove_duplicates(torch.cat([GRAM, g2]), torch.cat([r1, r2]), 3, max_drop=2)
        assert both[0].tolist() == remove_duplicates(GRAM, r1, 3, max_drop=2)[0].tolist()
        assert both[1].tolist() == remove_duplicates(g2, r2, 3, max_drop=2)[0].tolist()


class TestVisPrunerHand:
    def test_mask_by_hand(self):
        # order by score: 1, 3, 6, 4, 2, 0, 5, 7. keep 3, ratio 1/3 -> important {1}; residual
        # [3, 6, 4, 2, 0, 5, 7] (R=7, odd): drop min(8, 5)=5 > |A|=4 -> A=[3,4,0,7] dropped -> [6, 2, 5];
        # R=3, drop 1: A=[6,5] vs B=[2]: cos(6,2)=0.6, cos(5,2)=0 -> 6 dropped -> [5, 2]. Kept {1, 2, 5}.
        scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.4, 0.01]])
        feats = torch.eye(8)
        feats[6] = 0.6 * feats[2] + 0.8 * feats[6]
        mask = vispruner_mask(scores, feats.unsqueeze(0) * 3.0, 3, 1 / 3)
        assert mask.nonzero()[:, 1].tolist() == [1, 2, 5]

    def test_select_patch_hand(self):
        # 4x4 grid, ratio 0 -> all 12 kept tokens are diverse; logits fall with the index, so the residual
        # starts as [0, 1, ..., 15]. R=16, drop min(8, 4) = 4 of A = [0, 2, ..., 14] against B = [1, ..., 15]:
        # scores 2: 1.0 (copy of 7), 8: 0.9 (vs 9), 12: 0.5 (vs 1), 14: 0.3 (vs 15), 0: 0.2 (vs 3), others 0.
        # Drop 2, 8, 12, 14 -> [0, 4, 6, 10, 1, 3, ..., 15]: R = 12 = K. Kept: odd units + {0, 4, 6, 10}.
        logits = [(16 - u) / 4 for u in range(16)]
        hidden = torch.eye(16)
        for a, b, c in ((2, 7, 1.0), (8, 9, 0.9), (12, 1, 0.5), (14, 15, 0.3), (0, 3, 0.2)):
            hidden[a] = c * torch.eye(16)[b] + math.sqrt(1 - c * c) * torch.eye(16)[a]
        feats = crafted(logits, torch.randn(16, 2), hidden)
        sel = get_method("vispruner", important_ratio=0.0).select(feats, None, 12, "patch")
        assert sel.indices.tolist() == [[0, 1, 3, 4, 5, 6, 7, 9, 10, 11, 13, 15]]
        assert sel.merge_weights is None and sel.merged_features is None
        assert (sel.unit, sel.grid) == ("patch", 4) and not sel.similarity_aware.any()
        # ratio 0.5 keeps the 6 strongest (0..5) and 6 diverse ones from [6, ..., 15]: R=10, drop 4 of
        # A = [6, 8, 10, 12, 14] vs B = [7, 9, 11, 13, 15]; scores 0, .9, 0, 0 (unit 1 is not in B), .3:
        # drop 8, 14, then the ties 6, 10 (earlier positions first) -> [12, 7, 9, 11, 13, 15].
        sel = get_method("vispruner").select(feats, None, 12, "patch")
        assert sel.indices.tolist() == [[0, 1, 2, 3, 4, 5, 7, 9, 11, 12, 13, 15]]

    def test_duplicates_removed_hand(self):
        # T=16 but only 4 to keep, all diverse (ratio 0): residual is the full score order. Units 0..7
        # form duplicate pairs in the list so that each A element meets its copy in B; diverse result keeps
        # one of each pair.
        scores = torch.linspace(1.0, 0.0, 16).unsqueeze(0)  # order 0, 1, ..., 15
        feats = torch.eye(16)
        for a in range(0, 16, 2):
            feats[a] = feats[a + 1]  # A element (even position) duplicates the next B element
        # Round 1: R=16, drop 8 = |A|: every even unit (all duplicates, score 1) goes -> [1, 3, ..., 15]
        # Round 2: R=8, drop 4: A=[1,5,9,13] all score 0 (tie) -> all dropped -> [3, 7, 11, 15]
        mask = vispruner_mask(scores, feats.unsqueeze(0), 4, 0.0)
        assert mask.nonzero()[:, 1].tolist() == [3, 7, 11, 15]

    def test_pooled_hand(self):
        # 4 cells; budget 12 -> 3 cells, ratio 0.5 -> int(1.5) = 1 important (cell 2, the strongest); the
        # residual is cell 0 (3.0), cell 3 (1.0), cell 1 (0.0): R=3, drop 1 of A=[0, 1] against B=[3];
        # cell 0's mean feature is parallel to cell 3's (cos 1), cell 1's is orthogonal -> cell 0 goes.
        logits = [0.0] * 16
        for cell, value in ((2, 5.0), (0, 3.0), (3, 1.0)):
            for p in cell_patches(cell):
                logits[p] = value
        hidden = torch.zeros(16, 3)
        for cell, vec in ((0, (1.0, 0, 0)), (3, (2.0, 0, 0)), (1, (0, 1.0, 0)), (2, (0, 0, 1.0))):
            hidden[cell_patches(cell)] = torch.tensor(vec)
        feats = crafted(logits, torch.randn(16, 2), hidden)
        sel = get_method("vispruner").select(feats, None, 12, "pooled")
        assert (sel.unit, sel.grid) == ("cell", 2)
        assert sel.indices.tolist() == [[1, 2, 3]]

    @pytest.mark.parametrize("ratio", [-0.5, 2.0, None])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ConfigError):
            get_method("vispruner", important_ratio=ratio)


# --------------------------------------------------------------------------------------------------
# both methods, full size


@pytest.fixture(scope="module")
def full():
    return random_features(frames=2, grid=24, seed=11)


BUDGETS = [1, 2, 7, 64, 81, 196, 333, 576]


class TestFullSize:
    @pytest.mark.parametrize("name", ["visionzip", "vispruner"])
    @pytest.mark.parametrize("placement", ["patch", "pooled"])
    def test_k_equals_keep(self, full, name, placement):
        method = get_method(name)
        for budget in BUDGETS:
            _, _, keep = unit_layout(full, placement, budget)
            sel = method.select(full, None, budget, placement)
            units = 576 if placement == "patch" else 144
            assert sel.indices.shape == (2, keep) and sel.indices.dtype == torch.int64
            assert sel.similarity_aware.shape == (2, keep) and not sel.similarity_aware.any()
            for row in sel.indices.tolist():
                assert len(set(row)) == keep and all(0 <= u < units for u in row)
            if name == "vispruner":
                assert torch.equal(sel.indices, sel.indices.sort(dim=1).values)
            else:
                assert sel.merge_weights.shape == (2, keep, units)
                assert sel.merged_features.shape == (2, keep, 12)
                per_unit = (sel.merge_weights != 0).sum(dim=1)
                if split_budget(keep)[1] > 0:
                    assert torch.equal(per_unit, torch.ones_like(per_unit))  # every unit used exactly once
                sums = sel.merge_weights.sum(dim=-1)
                assert torch.all(((sums - 1).abs() < 1e-5) | ((sums - 2).abs() < 1e-5))

    @pytest.mark.parametrize("placement", ["patch", "pooled"])
    @pytest.mark.parametrize("budget", [1, 81, 196, 576])
    def test_visionzip_matches_loop_reference(self, full, placement, budget):
        sel = get_method("visionzip").select(full, None, budget, placement)
        scores = to_units(cls_attention(full.penultimate_q, full.penultimate_k, 2)[:, :, 1:].sum(1), 24, placement, "sum")
        keys = to_units(head_mean_keys(full.penultimate_k, 2)[:, 1:], 24, placement, "mean")
        hidden = to_units(full.hidden[:, 1:], 24, placement, "mean")
        for f in range(2):
            idx, w = naive_visionzip(scores[f], keys[f], sel.kept_per_frame, 54 / 64)
            assert sel.indices[f].tolist() == idx
            torch.testing.assert_close(sel.merge_weights[f].double(), w)
            torch.testing.assert_close(sel.merged_features[f], (w @ hidden[f].double()).float(), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("placement", ["patch", "pooled"])
    @pytest.mark.parametrize("budget, ratio", [(1, 0.5), (64, 0.75), (81, 0.5), (196, 0.75), (333, 0.5), (576, 0.5)])
    def test_vispruner_matches_loop_reference(self, full, placement, budget, ratio):
        sel = get_method("vispruner", important_ratio=ratio).select(full, None, budget, placement)
        scores = to_units(cls_attention(full.penultimate_q, full.penultimate_k, 2)[:, :, 1:].mean(1), 24, placement, "sum")
        feats = to_units(full.hidden[:, 1:], 24, placement, "mean")
        for f in range(2):
            assert sel.indices[f].tolist() == naive_vispruner(scores[f], feats[f], sel.kept_per_frame, ratio)

    @pytest.mark.parametrize("name", ["visionzip", "vispruner"])
    @pytest.mark.parametrize("placement", ["patch", "pooled"])
    def test_batched_equals_per_frame_and_deterministic(self, full, name, placement):
        method = get_method(name)
        for budget in (1, 81, 196):
            sel = method.select(full, None, budget, placement)
            again = method.select(full, None, budget, placement)
            assert torch.equal(sel.indices, again.indices)
            for f in range(2):
                one = method.select(frame_slice(full, f), None, budget, placement)
                assert torch.equal(one.indices[0], sel.indices[f])
                if name == "visionzip":
                    assert torch.equal(one.merge_weights[0], sel.merge_weights[f])
                    torch.testing.assert_close(one.merged_features[0], sel.merged_features[f])

    def test_keep_all_patches(self, full):
        sel = get_method("vispruner").select(full, None, 576, "patch")
        assert sel.indices.tolist() == [list(range(576))] * 2
        sel = get_method("visionzip").select(full, None, 576, "patch")
        assert torch.equal(sel.merge_weights, F.one_hot(sel.indices, 576).float())


class TestRegistration:
    @pytest.mark.parametrize("name", ["visionzip", "vispruner"])
    def test_flags(self, name):
        method = get_method(name)
        assert method.name == name and method.needs_penultimate
        assert not method.needs_text and not method.needs_scores and method.stage == "encoder"

    def test_defaults(self):
        assert get_method("visionzip").dominant_ratio == 54 / 64
        assert get_method("vispruner").important_ratio == 0.5

    @pytest.mark.parametrize("name", ["visionzip", "vispruner"])
    def test_errors(self, name, full):
        bare = ClipFrameFeatures(full.hidden, full.q, full.k, full.v, None)
        with pytest.raises(ValueError, match="with_penultimate"):
            get_method(name).select(bare, None, 64, "patch")
        with pytest.raises(ConfigError):
            get_method(name).select(full, None, 64, "cells")
        with pytest.raises(ValueError):
            get_method(name).select(full, None, 0, "patch")
