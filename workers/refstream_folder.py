"""RefStream's own checkpoint layout (written by ``refstream convert``, :mod:`workers.convert`): names and reader.

``DST/refstream.json``
    ``{"format": "refstream-videoglamm", "version": 1, "dtype", "source", "llm_config", "clip_config",
    "internvideo2_config", "sam2_config", "seg_dim", "index"}``: the transformers configs of the four hosts
    (``llm_config`` in transformers-5 semantics: ``sliding_window`` already converted).
``DST/model-0000k-of-0000n.safetensors`` + ``DST/model.safetensors.index.json``
    every persistent tensor of :class:`workers.videoglamm.VideoGLaMM` under its own state-dict key.
``DST/llm_tokenizer/``, ``DST/clip_tokenizer/``
    ``save_pretrained`` of the two tokenizers.

:func:`workers.build.build_model` recognises the layout by ``refstream.json`` and loads it with
:func:`load_refstream_folder` (meta-device build, memory-mapped safetensors, no key renaming).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    CLIPConfig,
    CLIPModel,
    InternVLVisionConfig,
    Phi3Config,
    Phi3ForCausalLM,
    Sam2VideoConfig,
    Sam2VideoModel,
)

from refstream_errors import ConfigError, WeightsNotFoundError
from workers.checkpoint import CheckpointFileMissingError, CheckpointMismatchError
from workers.config import ModelConfig
from workers.internvideo2 import build_internvideo2
from workers.loading import cast_state_dict, materialize_meta_buffers
from workers.tokenizers import load_tokenizer
from workers.videoglamm import VideoGLaMM

__all__ = [
    "CLIP_TOKENIZER_DIR",
    "FORMAT",
    "INDEX_FILE",
    "LAYOUT_FILE",
    "LLM_TOKENIZER_DIR",
    "VERSION",
    "load_refstream_folder",
    "refstream_folder_problems",
]

FORMAT = "refstream-videoglamm"
VERSION = 1
LAYOUT_FILE = "refstream.json"
INDEX_FILE = "model.safetensors.index.json"
LLM_TOKENIZER_DIR = "llm_tokenizer"
CLIP_TOKENIZER_DIR = "clip_tokenizer"


def _read_layout(folder: Path) -> dict:
    try:
        layout = json.loads((folder / LAYOUT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"cannot read {folder / LAYOUT_FILE} ({exc}); re-run `refstream convert`") from exc
    if layout.get("format") != FORMAT or int(layout.get("version", 0)) > VERSION:
        raise WeightsNotFoundError(f"{folder / LAYOUT_FILE} is not a RefStream v{VERSION} layout "
                                   f"(format {layout.get('format')!r}, version {layout.get('version')!r})")
    return layout


def refstream_folder_problems(folder: Path) -> list[str]:
    """Missing pieces of a folder written by :func:`workers.convert.save_refstream_folder` (empty when complete)."""
    problems = []
    index = folder / INDEX_FILE
    if not index.is_file():
        return [f"{index} is missing; re-run `refstream convert`"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError):
        return [f"{index} is not a valid index; re-run `refstream convert`"]
    problems += [f"shard {folder / s} (listed in {INDEX_FILE}) is missing" for s in shards if not (folder / s).is_file()]
    for sub in (LLM_TOKENIZER_DIR, CLIP_TOKENIZER_DIR):
        if not (folder / sub).is_dir():
            problems.append(f"tokenizer folder {folder / sub} is missing")
    return problems


def load_refstream_folder(config: ModelConfig, folder: str | Path, dtype: torch.dtype | None = torch.float32):
    """Load a folder written by :func:`workers.convert.save_refstream_folder`: meta-device build, mmap'd
    safetensors, strict.

    Raises:
        CheckpointMismatchError: missing / unexpected keys or wrong shapes (RefStream key names).
        CheckpointFileMissingError: a shard listed in the index is missing.
    """
    folder = Path(folder)
    layout = _read_layout(folder)
    if int(layout.get("seg_dim", config.seg_dim)) != config.seg_dim:
        raise ConfigError(f"{folder} was converted with seg_dim {layout['seg_dim']} but the model config says {config.seg_dim}")
    problems = refstream_folder_problems(folder)
    if problems:
        raise CheckpointFileMissingError("; ".join(problems), [p.split(" ")[1] for p in problems if p.startswith("shard ")])
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    llm_tok = load_tokenizer(folder / LLM_TOKENIZER_DIR, "VideoGLaMM (Phi-3 with [SEG])", "Re-run `refstream convert`.")
    clip_tok = load_tokenizer(folder / CLIP_TOKENIZER_DIR, "CLIP", "Re-run `refstream convert`.")
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig.from_dict(layout["clip_config"]))
        internvideo2 = build_internvideo2(InternVLVisionConfig.from_dict(layout["internvideo2_config"]))
        llm = Phi3ForCausalLM(Phi3Config.from_dict(layout["llm_config"]))
        sam2 = Sam2VideoModel(Sam2VideoConfig.from_dict(layout["sam2_config"]))
        model = VideoGLaMM(config, clip, internvideo2, llm, sam2, llm_tok, clip_tok)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
                  for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(f"the converted checkpoint in {folder}", missing, unexpected, mismatched,
                                      hint="Re-run `refstream convert`.")
    model.load_state_dict(cast_state_dict(state, dtype), strict=True, assign=True)
    materialize_meta_buffers(model)
    return model
