"""Frame preprocessing for CLIP ViT-L/14-336, InternVideo2 and SAM2, in torch only (no torchvision).

All functions take ``np.uint8 [T, H, W, 3]`` RGB frames (as :meth:`VideoSource.read` returns them) and
return a new ``torch.float32 [T, 3, S, S]`` tensor on the CPU. The work is done ``chunk_size`` frames at a
time, so temporary memory is bounded by the chunk (the output itself is ``T * 3 * S * S * 4`` bytes:
1.35 MB per frame for CLIP, 0.6 MB for InternVideo2, 12.6 MB for SAM2 - stream long videos through
:meth:`VideoSource.iter_chunks` rather than preprocessing them whole).

Resizing runs on uint8 tensors (``torch.nn.functional.interpolate`` with ``antialias=True``), which
reproduces Pillow's resampling (what the reference pipelines use) to within 1 grey level.

Errors: ``TypeError`` when ``frames`` is not a uint8 numpy array, ``ValueError`` for a wrong shape or a
bad ``chunk_size``, :class:`refstream_errors.ConfigError` for an unknown ``sam2_preprocess`` style.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from refstream_errors import ConfigError

CLIP_SIZE = 336
#: CLIP's per-channel RGB mean and std on [0, 1] pixels (``image_mean`` / ``image_std`` of the
#: ``CLIPImageProcessor`` of openai/clip-vit-large-patch14-336): THE copy RefStream uses (preprocessing here,
#: un-normalising for pictures in ``refstream``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERNVIDEO_SIZE = 224
SAM2_SIZE = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM2_STYLES = ("transformers", "sam2", "videoglamm")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        kind = f"{type(frames).__name__} of {frames.dtype}" if hasattr(frames, "dtype") else type(frames).__name__
        raise TypeError(f"frames must be a numpy uint8 array [T, H, W, 3], got {kind}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must have shape [T, H, W, 3] with H, W >= 1, got {list(frames.shape)}")
    return frames


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (or 0..255 float) [N, 3, H, W] -> float32 ``(x / 255 - mean) / std``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


def _map_chunks(
    frames: np.ndarray,
    out_hw: tuple[int, int],
    fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """Apply ``fn`` (uint8 [n, 3, H, W] -> float32 [n, 3, *out_hw]) chunk by chunk into one output."""
    frames = _check_frames(frames)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    out = torch.empty((len(frames), 3, *out_hw), dtype=torch.float32)
    for start in range(0, len(frames), chunk_size):
        chunk = frames[start : start + chunk_size]
        if not chunk.flags.writeable:  # torch warns on read-only memory (e.g. np.asarray(PIL image))
            chunk = chunk.copy()
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2)  # uint8, channels-last memory
        out[start : start + len(chunk)] = fn(x)
    return out


def clip_size_after_resize(height: int, width: int, shortest_edge: int = CLIP_SIZE) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``shortest_edge``; the longer side is truncated
    (``int(shortest_edge * long / short)``) as ``transformers.image_transforms.get_resize_output_image_size``
    does with ``default_to_square=False``."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def clip_preprocess(frames: np.ndarray, *, chunk_size: int = 16) -> torch.Tensor:
    """Frames for CLIP ViT-L/14-336 (VideoGLaMM's spatial encoder).

    Shorter side to 336 with bicubic (antialiased, Pillow-like), centre crop 336x336
    (offsets ``(size - 336) // 2``), ``/255``, CLIP mean/std.

    Args:
        frames: ``np.uint8 [T, H, W, 3]`` RGB.
        chunk_size: frames processed at a time.

    Returns:
        ``torch.float32 [T, 3, 336, 336]``; values in about ``[-1.80, 2.15]``.

    Raises:
        TypeError / ValueError: see the module docstring.

    Source: the ``CLIPImageProcessor`` of ``openai/clip-vit-large-patch14-336`` (``shortest_edge`` 336,
    ``crop_size`` 336, resample BICUBIC) as used by VideoGLaMM's ``EncPreprocessor_VideoGPTPlus``
    (mbzuai-oryx/VideoGLaMM @ 6b15b1e7f75009d0e1a858ac08e28021c4faaf11,
    ``VideoGLaMM/utils/enc_preprocessors.py``), which runs on PIL images. Compared with
    ``transformers.CLIPImageProcessorPil`` (transformers 5.23) on real frames: mean abs difference 4e-5 to
    9e-5, max 0.030 (two grey levels, on ~1e-6 of the values; one grey level, 0.015, on <0.5%), because
    Pillow rounds to uint8 between its two separable passes; see ``tests/test_video_pipeline.py``.
    """
    _check_frames(frames)
    height, width = clip_size_after_resize(frames.shape[1], frames.shape[2])
    top, left = (height - CLIP_SIZE) // 2, (width - CLIP_SIZE) // 2

    def run(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x[:, :, top : top + CLIP_SIZE, left : left + CLIP_SIZE]
        return _normalise(x, CLIP_MEAN, CLIP_STD)

    return _map_chunks(frames, (CLIP_SIZE, CLIP_SIZE), run, chunk_size)


def internvideo_preprocess(frames: np.ndarray, *, chunk_size: int = 16) -> torch.Tensor:
    """Frames for the InternVideo2-Stage2-1B-224p-f4 video encoder (VideoGLaMM's temporal encoder).

    Resize to 224x224 (aspect ratio not kept, no crop) with bilinear interpolation **without**
    antialiasing, rounded to uint8, then ``/255`` and ImageNet mean/std.

    Args:
        frames: ``np.uint8 [T, H, W, 3]`` RGB.
        chunk_size: frames processed at a time.

    Returns:
        ``torch.float32 [T, 3, 224, 224]``; values in about ``[-2.12, 2.64]``.

    Raises:
        TypeError / ValueError: see the module docstring.

    Source: ``VideoTrainProcessor.frames2tensor`` in mbzuai-oryx/VideoGLaMM @
    6b15b1e7f75009d0e1a858ac08e28021c4faaf11, ``VideoGLaMM/model/videogpt_plus/model/internvideo/utils.py``:
    ``cv2.resize(x, (224, 224))`` (default ``INTER_LINEAR``: half-pixel centres, no antialiasing, uint8
    output) on RGB frames, then ``(x / 255 - mean) / std``. Compared with ``cv2.resize`` of
    opencv-python-headless (a dependency of RefStream) on DAVIS and bedroom frames: at most 1 grey level
    (0.0175 after normalisation) on ~10% of the values (OpenCV's fixed-point weights), checked in
    ``tests/test_video_pipeline.py``. The resize itself stays in torch so that frames are processed in
    batched chunks with the other encoders' preprocessing.
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        size = (INTERNVIDEO_SIZE, INTERNVIDEO_SIZE)
        x = F.interpolate(x.to(torch.float32), size=size, mode="bilinear", antialias=False, align_corners=False)
        return _normalise(x.round_().clamp_(0, 255), IMAGENET_MEAN, IMAGENET_STD)

    return _map_chunks(frames, (INTERNVIDEO_SIZE, INTERNVIDEO_SIZE), run, chunk_size)


def sam2_longest_side_size(height: int, width: int, target: int = SAM2_SIZE) -> tuple[int, int]:
    """(height, width) with the longer side scaled to ``target``, rounded half up, as SAM's
    ``ResizeLongestSide.get_preprocess_shape`` computes it (used by ``style="videoglamm"``)."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam2_preprocess(
    frames: np.ndarray, *, style: str = "transformers", chunk_size: int = 8, size: int = SAM2_SIZE
) -> torch.Tensor:
    """Frames for the SAM2 Hiera-L image encoder: ``size`` x ``size`` (1024; aspect ratio not kept), ImageNet mean/std.

    Args:
        frames: ``np.uint8 [T, H, W, 3]`` RGB.
        style: which reference to reproduce (they differ by a few grey levels at edges):

            * ``"transformers"`` (default): ``Sam2VideoVideoProcessor`` of transformers 5.23
              (``transformers/models/sam2_video/video_processing_sam2_video.py``): bilinear resize of the
              uint8 frame straight to 1024x1024 with antialiasing (torchvision ``resize``), ``/255``, ImageNet
              mean/std. Use with the transformers ``Sam2VideoModel``.
            * ``"sam2"``: facebookresearch/sam2 @ 2b90b9f5ceec907a1c18123530e92e794ad901a4,
              ``sam2/utils/misc.py::_load_img_as_tensor`` (the JPEG-folder video loader): Pillow
              ``resize((1024, 1024))`` with its default BICUBIC filter, ``/255``, ImageNet mean/std.
            * ``"videoglamm"``: what the VideoGLaMM checkpoint was trained and evaluated with
              (mbzuai-oryx/VideoGLaMM @ 6b15b1e7f75009d0e1a858ac08e28021c4faaf11,
              ``VideoGLaMM/utils/sam_transforms.py::sam_preprocess`` with ``model_type="sam2"``): Pillow
              bilinear resize of the longer side to 1024 (``ResizeLongestSide``), normalise with
              mean/std x 255, then ``F.interpolate(..., (1024, 1024), mode="bilinear")`` of the
              *normalised* float image (no antialiasing) to stretch the shorter side.
        chunk_size: frames processed at a time (a 1024x1024 float32 frame is 12.6 MB).
        size: square output side in pixels (the model's ``image_size``: 1024 for Hiera-L, smaller for tiny
            test configs).

    Returns:
        ``torch.float32 [T, 3, size, size]``; values in about ``[-2.12, 2.64]``.

    Raises:
        ConfigError: unknown ``style``. TypeError / ValueError: see the module docstring.
    """
    if style not in SAM2_STYLES:
        raise ConfigError(
            f"unknown SAM2 preprocessing style {style!r}. Fix: use one of {', '.join(map(repr, SAM2_STYLES))}."
        )
    _check_frames(frames)
    side = size
    size = (side, side)
    mode = "bicubic" if style == "sam2" else "bilinear"
    first_size = sam2_longest_side_size(frames.shape[1], frames.shape[2], side) if style == "videoglamm" else size

    def run(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=first_size, mode=mode, antialias=True, align_corners=False)
        x = _normalise(x, IMAGENET_MEAN, IMAGENET_STD)
        if first_size != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=False, align_corners=False)
        return x

    return _map_chunks(frames, size, run, chunk_size)
