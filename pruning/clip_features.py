"""CLIP ViT-L/14-336 features for VideoGLaMM and LiteLVLM, from one vision forward per batch of frames.

What LiteLVLM needs (docs/design.md, section LiteLVLM; the released code's ``register_attn_hooks`` and
``sim_aware_pruning``, github sejong-rcv/LiteLVLM @ 5896153,
``model/llava/model/multimodal_encoder/clip_encoder.py``) and what VideoGLaMM feeds its projector
(``hidden_states[-2][:, 1:]``) come out of the same forward:

- ``hidden``: ``hidden_states[-2]`` [F, 1+M, D] (the input of the last encoder layer);
- ``q``, ``k``, ``v``: the last layer's ``q_proj``/``k_proj``/``v_proj`` outputs [F, 1+M, D], captured
  by forward hooks (bias included, before the head split and the 1/sqrt(head_dim) scaling);
- ``patch_embeds``: ``visual_projection(post_layernorm(hidden[:, 1:]))`` [F, M, P];
- ``text_embeds``: CLIP ``text_embeds`` of the N texts [N, P] (the final-LN [EOS] state through
  ``text_projection``; not normalised), tokenised with truncation to 77 and padding to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class ClipFrameFeatures:
    """Per-frame CLIP vision features. F frames, M patches (576 at 336 px), width D (1024), projection P (768)."""

    hidden: torch.Tensor  # float [F, 1+M, D], hidden_states[-2], row 0 = CLS
    q: torch.Tensor  # float [F, 1+M, D]
    k: torch.Tensor  # float [F, 1+M, D]
    v: torch.Tensor  # float [F, 1+M, D]
    patch_embeds: torch.Tensor | None  # float [F, M, P]; None when projections were not requested
    #: q_proj / k_proj outputs [F, 1+M, D] of the layer whose OUTPUT is hidden_states[-2] (layer index -2),
    #: whose attention VisionZip and VisPruner read ("CLS attention at layer -2"); None unless requested.
    penultimate_q: torch.Tensor | None = None
    penultimate_k: torch.Tensor | None = None
    num_heads: int = 16  # attention heads of the vision tower (to split q/k into heads)

    @property
    def grid(self) -> int:
        """Side of the square patch grid (24 for ViT-L/14 at 336 px)."""
        side = int(round((self.hidden.shape[1] - 1) ** 0.5))
        return side


class ClipFeatureExtractor:
    """Runs a ``transformers.CLIPModel`` for VideoGLaMM features and LiteLVLM scores.

    Args:
        clip: a ``CLIPModel`` (vision tower, text tower and both projection heads). For the unpruned path
            only the vision tower is used.
        tokenizer: the CLIP tokenizer (``CLIPTokenizer(Fast)`` or the tiny byte-level stand-in).
        chunk_size: frames per vision forward; bounds activation memory.
    """

    def __init__(self, clip, tokenizer=None, chunk_size: int = 16):
        self.clip = clip
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size

    @property
    def device(self) -> torch.device:
        return self.clip.visual_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual_projection.weight.dtype

    @torch.inference_mode()
    def encode_frames(
        self, pixel_values: torch.Tensor, with_scores: bool = True, with_penultimate: bool = False
    ) -> ClipFrameFeatures:
        """Vision forward for F frames; hooks capture the projections the pruning methods need.

        Attention maps are never requested from the model (so every layer keeps its fast attention
        kernel); methods rebuild the one map they need from the hooked q/k (:mod:`pruning.attention`).

        Args:
            pixel_values: float [F, 3, S, S] CLIP-normalised frames (S = 336 for ViT-L/14-336).
            with_scores: capture q/k/v of the last layer and compute ``patch_embeds`` (LiteLVLM, PruMerge,
                TRIM). When False, q/k/v are empty tensors and ``patch_embeds`` is None.
            with_penultimate: capture q/k of the layer at index -2 (VisionZip, VisPruner).

        Returns:
            :class:`ClipFrameFeatures` on the model's device and dtype.
        """
        layers = self.clip.vision_model.encoder.layers
        wanted = {}
        if with_scores:
            wanted.update({"q": layers[-1].self_attn.q_proj, "k": layers[-1].self_attn.k_proj, "v": layers[-1].self_attn.v_proj})
        if with_penultimate:
            wanted.update({"pq": layers[-2].self_attn.q_proj, "pk": layers[-2].self_attn.k_proj})
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("hidden", *wanted)}
        captured: dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
            for name, module in wanted.items()
        ]
        try:
            for start in range(0, pixel_values.shape[0], self.chunk_size):
                chunk = pixel_values[start : start + self.chunk_size].to(self.device, self.dtype)
                out = self.clip.vision_model(pixel_values=chunk, output_hidden_states=True)
                parts["hidden"].append(out.hidden_states[-2])
                for name in wanted:
                    parts[name].append(captured.pop(name))
        finally:
            for handle in handles:
                handle.remove()
        cat = {name: torch.cat(chunks) for name, chunks in parts.items()}
        hidden = cat["hidden"]
        empty = hidden.new_empty(0)
        heads = self.clip.config.vision_config.num_attention_heads
        patch_embeds = None
        if with_scores:
            patch_embeds = self.clip.visual_projection(self.clip.vision_model.post_layernorm(hidden[:, 1:]))
        return ClipFrameFeatures(
            hidden, cat.get("q", empty), cat.get("k", empty), cat.get("v", empty), patch_embeds,
            penultimate_q=cat.get("pq"), penultimate_k=cat.get("pk"), num_heads=heads,
        )

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP ``text_embeds`` of N texts: float [N, P], not normalised.

        Raises:
            ValueError: no texts, an empty text, or no tokenizer.
        """
        if self.tokenizer is None:
            raise ValueError("encode_texts needs the CLIP tokenizer")
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("CLIP texts must be non-empty strings")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        # pooler_output = final-LN hidden state at the [EOS] position (CLIPTextTransformer).
        return self.clip.text_projection(self.clip.text_model(**batch).pooler_output)
