"""Live tracking engine (refstream/live/engine.py) on a real file source played in real time, tiny model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import refstream
from refstream.errors import ConfigError, ExpressionError, InputError
from refstream.live.engine import LatestFrameSlot, LiveEngine, LiveFrame
from refstream.options import LiveOptions
from helpers import wait_for


def frame(i: int) -> LiveFrame:
    return LiveFrame(i, time.time(), np.zeros((2, 2, 3), np.uint8))


def test_latest_frame_slot_keeps_only_the_newest_and_counts_drops():
    slot = LatestFrameSlot()
    assert slot.take(timeout=0.01) is None
    slot.put(frame(0))
    slot.put(frame(1))  # 0 was never taken: a drop
    slot.put(frame(2))
    assert slot.take(timeout=0.01).frame_id == 2 and slot.drops == 2 and slot.frames == 3
    assert slot.take(timeout=0.01) is None  # nothing newer
    got = []
    waiter = threading.Thread(target=lambda: got.append(slot.take(timeout=5)))
    waiter.start()
    slot.put(frame(3))
    waiter.join(5)
    assert got[0].frame_id == 3
    slot.close()
    assert slot.take(timeout=5) is None


def test_live_options_share_the_run_options_checks():
    assert LiveOptions().expressions == [] and LiveOptions(expressions=[" the dog "]).expressions == ["the dog"]
    assert LiveOptions().decoder == "pyav"  # flat memory for a looped file (tests/test_live_memory.py)
    with pytest.raises(ExpressionError, match="empty"):
        LiveOptions(expressions=["  "])
    with pytest.raises(ConfigError, match="--budget 0"):
        LiveOptions(budget=0)
    with pytest.raises(ConfigError, match="--fps 0"):
        LiveOptions(fps=0)


@pytest.fixture(scope="module")
def tiny():
    return refstream.load("tiny", device="cpu").pipeline


def test_engine_grounds_tracks_reprompts_and_clears(tiny, bedroom_mp4):
    results, states = [], []
    engine = LiveEngine(tiny, bedroom_mp4, LiveOptions(expressions=["the bed"], fps=30, loop=True),
                        on_result=results.append, on_status=lambda s, p: states.append((s, p)))
    with engine:
        wait_for(lambda: sum(r.prompt_id == 1 for r in results) >= 5, 120, "5 frames tracked for prompt 1")
        with pytest.raises(ExpressionError):
            engine.prompt(["the girl", ""])  # a bad prompt changes nothing
        assert engine.prompt_id == 1
        assert engine.prompt(["the girl", "the bed"]) == 2
        wait_for(lambda: sum(r.prompt_id == 2 for r in results) >= 5, 120, "5 frames tracked for prompt 2")
        assert engine.clear() == 3
        wait_for(lambda: sum(r.prompt_id == 3 for r in results) >= 3, 120, "3 frames after clear")
    tracked = [r for r in results if r.prompt_id == 2]
    assert tracked[0].masks.shape == (2, 540, 960) and tracked[0].masks.dtype == bool
    assert tracked[0].expressions == ["the girl", "the bed"] and tracked[0].t_done >= tracked[0].t_capture
    assert all(r.masks.shape[0] == 0 for r in results if r.prompt_id == 3)
    ids = [r.prompt_id for r in results]
    assert ids == sorted(ids)  # an older prompt's masks never follow a newer one's
    frame_ids = [r.frame_id for r in results]
    assert frame_ids == sorted(frame_ids) and len(set(frame_ids)) == len(frame_ids)
    assert ("grounding", 1) in states and ("tracking", 1) in states and ("tracking", 2) in states
    assert ("idle", 3) in states and states[-1][0] == "ended"
    assert engine.stats.groundings == 2 and engine.tokens_view.shape == (336, 336, 3)
    assert not any(t.is_alive() for t in (engine.source, *engine._threads))


def test_a_slow_consumer_drops_frames_and_only_the_newest_prompt_is_tracked(tiny, blackswan_dir):
    results = []

    def slow(result):
        results.append(result)
        time.sleep(0.25)  # a consumer slower than the 25 fps source

    engine = LiveEngine(tiny, blackswan_dir, LiveOptions(fps=25, loop=True), on_result=slow)
    with engine:
        assert engine.prompt("the black swan") == 1
        assert engine.prompt("the water") == 2  # replaces prompt 1 while it is (or waits to be) grounded
        wait_for(lambda: sum(r.prompt_id == 2 for r in results) >= 3, 120, "prompt 2 tracked")
    assert engine.slot.drops > 0 and engine.slot.drops + engine.stats.processed <= engine.slot.frames
    assert 1 not in {r.prompt_id for r in results}
    assert [r.expressions for r in results if r.prompt_id == 2][0] == ["the water"]


def test_a_clear_during_grounding_wins(tiny, blackswan_dir):
    results, states = [], []
    engine = LiveEngine(tiny, blackswan_dir, LiveOptions(fps=25, loop=True), on_result=results.append,
                        on_status=lambda s, p: states.append((s, p)))
    with engine:
        wait_for(lambda: len(results) >= 2, 60, "frames before any prompt")
        assert engine.prompt("the black swan") == 1
        assert engine.clear() == 2  # while prompt 1 waits for (or is in) its grounding
        wait_for(lambda: sum(r.prompt_id == 2 for r in results) >= 3, 120, "frames after the clear")
    assert 1 not in {r.prompt_id for r in results}  # the cleared prompt is never tracked
    assert all(r.masks.shape[0] == 0 for r in results if r.prompt_id == 2) and ("idle", 2) in states
    assert ("tracking", 1) not in states


def test_a_source_that_cannot_be_opened_is_refused_at_start(tiny, tmp_path):
    with pytest.raises(InputError, match="missing.mp4"):
        LiveEngine(tiny, tmp_path / "missing.mp4", LiveOptions())


def test_size_resizes_the_source_frames(tiny, bedroom_mp4):
    results = []
    engine = LiveEngine(tiny, bedroom_mp4, LiveOptions(expressions=["the bed"], fps=30, loop=True, size="426x240"),
                        on_result=results.append)
    assert (engine.source.width, engine.source.height) == (426, 240)
    with engine:
        wait_for(lambda: any(r.prompt_id == 1 for r in results), 120, "a tracked frame")
    tracked = next(r for r in results if r.prompt_id == 1)
    assert tracked.frame.shape == (240, 426, 3) and tracked.masks.shape == (1, 240, 426)
    with pytest.raises(ConfigError, match="--size '426'"):
        LiveOptions(size="426")
