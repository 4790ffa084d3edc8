"""The VideoGLaMM GPU worker's model step: one clip's visual tokens and SAM2 frames in, masks per frame out.

:func:`segment_clip` is what the Ray actor :class:`refstream.service.gpu_worker.VideoGLaMMWorker` runs for a
clip (the actor adds loading, Ray object fetching and heartbeats): the visual tokens of the clip (CLIP tokens
after pruning + InternVideo2 tokens, [V, H]) and the expressions go through the LLM once (one [SEG] per
expression); then the SAM2 frames arrive chunk by chunk (never the whole video in memory), and one mask per
frame and expression is yielded as soon as it is decoded.

:func:`is_cuda_error` tells a CUDA failure that leaves the process's CUDA context unusable (the actors then
exit their process so that Ray restarts them) from a recoverable one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from workers.sam2_decoder import Sam2VideoDecoder

__all__ = ["is_cuda_error", "segment_clip"]


def is_cuda_error(exc: BaseException) -> bool:
    """A CUDA failure that leaves the context unusable (not an out-of-memory, which is recoverable)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cudaError", "AcceleratorError"))


def segment_clip(model, visual_tokens: torch.Tensor, expressions: Sequence[str], video_size: tuple[int, int],
                 frame_chunks: Iterable[torch.Tensor], answer_mode: str = "forced", report_answers: bool = False,
                 fastv=None, seed: int = 0, sam2_chunk: int = 1) -> Iterator[tuple[int, np.ndarray | dict]]:
    """Answer once, then stream masks.

    Args:
        model: a loaded :class:`workers.videoglamm.VideoGLaMM` with its LLM and SAM2 (``parts`` all or decoder).
        visual_tokens: float [V, H], the LLM-ready visual tokens of the clip (pruned CLIP tokens, frame-major,
            then InternVideo2 tokens), e.g. from ``VideoGLaMM.clip_tokens`` / ``internvideo2_tokens``.
        expressions: the N referring expressions.
        video_size: (H, W) of the original frames (masks come back at this size).
        frame_chunks: SAM2-preprocessed frames, float32 [t, 3, S, S] per chunk, in order; the first frame of
            the first chunk is the anchor frame. Pulled one chunk at a time.
        answer_mode: ``forced``, ``generate`` or ``sample`` (seeded by ``seed``).
        report_answers: first yield ``(-1, report)``, ``report`` a dict with ``answers`` (the answer text per
            expression, for ``masks.json``), ``fastv_kept`` (int64 [F, keep] CLIP units FastV kept for the
            first expression, or None) and ``llm_layer_lengths`` (FastV: per expression, the sequence length
            each LLM layer processed; else None).
        fastv: :class:`pruning.methods.fastv.FastVSettings` to prune inside the LLM (FastV; then
            ``visual_tokens`` holds every CLIP token), or None.
        sam2_chunk: frames per SAM2 image-encoder batch within each chunk received
            (:meth:`workers.sam2_decoder.Sam2Stream.step_chunk`; 1: frame by frame); the masks do not change.

    Yields:
        ``(frame_index, masks)`` with masks bool [N, H, W] (an expression whose answer has no [SEG] gets
        empty masks), one per frame, in order.
    """
    answers = model.seg_answers(visual_tokens.to(model.device, model.dtype), list(expressions), answer_mode,
                                fastv=fastv, seed=seed)
    if report_answers:
        kept = answers[0].fastv_kept
        yield -1, {"answers": [a.text for a in answers], "fastv_kept": None if kept is None else kept.cpu(),
                   "llm_layer_lengths": [a.layer_lengths for a in answers] if fastv is not None else None}
    prompted = [i for i, a in enumerate(answers) if a.embedding is not None]
    height, width = video_size
    stream = None
    if prompted:
        stream = Sam2VideoDecoder(model.sam2, chunk_size=sam2_chunk).open_stream(
            torch.stack([answers[i].embedding for i in prompted]), (height, width))
    index = 0
    try:
        for chunk in frame_chunks:
            if not isinstance(chunk, torch.Tensor):  # a sequence of [3, S, S] frames
                chunk = torch.stack(list(chunk))
            steps = stream.step_chunk(chunk) if stream is not None else None
            for _ in range(chunk.shape[0]):
                masks = np.zeros((len(answers), height, width), dtype=bool)
                if steps is not None:
                    logits = next(steps)
                    for k, i in enumerate(prompted):
                        masks[i] = (logits[k] > 0).cpu().numpy()
                yield index, masks
                index += 1
    finally:
        if stream is not None:
            stream.close()
