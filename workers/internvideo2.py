"""InternVideo2 temporal encoder of VideoGLaMM, hosted on transformers' ``InternVLVisionModel``.

VideoGLaMM (github mbzuai-oryx/VideoGLaMM @ 6b15b1e7f75009d0e1a858ac08e28021c4faaf11, "VG" below) uses the
vision encoder of InternVideo2-Stage2-1B-224p-f4 as its frozen temporal encoder. What the original does,
and how this module reproduces it (no upstream code is copied; the behaviour is re-implemented):

* Model (``VG:VideoGLaMM/model/videogpt_plus/model/internvideo/internvideo2.py``,
  ``pretrain_internvideo2_1b_patch14_224`` and ``PretrainInternVideo2``; config in
  ``internvideo/internvideo2_stage2_config_vision.py``): width 1408, 40 blocks, 16 heads,
  ``mlp_ratio = 48/11`` (MLP 6144, exact GELU), pre-norm blocks with ``RMSNorm(eps=1e-6)``, fused
  ``qkv`` Linear without bias, RMSNorm over the full 1408-wide q and k (``qk_normalization``),
  LayerScale ``ls1``/``ls2`` (``gamma``), a ``Conv3d`` patch embedding with kernel (1, 14, 14)
  (tubelet 1), a CLS token and one learned position table for CLS + 4 x 16 x 16 tokens in (T, H, W)
  order. ``num_frames = 4``; ``sep_image_video_pos_embed=True`` adds ``img_pos_embed`` (used only for
  single images, never by VideoGLaMM's video path).
* Call (``VG:.../internvideo/utils.py``, ``InternVideo2_Stage2V.forward``): ``[B, T, C, H, W]`` is
  permuted to ``[B, C, T, H, W]`` and run with ``x_vis_return_idx=-2, x_vis_only=True``; the block loop
  of ``PretrainInternVideo2.forward`` breaks after block ``depth - 2`` = 38, so 39 of the 40 blocks run
  and block 39 is never used. No final norm, no pooling head (``clip_projector``, ``clip_decoder``,
  ``final_clip_decoder`` are training-only) is applied: the output is the residual stream after
  block 38, ``[B, 1 + 4*256, 1408]``, CLS first.
* Chunking (``VG:.../videogpt_plus/model/arch.py``, ``encode_videos``; ``CHUNK_SIZE = 4`` in
  ``VG:.../videogpt_plus/constants.py``): the 16 frames of a clip are split with
  ``frames.chunk(T // 4)`` into consecutive groups of 4, all chunks run as one batch, and the CLS
  token is dropped (``chunk_features[:, 1:]``) giving ``[num_chunks, 4*256, 1408]``.

Hosting: the 4 frames of a chunk are stacked vertically into one 896x224 image; a 2-D 14x14 patch conv
over it yields a 64x16 grid whose row-major raster order is exactly InternVideo2's (t, h, w) order, and
since 224 is a multiple of 14 no patch straddles two frames, so the squeezed 3-D kernel gives the same
embeddings. The stock transformers embeddings would *interpolate* the position table because the
image is not square (``InternVLVisionEmbeddings.interpolate_pos_encoding`` only returns the table
unchanged when ``height == width``): :class:`InternVideo2VisionModel` bypasses that and adds the
learned 1 + 1024 table as is. With ``use_mean_pooling=True`` the host's final ``layernorm`` is
``nn.Identity`` and, in transformers 5.23, ``last_hidden_state`` is the un-normalised, un-pooled output
of the last layer (the model does not even return a pooler output), i.e. the output of block 38.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from transformers import InternVLVisionConfig, InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings

from refstream_errors import ConfigError
from workers.config import InternVideo2Spec

__all__ = [
    "FRAMES_PER_CHUNK",
    "CheckpointKeysError",
    "InternVideo2Encoder",
    "InternVideo2VisionModel",
    "build_internvideo2",
    "convert_internvideo2_state_dict",
    "internvideo2_vision_config",
]

#: Frames per InternVideo2 forward pass (``CHUNK_SIZE`` in VideoGLaMM's ``constants.py``).
FRAMES_PER_CHUNK = 4
#: Side of one (square) input frame, in pixels.
FRAME_SIZE = 224
#: Patch side, in pixels.
PATCH_SIZE = 14

_CKPT_PREFIX = "vision_encoder."

# Original vision-encoder parameters that VideoGLaMM never uses at inference; ignored by the converter.
# ``img_pos_embed`` is the single-image table (only read when T == 1); the others belong to the CLIP
# distillation / retrieval heads that ``x_vis_only=True`` skips.
_IGNORED_EXACT = frozenset({"img_pos_embed", "clip_pos_embed", "clip_img_pos_embed"})
_IGNORED_PREFIXES = ("clip_projector.", "clip_decoder.", "final_clip_decoder.")

# Per-block key map: original name (under ``blocks.{i}.``) -> host name (under ``encoder.layer.{i}.``).
# ``attn.qkv.weight`` is handled separately (split into q/k/v).
_BLOCK_KEY_MAP = {
    "norm1.weight": "layernorm_before.weight",
    "norm2.weight": "layernorm_after.weight",
    "attn.q_norm.weight": "attention.q_norm.weight",
    "attn.k_norm.weight": "attention.k_norm.weight",
    "attn.proj.weight": "attention.projection_layer.weight",
    "attn.proj.bias": "attention.projection_layer.bias",
    "ls1.gamma": "lambda_1",
    "ls2.gamma": "lambda_2",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_BLOCK_QKV = "attn.qkv.weight"
_GLOBAL_KEY_MAP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CheckpointKeysError(ConfigError, KeyError):
    """An InternVideo2 checkpoint does not have the expected parameter names.

    Both a :class:`refstream_errors.ConfigError` (CLI exit code 2) and a :class:`KeyError`.

    Attributes:
        missing: original-checkpoint key names (without the ``vision_encoder.`` prefix) that are needed
            but absent, sorted.
        unexpected: key names present in the checkpoint that are neither used nor known to be
            ignorable, sorted.
    """

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable for the CLI.
        return str(self.args[0]) if self.args else ""


def internvideo2_vision_config(spec: InternVideo2Spec) -> InternVLVisionConfig:
    """Config of the transformers host for the InternVideo2 temporal encoder.

    Args:
        spec: the sizes (``internvideo2`` of a model config: hidden size, layers, heads, MLP width, LayerScale
            init; ``configs/videoglamm.yaml`` holds InternVideo2-Stage2-1B-224p-f4 as run by VideoGLaMM,
            ``configs/tiny.yaml`` a 64-wide, 2-layer version for tests). Fixed for every size: 896x224 image =
            4 stacked 224x224 frames, patch 14, 256 tokens per frame, 1 + 1024 positions, RMSNorm eps 1e-6,
            QK RMSNorm, qkv without bias, exact GELU.

    Returns:
        An ``InternVLVisionConfig`` with ``image_size=(896, 224)`` (height, width), ``patch_size=(14, 14)``,
        ``norm_type="rms_norm"``, ``use_qk_norm=True``, ``use_mean_pooling=True`` (the host's final
        norm is then ``nn.Identity``) and absolute position embeddings.
    """
    return InternVLVisionConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        layer_scale_init_value=spec.layer_scale_init_value,
        image_size=(FRAMES_PER_CHUNK * FRAME_SIZE, FRAME_SIZE),
        patch_size=(PATCH_SIZE, PATCH_SIZE),
        num_channels=3,
        norm_type="rms_norm",
        layer_norm_eps=1e-6,
        use_qk_norm=True,
        attention_bias=False,
        hidden_act="gelu",
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
        projection_dropout=0.0,
    )


class _LearnedPositionEmbeddings(InternVLVisionEmbeddings):
    """``InternVLVisionEmbeddings`` that always adds the learned position table as is.

    The stock ``interpolate_pos_encoding`` (transformers 5.23) returns the table unchanged only when
    the token count matches *and* ``height == width``; for the 896x224 chunk image it would reshape the
    1024 positions into a 32x32 square and bicubically resize them to 64x16, destroying the (t, h, w)
    layout. InternVideo2 adds its ``pos_embed`` (CLS + T*H*W, VG ``PretrainInternVideo2.forward``)
    without any resizing, which is what this override does.
    """

    def interpolate_pos_encoding(self, embeddings: Tensor, height: int, width: int) -> Tensor:
        """Return the learned table ``[1, 1 + N, D]`` unchanged.

        Raises:
            ValueError: the input is not ``self.image_size`` (the table covers exactly one chunk image).
        """
        if (height, width) != tuple(self.image_size) or embeddings.shape[1] != self.position_embeddings.shape[1]:
            raise ValueError(
                f"InternVideo2 position embeddings cover a {tuple(self.image_size)} chunk image "
                f"({self.position_embeddings.shape[1]} tokens); got {height}x{width} "
                f"({embeddings.shape[1]} tokens). Resize frames to {FRAME_SIZE}x{FRAME_SIZE}."
            )
        return self.position_embeddings


class InternVideo2VisionModel(InternVLVisionModel):
    """``InternVLVisionModel`` whose embeddings add the learned position table without interpolation.

    State-dict keys are identical to ``InternVLVisionModel``'s. Input ``pixel_values``: float
    ``[B, 3, 896, 224]`` (4 frames stacked vertically); ``last_hidden_state``: ``[B, 1 + 1024, D]``,
    CLS first, output of the last layer with no final norm (``use_mean_pooling`` must be True).
    """

    def __init__(self, config: InternVLVisionConfig) -> None:
        if not config.use_mean_pooling:
            raise ConfigError(
                "InternVideo2 has no final norm: build its host with use_mean_pooling=True "
                "(then InternVLVisionModel.layernorm is nn.Identity)"
            )
        super().__init__(config)
        embeddings = _LearnedPositionEmbeddings(config)
        # Keep the weights post_init already gave the stock module (same keys, same shapes).
        embeddings.load_state_dict(self.embeddings.state_dict(), strict=True)
        self.embeddings = embeddings


class InternVideo2Encoder(nn.Module):
    """Frozen InternVideo2 temporal encoder: frames -> per-frame 16x16 token grids of block 38.

    Attributes:
        host: the :class:`InternVideo2VisionModel` (state-dict keys of ``InternVLVisionModel``).
        frames_per_chunk: 4. ``frame_size``: 224 (pixels). ``grid``: (16, 16) tokens per frame.
        hidden_size: D (1408 for the full model).
    """

    def __init__(self, host: InternVLVisionModel):
        super().__init__()
        cfg = host.config
        height, width = (int(s) for s in cfg.image_size)
        ph, pw = (int(p) for p in cfg.patch_size)
        if width <= 0 or height % width or width % pw or width % ph or ph != pw:
            raise ConfigError(
                f"InternVideo2 host needs a (k*W, W) image of square frames tiled by square patches; "
                f"got image_size={cfg.image_size}, patch_size={cfg.patch_size}"
            )
        if not isinstance(host.embeddings, _LearnedPositionEmbeddings):
            raise ConfigError("InternVideo2Encoder needs an InternVideo2VisionModel host (no pos-embed interpolation)")
        self.host = host
        self.frames_per_chunk = height // width
        self.frame_size = width
        self.grid = (width // ph, width // pw)
        self.hidden_size = int(cfg.hidden_size)

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per frame (256 = 16x16)."""
        return self.grid[0] * self.grid[1]

    def forward(self, frames: Tensor) -> Tensor:
        """Encode frames in chunks of 4, as VideoGLaMM's ``encode_videos`` (CLS dropped).

        Args:
            frames: float ``[T, 3, 224, 224]``, resized to 224x224 and ImageNet-normalised
                (mean 0.485/0.456/0.406, std 0.229/0.224/0.225 on [0, 1] RGB). ``T`` must be a positive
                multiple of 4; consecutive frames ``4k .. 4k+3`` form chunk ``k`` (the caller pads a
                short clip by repeating its last frame). Cast to the model's dtype.

        Returns:
            ``[T, 256, D]`` in the model's dtype/device: for each frame its 16x16 token grid in
            row-major order, taken from the output of the last run layer (block 38 of the original),
            with no final norm and no projection. Tokens of one frame depend on the other 3 frames of
            its chunk (joint space-time attention) but not on other chunks.

        Raises:
            ValueError: ``frames`` is not 4-D ``[T, 3, 224, 224]`` or ``T`` is not a positive multiple of 4.
        """
        c = int(self.host.config.num_channels)
        s, k = self.frame_size, self.frames_per_chunk
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (c, s, s):
            raise ValueError(f"InternVideo2 frames must be [T, {c}, {s}, {s}]; got {tuple(frames.shape)}")
        t = frames.shape[0]
        if t == 0 or t % k:
            raise ValueError(
                f"InternVideo2 needs a positive multiple of {k} frames (chunks of {k}); got {t}. "
                "Pad the clip by repeating its last frame."
            )
        weight = self.host.embeddings.patch_embeddings.projection.weight
        chunks = frames.to(device=weight.device, dtype=weight.dtype).reshape(t // k, k, c, s, s)
        # [n, k, c, s, s] -> [n, c, k*s, s]: frame j of a chunk occupies rows j*s .. (j+1)*s - 1.
        pixels = chunks.permute(0, 2, 1, 3, 4).reshape(t // k, c, k * s, s)
        hidden = self.host(pixel_values=pixels).last_hidden_state  # [n, 1 + k*256, D]
        return hidden[:, 1:].reshape(t, self.tokens_per_frame, hidden.shape[-1])

    def load_original_state_dict(self, checkpoint: Mapping[str, object]) -> None:
        """Load an original InternVideo2 checkpoint (see :func:`convert_internvideo2_state_dict`).

        Raises:
            CheckpointKeysError: missing or unexpected keys.
            ConfigError: a tensor's shape does not match this model's config.
        """
        converted = convert_internvideo2_state_dict(checkpoint, num_layers=self.host.config.num_hidden_layers)
        expected = self.host.state_dict()
        bad = [
            f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            for key, value in converted.items()
            if key in expected and tuple(value.shape) != tuple(expected[key].shape)
        ]
        if bad:
            raise ConfigError("InternVideo2 checkpoint does not match the model config: " + "; ".join(bad))
        self.host.load_state_dict(converted, strict=True)


def build_internvideo2(config: InternVLVisionConfig, seed: int = 0) -> InternVideo2Encoder:
    """Build a randomly initialised, frozen :class:`InternVideo2Encoder` in eval mode.

    Weights are drawn from a private RNG seeded with ``seed`` (global RNG state is left untouched):
    transformers' init, then CLS token and position table ~ N(0, 0.02^2) so that positions matter
    (the transformers init sets them to zero). Same ``config`` and ``seed`` give identical weights.
    Real weights: :meth:`InternVideo2Encoder.load_original_state_dict`.

    Args:
        config: e.g. :func:`internvideo2_vision_config`; must have ``use_mean_pooling=True``.
        seed: RNG seed.

    Returns:
        A float32 CPU encoder (parameters with ``requires_grad=False``), in eval mode. Under
        ``torch.device("meta")`` the parameters are meta tensors (for counting).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        host = InternVideo2VisionModel(config)
        emb = host.embeddings
        if emb.cls_token.device.type != "meta":
            with torch.no_grad():
                emb.cls_token.normal_(0.0, 0.02)
                emb.position_embeddings.normal_(0.0, 0.02)
    encoder = InternVideo2Encoder(host)
    encoder.requires_grad_(False)
    return encoder.eval()


def _unwrap(checkpoint: Mapping[str, object]) -> dict[str, Tensor]:
    """Take the state dict out of a ``.pt`` checkpoint and strip ``vision_encoder.``.

    As VG ``setup_internvideo2V``: the state dict is under ``"model"`` or ``"module"`` (deepspeed), or the
    mapping itself. When any key starts with ``vision_encoder.``, only those keys are kept (the Stage2
    checkpoint also holds the text encoder, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``...).
    """
    for wrapper in ("model", "module"):
        inner = checkpoint.get(wrapper) if isinstance(checkpoint, Mapping) else None
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    if not isinstance(checkpoint, Mapping):
        raise ConfigError(f"InternVideo2 checkpoint must be a mapping of tensors; got {type(checkpoint).__name__}")
    keys = [k for k in checkpoint if isinstance(k, str)]
    if any(k.startswith(_CKPT_PREFIX) for k in keys):
        return {k[len(_CKPT_PREFIX) :]: checkpoint[k] for k in keys if k.startswith(_CKPT_PREFIX)}
    return {k: checkpoint[k] for k in keys}


def convert_internvideo2_state_dict(
    sd: Mapping[str, object], num_layers: int | None = None
) -> dict[str, Tensor]:
    """Map an original InternVideo2 vision-encoder state dict onto :class:`InternVideo2VisionModel` keys.

    Input: the loaded ``InternVideo2-stage2_1b-224p-f4.pt`` (``{"model": sd}``, ``{"module": sd}`` or
    ``sd``; keys with or without the ``vision_encoder.`` prefix, see VG ``setup_internvideo2V``).
    Original names are those of VG ``internvideo/internvideo2.py`` (``PretrainInternVideo2``):

    - ``patch_embed.proj.weight`` [D, 3, 1, 14, 14] -> ``embeddings.patch_embeddings.projection.weight``
      [D, 3, 14, 14] (the tubelet dimension, of size 1, squeezed); ``patch_embed.proj.bias`` ->
      ``embeddings.patch_embeddings.projection.bias``.
    - ``cls_token`` [1, 1, D] -> ``embeddings.cls_token``; ``pos_embed`` [1, 1 + 4*256, D] ->
      ``embeddings.position_embeddings`` (used as is, no interpolation).
    - ``blocks.{i}.attn.qkv.weight`` [3D, D] -> ``encoder.layer.{i}.attention.{q,k,v}_proj.weight``
      (rows 0:D, D:2D, 2D:3D; the original has no qkv bias).
    - ``blocks.{i}.attn.{q,k}_norm.weight`` -> ``encoder.layer.{i}.attention.{q,k}_norm.weight``.
    - ``blocks.{i}.attn.proj.{weight,bias}`` -> ``encoder.layer.{i}.attention.projection_layer.*``.
    - ``blocks.{i}.norm1.weight`` / ``norm2.weight`` -> ``encoder.layer.{i}.layernorm_before`` / ``layernorm_after``.
    - ``blocks.{i}.ls1.gamma`` / ``ls2.gamma`` -> ``encoder.layer.{i}.lambda_1`` / ``lambda_2``.
    - ``blocks.{i}.mlp.fc1.*`` / ``fc2.*`` -> ``encoder.layer.{i}.mlp.fc1.*`` / ``fc2.*``.

    Ignored (never used by VideoGLaMM's ``x_vis_only`` path): ``blocks.{i}`` for ``i >= num_layers``
    (block 39 of the 1B model), ``clip_projector.*``, ``clip_decoder.*``, ``final_clip_decoder.*``,
    ``clip_pos_embed``, ``clip_img_pos_embed``, ``img_pos_embed``, and every key outside
    ``vision_encoder.`` when that prefix is present. Tensors keep their dtype; split/squeezed ones are
    contiguous copies.

    Args:
        sd: the checkpoint mapping.
        num_layers: blocks to keep (``0 .. num_layers - 1``). Default: ``depth - 1`` where ``depth`` is
            the number of ``blocks.{i}`` in the checkpoint, as VG runs ``x_vis_return_idx=-2`` (39 of 40).

    Returns:
        Host state dict (keys of ``InternVLVisionModel``, no prefix) for ``load_state_dict(strict=True)``.

    Raises:
        CheckpointKeysError (a ConfigError and a KeyError): needed keys missing or unknown keys present;
            the message lists them by name (original names, without ``vision_encoder.``).
        ConfigError: not a mapping, no blocks, a 3-D patch kernel with a time extent other than 1, or a
            ``qkv`` weight whose rows are not 3x its columns.
    """
    src = _unwrap(sd)
    block_ids = {int(m.group(1)) for k in src if (m := _BLOCK_RE.match(k))}
    if not block_ids:
        raise ConfigError("InternVideo2 checkpoint has no 'blocks.{i}.*' keys; is it a vision-encoder state dict?")
    depth = max(block_ids) + 1
    keep = depth - 1 if num_layers is None else int(num_layers)
    if keep < 1:
        raise ConfigError(f"InternVideo2 checkpoint has {depth} block(s); at least 2 are needed to run depth - 1")

    needed = dict(_GLOBAL_KEY_MAP)
    for i in range(keep):
        for orig, host in _BLOCK_KEY_MAP.items():
            needed[f"blocks.{i}.{orig}"] = f"encoder.layer.{i}.{host}"
        needed[f"blocks.{i}.{_BLOCK_QKV}"] = ""  # split below

    unexpected = []
    for key in src:
        if key in needed or key in _IGNORED_EXACT or key.startswith(_IGNORED_PREFIXES):
            continue
        m = _BLOCK_RE.match(key)
        if m and int(m.group(1)) >= keep and (m.group(2) in _BLOCK_KEY_MAP or m.group(2) == _BLOCK_QKV):
            continue  # a block VideoGLaMM does not run
        unexpected.append(key)
    missing = [key for key in needed if key not in src]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(sorted(missing))}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(sorted(unexpected))}")
        raise CheckpointKeysError(
            "InternVideo2 checkpoint does not match the InternVideo2-Stage2-1B vision encoder "
            f"(names without '{_CKPT_PREFIX}'): " + "; ".join(parts),
            missing=sorted(missing),
            unexpected=sorted(unexpected),
        )

    out: dict[str, Tensor] = {}
    for orig, host in needed.items():
        tensor = src[orig]
        if not isinstance(tensor, Tensor):
            raise ConfigError(f"InternVideo2 checkpoint entry {orig!r} is not a tensor")
        if orig == "patch_embed.proj.weight":
            if tensor.ndim == 5:
                if tensor.shape[2] != 1:
                    raise ConfigError(
                        f"InternVideo2 patch kernel has time extent {tensor.shape[2]} (tubelet_size); "
                        "only 1 is supported"
                    )
                tensor = tensor[:, :, 0].contiguous()
            elif tensor.ndim != 4:
                raise ConfigError(f"InternVideo2 patch kernel must be 5-D [D, 3, 1, p, p]; got {tuple(tensor.shape)}")
            out[host] = tensor
        elif orig.endswith(_BLOCK_QKV):
            if tensor.ndim != 2 or tensor.shape[0] != 3 * tensor.shape[1]:
                raise ConfigError(f"InternVideo2 {orig} must be [3D, D]; got {tuple(tensor.shape)}")
            prefix = f"encoder.layer.{orig.split('.')[1]}.attention."
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[prefix + name + ".weight"] = part.contiguous()
        else:
            out[host] = tensor
    return out
