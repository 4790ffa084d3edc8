"""The VideoGLaMM worker actor: pruned tokens + a stream of frame references in, masks per frame out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refstream.config import load_model_config
from refstream.pipeline import Pipeline, RunOptions
from refstream.outputs import decode_rle


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    yield ray
    ray.shutdown()


def test_streamed_masks_equal_the_in_process_pipeline(ray_local, blackswan_dir):
    from pruning.registry import get_method
    from video_pipeline.plan import plan_frames
    from video_pipeline.preprocess import sam2_preprocess
    from workers.gpu_worker import gpu_worker_class

    ray = ray_local
    pipeline = Pipeline(load_model_config("tiny"), "cpu")
    options = RunOptions(expressions=["the black swan", "the water"], model="tiny", max_frames=6, budget=81)
    expected = pipeline.run(blackswan_dir, options, progress=False)

    # The CLIP + pruning side (what a CLIP actor does), here in the driver.
    method = get_method("litelvlm")
    with pipeline.open_source(blackswan_dir) as source:
        plan = plan_frames(source.num_frames, 16, 1, 6)
        video = pipeline.encode_video(source, plan, with_scores=True, with_penultimate=False)
        text = pipeline.text_embeds(video, pipeline.clip_texts(options.expressions))
        selection = method.select(video.clip, text, 81, "pooled")
        tokens = torch.cat([pipeline.model.clip_tokens(video.clip.hidden, selection, "pooled").flatten(0, 1),
                            pipeline.internvideo2_tokens(video).flatten(0, 1)])
        size = pipeline.model.sam2.config.image_size
        chunks = [ray.put(sam2_preprocess(frames, style=pipeline.sam2_style, size=size))
                  for _, frames in source.iter_chunks(plan.sam2_indices, chunk_size=4)]
        video_size = (source.height, source.width)

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
