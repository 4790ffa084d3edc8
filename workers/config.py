"""Typed model configuration: the presets in ``configs/*.yaml`` and the schema they follow.

A preset names each VideoGLaMM part, its size and where its weights come from. ``configs/videoglamm.yaml`` is
the released model at full size (for users with the weights and a GPU); ``configs/tiny.yaml`` is the same
architecture at a few million parameters with seeded random weights, for tests and demos on a CPU.
``--model`` accepts a preset name or a path to a YAML file of the same shape.

The model sizes live in those files, not in Python (as facebookresearch/sam2 keeps its Hiera sizes in
``sam2/configs/sam2/*.yaml``): :class:`InternVideo2Spec` and :class:`Sam2Spec` hold the widths, depths and
heads, validated here, and :func:`workers.internvideo2.internvideo2_vision_config` /
:func:`workers.sam2_decoder.sam2_video_config` turn them into the transformers configs. What is the same for
every size (InternVideo2's 4-frame 224 px chunks and 14 px patches, SAM 2.0's flags) stays in those modules.

This module sits in ``workers`` because the model code reads it; :mod:`refstream.config` re-exports it.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from refstream_errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "PRESETS",
    "ClipSpec",
    "InternVideo2Spec",
    "ModelConfig",
    "Sam2HieraSpec",
    "Sam2MaskDecoderSpec",
    "Sam2Spec",
    "load_model_config",
]


def _config_dir() -> Path:
    """``configs/`` of the source checkout, else the copy a regular install puts in ``<prefix>/share/refstream``."""
    checkout = Path(__file__).resolve().parents[1] / "configs"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "refstream" / "configs"


CONFIG_DIR = _config_dir()
PRESETS = ("tiny", "videoglamm")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _refuse_size_field(part: str, data: Any) -> Any:
    """The old ``size: full|tiny`` switch is gone: say what replaces it instead of "extra field"."""
    if isinstance(data, dict) and "size" in data:
        raise ValueError(
            f"{part}.size ({data['size']!r}) is no longer a field: the {part} sizes are given in the config "
            f"itself; copy the {part} section of configs/videoglamm.yaml (full size) or configs/tiny.yaml (tiny)"
        )
    return data


class ClipSpec(_Strict):
    """CLIP ViT-L/14-336 (vision tower for VideoGLaMM; text tower and heads for LiteLVLM)."""

    weights: str | None = "openai/clip-vit-large-patch14-336"  # hub id or local folder; None = random
    vision: dict[str, Any] = Field(default_factory=dict)  # CLIPVisionConfig (random weights, meta-device counts)
    text: dict[str, Any] = Field(default_factory=dict)  # CLIPTextConfig (random weights, meta-device counts)
    projection_dim: int = 768
    select_layer: int = -2  # VideoGLaMM takes hidden_states[-2][:, 1:]


class InternVideo2Spec(_Strict):
    """InternVideo2-Stage2-1B-224p-f4 vision encoder, hosted on InternVLVisionModel: weights and size.

    The size fields are ``InternVLVisionConfig`` arguments (see
    :func:`workers.internvideo2.internvideo2_vision_config` for the fixed geometry). Full size (VideoGLaMM @
    6b15b1e, ``pretrain_internvideo2_1b_patch14_224``): hidden 1408, 39 layers (blocks 0..38 of the original
    40 run), 16 heads, MLP 6144, LayerScale init 1e-5.
    """

    weights: str | None = "InternVideo2-stage2_1b-224p-f4.pt"  # relative to the checkpoint folder or absolute
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt  # layers that run (VideoGLaMM stops after block depth - 2)
    num_attention_heads: PositiveInt
    intermediate_size: PositiveInt  # MLP width
    layer_scale_init_value: PositiveFloat  # LayerScale init (random weights only)

    @model_validator(mode="before")
    @classmethod
    def _no_size(cls, data: Any) -> Any:
        return _refuse_size_field("internvideo2", data)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> InternVideo2Spec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"internvideo2.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        return self


class Sam2HieraSpec(_Strict):
    """The Hiera image-encoder trunk of SAM2 (``Sam2HieraDetConfig`` arguments; 4 stages)."""

    hidden_size: PositiveInt  # = embed_dim_per_stage[0]
    num_attention_heads: PositiveInt  # = num_attention_heads_per_stage[0]
    embed_dim_per_stage: list[PositiveInt] = Field(min_length=4, max_length=4)
    num_attention_heads_per_stage: list[PositiveInt] = Field(min_length=4, max_length=4)
    blocks_per_stage: list[PositiveInt] = Field(min_length=4, max_length=4)
    global_attention_blocks: list[int]  # block indices (0-based over all stages) with global attention
    window_positional_embedding_background_size: list[PositiveInt] = Field(min_length=2, max_length=2)
    window_size_per_stage: list[PositiveInt] = Field(min_length=4, max_length=4)

    @model_validator(mode="after")
    def _consistent(self) -> Sam2HieraSpec:
        if self.hidden_size != self.embed_dim_per_stage[0]:
            raise ValueError(f"sam2.hiera.hidden_size {self.hidden_size} must equal embed_dim_per_stage[0] "
                             f"{self.embed_dim_per_stage[0]}")
        if self.num_attention_heads != self.num_attention_heads_per_stage[0]:
            raise ValueError(f"sam2.hiera.num_attention_heads {self.num_attention_heads} must equal "
                             f"num_attention_heads_per_stage[0] {self.num_attention_heads_per_stage[0]}")
        for width, heads in zip(self.embed_dim_per_stage, self.num_attention_heads_per_stage):
            if width % heads:
                raise ValueError(f"sam2.hiera: stage width {width} is not a multiple of its {heads} heads")
        blocks = sum(self.blocks_per_stage)
        bad = [b for b in self.global_attention_blocks if not 0 <= b < blocks]
        if bad:
            raise ValueError(f"sam2.hiera.global_attention_blocks {bad} are outside the {blocks} blocks")
        return self


class Sam2MaskDecoderSpec(_Strict):
    """SAM2's mask decoder (``Sam2VideoMaskDecoderConfig`` arguments)."""

    hidden_size: PositiveInt
    mlp_dim: PositiveInt
    num_attention_heads: PositiveInt
    iou_head_hidden_dim: PositiveInt

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Sam2MaskDecoderSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"sam2.mask_decoder.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        return self


class Sam2Spec(_Strict):
    """SAM 2.0 video predictor (``Sam2VideoModel``): weights, random-weight init and size.

    The size fields are ``Sam2VideoConfig`` arguments (names kept); what follows from ``image_size`` (feature
    map sizes ``image_size / 4, 8, 16``, the memory-attention RoPE size, the prompt encoder's input size) and
    the FPN input channels (the Hiera stage widths, deepest first) is derived in
    :func:`workers.sam2_decoder.sam2_video_config`. Full size: ``configs/videoglamm.yaml`` (Hiera-L, 224.4 M
    parameters).
    """

    weights: str | None = "facebook/sam2-hiera-large-hf"
    init: Literal["default", "test"] = "default"  # random weights only: see workers.sam2_decoder.build_sam2
    image_size: PositiveInt  # square input side in pixels (1024 full); a multiple of 64
    hiera: Sam2HieraSpec
    fpn_hidden_size: PositiveInt
    prompt_encoder_hidden_size: PositiveInt
    mask_decoder: Sam2MaskDecoderSpec
    memory_attention_hidden_size: PositiveInt
    memory_attention_num_layers: PositiveInt
    memory_attention_feed_forward_hidden_size: PositiveInt
    memory_encoder_hidden_size: PositiveInt
    memory_encoder_output_channels: PositiveInt
    mask_downsampler_embed_dim: PositiveInt
    memory_fuser_embed_dim: PositiveInt
    memory_fuser_intermediate_dim: PositiveInt

    @model_validator(mode="before")
    @classmethod
    def _no_size(cls, data: Any) -> Any:
        return _refuse_size_field("sam2", data)

    @model_validator(mode="after")
    def _consistent(self) -> Sam2Spec:
        if self.image_size % 64:
            raise ValueError(f"sam2.image_size must be a positive multiple of 64, got {self.image_size}")
        if self.memory_attention_hidden_size % self.memory_encoder_output_channels:
            raise ValueError(f"sam2.memory_attention_hidden_size {self.memory_attention_hidden_size} is not a "
                             f"multiple of memory_encoder_output_channels {self.memory_encoder_output_channels} "
                             "(object pointers are split into memory tokens of that width)")
        return self


@functools.cache
def _preset_section(preset: str, part: str) -> dict:
    """The ``part`` section of a preset file (the default of a section a custom YAML leaves out)."""
    return yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())[part]


class ModelConfig(_Strict):
    """One VideoGLaMM model: parts, sizes, weights and the prompt.

    ``random_weights: true`` builds every part from its config with seeded random weights and needs no
    files (the masks then carry no meaning, and the run says so). A YAML file that leaves out the
    ``internvideo2`` or ``sam2`` section gets the one of ``configs/videoglamm.yaml`` (full size).
    """

    name: str
    random_weights: bool = False
    seed: int = 0
    checkpoint: str | None = None  # the VideoGLaMM download folder (LLM, projectors, L->V adapter, tokenizer)
    clip: ClipSpec = ClipSpec()
    internvideo2: InternVideo2Spec = Field(default_factory=lambda: InternVideo2Spec(
        **_preset_section("videoglamm", "internvideo2")))
    sam2: Sam2Spec = Field(default_factory=lambda: Sam2Spec(**_preset_section("videoglamm", "sam2")))
    llm: dict[str, Any] = Field(default_factory=dict)  # Phi3Config keyword arguments
    seg_dim: int = 256  # width of the [SEG] prompt (SAM2 prompt-encoder hidden size)
    num_frames: int = 16  # encoder frames (CLIP and InternVideo2)
    clip_pool: int = 12  # CLIP 24x24 -> 12x12 after projection
    internvideo2_pool: int = 8  # InternVideo2 16x16 -> 8x8 after projection
    system_prompt: str = "You are a helpful AI assistant."
    question: str = "What is {expression} in this video? Please respond with segmentation masks."
    clip_question: str = "What is {expression} in this video? Please respond with segmentation masks."
    forced_answer: str = "Sure, [SEG]."
    max_new_tokens: int = 32  # generate / sample; a checkpoint's generation_config.json may set it
    temperature: float = 1.0  # sample; from the checkpoint's generation_config.json when it has one
    top_p: float = 1.0  # sample (nucleus); likewise


#: the generation_config.json fields ``--answer sample`` takes from a checkpoint (transformers' names)
GENERATION_FIELDS = ("temperature", "top_p", "max_new_tokens")


def generation_settings(checkpoint: str | Path | None) -> dict:
    """``temperature``, ``top_p`` and ``max_new_tokens`` from ``<checkpoint>/generation_config.json`` (those it
    sets; {} without the file). The released VideoGLaMM answers with ``generate`` and no sampling arguments, so
    these come from that file (mbzuai-oryx/VideoGLaMM@6b15b1e ``VideoGLaMM/model/VideoGLaMM.py`` L790-799).

    Raises:
        ConfigError: the file exists but is not a JSON object.
    """
    if checkpoint is None:
        return {}
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}. Fix: restore the checkpoint's generation_config.json.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object. Fix: restore the checkpoint's generation_config.json.")
    return {k: data[k] for k in GENERATION_FIELDS if data.get(k) is not None}


def load_model_config(model: str, checkpoint: str | None = None) -> ModelConfig:
    """Resolve ``--model`` (a preset name or a YAML path) into a :class:`ModelConfig`.

    Args:
        model: ``"tiny"``, ``"videoglamm"`` or a path to a YAML file with :class:`ModelConfig` fields.
        checkpoint: overrides the config's ``checkpoint`` folder (``--checkpoint``).

    Raises:
        ConfigError: unknown preset, unreadable YAML, or fields that do not validate (named, e.g. a size that
            is not a positive integer or a width that its heads do not divide).
    """
    path = Path(model)
    if model in PRESETS:
        path = CONFIG_DIR / f"{model}.yaml"
    elif not (path.suffix in (".yaml", ".yml") and path.is_file()):
        raise ConfigError(
            f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing .yaml file. "
            f"Use --model tiny for random weights, or --model videoglamm with the released weights."
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"invalid model config {path}: expected a mapping of fields, got {type(data).__name__}")
    if checkpoint is not None:
        data["checkpoint"] = str(checkpoint)
    data.update(generation_settings(data.get("checkpoint")))
    try:
        return ModelConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid model config {path}:\n{exc}") from exc
