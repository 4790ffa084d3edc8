"""VideoGLaMM assembled from transformers hosts, with pruned CLIP tokens.

Architecture (github mbzuai-oryx/VideoGLaMM @ 6b15b1e; docs/design.md, section VideoGLaMM):

- spatial encoder: ``CLIPModel`` (ViT-L/14-336), ``hidden_states[-2][:, 1:]``, 576 patches per frame;
- temporal encoder: InternVideo2-1B on ``InternVLVisionModel`` (:mod:`workers.internvideo2`), 256 tokens
  per frame in 4-frame chunks;
- V->L adapters ``image_mm_projector`` (CLIP) and ``mm_projector`` (InternVideo2), each ``mlp2x_gelu``,
  followed by adaptive average pooling: CLIP 24x24 -> 12x12, InternVideo2 16x16 -> 8x8
  (``VideoGLaMM/model/videogpt_plus/model/arch.py``, ``project``);
- LLM ``Phi3ForCausalLM``; the visual tokens (16 x 144 CLIP, frame-major, then 16 x 64 InternVideo2)
  replace the run of ``<image>`` placeholders (``arch.py``, ``prepare_inputs_labels_for_multimodal``);
- L->V adapter ``text_hidden_fcs``: Linear(H, H)-ReLU-Linear(H, 256) on the final-normed last-layer
  hidden state of the position whose next token is ``[SEG]`` (``VideoGLaMM/model/VideoGLaMM.py``,
  ``model_forward``);
- pixel decoder: ``Sam2VideoModel`` driven by :mod:`workers.sam2_decoder`.

Pruned tokens are placed in one of two ways (``placement``):

``pooled`` (default)
    All 576 patches are projected and pooled to the 144 cells of the 12x12 grid as in VideoGLaMM; the
    pruning method selects ``round(B / 4)`` cells per frame and only those go to the LLM.
``patch``
    The B kept patches of each frame are projected and go to the LLM unpooled.

Methods that prune inside the LLM (FastV, :mod:`pruning.methods.fastv`) send every CLIP token and pass
``fastv=`` settings to :meth:`VideoGLaMM.seg_answers`: layers ``< K`` see every token, layers ``>= K`` only
the kept ones at their original positions; the answers report what was kept and each layer's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from pruning.methods.fastv import fastv_decode_step, fastv_prefill
from pruning.registry import Selection
from refstream_errors import ExpressionError, SequenceTooLongError, option

IMAGE_PLACEHOLDER = "<image>"


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA's ``mlp2x_gelu`` projector: Linear(in, out) - GELU - Linear(out, out)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def pool_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """Adaptive average pooling of square token grids.

    Args:
        tokens: float [B, L, C] with L = g*g tokens in row-major order.
        side: output grid side s.

    Returns:
        float [B, s*s, C], row-major (as ``apply_adaptive_avg_pooling`` in VideoGLaMM's ``arch.py``).
    """
    b, length, c = tokens.shape
    g = int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"expected a square token grid, got {length} tokens")
    grid = tokens.transpose(1, 2).reshape(b, c, g, g)
    return F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)


@dataclass
class SegAnswer:
    """The LLM's answer for one expression.

    ``embedding``: float [seg_dim] (the [SEG] prompt for SAM2) or None when the answer has no [SEG];
    ``text``: the answer text (the forced answer, or what greedy decoding produced);
    ``layer_lengths``: the sequence length each LLM decoder layer processed in the prefill (all equal
    without in-LLM pruning; with FastV the full length for layers < K and the pruned length after), for
    honest FLOP counts (decoding adds one token per step on top);
    ``fastv_kept``: int64 [F, keep] CLIP units FastV kept per frame (ascending), None without FastV;
    ``fastv_scores``: float32 [F, T] the head-mean layer K-1 attention FastV ranked by, None without FastV.
    """

    expression: str
    embedding: torch.Tensor | None
    text: str
    layer_lengths: list[int] | None = None
    fastv_kept: torch.Tensor | None = None
    fastv_scores: torch.Tensor | None = None


class VideoGLaMM(nn.Module):
    """VideoGLaMM with LiteLVLM-ready inputs. Build it with :func:`workers.build.build_model`.

    Args:
        config: the :class:`workers.config.ModelConfig` it was built from.
        clip: ``transformers.CLIPModel``.
        internvideo2: :class:`workers.internvideo2.InternVideo2Encoder`.
        llm: ``transformers.Phi3ForCausalLM`` with ``[SEG]`` in its vocabulary.
        sam2: ``transformers.Sam2VideoModel``.
        llm_tokenizer: the Phi-3 tokenizer with ``[SEG]``.
        clip_tokenizer: the CLIP tokenizer.
    """

    def __init__(self, config, clip, internvideo2, llm, sam2, llm_tokenizer, clip_tokenizer):
        super().__init__()
        self.config = config
        self.clip = clip
        self.internvideo2 = internvideo2
        self.llm = llm
        self.sam2 = sam2
        self.llm_tokenizer = llm_tokenizer
        self.clip_tokenizer = clip_tokenizer
        hidden = llm.config.hidden_size
        self.image_mm_projector = mlp2x_gelu(clip.config.vision_config.hidden_size, hidden)
        self.mm_projector = mlp2x_gelu(internvideo2.hidden_size, hidden)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.seg_dim))
        self.seg_token_id = llm_tokenizer.convert_tokens_to_ids("[SEG]")
        if self.seg_token_id is None or self.seg_token_id == llm_tokenizer.unk_token_id:
            raise ValueError("the LLM tokenizer has no [SEG] token")

    # ------------------------------------------------------------------ visual tokens
    @property
    def device(self) -> torch.device:
        return self.image_mm_projector[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_mm_projector[0].weight.dtype

    @torch.inference_mode()
    def clip_tokens(self, hidden: torch.Tensor, kept, placement: str) -> torch.Tensor:
        """CLIP visual tokens for the LLM.

        Args:
            hidden: float [F, 1+M, D] CLIP ``hidden_states[-2]`` (row 0 = CLS, never used).
            kept: a :class:`pruning.registry.Selection` (kept or merged units), an int64 [F, K] tensor of
                kept indices (patches for ``patch``, 12x12 cells for ``pooled``) in output order, or None
                for the unpruned path (all 144 pooled cells).
            placement: ``"pooled"`` or ``"patch"``.

        Returns:
            float [F, K, H] projected tokens (K = 144 when ``kept`` is None).

        Raises:
            ValueError: unknown placement.
        """
        if placement not in ("pooled", "patch"):
            raise ValueError(f"unknown placement {placement!r}: use 'pooled' or 'patch'")
        patches = hidden[:, 1:].to(self.dtype)
        if isinstance(kept, torch.Tensor):
            kept = Selection(kept, torch.zeros_like(kept, dtype=torch.bool), "", 0)
        gather = None if kept is None else kept.gather
        if placement == "patch" and gather is not None:
            return self.image_mm_projector(gather(patches))  # select / merge CLIP features, then project
        cells = pool_grid(self.image_mm_projector(patches), self.config.clip_pool)
        return cells if gather is None else gather(cells)

    @torch.inference_mode()
    def internvideo2_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """InternVideo2 visual tokens for the LLM.

        Args:
            frames: float [T, 3, 224, 224] ImageNet-normalised encoder frames, T a multiple of 4.

        Returns:
            float [T, 64, H]: projected, then pooled 16x16 -> 8x8 per frame.
        """
        features = self.internvideo2(frames.to(self.device))
        return pool_grid(self.mm_projector(features.to(self.dtype)), self.config.internvideo2_pool)

    # ------------------------------------------------------------------ prompt
    def question(self, expression: str) -> str:
        """The user question for an expression (lowercased as in VideoGLaMM's ``eval_referdavis_infer.py``)."""
        expression = expression.strip()
        if not expression:
            raise ExpressionError(f"the referring expression is empty: pass {option('expressions', ['the black swan'])}")
        return self.config.question.format(expression=expression.lower())

    def prompt_ids(self, expression: str, answer: str = "") -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens, in the phi3_instruct template.

        ``<|system|>\\n{system}<|end|>\\n<|user|>\\n<image>\\n{question}<|end|>\\n<|assistant|>\\n{answer}``
        (VideoGLaMM ``model/videogpt_plus/conversation.py`` ``conv_phi3_instruct``, ``utils/conv_generator.py``
        ``apply_for_chat``).

        BOS as the original's ``tokenizer_image_token`` (mbzuai-oryx/VideoGLaMM@6b15b1e
        ``VideoGLaMM/model/videogpt_plus/mm_utils.py`` L17-37) leaves it: each side is tokenised with the
        tokenizer's own special tokens; when the first side starts with BOS, that one BOS is kept and the second
        side's leading token is dropped. So the sequence has exactly one BOS if the tokenizer adds one
        (``add_bos_token``), none if it does not (e.g. a Phi-3 ``tokenizer_config.json`` with
        ``add_bos_token: false``).

        Returns:
            (prefix ids, suffix ids); the visual tokens go between them.
        """
        text = (
            f"<|system|>\n{self.config.system_prompt}<|end|>\n<|user|>\n{IMAGE_PLACEHOLDER}\n"
            f"{self.question(expression)}<|end|>\n<|assistant|>\n{answer}"
        )
        before, after = text.split(IMAGE_PLACEHOLDER)
        tok = self.llm_tokenizer
        prefix, suffix = tok(before).input_ids, tok(after).input_ids
        if tok.bos_token_id is not None and prefix[:1] == [tok.bos_token_id]:
            suffix = suffix[1:]  # the original slices every chunk after the first [offset:] with offset 1
        return prefix, suffix

    def sequence_length(self, num_visual: int, expression: str = "x") -> int:
        """LLM input length for ``num_visual`` visual tokens and the forced answer."""
        prefix, suffix = self.prompt_ids(expression, self.config.forced_answer)
        return len(prefix) + num_visual + len(suffix)

    def check_sequence_length(self, num_visual: int, expressions: Sequence[str], mode: str = "forced") -> None:
        """Raise :class:`SequenceTooLongError` when the prompt (plus ``max_new_tokens`` when generating)
        would exceed the LLM's positions."""
        limit = self.llm.config.max_position_embeddings
        lengths = {e: self.sequence_length(num_visual, e) for e in expressions}
        worst = max(lengths, key=lengths.get)
        longest = lengths[worst]
        if mode in ("generate", "sample"):
            longest += self.config.max_new_tokens
        if longest <= limit:
            return
        own = len(self.llm_tokenizer(worst, add_special_tokens=False).input_ids)
        others = longest - own  # the template, the visual tokens and the room for the answer
        if others <= limit:  # without the expression it would fit: the expression is what is too long
            raise SequenceTooLongError(
                f"the referring expression is too long: {own} tokens ({len(worst)} characters), but the LLM has "
                f"{limit} positions and the prompt template, {num_visual} visual tokens and the answer take "
                f"{others}. Fix: shorten the expression to at most {limit - others} tokens.")
        raise SequenceTooLongError(
            f"the LLM input would be {longest} tokens ({num_visual} visual, the expression {own}) but the LLM has "
            f"{limit} positions. Use fewer encoder frames ({option('frames')}), a smaller budget ({option('budget')}), "
            f"or {option('placement', 'pooled')}.")

    # ------------------------------------------------------------------ [SEG]
    @torch.inference_mode()
    def seg_answers(self, visual: torch.Tensor, expressions: Sequence[str], mode: str = "forced",
                    fastv=None, seed: int = 0) -> list[SegAnswer]:
        """Run the LLM on the visual tokens for each expression and return the [SEG] prompts.

        Args:
            visual: float [V, H] visual tokens in LLM order (CLIP frame-major, then InternVideo2).
            expressions: E referring expressions.
            mode: ``"forced"`` (teacher-forced answer ``config.forced_answer``, one batched prefill,
                deterministic), ``"generate"`` (greedy decoding with the KV cache, up to
                ``config.max_new_tokens``; the first generated ``[SEG]`` is used) or ``"sample"`` (the same,
                sampling each token with ``config.temperature`` and nucleus ``config.top_p``, the checkpoint's
                ``generation_config.json`` values when it has one; a generator seeded with ``seed`` per
                expression, so an answer does not depend on the others).
            fastv: a :class:`pruning.methods.fastv.FastVSettings` to prune CLIP tokens inside the LLM
                (FastV: the first ``fastv.frames * fastv.units_per_frame`` visual tokens are the CLIP
                tokens), or None.
            seed: seeds ``"sample"`` (ignored otherwise).

        Returns:
            E :class:`SegAnswer`; ``embedding`` is float [seg_dim] or None when no [SEG] was produced.
        """
        if fastv is not None:
            if fastv.image_tokens > visual.shape[0]:
                raise ValueError(f"FastV expects {fastv.image_tokens} CLIP tokens but got {visual.shape[0]} visual tokens")
            layers = self.llm.config.num_hidden_layers
            if not 1 <= fastv.layer <= layers:
                raise ValueError(f"FastV layer K={fastv.layer} must be in 1..{layers} (the LLM's layers)")
        try:
            self.check_sequence_length(visual.shape[0], expressions, mode)
        except SequenceTooLongError as error:
            if fastv is None:
                raise
            raise SequenceTooLongError(
                f"{error.args[0]} With FastV every CLIP token enters the LLM (pruning happens after layer "
                f"{fastv.layer}), so {option('budget')} does not shorten the input: use {option('placement', 'pooled')}, "
                f"or {option('frames', 4)} with {option('placement', 'patch')}."
            ) from None
        if mode == "forced":
            return self._forced(visual, expressions, fastv)
        if mode == "generate":
            return [self._generate(visual, e, fastv) for e in expressions]
        if mode == "sample":
            return [self._generate(visual, e, fastv, sample_seed=seed) for e in expressions]
        raise ValueError(f"unknown answer mode {mode!r}: use 'forced', 'generate' or 'sample'")

    def _embed(self, prefix: list[int], visual: torch.Tensor, suffix: list[int]) -> torch.Tensor:
        embed = self.llm.get_input_embeddings()
        ids = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return torch.cat([embed(ids(prefix)), visual.to(self.dtype), embed(ids(suffix))])

    def _forced(self, visual: torch.Tensor, expressions: Sequence[str], fastv=None) -> list[SegAnswer]:
        sequences, seg_positions, prefix_lengths = [], [], set()
        for expression in expressions:
            prefix, suffix = self.prompt_ids(expression, self.config.forced_answer)
            if self.seg_token_id not in suffix:
                raise ValueError(f"the forced answer {self.config.forced_answer!r} has no [SEG]")
            sequences.append(self._embed(prefix, visual, suffix))
            seg_positions.append(len(prefix) + visual.shape[0] + suffix.index(self.seg_token_id) - 1)
            prefix_lengths.add(len(prefix))
        lengths = [s.shape[0] for s in sequences]
        longest = max(lengths)
        batch = torch.zeros(len(sequences), longest, sequences[0].shape[-1], dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=self.device)
        for i, seq in enumerate(sequences):  # right padding: causal attention never sees it
            batch[i, : seq.shape[0]] = seq
            mask[i, : seq.shape[0]] = 1
        forced = self.config.forced_answer
        if fastv is None:
            hidden = self.llm.model(inputs_embeds=batch, attention_mask=mask, use_cache=False).last_hidden_state
            rows = hidden[torch.arange(len(sequences)), torch.tensor(seg_positions)]
            embeddings = self.text_hidden_fcs(rows)
            layers = self.llm.config.num_hidden_layers
            return [SegAnswer(e, embeddings[i], forced, [lengths[i]] * layers) for i, e in enumerate(expressions)]

        (image_start,) = prefix_lengths  # the prompt before <image> does not depend on the expression
        query = seg_positions if fastv.query == "seg" else None  # None: each sequence's last token
        result = fastv_prefill(self.llm.model, batch, lengths, image_start, fastv, query_index=query)
        rows = torch.stack([result.hidden[i, result.row_of(i, p)] for i, p in enumerate(seg_positions)])
        embeddings = self.text_hidden_fcs(rows)
        return [
            SegAnswer(e, embeddings[i], forced, result.layer_lengths[i], result.kept_units[i], result.scores[i])
            for i, e in enumerate(expressions)
        ]

    def _next_token(self, last: torch.Tensor, generator: torch.Generator | None) -> int:
        """Greedy (``generator`` None) or sampled: softmax(logits / temperature), then the smallest set of tokens
        whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020; transformers'
        ``TopPLogitsWarper`` keeps the same set)."""
        logits = self.llm.lm_head(last).float()
        if generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits / max(self.config.temperature, 1e-5), dim=-1).cpu()
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # probability mass ranked above each token
        ordered[before >= self.config.top_p] = 0.0  # always keeps the most likely token
        return int(order[torch.multinomial(ordered, 1, generator=generator)])

    def _generate(self, visual: torch.Tensor, expression: str, fastv=None, sample_seed: int | None = None) -> SegAnswer:
        prefix, suffix = self.prompt_ids(expression)
        tok = self.llm_tokenizer
        stop = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")) if i is not None}
        inputs = self._embed(prefix, visual, suffix).unsqueeze(0)
        layers = self.llm.config.num_hidden_layers
        layer_lengths, kept, scores = [inputs.shape[1]] * layers, None, None
        if fastv is None:
            cache = DynamicCache(config=self.llm.config)

            def forward(inputs):
                out = self.llm.model(inputs_embeds=inputs, past_key_values=cache, use_cache=True)
                return out.last_hidden_state[0, -1]
        else:
            # prune once in the prefill (ranked by the last prompt token); decode on the pruned KV cache
            result, state = fastv_prefill(
                self.llm.model, inputs, [inputs.shape[1]], len(prefix), fastv, cache=DynamicCache()
            )
            layer_lengths, kept, scores = result.layer_lengths[0], result.kept_units[0], result.scores[0]
            prefill_last = result.hidden[0, -1]

            def forward(inputs):
                return fastv_decode_step(self.llm.model, inputs, state)[0, -1]

        generated: list[int] = []
        seg_embedding = None
        generator = None if sample_seed is None else torch.Generator().manual_seed(int(sample_seed))
        for step in range(self.config.max_new_tokens):
            last = prefill_last if fastv is not None and step == 0 else forward(inputs)
            token = self._next_token(last, generator)
            if token in stop:
                break
            generated.append(token)
            if token == self.seg_token_id and seg_embedding is None:
                seg_embedding = self.text_hidden_fcs(last)
            inputs = self.llm.get_input_embeddings()(torch.tensor([[token]], device=self.device))
        return SegAnswer(expression, seg_embedding, tok.decode(generated), layer_lengths, kept, scores)
