"""Key names of the released VideoGLaMM checkpoint and their mapping onto RefStream's transformers hosts.

The official download folder is what ``VideoGLaMMForCausalLM.save_pretrained`` wrote (github
mbzuai-oryx/VideoGLaMM @ 6b15b1e, ``VideoGLaMM/train_ds_with_videogptplus.py`` l. 325-341, LoRA merged,
``safe_serialization=False``): ``config.json``, ``pytorch_model-0000k-of-0000n.bin`` shards with
``pytorch_model.bin.index.json``, and the Phi-3 tokenizer with ``[SEG]``. Names follow the original modules
(read, not copied):

=================================================  ==============================================================
official key                                       RefStream key (``workers.videoglamm.VideoGLaMM``)
=================================================  ==============================================================
``model.embed_tokens.*``, ``model.layers.*``,      ``llm.model.*`` (``Phi3ForCausalLM``; VideoGPT+'s
``model.norm.*``                                   ``VideoGPTPlusPhi3Model`` subclasses ``Phi3Model``)
``lm_head.weight``                                 ``llm.lm_head.weight``
``model.image_mm_projector.{0,2}.*``               ``image_mm_projector.{0,2}.*`` (CLIP ``mlp2x_gelu``,
                                                   ``videogpt_plus/model/multimodal_projector/builder.py``)
``model.mm_projector.{0,2}.*``                     ``mm_projector.{0,2}.*`` (InternVideo2 ``mlp2x_gelu``)
``model.text_hidden_fcs.0.{0,2}.*``                ``text_hidden_fcs.{0,2}.*`` (``model/VideoGLaMM.py`` l. 136-143:
                                                   an ``nn.ModuleList`` holding Linear-ReLU-Linear-Dropout)
``model.visual_model.*``                           ``sam2.*`` through :func:`sam2_key_to_hf` (SAM2 video predictor,
                                                   ``model/segment_anything_2``, original SAM2 module names)
``model.vision_tower.vision_encoder.*``            ``internvideo2.host.*`` through
                                                   :func:`workers.internvideo2.convert_internvideo2_state_dict`
                                                   (``InternVideo2_Stage2V``, ``internvideo/utils.py``)
``model.vision_tower.vision_proj.*``               ignored (retrieval head, never used by VideoGLaMM)
``model.image_vision_tower.*``                     ignored (CLIP; loaded from ``openai/clip-vit-large-patch14-336``)
=================================================  ==============================================================

Facts checked in the original source:

* The memory fuser's layer scale is named ``weight`` in VideoGLaMM's vendored SAM2
  (``sam2/modeling/memory_encoder.py`` l. 97-101, ``CXBlock``: "modified ... from self.gamma to self.weight",
  SAM2 issue #85: transformers' loader renames ``gamma`` keys to ``weight``). Upstream SAM2 checkpoints
  (``sam2_hiera_large.pt``) call it ``gamma``; both are accepted. transformers calls it ``scale``.
* The towers are saved too: the save filter ``"vision_tower" not in k or "image_vision_tower" not in k``
  (``train_ds_with_videogptplus.py`` l. 330-333) only drops keys containing *both* strings, i.e. the CLIP
  tower ``model.image_vision_tower.*``; the InternVideo2 tower ``model.vision_tower.*`` stays in the file.
  At inference the original rebuilds both towers from their own weights (``chat.py``
  ``initialize_model_videogptplus`` -> ``initialize_vision_modules``), so RefStream does the same: CLIP from
  its hub id, InternVideo2 from its ``.pt`` when present, else from ``model.vision_tower.vision_encoder.*``.
* SAM2 comes only from the checkpoint in the original (``sam_pretrained_path`` is not passed at inference,
  and the mask decoder is trained), so ``model.visual_model.*`` takes precedence over
  ``facebook/sam2-hiera-large-hf``.

The SAM2 original -> transformers table below was written from the original module definitions
(``sam2_base.py``, ``backbones/hieradet.py``, ``backbones/image_encoder.py``, ``memory_attention.py``,
``memory_encoder.py``, ``sam/prompt_encoder.py``, ``sam/mask_decoder.py``, ``sam/transformer.py``,
``sam2_utils.py``) and the module tree of transformers 5.23 ``Sam2VideoModel``, and cross-checked against
transformers' ``models/sam2_video/convert_sam2_video_to_hf.py`` (its ``KEYS_TO_MODIFY_MAPPING`` and the
``point_embed`` concatenation). Each rule is one bidirectional template pair, so the inverse mapping (used to
write test checkpoints in the original names) is exact by construction and checked by a round trip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from refstream_errors import WeightsNotFoundError

__all__ = [
    "CheckpointFileMissingError",
    "CheckpointMismatchError",
    "OFFICIAL_INDEX",
    "PHI3_CONFIG_FIELDS",
    "convert_sam2_state_dict",
    "internvideo2_to_original",
    "llm_config_from_checkpoint",
    "official_config_json",
    "official_key",
    "official_state_dict",
    "refstream_key",
    "sam2_key_to_hf",
    "sam2_key_to_original",
    "sam2_state_dict_to_original",
    "write_official_checkpoint",
]

OFFICIAL_INDEX = "pytorch_model.bin.index.json"
OFFICIAL_SINGLE = "pytorch_model.bin"
SAM2_PREFIX = "model.visual_model."
IV2_PREFIX = "model.vision_tower."
CLIP_TOWER_PREFIX = "model.image_vision_tower."
#: Prefixes of keys that are read but not loaded (see the module docstring).
IGNORED_PREFIXES = (CLIP_TOWER_PREFIX, IV2_PREFIX + "vision_proj.")

# official prefix -> RefStream prefix, first match wins (most specific first)
_PREFIX_MAP = (
    ("model.image_mm_projector.", "image_mm_projector."),
    ("model.mm_projector.", "mm_projector."),
    ("model.text_hidden_fcs.0.", "text_hidden_fcs."),
    ("model.embed_tokens.", "llm.model.embed_tokens."),
    ("model.layers.", "llm.model.layers."),
    ("model.norm.", "llm.model.norm."),
    ("lm_head.", "llm.lm_head."),
)

#: Phi3Config fields read from the checkpoint's ``config.json``.
PHI3_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "partial_rotary_factor", "sliding_window",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)


class CheckpointMismatchError(WeightsNotFoundError):
    """A checkpoint's tensors do not match the model: keys missing, unexpected, or of the wrong shape.

    Attributes:
        missing: key names (in the file's own naming) the model needs but the file lacks, sorted.
        unexpected: key names in the file that the model does not have, sorted.
        mismatched: ``"key: file (shape) vs model (shape)"`` strings, sorted.
    """

    def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 mismatched: Iterable[str] = (), hint: str = ""):
        self.missing, self.unexpected, self.mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
        parts = []
        for label, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                             ("wrong shapes", self.mismatched)):
            if items:
                shown = ", ".join(items[:40]) + (f", ... ({len(items) - 40} more)" if len(items) > 40 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        super().__init__(f"{what} does not match the model: " + "; ".join(parts) + (f". {hint}" if hint else ""))


class CheckpointFileMissingError(WeightsNotFoundError):
    """A file the checkpoint needs (a shard listed in the index, the index, ...) is missing or unreadable.

    Attributes:
        files: the paths that are missing.
    """

    def __init__(self, message: str, files: Iterable[str | Path] = ()):
        self.files = [str(f) for f in files]
        super().__init__(message)


# ============================================================================================ SAM2 names
# One rule = (original template, transformers template). Placeholders (same value on both sides):
_PLACEHOLDERS = {
    "n": r"\d+",
    "p": r"weight|bias",
    "qkv": r"q_proj|k_proj|v_proj",
    "mdattn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "maattn": r"self_attn|cross_attn_image",
    "head3": r"output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head",
    "ln": r"1|2|3|4",
    "same": r"iou_token\.weight|mask_tokens\.weight|obj_score_token\.weight|conv_s0\.weight|conv_s0\.bias|"
            r"conv_s1\.weight|conv_s1\.bias",
    "pe": r"not_a_point_embed\.weight|no_mask_embed\.weight",
    "lin": r"linear1|linear2",
    "hattn": r"qkv|proj",
}
_SAM2_RULES = (
    # SAM2Base (sam2_base.py)
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_embed", "no_memory_embedding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),  # SAM 2.1 only
    ("mask_downsample.{p}", "mask_downsample.{p}"),
    ("obj_ptr_proj.layers.0.{p}", "object_pointer_proj.proj_in.{p}"),
    ("obj_ptr_proj.layers.1.{p}", "object_pointer_proj.layers.0.{p}"),
    ("obj_ptr_proj.layers.2.{p}", "object_pointer_proj.proj_out.{p}"),
    ("obj_ptr_tpos_proj.{p}", "temporal_positional_encoding_projection_layer.{p}"),  # SAM 2.1 only
    # Hiera trunk (backbones/hieradet.py) and FPN neck (backbones/image_encoder.py)
    ("image_encoder.trunk.pos_embed", "vision_encoder.backbone.pos_embed"),
    ("image_encoder.trunk.pos_embed_window", "vision_encoder.backbone.pos_embed_window"),
    ("image_encoder.trunk.patch_embed.proj.{p}", "vision_encoder.backbone.patch_embed.projection.{p}"),
    ("image_encoder.trunk.blocks.{n}.norm{ln}.{p}", "vision_encoder.backbone.blocks.{n}.layer_norm{ln}.{p}"),
    ("image_encoder.trunk.blocks.{n}.attn.{hattn}.{p}", "vision_encoder.backbone.blocks.{n}.attn.{hattn}.{p}"),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.0.{p}", "vision_encoder.backbone.blocks.{n}.mlp.proj_in.{p}"),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.1.{p}", "vision_encoder.backbone.blocks.{n}.mlp.proj_out.{p}"),
    ("image_encoder.trunk.blocks.{n}.proj.{p}", "vision_encoder.backbone.blocks.{n}.proj.{p}"),
    ("image_encoder.neck.convs.{n}.conv.{p}", "vision_encoder.neck.convs.{n}.{p}"),
    # memory attention (memory_attention.py, RoPEAttention in sam/transformer.py)
    ("memory_attention.layers.{n}.{maattn}.{qkv}.{p}", "memory_attention.layers.{n}.{maattn}.{qkv}.{p}"),
    ("memory_attention.layers.{n}.{maattn}.out_proj.{p}", "memory_attention.layers.{n}.{maattn}.o_proj.{p}"),
    ("memory_attention.layers.{n}.{lin}.{p}", "memory_attention.layers.{n}.{lin}.{p}"),
    ("memory_attention.layers.{n}.norm{ln}.{p}", "memory_attention.layers.{n}.layer_norm{ln}.{p}"),
    ("memory_attention.norm.{p}", "memory_attention.layer_norm.{p}"),
    # memory encoder (memory_encoder.py); mask_downsampler.encoder.* is handled in code (index arithmetic)
    ("memory_encoder.pix_feat_proj.{p}", "memory_encoder.feature_projection.{p}"),
    ("memory_encoder.fuser.layers.{n}.dwconv.{p}", "memory_encoder.memory_fuser.layers.{n}.depthwise_conv.{p}"),
    ("memory_encoder.fuser.layers.{n}.norm.{p}", "memory_encoder.memory_fuser.layers.{n}.layer_norm.{p}"),
    ("memory_encoder.fuser.layers.{n}.pwconv1.{p}", "memory_encoder.memory_fuser.layers.{n}.pointwise_conv1.{p}"),
    ("memory_encoder.fuser.layers.{n}.pwconv2.{p}", "memory_encoder.memory_fuser.layers.{n}.pointwise_conv2.{p}"),
    ("memory_encoder.fuser.layers.{n}.weight", "memory_encoder.memory_fuser.layers.{n}.scale"),  # VideoGLaMM name
    ("memory_encoder.out_proj.{p}", "memory_encoder.projection.{p}"),
    # prompt encoder (sam/prompt_encoder.py); point_embeddings.{i} and pe_layer are handled in code
    ("sam_prompt_encoder.{pe}", "prompt_encoder.{pe}"),
    ("sam_prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    # mask decoder (sam/mask_decoder.py, sam/transformer.py, MLP in sam2_utils.py)
    ("sam_mask_decoder.{same}", "mask_decoder.{same}"),
    ("sam_mask_decoder.transformer.layers.{n}.{mdattn}.{qkv}.{p}", "mask_decoder.transformer.layers.{n}.{mdattn}.{qkv}.{p}"),
    ("sam_mask_decoder.transformer.layers.{n}.{mdattn}.out_proj.{p}",
     "mask_decoder.transformer.layers.{n}.{mdattn}.o_proj.{p}"),
    ("sam_mask_decoder.transformer.layers.{n}.norm{ln}.{p}", "mask_decoder.transformer.layers.{n}.layer_norm{ln}.{p}"),
    ("sam_mask_decoder.transformer.layers.{n}.mlp.layers.0.{p}", "mask_decoder.transformer.layers.{n}.mlp.proj_in.{p}"),
    ("sam_mask_decoder.transformer.layers.{n}.mlp.layers.1.{p}", "mask_decoder.transformer.layers.{n}.mlp.proj_out.{p}"),
    ("sam_mask_decoder.transformer.final_attn_token_to_image.{qkv}.{p}",
     "mask_decoder.transformer.final_attn_token_to_image.{qkv}.{p}"),
    ("sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.{p}",
     "mask_decoder.transformer.final_attn_token_to_image.o_proj.{p}"),
    ("sam_mask_decoder.transformer.norm_final_attn.{p}", "mask_decoder.transformer.layer_norm_final_attn.{p}"),
    ("sam_mask_decoder.output_upscaling.0.{p}", "mask_decoder.upscale_conv1.{p}"),
    ("sam_mask_decoder.output_upscaling.1.{p}", "mask_decoder.upscale_layer_norm.{p}"),
    ("sam_mask_decoder.output_upscaling.3.{p}", "mask_decoder.upscale_conv2.{p}"),
    ("sam_mask_decoder.{head3}.layers.0.{p}", "mask_decoder.{head3}.proj_in.{p}"),
    ("sam_mask_decoder.{head3}.layers.1.{p}", "mask_decoder.{head3}.layers.0.{p}"),
    ("sam_mask_decoder.{head3}.layers.2.{p}", "mask_decoder.{head3}.proj_out.{p}"),
)
# Upstream SAM2 (sam2_hiera_large.pt) names the fuser layer scale ``gamma``: accepted one way only.
_SAM2_EXTRA_O2H = (("memory_encoder.fuser.layers.{n}.gamma", "memory_encoder.memory_fuser.layers.{n}.scale"),)

_PE_ORIGINAL = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_PE_HF = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")
_POINT_ORIGINAL = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")
_POINT_HF = "prompt_encoder.point_embed.weight"
_DOWNSAMPLER_ORIGINAL = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(weight|bias)$")
_DOWNSAMPLER_HF = re.compile(r"^memory_encoder\.mask_downsampler\.(?:layers\.(\d+)\.(conv|layer_norm)|final_conv)\.(weight|bias)$")


def _compile(template: str) -> tuple[re.Pattern, str]:
    names: list[str] = []

    def group(match: re.Match) -> str:
        name = match.group(1)
        if name in names:
            return f"(?P={name})"
        names.append(name)
        return f"(?P<{name}>{_PLACEHOLDERS[name]})"

    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile("^" + re.sub(r"\{(\w+)\}", group, escaped) + "$"), template


_O2H = [(_compile(o)[0], h) for o, h in _SAM2_RULES + _SAM2_EXTRA_O2H]
_H2O = [(_compile(h)[0], o) for o, h in _SAM2_RULES]


def _apply(rules, key: str) -> str | None:
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def sam2_key_to_hf(key: str, downsampler_layers: int = 4) -> str | None:
    """transformers ``Sam2VideoModel`` name of one original SAM2 key (without ``model.visual_model.``).

    ``downsampler_layers``: conv stages of the memory encoder's mask downsampler (4 for SAM2: total stride 16,
    stride 2); ``mask_downsampler.encoder.{3i}`` / ``{3i+1}`` are stage ``i``'s conv / LayerNorm2d and
    ``encoder.{3 * downsampler_layers}`` the final 1x1 conv. Returns None for keys with no single
    counterpart (the four ``point_embeddings`` and the positional matrix, see
    :func:`convert_sam2_state_dict`) and for unknown keys.
    """
    match = _DOWNSAMPLER_ORIGINAL.match(key)
    if match:
        index, leaf = int(match.group(1)), match.group(2)
        if index == 3 * downsampler_layers:
            return f"memory_encoder.mask_downsampler.final_conv.{leaf}"
        stage, kind = divmod(index, 3)
        if stage < downsampler_layers and kind in (0, 1):
            return f"memory_encoder.mask_downsampler.layers.{stage}.{('conv', 'layer_norm')[kind]}.{leaf}"
        return None
    return _apply(_O2H, key)


def sam2_key_to_original(key: str, downsampler_layers: int = 4) -> str | None:
    """Inverse of :func:`sam2_key_to_hf` (VideoGLaMM spelling: fuser layer scale ``.weight``); None if unknown."""
    match = _DOWNSAMPLER_HF.match(key)
    if match:
        stage, kind, leaf = match.groups()
        index = 3 * downsampler_layers if stage is None else 3 * int(stage) + (0 if kind == "conv" else 1)
        return f"memory_encoder.mask_downsampler.encoder.{index}.{leaf}"
    return _apply(_H2O, key)


def convert_sam2_state_dict(
    original: Mapping[str, Tensor], expected: Mapping[str, torch.Size | Tensor], *, what: str = "SAM2 weights",
    prefix: str = "",
) -> dict[str, Tensor]:
    """Map an original SAM2 video-predictor state dict onto ``Sam2VideoModel`` keys, strictly.

    Args:
        original: original SAM2 names (VideoGLaMM's ``model.visual_model.*`` with the prefix removed, or
            ``sam2_hiera_large.pt``'s ``model``).
        expected: the target model's state dict (or key -> shape); gives the key set and the shapes.
        what: how the source is named in errors.
        prefix: prepended to original names in error messages (e.g. ``model.visual_model.``).

    Returns:
        transformers state dict: ``point_embeddings.{0..3}.weight`` ([1, C] each) are concatenated into
        ``prompt_encoder.point_embed.weight`` [4, C]; the random-Fourier matrix ``pe_layer.
        positional_encoding_gaussian_matrix`` fills both ``prompt_encoder.shared_embedding.positional_embedding``
        and ``shared_image_embedding.positional_embedding`` (the second as a copy).

    Raises:
        CheckpointMismatchError: missing / unexpected keys (original names) or wrong shapes.
    """
    downsampler = sum(1 for k in expected if re.match(r"memory_encoder\.mask_downsampler\.layers\.\d+\.conv\.weight$", k))
    out: dict[str, Tensor] = {}
    points: dict[int, Tensor] = {}
    unexpected = []
    for key, value in original.items():
        if key == _PE_ORIGINAL:
            out[_PE_HF[0]], out[_PE_HF[1]] = value, value.clone()
            continue
        match = _POINT_ORIGINAL.match(key)
        if match:
            points[int(match.group(1))] = value
            continue
        target = sam2_key_to_hf(key, downsampler)
        if target is None or target not in expected:
            unexpected.append(prefix + key)
        else:
            out[target] = value
    if points:
        if _POINT_HF in expected and sorted(points) == list(range(expected_rows(expected[_POINT_HF]))):
            out[_POINT_HF] = torch.cat([points[i] for i in sorted(points)], dim=0)
        else:
            unexpected.extend(f"{prefix}sam_prompt_encoder.point_embeddings.{i}.weight" for i in sorted(points))
    missing = []
    for key in expected:
        if key in out:
            continue
        if key == _POINT_HF:
            rows = expected_rows(expected[key])
            missing.extend(f"{prefix}sam_prompt_encoder.point_embeddings.{i}.weight" for i in range(rows) if i not in points)
        elif key in _PE_HF:
            missing.append(prefix + _PE_ORIGINAL)
        else:
            missing.append(prefix + (sam2_key_to_original(key, downsampler) or f"<no original name for {key}>"))
    mismatched = _shape_mismatches(out, expected, lambda k: prefix + (sam2_key_to_original(k, downsampler) or k))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, sorted(set(missing)), unexpected, mismatched)
    return out


def expected_rows(shape_or_tensor) -> int:
    shape = shape_or_tensor.shape if isinstance(shape_or_tensor, Tensor) else shape_or_tensor
    return int(shape[0])


def sam2_state_dict_to_original(hf: Mapping[str, Tensor], fuser_scale_name: str = "weight") -> dict[str, Tensor]:
    """Inverse of :func:`convert_sam2_state_dict` (for writing checkpoints in the original names).

    ``fuser_scale_name``: ``"weight"`` (VideoGLaMM's vendored SAM2) or ``"gamma"`` (upstream SAM2).

    Raises:
        KeyError: a key has no original name.
        ValueError: ``shared_image_embedding`` and the prompt encoder hold different positional matrices (a
            randomly initialised ``Sam2VideoModel`` draws two; SAM2 has one, which transformers' conversion
            copies into both): such a model has no original-names form. Copy one into the other first.
    """
    pe = [hf.get(k) for k in _PE_HF]
    if all(t is not None and not t.is_meta for t in pe) and not torch.equal(pe[0], pe[1]):
        raise ValueError(f"{_PE_HF[1]} differs from {_PE_HF[0]}; the original SAM2 has one matrix for both")
    downsampler = sum(1 for k in hf if re.match(r"memory_encoder\.mask_downsampler\.layers\.\d+\.conv\.weight$", k))
    out: dict[str, Tensor] = {}
    for key, value in hf.items():
        if key == _PE_HF[1]:
            continue  # duplicate of the prompt encoder's matrix
        if key == _PE_HF[0]:
            out[_PE_ORIGINAL] = value
        elif key == _POINT_HF:
            for i in range(value.shape[0]):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = value[i : i + 1].clone()
        else:
            name = sam2_key_to_original(key, downsampler)
            if name is None:
                raise KeyError(f"no original SAM2 name for {key!r}")
            if fuser_scale_name != "weight" and re.match(r"memory_encoder\.fuser\.layers\.\d+\.weight$", name):
                name = name[: -len("weight")] + fuser_scale_name
            out[name] = value
    return out


def _shape_mismatches(state: Mapping[str, Tensor], expected: Mapping, name=lambda k: k) -> list[str]:
    bad = []
    for key, value in state.items():
        if key in expected:
            want = expected[key].shape if isinstance(expected[key], Tensor) else expected[key]
            if tuple(value.shape) != tuple(want):
                bad.append(f"{name(key)}: file {tuple(value.shape)} vs model {tuple(want)}")
    return bad


# ============================================================================================ whole model
def refstream_key(official: str) -> str | None:
    """RefStream key of an official LLM / projector / L->V key; None for SAM2, tower and unknown keys."""
    for src, dst in _PREFIX_MAP:
        if official.startswith(src):
            return dst + official[len(src):]
    return None


def official_key(key: str) -> str | None:
    """Official name of a RefStream LLM / projector / L->V key (inverse of :func:`refstream_key`)."""
    for src, dst in _PREFIX_MAP:
        if key.startswith(dst):
            return src + key[len(dst):]
    return None


def official_state_dict(model, *, include_vision_tower: bool = False, fuser_scale_name: str = "weight",
                        extra_internvideo2_blocks: int = 1) -> dict[str, Tensor]:
    """The state dict of a :class:`workers.videoglamm.VideoGLaMM` in the official checkpoint's names.

    LLM, projectors, ``text_hidden_fcs`` and SAM2 (original names, ``model.visual_model.``); with
    ``include_vision_tower`` also InternVideo2 as ``model.vision_tower.vision_encoder.*`` (original names,
    plus ``extra_internvideo2_blocks`` unused blocks as in the 40-block original) and a
    ``model.vision_tower.vision_proj`` head. CLIP is never included (the original's save filter drops it).
    """
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = official_key(key)
        if name is not None:
            out[name] = value
    sam2 = {k[len("sam2."):]: v for k, v in state.items() if k.startswith("sam2.")}
    for key, value in sam2_state_dict_to_original(sam2, fuser_scale_name).items():
        out[SAM2_PREFIX + key] = value
    if include_vision_tower:
        host = {k[len("internvideo2.host."):]: v for k, v in state.items() if k.startswith("internvideo2.host.")}
        for key, value in internvideo2_to_original(host, extra_internvideo2_blocks).items():
            out[IV2_PREFIX + "vision_encoder." + key] = value
        width = model.internvideo2.hidden_size
        out[IV2_PREFIX + "vision_proj.weight"] = torch.zeros(max(1, width // 2), width)
        out[IV2_PREFIX + "vision_proj.bias"] = torch.zeros(max(1, width // 2))
    return out


_IV2_BLOCK_INVERSE = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_after.weight": "norm2.weight",
    "attention.q_norm.weight": "attn.q_norm.weight",
    "attention.k_norm.weight": "attn.k_norm.weight",
    "attention.projection_layer.weight": "attn.proj.weight",
    "attention.projection_layer.bias": "attn.proj.bias",
    "lambda_1": "ls1.gamma",
    "lambda_2": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def internvideo2_to_original(host: Mapping[str, Tensor], extra_blocks: int = 1) -> dict[str, Tensor]:
    """Inverse of :func:`workers.internvideo2.convert_internvideo2_state_dict` (no ``vision_encoder.`` prefix).

    q/k/v weights are concatenated into ``attn.qkv.weight``, the 2-D patch kernel gets its tubelet axis
    back ([D, 3, 1, p, p]), ``lambda_{1,2}`` become ``ls{1,2}.gamma``; ``extra_blocks`` copies of the last
    block are appended (the original has 40 blocks of which VideoGLaMM runs 39), and ``img_pos_embed`` is
    added as the original has it (unused).
    """
    out: dict[str, Tensor] = {
        "cls_token": host["embeddings.cls_token"],
        "pos_embed": host["embeddings.position_embeddings"],
        "img_pos_embed": host["embeddings.position_embeddings"][:, :1 + 256].clone(),
        "patch_embed.proj.weight": host["embeddings.patch_embeddings.projection.weight"].unsqueeze(2).contiguous(),
        "patch_embed.proj.bias": host["embeddings.patch_embeddings.projection.bias"],
    }
    layers = sorted({int(m.group(1)) for k in host if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for index, source in enumerate(layers + [layers[-1]] * extra_blocks):
        pre = f"encoder.layer.{source}."
        for hf, orig in _IV2_BLOCK_INVERSE.items():
            out[f"blocks.{index}.{orig}"] = host[pre + hf] if index == source else host[pre + hf].clone()
        qkv = [host[pre + f"attention.{n}_proj.weight"] for n in ("q", "k", "v")]
        out[f"blocks.{index}.attn.qkv.weight"] = torch.cat(qkv, dim=0)
    return out


# ============================================================================================ config.json
def llm_config_from_checkpoint(raw: Mapping, base: Mapping | None = None) -> dict:
    """Phi3Config keyword arguments from the checkpoint's ``config.json`` over ``base`` (the preset's ``llm``).

    ``sliding_window`` is converted: the checkpoint was written with transformers 4.41, whose Phi-3 masks
    ``j <= i - w - 1`` (eager / sdpa ``_make_causal_mask``; flash-attention ``window_size=(w, w)``), i.e. lets
    each token see ``w + 1`` positions; transformers 5 lets it see ``w`` (``kv_idx > q_idx - w``). Phi-3-mini's
    ``2047`` therefore becomes ``2048`` (docs/design.md, section VideoGLaMM).
    """
    out = dict(base or {})
    for field in PHI3_CONFIG_FIELDS:
        if field in raw:
            out[field] = raw[field]
    if raw.get("sliding_window") is not None:
        out["sliding_window"] = int(raw["sliding_window"]) + 1
    return out


def official_config_json(model, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` in the shape VideoGLaMM's ``save_pretrained`` writes (Phi-3 fields + VideoGLaMM's)."""
    cfg = model.llm.config
    raw = {"architectures": ["VideoGLaMMForCausalLM"], "model_type": "phi3"}
    for field in PHI3_CONFIG_FIELDS:
        if field == "rope_theta":
            raw[field] = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        elif hasattr(cfg, field):
            raw[field] = getattr(cfg, field)
    if cfg.sliding_window is not None:
        raw["sliding_window"] = int(cfg.sliding_window) - 1  # transformers 4.41 semantics, see above
    raw.update({
        "torch_dtype": str(dtype).replace("torch.", ""),
        "out_dim": model.text_hidden_fcs[2].out_features,
        "seg_token_idx": int(model.seg_token_id),
        "use_sam2": True,
        "train_mask_decoder": True,
        "mm_projector_type": "mlp2x_gelu",
        "image_mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "OpenGVLab/InternVideo2-Stage2_1B-224p-f4",
        "image_mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_vision_select_layer": -2,
        "mm_hidden_size": model.internvideo2.hidden_size,
        "image_mm_hidden_size": model.clip.config.vision_config.hidden_size,
    })
    return raw


# ============================================================================================ writer
def write_official_checkpoint(model, folder: str | Path, *, num_shards: int = 2, include_vision_tower: bool = False,
                              fuser_scale_name: str = "weight", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Write ``model`` as an official VideoGLaMM download folder (for tests and demos).

    Writes ``config.json`` (:func:`official_config_json`), ``pytorch_model-0000k-of-0000n.bin`` (pickle, as
    ``save_pretrained(safe_serialization=False)``) with ``pytorch_model.bin.index.json``, and the LLM tokenizer
    (``save_pretrained``). The base weights (CLIP folder, InternVideo2 ``.pt``) are the caller's business.

    Returns:
        the official state dict that was written (tensors possibly cast to ``dtype``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = official_state_dict(model, include_vision_tower=include_vision_tower, fuser_scale_name=fuser_scale_name)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    keys = list(state)
    per = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        chunk = {k: state[k].contiguous().clone() for k in keys[i * per : (i + 1) * per]}
        torch.save(chunk, folder / name)
        for key, value in chunk.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
    (folder / OFFICIAL_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True))
    raw = official_config_json(model, dtype or model.dtype)
    (folder / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    model.llm_tokenizer.save_pretrained(folder)
    return state
