"""The batched SAM2 image encoder (``sam2_chunk``): the same logits as the frame-by-frame path.

A tiny random-weight SAM2 (``configs/tiny.yaml``, ``init="test"``: logits of order 1 that depend on the frames
and on the [SEG] vectors) runs over real video frames, once frame by frame (``chunk_size=1``, the path SAM2
had before batching) and once with the image encoder batched; the float32 logits must agree within 1e-5 on
every frame and object: chunk sizes 1, 3 and 8 over 11 frames (not a multiple of 3 or 8), one and several
objects, frames fed one by one or in decoder chunks, and the pipeline end to end with several expressions
and with clips.

Threads: the comparison runs with one torch thread. With two, MKL's sgemm splits the reduction (K) over the
threads for matrices with few rows (e.g. the 64 tokens of the tiny Hiera's last stage, one frame), so the
frame-by-frame path itself changes with the thread count: on the 2-core test machine its logits moved by
3.1e-4 between 1 and 2 threads (7 of 17 M mask pixels flipped, all at |logit| < 1e-3), while batching moved
them by 0.0 at one thread and 8e-5 at two. :func:`test_two_threads_batching_moves_less_than_the_thread_count`
checks that second statement.
"""

from __future__ import annotations

import pytest
import torch

from video_pipeline.decode import open_video
from video_pipeline.preprocess import sam2_preprocess
from workers.config import load_model_config
from workers.sam2_decoder import Sam2VideoDecoder, build_sam2, sam2_video_config

TINY = load_model_config("tiny").sam2
TOL = 1e-5
NUM_FRAMES = 11  # not a multiple of 3 nor of 8


# one intra-op thread (tests/conftest.py): small kernels, and bit-identical batched vs frame-by-frame results
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return build_sam2(sam2_video_config(TINY), seed=0, init="test")


@pytest.fixture(scope="module")
def video(bedroom_mp4):
    """11 real frames of examples/bedroom.mp4 (every 7th frame: the scene moves), SAM2-preprocessed."""
    with open_video(bedroom_mp4, "pyav") as source:
        frames = source.read(list(range(0, 7 * NUM_FRAMES, 7)))
        size = (source.height, source.width)
    return sam2_preprocess(frames, style="videoglamm", size=TINY.image_size), size


@pytest.fixture(scope="module")
def segs():
    return torch.randn(3, TINY.prompt_encoder_hidden_size, generator=torch.Generator().manual_seed(7))


def _logits(model, pixels, segs, size, chunk_size, feed="chunks"):
    decoder = Sam2VideoDecoder(model, chunk_size=chunk_size)
    frames = pixels.split(4) if feed == "chunks" else list(pixels.unbind(0))
    out = list(decoder.propagate_many(frames, segs, size))
    assert [i for i, _ in out] == list(range(pixels.shape[0]))
    return torch.stack([lg for _, lg in out])


@pytest.fixture(scope="module")
def reference(model, video, segs):
    pixels, size = video
    return _logits(model, pixels, segs, size, chunk_size=1)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_batched_encoder_gives_the_frame_by_frame_logits(model, video, segs, reference, chunk_size):
    pixels, size = video
    got = _logits(model, pixels, segs, size, chunk_size)
    assert got.shape == reference.shape == (NUM_FRAMES, 3, *size)
    assert (reference > 0).any() and (reference <= 0).any()  # informative logits, not a constant
    assert reference.std() > 0.1
    assert (got - reference).abs().max().item() <= TOL


def test_one_object_and_single_frame_feeding(model, video, segs):
    """One object, frames fed one at a time (regrouped into batches of 3 by the decoder)."""
    pixels, size = video
    ref = _logits(model, pixels, segs[:1], size, chunk_size=1, feed="frames")
    got = _logits(model, pixels, segs[:1], size, chunk_size=3, feed="frames")
    assert (got - ref).abs().max().item() <= TOL


def test_the_batch_really_goes_through_the_encoder_once(model, video, segs):
    """chunk_size 8 over 11 frames: two encoder calls of 8 and 3 frames, none per frame (the cache is used)."""
    pixels, size = video
    batches = []
    handle = model.vision_encoder.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        _logits(model, pixels, segs, size, chunk_size=8)
        assert batches == [8, 3]
        batches.clear()
        _logits(model, pixels, segs, size, chunk_size=1)
        assert batches == [1] * NUM_FRAMES
    finally:
        handle.remove()


def test_step_chunk_holds_one_batch_and_keeps_memory_bounded(model, video, segs):
    pixels, size = video
    stream = Sam2VideoDecoder(model, chunk_size=4).open_stream(segs, size)
    try:
        out = list(stream.step_chunk(pixels))
        assert len(out) == NUM_FRAMES and stream.next_frame_idx == NUM_FRAMES
        assert stream.footprint()["feature_frames"] == 1  # the session caches the current frame's features only
    finally:
        stream.close()


def test_bad_chunk_size_and_frames(model, video, segs):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        Sam2VideoDecoder(model, chunk_size=0)
    pixels, size = video
    stream = Sam2VideoDecoder(model, chunk_size=2).open_stream(segs, size)
    with pytest.raises(ValueError, match=r"SAM2 frames must be \[t, 3, 256, 256\]"):
        next(stream.step_chunk(pixels[:, :, :128]))
    stream.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(stream.step_chunk(pixels))


@pytest.mark.slow  # two threads on the shared 2 cores: ~60 s of OpenMP contention
def test_two_threads_batching_moves_less_than_the_thread_count(model, video, segs, reference):
    """At two threads (MKL splits small GEMMs' reductions), batching changes the logits less than going from one
    to two threads does on the frame-by-frame path, and a mask pixel can only differ where |logit| < 1e-3."""
    pixels, size = video
    torch.set_num_threads(2)
    try:
        plain = _logits(model, pixels, segs, size, chunk_size=1)
        batched = _logits(model, pixels, segs, size, chunk_size=8)
    finally:
        torch.set_num_threads(1)
    by_threads = (plain - reference).abs().max().item()
    by_batching = (batched - plain).abs().max().item()
    assert by_batching <= max(by_threads, TOL)
    differ = (batched > 0) != (plain > 0)
    assert (plain[differ].abs() < 1e-3).all()
