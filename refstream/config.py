"""Typed configuration: model presets (YAML in ``configs/``) and run options.

A preset names each VideoGLaMM part and where its weights come from. ``configs/videoglamm.yaml`` is the
released model at full size (for users with the weights and a GPU); ``configs/tiny.yaml`` is the same
architecture at a few million parameters with seeded random weights, for tests and demos on a CPU.
``--model`` accepts a preset name or a path to a YAML file of the same shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refstream.errors import ConfigError

def _config_dir() -> Path:
    """``configs/`` of the source checkout, else the copy a regular install puts in ``<prefix>/share/refstream``."""
    import sys

    checkout = Path(__file__).resolve().parents[1] / "configs"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "refstream" / "configs"


CONFIG_DIR = _config_dir()
PRESETS = ("tiny", "videoglamm")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClipSpec(_Strict):
    """CLIP ViT-L/14-336 (vision tower for VideoGLaMM; text tower and heads for LiteLVLM)."""

    weights: str | None = "openai/clip-vit-large-patch14-336"  # hub id or local folder; None = random
    vision: dict[str, Any] = Field(default_factory=dict)  # CLIPVisionConfig (random weights, meta-device counts)
    text: dict[str, Any] = Field(default_factory=dict)  # CLIPTextConfig (random weights, meta-device counts)
    projection_dim: int = 768
    select_layer: int = -2  # VideoGLaMM takes hidden_states[-2][:, 1:]


class InternVideo2Spec(_Strict):
    """InternVideo2-Stage2-1B-224p-f4 vision encoder, hosted on InternVLVisionModel."""

    size: Literal["full", "tiny"] = "full"
    weights: str | None = "InternVideo2-stage2_1b-224p-f4.pt"  # relative to the checkpoint folder or absolute


class Sam2Spec(_Strict):
    """SAM2 Hiera-L video predictor (Sam2VideoModel)."""

    size: Literal["full", "tiny"] = "full"
    weights: str | None = "facebook/sam2-hiera-large-hf"
    init: Literal["default", "test"] = "default"  # random weights only: see workers.sam2_decoder.build_sam2


class ModelConfig(_Strict):
    """One VideoGLaMM model: parts, sizes, weights and the prompt.

    ``random_weights: true`` builds every part from its config with seeded random weights and needs no
    files (the masks then carry no meaning, and the run says so).
    """

    name: str
    random_weights: bool = False
    seed: int = 0
    checkpoint: str | None = None  # the VideoGLaMM download folder (LLM, projectors, L->V adapter, tokenizer)
    clip: ClipSpec = ClipSpec()
    internvideo2: InternVideo2Spec = InternVideo2Spec()
    sam2: Sam2Spec = Sam2Spec()
    llm: dict[str, Any] = Field(default_factory=dict)  # Phi3Config keyword arguments
    seg_dim: int = 256  # width of the [SEG] prompt (SAM2 prompt-encoder hidden size)
    num_frames: int = 16  # encoder frames (CLIP and InternVideo2)
    clip_pool: int = 12  # CLIP 24x24 -> 12x12 after projection
    internvideo2_pool: int = 8  # InternVideo2 16x16 -> 8x8 after projection
    system_prompt: str = "You are a helpful AI assistant."
    question: str = "What is {expression} in this video? Please respond with segmentation masks."
    clip_question: str = "What is {expression} in this video? Please respond with segmentation masks."
    forced_answer: str = "Sure, [SEG]."
    max_new_tokens: int = 32


def load_model_config(model: str, checkpoint: str | None = None) -> ModelConfig:
    """Resolve ``--model`` (a preset name or a YAML path) into a :class:`ModelConfig`.

    Args:
        model: ``"tiny"``, ``"videoglamm"`` or a path to a YAML file with :class:`ModelConfig` fields.
        checkpoint: overrides the config's ``checkpoint`` folder (``--checkpoint``).

    Raises:
        ConfigError: unknown preset, unreadable YAML, or fields that do not validate (named).
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
    try:
        return ModelConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid model config {path}:\n{exc}") from exc
