"""Typed configuration: model presets (YAML in ``configs/``), re-exported from :mod:`workers.config`.

The schema and the loader live in ``workers`` (the model code below ``refstream`` reads them); these are the
same objects, so ``refstream.config.ModelConfig`` and ``workers.config.ModelConfig`` are one class.
"""

from __future__ import annotations

from workers.config import (
    CONFIG_DIR,
    PRESETS,
    ClipSpec,
    InternVideo2Spec,
    ModelConfig,
    Sam2HieraSpec,
    Sam2MaskDecoderSpec,
    Sam2Spec,
    load_model_config,
)

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
