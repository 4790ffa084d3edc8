"""Live tracking's memory stays flat: 3,000 frames tracked at 160x90 (slow suite: ``pytest -m slow``).

RefStream issue 11: RSS growth after the first 300 tracked frames < 50 MiB. The engine's state is bounded by
design (a latest-frame slot, a 16-frame ring buffer, a 300-entry stats deque, SAM2's pruned memory bank:
``workers.sam2_decoder.Sam2Stream``, ``prune_memory``); this checks the whole process's RSS
(``/proc/self/statm``), sampled after tracked frame 300 and after frame 3,000 (and every 300 between, printed).

The source is decoded with PyAV: with decord, the reader's own buffers make RSS climb by 250-500 MiB over each
pass of the file and fall back when the looped source reopens it (bounded, freed with the reader, but a swing
ten times the limit); PyAV's stays within a few MiB, so what is measured is the engine's growth.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import refstream
from refstream.live.engine import LiveEngine
from refstream.options import LiveOptions

FRAMES, BASELINE, LIMIT_MIB = 3000, 300, 50


def rss_mib() -> float:
    """This process's resident set size (``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_rss_stays_flat_over_3000_tracked_frames(bedroom_mp4):
    pipeline = refstream.load("tiny", device="cpu").pipeline
    rss: dict[int, float] = {}  # tracked frames -> RSS MiB, every 300
    count, done = [0], threading.Event()

    def on_result(result) -> None:
        if result.prompt_id != 1:
            return
        count[0] += 1
        if count[0] % BASELINE == 0:
            rss[count[0]] = rss_mib()
        if count[0] >= FRAMES:
            done.set()

    # 60 fps: the source always has a newer frame than the tracker (~15-20 fps on 2 cores) can take
    options = LiveOptions(expressions=["the bed"], fps=60, loop=True, size="160x90")  # decoder: pyav, the default
    engine = LiveEngine(pipeline, bedroom_mp4, options, on_result=on_result)
    started = time.monotonic()
    with engine:
        assert done.wait(1800), f"only {count[0]} frames tracked in 30 min"
    elapsed = time.monotonic() - started
    growth = rss[FRAMES] - rss[BASELINE]
    trace = ", ".join(f"{n}: {v:.0f}" for n, v in sorted(rss.items()))
    print(f"\n{FRAMES} frames tracked in {elapsed:.0f} s ({FRAMES / elapsed:.1f} fps); RSS MiB after n frames: {trace}; "
          f"growth after frame {BASELINE}: {growth:+.1f} MiB")
    assert engine.stats.groundings == 1 and len(engine.stats.process_seconds) == 300
    assert growth < LIMIT_MIB, f"RSS grew {growth:.1f} MiB from frame {BASELINE} to {FRAMES} ({trace})"
