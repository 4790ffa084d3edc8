"""Tests for workers.sam2_decoder: VideoGLaMM's [SEG]-prompted, streaming SAM2 video decoder.

Everything runs on a tiny random-weight SAM2 (256 px input) built in-process; frames are real DAVIS
``blackswan`` JPEGs (854x480) resized and ImageNet-normalised here with torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from transformers import Sam2VideoInferenceSession, Sam2VideoModel

from refstream.errors import ConfigError, WeightsNotFoundError
from workers.config import load_model_config
from workers.sam2_decoder import (
    SAM2_HIERA_LARGE_ID,
    Sam2VideoDecoder,
    build_sam2,
    load_sam2,
    sam2_image_size,
    sam2_video_config,
)

#: The SAM2 sizes of the two presets (configs/tiny.yaml: 256 px input; configs/videoglamm.yaml: Hiera-L).
TINY = load_model_config("tiny").sam2
FULL = load_model_config("videoglamm").sam2
TINY_IMAGE_SIZE = TINY.image_size

VIDEO_SIZE = (480, 854)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# one intra-op thread (tests/conftest.py): small kernels, and bit-identical batched vs frame-by-frame results
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _preprocess(path: Path, size: int) -> torch.Tensor:
    rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0
    assert tuple(rgb.shape[1:]) == VIDEO_SIZE
    x = F.interpolate(rgb[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - MEAN) / STD


@pytest.fixture(scope="module")
def frames24(blackswan_dir: Path) -> list[torch.Tensor]:
    paths = sorted(blackswan_dir.glob("*.jpg"))[:24]
    assert len(paths) == 24
    return [_preprocess(p, TINY_IMAGE_SIZE) for p in paths]


@pytest.fixture(scope="module")
def frames(frames24: list[torch.Tensor]) -> list[torch.Tensor]:
    return frames24[:8]


@pytest.fixture(scope="module")
def model() -> Sam2VideoModel:
    return build_sam2(sam2_video_config(TINY), seed=0, init="test")


@pytest.fixture(scope="module")
def decoder(model: Sam2VideoModel) -> Sam2VideoDecoder:
    return Sam2VideoDecoder(model)


@pytest.fixture(scope="module")
def segs(decoder: Sam2VideoDecoder) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(2, 1, decoder.seg_dim, generator=g)  # two [SEG] embeddings [1, 1, C]


def _run(decoder, frames, seg):
    return list(decoder.propagate(iter(frames), seg, VIDEO_SIZE))


# ------------------------------------------------------------------------------------------- configs
def test_tiny_config_is_small_and_sets_input_size(model, decoder):
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 5e6
    assert decoder.image_size == TINY_IMAGE_SIZE == sam2_image_size(model.config) == 256
    assert decoder.seg_dim == 128
    cfg = model.config
    assert cfg.num_maskmem == 7 and cfg.max_object_pointers_in_encoder == 16
    assert cfg.multimask_output_in_sam and cfg.multimask_output_for_tracking
    assert (cfg.multimask_min_pt_num, cfg.multimask_max_pt_num) == (0, 1)


def test_full_config_param_count_on_meta():
    cfg = sam2_video_config(FULL)
    with torch.device("meta"):
        full = Sam2VideoModel(cfg)
    n = sum(p.numel() for p in full.parameters())
    assert abs(n - 224.4e6) < 0.1e6, n
    assert sam2_image_size(cfg) == 1024
    assert cfg.prompt_encoder_config.hidden_size == 256
    assert not cfg.enable_temporal_pos_encoding_for_object_pointers  # SAM 2.0 (VideoGLaMM's hiera-L yaml)
    assert not cfg.enable_occlusion_spatial_embedding


def test_tiny_config_rejects_bad_size(tmp_path):
    data = load_model_config("tiny").model_dump()
    data["sam2"]["image_size"] = 200
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="multiple of 64"):
        load_model_config(str(path))


def test_sizes_come_from_the_spec():
    """A changed size in the config gives a model of that size (nothing is fixed in Python)."""
    spec = TINY.model_copy(update={"image_size": 128, "fpn_hidden_size": 64})
    cfg = sam2_video_config(spec)
    assert sam2_image_size(cfg) == 128 and cfg.vision_config.fpn_hidden_size == 64
    assert cfg.vision_config.backbone_feature_sizes == [[32, 32], [16, 16], [8, 8]]
    assert cfg.memory_attention_rope_feat_sizes == [8, 8]


# ----------------------------------------------------------------------------------------- outputs
def test_one_mask_per_frame_in_order_at_video_size(decoder, frames, segs):
    out = _run(decoder, frames, segs[0])
    assert [i for i, _ in out] == list(range(len(frames)))
    for _, logits in out:
        assert logits.shape == VIDEO_SIZE and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    # the test init gives informative logits: not constant, some foreground, some background
    first = out[0][1]
    assert 0.0 < (first > 0).float().mean().item() < 1.0
    masks = list(decoder.propagate_masks(iter(frames), segs[0], VIDEO_SIZE))
    assert [i for i, _ in masks] == list(range(len(frames)))
    for (_, m), (_, lg) in zip(masks, out):
        assert m.dtype == torch.bool and m.shape == (1, *VIDEO_SIZE)
        assert torch.equal(m[0], lg > 0)


def test_deterministic_same_seed_same_inputs(frames, segs):
    a = Sam2VideoDecoder(build_sam2(sam2_video_config(TINY), seed=0, init="test"))
    b = Sam2VideoDecoder(build_sam2(sam2_video_config(TINY), seed=0, init="test"))
    for (pa, qa), (pb, qb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert pa == pb and torch.equal(qa, qb)
    out_a, out_b = _run(a, frames[:4], segs[0]), _run(b, frames[:4], segs[0])
    for (ia, la), (ib, lb) in zip(out_a, out_b):
        assert ia == ib and torch.equal(la, lb)
    c = build_sam2(sam2_video_config(TINY), seed=1, init="test")
    assert not torch.equal(c.mask_decoder.iou_token.weight, a.model.mask_decoder.iou_token.weight)


def test_seg_embedding_matters(decoder, frames, segs):
    out0 = _run(decoder, frames[:3], segs[0])
    out1 = _run(decoder, frames[:3], segs[1])
    diff = (out0[0][1] - out1[0][1]).abs().max().item()
    assert diff > 1e-2, diff
    assert not torch.equal(out0[2][1], out1[2][1])  # and, through memory, on later frames


def test_anchor_frame_matches_videoglamm_sparse_prompt(model, decoder, frames, segs):
    """Frame 0 == SAM head with sparse [not_a_point, not_a_point, SEG], no mask, best-IoU of 3 masks."""
    seg = segs[1, 0]
    got = _run(decoder, frames[:1], seg)[0][1]
    with torch.inference_mode():
        feats = model.get_image_features(frames[0][None]).fpn_hidden_states  # [HW, 1, C] per level
        sizes = model.config.vision_config.backbone_feature_sizes
        high_res = [f.permute(1, 2, 0).reshape(1, -1, *s) for f, s in zip(feats[:-1], sizes[:-1])]
        pix = (feats[-1] + model.no_memory_embedding).permute(1, 2, 0).reshape(1, -1, *sizes[-1])
        nap = model.prompt_encoder.not_a_point_embed.weight[0]
        sparse = torch.stack([nap, nap, seg]).view(1, 1, 3, -1)
        dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *sizes[-1])
        masks, iou, _, obj = model.mask_decoder(
            image_embeddings=pix,
            image_positional_embeddings=model.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            high_resolution_features=high_res,
        )
        assert masks.shape[2] == 3
        best = masks[0, 0, iou[0, 0].argmax()]
        if obj.item() <= 0:
            best = torch.full_like(best, -1024.0)
        want = F.interpolate(best[None, None], size=VIDEO_SIZE, mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------- hook
def test_seg_hook_only_on_anchor_and_removed(model, decoder, frames, segs):
    seen: list[tuple[int, ...]] = []

    def spy(module, args, kwargs):
        seen.append(tuple(kwargs["sparse_prompt_embeddings"].shape))

    handle = model.mask_decoder.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = list(decoder.propagate_many(iter(frames[:4]), segs, VIDEO_SIZE))
    finally:
        handle.remove()
    c = decoder.seg_dim
    # frame 0: one call per object with [not_a_point, not_a_point, SEG]; later frames: 2 sparse tokens
    assert seen[:2] == [(1, 1, 3, c), (1, 1, 3, c)]
    assert seen[2:] == [(1, 1, 2, c)] * (2 * 3)
    assert len(out) == 4
    assert len(model.prompt_encoder._forward_hooks) == 0


def test_seg_hook_removed_on_error(model, decoder, frames, segs):
    def boom(module, args, kwargs):
        raise RuntimeError("boom")

    handle = model.mask_decoder.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            next(decoder.propagate(iter(frames), segs[0], VIDEO_SIZE))
    finally:
        handle.remove()
    assert len(model.prompt_encoder._forward_hooks) == 0
    # and the model still works afterwards, identically
    assert torch.equal(_run(decoder, frames[:2], segs[0])[1][1], _run(decoder, frames[:2], segs[0])[1][1])


# ------------------------------------------------------------------------------------ several objects
def test_two_objects_at_once_equal_each_alone(decoder, frames, segs):
    both = list(decoder.propagate_many(iter(frames), segs, VIDEO_SIZE))
    alone = [_run(decoder, frames, segs[k]) for k in range(2)]
    for t, (idx, logits) in enumerate(both):
        assert idx == t and logits.shape == (2, *VIDEO_SIZE)
        for k in range(2):
            torch.testing.assert_close(logits[k], alone[k][t][1], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ streaming
def test_streaming_memory_is_bounded_and_pruning_changes_nothing(model, frames24, segs):
    stream = Sam2VideoDecoder(model).open_stream(segs, VIDEO_SIZE)
    full = Sam2VideoDecoder(model, prune_memory=False).open_stream(segs, VIDEO_SIZE)
    sizes = []
    for t, frame in enumerate(frames24):
        a, b = stream.step(frame), full.step(frame)
        assert torch.equal(a, b), t
        fp = stream.footprint()
        assert fp["pixel_frames"] == 0  # no pixel frame kept
        assert fp["feature_frames"] <= 1  # image features of the current frame only
        assert fp["non_cond_outputs"] <= 15  # object pointers: 16 incl. the anchor
        assert fp["memory_frames"] <= 6  # mask memories: 7 incl. the anchor
        assert fp["high_res_masks"] == 0
        sizes.append(fp["tensor_bytes"])
    assert sizes[-1] == sizes[17]  # flat once the windows are full
    grown = full.footprint()
    assert grown["pixel_frames"] == 24 and grown["non_cond_outputs"] == 23  # what transformers keeps
    assert grown["tensor_bytes"] > 2 * sizes[-1]
    stream.close()
    full.close()
    assert stream.footprint()["tensor_bytes"] == 0


def test_streaming_equals_offline_session(model, decoder, frames, segs):
    """Frame-by-frame streaming == the whole clip in one session (VideoGLaMM's init_state_from_tensor)."""
    got = list(decoder.propagate_many(iter(frames), segs, VIDEO_SIZE))
    session = Sam2VideoInferenceSession(
        video=torch.stack(frames), video_height=VIDEO_SIZE[0], video_width=VIDEO_SIZE[1], dtype=torch.float32
    )
    for k in range(2):
        idx = session.obj_id_to_idx(k)
        session.add_point_inputs(
            idx, 0, {"point_coords": torch.zeros(1, 1, 1, 2), "point_labels": -torch.ones(1, 1, 1, dtype=torch.int32)}
        )
    session.obj_with_new_inputs = [0, 1]
    calls = []

    def add_seg(module, args, output):
        sparse, dense = output
        vec = segs[len(calls), 0].view(1, 1, 1, -1)
        calls.append(1)
        return torch.cat([sparse, vec], dim=2), dense

    h = model.prompt_encoder.register_forward_hook(add_seg)
    try:
        model(session, frame_idx=0)
    finally:
        h.remove()
    offline = list(model.propagate_in_video_iterator(session, start_frame_idx=0))
    assert len(offline) == len(got)
    for (t, logits), out in zip(got, offline):
        assert out.frame_idx == t
        want = F.interpolate(out.pred_masks.float(), size=VIDEO_SIZE, mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_chunks_and_single_frames_agree(decoder, frames, segs):
    singles = _run(decoder, frames[:5], segs[0])
    chunks = list(decoder.propagate([torch.stack(frames[:2]), frames[2], torch.stack(frames[3:5])], segs[0], VIDEO_SIZE))
    assert [i for i, _ in chunks] == list(range(5))
    for (_, a), (_, b) in zip(singles, chunks):
        assert torch.equal(a, b)


def test_frames_are_consumed_lazily(decoder, frames, segs):
    pulled = []

    def source():
        for t, f in enumerate(frames[:4]):
            pulled.append(t)
            yield f

    gen = decoder.propagate(source(), segs[0], VIDEO_SIZE)
    assert pulled == []
    next(gen)
    assert pulled == [0]
    next(gen)
    assert pulled == [0, 1]
    gen.close()


# --------------------------------------------------------------------------------------------- errors
def test_bad_inputs(decoder, frames, segs):
    with pytest.raises(ValueError):
        decoder.propagate(iter(frames), torch.zeros(7), VIDEO_SIZE)  # wrong C, raised at call time
    with pytest.raises(ValueError):
        decoder.propagate(iter(frames), segs, VIDEO_SIZE)  # two embeddings to the single-object API
    with pytest.raises(ValueError):
        decoder.propagate(iter(frames), segs[0], (0, 854))
    with pytest.raises(ValueError):
        next(decoder.propagate(iter([torch.zeros(3, 64, 64)]), segs[0], VIDEO_SIZE))
    with pytest.raises(TypeError):
        decoder.propagate_many(iter(frames), torch.zeros(2, decoder.seg_dim, dtype=torch.long), VIDEO_SIZE)
    assert list(decoder.propagate(iter([]), segs[0], VIDEO_SIZE)) == []
    assert len(decoder.model.prompt_encoder._forward_hooks) == 0


def test_load_sam2_missing_weights(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        load_sam2(tmp_path / "sam2-hiera-large-hf")
    assert SAM2_HIERA_LARGE_ID in str(info.value)
    with pytest.raises(WeightsNotFoundError):
        load_sam2(tmp_path)  # a folder without weights


def test_load_sam2_roundtrip(tmp_path, model):
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_sam2(tmp_path / "tiny")
    assert not loaded.training
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_load_sam2_warns_on_sam21_style_checkpoint(tmp_path):
    cfg = sam2_video_config(TINY)
    cfg.enable_temporal_pos_encoding_for_object_pointers = True
    build_sam2(cfg, seed=0).save_pretrained(tmp_path / "sam21")
    with pytest.warns(UserWarning, match="SAM 2.1"):
        load_sam2(tmp_path / "sam21")
