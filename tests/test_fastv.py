"""FastV inside the LLM (pruning.methods.fastv, workers.videoglamm ``fastv=``, the pipeline hook).

Checks against independent computations: the unpruned model (keep = every token), layer K-1's attention
from an eager copy with ``output_attentions``, a reference that runs layers K.. of a copy of the model on
the shortened sequence with explicit (gapped) position ids and an explicit mask, and decoding without a
cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning.clip_features import ClipFrameFeatures
from pruning.methods.fastv import FastV, FastVSettings, fastv_decode_step, fastv_prefill
from pruning.registry import available_methods, get_method
from refstream.config import load_model_config
from refstream.errors import ConfigError, SequenceTooLongError
from workers.build import build_model

ATOL = 1e-5
PREFIX, F, T, TAIL = 5, 3, 8, 12  # prompt before the image, frames, CLIP tokens per frame, tokens after
L = PREFIX + F * T + TAIL


# --------------------------------------------------------------------------- helpers
def small_llm(window: int | None):
    from transformers import Phi3Config, Phi3Model

    config = Phi3Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        sliding_window=window, initializer_range=0.2,  # sharp attention: positions and ranking matter
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return Phi3Model(config).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=[None, 20], ids=["no-window", "window20"])
def llm(request):
    return small_llm(request.param)


def batch_of(lengths, hidden=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.zeros(len(lengths), max(lengths), hidden)
    for i, n in enumerate(lengths):
        embeds[i, :n] = torch.randn(n, hidden, generator=gen)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return embeds, mask


def eager_attention(llm, embeds, mask, layer):
    """Layer ``layer``'s attention probabilities [B, heads, L, L] from an eager copy (output_attentions)."""
    eager = copy.deepcopy(llm)
    eager.set_attn_implementation("eager")
    return eager(inputs_embeds=embeds, attention_mask=mask, output_attentions=True).attentions[layer]


def topk_per_frame(scores, keep):
    """Per frame, the ``keep`` highest scores' units (ties: lower index), ascending."""
    kept = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:keep]
        kept.append(sorted(order))
    return torch.tensor(kept)


def rows_kept(kept_units, length, prefix=PREFIX, frames=F, units=T):
    rows = list(range(prefix))
    for f in range(frames):
        rows += [prefix + f * units + int(u) for u in kept_units[f]]
    return rows + list(range(prefix + frames * units, length))


def reference_pruned(llm, embeds, layer, rows):
    """Final-normed hidden states of the kept ``rows``: layers < K of the model itself on the full sequence
    (``hidden_states[K]``), then a copy holding only layers K.. (eager) on the gathered rows with
    ``position_ids = rows`` (gaps) and an explicit float mask (causal + window on original positions)."""
    hs = llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
    tail = copy.deepcopy(llm)
    tail.layers = nn.ModuleList(list(tail.layers)[layer:])
    tail.config.num_hidden_layers -= layer
    tail.set_attn_implementation("eager")
    window = llm.config.sliding_window
    n = len(rows)
    mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    for i in range(n):
        for j in range(n):
            if rows[j] <= rows[i] and (window is None or rows[j] > rows[i] - window):
                mask[0, 0, i, j] = 0.0
    out = tail(inputs_embeds=hs[:, rows], position_ids=torch.tensor([rows]), attention_mask=mask, use_cache=False)
    return out.last_hidden_state[0]


def features(frames=2, grid=24, width=8):
    hidden = torch.randn(frames, 1 + grid * grid, width)
    return ClipFrameFeatures(hidden=hidden, q=None, k=None, v=None, patch_embeds=None)


# --------------------------------------------------------------------------- the registered method
class TestMethod:
    def test_registered_as_llm_stage(self):
        assert "fastv" in available_methods()
        method = get_method("fastv")
        assert method.stage == "llm" and method.layer == 2 and method.query == "last"
        assert get_method("fastv", layer=3).layer == 3

    def test_pooled_select_sends_every_cell(self):
        sel = get_method("fastv").select(features(), None, 196, "pooled")
        assert sel.stage == "llm" and sel.unit == "cell" and sel.grid == 12
        assert torch.equal(sel.indices, torch.arange(144).expand(2, -1))
        assert not sel.similarity_aware.any()
        assert sel.fastv == FastVSettings(layer=2, keep=49, frames=2, units_per_frame=144, query="last")

    def test_patch_select_sends_every_patch(self):
        sel = get_method("fastv", layer=4).select(features(), None, 196, "patch")
        assert sel.unit == "patch" and sel.grid == 24 and sel.indices.shape == (2, 576)
        assert (sel.fastv.keep, sel.fastv.units_per_frame, sel.fastv.layer) == (196, 576, 4)
        assert get_method("fastv").select(features(), None, 1000, "patch").fastv.keep == 576

    def test_with_kept(self):
        sel = get_method("fastv").select(features(), None, 8, "pooled")
        kept = torch.tensor([[0, 5], [3, 143]])
        filled = sel.with_kept(kept)
        assert torch.equal(filled.indices, kept) and filled.kept_per_frame == 2 and filled.stage == "llm"
        assert filled.similarity_aware.shape == (2, 2) and sel.indices.shape == (2, 144)  # original untouched

    @pytest.mark.parametrize("layer", [0, -1, 1.5, True])
    def test_layer_zero_is_refused(self, layer):
        """K = 0: no attention exists before layer 0 (the original keeps a random subset: --method random)."""
        with pytest.raises(ConfigError, match="random"):
            get_method("fastv", layer=layer)

    def test_bad_query_and_option(self):
        with pytest.raises(ConfigError, match="query"):
            get_method("fastv", query="first")
        with pytest.raises(ConfigError, match="layer"):
            get_method("fastv", ratio=0.5)


# --------------------------------------------------------------------------- the LLM loop (small Phi-3)
class TestPrefill:
    LENGTHS = [L, L - 3, L + 4]

    @pytest.mark.parametrize("layer", [1, 2, 4])
    def test_keep_all_reproduces_the_unpruned_model(self, llm, layer):
        """keep = T: the manual layer loop, masks and position ids equal the model's own forward."""
        embeds, mask = batch_of(self.LENGTHS)
        expected = llm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        result = fastv_prefill(llm, embeds, self.LENGTHS, PREFIX, FastVSettings(layer, T, F, T))
        for b, n in enumerate(self.LENGTHS):
            assert torch.equal(result.kept_index[b, :n], torch.arange(n))
            torch.testing.assert_close(result.hidden[b, :n], expected[b, :n], atol=ATOL, rtol=0)
        assert result.layer_lengths == [[n] * 4 for n in self.LENGTHS]

    @pytest.mark.parametrize("layer", [1, 3])
    def test_ranking_is_layer_k_minus_1_attention_of_the_last_token(self, llm, layer):
        embeds, mask = batch_of(self.LENGTHS)
        result = fastv_prefill(llm, embeds, self.LENGTHS, PREFIX, FastVSettings(layer, 3, F, T))
        attn = eager_attention(llm, embeds, mask, layer - 1)
        assert llm.config._attn_implementation == "sdpa"  # the model itself was not switched to eager
        for b, n in enumerate(self.LENGTHS):
            row = attn[b, :, n - 1].mean(0)[PREFIX : PREFIX + F * T].reshape(F, T)
            torch.testing.assert_close(result.scores[b], row, atol=1e-6, rtol=0)
            assert torch.equal(result.kept_units[b], topk_per_frame(row, 3))

    def test_ranking_with_an_explicit_query_row(self, llm):
        embeds, mask = batch_of(self.LENGTHS)
        query = [n - 6 for n in self.LENGTHS]
        result = fastv_prefill(llm, embeds, self.LENGTHS, PREFIX, FastVSettings(2, 3, F, T), query_index=query)
        attn = eager_attention(llm, embeds, mask, 1)
        for b, q in enumerate(query):
            row = attn[b, :, q].mean(0)[PREFIX : PREFIX + F * T].reshape(F, T)
            torch.testing.assert_close(result.scores[b], row, atol=1e-6, rtol=0)
        last = fastv_prefill(llm, embeds, self.LENGTHS, PREFIX, FastVSettings(2, 3, F, T))
        assert not torch.allclose(last.scores, result.scores, atol=1e-4)

    @pytest.mark.parametrize("layer,keep", [(1, 3), (2, 1), (3, 5)])
    def test_pruned_run_equals_gapped_position_reference(self, llm, layer, keep):
        embeds, _ = batch_of(self.LENGTHS)
        result = fastv_prefill(llm, embeds, self.LENGTHS, PREFIX, FastVSettings(layer, keep, F, T))
        for b, n in enumerate(self.LENGTHS):
            rows = rows_kept(result.kept_units[b], n)
            assert result.kept_index[b, : len(rows)].tolist() == rows
            expected = reference_pruned(llm, embeds[b : b + 1, :n], layer, rows)
            torch.testing.assert_close(result.hidden[b, : len(rows)], expected, atol=ATOL, rtol=0)
        # the gaps matter: contiguous positions give something else
        b, n = 0, self.LENGTHS[0]
        rows = rows_kept(result.kept_units[b], n)
        hs = llm(inputs_embeds=embeds[:1, :n], output_hidden_states=True).hidden_states[layer][:, rows]
        tail = copy.deepcopy(llm)
        tail.layers = nn.ModuleList(list(tail.layers)[layer:])
        tail.config.num_hidden_layers -= layer
        contiguous = tail(inputs_embeds=hs, use_cache=False).last_hidden_state[0]
        assert (contiguous - result.hidden[0, : len(rows)]).abs().max() > 1e-3

    @pytest.mark.parametrize("keep", [1, 3, T])
    def test_per_frame_keep_counts_and_lengths(self, llm, keep):
        embeds, _ = batch_of(self.LENGTHS)
        result = fastv_prefill(llm, embeds, self.LENGTHS, PREFIX, FastVSettings(2, keep, F, T))
        assert result.kept_units.shape == (3, F, keep) and result.scores.shape == (3, F, T)
        for units in result.kept_units.reshape(-1, keep):
            assert units.unique().numel() == keep and torch.all(units.diff() > 0)
            assert 0 <= int(units.min()) and int(units.max()) < T
        dropped = F * (T - keep)
        assert result.layer_lengths == [[n, n] + [n - dropped] * 2 for n in self.LENGTHS]
        assert result.hidden.shape[1] == max(self.LENGTHS) - dropped
        for b, n in enumerate(self.LENGTHS):
            assert int((result.kept_index[b] >= 0).sum()) == n - dropped

    def test_each_sequence_ranks_with_its_own_last_token(self, llm):
        embeds, _ = batch_of(self.LENGTHS)
        settings = FastVSettings(2, 2, F, T)
        batch = fastv_prefill(llm, embeds, self.LENGTHS, PREFIX, settings)
        for b, n in enumerate(self.LENGTHS):
            alone = fastv_prefill(llm, embeds[b : b + 1, :n], [n], PREFIX, settings)
            assert torch.equal(alone.kept_units[0], batch.kept_units[b])
            k = n - settings.dropped
            torch.testing.assert_close(alone.hidden[0], batch.hidden[b, :k], atol=ATOL, rtol=0)
        assert not torch.equal(batch.kept_units[0], batch.kept_units[2])

    def test_layer_equal_to_depth_changes_nothing_and_beyond_raises(self, llm):
        embeds, mask = batch_of([L])
        result = fastv_prefill(llm, embeds, [L], PREFIX, FastVSettings(4, 1, F, T))
        expected = llm(inputs_embeds=embeds).last_hidden_state[0]
        rows = rows_kept(result.kept_units[0], L)
        torch.testing.assert_close(result.hidden[0], expected[rows], atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="1..4"):
            fastv_prefill(llm, embeds, [L], PREFIX, FastVSettings(5, 1, F, T))
        with pytest.raises(ValueError, match="keep"):
            fastv_prefill(llm, embeds, [L], PREFIX, FastVSettings(2, T + 1, F, T))


class TestDecode:
    @pytest.mark.parametrize("layer", [1, 3])
    def test_cached_decoding_equals_recomputation_with_the_same_kept_set(self, llm, layer):
        from transformers import DynamicCache

        window_llm = small_llm(12) if llm.config.sliding_window else llm  # a window that slides while decoding
        embeds, _ = batch_of([L])
        steps = torch.randn(6, 1, 1, 32, generator=torch.Generator().manual_seed(5))
        settings = FastVSettings(layer, 2, F, T)
        cache = DynamicCache()
        first, state = fastv_prefill(window_llm, embeds, [L], PREFIX, settings, cache=cache)
        kept = first.kept_units
        sequence = embeds
        for i, step in enumerate(steps):
            cached = fastv_decode_step(window_llm, step, state)[0, -1]
            sequence = torch.cat([sequence, step], dim=1)
            n = sequence.shape[1]
            again = fastv_prefill(window_llm, sequence, [n], PREFIX, settings, kept_units=kept)
            torch.testing.assert_close(cached, again.hidden[0, -1], atol=ATOL, rtol=0)
        # layers < K cache every token, layers >= K only the kept ones
        total = L + len(steps)
        for i, cached_layer in enumerate(cache.layers):
            expected = total if i < layer else total - settings.dropped
            assert cached_layer.keys.shape[-2] == expected
        assert state.next_position == total

    def test_reranking_differs_from_the_cached_kept_set_sometimes(self, llm):
        """Sanity of the check above: re-ranking from the newest token (the original's no-cache mode) can
        choose another set, so imposing the prefill's set is what makes the comparison exact."""
        embeds, _ = batch_of([L])
        steps = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(9))
        settings = FastVSettings(2, 2, F, T)
        a = fastv_prefill(llm, embeds, [L], PREFIX, settings)
        b = fastv_prefill(llm, torch.cat([embeds, steps], 1), [L + 4], PREFIX, settings)
        assert not torch.equal(a.scores, b.scores)


# --------------------------------------------------------------------------- VideoGLaMM (tiny preset)
EXPRESSIONS = ["the black swan", "a dog", "the person riding the bicycle on the far left side"]
VF, VT = 4, 9  # a small CLIP layout for the tiny model: 4 frames x 9 tokens, then 8 "InternVideo2" tokens


@pytest.fixture(scope="module")
def model():
    return build_model(load_model_config("tiny"))


@pytest.fixture(scope="module")
def visual(model):
    return torch.randn(VF * VT + 8, model.llm.config.hidden_size, generator=torch.Generator().manual_seed(7))


class TestVideoGLaMM:
    @pytest.mark.parametrize("layer", [1, 2])
    def test_keep_all_reproduces_unpruned_seg(self, model, visual, layer):
        base = model.seg_answers(visual, EXPRESSIONS)
        fast = model.seg_answers(visual, EXPRESSIONS, fastv=FastVSettings(layer, VT, VF, VT))
        for a, b in zip(base, fast):
            torch.testing.assert_close(b.embedding, a.embedding, atol=ATOL, rtol=0)
            assert b.layer_lengths == a.layer_lengths and b.fastv_kept.shape == (VF, VT)
        assert base[0].fastv_kept is None and len(set(base[0].layer_lengths)) == 1

    @pytest.mark.parametrize("query", ["last", "seg"])
    def test_pruned_seg_equals_reference(self, model, visual, query):
        settings = FastVSettings(1, 3, VF, VT, query)
        answers = model.seg_answers(visual, EXPRESSIONS, fastv=settings)
        embed = model.llm.get_input_embeddings()
        for answer, expression in zip(answers, EXPRESSIONS):
            prefix, suffix = model.prompt_ids(expression, model.config.forced_answer)
            seq = torch.cat([embed(torch.tensor(prefix)), visual, embed(torch.tensor(suffix))])[None]
            n = seq.shape[1]
            seg = len(prefix) + visual.shape[0] + suffix.index(model.seg_token_id) - 1
            q = n - 1 if query == "last" else seg
            attn = eager_attention(model.llm.model, seq, None, 0)[0, :, q].mean(0)
            ranked = attn[len(prefix) : len(prefix) + VF * VT].reshape(VF, VT)
            assert torch.equal(answer.fastv_kept, topk_per_frame(ranked, 3))
            rows = rows_kept(answer.fastv_kept, n, len(prefix), VF, VT)
            with torch.no_grad():
                hidden = reference_pruned(model.llm.model, seq, 1, rows)
                expected = model.text_hidden_fcs(hidden[rows.index(seg)])
            torch.testing.assert_close(answer.embedding, expected, atol=ATOL, rtol=0)
            assert answer.layer_lengths == [n, n - VF * (VT - 3)]
        base = model.seg_answers(visual, EXPRESSIONS[:1])[0].embedding
        assert not torch.allclose(answers[0].embedding, base, atol=1e-4)

    def test_generate_keep_all_equals_unpruned_generate(self, model, visual):
        [a] = model.seg_answers(visual, ["the black swan"], mode="generate")
        [b] = model.seg_answers(visual, ["the black swan"], mode="generate", fastv=FastVSettings(1, VT, VF, VT))
        assert a.text == b.text and len(a.text) > 0
        assert (a.embedding is None) == (b.embedding is None)

    def test_generate_pruned_equals_recomputation(self, model, visual):
        settings = FastVSettings(1, 2, VF, VT)
        picked = []
        handle = model.llm.lm_head.register_forward_hook(lambda _m, _i, out: picked.append(int(out.argmax())))
        try:
            [answer] = model.seg_answers(visual, ["a dog"], mode="generate", fastv=settings)
        finally:
            handle.remove()
        prefix, suffix = model.prompt_ids("a dog")
        embed = model.llm.get_input_embeddings()
        seq = torch.cat([embed(torch.tensor(prefix)), visual, embed(torch.tensor(suffix))])[None]
        n0 = seq.shape[1]
        expected = []
        with torch.no_grad():
            for _ in range(len(picked)):
                n = seq.shape[1]
                out = fastv_prefill(model.llm.model, seq, [n], len(prefix), settings, kept_units=answer.fastv_kept[None])
                token = int(model.llm.lm_head(out.hidden[0, -1]).argmax())
                expected.append(token)
                seq = torch.cat([seq, embed(torch.tensor([[token]]))], dim=1)
        assert len(picked) >= 2 and picked == expected
        assert answer.layer_lengths == [n0, n0 - VF * (VT - 2)]

    def test_patch_placement_with_16_frames_is_too_long(self, model):
        sel = get_method("fastv").select(features(frames=16), None, 196, "patch")
        visual = torch.zeros(16 * 576 + 16 * 64, model.llm.config.hidden_size)
        with pytest.raises(SequenceTooLongError, match="placement pooled"):
            model.seg_answers(visual, ["a dog"], fastv=sel.fastv)

    def test_bad_settings(self, model, visual):
        with pytest.raises(ValueError, match="1..2"):
            model.seg_answers(visual, ["a dog"], fastv=FastVSettings(3, 2, VF, VT))
        with pytest.raises(ValueError, match="CLIP tokens"):
            model.seg_answers(visual, ["a dog"], fastv=FastVSettings(1, 2, 16, 144))


# --------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipeline():
    from refstream.pipeline import Pipeline

    return Pipeline(load_model_config("tiny"), "cpu")


def test_pipeline_runs_fastv_on_blackswan(pipeline, blackswan_dir, tmp_path, monkeypatch):
    from refstream.pipeline import RunOptions, run_to_folder

    monkeypatch.setattr(FastV, "options", {"layer": 1, "query": "last"})  # the tiny LLM has 2 layers
    options = RunOptions(expressions=["the black swan", "the water"], model="tiny", method="fastv", max_frames=4)
    result = pipeline.run(blackswan_dir, options, progress=False)
    assert len(result.masks) == 2 and all(len(m) == 4 for m in result.masks)
    assert result.pruning["kept_per_frame"] == 49 and result.pruning["unit"] == "cell"
    assert result.visual_tokens == 16 * 144 + 16 * 64  # every CLIP token enters the LLM
    full = result.llm_sequence_length
    lengths = result.pruning["llm_layer_lengths"]
    assert lengths[0][0] == full and lengths[0][1] == full - 16 * (144 - 49)
    assert len(lengths) == 2 and lengths[1][1] == lengths[1][0] - 16 * 95
    indices, sim_aware, grid = result.tokens_selection
    assert grid == 12 and len(indices) == 49 and (indices[1:] > indices[:-1]).all() and not sim_aware.any()

    summary = run_to_folder(blackswan_dir, options, tmp_path, progress=False, pipeline=pipeline)
    assert summary["pruning"]["method"] == "fastv" and summary["pruning"]["kept_per_frame"] == 49
    assert (tmp_path / "tokens.png").is_file()
