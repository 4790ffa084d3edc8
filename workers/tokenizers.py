"""Tokenizers: the real ones for users with weights, byte-level ones built in-process for the tiny preset.

The full model uses the Phi-3 tokenizer shipped in the VideoGLaMM download folder (with ``[SEG]`` added)
and the CLIP BPE tokenizer of ``openai/clip-vit-large-patch14-336``. Neither can be downloaded here, so
the ``tiny`` preset builds byte-level tokenizers with the ``tokenizers`` library: every UTF-8 byte is one
token, plus the special tokens the prompt template needs. They are real tokenizers (encode, decode,
padding, special tokens), just with a small vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from refstream_errors import WeightsNotFoundError

#: Special tokens of the Phi-3 chat template plus VideoGLaMM's grounding token.
PHI3_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|end|>", "<|user|>", "<|assistant|>")
SEG_TOKEN = "[SEG]"
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_level_tokenizer(special_tokens: tuple[str, ...], add_bos: bool = False, **named_tokens: str):
    """A fast tokenizer whose vocabulary is the 256 byte symbols followed by ``special_tokens``.

    Returns a ``transformers.PreTrainedTokenizerFast``; ``named_tokens`` (bos_token=..., eos_token=...,
    pad_token=..., unk_token=...) name roles among the special tokens. ``add_bos``: the tokenizer puts its BOS
    before every text it encodes with special tokens (as a Llama-style ``add_bos_token: true``).
    """
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    if add_bos:
        bos = named_tokens["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named_tokens)


def tiny_llm_tokenizer():
    """Byte-level stand-in for the Phi-3 tokenizer: 256 bytes + Phi-3 chat specials + ``[SEG]`` (265 ids).

    ``[SEG]`` is the last id, as in the released checkpoint where it is appended after the Phi-3 vocabulary.
    """
    return _byte_level_tokenizer(
        PHI3_SPECIAL_TOKENS + (SEG_TOKEN,), bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", add_bos=True,
    )


def tiny_clip_tokenizer():
    """Byte-level stand-in for the CLIP tokenizer: 256 bytes + ``<|startoftext|>`` (256) + ``<|endoftext|>`` (257).

    As in CLIP, [EOS] is the highest id and doubles as padding; sequences are wrapped as [SOS] text [EOS].
    """
    tokenizer = _byte_level_tokenizer(
        CLIP_SPECIAL_TOKENS, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 256), ("<|endoftext|>", 257)],
    )
    tokenizer.model_max_length = 77
    return tokenizer


def load_tokenizer(name_or_path: str | Path, what: str, hint: str):
    """Load a tokenizer from a local folder or a cached Hugging Face id, without touching the network.

    Raises:
        WeightsNotFoundError: naming ``what`` was looked for and ``hint`` (where to get it).
    """
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(
            f"{what} tokenizer not found at {name_or_path!s}: {exc.__class__.__name__}. {hint}"
        ) from exc
