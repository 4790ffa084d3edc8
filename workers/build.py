"""Build VideoGLaMM from a :class:`workers.config.ModelConfig`: seeded random weights or the released weights.

Random weights (``random_weights: true``, the ``tiny`` preset): every part is built from its config with
a fixed seed, so two builds are identical, and the tokenizers are the byte-level stand-ins of
:mod:`workers.tokenizers`.

Released weights (the ``videoglamm`` preset, or any config with ``random_weights: false``) come from:

- the VideoGLaMM download folder (``--checkpoint DIR`` or ``$REFSTREAM_CHECKPOINT``): ``config.json``,
  ``pytorch_model-0000k-of-0000n.bin`` shards with ``pytorch_model.bin.index.json`` (LoRA merged, read with
  ``torch.load(weights_only=True)``, memory-mapped), and the Phi-3 tokenizer files with ``[SEG]``; it provides
  the LLM, both projectors, ``text_hidden_fcs`` and SAM2 (``model.visual_model.*``, original SAM2 names; key
  mapping in :mod:`workers.checkpoint`); ``config.json``'s ``sliding_window`` is converted from transformers
  4.41 semantics (2047 -> 2048) and its ``vocab_size`` (32012) must cover the tokenizer;
- ``config.clip.weights`` (``openai/clip-vit-large-patch14-336``: hub id in the local cache, or a folder;
  ``CLIPModel``, both towers and heads);
- ``config.internvideo2.weights`` (``InternVideo2-stage2_1b-224p-f4.pt``, in the checkpoint folder or an
  absolute path; state dict under ``model`` or ``module``, prefix ``vision_encoder.``), else the checkpoint's
  own ``model.vision_tower.vision_encoder.*``;
- ``config.sam2.weights`` (``facebook/sam2-hiera-large-hf``) only when the checkpoint has no SAM2 keys.

Everything is loaded strictly: a missing, unexpected or wrongly shaped tensor raises
:class:`workers.checkpoint.CheckpointMismatchError` naming the keys, a missing shard
:class:`workers.checkpoint.CheckpointFileMissingError` naming the files (both are
:class:`WeightsNotFoundError`). The big parts are built on the meta device and receive the file tensors by
assignment, cast to the requested dtype. A folder written by ``refstream convert`` (:mod:`workers.convert`,
recognised by its ``refstream.json``) is loaded instead when ``--checkpoint`` points at one.

Nothing is downloaded: a missing part raises :class:`WeightsNotFoundError` naming what to get, where
to put it, and that ``--model tiny`` runs with random weights.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import CLIPConfig, CLIPModel, Phi3Config, Phi3ForCausalLM, Sam2VideoModel

from refstream_errors import WeightsNotFoundError, option
from workers.checkpoint import (
    IGNORED_PREFIXES,
    IV2_PREFIX,
    OFFICIAL_INDEX,
    OFFICIAL_SINGLE,
    SAM2_PREFIX,
    CheckpointFileMissingError,
    CheckpointMismatchError,
    convert_sam2_state_dict,
    llm_config_from_checkpoint,
    official_key,
    refstream_key,
)
from workers.config import ModelConfig
from workers.internvideo2 import (
    CheckpointKeysError,
    build_internvideo2,
    convert_internvideo2_state_dict,
    internvideo2_vision_config,
)
from workers.loading import cast_state_dict, materialize_meta_buffers
from workers.refstream_folder import LAYOUT_FILE, load_refstream_folder, refstream_folder_problems
from workers.sam2_decoder import SAM2_HIERA_LARGE_ID, build_sam2, load_sam2, sam2_video_config
from workers.tokenizers import load_tokenizer, tiny_clip_tokenizer, tiny_llm_tokenizer
from workers.videoglamm import VideoGLaMM

log = logging.getLogger("refstream.workers")

DEFAULT_CHECKPOINT = Path(os.environ.get("REFSTREAM_HOME", Path.home() / ".cache" / "refstream")) / "VideoGLaMM"
TINY_NOTE = f"Or run with {option('model', 'tiny')}: the same architecture with random weights (masks without meaning)."
VIDEOGLAMM_SOURCE = "the VideoGLaMM release (github.com/mbzuai-oryx/VideoGLaMM, README 'Model Zoo')"


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


#: What each actor role of ``serve --pipeline pools`` keeps of the model (:func:`build_model` ``parts``); the
#: projectors stay everywhere (small; they define the model's device and dtype).
PARTS = {
    "all": None,
    "encoder": ("llm", "sam2"),  # CLIP, InternVideo2, projectors, tokenizers: visual tokens and sequence lengths
    "decoder": ("clip", "internvideo2"),  # Phi-3, text_hidden_fcs, SAM2: [SEG] answers and masks
}


def build_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                parts: str = "all"):
    """Build a :class:`workers.videoglamm.VideoGLaMM` in eval mode on ``device``.

    Args:
        config: the model configuration.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: parameter dtype (float32 on CPU; bfloat16/float16 on CUDA).
        parts: ``all``; ``encoder`` (no Phi-3, no SAM2: what an encoder actor needs) or ``decoder`` (no CLIP,
            no InternVideo2: what a VideoGLaMM actor needs). The dropped towers are set to None before the
            model moves to ``device``, so they never take device memory (the weights are still read once).

    Raises:
        WeightsNotFoundError: released weights requested but not found (message says where to get them).
        ValueError: an unknown ``parts``.
    """
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {', '.join(PARTS)}, got {parts!r}")
    if config.random_weights:
        model = _build_random(config)
    else:
        model = build_released(config, dtype)  # tensors are cast while loading: no float32 copy of a bf16 model
    for name in PARTS[parts] or ():
        setattr(model, name, None)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_clip(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Only the CLIP part of a model config (for pruning analyses that need no LLM): ``(CLIPModel, tokenizer)``.

    Random weights are seeded exactly as in :func:`build_model` (so the tiny CLIP here equals the tiny
    model's CLIP); released weights load from ``config.clip.weights`` without network access.

    Raises:
        WeightsNotFoundError: released CLIP weights not found locally.
    """
    if config.random_weights or config.clip.weights is None:
        clip = _seeded(config.seed, lambda: CLIPModel(clip_config(config)))
        tokenizer = tiny_clip_tokenizer()
    else:
        if not _locally_available(config.clip.weights):
            raise WeightsNotFoundError(
                f"CLIP weights {config.clip.weights!r} are neither a local folder nor in the Hugging Face cache: "
                f"run `huggingface-cli download {config.clip.weights}` on a machine with internet. {TINY_NOTE}"
            )
        clip = _load_clip(config.clip.weights, dtype)
        tokenizer = load_tokenizer(config.clip.weights, "CLIP", f"Download {config.clip.weights}.")
    return clip.to(device=device, dtype=dtype).eval().requires_grad_(False), tokenizer


def clip_config(config: ModelConfig) -> CLIPConfig:
    """The ``CLIPConfig`` of ``config.clip`` (vision and text towers as given, ``projection_dim``)."""
    return CLIPConfig(
        text_config=dict(config.clip.text), vision_config=dict(config.clip.vision), projection_dim=config.clip.projection_dim
    )


def phi3_config(config: ModelConfig) -> Phi3Config:
    """The ``Phi3Config`` of ``config.llm`` (its keyword arguments)."""
    return Phi3Config(**config.llm)


def _build_random(config: ModelConfig):
    seed = config.seed
    clip = _seeded(seed, lambda: CLIPModel(clip_config(config)))
    internvideo2 = build_internvideo2(internvideo2_vision_config(config.internvideo2), seed=seed + 1)
    llm = _seeded(seed + 2, lambda: Phi3ForCausalLM(phi3_config(config)))
    sam2 = build_sam2(sam2_video_config(config.sam2), seed=seed + 3, init=config.sam2.init)
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


IV2_FILENAME = "InternVideo2-stage2_1b-224p-f4.pt"


def _internvideo2_path(config: ModelConfig, folder: Path) -> Path | None:
    """The InternVideo2 ``.pt``: an absolute path, a path relative to the checkpoint folder, or a hub id in the
    local Hugging Face cache (``OpenGVLab/InternVideo2-Stage2_1B-224p-f4`` or ``owner/name/file.pt``)."""
    ref = config.internvideo2.weights
    if not ref:
        return None
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else folder / path
    parts = ref.split("/")
    if not path.is_file() and not Path(ref).is_absolute() and len(parts) in (2, 3) and all(parts):
        repo, filename = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else IV2_FILENAME)
        try:
            cached = try_to_load_from_cache(repo, filename)
        except Exception as exc:  # noqa: BLE001 - not a valid repo id: keep the path
            log.debug("%s is not in the Hugging Face cache (%s); using the path as given", ref, exc)
            cached = None
        if isinstance(cached, str):
            return Path(cached)
    return path


def _official_weight_map(folder: Path) -> dict[str, str] | None:
    """``weight_map`` of the official index (or of a single ``pytorch_model.bin``: None); None when unreadable."""
    try:
        weight_map = json.loads((folder / OFFICIAL_INDEX).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("no readable official index in %s (%s)", folder, exc)
        return None
    return weight_map if isinstance(weight_map, dict) else None


def missing_weights(config: ModelConfig) -> list[str]:
    """Human-readable list of the released-weight files that are missing (empty when all are there).

    Understands both the official download folder and the folder written by ``refstream convert``
    (:mod:`workers.convert`, recognised by its ``refstream.json``; it holds every part, so nothing else is needed).
    In the official folder, SAM2 comes from ``model.visual_model.*`` when the index lists such keys (else from
    ``config.sam2.weights``) and InternVideo2 from its ``.pt`` (else from ``model.vision_tower.vision_encoder.*``).
    """
    folder = resolve_checkpoint(config)
    problems = []
    if folder.is_dir() and (folder / LAYOUT_FILE).is_file():
        return refstream_folder_problems(folder)
    weight_map = None
    if not folder.is_dir():
        problems.append(f"the VideoGLaMM checkpoint folder {folder} does not exist")
    else:
        for name in ("config.json", "tokenizer_config.json"):
            if not (folder / name).is_file():
                problems.append(f"{folder / name} is missing")
        if (folder / OFFICIAL_INDEX).is_file():
            weight_map = _official_weight_map(folder)
            if weight_map is None:
                problems.append(f"{folder / OFFICIAL_INDEX} is not a valid index (no 'weight_map'); re-download it")
            else:
                for shard in sorted(set(weight_map.values())):
                    if not (folder / shard).is_file():
                        problems.append(f"checkpoint shard {folder / shard} (listed in {OFFICIAL_INDEX}) is missing")
        elif not (folder / OFFICIAL_SINGLE).is_file():
            problems.append(f"{folder / OFFICIAL_INDEX} is missing (and there is no single {OFFICIAL_SINGLE})")
    keys = weight_map or {}
    iv2 = _internvideo2_path(config, folder)
    has_tower = any(k.startswith(IV2_PREFIX + "vision_encoder.") for k in keys)
    if iv2 is not None and not iv2.is_file() and not has_tower:
        problems.append(f"InternVideo2 weights {iv2} are missing (OpenGVLab/InternVideo2-Stage2_1B-224p-f4, "
                        f"file InternVideo2-stage2_1b-224p-f4.pt)")
    if config.clip.weights and not _locally_available(config.clip.weights):
        problems.append(f"CLIP weights {config.clip.weights!r} are neither a local folder nor in the Hugging Face cache")
    has_sam2 = any(k.startswith(SAM2_PREFIX) for k in keys)
    if weight_map is not None and not has_sam2:
        ref = config.sam2.weights
        if not ref or not _locally_available(ref):
            problems.append(f"the checkpoint has no SAM2 weights (model.visual_model.*) and SAM2 weights {ref!r} are "
                            "neither a local folder nor in the Hugging Face cache")
    return problems


def _locally_available(ref: str) -> bool:
    if Path(ref).expanduser().is_dir():
        return True
    try:
        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception as exc:  # noqa: BLE001 - any hub error means "not available offline"
        log.debug("%s is not available offline (%s)", ref, exc)
        return False


def check_released_weights(config: ModelConfig) -> None:
    """Fail before any work when released weights are missing (nothing to check for random weights).

    Raises:
        WeightsNotFoundError: every missing file listed, with where to get it and where to put it.
    """
    if config.random_weights:
        return
    problems = missing_weights(config)
    if problems:
        folder = resolve_checkpoint(config)
        raise WeightsNotFoundError(
            "VideoGLaMM weights not found:\n  - " + "\n  - ".join(problems) + "\n"
            f"Get the VideoGLaMM checkpoint folder from {VIDEOGLAMM_SOURCE} and put it at {folder} (or pass "
            f"{option('checkpoint', 'DIR')} / set $REFSTREAM_CHECKPOINT); put InternVideo2-stage2_1b-224p-f4.pt "
            f"(OpenGVLab/InternVideo2-Stage2_1B-224p-f4) inside it; download {config.clip.weights} and "
            f"{config.sam2.weights} with `huggingface-cli download <id>` on a machine with internet. {TINY_NOTE}"
        )


def build_released(config: ModelConfig, dtype: torch.dtype | None = torch.float32):
    """VideoGLaMM from released weights: a ``refstream convert`` folder, else the official download folder.

    Args:
        config: the model config (``checkpoint`` names the folder; the base weights come from its parts).
        dtype: parameter dtype the tensors are cast to while loading (None keeps each file's dtype).

    Returns:
        the model on the CPU (not yet in eval mode or moved; :func:`build_model` does that).

    Raises:
        WeightsNotFoundError: files are missing (all of them listed, with where to get them);
        CheckpointMismatchError / CheckpointFileMissingError (both WeightsNotFoundError): see the module docstring.
    """
    check_released_weights(config)
    folder = resolve_checkpoint(config)
    if (folder / LAYOUT_FILE).is_file():
        return load_refstream_folder(config, folder, dtype)
    return _load_released(config, folder, dtype)


def _load_released(config: ModelConfig, folder: Path, dtype: torch.dtype | None = torch.float32):
    """Load every part from the official download folder and the base weights, strictly.

    The LLM, projectors, ``text_hidden_fcs``, SAM2 (and InternVideo2 when needed) are built on the meta device
    and receive the checkpoint's tensors by assignment (cast to ``dtype``; ``None`` keeps each file's dtype),
    so a 3.8 B-parameter LLM is never initialised; non-persistent buffers (rotary ``inv_freq``, SAM2's memory
    attention positions) are then recomputed on the CPU.

    Raises:
        CheckpointMismatchError: a key is missing or unexpected, or a shape differs (named, in official names).
        CheckpointFileMissingError: a shard listed in the index is missing.
        WeightsNotFoundError: a base model or tokenizer is missing or unreadable.
    """
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"cannot read {folder / 'config.json'} ({exc}); re-download the checkpoint folder "
                                   f"from {VIDEOGLAMM_SOURCE}") from exc
    state = _read_sharded_checkpoint(folder)
    where = f"the VideoGLaMM checkpoint in {folder}"
    own, sam2_src, iv2_src, unexpected = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(SAM2_PREFIX):
            sam2_src[key[len(SAM2_PREFIX):]] = value
        elif key.startswith(IV2_PREFIX + "vision_encoder."):
            iv2_src[key[len(IV2_PREFIX):]] = value
        elif key.startswith(IGNORED_PREFIXES):
            continue
        elif (name := refstream_key(key)) is not None:
            own[name] = value
        else:
            unexpected.append(key)

    clip = _load_clip(config.clip.weights, dtype)
    clip_tok = load_tokenizer(config.clip.weights, "CLIP", f"Download {config.clip.weights}.")
    llm_tok = load_tokenizer(folder, "VideoGLaMM (Phi-3 with [SEG])", f"Get it from {VIDEOGLAMM_SOURCE}.")
    seg_id = llm_tok.convert_tokens_to_ids("[SEG]")
    if seg_id is None or seg_id == llm_tok.unk_token_id:
        raise WeightsNotFoundError(f"the tokenizer in {folder} has no [SEG] token: is this a VideoGLaMM checkpoint?")
    if raw.get("seg_token_idx") is not None and int(raw["seg_token_idx"]) != seg_id:
        raise WeightsNotFoundError(f"{folder / 'config.json'} says seg_token_idx={raw['seg_token_idx']} but the "
                                   f"tokenizer maps [SEG] to {seg_id}: the tokenizer files do not belong to these weights")
    llm_config = Phi3Config(**llm_config_from_checkpoint(raw, config.llm))
    if llm_config.vocab_size < len(llm_tok):
        raise WeightsNotFoundError(f"{folder / 'config.json'} has vocab_size {llm_config.vocab_size} but the tokenizer "
                                   f"has {len(llm_tok)} tokens (VideoGLaMM: 32012 with [SEG] = 32011)")

    with torch.device("meta"):
        llm = Phi3ForCausalLM(llm_config)
        sam2 = Sam2VideoModel(sam2_video_config(config.sam2)) if sam2_src else None
        internvideo2 = build_internvideo2(internvideo2_vision_config(config.internvideo2))
    if sam2 is not None:
        converted = convert_sam2_state_dict(sam2_src, sam2.state_dict(), what=f"SAM2 ({SAM2_PREFIX}*) in {folder}",
                                            prefix=SAM2_PREFIX)
        own.update({"sam2." + k: v for k, v in converted.items()})
    else:
        sam2 = _load_sam2_strict(config.sam2.weights, dtype)
    iv2_state = _internvideo2_state(config, folder, iv2_src, internvideo2)
    own.update({"internvideo2.host." + k: v for k, v in iv2_state.items()})
    with torch.device("meta"):
        model = VideoGLaMM(config, clip, internvideo2, llm, sam2, llm_tok, clip_tok)

    loaded_elsewhere = ("clip.",) + (("sam2.",) if not sam2_src else ())
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(loaded_elsewhere)}
    name = lambda k: official_key(k) or k  # noqa: E731
    missing = [name(k) for k in expected if k not in own]
    unexpected += [name(k) for k in own if k not in expected]
    mismatched = [f"{name(k)}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
                  for k, v in own.items() if k in expected and tuple(v.shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(where, missing, unexpected, mismatched,
                                      hint=f"Is it the VideoGLaMM release ({VIDEOGLAMM_SOURCE}) for this --model config?")
    model.load_state_dict(cast_state_dict(own, dtype), strict=False, assign=True)
    materialize_meta_buffers(model)
    return model


def _internvideo2_state(config: ModelConfig, folder: Path, tower: dict, encoder) -> dict[str, torch.Tensor]:
    """InternVideo2 host state dict: from the ``.pt`` when present (as the original's inference), else the tower."""
    path = _internvideo2_path(config, folder)
    layers = encoder.host.config.num_hidden_layers
    if path is not None and path.is_file():
        source, what, prefix = _torch_load(path, "InternVideo2 weights"), f"InternVideo2 weights {path}", "vision_encoder."
    elif tower:
        source, what, prefix = tower, f"InternVideo2 ({IV2_PREFIX}vision_encoder.*) in {folder}", IV2_PREFIX + "vision_encoder."
    else:
        raise WeightsNotFoundError(f"InternVideo2 weights {path} are missing and {folder} has no "
                                   f"{IV2_PREFIX}vision_encoder.* keys: download InternVideo2-stage2_1b-224p-f4.pt "
                                   f"(OpenGVLab/InternVideo2-Stage2_1B-224p-f4) into {folder}")
    try:
        converted = convert_internvideo2_state_dict(source, num_layers=layers)
    except CheckpointKeysError as exc:
        raise CheckpointMismatchError(what, [prefix + k for k in exc.missing], [prefix + k for k in exc.unexpected]) from exc
    expected = encoder.host.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in converted.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointMismatchError(what, mismatched=bad,
                                      hint=f"Do the internvideo2 sizes of the model config (hidden_size "
                                           f"{config.internvideo2.hidden_size}, num_hidden_layers "
                                           f"{config.internvideo2.num_hidden_layers}) match these weights?")
    return converted


def _torch_load(path: Path, what: str) -> dict:
    """``torch.load(weights_only=True)`` (memory-mapped when the file allows it) of a mapping of tensors."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsNotFoundError(f"{what} {path} cannot be read with torch.load(weights_only=True): it holds more "
                                   f"than tensors ({str(exc).splitlines()[0]}). Re-download the original file.") from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise WeightsNotFoundError(f"{what} {path} is unreadable ({exc.__class__.__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}); re-download it") from exc
    if not isinstance(data, dict):
        raise WeightsNotFoundError(f"{what} {path} is not a state dict (got {type(data).__name__})")
    return data


def _read_sharded_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Read the ``pytorch_model-*.bin`` shards listed in the index with ``torch.load(weights_only=True)``.

    A single ``pytorch_model.bin`` (no index) is read too. Shards are memory-mapped; every shard must hold
    exactly the keys the index assigns to it.

    Raises:
        CheckpointFileMissingError: the index or a listed shard is missing (files named).
        CheckpointMismatchError: index and shards disagree (keys named).
    """
    index_path = folder / OFFICIAL_INDEX
    if not index_path.is_file():
        if (folder / OFFICIAL_SINGLE).is_file():
            return dict(_torch_load(folder / OFFICIAL_SINGLE, "checkpoint"))
        raise CheckpointFileMissingError(
            f"{index_path} is missing; get the complete checkpoint folder from {VIDEOGLAMM_SOURCE}", [index_path])
    weight_map = _official_weight_map(folder)
    if weight_map is None:
        raise CheckpointFileMissingError(f"{index_path} is not a valid index (no 'weight_map'); re-download it", [index_path])
    shards = sorted(set(weight_map.values()))
    absent = [folder / s for s in shards if not (folder / s).is_file()]
    if absent:
        raise CheckpointFileMissingError(
            f"checkpoint shard(s) listed in {index_path} are missing: {', '.join(str(p) for p in absent)}; "
            f"re-download them from {VIDEOGLAMM_SOURCE}", absent)
    state: dict[str, torch.Tensor] = {}
    not_in_shard, not_listed = [], []
    for shard in shards:
        part = _torch_load(folder / shard, "checkpoint shard")
        listed = {k for k, s in weight_map.items() if s == shard}
        not_in_shard += [f"{k} (index: {shard})" for k in sorted(listed - part.keys())]
        not_listed += [f"{k} (in {shard})" for k in sorted(part.keys() - listed)]
        state.update({k: v for k, v in part.items() if k in listed})
    if not_in_shard or not_listed:
        raise CheckpointMismatchError(f"the shards in {folder} and {OFFICIAL_INDEX}", not_in_shard, not_listed,
                                      hint="The download is incomplete or mixed: re-download the folder.")
    return state


def _load_clip(ref: str, dtype: torch.dtype | None):
    """``CLIPModel`` (vision + text towers and heads) from a local folder or the HF cache, strictly."""
    if not _locally_available(ref):
        raise WeightsNotFoundError(
            f"CLIP weights {ref!r} are neither a local folder nor in the Hugging Face cache: "
            f"run `huggingface-cli download {ref}` on a machine with internet. {TINY_NOTE}"
        )
    try:
        clip, info = CLIPModel.from_pretrained(ref, local_files_only=True, dtype=dtype or "auto", output_loading_info=True)
    except OSError as exc:
        raise WeightsNotFoundError(f"CLIP weights {ref!r} are incomplete ({str(exc).splitlines()[0]}): "
                                   f"re-download them with `huggingface-cli download {ref}`") from exc
    _check_loading_info(f"CLIP weights {ref!r}", info, CheckpointMismatchError)
    return clip


def _load_sam2_strict(ref: str | None, dtype: torch.dtype | None):
    """``Sam2VideoModel`` from ``facebook/sam2-hiera-large-hf`` (folder or cached id), strictly."""
    ref = ref or SAM2_HIERA_LARGE_ID
    try:
        sam2, info = Sam2VideoModel.from_pretrained(ref, local_files_only=True, dtype=dtype or "auto",
                                                    output_loading_info=True)
    except OSError:
        return load_sam2(ref)  # raises WeightsNotFoundError saying where to get it
    _check_loading_info(f"SAM2 weights {ref!r}", info, CheckpointMismatchError)
    return sam2


def _check_loading_info(what: str, info: dict, error) -> None:
    missing = list(info.get("missing_keys") or [])
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.endswith("position_ids")]
    mismatched = [str(m) for m in info.get("mismatched_keys") or []]
    if missing or unexpected or mismatched:
        raise error(what, missing, unexpected, mismatched)
