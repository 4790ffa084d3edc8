"""VideoGLaMM's Ref-DAVIS clip protocol (``RunOptions.clip_length`` / ``SweepOptions.clip_length``).

Source: github mbzuai-oryx/VideoGLaMM @ 6b15b1e7f75009d0e1a858ac08e28021c4faaf11,
``VideoGLaMM/eval_referdavis_infer.py``: ``for clip_id in range(0, video_len, 64)``, each clip through
``preprocess_vision`` (encoder frames by the usual rule over the clip) and ``model.inference`` (its own LLM
answer and SAM2 state); the clips' masks are concatenated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refstream.config import load_model_config
from refstream.errors import ConfigError
from refstream.outputs import decode_rle
from refstream.options import RunOptions, SweepOptions
from refstream.pipeline import Pipeline, clip_plans
from video_pipeline.plan import plan_frames


@pytest.fixture(scope="module")
def tiny() -> Pipeline:
    return Pipeline(load_model_config("tiny"), "cpu")


def test_clip_plans_follow_the_encoder_rule():
    plan = plan_frames(50)
    clips = clip_plans(plan, 16)
    assert [len(c.sam2_indices) for c in clips] == [16, 16, 16, 2]
    assert sum((c.sam2_indices for c in clips), []) == list(range(50))
    for c in clips[:3]:  # 16 frames: every frame once
        assert c.encoder_indices == c.sam2_indices and c.encoder_positions == list(range(16))
    assert clips[3].encoder_indices == [48, 49] + [49] * 14  # short clip: the last frame repeats
    assert clips[3].encoder_positions == [0, 1] + [1] * 14
    long = clip_plans(plan_frames(150), 64)
    assert [len(c.sam2_indices) for c in long] == [64, 64, 22]
    assert long[0].encoder_indices == [int(x) for x in np.floor(np.linspace(0, 63, 16))]
    assert long[1].encoder_indices == [64 + int(x) for x in np.floor(np.linspace(0, 63, 16))]
    assert long[2].encoder_indices == [128 + int(x) for x in np.floor(np.linspace(0, 21, 16))]
    assert clip_plans(plan, None) == [plan] and clip_plans(plan, 50) == [plan] == clip_plans(plan, 64)
    with pytest.raises(ConfigError, match="--clip-length 0: must be an integer >= 1"):
        SweepOptions(clip_length=0)
    with pytest.raises(ConfigError, match="--clip-length -1"):
        RunOptions(expressions=["x"], clip_length=-1)


def test_clip_length_covering_the_video_equals_the_default(tiny, blackswan_dir):
    kw = dict(expressions=["the black swan"], model="tiny", max_frames=6)
    default = tiny.run(blackswan_dir, RunOptions(**kw), progress=False)
    covering = tiny.run(blackswan_dir, RunOptions(**kw, clip_length=6), progress=False)
    assert covering.masks == default.masks and covering.answers == default.answers
    assert covering.frames == default.frames and len(covering.clips) == len(default.clips) == 1
    assert covering.clips[0]["encoder_indices"] == default.clips[0]["encoder_indices"]
    assert "clip_length" not in default.pruning and covering.pruning["clip_length"] == 6


def test_sixteen_frame_clips_on_blackswan(tiny, blackswan_dir, monkeypatch):
    """50 frames, clip_length 16: 4 clips (16, 16, 16, 2), each with its own encoder frames (rule over the
    clip), one LLM prefill and a fresh SAM2 stream whose anchor is the clip's first frame."""
    from video_pipeline.preprocess import sam2_preprocess
    from workers.sam2_decoder import Sam2VideoDecoder

    encoder_plans, streams = [], []
    encode = Pipeline.encode_video

    def spy_encode(self, source, plan, **kw):
        encoder_plans.append(list(plan.encoder_indices))
        return encode(self, source, plan, **kw)

    open_stream = Sam2VideoDecoder.open_stream

    def spy_open(self, seg, size):
        stream = open_stream(self, seg, size)
        steps = {"n": 0, "first": None}
        streams.append(steps)
        step_chunk = stream.step_chunk  # the pipeline feeds SAM2 chunk by chunk (frames [t, 3, S, S])

        def counted(frames):
            if steps["n"] == 0:
                steps["first"] = frames[0].clone()
            steps["n"] += frames.shape[0]
            return step_chunk(frames)

        stream.step_chunk = counted
        return stream

    monkeypatch.setattr(Pipeline, "encode_video", spy_encode)
    monkeypatch.setattr(Sam2VideoDecoder, "open_stream", spy_open)
    llm_calls = []
    hook = tiny.model.llm.model.register_forward_hook(lambda *a: llm_calls.append(1))
    try:
        result = tiny.run(blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", clip_length=16), progress=False)
    finally:
        hook.remove()

    assert [c["frames"] for c in result.clips] == [16, 16, 16, 2]
    assert [c["start"] for c in result.clips] == [0, 16, 32, 48]
    assert encoder_plans == [list(range(0, 16)), list(range(16, 32)), list(range(32, 48)), [48, 49] + [49] * 14]
    assert [c["encoder_indices"] for c in result.clips] == encoder_plans
    assert len(llm_calls) == 4  # one forced prefill per clip
    assert [s["n"] for s in streams] == [16, 16, 16, 2]  # a fresh SAM2 stream per clip
    with tiny.open_source(blackswan_dir) as source:
        anchors = source.read([0, 16, 32, 48])
    expected = sam2_preprocess(anchors, style=tiny.sam2_style, size=streams[0]["first"].shape[-1])
    for k, s in enumerate(streams):
        torch.testing.assert_close(s["first"], expected[k], rtol=0, atol=0)
    assert result.frames == [f"{i:05d}" for i in range(50)]
    (masks,) = result.masks
    assert len(masks) == 50 and all(decode_rle(m).shape == (480, 854) for m in masks)


def test_clips_restart_sam2_state(tiny, blackswan_dir):
    """A clip's masks equal a separate job over that clip's frames alone (fresh state, own answer)."""
    clipped = tiny.run(blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", max_frames=6, clip_length=3),
                       progress=False)
    assert [c["frames"] for c in clipped.clips] == [3, 3]
    first = tiny.run(blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", max_frames=3), progress=False)
    assert clipped.masks[0][:3] == first.masks[0]
    assert clipped.clips[1]["encoder_indices"] == [3, 4] + [5] * 14


def test_sweep_with_clips(tiny, blackswan_dir):
    """run_sweep cuts the same clips: positions run over the whole video, on_run_start / on_run_done once
    per run, and a run equals `refstream run` with the same clip_length."""
    logits: dict = {}
    starts, dones = [], []
    result = tiny.run_sweep(
        blackswan_dir, ["the black swan"], [("none", 196), ("litelvlm", 81)],
        lambda r, pos, name, lg: logits.setdefault(r, []).append((pos, name, lg)),
        options=SweepOptions(max_frames=6, clip_length=4),
        on_run_start=lambda r, info: starts.append(r), on_run_done=lambda r, s: dones.append(r))
    assert result.frames == [f"{i:05d}" for i in range(6)]
    assert sorted(starts) == [0, 1] and sorted(dones) == [0, 1]
    for r in (0, 1):
        assert [p for p, _, _ in logits[r]] == list(range(6))
    job = tiny.run(blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", method="none", max_frames=6,
                                             clip_length=4), progress=False)
    from refstream.outputs import encode_rle

    assert [encode_rle((lg[0] > 0).numpy()) for _, _, lg in logits[0]] == job.masks[0]
