"""Build VideoGLaMM from a :class:`refstream.config.ModelConfig`: seeded random weights or the released weights.

Random weights (``random_weights: true``, the ``tiny`` preset): every part is built from its config with
a fixed seed, so two builds are identical, and the tokenizers are the byte-level stand-ins of
:mod:`workers.tokenizers`.

Released weights (the ``videoglamm`` preset) come from three places (REFERENCE.md section 2):

- the VideoGLaMM download folder (``--checkpoint DIR`` or ``$REFSTREAM_CHECKPOINT``): ``config.json``,
  ``pytorch_model-0000k-of-0000n.bin`` shards with ``pytorch_model.bin.index.json`` (LoRA merged), and
  the Phi-3 tokenizer files with ``[SEG]``; it provides the LLM, both projectors and ``text_hidden_fcs``;
- ``openai/clip-vit-large-patch14-336`` (hub id in the local cache, or a folder);
- ``InternVideo2-stage2_1b-224p-f4.pt`` (in the checkpoint folder, or an absolute path) and
  ``facebook/sam2-hiera-large-hf``.

Nothing is downloaded: a missing part raises :class:`WeightsNotFoundError` naming what to get, where
to put it, and that ``--model tiny`` runs with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from refstream.config import ModelConfig
from refstream.errors import WeightsNotFoundError

DEFAULT_CHECKPOINT = Path(os.environ.get("REFSTREAM_HOME", Path.home() / ".cache" / "refstream")) / "VideoGLaMM"
TINY_NOTE = "Or run with --model tiny: the same architecture with random weights (masks without meaning)."
VIDEOGLAMM_SOURCE = "the VideoGLaMM release (github.com/mbzuai-oryx/VideoGLaMM, README 'Model Zoo')"


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build a :class:`workers.videoglamm.VideoGLaMM` in eval mode on ``device``.

    Args:
        config: the model configuration.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: parameter dtype (float32 on CPU; bfloat16/float16 on CUDA).

    Raises:
        WeightsNotFoundError: released weights requested but not found (message says where to get them).
    """
    if config.random_weights:
        model = _build_random(config)
    else:
        model = _build_released(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_clip(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Only the CLIP part of a model config (for pruning analyses that need no LLM): ``(CLIPModel, tokenizer)``.

    Random weights are seeded exactly as in :func:`build_model` (so the tiny CLIP here equals the tiny
    model's CLIP); released weights load from ``config.clip.weights`` without network access.

    Raises:
        WeightsNotFoundError: released CLIP weights not found locally.
    """
    from transformers import CLIPModel

    from workers.tokenizers import load_tokenizer, tiny_clip_tokenizer

    if config.random_weights or config.clip.weights is None:
        clip = _seeded(config.seed, lambda: CLIPModel(_clip_config(config)))
        tokenizer = tiny_clip_tokenizer()
    else:
        if not _locally_available(config.clip.weights):
            raise WeightsNotFoundError(
                f"CLIP weights {config.clip.weights!r} are neither a local folder nor in the Hugging Face cache: "
                f"run `huggingface-cli download {config.clip.weights}` on a machine with internet. {TINY_NOTE}"
            )
        clip = CLIPModel.from_pretrained(config.clip.weights, local_files_only=True)
        tokenizer = load_tokenizer(config.clip.weights, "CLIP", f"Download {config.clip.weights}.")
    return clip.to(device=device, dtype=dtype).eval().requires_grad_(False), tokenizer


def _clip_config(config: ModelConfig):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(config.clip.text), vision_config=dict(config.clip.vision), projection_dim=config.clip.projection_dim
    )


def _llm_config(config: ModelConfig):
    from transformers import Phi3Config

    return Phi3Config(**config.llm)


def _build_random(config: ModelConfig):
    from transformers import CLIPModel, Phi3ForCausalLM

    from workers.internvideo2 import build_internvideo2, internvideo2_vision_config
    from workers.sam2_decoder import build_sam2, full_sam2_video_config, tiny_sam2_video_config
    from workers.tokenizers import tiny_clip_tokenizer, tiny_llm_tokenizer
    from workers.videoglamm import VideoGLaMM

    seed = config.seed
    clip = _seeded(seed, lambda: CLIPModel(_clip_config(config)))
    internvideo2 = build_internvideo2(internvideo2_vision_config(config.internvideo2.size), seed=seed + 1)
    llm = _seeded(seed + 2, lambda: Phi3ForCausalLM(_llm_config(config)))
    sam2_config = tiny_sam2_video_config() if config.sam2.size == "tiny" else full_sam2_video_config()
    sam2 = build_sam2(sam2_config, seed=seed + 3, init=config.sam2.init)
    llm_tok, clip_tok = tiny_llm_tokenizer(), tiny_clip_tokenizer()
    _check_vocab(llm, llm_tok)
    return _seeded(seed + 4, lambda: VideoGLaMM(config, clip, internvideo2, llm, sam2, llm_tok, clip_tok))


def _check_vocab(llm, tokenizer) -> None:
    if llm.config.vocab_size < len(tokenizer):
        raise ValueError(f"LLM vocab_size {llm.config.vocab_size} < tokenizer size {len(tokenizer)}")


# --------------------------------------------------------------------------- released weights
def resolve_checkpoint(config: ModelConfig) -> Path:
    """The VideoGLaMM download folder: config, then ``$REFSTREAM_CHECKPOINT``, then ``~/.cache/refstream/VideoGLaMM``."""
    for candidate in (config.checkpoint, os.environ.get("REFSTREAM_CHECKPOINT")):
        if candidate:
            return Path(candidate).expanduser()
    return DEFAULT_CHECKPOINT


def missing_weights(config: ModelConfig) -> list[str]:
    """Human-readable list of the released-weight files that are missing (empty when all are there)."""
    folder = resolve_checkpoint(config)
    problems = []
    if not folder.is_dir():
        problems.append(f"the VideoGLaMM checkpoint folder {folder} does not exist")
    else:
        for name in ("config.json", "pytorch_model.bin.index.json", "tokenizer_config.json"):
            if not (folder / name).is_file():
                problems.append(f"{folder / name} is missing")
    iv2 = config.internvideo2.weights
    if iv2:
        path = Path(iv2) if Path(iv2).is_absolute() else folder / iv2
        if not path.is_file():
            problems.append(f"InternVideo2 weights {path} are missing (OpenGVLab/InternVideo2-Stage2_1B-224p-f4)")
    for what, ref in (("CLIP", config.clip.weights), ("SAM2", config.sam2.weights)):
        if ref and not _locally_available(ref):
            problems.append(f"{what} weights {ref!r} are neither a local folder nor in the Hugging Face cache")
    return problems


def _locally_available(ref: str) -> bool:
    if Path(ref).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:  # noqa: BLE001 - any hub error means "not available offline"
        return False


def _build_released(config: ModelConfig):
    problems = missing_weights(config)
    if problems:
        folder = resolve_checkpoint(config)
        raise WeightsNotFoundError(
            "VideoGLaMM weights not found:\n  - " + "\n  - ".join(problems) + "\n"
            f"Get the VideoGLaMM checkpoint folder from {VIDEOGLAMM_SOURCE} and put it at {folder} (or pass "
            f"--checkpoint DIR / set $REFSTREAM_CHECKPOINT); put InternVideo2-stage2_1b-224p-f4.pt "
            f"(OpenGVLab/InternVideo2-Stage2_1B-224p-f4) inside it; download {config.clip.weights} and "
            f"{config.sam2.weights} with `huggingface-cli download <id>` on a machine with internet. {TINY_NOTE}"
        )
    return _load_released(config, resolve_checkpoint(config))


def _load_released(config: ModelConfig, folder: Path):
    """Load every part from local files, strictly (missing or unexpected keys are named)."""
    from transformers import CLIPModel, Phi3ForCausalLM

    from workers.internvideo2 import build_internvideo2, internvideo2_vision_config
    from workers.sam2_decoder import load_sam2
    from workers.tokenizers import load_tokenizer
    from workers.videoglamm import VideoGLaMM

    clip = CLIPModel.from_pretrained(config.clip.weights, local_files_only=True)
    clip_tok = load_tokenizer(config.clip.weights, "CLIP", "Download openai/clip-vit-large-patch14-336.")
    llm_tok = load_tokenizer(folder, "VideoGLaMM (Phi-3 with [SEG])", f"Get it from {VIDEOGLAMM_SOURCE}.")
    with torch.device("meta"):
        llm = Phi3ForCausalLM(_llm_config(config))
    internvideo2 = build_internvideo2(internvideo2_vision_config(config.internvideo2.size))
    iv2_path = Path(config.internvideo2.weights)
    iv2_path = iv2_path if iv2_path.is_absolute() else folder / iv2_path
    internvideo2.load_original_state_dict(torch.load(iv2_path, map_location="cpu", weights_only=True))
    sam2 = load_sam2(config.sam2.weights)
    with torch.device("meta"):
        model = VideoGLaMM(config, clip, internvideo2, llm, sam2, llm_tok, clip_tok)
    state = _read_sharded_checkpoint(folder)
    own = {}
    for key, value in state.items():
        if key.startswith("model.visual_model.") or key.startswith("model.vision_tower."):
            continue  # SAM2 and the encoders come from their own weights above
        for src, dst in (
            ("model.image_mm_projector.", "image_mm_projector."),
            ("model.mm_projector.", "mm_projector."),
            ("model.text_hidden_fcs.0.", "text_hidden_fcs."),
            ("model.", "llm.model."),
            ("lm_head.", "llm.lm_head."),
        ):
            if key.startswith(src):
                own[dst + key[len(src):]] = value
                break
        else:
            own[key] = value
    expected = {k for k in model.state_dict() if k.startswith(("llm.", "image_mm_projector.", "mm_projector.", "text_hidden_fcs."))}
    missing, unexpected = sorted(expected - own.keys()), sorted(own.keys() - expected)
    if missing or unexpected:
        raise WeightsNotFoundError(
            f"the checkpoint in {folder} does not match VideoGLaMM: missing {missing[:20]} unexpected {unexpected[:20]}"
        )
    model.load_state_dict(own, strict=False, assign=True)
    # Non-persistent buffers (rotary inverse frequencies) were created on the meta device: rebuild them.
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    model.llm.model.rotary_emb = Phi3RotaryEmbedding(config=model.llm.config)
    return model


def _read_sharded_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Read ``pytorch_model-*.bin`` shards listed in the index with ``torch.load(weights_only=True)``."""
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        path = folder / shard
        if not path.is_file():
            raise WeightsNotFoundError(f"checkpoint shard {path} listed in the index is missing; re-download it")
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state
