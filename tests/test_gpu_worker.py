"""The VideoGLaMM worker: pruned tokens + a stream of frames in, masks per frame out.

:func:`workers.gpu_worker.segment_clip` is the model step (no Ray); :mod:`refstream.service.gpu_worker` wraps
it as a Ray actor with frame references, heartbeats and restarts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refstream.config import load_model_config
from refstream.pipeline import Pipeline, RunOptions
from refstream.outputs import decode_rle


def clip_inputs(pipeline, blackswan_dir, options):
    """What the CLIP + pruning side (an encoder actor) hands the worker: tokens [V, H], SAM2 chunks, video size."""
    from pruning.registry import get_method
    from video_pipeline.plan import plan_frames
    from video_pipeline.preprocess import sam2_preprocess

    method = get_method("litelvlm")
    with pipeline.open_source(blackswan_dir) as source:
        plan = plan_frames(source.num_frames, 16, 1, 6)
        video = pipeline.encode_video(source, plan, with_scores=True, with_penultimate=False)
        text = pipeline.text_embeds(video, pipeline.clip_texts(options.expressions))
        selection = method.select(video.clip, text, 81, "pooled")
        tokens = torch.cat([pipeline.model.clip_tokens(video.clip.hidden, selection, "pooled").flatten(0, 1),
                            pipeline.internvideo2_tokens(video).flatten(0, 1)])
        size = pipeline.model.sam2.config.image_size
        chunks = [sam2_preprocess(frames, style=pipeline.sam2_style, size=size)
                  for _, frames in source.iter_chunks(plan.sam2_indices, chunk_size=4)]
        return tokens, chunks, (source.height, source.width)


def test_segment_clip_without_ray_equals_the_pipeline(blackswan_dir):
    from workers.gpu_worker import segment_clip

    pipeline = Pipeline(load_model_config("tiny"), "cpu")
    options = RunOptions(expressions=["the black swan", "the water"], model="tiny", max_frames=6, budget=81)
    expected = pipeline.run(blackswan_dir, options, progress=False)
    tokens, chunks, video_size = clip_inputs(pipeline, blackswan_dir, options)
    out = list(segment_clip(pipeline.model, tokens, options.expressions, video_size, iter(chunks),
                            report_answers=True, sam2_chunk=pipeline.sam2_chunk_for(options)))
    assert out[0][0] == -1 and len(out[0][1]["answers"]) == 2 and out[0][1]["fastv_kept"] is None
    assert [i for i, _ in out[1:]] == list(range(6))
    for i, masks in out[1:]:
        for k in range(2):
            assert np.array_equal(masks[k], decode_rle(expected.masks[k][i]))


def test_is_cuda_error():
    from workers.gpu_worker import is_cuda_error

    assert is_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_cuda_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_cuda_error(ValueError("bad input"))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    yield ray
    ray.shutdown()


def test_streamed_masks_equal_the_in_process_pipeline(ray_local, blackswan_dir):
    from refstream.service.gpu_worker import gpu_worker_class

    ray = ray_local
    pipeline = Pipeline(load_model_config("tiny"), "cpu")
    options = RunOptions(expressions=["the black swan", "the water"], model="tiny", max_frames=6, budget=81)
    expected = pipeline.run(blackswan_dir, options, progress=False)

    # The CLIP + pruning side (what a CLIP actor does), here in the driver; the chunks go as object references.
    tokens, tensors, video_size = clip_inputs(pipeline, blackswan_dir, options)
    chunks = [ray.put(chunk) for chunk in tensors]

    worker = gpu_worker_class(num_gpus=0).remote("tiny", device="cpu")
    assert ray.get(worker.health.remote())["device"] == "cpu"
    generator = worker.segment_stream.options(num_returns="streaming").remote(
        tokens, options.expressions, video_size, chunks)
    received = [ray.get(ref) for ref in generator]
    assert [i for i, _ in received] == list(range(6))
    for i, masks in received:
        assert masks.shape == (2, 480, 854) and masks.dtype == bool
        for k in range(2):
            assert np.array_equal(masks[k], decode_rle(expected.masks[k][i]))
    assert ray.get(worker.health.remote())["frames_done"] == 6


def test_mask_stream_is_throttled_by_backpressure_and_the_worker_beats_in_redis(ray_local, redis_server):
    """With ``_generator_backpressure_num_objects`` the worker stops ``ahead`` frames past the consumer (the
    heartbeat thread, which runs while the actor is busy, shows it), and ``ray.cancel`` frees a stalled stream."""
    import time

    from refstream.service.queue import connect
    from refstream.service.worker import heartbeats
    from refstream.service.gpu_worker import gpu_worker_class

    ray = ray_local
    worker = gpu_worker_class(num_gpus=0).remote(
        "tiny", device="cpu", heartbeat={"redis_url": redis_server.url, "prefix": "t", "name": "worker-7"})
    health = ray.get(worker.health.remote())
    r = connect(redis_server.url)
    beat = heartbeats(r, "t")["worker-7"]
    assert beat["pid"] == health["pid"] and beat["role"] == "videoglamm" and beat["state"] == "idle"

    size = 256  # the tiny preset's SAM2 image size
    frames = torch.zeros(40, 3, size, size)
    chunks = [frames[i:i + 4] for i in range(0, 40, 4)]
    visual = torch.randn(16 * 49 + 16 * 64, 64)  # pooled litelvlm 81 + InternVideo2 tokens of the tiny model
    ahead = 3

    def frames_done() -> int:
        return heartbeats(r, "t")["worker-7"]["frames_done"]

    stream = worker.segment_stream.options(num_returns="streaming", _generator_backpressure_num_objects=ahead).remote(
        visual, ["the black swan"], (32, 48), chunks, label="job-1")
    first = ray.get(next(stream))
    assert first[0] == 0 and first[1].shape == (1, 32, 48)
    time.sleep(3.0)  # far longer than the tiny SAM2 needs for 40 frames
    stalled = frames_done()
    assert stalled <= 1 + ahead + 1, stalled  # stopped by backpressure, not run to the end
    record = heartbeats(r, "t")["worker-7"]
    assert record["state"] == "running" and record["input"] == "job-1" and record["handled"] == 1
    ray.cancel(stream)
    assert ray.get(worker.health.remote(), timeout=60)["frames_done"] == stalled  # free again, nothing more ran
    again = worker.segment_stream.options(num_returns="streaming", _generator_backpressure_num_objects=ahead).remote(
        visual, ["the black swan"], (32, 48), chunks[:2])
    assert [ray.get(ref)[0] for ref in again] == list(range(8))
    assert heartbeats(r, "t")["worker-7"]["state"] in ("idle", "running")  # the thread beats once a second
