"""The byte-level tokenizers of the tiny preset (workers.tokenizers)."""

from __future__ import annotations

import pytest

from refstream.errors import WeightsNotFoundError
from workers.tokenizers import (
    CLIP_SPECIAL_TOKENS,
    PHI3_SPECIAL_TOKENS,
    SEG_TOKEN,
    load_tokenizer,
    tiny_clip_tokenizer,
    tiny_llm_tokenizer,
)

TEXTS = [
    "the black swan",
    "Naïve café — 日本語 🦢 swims\tleft\nand right",
    "  leading and trailing spaces  ",
    "punctuation: !?.,;'\"()[]{}<>|\\/@#$%^&*~`",
    "ß ø Ω ж 한국어 😀👍🏽",
]


@pytest.fixture(scope="module")
def llm_tok():
    return tiny_llm_tokenizer()


@pytest.fixture(scope="module")
def clip_tok():
    return tiny_clip_tokenizer()


class TestLLMTokenizer:
    def test_vocabulary_size_and_seg_is_last(self, llm_tok):
        assert len(llm_tok) == 256 + len(PHI3_SPECIAL_TOKENS) + 1 == 265
        assert llm_tok.convert_tokens_to_ids(SEG_TOKEN) == 264

    @pytest.mark.parametrize("text", TEXTS)
    def test_round_trip(self, llm_tok, text):
        ids = llm_tok(text, add_special_tokens=False).input_ids
        assert llm_tok.decode(ids) == text
        # byte level: one id per UTF-8 byte, all in the byte range
        assert len(ids) == len(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)

    def test_distinct_bytes_get_distinct_ids(self, llm_tok):
        ids = llm_tok("abcdefghijklmnopqrstuvwxyz", add_special_tokens=False).input_ids
        assert len(set(ids)) == 26

    @pytest.mark.parametrize("token", PHI3_SPECIAL_TOKENS + (SEG_TOKEN,))
    def test_special_tokens_are_single_ids(self, llm_tok, token):
        ids = llm_tok(f"ab{token}cd", add_special_tokens=False).input_ids
        expected = llm_tok.convert_tokens_to_ids(token)
        assert expected >= 256
        assert ids == llm_tok("ab", add_special_tokens=False).input_ids + [expected] + llm_tok(
            "cd", add_special_tokens=False
        ).input_ids
        assert llm_tok.decode([expected]) == token

    def test_special_ids_are_distinct_and_ordered(self, llm_tok):
        ids = [llm_tok.convert_tokens_to_ids(t) for t in PHI3_SPECIAL_TOKENS + (SEG_TOKEN,)]
        assert ids == list(range(256, 265))

    def test_roles_match_tiny_config(self, llm_tok):
        # configs/tiny.yaml: bos 257, eos 259, pad 259
        assert llm_tok.bos_token == "<s>" and llm_tok.bos_token_id == 257
        assert llm_tok.eos_token == "<|endoftext|>" and llm_tok.eos_token_id == 259
        assert llm_tok.pad_token_id == 259
        assert llm_tok.unk_token_id == 256

    def test_chat_template_text_round_trip(self, llm_tok):
        text = "<s><|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\nWhat?<|end|>\n<|assistant|>\nSure, [SEG]."
        ids = llm_tok(text, add_special_tokens=False).input_ids
        assert llm_tok.decode(ids) == text
        assert ids.count(264) == 1 and ids.count(261) == 2
        assert llm_tok.decode(ids, skip_special_tokens=True) == "\nYou are a helpful AI assistant.\n\nWhat?\n\nSure, ."

    def test_bos_added_like_add_bos_token_true(self, llm_tok):
        # as a Llama-style tokenizer with add_bos_token: true; the prompt builder keeps one BOS (see
        # tests/test_videoglamm.py::TestPrompt::test_bos_only_when_the_tokenizer_adds_one)
        assert llm_tok("hi").input_ids == [llm_tok.bos_token_id] + llm_tok("hi", add_special_tokens=False).input_ids


class TestClipTokenizer:
    def test_vocabulary_and_eos_is_max_id(self, clip_tok):
        assert len(clip_tok) == 258
        sos, eos = (clip_tok.convert_tokens_to_ids(t) for t in CLIP_SPECIAL_TOKENS)
        assert (sos, eos) == (256, 257)
        assert clip_tok.eos_token_id == eos == len(clip_tok) - 1
        assert clip_tok.bos_token_id == sos and clip_tok.pad_token_id == eos

    @pytest.mark.parametrize("text", TEXTS)
    def test_wraps_sos_text_eos_and_round_trips(self, clip_tok, text):
        ids = clip_tok(text).input_ids
        assert ids[0] == 256 and ids[-1] == 257
        assert 256 not in ids[1:-1] and 257 not in ids[1:-1]
        assert len(ids) == len(text.encode("utf-8")) + 2
        assert clip_tok.decode(ids, skip_special_tokens=True) == text
        assert clip_tok.decode(ids) == "<|startoftext|>" + text + "<|endoftext|>"

    def test_eos_is_the_max_id_of_every_sequence(self, clip_tok):
        # the legacy CLIP pooling (argmax of ids) would then find the [EOS] too
        for text in TEXTS:
            ids = clip_tok(text).input_ids
            assert max(ids) == 257 and ids.index(257) == len(ids) - 1

    def test_pads_with_eos_to_the_longest(self, clip_tok):
        batch = clip_tok(["ab", "abcdef"], padding=True, return_tensors="pt")
        assert batch.input_ids.shape == (2, 8)
        short = batch.input_ids[0].tolist()
        assert short[:4] == clip_tok("ab").input_ids
        assert short[4:] == [257] * 4
        assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
        assert batch.attention_mask[1].tolist() == [1] * 8

    def test_truncation_to_77_keeps_eos_last(self, clip_tok):
        assert clip_tok.model_max_length == 77
        ids = clip_tok("x" * 300, truncation=True, max_length=77).input_ids
        assert len(ids) == 77
        assert ids[0] == 256 and ids[-1] == 257 and ids.count(257) == 1


class TestLoadTokenizer:
    def test_missing_folder_raises_weights_not_found(self, tmp_path):
        with pytest.raises(WeightsNotFoundError) as info:
            load_tokenizer(tmp_path / "absent", "VideoGLaMM", "Get it from somewhere.")
        msg = str(info.value)
        assert "VideoGLaMM tokenizer not found" in msg and str(tmp_path / "absent") in msg
        assert "Get it from somewhere." in msg

    def test_saved_tiny_tokenizer_loads_back(self, tmp_path, llm_tok):
        llm_tok.save_pretrained(tmp_path / "tok")
        loaded = load_tokenizer(tmp_path / "tok", "LLM", "hint")
        text = "What is the swan? [SEG] <|end|>"
        assert loaded(text, add_special_tokens=False).input_ids == llm_tok(text, add_special_tokens=False).input_ids
        assert loaded.convert_tokens_to_ids(SEG_TOKEN) == 264
