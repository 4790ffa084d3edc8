"""VideoGLaMM (workers.videoglamm) and its builder (workers.build) on the tiny random-weight preset."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from refstream.config import load_model_config
from refstream.errors import ExpressionError, SequenceTooLongError, WeightsNotFoundError
from workers.build import build_model, missing_weights, resolve_checkpoint
from workers.videoglamm import VideoGLaMM, pool_grid

ATOL = 1e-5
SEG_ID = 264


@pytest.fixture(scope="module")
def model() -> VideoGLaMM:
    return build_model(load_model_config("tiny"))


@pytest.fixture(scope="module")
def visual(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(40, model.llm.config.hidden_size, generator=gen)


def prompt_embeds(model, prefix, visual, suffix):
    embed = model.llm.get_input_embeddings()
    return torch.cat([embed(torch.tensor(prefix)), visual, embed(torch.tensor(suffix))])


def stop_ids(model):
    tok = model.llm_tokenizer
    return {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}


def greedy_without_cache(model, visual, expression):
    """Greedy decoding recomputing the whole sequence each step; returns (tokens incl. the stop token, hiddens)."""
    prefix, suffix = model.prompt_ids(expression)
    embed = model.llm.get_input_embeddings()
    seq = prompt_embeds(model, prefix, visual, suffix)
    tokens, hiddens = [], []
    with torch.no_grad():
        for _ in range(model.config.max_new_tokens):
            last = model.llm.model(inputs_embeds=seq[None], use_cache=False).last_hidden_state[0, -1]
            token = int(model.llm.lm_head(last).argmax())
            tokens.append(token)
            hiddens.append(last)
            if token in stop_ids(model):
                break
            seq = torch.cat([seq, embed(torch.tensor([token]))])
    return tokens, hiddens


# --------------------------------------------------------------------------- pool_grid
class TestPoolGrid:
    def test_4x4_to_2x2_by_hand(self):
        grid = torch.arange(16, dtype=torch.float32)
        tokens = torch.stack([grid, 100 * grid], dim=-1)[None]  # [1, 16, 2], row-major
        out = pool_grid(tokens, 2)
        assert out.shape == (1, 4, 2)
        expected = torch.tensor([[2.5, 4.5, 10.5, 12.5]])
        torch.testing.assert_close(out[..., 0], expected)
        torch.testing.assert_close(out[..., 1], 100 * expected)

    def test_matches_adaptive_avg_pool2d_on_uneven_grid(self):
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randn(3, 25, 4, generator=gen)  # 5x5 -> 3x3 (overlapping adaptive windows)
        out = pool_grid(tokens, 3)
        expected = F.adaptive_avg_pool2d(tokens.reshape(3, 5, 5, 4).permute(0, 3, 1, 2), 3)
        torch.testing.assert_close(out, expected.permute(0, 2, 3, 1).reshape(3, 9, 4))
        # first cell covers rows 0-1, cols 0-1
        torch.testing.assert_close(out[:, 0], tokens.reshape(3, 5, 5, 4)[:, :2, :2].mean(dim=(1, 2)))

    def test_24_to_12_block_means(self):
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randn(2, 576, 3, generator=gen)
        expected = tokens.reshape(2, 12, 2, 12, 2, 3).mean(dim=(2, 4)).reshape(2, 144, 3)
        torch.testing.assert_close(pool_grid(tokens, 12), expected)

    def test_non_square_raises(self):
        with pytest.raises(ValueError, match="square"):
            pool_grid(torch.zeros(1, 15, 2), 2)


# --------------------------------------------------------------------------- clip_tokens
class TestClipTokens:
    @pytest.fixture(scope="class")
    @classmethod
    def hidden(cls, model):
        gen = torch.Generator().manual_seed(2)
        return torch.randn(3, 577, model.clip.config.vision_config.hidden_size, generator=gen)

    def manual_pooled(self, model, hidden):
        with torch.no_grad():
            projected = model.image_mm_projector(hidden[:, 1:])
        return projected.reshape(hidden.shape[0], 12, 2, 12, 2, -1).mean(dim=(2, 4)).reshape(hidden.shape[0], 144, -1)

    def test_unpruned_is_pooled_projection(self, model, hidden):
        out = model.clip_tokens(hidden, None, "pooled")
        assert out.shape == (3, 144, model.llm.config.hidden_size)
        torch.testing.assert_close(out, self.manual_pooled(model, hidden), atol=ATOL, rtol=0)

    def test_cls_row_is_ignored(self, model, hidden):
        changed = hidden.clone()
        changed[:, 0] += 10
        torch.testing.assert_close(model.clip_tokens(changed, None, "pooled"), model.clip_tokens(hidden, None, "pooled"))

    def test_kept_none_equals_all_cells(self, model, hidden):
        full = model.clip_tokens(hidden, None, "pooled")
        all_cells = model.clip_tokens(hidden, torch.arange(144).expand(3, -1), "pooled")
        assert torch.equal(full, all_cells)

    def test_pooled_subset_is_rows_of_full(self, model, hidden):
        full = model.clip_tokens(hidden, None, "pooled")
        kept = torch.stack([torch.tensor([5, 0, 143, 77]), torch.tensor([1, 2, 3, 4]), torch.tensor([143, 142, 12, 13])])
        out = model.clip_tokens(hidden, kept, "pooled")
        assert out.shape == (3, 4, full.shape[-1])
        for f in range(3):
            torch.testing.assert_close(out[f], full[f, kept[f]])

    def test_patch_placement_projects_gathered_patches(self, model, hidden):
        kept = torch.stack([torch.tensor([0, 575, 24, 300, 1]), torch.tensor([10, 11, 12, 13, 14]), torch.tensor([9, 8, 7, 6, 5])])
        out = model.clip_tokens(hidden, kept, "patch")
        assert out.shape == (3, 5, model.llm.config.hidden_size)
        for f in range(3):
            with torch.no_grad():
                expected = model.image_mm_projector(hidden[f, 1 + kept[f]])
            torch.testing.assert_close(out[f], expected, atol=ATOL, rtol=0)

    def test_patch_placement_without_kept_is_the_pooled_path(self, model, hidden):
        assert torch.equal(model.clip_tokens(hidden, None, "patch"), model.clip_tokens(hidden, None, "pooled"))

    def test_unknown_placement(self, model, hidden):
        with pytest.raises(ValueError, match="placement"):
            model.clip_tokens(hidden, None, "cells")

    def test_end_to_end_with_none_method_is_unpruned(self, model, hidden):
        # budget >= 576 with method none under pooled placement feeds exactly the unpruned tokens
        from pruning.clip_features import ClipFrameFeatures
        from pruning.registry import get_method

        empty = hidden.new_empty(0)
        sel = get_method("none").select(ClipFrameFeatures(hidden, empty, empty, empty, None), None, 576, "pooled")
        assert torch.equal(model.clip_tokens(hidden, sel.indices, "pooled"), model.clip_tokens(hidden, None, "pooled"))


# --------------------------------------------------------------------------- prompt
class TestPrompt:
    PREFIX = "<s><|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n"

    def test_forced_prompt_text(self, model):
        prefix, suffix = model.prompt_ids("  The BLACK Swan ", model.config.forced_answer)
        tok = model.llm_tokenizer
        assert tok.decode(prefix) == self.PREFIX
        assert tok.decode(suffix) == (
            "\nWhat is the black swan in this video? Please respond with segmentation masks.<|end|>\n"
            "<|assistant|>\nSure, [SEG]."
        )

    def test_generation_prompt_ends_with_assistant_turn(self, model):
        prefix, suffix = model.prompt_ids("a dog")
        assert model.llm_tokenizer.decode(suffix).endswith("<|end|>\n<|assistant|>\n")
        assert model.llm_tokenizer.decode(prefix) == self.PREFIX

    def test_bos_only_when_the_tokenizer_adds_one(self, model):
        """tokenizer_image_token (VideoGLaMM mm_utils.py L17-37): one BOS if the tokenizer adds BOS, else none."""
        from workers.tokenizers import PHI3_SPECIAL_TOKENS, SEG_TOKEN, _byte_level_tokenizer

        with_bos = model.llm_tokenizer
        assert with_bos("x").input_ids[0] == with_bos.bos_token_id  # the tiny tokenizer adds BOS
        prefix, suffix = model.prompt_ids("a dog", "Sure, [SEG].")
        assert prefix.count(with_bos.bos_token_id) == 1 and prefix[0] == with_bos.bos_token_id
        assert with_bos.bos_token_id not in suffix
        without = _byte_level_tokenizer(PHI3_SPECIAL_TOKENS + (SEG_TOKEN,), bos_token="<s>",
                                        eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>")
        assert without("x").input_ids[0] != without.bos_token_id  # add_bos_token: false (Phi-3-mini-4k today)
        try:
            model.llm_tokenizer = without
            bare_prefix, bare_suffix = model.prompt_ids("a dog", "Sure, [SEG].")
        finally:
            model.llm_tokenizer = with_bos
        assert without.bos_token_id not in bare_prefix + bare_suffix  # the old code always prepended it
        assert bare_prefix == prefix[1:] and bare_suffix == suffix

    def test_special_tokens_are_single_ids(self, model):
        tok = model.llm_tokenizer
        prefix, suffix = model.prompt_ids("x", "Sure, [SEG].")
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "<|system|>", "<|end|>", "<|user|>", "<|assistant|>")}
        assert prefix[0] == ids["<s>"] == tok.bos_token_id
        assert prefix[1] == ids["<|system|>"]
        assert prefix[-2:] == [ids["<|user|>"], tok("\n", add_special_tokens=False).input_ids[0]]
        assert prefix.count(ids["<|end|>"]) == 1 and suffix.count(ids["<|end|>"]) == 1
        assert suffix.count(ids["<|assistant|>"]) == 1
        assert suffix.count(SEG_ID) == 1 and model.seg_token_id == SEG_ID
        assert suffix[-2:] == [SEG_ID, tok(".", add_special_tokens=False).input_ids[0]]

    def test_question_lowercases_and_strips(self, model):
        assert model.question("  A Man ON the LEFT\n") == (
            "What is a man on the left in this video? Please respond with segmentation masks."
        )

    @pytest.mark.parametrize("expression", ["", "   ", "\n\t"])
    def test_empty_expression_raises(self, model, expression, visual):
        with pytest.raises(ExpressionError):
            model.prompt_ids(expression)
        with pytest.raises(ExpressionError):
            model.seg_answers(visual, ["a swan", expression])

    def test_sequence_length(self, model):
        prefix, suffix = model.prompt_ids("x", model.config.forced_answer)
        assert model.sequence_length(100, "x") == len(prefix) + 100 + len(suffix)
        assert model.sequence_length(100, "a longer one") == model.sequence_length(100, "x") + len("a longer one") - 1


# --------------------------------------------------------------------------- sequence length
class TestSequenceLength:
    def test_too_many_patch_tokens_raise(self, model):
        with pytest.raises(SequenceTooLongError) as info:
            model.check_sequence_length(16 * 196 + 1024, ["the black swan"])
        msg = str(info.value)
        assert "--frames" in msg and "--budget" in msg and "4096" in msg and str(16 * 196 + 1024) in msg

    def test_default_pooled_sequence_fits(self, model):
        model.check_sequence_length(16 * 144 + 16 * 64, ["the black swan", "a man riding a bike on the left"])

    @pytest.mark.parametrize("mode", ["forced", "generate"])
    def test_boundary(self, model, mode):
        limit = model.llm.config.max_position_embeddings
        assert limit == 4096
        # generation needs room for max_new_tokens more positions
        extra = model.config.max_new_tokens if mode == "generate" else 0
        n = limit - model.sequence_length(0, "x") - extra
        model.check_sequence_length(n, ["x"], mode)
        with pytest.raises(SequenceTooLongError):
            model.check_sequence_length(n + 1, ["x"], mode)
        # the longest expression decides
        with pytest.raises(SequenceTooLongError):
            model.check_sequence_length(n, ["x", "xy"], mode)

    def test_generate_reserves_new_tokens(self, model):
        n = model.llm.config.max_position_embeddings - model.sequence_length(0, "x")
        model.check_sequence_length(n, ["x"], "forced")
        with pytest.raises(SequenceTooLongError):
            model.check_sequence_length(n, ["x"], "generate")

    def test_seg_answers_checks_before_running(self, model):
        too_many = torch.zeros(16 * 196 + 1024, model.llm.config.hidden_size)
        for mode in ("forced", "generate"):
            with pytest.raises(SequenceTooLongError):
                model.seg_answers(too_many, ["a swan"], mode=mode)


# --------------------------------------------------------------------------- [SEG] answers
class TestForced:
    EXPRESSIONS = ["the black swan", "a dog", "the person riding the bicycle on the far left side"]

    def manual(self, model, visual, expression):
        prefix, suffix = model.prompt_ids(expression, "Sure, [SEG].")
        seq = prompt_embeds(model, prefix, visual, suffix)
        pos = len(prefix) + visual.shape[0] + suffix.index(SEG_ID) - 1
        with torch.no_grad():
            hidden = model.llm.model(inputs_embeds=seq[None], use_cache=False).last_hidden_state[0]
            return model.text_hidden_fcs(hidden[pos]), model.text_hidden_fcs(hidden[pos + 1])

    def test_single_equals_manual(self, model, visual):
        [answer] = model.seg_answers(visual, ["The Black Swan"], mode="forced")
        expected, at_seg = self.manual(model, visual, "the black swan")
        assert answer.embedding.shape == (model.config.seg_dim,) == (128,)
        torch.testing.assert_close(answer.embedding, expected, atol=ATOL, rtol=0)
        assert not torch.allclose(answer.embedding, at_seg, atol=1e-3)  # not the [SEG] position itself
        assert answer.text == "Sure, [SEG]." and answer.expression == "The Black Swan"

    def test_batched_equals_each_alone(self, model, visual):
        batch = model.seg_answers(visual, self.EXPRESSIONS, mode="forced")
        assert [a.expression for a in batch] == self.EXPRESSIONS
        for answer, expression in zip(batch, self.EXPRESSIONS):
            [alone] = model.seg_answers(visual, [expression], mode="forced")
            torch.testing.assert_close(answer.embedding, alone.embedding, atol=ATOL, rtol=0)
            torch.testing.assert_close(answer.embedding, self.manual(model, visual, expression)[0], atol=ATOL, rtol=0)
        assert not torch.allclose(batch[0].embedding, batch[1].embedding, atol=1e-4)

    def test_depends_on_visual_tokens(self, model, visual):
        [a] = model.seg_answers(visual, ["a dog"])
        [b] = model.seg_answers(visual.flip(0), ["a dog"])
        assert not torch.allclose(a.embedding, b.embedding, atol=1e-4)

    def test_deterministic(self, model, visual):
        [a] = model.seg_answers(visual, ["a dog"])
        [b] = model.seg_answers(visual, ["a dog"])
        assert torch.equal(a.embedding, b.embedding)

    def test_unknown_mode(self, model, visual):
        with pytest.raises(ValueError, match="mode"):
            model.seg_answers(visual, ["a dog"], mode="beam")


class TestGenerate:
    def record_greedy(self, model, visual, expression):
        """Run mode='generate', recording the argmax of every lm_head call (the greedy choices)."""
        picked = []
        handle = model.llm.lm_head.register_forward_hook(lambda _m, _i, out: picked.append(int(out.argmax())))
        try:
            [answer] = model.seg_answers(visual, [expression], mode="generate")
        finally:
            handle.remove()
        return answer, picked

    def test_cache_matches_recomputation(self, model, visual):
        answer, picked = self.record_greedy(model, visual, "the black swan")
        expected, _ = greedy_without_cache(model, visual, "the black swan")
        assert len(picked) >= 2
        assert picked == expected
        generated = [t for t in expected if t not in stop_ids(model)]
        assert answer.text == model.llm_tokenizer.decode(generated)
        if SEG_ID not in generated:
            assert answer.embedding is None

    def test_forced_seg_at_second_step(self, model, visual):
        """Make [SEG] win exactly at step 2 in a copy: the embedding is text_hidden_fcs of the hidden
        state that produced it (the last position, whose next token is [SEG])."""
        expression = "a dog"
        tokens, hiddens = greedy_without_cache(model, visual, expression)
        assert tokens[0] not in stop_ids(model) and tokens[0] != SEG_ID
        h1, h2 = hiddens[0], hiddens[1]
        # direction orthogonal to h1: logit 0 at step 1 (the argmax there stays positive), large at step 2
        u = h2 - (h2 @ h1) / (h1 @ h1) * h1
        assert model.llm.lm_head(h1).max() > 0.1
        biased = copy.deepcopy(model)
        with torch.no_grad():
            biased.llm.lm_head.weight[SEG_ID] = 1000.0 * u / (u @ u)
        b_tokens, b_hiddens = greedy_without_cache(biased, visual, expression)
        assert b_tokens[:2] == [tokens[0], SEG_ID]
        torch.testing.assert_close(b_hiddens[1], h2, atol=ATOL, rtol=0)

        [answer] = biased.seg_answers(visual, [expression], mode="generate")
        assert answer.embedding is not None and answer.embedding.shape == (128,)
        with torch.no_grad():
            expected = biased.text_hidden_fcs(h2)
            wrong = biased.text_hidden_fcs(h1)
        torch.testing.assert_close(answer.embedding, expected, atol=ATOL, rtol=0)
        assert not torch.allclose(answer.embedding, wrong, atol=1e-3)
        decoded = biased.llm_tokenizer.decode([tokens[0], SEG_ID])
        assert answer.text.startswith(decoded)
        # the original is untouched
        assert not torch.equal(model.llm.lm_head.weight[SEG_ID], biased.llm.lm_head.weight[SEG_ID])

    def test_stops_at_end_token(self, model, visual):
        """Make <|end|> win at step 1: nothing is generated and there is no [SEG]."""
        end_id = model.llm_tokenizer.convert_tokens_to_ids("<|end|>")
        _, hiddens = greedy_without_cache(model, visual, "a dog")
        biased = copy.deepcopy(model)
        with torch.no_grad():
            biased.llm.lm_head.weight[end_id] = 1000.0 * hiddens[0] / (hiddens[0] @ hiddens[0])
        answer, picked = self.record_greedy(biased, visual, "a dog")
        assert picked == [end_id]
        assert answer.text == "" and answer.embedding is None

    def test_max_new_tokens_bounds_generation(self, model, visual):
        answer, picked = self.record_greedy(model, visual, "a bird")
        assert len(picked) <= model.config.max_new_tokens


# --------------------------------------------------------------------------- build
class TestBuild:
    def test_parts_and_size(self, model):
        total = sum(p.numel() for p in model.parameters())
        assert 1_000_000 < total < 10_000_000
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
        assert model.dtype == torch.float32 and model.device.type == "cpu"
        assert model.llm.config.vocab_size >= len(model.llm_tokenizer)
        assert model.text_hidden_fcs[-1].out_features == model.config.seg_dim
        assert model.image_mm_projector[0].in_features == model.clip.config.vision_config.hidden_size

    def test_two_builds_are_identical(self, model):
        again = build_model(load_model_config("tiny")).state_dict()
        state = model.state_dict()
        assert state.keys() == again.keys()
        different = [k for k in state if not torch.equal(state[k], again[k])]
        assert different == []

    def test_seed_changes_weights_and_global_rng_is_untouched(self, model):
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        other = build_model(load_model_config("tiny").model_copy(update={"seed": 1}))
        assert torch.equal(torch.rand(3), expected)
        state = model.state_dict()
        for key in ("llm.model.embed_tokens.weight", "clip.vision_model.embeddings.patch_embedding.weight",
                    "text_hidden_fcs.0.weight"):
            assert not torch.equal(state[key], other.state_dict()[key]), key


class TestMissingWeights:
    def test_missing_checkpoint_folder(self, tmp_path, monkeypatch):
        monkeypatch.delenv("REFSTREAM_CHECKPOINT", raising=False)
        folder = tmp_path / "nope"
        config = load_model_config("videoglamm", checkpoint=str(folder))
        problems = missing_weights(config)
        assert any(str(folder) in p and "does not exist" in p for p in problems)
        assert any("InternVideo2" in p for p in problems)
        with pytest.raises(WeightsNotFoundError) as info:
            build_model(config)
        msg = str(info.value)
        assert str(folder) in msg
        assert "InternVideo2" in msg
        assert "--model tiny" in msg
        assert "--checkpoint" in msg

    def test_folder_without_files(self, tmp_path, monkeypatch):
        monkeypatch.delenv("REFSTREAM_CHECKPOINT", raising=False)
        config = load_model_config("videoglamm", checkpoint=str(tmp_path))
        problems = missing_weights(config)
        for name in ("config.json", "pytorch_model.bin.index.json", "tokenizer_config.json",
                     "InternVideo2-stage2_1b-224p-f4.pt"):
            assert any(str(tmp_path / name) in p for p in problems), name
        assert not any("does not exist" in p for p in problems)

    def test_resolve_checkpoint_order(self, tmp_path, monkeypatch):
        monkeypatch.setenv("REFSTREAM_CHECKPOINT", str(tmp_path / "from_env"))
        assert resolve_checkpoint(load_model_config("videoglamm")) == tmp_path / "from_env"
        assert resolve_checkpoint(load_model_config("videoglamm", checkpoint=str(tmp_path / "cli"))) == tmp_path / "cli"

    def test_tiny_needs_no_files(self, model):
        assert model.config.random_weights is True


def test_build_model_parts_keep_only_what_an_actor_role_needs():
    """``parts="encoder"`` drops Phi-3 and SAM2, ``parts="decoder"`` drops CLIP and InternVideo2 (before the
    move to the device); what stays is the very same weights as the whole model."""
    from refstream.config import load_model_config
    from workers.build import build_model

    config = load_model_config("tiny")
    whole = build_model(config)
    encoder = build_model(config, parts="encoder")
    decoder = build_model(config, parts="decoder")
    assert encoder.llm is None and encoder.sam2 is None and encoder.clip is not None and encoder.internvideo2 is not None
    assert decoder.clip is None and decoder.internvideo2 is None and decoder.llm is not None and decoder.sam2 is not None
    full = dict(whole.state_dict())
    for part in (encoder, decoder):
        for name, tensor in part.state_dict().items():
            assert torch.equal(tensor, full[name]), name
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(encoder) + count(decoder) - count(whole.image_mm_projector) - count(whole.mm_projector) \
        - count(whole.text_hidden_fcs) == count(whole)
    with pytest.raises(ValueError, match="parts must be one of"):
        build_model(config, parts="llm")


class TestSampledAnswer:
    """--answer sample: temperature and top-p of the checkpoint's generation_config.json, a seeded generator."""

    def test_seeded_sampling_is_reproducible_and_differs_from_greedy(self, model, visual):
        expressions = ["a dog", "the black swan"]
        first = model.seg_answers(visual, expressions, "sample", seed=7)
        again = model.seg_answers(visual, expressions, "sample", seed=7)
        assert [a.text for a in first] == [a.text for a in again]
        other = [model.seg_answers(visual, expressions, "sample", seed=s)[0].text for s in range(1, 6)]
        greedy = model.seg_answers(visual, expressions, "generate")[0].text
        assert len(set(other)) > 1 and any(t != greedy for t in other)  # temperature 1 on random weights
        # each expression has its own generator: an answer does not depend on the other expressions
        assert model.seg_answers(visual, expressions[1:], "sample", seed=7)[0].text == first[1].text

    def test_near_zero_temperature_is_greedy_and_top_p_keeps_the_top_token(self, model, visual):
        config = model.config
        try:
            model.config = config.model_copy(update={"temperature": 1e-6})
            cold = model.seg_answers(visual, ["a dog"], "sample", seed=3)[0].text
            model.config = config.model_copy(update={"top_p": 1e-9})  # nucleus of one token: greedy too
            narrow = model.seg_answers(visual, ["a dog"], "sample", seed=3)[0].text
        finally:
            model.config = config
        greedy = model.seg_answers(visual, ["a dog"], "generate")[0].text
        assert cold == greedy == narrow
        with pytest.raises(ValueError, match="'forced', 'generate' or 'sample'"):
            model.seg_answers(visual, ["a dog"], "beam")

    def test_generation_settings_come_from_the_checkpoint(self, tmp_path):
        from refstream.errors import ConfigError
        from workers.config import generation_settings, load_model_config

        assert generation_settings(tmp_path) == {} and generation_settings(None) == {}
        (tmp_path / "generation_config.json").write_text(
            json.dumps({"do_sample": True, "temperature": 0.2, "top_p": 0.7, "eos_token_id": 32000}))
        assert generation_settings(tmp_path) == {"temperature": 0.2, "top_p": 0.7}
        config = load_model_config("tiny", checkpoint=str(tmp_path))
        assert (config.temperature, config.top_p, config.max_new_tokens) == (0.2, 0.7, 32)
        (tmp_path / "generation_config.json").write_text("[1, 2]")
        with pytest.raises(ConfigError, match="generation_config.json is not a JSON object"):
            generation_settings(tmp_path)


def test_too_long_names_the_expressions_own_token_count_and_the_limit(model):
    from refstream.errors import SequenceTooLongError

    limit = model.llm.config.max_position_embeddings
    with pytest.raises(SequenceTooLongError, match=r"the referring expression is too long: 10000 tokens "
                                                   r"\(10000 characters\).*Fix: shorten the expression to at most \d+"):
        model.check_sequence_length(64, ["x" * 10000])
    with pytest.raises(SequenceTooLongError, match=rf"the expression 3\) but the LLM has {limit} positions.*--frames"):
        model.check_sequence_length(limit, ["dog"])  # the visual tokens alone do not fit
    model.check_sequence_length(64, ["a dog"])  # fits: nothing raised
