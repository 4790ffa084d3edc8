"""FastV: drop CLIP image tokens inside the LLM, after layer K, ranked by the last token's attention.

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024). Read from github
pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1:
``src/transformers/src/transformers/models/llama/modeling_llama.py`` (``LlamaModel.forward``, the in-place
token-drop branch, L729-760; defaults from ``src/FastV/inference/eval/*.sh``: K = 2) and the static
KV-cache port ``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``
(``LlamaModel.fastv_forward``, L955-1146). This module is written from a description of that code; none
of it is copied.

What FastV does (in-place variant; layers 0-based):

1. layers ``0 .. K-1`` run on the whole sequence (positions ``0 .. L-1``);
2. the attention probabilities of layer ``K-1`` from the LAST token of the input to the image tokens,
   averaged over the heads, rank the image tokens; the top R are kept;
3. the kept rows (system/prefix tokens, the kept image tokens in their ORIGINAL order, every token after
   the image) form a shorter sequence, which keeps the ORIGINAL position ids (RoPE sees gaps) and uses
   causal attention among the kept tokens; layers ``K .. N-1`` run on it.

How it is placed in VideoGLaMM (``workers.videoglamm``; what differs from the original is marked *):

- The image tokens are the CLIP tokens only (16 frames x 144 pooled cells, or x 576 patches); the
  InternVideo2 tokens and all text tokens are always kept.
- * Keep PER FRAME: RefStream's budget is per frame, so each frame keeps its own top ``keep`` CLIP tokens
  (``keep = unit_layout(features, placement, budget)[2]``: ``round(B/4)`` cells pooled, ``B`` patches);
  the original takes a global top-R over the one image. Ties go to the lower unit index (stable sort).
- * The layer K-1 attention is not obtained by switching the model to eager attention (every layer keeps
  SDPA). The output of layer K-1's ``qkv_proj`` is captured by a forward hook while the layer runs, the
  query row of the ranking token and all keys are rotated with Phi-3's own ``apply_rotary_pos_emb``
  (same cos/sin as the layer), and ``softmax(q k^T * head_dim^-0.5)`` over the keys that token may see
  is computed in float32 (the original casts the fp32 softmax back to fp16 before the head mean, which
  creates ties), then averaged over the heads.
- * Batches: the original lets batch element 0 decide for the whole batch (it assumes B = 1). Here, in
  forced mode with several expressions, each sequence ranks with its own last token (``query="last"``,
  default: the last token of the teacher-forced answer ``"Sure, [SEG]."``) or with the token whose
  hidden state becomes the [SEG] prompt (``query="seg"``: the position before ``[SEG]``; this is what
  the original, which re-runs the whole sequence without a cache at every decoding step, does at the step
  that emits ``[SEG]``).
- * Sliding window: Phi-3 as VideoGLaMM runs it masks keys more than ``sliding_window`` positions back.
  After pruning this window is applied on the ORIGINAL positions (query at p sees kept keys at q with
  ``p - window < q <= p``), so keeping every token reproduces the unpruned model exactly. The ranking
  uses the same mask: image tokens outside the ranking token's window get probability 0 (with the full
  3,378-token prompt and window 2,047 the first ~9 frames are outside it; they then keep their first
  ``keep`` units by the tie rule). The original (Llama, no window) has no such case.
- KV cache (generate mode): as the original's static-cache port, the prefill prunes once, ranked by the
  last prompt token; layers ``< K`` cache every token, layers ``>= K`` only the kept ones, and each
  decoded token continues at position ``L, L+1, ...`` of the FULL prompt and attends to the cached kept
  tokens. Decoding with the cache equals re-running prompt + generated tokens without a cache with the
  same kept set (tested). (The original without a cache re-ranks at every step.)
- K = 0 is refused (``ConfigError``): there is no attention before layer 0 to rank by; the original
  keeps a RANDOM subset at K = 0, which is the ``random`` method here. K may equal the number of LLM
  layers (ranking recorded, nothing pruned in effect); larger K raises ``ValueError`` in the LLM.

Cost reporting: every answer carries ``layer_lengths`` (the sequence length each decoder layer processed
in the prefill: the full length for layers ``< K``, the pruned length after), ``fastv_kept`` (kept CLIP
unit indices per frame, ascending) and ``fastv_scores`` (the head-mean attention of the ranking token on
every CLIP token, [F, T]).
"""

from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass, replace

import torch

from pruning.base import PruningMethod, Selection, register, unit_layout
from refstream_errors import ConfigError

QUERIES = ("last", "seg")


@dataclass(frozen=True)
class FastVSettings:
    """What the LLM needs to run FastV.

    Attributes:
        layer: K >= 1; layers ``0 .. K-1`` see every token, the ranking uses layer ``K-1``'s attention.
        keep: CLIP tokens kept per frame (1 .. ``units_per_frame``).
        frames: F, frames of CLIP tokens in the visual input (frame-major, first in the visual tokens).
        units_per_frame: T, CLIP tokens per frame in the visual input (144 pooled, 576 patch).
        query: ``"last"`` (rank with the last token of each sequence) or ``"seg"`` (forced mode: rank with
            the token whose hidden state becomes the [SEG] prompt).
    """

    layer: int
    keep: int
    frames: int
    units_per_frame: int
    query: str = "last"

    @property
    def image_tokens(self) -> int:
        return self.frames * self.units_per_frame

    @property
    def dropped(self) -> int:
        """Tokens removed from each sequence before layer K."""
        return self.frames * (self.units_per_frame - self.keep)


@dataclass
class FastVSelection(Selection):
    """A :class:`Selection` of a method that prunes inside the LLM, carrying the LLM's settings.

    Before the LLM has run, ``indices`` are all units (every CLIP token goes to the LLM); :meth:`with_kept`
    returns the selection with what FastV kept.
    """

    fastv: FastVSettings | None = None

    def with_kept(self, kept: torch.Tensor) -> "FastVSelection":
        """The same selection with ``indices`` = ``kept`` (int64 [F, keep], ascending per frame)."""
        kept = kept.to(self.indices.device)
        return replace(self, indices=kept, similarity_aware=torch.zeros_like(kept, dtype=torch.bool))


@register("fastv")
class FastV(PruningMethod):
    """FastV inside the LLM (see the module docstring). Options: ``layer`` (K, default 2), ``query``."""

    stage = "llm"
    options = {"layer": 2, "query": "last"}

    def __init__(self, **options):
        super().__init__(**options)
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral) or self.layer < 1:
            raise ConfigError(
                f"fastv layer must be an integer >= 1 (got {self.layer!r}): FastV ranks the image tokens by the "
                "attention of layer K-1, which does not exist for K = 0 (the original keeps a random subset "
                "there: use --method random)"
            )
        self.layer = int(self.layer)
        if self.query not in QUERIES:
            raise ConfigError(f"fastv query must be one of {', '.join(QUERIES)}, got {self.query!r}")

    def select(self, features, text_embeds, budget, placement) -> FastVSelection:
        """Every CLIP unit goes to the LLM (``stage="llm"``); ``fastv`` says how many to keep per frame."""
        unit, grid, keep = unit_layout(features, placement, budget)
        frames = features.hidden.shape[0]
        indices = torch.arange(grid * grid, device=features.hidden.device).expand(frames, -1).clone()
        settings = FastVSettings(self.layer, keep, frames, grid * grid, self.query)
        return FastVSelection(indices, torch.zeros_like(indices, dtype=torch.bool), unit, grid, stage="llm", fastv=settings)

    def run_llm(self, model, visual: torch.Tensor, expressions, selection: FastVSelection, mode: str = "forced",
                seed: int = 0):
        """Run ``model.seg_answers`` with FastV (``seed``: of ``mode="sample"``); returns (answers, selection
        filled with the first expression's kept units)."""
        answers = model.seg_answers(visual, list(expressions), mode, fastv=selection.fastv, seed=seed)
        return answers, selection.with_kept(answers[0].fastv_kept)

    def apply_llm(self, model, visual: torch.Tensor, expressions, selection: FastVSelection) -> FastVSelection:
        """What FastV keeps for the first expression (forced mode); used by ``refstream explain``."""
        return self.run_llm(model, visual, expressions, selection, "forced")[1]


# --------------------------------------------------------------------------------------------- LLM side
@dataclass
class FastVPrefill:
    """Result of :func:`fastv_prefill` for a batch of B sequences.

    Attributes:
        hidden: float [B, Lk, H], final-normed last-layer hidden states of the kept rows (right padded).
        kept_index: int64 [B, Lk], the original sequence index of each row (``-1`` on padding).
        kept_units: int64 [B, F, keep], kept CLIP units of each frame, ascending.
        scores: float32 [B, F, T], head-mean layer K-1 attention of the ranking token on each CLIP token.
        layer_lengths: per sequence, the length each decoder layer processed.
    """

    hidden: torch.Tensor
    kept_index: torch.Tensor
    kept_units: torch.Tensor
    scores: torch.Tensor
    layer_lengths: list[list[int]]

    def row_of(self, b: int, original_index: int) -> int:
        """Row of sequence ``b``'s output holding original sequence index ``original_index``."""
        hits = (self.kept_index[b] == original_index).nonzero()
        if hits.numel() != 1:
            raise ValueError(f"sequence index {original_index} was pruned")
        return int(hits[0, 0])


@dataclass
class FastVDecodeState:
    """KV-cache state after a FastV prefill (batch 1): the cache and the positions each layer group holds."""

    cache: object  # transformers DynamicCache
    layer: int
    early_positions: torch.Tensor  # int64 [Pe]: positions cached by layers < K (all tokens)
    late_positions: torch.Tensor  # int64 [Pl]: positions cached by layers >= K (kept tokens)
    next_position: int


def attention_allowed(q_pos, q_valid, k_pos, k_valid, window: int | None) -> torch.Tensor:
    """bool [B, 1, Lq, Lk]: query i may attend to key j (causal on positions, sliding window on positions).

    ``window``: keys at positions ``> p - window`` are visible to a query at ``p`` (transformers'
    ``sliding_window_overlay``), None for no window.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp <= qp) & q_valid[:, :, None] & k_valid[:, None, :]
    if window is not None:
        allowed &= kp > qp - window
    return allowed[:, None]


def _rope(module):
    """Phi-3's ``apply_rotary_pos_emb`` from the module that defines the attention layer."""
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


def ranking_attention(attn, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query_index: torch.Tensor,
                      allowed_row: torch.Tensor) -> torch.Tensor:
    """Head-mean attention probabilities of one query row per sequence, rebuilt from ``qkv_proj``'s output.

    Args:
        attn: the ``Phi3Attention`` module of layer K-1 (for head counts and scaling).
        qkv: [B, L, (Hq + 2 Hkv) * d], its ``qkv_proj`` output on the whole sequence.
        cos, sin: [B, L, rot] the rotary tables the layer used.
        query_index: int64 [B], the ranking token of each sequence.
        allowed_row: bool [B, L], the keys that token may see (its attention-mask row).

    Returns:
        float32 [B, L]: ``mean_h softmax(q_h k_h^T * scaling)`` of the query row.
    """
    cfg = attn.config
    b_idx = torch.arange(qkv.shape[0], device=qkv.device)
    heads, kv_heads, d = cfg.num_attention_heads, attn.num_key_value_heads, attn.head_dim
    q = qkv[b_idx, query_index, : heads * d].view(-1, 1, heads, d).transpose(1, 2)  # [B, Hq, 1, d]
    k = qkv[..., heads * d : (heads + kv_heads) * d].view(qkv.shape[0], qkv.shape[1], kv_heads, d).transpose(1, 2)
    rope = _rope(attn)
    q = rope(q, q, cos[b_idx, query_index][:, None], sin[b_idx, query_index][:, None])[0]
    k = rope(k, k, cos, sin)[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # query head h uses key head h // groups
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # [B, Hq, 1, L]
    logits = logits.masked_fill(~allowed_row[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]


def _run_layers(layers, hidden, mask, positions, rotary, cache):
    position_embeddings = rotary(hidden, positions)
    for layer in layers:
        hidden = layer(
            hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
            use_cache=cache is not None, position_embeddings=position_embeddings,
        )
    return hidden


def fastv_prefill(llm_model, embeds: torch.Tensor, lengths, image_start: int, settings: FastVSettings,
                  query_index=None, cache=None, kept_units: torch.Tensor | None = None):
    """Run a ``Phi3Model`` with FastV on a right-padded batch.

    Args:
        llm_model: ``Phi3ForCausalLM.model``.
        embeds: float [B, L, H] input embeddings, right padded.
        lengths: B valid lengths (int64 tensor or list).
        image_start: sequence index of the first CLIP token (the same in every sequence).
        settings: :class:`FastVSettings`.
        query_index: B ranking-token indices (default: each sequence's last token).
        cache: a ``DynamicCache`` (no config, so no layer crops it; batch 1 only) to fill for decoding.
        kept_units: int64 [B, F, keep] to impose instead of ranking (used to check decoding against a
            re-computation with the same kept set); scores are still computed.

    Returns:
        :class:`FastVPrefill`, plus a :class:`FastVDecodeState` when ``cache`` is given.
    """
    device = embeds.device
    batch, length, _ = embeds.shape
    cfg = llm_model.config
    layers = llm_model.layers[: cfg.num_hidden_layers]
    K, F, T, keep = settings.layer, settings.frames, settings.units_per_frame, settings.keep
    if not 1 <= K <= len(layers):
        raise ValueError(f"FastV layer K={K} must be in 1..{len(layers)} (the LLM's layers)")
    if not 1 <= keep <= T:
        raise ValueError(f"FastV keep={keep} must be in 1..{T}")
    if cache is not None and batch != 1:
        raise ValueError("FastV decoding with a KV cache runs one sequence at a time")
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if int(lengths.min()) < image_start + F * T:
        raise ValueError("a sequence is shorter than its CLIP tokens")
    query_index = lengths - 1 if query_index is None else torch.as_tensor(query_index, dtype=torch.long, device=device)
    window = getattr(cfg, "sliding_window", None)

    # layers 0 .. K-1: every token, positions 0 .. L-1
    positions = torch.arange(length, device=device).expand(batch, -1)
    valid = positions < lengths[:, None]
    eye = torch.eye(length, dtype=torch.bool, device=device)[None, None]
    allowed = attention_allowed(positions, valid, positions, valid, window) | eye  # padding rows see themselves
    captured = {}
    hook = layers[K - 1].self_attn.qkv_proj.register_forward_hook(lambda _m, _i, out: captured.__setitem__("qkv", out))
    try:
        hidden = _run_layers(layers[:K], embeds, allowed, positions, llm_model.rotary_emb, cache)
    finally:
        hook.remove()

    # rank the CLIP tokens with layer K-1's attention of the ranking token
    cos, sin = llm_model.rotary_emb(embeds, positions)
    b_idx = torch.arange(batch, device=device)
    probs = ranking_attention(layers[K - 1].self_attn, captured.pop("qkv"), cos, sin, query_index,
                              allowed[b_idx, 0, query_index])
    scores = probs[:, image_start : image_start + F * T].reshape(batch, F, T)
    if kept_units is None:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # ties: lower index first
        kept_units = order[..., :keep].sort(dim=-1).values
    kept_units = kept_units.to(device)

    # the shortened sequences: prefix, kept CLIP tokens (original order), everything after the CLIP tokens
    image_end = image_start + F * T
    new_lengths = lengths - settings.dropped
    new_length = int(new_lengths.max())
    kept_index = torch.full((batch, new_length), -1, dtype=torch.long, device=device)
    frame_offset = image_start + torch.arange(F, device=device)[:, None] * T
    for b in range(batch):
        rows = torch.cat([
            torch.arange(image_start, device=device),
            (frame_offset + kept_units[b]).flatten(),
            torch.arange(image_end, int(lengths[b]), device=device),
        ])
        kept_index[b, : rows.numel()] = rows
    kept_valid = kept_index >= 0
    kept_pos = kept_index.clamp(min=0)
    hidden = hidden.gather(1, kept_pos[..., None].expand(-1, -1, hidden.shape[-1]))
    eye = torch.eye(new_length, dtype=torch.bool, device=device)[None, None]
    allowed = attention_allowed(kept_pos, kept_valid, kept_pos, kept_valid, window) | eye
    hidden = _run_layers(layers[K:], hidden, allowed, kept_pos, llm_model.rotary_emb, cache)
    hidden = llm_model.norm(hidden)

    layer_lengths = [[int(lengths[b])] * K + [int(new_lengths[b])] * (len(layers) - K) for b in range(batch)]
    result = FastVPrefill(hidden, kept_index, kept_units, scores, layer_lengths)
    if cache is None:
        return result
    state = FastVDecodeState(cache, K, torch.arange(length, device=device), kept_index[0].clone(), length)
    return result, state


def fastv_decode_step(llm_model, embeds: torch.Tensor, state: FastVDecodeState) -> torch.Tensor:
    """One greedy-decoding step after :func:`fastv_prefill` with a cache.

    Args:
        embeds: float [1, 1, H], the embedding of the token just produced.
        state: updated in place (the new token is cached by every layer at the next full position).

    Returns:
        float [1, 1, H], the final-normed hidden state of the new token.
    """
    device = embeds.device
    cfg = llm_model.config
    layers = llm_model.layers[: cfg.num_hidden_layers]
    window = getattr(cfg, "sliding_window", None)
    new = torch.tensor([state.next_position], device=device)
    q_pos, q_valid = new[None], torch.ones(1, 1, dtype=torch.bool, device=device)
    early = torch.cat([state.early_positions, new])
    late = torch.cat([state.late_positions, new])

    early_mask, late_mask = (
        attention_allowed(q_pos, q_valid, keys[None], torch.ones_like(keys, dtype=torch.bool)[None], window)
        for keys in (early, late)
    )
    position_embeddings = llm_model.rotary_emb(embeds, q_pos)
    hidden = embeds
    for i, layer in enumerate(layers):
        hidden = layer(
            hidden, attention_mask=early_mask if i < state.layer else late_mask, position_ids=q_pos,
            past_key_values=state.cache, use_cache=True, position_embeddings=position_embeddings,
        )
    state.early_positions, state.late_positions, state.next_position = early, late, state.next_position + 1
    return llm_model.norm(hidden)
