"""Model size and forward cost at full size, on the meta device (no weights, no memory, seconds on a CPU).

``parameter_counts`` counts parameters per VideoGLaMM module; ``stage_flops`` counts FLOPs per stage with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; 2 FLOPs per
multiply-add) by running each stage on meta tensors of the right shapes:

- CLIP vision tower for F frames at 336 px (``hidden_states`` up to the last layer, as VideoGLaMM runs it);
- InternVideo2 for F/4 chunks of 4 frames at 224 px;
- the two projectors (CLIP tokens before pooling, InternVideo2 tokens);
- the Phi-3 prefill of the whole sequence; for methods that prune inside the LLM (FastV) each layer is
  counted at its own length (full before layer K, pruned after);
- SAM2 per frame: the Hiera image encoder at 1024 px plus memory attention over a full memory bank
  (7 mask memories of 64x64 tokens and 16 object pointers of 4 tokens).

Reference figures (docs/design.md, section Model size and cost): CLIP 0.38 TFLOPs/frame, InternVideo2 2.25
per 4-frame chunk, SAM2 1.83 + 0.61 per frame, LLM prefill 29.0 at the unpruned 3,378-token sequence.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPModel, Phi3ForCausalLM, Sam2VideoModel

from pruning.registry import cells_for_budget
from workers.build import clip_config, phi3_config
from workers.config import ModelConfig
from workers.internvideo2 import build_internvideo2, internvideo2_vision_config
from workers.sam2_decoder import sam2_video_config
from workers.videoglamm import mlp2x_gelu

#: Text tokens of the default prompt with the Phi-3 tokenizer (3,378 - 3,328 visual tokens; docs/design.md,
#: section VideoGLaMM).
PHI3_PROMPT_TOKENS = 50


def build_skeleton(config: ModelConfig):
    """The VideoGLaMM modules of ``config`` on the meta device (shapes only): a dict of module name -> module.

    The sizes are the preset's (``configs/*.yaml``: ``clip``, ``internvideo2``, ``llm``, ``sam2`` sections).

    Keys: ``clip`` (CLIPModel), ``internvideo2``, ``llm`` (Phi3ForCausalLM), ``sam2`` (Sam2VideoModel),
    ``image_mm_projector``, ``mm_projector``, ``text_hidden_fcs``.
    """
    with torch.device("meta"):
        clip = CLIPModel(clip_config(config))
        internvideo2 = build_internvideo2(internvideo2_vision_config(config.internvideo2))
        llm = Phi3ForCausalLM(phi3_config(config))
        sam2 = Sam2VideoModel(sam2_video_config(config.sam2))
        hidden = llm.config.hidden_size
        return {
            "clip": clip,
            "internvideo2": internvideo2,
            "llm": llm,
            "sam2": sam2,
            "image_mm_projector": mlp2x_gelu(clip.config.vision_config.hidden_size, hidden),
            "mm_projector": mlp2x_gelu(internvideo2.hidden_size, hidden),
            "text_hidden_fcs": torch.nn.Sequential(
                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, config.seg_dim)
            ),
        }


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(parts: dict) -> dict[str, int]:
    """Parameters per module (CLIP vision = ``vision_model``, CLIP text = ``text_model``, heads apart)."""
    clip = parts["clip"]
    counts = {
        "clip_vision": _count(clip.vision_model),
        "clip_text": _count(clip.text_model),
        "clip_projection_heads": _count(clip.visual_projection) + _count(clip.text_projection),
        "internvideo2": _count(parts["internvideo2"]),
        "llm": _count(parts["llm"]),
        "sam2": _count(parts["sam2"]),
        "image_mm_projector": _count(parts["image_mm_projector"]),
        "mm_projector": _count(parts["mm_projector"]),
        "text_hidden_fcs": _count(parts["text_hidden_fcs"]),
    }
    counts["total"] = sum(counts.values())
    return counts


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        fn()
    return int(counter.get_total_flops())


def visual_layout(config, frames: int, method: str, budget: int, placement: str) -> dict:
    """CLIP tokens per frame into the LLM, and the FastV keep, for a method / budget / placement."""
    grid = config.clip_pool * 2  # 24 patches per side
    all_units = grid * grid if placement == "patch" else config.clip_pool**2
    keep = min(budget, grid * grid) if placement == "patch" else cells_for_budget(budget, config.clip_pool**2)
    name = method.split(":")[0]
    if name == "none":
        keep = all_units
    into_llm = all_units if name == "fastv" else keep
    return {"clip_units_per_frame": all_units, "clip_tokens_per_frame": into_llm, "fastv_keep": keep if name == "fastv" else None,
            "internvideo2_tokens_per_frame": config.internvideo2_pool**2, "frames": frames}


def stage_flops(parts: dict, config, *, frames: int = 16, method: str = "none", budget: int = 576,
                placement: str = "pooled", text_tokens: int = PHI3_PROMPT_TOKENS, fastv_layer: int = 2) -> dict:
    """FLOPs per stage for one clip of ``frames`` encoder frames (see the module docstring).

    Returns:
        dict with ``sequence_length``, ``layer_lengths`` (per LLM layer), ``fits_positions``, the visual
        layout and ``flops`` per stage (``clip``, ``internvideo2``, ``projectors``, ``llm_prefill``,
        ``sam2_per_frame`` = ``sam2_image_encoder`` + ``sam2_memory_attention``).
    """
    clip, iv2, llm, sam2 = parts["clip"], parts["internvideo2"], parts["llm"], parts["sam2"]
    layout = visual_layout(config, frames, method, budget, placement)
    clip_size = clip.config.vision_config.image_size
    hidden = llm.config.hidden_size
    per_frame_iv2 = layout["internvideo2_tokens_per_frame"]
    visual = frames * (layout["clip_tokens_per_frame"] + per_frame_iv2)
    full_length = text_tokens + visual
    n_layers = llm.config.num_hidden_layers
    layer_lengths = [full_length] * n_layers
    if layout["fastv_keep"] is not None:
        pruned = full_length - frames * (layout["clip_tokens_per_frame"] - layout["fastv_keep"])
        layer_lengths = [full_length] * min(fastv_layer, n_layers) + [pruned] * max(0, n_layers - fastv_layer)

    flops = {}
    flops["clip"] = _flops(lambda: clip.vision_model(pixel_values=torch.zeros(frames, 3, clip_size, clip_size),
                                                     output_hidden_states=True))
    flops["internvideo2"] = _flops(lambda: iv2(torch.zeros(frames, 3, 224, 224)))
    iv2_tokens = iv2.tokens_per_frame
    clip_in = (clip_size // clip.config.vision_config.patch_size) ** 2
    # pooled: all 576 patches are projected, then pooled; patch: only the kept patches are projected.
    projected_clip = clip_in if placement == "pooled" or method.split(":")[0] in ("none", "fastv") else layout["clip_tokens_per_frame"]
    flops["projectors"] = _flops(lambda: (
        parts["image_mm_projector"](torch.zeros(frames, projected_clip, clip.config.vision_config.hidden_size)),
        parts["mm_projector"](torch.zeros(frames, iv2_tokens, iv2.hidden_size)),
    ))
    flops["llm_prefill"] = _llm_flops(llm, layer_lengths, hidden)
    image_size = sam2.config.image_size if isinstance(sam2.config.image_size, int) else sam2.config.image_size[0]
    flops["sam2_image_encoder"] = _flops(lambda: sam2.get_image_features(torch.zeros(1, 3, image_size, image_size)))
    flops["sam2_memory_attention"] = _memory_attention_flops(sam2)
    flops["sam2_per_frame"] = flops["sam2_image_encoder"] + flops["sam2_memory_attention"]
    return {
        "frames": frames, "method": method, "budget": budget, "placement": placement, **layout,
        "visual_tokens": visual, "text_tokens": text_tokens, "sequence_length": full_length,
        "layer_lengths": layer_lengths, "max_positions": llm.config.max_position_embeddings,
        "fits_positions": full_length <= llm.config.max_position_embeddings, "flops": flops,
    }


def _llm_flops(llm, layer_lengths: list[int], hidden: int) -> int:
    """Prefill FLOPs with each decoder layer at its own sequence length (embedding lookups are free)."""
    total = 0
    rotary = llm.model.rotary_emb
    for length, layer in zip(layer_lengths, llm.model.layers):
        def run(length=length, layer=layer):
            x = torch.zeros(1, length, hidden)
            positions = torch.arange(length).unsqueeze(0)
            layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary(x, positions))
        total += _flops(run)
    last = layer_lengths[-1] if layer_lengths else 0
    total += _flops(lambda: llm.model.norm(torch.zeros(1, last, hidden)))
    return total


def _memory_attention_flops(sam2) -> int:
    """Memory attention of one frame over a full memory bank (num_maskmem mask memories + object pointers)."""
    cfg = sam2.config
    side = cfg.image_size // 16 if isinstance(cfg.image_size, int) else cfg.image_size[0] // 16
    tokens = side * side
    d_model = cfg.memory_attention_hidden_size
    mem_dim = cfg.memory_encoder_output_channels
    pointers = cfg.max_object_pointers_in_encoder * (d_model // mem_dim)
    memory_tokens = cfg.num_maskmem * tokens + pointers
    return _flops(lambda: sam2.memory_attention(
        current_vision_features=torch.zeros(tokens, 1, d_model),
        memory=torch.zeros(memory_tokens, 1, mem_dim),
        current_vision_position_embeddings=torch.zeros(tokens, 1, d_model),
        memory_posision_embeddings=torch.zeros(memory_tokens, 1, mem_dim),
        num_object_pointer_tokens=pointers,
    ))
