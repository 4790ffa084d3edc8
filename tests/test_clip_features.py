"""ClipFeatureExtractor against a manual computation with the transformers CLIP modules (tiny random CLIP)."""

from __future__ import annotations

import pytest
import torch

from pruning.clip_features import ClipFeatureExtractor, ClipFrameFeatures
from refstream.config import load_model_config
from workers.tokenizers import tiny_clip_tokenizer

ATOL = 1e-5


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = load_model_config("tiny").clip
    config = CLIPConfig(text_config=dict(cfg.text), vision_config=dict(cfg.vision), projection_dim=cfg.projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
        # The default init leaves biases at 0 and LayerNorms at identity; randomise the parameters the
        # checks below depend on so that "bias included" and "after layer_norm1 / post_layernorm" matter.
        with torch.no_grad():
            last = model.vision_model.encoder.layers[-1]
            for module in (last.self_attn.q_proj, last.self_attn.k_proj, last.self_attn.v_proj):
                module.bias.normal_(0, 0.5)
            for ln in (last.layer_norm1, model.vision_model.post_layernorm):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.5)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_clip_tokenizer()


@pytest.fixture(scope="module")
def frames():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 336, 336, generator=gen)


@pytest.fixture(scope="module")
def features(clip, tokenizer, frames) -> ClipFrameFeatures:
    return ClipFeatureExtractor(clip, tokenizer).encode_frames(frames)


def manual_vision(clip, frames):
    """Independent forward: embeddings -> pre-LN -> layers[:-1] gives the input of the last layer."""
    vm = clip.vision_model
    with torch.no_grad():
        x = vm.pre_layrnorm(vm.embeddings(frames))
        for layer in vm.encoder.layers[:-1]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
    return x


def hooks_of(clip):
    attn = clip.vision_model.encoder.layers[-1].self_attn
    return [len(getattr(attn, f"{n}_proj")._forward_hooks) for n in "qkv"]


class TestEncodeFrames:
    def test_shapes(self, features, clip):
        d = clip.config.vision_config.hidden_size
        p = clip.config.projection_dim
        assert features.hidden.shape == (5, 577, d)
        for t in (features.q, features.k, features.v):
            assert t.shape == (5, 577, d)
        assert features.patch_embeds.shape == (5, 576, p)
        assert features.grid == 24

    def test_hidden_is_input_of_last_layer(self, clip, frames, features):
        expected = manual_vision(clip, frames)
        torch.testing.assert_close(features.hidden, expected, atol=ATOL, rtol=0)
        # and it is the output of the layer before, not of the last layer
        with torch.no_grad():
            last = clip.vision_model.encoder.layers[-1](expected, None)
            last = last[0] if isinstance(last, tuple) else last
        assert not torch.allclose(features.hidden, last, atol=1e-3)

    def test_hidden_matches_hidden_states_minus_two(self, clip, frames, features):
        with torch.no_grad():
            out = clip.vision_model(pixel_values=frames, output_hidden_states=True)
        torch.testing.assert_close(features.hidden, out.hidden_states[-2], atol=ATOL, rtol=0)

    @pytest.mark.parametrize("name", ["q", "k", "v"])
    def test_qkv_are_last_layer_projections_of_layernormed_hidden(self, clip, features, name):
        layer = clip.vision_model.encoder.layers[-1]
        proj = getattr(layer.self_attn, f"{name}_proj")
        with torch.no_grad():
            expected = proj(layer.layer_norm1(features.hidden))
        torch.testing.assert_close(getattr(features, name), expected, atol=ATOL, rtol=0)
        got = getattr(features, name)
        with torch.no_grad():
            no_bias = torch.nn.functional.linear(layer.layer_norm1(features.hidden), proj.weight)
            no_ln = proj(features.hidden)
            other = getattr(clip.vision_model.encoder.layers[0].self_attn, f"{name}_proj")(
                layer.layer_norm1(features.hidden)
            )
        for wrong in (no_bias, no_ln, other):  # bias included, after layer_norm1, the LAST layer
            assert not torch.allclose(got, wrong, atol=1e-3)

    def test_q_k_v_differ(self, features):
        assert not torch.allclose(features.q, features.k)
        assert not torch.allclose(features.k, features.v)

    def test_patch_embeds_project_post_layernormed_patches(self, clip, features):
        with torch.no_grad():
            expected = clip.visual_projection(clip.vision_model.post_layernorm(features.hidden[:, 1:]))
        torch.testing.assert_close(features.patch_embeds, expected, atol=ATOL, rtol=0)
        # not the CLS row, not without the post-LN
        with torch.no_grad():
            no_ln = clip.visual_projection(features.hidden[:, 1:])
        assert not torch.allclose(features.patch_embeds, no_ln, atol=1e-3)

    @pytest.mark.parametrize("chunk_size", [1, 2, 3])
    def test_chunking_gives_the_same_features(self, clip, frames, features, chunk_size):
        chunked = ClipFeatureExtractor(clip, chunk_size=chunk_size).encode_frames(frames)
        for name in ("hidden", "q", "k", "v", "patch_embeds"):
            torch.testing.assert_close(getattr(chunked, name), getattr(features, name), atol=ATOL, rtol=0)

    def test_each_frame_is_encoded_independently(self, clip, frames, features):
        one = ClipFeatureExtractor(clip).encode_frames(frames[3:4])
        torch.testing.assert_close(one.hidden[0], features.hidden[3], atol=ATOL, rtol=0)
        torch.testing.assert_close(one.q[0], features.q[3], atol=ATOL, rtol=0)
        assert not torch.allclose(features.hidden[0], features.hidden[3], atol=1e-3)

    def test_without_scores(self, clip, frames, features):
        out = ClipFeatureExtractor(clip, chunk_size=2).encode_frames(frames, with_scores=False)
        torch.testing.assert_close(out.hidden, features.hidden, atol=ATOL, rtol=0)
        assert out.q.numel() == out.k.numel() == out.v.numel() == 0
        assert out.patch_embeds is None
        assert out.grid == 24
        assert hooks_of(clip) == [0, 0, 0]

    def test_without_scores_registers_no_hooks(self, clip, frames):
        seen = []
        spy = clip.vision_model.post_layernorm.register_forward_hook(
            lambda *_: seen.append(hooks_of(clip))
        )
        try:
            ClipFeatureExtractor(clip).encode_frames(frames[:1], with_scores=False)
            ClipFeatureExtractor(clip).encode_frames(frames[:1], with_scores=True)
        finally:
            spy.remove()
        # the vision forward runs post_layernorm once per chunk (the pooler): first call no hooks,
        # second call one hook on each of q/k/v while the forward runs
        assert seen[0] == [0, 0, 0]
        assert [1, 1, 1] in seen[1:]

    def test_hooks_removed_after_success(self, clip, frames):
        before = hooks_of(clip)
        ClipFeatureExtractor(clip, chunk_size=2).encode_frames(frames[:3])
        assert hooks_of(clip) == before == [0, 0, 0]

    def test_hooks_removed_after_an_error_mid_forward(self, clip, frames, features):
        def boom(*_):
            raise RuntimeError("boom")

        # fires after the last layer's q/k/v hooks ran, inside the vision forward
        handle = clip.vision_model.post_layernorm.register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                ClipFeatureExtractor(clip, chunk_size=2).encode_frames(frames[:3])
        finally:
            handle.remove()
        assert hooks_of(clip) == [0, 0, 0]
        # a later call still works and captures fresh values
        again = ClipFeatureExtractor(clip).encode_frames(frames[:2])
        torch.testing.assert_close(again.q, features.q[:2], atol=ATOL, rtol=0)

    def test_hooks_removed_after_bad_input(self, clip):
        with pytest.raises(Exception):
            ClipFeatureExtractor(clip).encode_frames(torch.zeros(1, 4, 336, 336))
        assert hooks_of(clip) == [0, 0, 0]

    def test_result_is_on_model_dtype(self, clip, frames):
        out = ClipFeatureExtractor(clip).encode_frames(frames[:1].double())
        assert out.hidden.dtype == torch.float32 and out.q.dtype == torch.float32
        extractor = ClipFeatureExtractor(clip)
        assert extractor.dtype == torch.float32 and extractor.device.type == "cpu"


class TestEncodeTexts:
    TEXTS = ["the black swan", "a dog", "What is the person on the left in this video?"]

    def manual(self, clip, tokenizer, text):
        ids = tokenizer(text).input_ids
        eos = len(text.encode("utf-8")) + 1
        assert ids[eos] == 257
        with torch.no_grad():
            hidden = clip.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            return clip.text_projection(hidden[eos])

    def test_matches_eos_state_through_text_projection(self, clip, tokenizer):
        out = ClipFeatureExtractor(clip, tokenizer).encode_texts(self.TEXTS)
        assert out.shape == (3, clip.config.projection_dim)
        for i, text in enumerate(self.TEXTS):
            torch.testing.assert_close(out[i], self.manual(clip, tokenizer, text), atol=ATOL, rtol=0)

    def test_not_normalised(self, clip, tokenizer):
        out = ClipFeatureExtractor(clip, tokenizer).encode_texts(self.TEXTS)
        norms = out.norm(dim=-1)
        assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)

    def test_padding_does_not_change_embeddings(self, clip, tokenizer):
        extractor = ClipFeatureExtractor(clip, tokenizer)
        batch = extractor.encode_texts(self.TEXTS)
        for i, text in enumerate(self.TEXTS):
            torch.testing.assert_close(extractor.encode_texts([text])[0], batch[i], atol=ATOL, rtol=0)
        assert not torch.allclose(batch[0], batch[1], atol=1e-3)

    def test_not_the_last_padded_position(self, clip, tokenizer):
        # the short text is padded with [EOS]; its embedding must come from the FIRST [EOS]
        short = "ab"
        out = ClipFeatureExtractor(clip, tokenizer).encode_texts([short, "a much longer text here"])
        ids = tokenizer([short, "a much longer text here"], padding=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = clip.text_model(input_ids=ids[:1]).last_hidden_state[0]
            wrong = clip.text_projection(hidden[-1])
        assert not torch.allclose(out[0], wrong, atol=1e-3)

    def test_long_text_is_truncated_to_77(self, clip, tokenizer):
        long_text = "swan " * 40
        out = ClipFeatureExtractor(clip, tokenizer).encode_texts([long_text])
        ids = tokenizer(long_text, truncation=True, max_length=77).input_ids
        assert len(ids) == 77 and ids[-1] == 257
        with torch.no_grad():
            hidden = clip.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            expected = clip.text_projection(hidden[76])
        torch.testing.assert_close(out[0], expected, atol=ATOL, rtol=0)

    @pytest.mark.parametrize("texts", [[], [""], ["  "], ["ok", "\n"]])
    def test_empty_texts_raise(self, clip, tokenizer, texts):
        with pytest.raises(ValueError, match="non-empty"):
            ClipFeatureExtractor(clip, tokenizer).encode_texts(texts)

    def test_no_tokenizer_raises(self, clip):
        with pytest.raises(ValueError, match="tokenizer"):
            ClipFeatureExtractor(clip).encode_texts(["a swan"])
