"""Tests for workers.internvideo2: InternVideo2 (VideoGLaMM temporal encoder) on InternVLVisionModel.

The core parity test compares RefStream's converted encoder with a golden made by the ORIGINAL module
(``tests/golden/internvideo2_parity.*``, built by ``tools/goldens/internvideo2_parity.py`` from a checkout of
github mbzuai-oryx/VideoGLaMM @ 6b15b1e): ``build_internvideo`` -> ``InternVideo2_Stage2V`` ->
``PretrainInternVideo2`` (VideoGLaMM/model/videogpt_plus/model/internvideo/) loaded a tiny random stage-2
checkpoint (1B geometry - 224 px, patch 14, 4 frames - at width 64, 4 heads, MLP 128, depth 3) and encoded
8 seeded frames as ``arch.py`` ``encode_videos`` does (chunks of 4, ``x_vis_return_idx=-2``, CLS dropped).
The golden holds the state dict and the original's features; the frames come from the recorded seed.

``_reference_forward`` re-implements the same math from the original's equations (3-D patch conv, CLS +
learned pos-embed, pre-norm blocks with RMSNorm, fused qkv without bias, RMSNorm on the full-width q and k,
LayerScale, GELU MLP, loop stopped after block depth-2); it is itself checked against the golden, and serves
the tests that need the encoder's behaviour on other weights (e.g. that the last block is dropped).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings

from refstream.errors import ConfigError
from workers.config import load_model_config
from workers.internvideo2 import (
    CheckpointKeysError,
    InternVideo2Encoder,
    InternVideo2VisionModel,
    build_internvideo2,
    convert_internvideo2_state_dict,
    internvideo2_vision_config,
)

# The sizes of the two presets (configs/tiny.yaml, configs/videoglamm.yaml).
TINY = load_model_config("tiny").internvideo2
FULL = load_model_config("videoglamm").internvideo2

# Tiny original geometry: same as the 1B model (224 px, patch 14, 4 frames) with a small width.
DIM, HEADS, MLP, DEPTH, FRAMES, PATCH, SIZE = 64, 4, 128, 3, 4, 14, 224
EPS = 1e-6
TOKENS = FRAMES * (SIZE // PATCH) ** 2  # 1024
GOLDEN = Path(__file__).parent / "golden" / "internvideo2_parity"


def _original_state_dict(seed: int = 0, depth: int = DEPTH, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the original PretrainInternVideo2 parameter names (no prefix)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=g)).to(dtype)

    sd = {
        "patch_embed.proj.weight": rnd(DIM, 3, 1, PATCH, PATCH, std=0.05),
        "patch_embed.proj.bias": rnd(DIM),
        "cls_token": rnd(1, 1, DIM, std=0.5),
        "pos_embed": rnd(1, 1 + TOKENS, DIM, std=0.5),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": rnd(DIM, mean=1.0),
                p + "attn.qkv.weight": rnd(3 * DIM, DIM, std=0.2),
                p + "attn.q_norm.weight": rnd(DIM, mean=1.0, std=0.3),
                p + "attn.k_norm.weight": rnd(DIM, mean=1.0, std=0.3),
                p + "attn.proj.weight": rnd(DIM, DIM, std=0.15),
                p + "attn.proj.bias": rnd(DIM),
                p + "ls1.gamma": rnd(DIM, mean=0.5, std=0.2),
                p + "norm2.weight": rnd(DIM, mean=1.0),
                p + "mlp.fc1.weight": rnd(MLP, DIM, std=0.15),
                p + "mlp.fc1.bias": rnd(MLP),
                p + "mlp.fc2.weight": rnd(DIM, MLP, std=0.1),
                p + "mlp.fc2.bias": rnd(DIM),
                p + "ls2.gamma": rnd(DIM, mean=0.5, std=0.2),
            }
        )
    return sd


def _stage2_checkpoint(sd: dict[str, torch.Tensor], wrapper: str = "model") -> dict:
    """Wrap like InternVideo2-stage2_1b-224p-f4.pt: prefix, unused heads, text tower, under 'model'."""
    full = {f"vision_encoder.{k}": v for k, v in sd.items()}
    extras = {
        "vision_encoder.clip_projector.norm1_q.weight": torch.ones(DIM),
        "vision_encoder.clip_projector.cross_attn.q.weight": torch.zeros(DIM, DIM),
        "vision_encoder.clip_decoder.0.head.weight": torch.zeros(8, DIM),
        "vision_encoder.final_clip_decoder.norm.bias": torch.zeros(8),
        "vision_encoder.clip_pos_embed": torch.zeros(1, 1 + TOKENS, DIM),
        "vision_encoder.img_pos_embed": torch.zeros(1, 1 + TOKENS // FRAMES, DIM),
        "vision_encoder.clip_img_pos_embed": torch.zeros(1, 1 + TOKENS // FRAMES, DIM),
        "text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(10, 8),
        "vision_proj.weight": torch.zeros(8, 8),
        "temp": torch.tensor(0.07),
    }
    full.update(extras)
    return {wrapper: full}


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _reference_forward(sd: dict[str, torch.Tensor], video: torch.Tensor, run_blocks: int) -> torch.Tensor:
    """Original InternVideo2 vision encoder, written from its equations. video: [B, 3, T, H, W].

    Returns the residual stream after block ``run_blocks - 1``: [B, 1 + T*h*w, D] (CLS first), no final norm.
    """
    x = F.conv3d(video, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(1, PATCH, PATCH))
    b, d = x.shape[:2]
    x = x.flatten(3).permute(0, 2, 3, 1).reshape(b, -1, d)  # [B, T*h*w, D] in (t, h, w) order
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    n, dh = x.shape[1], d // HEADS
    for i in range(run_blocks):
        p = f"blocks.{i}."
        h = _rms(x, sd[p + "norm1.weight"])
        qkv = (h @ sd[p + "attn.qkv.weight"].T).reshape(b, n, 3, HEADS, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, dh]
        # q/k RMSNorm over the full width (heads flattened back), then split into heads again.
        q = _rms(q.transpose(1, 2).reshape(b, n, d), sd[p + "attn.q_norm.weight"])
        k = _rms(k.transpose(1, 2).reshape(b, n, d), sd[p + "attn.k_norm.weight"])
        q, k = (t.reshape(b, n, HEADS, dh).transpose(1, 2) for t in (q, k))
        attn = ((q / math.sqrt(dh)) @ k.transpose(-2, -1)).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + sd[p + "ls1.gamma"] * o
        h = _rms(x, sd[p + "norm2.weight"])
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + sd[p + "ls2.gamma"] * (h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"])
    return x


@pytest.fixture(scope="module")
def tiny_loaded() -> tuple[InternVideo2Encoder, dict[str, torch.Tensor]]:
    sd = _original_state_dict()
    enc = build_internvideo2(internvideo2_vision_config(TINY), seed=1)
    enc.load_original_state_dict(_stage2_checkpoint(sd))
    return enc, sd


# ----------------------------------------------------------------------------------------- configs


def test_full_config_matches_internvideo2_1b():
    cfg = internvideo2_vision_config(FULL)
    dims = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size)
    assert dims == (1408, 39, 16, 6144)
    assert tuple(cfg.image_size) == (896, 224) and tuple(cfg.patch_size) == (14, 14)
    assert cfg.norm_type == "rms_norm" and cfg.layer_norm_eps == 1e-6 and cfg.use_qk_norm
    assert not cfg.attention_bias and cfg.use_mean_pooling and cfg.use_absolute_position_embeddings
    assert cfg.hidden_act == "gelu"


def test_tiny_config_keeps_geometry():
    cfg = internvideo2_vision_config(TINY)
    assert tuple(cfg.image_size) == (896, 224) and tuple(cfg.patch_size) == (14, 14)
    dims = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size)
    assert dims == (DIM, DEPTH - 1, HEADS, MLP)
    enc = build_internvideo2(cfg)
    assert enc.frames_per_chunk == 4 and enc.grid == (16, 16) and enc.tokens_per_frame == 256
    assert enc.host.embeddings.position_embeddings.shape == (1, 1 + TOKENS, DIM)


def test_unknown_size_is_config_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: m\ninternvideo2: {size: huge}\n")
    with pytest.raises(ConfigError, match="internvideo2.size .* is no longer a field"):
        load_model_config(str(path))


def test_sizes_come_from_the_spec():
    cfg = internvideo2_vision_config(TINY.model_copy(update={"hidden_size": 96, "num_hidden_layers": 3}))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (96, 3, HEADS)
    assert build_internvideo2(cfg).hidden_size == 96


def test_full_param_count_on_meta_device():
    with torch.device("meta"):
        enc = build_internvideo2(internvideo2_vision_config(FULL))
    n = sum(p.numel() for p in enc.parameters())
    d, f, layers = 1408, 6144, 39
    # q, k, v (no bias), proj, fc1, fc2, then 4 RMSNorm weights + 2 LayerScales
    per_layer = 3 * d * d + (d * d + d) + (d * f + f) + (f * d + d) + 6 * d
    embeddings = (3 * 14 * 14 * d + d) + d + (1 + 1024) * d
    assert n == layers * per_layer + embeddings == 986_975_872
    assert round(n / 1e6, 1) == 987.0


# ------------------------------------------------------------------------------- parity (core test)


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(meta, original state dict, frames rebuilt from the seed, the original's features [8, 256, D])."""
    meta = json.loads(GOLDEN.with_suffix(".json").read_text())
    arrays = np.load(GOLDEN.with_suffix(".npz"))
    sd = {k[2:]: torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("w.")}
    g = meta["geometry"]
    frames = torch.randn(g["video_frames"], 3, g["size"], g["size"],
                         generator=torch.Generator().manual_seed(meta["frame_seed"]))
    drift = (frames.mean(dim=(2, 3)) - torch.from_numpy(arrays["frame_channel_means"])).abs().max().item()
    assert drift < 1e-6, f"torch.randn no longer rebuilds the golden's frames (channel means differ by {drift})"
    return meta, sd, frames, torch.from_numpy(arrays["features"])


def test_golden_is_the_original_at_the_tested_geometry(golden):
    meta, sd, frames, features = golden
    assert meta["source"]["commit"] == "6b15b1e7f75009d0e1a858ac08e28021c4faaf11"
    assert meta["geometry"] == {"dim": DIM, "heads": HEADS, "mlp": MLP, "depth": DEPTH, "frames_per_chunk": FRAMES,
                                "patch": PATCH, "size": SIZE, "video_frames": 8}
    assert set(sd) == set(_original_state_dict())
    assert features.shape == (8, 256, DIM) and features.std() > 0.1  # the blocks do real work


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_parity_with_original_module(golden, wrapper):
    """RefStream's converted encoder against the ORIGINAL InternVideo2 module's features (the golden)."""
    _, sd, frames, features = golden
    enc = build_internvideo2(internvideo2_vision_config(TINY), seed=7)
    enc.load_original_state_dict(_stage2_checkpoint(sd, wrapper))
    with torch.no_grad():
        ours = enc(frames)  # [8, 256, D]
    diff = (ours - features).abs().max().item()
    print(f"InternVideo2 parity with the original module: max abs diff {diff:.3g} (std {features.std().item():.3g})")
    assert ours.shape == features.shape and ours.dtype == torch.float32
    assert diff < 1e-5  # measured 1.4e-6 at generation


def test_reference_forward_matches_original_module(golden):
    """The in-test re-implementation reproduces the original module, so the tests below may rely on it."""
    _, sd, frames, features = golden
    with torch.no_grad():
        video = frames.reshape(2, 4, 3, SIZE, SIZE).permute(0, 2, 1, 3, 4)  # 2 chunks as [B, C, T, H, W]
        ref = _reference_forward(sd, video, run_blocks=DEPTH - 1)[:, 1:].reshape(8, 256, DIM)
    assert (ref - features).abs().max().item() < 1e-5


def test_last_block_is_dropped_and_matters(tiny_loaded):
    enc, sd = tiny_loaded
    frames = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    video = frames.reshape(1, 4, 3, SIZE, SIZE).permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        ours = enc(frames)
        all_blocks = _reference_forward(sd, video, run_blocks=DEPTH)[:, 1:].reshape(4, 256, DIM)
    assert (ours - all_blocks).abs().max() > 1e-2  # running block depth-1 would give a different answer
    # Changing the dropped block's weights changes nothing.
    other = dict(sd)
    other[f"blocks.{DEPTH - 1}.mlp.fc1.weight"] = torch.randn(MLP, DIM)
    enc2 = build_internvideo2(internvideo2_vision_config(TINY))
    enc2.load_original_state_dict(other)
    with torch.no_grad():
        assert torch.equal(enc2(frames), ours)


# ------------------------------------------------------------------------------- host behaviour


def test_position_embeddings_used_as_is_not_interpolated(tiny_loaded):
    enc, _ = tiny_loaded
    emb = enc.host.embeddings
    pixels = torch.randn(2, 3, 896, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        patches = emb.patch_embeddings(pixels)
        expected = torch.cat([emb.cls_token.expand(2, -1, -1), patches], 1) + emb.position_embeddings
        assert torch.equal(emb(pixels), expected)
        # The stock transformers module would resize the table (896 != 224): the bypass is needed.
        stock = InternVLVisionEmbeddings(enc.host.config)
        stock.load_state_dict(emb.state_dict())
        assert (stock(pixels) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="position embeddings"):
        emb(torch.randn(1, 3, 448, 224))


def test_output_is_last_layer_without_final_norm(tiny_loaded):
    enc, _ = tiny_loaded
    host = enc.host
    assert isinstance(host, InternVideo2VisionModel) and isinstance(host.layernorm, torch.nn.Identity)
    frames = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    pixels = frames.permute(1, 0, 2, 3).reshape(1, 3, 896, 224)  # 4 frames stacked vertically
    with torch.no_grad():
        h = host.embeddings(pixels)
        for layer in host.encoder.layer:
            h = layer(h)
        assert torch.allclose(enc(frames), h[0, 1:].reshape(4, 256, DIM), atol=1e-6, rtol=0)
        assert torch.allclose(host(pixel_values=pixels).last_hidden_state, h, atol=1e-6, rtol=0)


def test_chunks_are_consecutive_and_independent(tiny_loaded):
    enc, _ = tiny_loaded
    frames = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        both = enc(frames)
        assert torch.allclose(both[:4], enc(frames[:4]), atol=1e-5, rtol=0)
        assert torch.allclose(both[4:], enc(frames[4:]), atol=1e-5, rtol=0)
        # Frames of one chunk attend to each other: changing frame 1 changes frame 0, not frame 4.
        edited = frames.clone()
        edited[1] = torch.randn(3, SIZE, SIZE)
        out = enc(edited)
        assert (out[0] - both[0]).abs().max() > 1e-4
        assert torch.allclose(out[4:], both[4:], atol=1e-5, rtol=0)


def test_forward_rejects_bad_input(tiny_loaded):
    enc, _ = tiny_loaded
    for shape in [(6, 3, SIZE, SIZE), (0, 3, SIZE, SIZE), (4, 3, 112, 112), (4, 1, SIZE, SIZE), (3, SIZE, SIZE)]:
        with pytest.raises(ValueError):
            enc(torch.zeros(shape))


def test_build_is_seeded_frozen_eval_and_keeps_global_rng():
    cfg = internvideo2_vision_config(TINY)
    state = torch.random.get_rng_state()
    a, b, c = build_internvideo2(cfg, seed=0), build_internvideo2(cfg, seed=0), build_internvideo2(cfg, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["host.embeddings.position_embeddings"], sc["host.embeddings.position_embeddings"])
    assert sa["host.embeddings.position_embeddings"].std() > 0.01
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_build_rejects_final_norm_config():
    cfg = internvideo2_vision_config(TINY)
    cfg.use_mean_pooling = False
    with pytest.raises(ConfigError, match="use_mean_pooling"):
        build_internvideo2(cfg)


# ----------------------------------------------------------------------------------- converter


def test_converter_keys_and_shapes():
    sd = _original_state_dict(dtype=torch.bfloat16)
    out = convert_internvideo2_state_dict(_stage2_checkpoint(sd))
    host = InternVideo2VisionModel(internvideo2_vision_config(TINY))
    assert set(out) == set(host.state_dict())
    assert out["embeddings.patch_embeddings.projection.weight"].shape == (DIM, 3, PATCH, PATCH)
    qkv = sd["blocks.1.attn.qkv.weight"]
    assert torch.equal(out["encoder.layer.1.attention.q_proj.weight"], qkv[:DIM])
    assert torch.equal(out["encoder.layer.1.attention.k_proj.weight"], qkv[DIM : 2 * DIM])
    assert torch.equal(out["encoder.layer.1.attention.v_proj.weight"], qkv[2 * DIM :])
    assert torch.equal(out["encoder.layer.0.lambda_2"], sd["blocks.0.ls2.gamma"])
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    # Bare state dict (no wrapper, no prefix) works the same.
    assert set(convert_internvideo2_state_dict(sd)) == set(out)


def test_converter_reports_missing_and_unexpected_keys():
    sd = _original_state_dict()
    del sd["blocks.0.ls1.gamma"]
    sd["blocks.0.attn.q_bias"] = torch.zeros(DIM)
    sd["fc_norm.weight"] = torch.ones(DIM)
    with pytest.raises(CheckpointKeysError) as info:
        convert_internvideo2_state_dict(_stage2_checkpoint(sd))
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, KeyError)
    assert err.missing == ["blocks.0.ls1.gamma"]
    assert err.unexpected == ["blocks.0.attn.q_bias", "fc_norm.weight"]
    for name in ["blocks.0.ls1.gamma", "blocks.0.attn.q_bias", "fc_norm.weight"]:
        assert name in str(err)


def test_converter_rejects_bad_tensors():
    sd = _original_state_dict()
    sd["patch_embed.proj.weight"] = torch.zeros(DIM, 3, 2, PATCH, PATCH)
    with pytest.raises(ConfigError, match="tubelet"):
        convert_internvideo2_state_dict(sd)
    with pytest.raises(ConfigError, match="no 'blocks"):
        convert_internvideo2_state_dict({"model": {"vision_encoder.cls_token": torch.zeros(1, 1, DIM)}})
    sd = _original_state_dict()
    sd["pos_embed"] = torch.zeros(1, 1 + 2 * TOKENS, DIM)  # an 8-frame table does not fit the f4 model
    with pytest.raises(ConfigError, match="position_embeddings"):
        build_internvideo2(internvideo2_vision_config(TINY)).load_original_state_dict(sd)
