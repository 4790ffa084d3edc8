"""``refstream convert SRC DST``: the official VideoGLaMM folder -> RefStream's own safetensors layout.

The official download (pickle ``.bin`` shards in the original module names, plus CLIP, InternVideo2 and SAM2
base weights found elsewhere) is loaded once, strictly, through :func:`workers.build.build_released`, and
written as one self-contained folder that loads by memory-mapping with no key renaming:

``DST/refstream.json``
    ``{"format": "refstream-videoglamm", "version": 1, "dtype", "source", "llm_config", "clip_config",
    "internvideo2_config", "sam2_config", "seg_dim", "index"}``: the transformers configs of the four hosts
    (``llm_config`` in transformers-5 semantics: ``sliding_window`` already converted).
``DST/model-0000k-of-0000n.safetensors`` + ``DST/model.safetensors.index.json``
    every persistent tensor of :class:`workers.videoglamm.VideoGLaMM` under its own state-dict key
    (``llm.*``, ``clip.*``, ``internvideo2.host.*``, ``sam2.*``, ``image_mm_projector.*``, ``mm_projector.*``,
    ``text_hidden_fcs.*``).
``DST/llm_tokenizer/``, ``DST/clip_tokenizer/``
    ``save_pretrained`` of the two tokenizers.

Pass DST as ``--checkpoint`` (or ``checkpoint:``) to load it; :func:`workers.build.build_model` recognises
the layout by ``refstream.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from refstream_errors import ConfigError
from workers.build import build_released
from workers.config import ModelConfig
from workers.refstream_folder import (
    CLIP_TOKENIZER_DIR,
    FORMAT,
    INDEX_FILE,
    LAYOUT_FILE,
    LLM_TOKENIZER_DIR,
    VERSION,
    load_refstream_folder,
    refstream_folder_problems,
)

__all__ = [
    "FORMAT",
    "LAYOUT_FILE",
    "convert_checkpoint",
    "load_refstream_folder",
    "refstream_folder_problems",
    "save_refstream_folder",
]

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)


# ============================================================================================ write
def save_refstream_folder(model, dst: str | Path, *, dtype: torch.dtype | None = None, shard_bytes: int = 4 << 30,
                          source: str = "") -> dict:
    """Write ``model`` (a loaded :class:`workers.videoglamm.VideoGLaMM`) in RefStream's safetensors layout.

    Args:
        model: the model; its persistent state dict is written as is (cast to ``dtype`` unless None).
        dst: output folder (created; existing layout files are overwritten).
        dtype: tensor dtype on disk, or None to keep each tensor's dtype.
        shard_bytes: upper bound of one shard's size (a larger single tensor gets its own shard).
        source: recorded in ``refstream.json``.

    Returns:
        the ``refstream.json`` content.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    seen: dict[tuple, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        value = value.contiguous()
        if ident in seen or not value.is_contiguous():
            value = value.clone()  # safetensors refuses tensors that share memory
        seen[ident] = key
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # break storage sharing between keys of one shard (safetensors requires disjoint memory)
        ptrs: set[int] = set()
        for key, value in list(shard.items()):
            ptr = value.untyped_storage().data_ptr()
            if ptr in ptrs and value.numel():
                shard[key] = value.clone()
            ptrs.add(shard[key].untyped_storage().data_ptr())
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        for key, value in shard.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2, sort_keys=True))
    model.llm_tokenizer.save_pretrained(dst / LLM_TOKENIZER_DIR)
    model.clip_tokenizer.save_pretrained(dst / CLIP_TOKENIZER_DIR)
    layout = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "source": source,
        "seg_dim": int(model.text_hidden_fcs[2].out_features),
        "llm_config": model.llm.config.to_dict(),
        "clip_config": model.clip.config.to_dict(),
        "internvideo2_config": model.internvideo2.host.config.to_dict(),
        "sam2_config": model.sam2.config.to_dict(),
        "index": INDEX_FILE,
    }
    (dst / LAYOUT_FILE).write_text(json.dumps(layout, indent=2, sort_keys=True, default=str))
    return layout


# ============================================================================================ convert
def convert_checkpoint(config: ModelConfig, src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None,
                       shard_bytes: int = 4 << 30, overwrite: bool = False) -> dict:
    """Load the official folder ``src`` (with ``config``'s base weights) and write ``dst`` in RefStream's layout.

    Raises:
        WeightsNotFoundError (or a subclass): ``src`` or a base model is missing or does not match.
        ConfigError: ``dst`` is not empty and ``overwrite`` is False, or ``dst`` is ``src``.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if src.resolve() == dst.resolve():
        raise ConfigError(f"convert: DST must differ from SRC ({src})")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ConfigError(f"convert: {dst} exists and is not empty; pass --overwrite or choose another folder")
        if (dst / LAYOUT_FILE).is_file():
            for old in dst.glob("model-*-of-*.safetensors"):
                old.unlink()
            for sub in (LLM_TOKENIZER_DIR, CLIP_TOKENIZER_DIR):
                shutil.rmtree(dst / sub, ignore_errors=True)
    model = build_released(config.model_copy(update={"checkpoint": str(src), "random_weights": False}), dtype)
    return save_refstream_folder(model, dst, dtype=dtype, shard_bytes=shard_bytes, source=str(src))


