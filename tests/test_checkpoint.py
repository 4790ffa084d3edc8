"""Released-weights loading: the official VideoGLaMM folder layout, key mapping, strictness, convert.

A tiny random VideoGLaMM is written as an official download folder (2 pickle shards + index, original key
names, tokenizer with [SEG], config.json), with its base weights beside it (CLIP folder, InternVideo2 ``.pt``
in original names), then loaded through the real ``random_weights: false`` path and compared tensor by tensor
and output by output with the in-memory model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from refstream.config import CONFIG_DIR, load_model_config
from refstream.errors import ConfigError, WeightsNotFoundError
from workers.build import build_model, missing_weights
from workers.checkpoint import (
    OFFICIAL_INDEX,
    CheckpointFileMissingError,
    CheckpointMismatchError,
    convert_sam2_state_dict,
    internvideo2_to_original,
    llm_config_from_checkpoint,
    official_key,
    refstream_key,
    sam2_key_to_hf,
    sam2_key_to_original,
    sam2_state_dict_to_original,
    write_official_checkpoint,
)
from workers.sam2_decoder import Sam2VideoDecoder, sam2_video_config

IV2_FILE = "InternVideo2-tiny.pt"


# ------------------------------------------------------------------------------------------------ fixtures
def write_release(model, root: Path, *, include_vision_tower: bool = False, internvideo2_pt: bool = True,
                  num_shards: int = 2) -> Path:
    """Write ``model`` as an official release under ``root`` and return a model YAML that loads it.

    ``root/ckpt``: the VideoGLaMM download folder (+ the InternVideo2 ``.pt``, original names, under
    ``module`` with the ``vision_encoder.`` prefix and unrelated Stage-2 keys); ``root/clip``: CLIP
    ``save_pretrained`` with its tokenizer; ``root/model.yaml``: the tiny preset with ``random_weights: false``.
    """
    ckpt, clip = root / "ckpt", root / "clip"
    write_official_checkpoint(model, ckpt, num_shards=num_shards, include_vision_tower=include_vision_tower)
    if internvideo2_pt:
        host = {k[len("internvideo2.host."):]: v for k, v in model.state_dict().items() if k.startswith("internvideo2.host.")}
        original = {"vision_encoder." + k: v.clone() for k, v in internvideo2_to_original(host).items()}
        original["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)  # Stage-2 extras: ignored
        original["vision_proj.weight"] = torch.zeros(2, 2)
        torch.save({"module": original}, ckpt / IV2_FILE)
    model.clip.save_pretrained(clip)
    model.clip_tokenizer.save_pretrained(clip)
    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data.update(name="tiny-release", random_weights=False, checkpoint=str(ckpt))
    data["clip"]["weights"] = str(clip)
    data["internvideo2"]["weights"] = IV2_FILE
    data["sam2"]["weights"] = None
    path = root / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tie_sam2_positional_matrix(model):
    """SAM2 has one random-Fourier matrix that transformers keeps twice; a random Sam2VideoModel draws two."""
    sam2 = model.sam2
    with torch.no_grad():
        sam2.shared_image_embedding.positional_embedding.copy_(sam2.prompt_encoder.shared_embedding.positional_embedding)
    return model


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset's model, made expressible in the original names (one SAM2 positional matrix)."""
    return tie_sam2_positional_matrix(build_model(load_model_config("tiny")))


def test_untied_positional_matrices_cannot_be_written(tmp_path):
    with pytest.raises(ValueError, match="one matrix"):
        write_official_checkpoint(build_model(load_model_config("tiny")), tmp_path)


@pytest.fixture(scope="module")
def release(tiny, tmp_path_factory) -> Path:
    return write_release(tiny, tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def loaded(release):
    return build_model(load_model_config(str(release)))


def fresh_release(tiny, tmp_path, **kwargs) -> tuple[Path, Path]:
    yaml_path = write_release(tiny, tmp_path, **kwargs)
    return yaml_path, tmp_path / "ckpt"


def assert_same_state(a, b, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        expected = sa[key] if dtype is None else sa[key].to(dtype)
        assert sb[key].dtype == expected.dtype, key
        assert torch.equal(expected, sb[key]), key


def rewrite_shards(ckpt: Path, edit) -> None:
    """Apply ``edit(state) -> state`` to the official shards and rewrite shards + index."""
    index = json.loads((ckpt / OFFICIAL_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    parts = {s: torch.load(ckpt / s, weights_only=True) for s in shards}
    state = {k: v for part in parts.values() for k, v in part.items()}
    state = edit(state)
    weight_map = {}
    for i, shard in enumerate(shards):
        chunk = {k: v for j, (k, v) in enumerate(state.items()) if j % len(shards) == i}
        torch.save(chunk, ckpt / shard)
        weight_map.update({k: shard for k in chunk})
    index["weight_map"] = weight_map
    (ckpt / OFFICIAL_INDEX).write_text(json.dumps(index))


# ------------------------------------------------------------------------------------------------ key mapping
@pytest.mark.parametrize("preset", ["tiny", "videoglamm"], ids=["tiny", "hiera-l"])
def test_sam2_mapping_round_trip(preset):
    from transformers import Sam2VideoModel

    with torch.device("meta"):
        sam2 = Sam2VideoModel(sam2_video_config(load_model_config(preset).sam2))
    hf = sam2.state_dict()
    original = sam2_state_dict_to_original(hf)
    assert len(original) == len(hf) + 4 - 1 - 1  # point_embed -> 4 rows; shared pe dropped (duplicate)
    names = set(original)
    assert len(names) == len(original)  # injective
    for key in hf:
        name = sam2_key_to_original(key)
        if name is not None:
            assert sam2_key_to_hf(name) == key
    back = convert_sam2_state_dict(original, hf)
    assert set(back) == set(hf)
    assert all(tuple(back[k].shape) == tuple(hf[k].shape) for k in hf)
    # no transformers-only vocabulary left in the original names
    for token in ("layer_norm", "o_proj", "proj_in", "proj_out", "memory_fuser", "object_pointer", "backbone", "scale"):
        assert not any(token in n for n in names), token


def test_sam2_original_names_spot_checks():
    assert sam2_key_to_hf("memory_encoder.fuser.layers.1.weight") == "memory_encoder.memory_fuser.layers.1.scale"
    assert sam2_key_to_hf("memory_encoder.fuser.layers.1.gamma") == "memory_encoder.memory_fuser.layers.1.scale"
    assert sam2_key_to_original("memory_encoder.memory_fuser.layers.1.scale") == "memory_encoder.fuser.layers.1.weight"
    assert sam2_key_to_hf("memory_encoder.fuser.layers.1.dwconv.weight") == \
        "memory_encoder.memory_fuser.layers.1.depthwise_conv.weight"
    assert sam2_key_to_hf("memory_encoder.mask_downsampler.encoder.12.bias") == "memory_encoder.mask_downsampler.final_conv.bias"
    assert sam2_key_to_hf("memory_encoder.mask_downsampler.encoder.10.weight") == \
        "memory_encoder.mask_downsampler.layers.3.layer_norm.weight"
    assert sam2_key_to_hf("image_encoder.trunk.blocks.7.mlp.layers.1.bias") == \
        "vision_encoder.backbone.blocks.7.mlp.proj_out.bias"
    assert sam2_key_to_hf("sam_mask_decoder.output_hypernetworks_mlps.3.layers.1.weight") == \
        "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight"
    assert sam2_key_to_hf("sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight") == \
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.weight"
    assert sam2_key_to_hf("obj_ptr_proj.layers.2.weight") == "object_pointer_proj.proj_out.weight"
    assert sam2_key_to_hf("maskmem_tpos_enc") == "memory_temporal_positional_encoding"
    assert sam2_key_to_hf("sam_prompt_encoder.point_embeddings.0.weight") is None  # concatenated in code
    assert sam2_key_to_hf("image_encoder.trunk.blocks.0.attn.qkv.bogus") is None


def test_official_prefixes_round_trip():
    for official in ("model.embed_tokens.weight", "model.layers.3.mlp.gate_up_proj.weight", "model.norm.weight",
                     "lm_head.weight", "model.image_mm_projector.2.bias", "model.mm_projector.0.weight",
                     "model.text_hidden_fcs.0.2.weight"):
        assert official_key(refstream_key(official)) == official
    assert refstream_key("model.text_hidden_fcs.0.0.weight") == "text_hidden_fcs.0.weight"
    assert refstream_key("model.visual_model.no_mem_embed") is None
    assert refstream_key("model.vision_tower.vision_encoder.cls_token") is None


def test_sliding_window_and_vocab_from_config_json():
    kwargs = llm_config_from_checkpoint({"sliding_window": 2047, "vocab_size": 32012, "hidden_size": 3072},
                                        {"vocab_size": 32064, "num_hidden_layers": 32})
    assert kwargs == {"sliding_window": 2048, "vocab_size": 32012, "hidden_size": 3072, "num_hidden_layers": 32}
    assert llm_config_from_checkpoint({"sliding_window": None}, {"sliding_window": 5})["sliding_window"] is None


def test_written_folder_has_the_official_layout(release, tiny):
    ckpt = release.parent / "ckpt"
    index = json.loads((ckpt / OFFICIAL_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert all((ckpt / s).is_file() for s in shards)
    keys = set(index["weight_map"])
    prefixes = {re.sub(r"^(model\.(?:layers|visual_model|embed_tokens|norm)|lm_head|model\.(?:image_mm_projector|"
                       r"mm_projector)\.\d|model\.text_hidden_fcs\.0\.\d)\..*$", r"\1", k) for k in keys}
    assert prefixes == {"model.embed_tokens", "model.layers", "model.norm", "lm_head", "model.image_mm_projector.0",
                        "model.image_mm_projector.2", "model.mm_projector.0", "model.mm_projector.2",
                        "model.text_hidden_fcs.0.0", "model.text_hidden_fcs.0.2", "model.visual_model"}
    assert "model.visual_model.memory_encoder.fuser.layers.0.weight" in keys  # VideoGLaMM's name for gamma
    assert "model.visual_model.sam_prompt_encoder.point_embeddings.3.weight" in keys
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["sliding_window"] == tiny.llm.config.sliding_window - 1 if tiny.llm.config.sliding_window else True
    assert raw["seg_token_idx"] == tiny.seg_token_id and raw["vocab_size"] == tiny.llm.config.vocab_size
    for name in ("tokenizer_config.json", "tokenizer.json"):
        assert (ckpt / name).is_file()
    assert missing_weights(load_model_config(str(release))) == []


# ------------------------------------------------------------------------------------------------ loading
def test_load_reproduces_every_tensor(tiny, loaded):
    assert loaded.config.random_weights is False
    assert_same_state(tiny, loaded)
    assert loaded.seg_token_id == tiny.seg_token_id
    assert loaded.llm.config.vocab_size == tiny.llm.config.vocab_size
    assert loaded.llm.config.sliding_window == tiny.llm.config.sliding_window


def test_no_meta_tensors_left(tiny, loaded):
    for name, tensor in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert not tensor.is_meta, name
    # non-persistent buffers (not in the state dict) were recomputed, equal to a normal construction
    ours = dict(tiny.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, ours[name]), name
    assert "llm.model.rotary_emb.inv_freq" in ours and "sam2.memory_attention.position_ids" in ours


def test_same_seg_embeddings_and_masks(tiny, loaded):
    gen = torch.Generator().manual_seed(3)
    clip_frames = torch.randn(4, 3, 336, 336, generator=gen)
    iv2_frames = torch.randn(4, 3, 224, 224, generator=gen)
    sam2_frames = torch.randn(3, 3, 256, 256, generator=gen)
    results = []
    for model in (tiny, loaded):
        with torch.inference_mode():
            hidden = model.clip.vision_model(pixel_values=clip_frames, output_hidden_states=True).hidden_states[-2]
            visual = torch.cat([model.clip_tokens(hidden, None, "pooled").flatten(0, 1),
                                model.internvideo2_tokens(iv2_frames).flatten(0, 1)])
            answers = model.seg_answers(visual, ["the black swan", "a bird"])
            segs = torch.stack([a.embedding for a in answers])
            masks = [m for _, m in Sam2VideoDecoder(model.sam2).propagate_many(iter(sam2_frames), segs, (48, 64))]
        results.append((visual, segs, masks))
    (v0, s0, m0), (v1, s1, m1) = results
    assert torch.equal(v0, v1)
    assert torch.equal(s0, s1)
    assert len(m0) == len(m1) == 3
    for a, b in zip(m0, m1):
        assert torch.equal(a, b)
    assert any(bool((m > 0).any()) for m in m0)


def test_load_in_bfloat16_casts_while_loading(tiny, release):
    model = build_model(load_model_config(str(release)), dtype=torch.bfloat16)
    assert_same_state(tiny, model, dtype=torch.bfloat16)


def test_internvideo2_from_the_checkpoint_tower_when_no_pt(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path, include_vision_tower=True, internvideo2_pt=False)
    keys = json.loads((ckpt / OFFICIAL_INDEX).read_text())["weight_map"]
    assert "model.vision_tower.vision_encoder.blocks.0.attn.qkv.weight" in keys
    assert "model.vision_tower.vision_encoder.blocks.2.attn.qkv.weight" in keys  # the unused last block
    config = load_model_config(str(yaml_path))
    assert missing_weights(config) == []
    assert_same_state(tiny, build_model(config))


# ------------------------------------------------------------------------------------------------ strictness
def expect_mismatch(yaml_path) -> CheckpointMismatchError:
    with pytest.raises(CheckpointMismatchError) as info:
        build_model(load_model_config(str(yaml_path)))
    assert isinstance(info.value, WeightsNotFoundError)
    return info.value


def test_missing_key_is_named(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path)
    gone = ("model.layers.1.self_attn.o_proj.weight", "model.visual_model.memory_encoder.fuser.layers.0.weight",
            "model.text_hidden_fcs.0.2.bias")
    rewrite_shards(ckpt, lambda s: {k: v for k, v in s.items() if k not in gone})
    error = expect_mismatch(yaml_path)
    msg = str(error)
    # SAM2 is checked first (its own message), then the rest; each names what is missing
    assert "model.visual_model.memory_encoder.fuser.layers.0.weight" in error.missing
    assert "model.visual_model.memory_encoder.fuser.layers.0.weight" in msg and "missing" in msg
    rewrite_shards(ckpt, lambda s: {**s, "model.visual_model.memory_encoder.fuser.layers.0.weight":
                                    tiny.sam2.memory_encoder.memory_fuser.layers[0].scale.clone()})
    error = expect_mismatch(yaml_path)
    assert set(error.missing) == {"model.layers.1.self_attn.o_proj.weight", "model.text_hidden_fcs.0.2.bias"}
    assert "model.layers.1.self_attn.o_proj.weight" in str(error)


def test_unexpected_key_is_named(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path)
    rewrite_shards(ckpt, lambda s: {**s, "model.layers.9.mlp.down_proj.weight": torch.zeros(2, 2),
                                    "model.foo.weight": torch.zeros(1)})
    error = expect_mismatch(yaml_path)
    assert set(error.unexpected) == {"model.layers.9.mlp.down_proj.weight", "model.foo.weight"}
    assert "model.foo.weight" in str(error) and "unexpected" in str(error)
    yaml_path, ckpt = fresh_release(tiny, tmp_path / "b")
    rewrite_shards(ckpt, lambda s: {**s, "model.visual_model.sam_mask_decoder.bogus.weight": torch.zeros(1)})
    assert expect_mismatch(yaml_path).unexpected == ["model.visual_model.sam_mask_decoder.bogus.weight"]


def test_wrong_shape_is_named(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path)
    rewrite_shards(ckpt, lambda s: {**s, "model.mm_projector.0.weight": torch.zeros(3, 5)})
    error = expect_mismatch(yaml_path)
    assert len(error.mismatched) == 1 and error.mismatched[0].startswith("model.mm_projector.0.weight: file (3, 5)")


def test_missing_shard_is_named(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path)
    (ckpt / "pytorch_model-00002-of-00002.bin").unlink()
    config = load_model_config(str(yaml_path))
    assert any("pytorch_model-00002-of-00002.bin" in p for p in missing_weights(config))
    with pytest.raises(WeightsNotFoundError) as info:
        build_model(config)
    assert "pytorch_model-00002-of-00002.bin" in str(info.value)
    from workers.build import _read_sharded_checkpoint

    with pytest.raises(CheckpointFileMissingError) as info:
        _read_sharded_checkpoint(ckpt)
    assert info.value.files == [str(ckpt / "pytorch_model-00002-of-00002.bin")]


def test_index_and_shard_disagree(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path)
    index = json.loads((ckpt / OFFICIAL_INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = ("pytorch_model-00002-of-00002.bin"
                                                if index["weight_map"]["model.norm.weight"].startswith("pytorch_model-00001")
                                                else "pytorch_model-00001-of-00002.bin")
    (ckpt / OFFICIAL_INDEX).write_text(json.dumps(index))
    error = expect_mismatch(yaml_path)
    assert any(m.startswith("model.norm.weight") for m in error.missing)


def test_internvideo2_pt_problems_are_named(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path)
    data = torch.load(ckpt / IV2_FILE, weights_only=True)
    del data["module"]["vision_encoder.blocks.0.attn.qkv.weight"]
    torch.save(data, ckpt / IV2_FILE)
    error = expect_mismatch(yaml_path)
    assert error.missing == ["vision_encoder.blocks.0.attn.qkv.weight"] and IV2_FILE in str(error)
    (ckpt / IV2_FILE).unlink()
    problems = missing_weights(load_model_config(str(yaml_path)))
    assert any(IV2_FILE in p and "InternVideo2" in p for p in problems)


def test_seg_token_mismatch_is_reported(tiny, tmp_path):
    yaml_path, ckpt = fresh_release(tiny, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["seg_token_idx"] = 3
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsNotFoundError, match="seg_token_idx=3"):
        build_model(load_model_config(str(yaml_path)))


def test_missing_clip_folder_says_what_to_download(tiny, tmp_path):
    yaml_path, _ = fresh_release(tiny, tmp_path)
    shutil.rmtree(tmp_path / "clip")
    config = load_model_config(str(yaml_path))
    assert any("CLIP" in p and str(tmp_path / "clip") in p for p in missing_weights(config))
    with pytest.raises(WeightsNotFoundError, match="--model tiny"):
        build_model(config)


# ------------------------------------------------------------------------------------------------ convert
def test_convert_round_trip_and_cli(tiny, release, tmp_path):
    import argparse

    from refstream.convert import add_convert_parser, run_convert
    from workers.convert import LAYOUT_FILE

    parser = argparse.ArgumentParser(prog="refstream")
    add_convert_parser(parser.add_subparsers(dest="command"))
    dst = tmp_path / "converted"
    args = parser.parse_args(["convert", str(release.parent / "ckpt"), str(dst), "--model", str(release),
                              "--shard-size", "200KB"])
    assert run_convert(args) == 0
    layout = json.loads((dst / LAYOUT_FILE).read_text())
    assert layout["format"] == "refstream-videoglamm"
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    config = load_model_config(str(release), checkpoint=str(dst))
    assert missing_weights(config) == []
    model = build_model(config)
    assert_same_state(tiny, model)
    assert all(not t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    with pytest.raises(ConfigError, match="--overwrite"):  # DST exists
        run_convert(args)
    assert run_convert(parser.parse_args([*map(str, ["convert", release.parent / "ckpt", dst, "--model", release]),
                                          "--overwrite"])) == 0
    assert_same_state(tiny, build_model(config))
    # strictness of our own layout: a missing shard and an unexpected tensor are named
    from safetensors.torch import load_file, save_file

    shard = sorted(dst.glob("model-*-of-*.safetensors"))[0]
    tensors = load_file(str(shard))
    save_file({**tensors, "llm.extra": torch.zeros(1)}, str(shard))
    with pytest.raises(CheckpointMismatchError, match="llm.extra"):
        build_model(config)
    shard.unlink()
    assert any(shard.name in p for p in missing_weights(config))
    with pytest.raises(WeightsNotFoundError, match=shard.name):
        build_model(config)


def test_convert_to_bfloat16(tiny, release, tmp_path):
    from workers.convert import convert_checkpoint

    dst = tmp_path / "bf16"
    convert_checkpoint(load_model_config(str(release)), release.parent / "ckpt", dst, dtype=torch.bfloat16)
    model = build_model(load_model_config(str(release), checkpoint=str(dst)), dtype=torch.bfloat16)
    assert_same_state(tiny, model, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ end to end
def test_refstream_run_on_the_released_path(release, bedroom_mp4, tmp_path):
    """`refstream run --model model.yaml` (random_weights: false) goes through the whole loading path."""
    from refstream.cli import main

    out = tmp_path / "out"
    code = main(["run", str(bedroom_mp4), "-e", "the bed", "--model", str(release), "--max-frames", "3", "--out", str(out)])
    assert code == 0
    masks = json.loads((out / "masks.json").read_text())
    assert masks["random_weights"] is False and masks["model"] == "tiny-release"
    (obj,) = masks["objects"]
    assert len(obj["masks"]) == 3
