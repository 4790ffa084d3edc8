"""SAM2 video decoder of VideoGLaMM, streaming, on transformers' ``Sam2VideoModel``.

What is reproduced (github mbzuai-oryx/VideoGLaMM @ 6b15b1e7f75009d0e1a858ac08e28021c4faaf11, read, not
copied):

* ``VideoGLaMM/model/VideoGLaMM.py`` ``inference_video_branch`` (l. 770-877): one SAM2 inference state per
  sample, built from *all* its frames (``init_state_from_tensor``, l. 846); every ``[SEG]`` embedding
  ``[1, 1, 256]`` becomes one object (``obj_id = 0..N-1``) added on frame 0 with ``add_new_text`` (l. 850-867);
  then ``propagate_in_video`` (l. 870) and ``out_mask_logits > 0.0`` (l. 873).
* ``.../segment_anything_2/sam2/sam2_video_predictor.py`` ``add_new_text`` (l. 416-496): runs
  ``track_step`` on the anchor frame as an *initial conditioning frame* with ``point_inputs=None`` and
  ``text_inputs=[SEG]``; the memory of the anchor frame is encoded later, in ``propagate_in_video_preflight``
  -> ``_consolidate_temp_output_across_obj`` with ``is_mask_from_pts=True`` (l. 631: the anchor mask is
  binarised before the memory encoder). Output masks: bilinear resize of the 1/4-resolution logits straight
  to the video size (``_get_orig_video_res_output``, l. 498-518); hole filling is a no-op there (l. 971-975).
* ``.../sam2/modeling/sam2_base.py`` ``_forward_sam_heads`` (l. 251-411): with no points, a dummy point
  ``(0, 0)`` with label ``-1`` (l. 310-313); ``sam_prompt_encoder(points=..., text_embeds=[SEG])`` (l. 335-340);
  ``_use_multimask`` (l. 805-813) is true for 0 points on the anchor *and* on tracked frames with the hiera-L
  yaml (``multimask_output_in_sam``, ``multimask_output_for_tracking``, ``multimask_min_pt_num: 0``,
  ``multimask_max_pt_num: 1``); the best of 3 masks by predicted IoU is kept (l. 377-386) and its output token
  gives the object pointer.
* ``.../sam2/modeling/sam/prompt_encoder.py`` ``forward`` (l. 143-190) and ``_embed_points`` (l. 79-101): the
  dummy point is padded with a second label ``-1`` point, both embed to ``not_a_point_embed``, and the text
  embedding is concatenated last (l. 179-180): sparse prompt = ``[not_a_point, not_a_point, SEG]``.

In transformers 5.23 the same prompt is obtained by a dummy point (label ``-1``) on frame 0 (transformers pads
it with a second ``-1`` point) plus a forward hook on ``model.prompt_encoder`` that appends the ``[SEG]`` vector
to the sparse embeddings ``[B, P, 2, C] -> [B, P, 3, C]``. With a point input, ``Sam2VideoModel`` counts one
point, so ``_use_multimask`` is still true (``0 <= 1 <= 1``) and the anchor mask is binarised for the memory
encoder exactly like the original. The hook lives for the anchor call only (``try/finally``).

Streaming: :class:`Sam2Stream` feeds ``Sam2VideoInferenceSession(video=None)`` one frame at a time through
``Sam2VideoModel.forward(session, frame_idx=t, frame=x)`` and, after each frame, drops what SAM2 will never
read again (see :meth:`Sam2Stream._release`), so memory does not grow with the length of the video.

Batched image encoder: SAM2's image encoder (Hiera trunk, FPN neck, the mask decoder's ``conv_s0``/``conv_s1``
projections: ``Sam2VideoModel.get_image_features``) does not depend on the memory, so :meth:`Sam2Stream.step_chunk`
runs it on ``chunk_size`` frames in one batch and hands each frame's slice to the sequential memory-attention /
mask-decoder step through the session's feature cache (``Sam2VideoInferenceCache.cache_vision_features``, which
``_prepare_vision_features`` reads before it would encode the frame itself). Every layer of the encoder works per
sample (convolutions, per-token layer norms, windowed/global attention within one image, sine position encodings
from the map size only), so the logits equal the frame-by-frame path up to float rounding (tested: max difference
<= 1e-5 in float32, ``tests/test_sam2_batched.py``). Only one chunk of features is held.

Preprocessing (resize to the model's square input, ImageNet mean/std) is done elsewhere
(``video_pipeline.preprocess.sam2_preprocess``); this module takes normalised tensors.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    Sam2HieraDetConfig,
    Sam2VideoConfig,
    Sam2VideoInferenceSession,
    Sam2VideoMaskDecoderConfig,
    Sam2VideoModel,
    Sam2VideoPromptEncoderConfig,
    Sam2VisionConfig,
)

from refstream_errors import WeightsNotFoundError
from workers.config import Sam2Spec

__all__ = [
    "SAM2_HIERA_LARGE_ID",
    "Sam2Stream",
    "Sam2VideoDecoder",
    "build_sam2",
    "load_sam2",
    "sam2_image_size",
    "sam2_video_config",
]

#: Hugging Face id of the SAM 2.0 Hiera-L video model that VideoGLaMM uses (``sam2_hiera_large.pt`` converted).
SAM2_HIERA_LARGE_ID = "facebook/sam2-hiera-large-hf"


# --------------------------------------------------------------------------------------------------- configs
def sam2_video_config(spec: Sam2Spec) -> Sam2VideoConfig:
    """The ``Sam2VideoConfig`` of a model config's ``sam2`` sizes (``configs/*.yaml``), SAM **2.0** flags set.

    ``configs/videoglamm.yaml`` holds ``facebook/sam2-hiera-large-hf`` (SAM 2.0 Hiera-L, 224.4 M parameters):
    the Hiera-L trunk of ``sam2_configs/sam2_hiera_l.yaml`` (VideoGLaMM @ 6b15b1e, same as
    facebookresearch/sam2 @ 2b90b9f ``sam2/configs/sam2/sam2_hiera_l.yaml``): embed 144, heads 2 (doubling per
    stage), stages ``[2, 6, 36, 4]``, global attention blocks ``[23, 33, 43]``, window specs ``[8, 4, 16, 8]``,
    background position size ``[7, 7]``, FPN channels ``[1152, 576, 288, 144]`` -> 256, and the transformers
    5.23 ``Sam2VideoConfig`` defaults for the rest (1024 px input, memory attention 4 layers x 256, memory
    encoder 64 channels, ...). ``configs/tiny.yaml`` holds a 2.7 M-parameter version for CPU tests with the
    same code paths (Hiera of width 32-256 with 5 blocks, hidden size 128, 2 memory-attention layers, 256 px).

    Fixed for every size (what makes it SAM 2.0, as VideoGLaMM uses it): SAM **2.0** differs from the 2.1
    defaults in two flags (transformers ``sam2_video/convert_sam2_video_to_hf.py``, and the yaml's
    ``add_tpos_enc_to_obj_ptrs: false`` / no ``no_obj_embed_spatial``):
    ``enable_temporal_pos_encoding_for_object_pointers=False`` and ``enable_occlusion_spatial_embedding=False``;
    multimask on anchor and tracked frames, 7 mask memories, 16 object pointers (transformers defaults).
    Derived from ``image_size`` S: feature maps ``S/4, S/8, S/16``, the prompt encoder's input S with 16 px
    patches, and the memory-attention RoPE size ``S/16`` (VideoGLaMM's yaml gives ``feat_sizes: [32, 32]`` but
    its ``RoPEAttention`` recomputes the frequencies for the actual map, ``sam2/modeling/sam/transformer.py``
    l. 301-302, so transformers' ``[64, 64]`` at 1024 px is equivalent); the FPN input channels are the Hiera
    stage widths, deepest first.

    Args:
        spec: the ``sam2`` section of a :class:`workers.config.ModelConfig` (validated: ``image_size`` a
            multiple of 64, consistent Hiera stages).

    Returns:
        Sam2VideoConfig with ``config.image_size == spec.image_size``; frames fed to the decoder must have this
        size, and the low-resolution mask logits are ``image_size / 4``.
    """
    s, hiera = spec.image_size, spec.hiera
    backbone = Sam2HieraDetConfig(
        hidden_size=hiera.hidden_size,
        num_attention_heads=hiera.num_attention_heads,
        image_size=[s, s],
        embed_dim_per_stage=list(hiera.embed_dim_per_stage),
        num_attention_heads_per_stage=list(hiera.num_attention_heads_per_stage),
        blocks_per_stage=list(hiera.blocks_per_stage),
        global_attention_blocks=list(hiera.global_attention_blocks),
        window_positional_embedding_background_size=list(hiera.window_positional_embedding_background_size),
        window_size_per_stage=list(hiera.window_size_per_stage),
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(reversed(hiera.embed_dim_per_stage)),
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        fpn_hidden_size=spec.fpn_hidden_size,
    )
    decoder = spec.mask_decoder
    return Sam2VideoConfig(
        vision_config=vision,
        image_size=s,
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=spec.prompt_encoder_hidden_size, image_size=s,
                                                           patch_size=16),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(
            hidden_size=decoder.hidden_size, mlp_dim=decoder.mlp_dim, num_attention_heads=decoder.num_attention_heads,
            iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        ),
        enable_temporal_pos_encoding_for_object_pointers=False,
        enable_occlusion_spatial_embedding=False,
        memory_attention_hidden_size=spec.memory_attention_hidden_size,
        memory_attention_num_layers=spec.memory_attention_num_layers,
        memory_attention_feed_forward_hidden_size=spec.memory_attention_feed_forward_hidden_size,
        memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=spec.memory_encoder_hidden_size,
        memory_encoder_output_channels=spec.memory_encoder_output_channels,
        mask_downsampler_embed_dim=spec.mask_downsampler_embed_dim,
        memory_fuser_embed_dim=spec.memory_fuser_embed_dim,
        memory_fuser_intermediate_dim=spec.memory_fuser_intermediate_dim,
    )


def sam2_image_size(model_or_config: Sam2VideoModel | Sam2VideoConfig) -> int:
    """Square input size S (pixels) that frames must have for this model/config (1024 full, 256 tiny).

    Raises:
        ValueError: the config's image size is not square.
    """
    cfg = model_or_config.config if isinstance(model_or_config, Sam2VideoModel) else model_or_config
    size = cfg.image_size
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"SAM2 image_size must be square, got {size}")
        size = size[0]
    return int(size)


# --------------------------------------------------------------------------------------------------- models
def build_sam2(
    config: Sam2VideoConfig,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    init: str = "default",
) -> Sam2VideoModel:
    """A randomly initialised ``Sam2VideoModel`` in eval mode (for tests and shape/timing checks).

    Args:
        config: e.g. :func:`sam2_video_config` of a preset's ``sam2`` sizes.
        seed: seeds the initialisation (same seed -> identical weights) without touching the global RNG
            state; ``None`` uses the current global RNG.
        dtype: parameter dtype (a ``torch.dtype``).
        device: where the parameters live.
        init: ``"default"``: transformers' init (std 0.02; several parameters are zero, e.g. the memory
            fuser's layer scales): mask logits are ~1e-3 and the object-score head calls the object absent
            on most frames (logits -1024), so outputs barely depend on the inputs. ``"test"``: every weight
            redrawn from N(0, 1/fan_in) (norm weights 1 + N(0, 0.01), other 1-D parameters and embeddings
            N(0, 0.01)) and the object-score head's output bias set to +8 (object always present): logits of
            order 1 that depend on the frames and on the [SEG] vector. For tests only.

    Returns:
        Sam2VideoModel in ``eval()`` mode.

    Raises:
        ValueError: unknown ``init``.
    """
    if init not in ("default", "test"):
        raise ValueError(f"init must be 'default' or 'test', got {init!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = Sam2VideoModel(config)
        if init == "test":
            _redraw_for_tests(model)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def _redraw_for_tests(model: Sam2VideoModel) -> None:
    """Re-initialise ``model`` (in place, from the current RNG) so that random outputs are informative."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.LayerNorm) and name == "weight":
                param.copy_(1.0 + 0.01 * torch.randn_like(param))
            elif param.dim() >= 2 and not isinstance(module, torch.nn.Embedding) and param[0].numel() > 1:
                if isinstance(module, torch.nn.ConvTranspose2d):  # weight [in, out/groups, kh, kw]
                    fan_in = param.shape[0] * param.shape[2] * param.shape[3]
                else:
                    fan_in = param[0].numel()
                param.copy_(torch.randn_like(param) / fan_in**0.5)
            else:
                param.copy_(0.01 * torch.randn_like(param))
    model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(8.0)


def load_sam2(
    model_id_or_path: str | os.PathLike = SAM2_HIERA_LARGE_ID,
    *,
    local_files_only: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Sam2VideoModel:
    """Load converted SAM2 video weights (``save_pretrained`` layout) with ``Sam2VideoModel.from_pretrained``.

    Args:
        model_id_or_path: a local folder holding ``config.json`` + ``model.safetensors`` (as downloaded from
            ``facebook/sam2-hiera-large-hf``) or a hub id found in the local Hugging Face cache.
        local_files_only: passed to ``from_pretrained``; ``True`` (default) never touches the network.
        dtype: parameter dtype (a ``torch.dtype``).
        device: where the parameters live.

    Returns:
        Sam2VideoModel in ``eval()`` mode.

    Raises:
        WeightsNotFoundError: the weights are not there; the message names ``facebook/sam2-hiera-large-hf``
            and where to put it.

    Warns:
        UserWarning: the checkpoint enables the temporal encoding of object pointers (SAM 2.1, not
            VideoGLaMM's SAM 2.0).
    """
    src = os.fspath(model_id_or_path)
    try:
        model = Sam2VideoModel.from_pretrained(src, local_files_only=local_files_only, dtype=dtype)
    except OSError as err:
        raise WeightsNotFoundError(
            f"SAM2 video weights not found at {src!r} ({err.__class__.__name__}: {str(err).splitlines()[0]}). "
            f"VideoGLaMM's pixel decoder is SAM 2.0 Hiera-L: on a machine with internet run "
            f"`huggingface-cli download {SAM2_HIERA_LARGE_ID} --local-dir <models>/sam2-hiera-large-hf` "
            f"and pass that folder (it must contain config.json and model.safetensors), or put "
            f"{SAM2_HIERA_LARGE_ID} in the Hugging Face cache ($HF_HOME/hub) and pass the id."
        ) from err
    if model.config.enable_temporal_pos_encoding_for_object_pointers:
        warnings.warn(
            f"{src!r} is a SAM 2.1-style checkpoint (temporal encoding of object pointers) but VideoGLaMM uses "
            "SAM 2.0 Hiera-L; also, in streaming mode transformers normalises pointer offsets by 15 where the "
            "offline predictor uses min(num_frames, 16) - 1, so clips shorter than 16 frames decode differently.",
            stacklevel=2,
        )
    return model.to(device=device).eval()


# -------------------------------------------------------------------------------------------------- helpers
def _as_seg_matrix(seg_embeddings: torch.Tensor, hidden: int, single: bool) -> torch.Tensor:
    """Normalise [SEG] embeddings to ``[N, C]``; see :meth:`Sam2VideoDecoder.propagate_many`."""
    if not isinstance(seg_embeddings, torch.Tensor):
        raise TypeError(f"seg embedding must be a torch.Tensor, got {type(seg_embeddings).__name__}")
    if not seg_embeddings.is_floating_point():
        raise TypeError(f"seg embedding must be floating point, got {seg_embeddings.dtype}")
    x = seg_embeddings.detach()
    if single:
        if x.numel() != hidden or x.shape[-1] != hidden:
            raise ValueError(f"expected one [SEG] embedding of size {hidden} ([C], [1, C] or [1, 1, C]), "
                             f"got shape {tuple(x.shape)}")
        return x.reshape(1, hidden)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    elif x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 2 or x.shape[1] != hidden or x.shape[0] == 0:
        raise ValueError(f"expected [SEG] embeddings [N, {hidden}] or [N, 1, {hidden}] with N >= 1, "
                         f"got shape {tuple(seg_embeddings.shape)}")
    return x


def _iter_frames(frames: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Yield single ``[3, S, S]`` frames from an iterable of frames or ``[t, 3, S, S]`` chunks."""
    for item in frames:
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"frames must be torch.Tensor, got {type(item).__name__}")
        if item.dim() == 3:
            chunk: Iterable[torch.Tensor] = (item,)
        elif item.dim() == 4:
            chunk = item.unbind(0)
        else:
            raise ValueError(f"a frame must be [3, S, S] or a chunk [t, 3, S, S], got {tuple(item.shape)}")
        if tuple(item.shape[-3:]) != (3, size, size):
            raise ValueError(
                f"SAM2 frames must be [3, {size}, {size}] (resized + ImageNet-normalised by "
                f"video_pipeline.preprocess.sam2_preprocess), got {tuple(item.shape)}"
            )
        yield from chunk


def _iter_batches(frames: Iterable[torch.Tensor], size: int, chunk_size: int) -> Iterator[torch.Tensor]:
    """Regroup frames / chunks into ``[b, 3, S, S]`` batches of ``chunk_size`` frames (the last may be shorter),
    consuming ``frames`` lazily (at most one batch is held)."""
    if chunk_size == 1:
        yield from (frame.unsqueeze(0) for frame in _iter_frames(frames, size))
        return
    held: list[torch.Tensor] = []
    for frame in _iter_frames(frames, size):
        held.append(frame)
        if len(held) == chunk_size:
            yield torch.stack(held)
            held = []
    if held:
        yield torch.stack(held)


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 (frames per image-encoder batch; 1 = frame by "
                         f"frame), got {chunk_size!r}")
    return chunk_size


def _check_video_size(video_size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in video_size)
    except (TypeError, ValueError):
        raise ValueError(f"video_size must be (height, width), got {video_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"video_size must be positive, got {video_size!r}")
    return h, w


# --------------------------------------------------------------------------------------------------- stream
class Sam2Stream:
    """One streaming SAM2 pass over one video (or clip) for N ``[SEG]`` embeddings (N objects, one session).

    The N expressions share one ``Sam2VideoInferenceSession``: each frame's image features are computed once
    and cached for all objects (SAM2 image features do not depend on the expression); per-object prompt,
    memory attention and mask decoding run per object inside ``Sam2VideoModel.forward``, the memory encoder
    batched over objects. The first frame given to :meth:`step` is the anchor frame (index 0).

    Memory: after each frame the stream keeps (``prune_memory=True``) only what later frames read:
    no pixel frame, the image features of the current frame only (``max_vision_features_cache_size=1``),
    per object the anchor output plus the last ``max_object_pointers_in_encoder - 1`` (15) non-conditioning
    outputs, of which only the last ``num_maskmem - 1`` (6) keep their memory features; ``high_res_masks`` (an
    ``S x S`` float map per frame and object) and non-anchor ``pred_masks`` are dropped. Results are identical
    to keeping everything. With ``prune_memory=False`` the session grows like transformers' default (every
    frame's pixels and outputs). Because pixel frames are dropped, ``session.num_frames`` stays 0: do not call
    ``propagate_in_video_iterator`` on a pruned session.

    Not thread-safe for one model shared by concurrent streams: the anchor-frame hook is registered on the
    shared ``model.prompt_encoder`` for the duration of the anchor call.

    Attributes:
        session: the underlying ``Sam2VideoInferenceSession`` (for inspection).
        num_objects: N.
        next_frame_idx: index the next :meth:`step` frame will get.
    """

    def __init__(
        self,
        model: Sam2VideoModel,
        seg_embeddings: torch.Tensor,
        video_size: tuple[int, int],
        *,
        state_device: str | torch.device | None = None,
        prune_memory: bool = True,
        chunk_size: int = 1,
    ) -> None:
        """Open a session and register N objects with a dummy (label -1) point on frame 0.

        Args:
            model: a ``Sam2VideoModel`` (eval mode).
            seg_embeddings: float ``[N, C]`` or ``[N, 1, C]`` (or ``[C]`` for N = 1), C = prompt-encoder hidden
                size (256 full, 128 tiny); object ``k`` is obj id ``k``.
            video_size: ``(H, W)`` of the original video in pixels; output logits have this size.
            state_device: where memory features/outputs are kept (default: the model's device; "cpu" offloads).
            prune_memory: drop session data no later frame reads (see class doc).
            chunk_size: frames whose image features :meth:`step_chunk` computes in one batch (1: frame by
                frame, as :meth:`step`).

        Raises:
            ValueError / TypeError: bad embedding shape/dtype, video size or chunk size.
        """
        self.chunk_size = _check_chunk_size(chunk_size)
        self.model = model
        cfg = model.config
        self._hidden = cfg.prompt_encoder_config.hidden_size
        self.image_size = sam2_image_size(model)
        self._seg = _as_seg_matrix(seg_embeddings, self._hidden, single=False)
        self.num_objects = int(self._seg.shape[0])
        self.video_size = _check_video_size(video_size)
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        self._prune = prune_memory
        self._keep_mem = max(int(cfg.num_maskmem) - 1, 0)
        self._keep_ptr = max(int(cfg.max_object_pointers_in_encoder) - 1, 0)
        self.session = Sam2VideoInferenceSession(
            video=None,
            video_height=self.video_size[0],
            video_width=self.video_size[1],
            inference_device=self._device,
            inference_state_device=state_device if state_device is not None else self._device,
            video_storage_device=self._device,
            dtype=self._dtype,  # a torch.dtype: the string default breaks `.to(dtype=...)` in 5.23
            max_vision_features_cache_size=1,
        )
        self.next_frame_idx = 0
        self._closed = False
        for obj_id in range(self.num_objects):
            obj_idx = self.session.obj_id_to_idx(obj_id)
            # VideoGLaMM passes no points: SAM2 then uses (0, 0) with label -1 (sam2_base.py l. 310-313).
            self.session.add_point_inputs(
                obj_idx,
                0,
                {
                    "point_coords": torch.zeros(1, 1, 1, 2, dtype=torch.float32),
                    "point_labels": torch.full((1, 1, 1), -1, dtype=torch.int32),
                },
            )
        self.session.obj_with_new_inputs = list(range(self.num_objects))

    # -- the [SEG] hook ------------------------------------------------------------------------------------
    def _anchor_forward(self, frame: torch.Tensor) -> Any:
        """Run frame 0 with the [SEG] vectors appended to the sparse prompt (hook removed in ``finally``)."""
        seg = self._seg
        calls: list[int] = []

        def append_seg(module: torch.nn.Module, args: Any, output: Any) -> Any:
            sparse, dense = output
            k = len(calls)
            if sparse is None or sparse.dim() != 4 or k >= seg.shape[0]:
                raise RuntimeError(
                    f"unexpected prompt-encoder call #{k} on the anchor frame "
                    f"(sparse {None if sparse is None else tuple(sparse.shape)}, {seg.shape[0]} objects)"
                )
            calls.append(k)
            vec = seg[k].to(device=sparse.device, dtype=sparse.dtype)
            vec = vec.view(1, 1, 1, -1).expand(sparse.shape[0], sparse.shape[1], 1, sparse.shape[-1])
            # [B, P, 2, C] = [not_a_point, not_a_point] -> [B, P, 3, C] = [..., SEG] (prompt_encoder.py l. 180)
            return torch.cat([sparse, vec], dim=2), dense

        handle = self.model.prompt_encoder.register_forward_hook(append_seg)
        try:
            out = self.model(self.session, frame_idx=0, frame=frame)
        finally:
            handle.remove()
        if len(calls) != self.num_objects:
            raise RuntimeError(f"[SEG] hook ran {len(calls)} times on the anchor frame, expected {self.num_objects}")
        return out

    # -- stepping ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, frame: torch.Tensor) -> torch.Tensor:
        """Segment the next frame.

        Args:
            frame: float ``[3, S, S]`` (or ``[1, 3, S, S]``), resized to S = config image size and
                ImageNet-normalised; any device (moved to the model's device and dtype).

        Returns:
            float32 mask logits ``[N, H, W]`` at the original video size, on the model's device
            (``> 0`` = object). Frames where SAM2's object-score head says "absent" are ``-1024``.

        Raises:
            ValueError: wrong frame shape. RuntimeError: the stream is closed.
        """
        if self._closed:
            raise RuntimeError("this Sam2Stream is closed")
        if frame.dim() == 4 and frame.shape[0] == 1:
            frame = frame[0]
        (frame,) = list(_iter_frames([frame], self.image_size))
        return self._step(frame.to(device=self._device, dtype=self._dtype))

    @torch.inference_mode()
    def step_chunk(self, frames: torch.Tensor) -> Iterator[torch.Tensor]:
        """Segment the next ``t`` frames, the image encoder batched over :attr:`chunk_size` frames at a time.

        The image features of ``min(chunk_size, frames left)`` frames are computed in one
        ``get_image_features`` call, then each frame goes through memory attention, the mask decoder and the
        memory encoder in order, exactly as :meth:`step` (which computes its own features). Logits equal
        :meth:`step`'s up to float rounding (<= 1e-5 in float32, tested). Only the current batch's features
        are held (besides the session's memory bank).

        Args:
            frames: float ``[t, 3, S, S]`` (or one ``[3, S, S]`` frame), preprocessed as for :meth:`step`; any
                device (moved to the model's device and dtype one batch at a time).

        Yields:
            per frame, in order: float32 mask logits ``[N, H, W]`` as :meth:`step` returns them.

        Raises:
            ValueError: wrong frame shape (before any frame is segmented). RuntimeError: the stream is closed.
        """
        if self._closed:
            raise RuntimeError("this Sam2Stream is closed")
        if frames.dim() == 3:
            frames = frames.unsqueeze(0)
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"SAM2 frames must be [t, 3, {self.image_size}, {self.image_size}] (resized + ImageNet-normalised "
                f"by video_pipeline.preprocess.sam2_preprocess), got {tuple(frames.shape)}"
            )
        for start in range(0, frames.shape[0], self.chunk_size):
            batch = frames[start:start + self.chunk_size].to(device=self._device, dtype=self._dtype)
            if batch.shape[0] == 1:  # nothing to batch: the model encodes the frame itself (today's path)
                yield self._step(batch[0])
                continue
            features = self._encode(batch)
            for i in range(batch.shape[0]):
                feature, features[i] = features[i], None  # held by this frame's step only
                yield self._step(batch[i], feature)

    def _encode(self, batch: torch.Tensor) -> list[dict]:
        """Image features of ``batch`` ``[B, 3, S, S]`` in one encoder call, split per frame.

        Returns:
            B dicts in the layout of ``Sam2VideoInferenceCache``: ``vision_feats`` (per FPN level
            ``[HW, 1, C]``, a view of the batch's ``[HW, B, C]`` with the same strides as a one-frame batch)
            and ``vision_pos_embeds`` (per level ``[HW, 1, C]``: the sine encoding depends on the map size only,
            so frame 0's copy serves every frame and the ``[HW, B, C]`` maps are not kept).
        """
        out = self.model.get_image_features(batch, return_dict=True)
        feats = out.fpn_hidden_states
        pos = [p[:, :1].clone() for p in out.fpn_position_encoding]
        del out
        return [{"vision_feats": [f[:, i:i + 1] for f in feats], "vision_pos_embeds": pos}
                for i in range(batch.shape[0])]

    def _step(self, frame: torch.Tensor, features: dict | None = None) -> torch.Tensor:
        """One frame ``[3, S, S]`` already on the model's device/dtype; ``features``: its precomputed image
        features (:meth:`_encode`), put in the session's cache so that the model does not encode it again."""
        t = self.next_frame_idx
        if features is not None:
            self.session.cache.cache_vision_features(t, features)
        out = self._anchor_forward(frame) if t == 0 else self.model(self.session, frame_idx=t, frame=frame)
        self.next_frame_idx = t + 1
        if self._prune:
            self._release(t)
        low = out.pred_masks  # [N, 1, S/4, S/4]
        logits = F.interpolate(low.float(), size=self.video_size, mode="bilinear", align_corners=False)
        return logits[:, 0]

    def _release(self, t: int) -> None:
        """Drop what SAM2 will not read at frames > t (forward tracking, no new prompts).

        Frame t+1 reads: non-conditioning memories of frames t+1-6..t (``num_maskmem - 1``;
        ``_gather_memory_frame_outputs``), object pointers of frames t+1-15..t (``max_object_pointers - 1``;
        ``_get_object_pointers``), all conditioning outputs (``max_cond_frame_num = -1``), and its own freshly
        computed image features. ``high_res_masks`` are only used by the memory encoder of the same call;
        non-conditioning ``pred_masks`` are never read back.
        """
        s = self.session
        if s.processed_frames is not None:
            s.processed_frames.pop(t, None)
        oldest_kept = t + 1 - max(self._keep_ptr, self._keep_mem)
        oldest_mem = t + 1 - self._keep_mem
        for obj_idx, outs in s.output_dict_per_obj.items():
            for entry in outs["cond_frame_outputs"].values():
                entry.pop("high_res_masks", None)
            non_cond = outs["non_cond_frame_outputs"]
            for fi in list(non_cond):
                if fi < oldest_kept:
                    del non_cond[fi]
                    continue
                entry = non_cond[fi]
                entry.pop("high_res_masks", None)
                entry.pop("pred_masks", None)
                if fi < oldest_mem:
                    entry.pop("maskmem_features", None)
                    entry.pop("maskmem_pos_enc", None)
            tracked = s.frames_tracked_per_obj.get(obj_idx, {})
            for fi in [fi for fi in tracked if fi < oldest_kept]:
                del tracked[fi]

    def footprint(self) -> dict[str, int]:
        """What the session holds now: counts and bytes of tensors (for tests and monitoring).

        Returns:
            dict with ``pixel_frames`` (frames stored), ``feature_frames`` (frames with cached image
            features), ``non_cond_outputs`` and ``memory_frames`` (max over objects of stored non-anchor
            outputs / of those holding ``maskmem_features``), ``high_res_masks`` (count over all objects and
            frames), ``tensor_bytes`` (all tensors in frames, cache and outputs).
        """
        s = self.session

        def nbytes(obj: Any) -> int:
            if isinstance(obj, torch.Tensor):
                return obj.numel() * obj.element_size()
            if isinstance(obj, dict):
                return sum(nbytes(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(nbytes(v) for v in obj)
            return 0

        outs = s.output_dict_per_obj.values()
        return {
            "pixel_frames": len(s.processed_frames or {}),
            "feature_frames": len(s.cache._vision_features),
            "non_cond_outputs": max((len(o["non_cond_frame_outputs"]) for o in outs), default=0),
            "memory_frames": max(
                (sum("maskmem_features" in e for e in o["non_cond_frame_outputs"].values()) for o in outs),
                default=0,
            ),
            "high_res_masks": sum(
                "high_res_masks" in e for o in outs for d in o.values() for e in d.values()
            ),
            "tensor_bytes": nbytes(s.processed_frames or {})
            + nbytes(s.cache._vision_features)
            + nbytes(s.output_dict_per_obj),
        }

    def close(self) -> None:
        """Free the session's frames, cached features and outputs. Further :meth:`step` calls raise."""
        self._closed = True
        self.session.reset_inference_session()
        if self.session.processed_frames is not None:
            self.session.processed_frames.clear()


# -------------------------------------------------------------------------------------------------- decoder
class Sam2VideoDecoder:
    """VideoGLaMM's SAM2 pixel decoder as a streaming generator over preprocessed frames.

    ``[SEG]`` -> sparse prompt ``[not_a_point, not_a_point, SEG]`` on the anchor (first) frame only, multimask
    with the best predicted IoU kept, then SAM2 memory propagation (7 mask memories, up to 16 object pointers)
    through the following frames; logits bilinearly resized to the video size; mask = logits > 0
    (VideoGLaMM ``model/VideoGLaMM.py`` l. 846-873 @ 6b15b1e; details in the module docstring).

    Several expressions are decoded in one pass (one session, N objects): image features are computed once
    per frame for all of them. Each object's result equals decoding it alone (up to float rounding of the
    memory encoder, which is batched over objects).

    Args:
        model: ``Sam2VideoModel`` (e.g. :func:`build_sam2` or :func:`load_sam2`), eval mode.
        state_device: where memory features/outputs are kept (default: the model's device).
        prune_memory: keep only what later frames read (default; bounded memory), see :class:`Sam2Stream`.
        chunk_size: frames per image-encoder batch (1: frame by frame); see :meth:`Sam2Stream.step_chunk`.

    Raises:
        ValueError: ``chunk_size`` is not an integer >= 1.
    """

    def __init__(
        self,
        model: Sam2VideoModel,
        *,
        state_device: str | torch.device | None = None,
        prune_memory: bool = True,
        chunk_size: int = 1,
    ) -> None:
        self.model = model.eval()
        self.state_device = state_device
        self.prune_memory = prune_memory
        self.chunk_size = _check_chunk_size(chunk_size)

    @property
    def image_size(self) -> int:
        """Square input size S in pixels that frames must have (``config.image_size``)."""
        return sam2_image_size(self.model)

    @property
    def seg_dim(self) -> int:
        """Size C of a ``[SEG]`` embedding (prompt-encoder hidden size: 256 full, 128 tiny)."""
        return int(self.model.config.prompt_encoder_config.hidden_size)

    def open_stream(self, seg_embeddings: torch.Tensor, video_size: tuple[int, int]) -> Sam2Stream:
        """A :class:`Sam2Stream` for ``seg_embeddings`` ``[N, C]`` / ``[N, 1, C]``; feed it with ``step``."""
        return Sam2Stream(
            self.model, seg_embeddings, video_size, state_device=self.state_device, prune_memory=self.prune_memory,
            chunk_size=self.chunk_size,
        )

    def propagate_many(
        self,
        frames: Iterable[torch.Tensor],
        seg_embeddings: torch.Tensor,
        video_size: tuple[int, int],
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode N expressions at once, streaming.

        Args:
            frames: iterable of float ``[3, S, S]`` frames or ``[t, 3, S, S]`` chunks (S =
                :attr:`image_size`, ImageNet-normalised), consumed lazily one at a time; the first frame
                is the anchor frame.
            seg_embeddings: float ``[N, C]`` or ``[N, 1, C]`` (``[C]`` = one), C = :attr:`seg_dim`.
            video_size: ``(H, W)`` of the original video in pixels.

        Yields:
            ``(frame_index, logits)``: frame_index 0, 1, ... in order; logits float32 ``[N, H, W]`` on the
            model's device.

        Raises:
            ValueError / TypeError: bad embedding shape or video size (at call time); bad frame shape (when
                that frame is reached).
        """
        stream = self.open_stream(seg_embeddings, video_size)  # validates now, not at the first next()
        return self._run(stream, frames)

    def _run(self, stream: Sam2Stream, frames: Iterable[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        try:
            for batch in _iter_batches(frames, self.image_size, self.chunk_size):
                for logits in stream.step_chunk(batch):
                    yield stream.next_frame_idx - 1, logits
        finally:
            stream.close()

    def propagate(
        self,
        frames: Iterable[torch.Tensor],
        seg_embedding: torch.Tensor,
        video_size: tuple[int, int],
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode one expression, streaming.

        Args:
            frames: as in :meth:`propagate_many`.
            seg_embedding: float ``[1, 1, C]``, ``[1, C]`` or ``[C]`` (output of VideoGLaMM's L->V adapter).
            video_size: ``(H, W)`` of the original video in pixels.

        Yields:
            ``(frame_index, logits)`` with logits float32 ``[H, W]`` (``> 0`` = object), one per frame, in order.

        Raises:
            ValueError / TypeError: bad shapes (embedding and video size: at call time).
        """
        seg = _as_seg_matrix(seg_embedding, self.seg_dim, single=True)
        return ((idx, logits[0]) for idx, logits in self.propagate_many(frames, seg, video_size))

    def propagate_masks(
        self,
        frames: Iterable[torch.Tensor],
        seg_embeddings: torch.Tensor,
        video_size: tuple[int, int],
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Like :meth:`propagate_many` but yields boolean masks ``[N, H, W]`` (``logits > 0``, VideoGLaMM l. 873)."""
        return ((idx, logits > 0) for idx, logits in self.propagate_many(frames, seg_embeddings, video_size))
