"""Decoding and writing overlapped with SAM2 (``overlap``) and the batched encoder (``sam2_chunk``) in the
pipeline: same masks as the old path, frames in order, errors of a background thread raised in the caller with
their own message, no thread left running and no partial output folder.

The masks are compared with one torch thread (bit-identical then; see tests/test_sam2_batched.py for why two
threads may move a few near-zero logits).
"""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import torch

from refstream.cli import main
from refstream.config import load_model_config
from refstream.options import SweepOptions
from refstream.overlap import BackgroundConsumer, BackgroundIterator
from refstream.pipeline import Pipeline, RunOptions, run_to_folder


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("refstream-decode", "refstream-writer",
                                                                        "test-"))]


# one intra-op thread (tests/conftest.py): small kernels, and bit-identical batched vs frame-by-frame results
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> Pipeline:
    return Pipeline(load_model_config("tiny"), "cpu")


# ------------------------------------------------------------------------------------------- the two helpers
def test_background_iterator_keeps_order_and_raises_the_producers_error():
    assert list(BackgroundIterator(iter(range(50)), maxsize=2, name="test-order")) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("frame 3 is damaged")

    it = BackgroundIterator(failing(), maxsize=1, name="test-fail")
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="^frame 3 is damaged$"):
        next(it)
    assert not _our_threads()


def test_background_iterator_close_stops_the_producer_early():
    produced, closed = [], threading.Event()

    def endless():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = BackgroundIterator(endless(), maxsize=2, name="test-early")
    assert next(it) == 0
    it.close()
    assert closed.is_set() and len(produced) <= 4  # bounded: at most maxsize + 2 items were made
    assert not _our_threads()
    with pytest.raises(StopIteration):
        next(it)


def test_background_consumer_in_order_and_errors_surface():
    seen = []
    sink = BackgroundConsumer(seen.append, maxsize=2, name="test-sink")
    for i in range(100):
        sink.put(i)
    sink.finish()
    assert seen == list(range(100)) and not _our_threads()

    def handle(i):
        if i == 3:
            raise OSError(28, "No space left on device")
        time.sleep(0.001)

    sink = BackgroundConsumer(handle, maxsize=1, name="test-sink-fail")
    with pytest.raises(OSError, match="No space left on device"):
        for i in range(1000):
            sink.put(i)
    sink.close()
    assert not _our_threads()
    with pytest.raises(ValueError, match="maxsize"):
        BackgroundConsumer(print, maxsize=0)


# ------------------------------------------------------------------------------------------ the pipeline
def test_same_masks_with_chunks_overlap_several_expressions_and_clips(tiny, blackswan_dir):
    """Old path (chunk 1, no overlap) == batched + overlapped, 2 expressions, clips of 5 over 11 frames."""
    base = dict(expressions=["the black swan", "the water"], model="tiny", max_frames=11, clip_length=5)
    old = tiny.run(blackswan_dir, RunOptions(sam2_chunk=1, overlap=False, **base), progress=False)
    assert len(old.clips) == 3 and len(old.frames) == 11
    for chunk in (3, 8):
        new = tiny.run(blackswan_dir, RunOptions(sam2_chunk=chunk, overlap=True, **base), progress=False)
        assert new.frames == old.frames
        assert new.masks == old.masks  # COCO RLE per expression and frame, in order: identical masks
    assert any(r["counts"] != old.masks[0][0]["counts"] for r in old.masks[0][1:])  # the masks vary over frames


def test_run_to_folder_overlapped_writes_the_same_files(tiny, blackswan_dir, tmp_path):
    base = dict(expressions=["the black swan", "the water"], model="tiny", max_frames=9)
    run_to_folder(blackswan_dir, RunOptions(sam2_chunk=1, overlap=False, **base), tmp_path / "old", False, tiny)
    run_to_folder(blackswan_dir, RunOptions(sam2_chunk=4, **base), tmp_path / "new", False, tiny)
    old = json.loads((tmp_path / "old" / "masks.json").read_text())
    new = json.loads((tmp_path / "new" / "masks.json").read_text())
    assert new == old
    assert (tmp_path / "new" / "overlay.mp4").stat().st_size > 0
    assert not _our_threads()


def test_sweep_logits_with_batched_encoder(tiny, blackswan_dir):
    """``bench run``'s path (Pipeline.run_sweep) takes sam2_chunk/overlap and gives the same logits."""
    def sweep(**speed):
        out: dict = {}
        tiny.run_sweep(blackswan_dir, ["the black swan"], [("none", 576)],
                       lambda r, pos, name, logits: out.setdefault(pos, logits[0]),
                       options=SweepOptions(max_frames=7, **speed))
        return torch.stack([out[i] for i in range(7)])

    old = sweep(sam2_chunk=1, overlap=False)
    new = sweep(sam2_chunk=3, overlap=True)
    assert (new - old).abs().max().item() <= 1e-5


def test_a_writer_error_fails_the_job_with_its_message_and_leaves_nothing(tiny, blackswan_dir, tmp_path,
                                                                          monkeypatch):
    """The overlay encoder fails on the 4th frame (an injected disk-full error) in the writer thread."""
    from refstream import outputs

    real_write, calls = outputs.OverlayWriter.write, []

    def write(self, frame, masks):
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise OSError(28, "No space left on device (injected)")
        real_write(self, frame, masks)

    monkeypatch.setattr(outputs.OverlayWriter, "write", write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"No space left on device \(injected\)"):
        run_to_folder(blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", max_frames=12, overlap=True),
                      out, False, tiny)
    assert set(calls) == {"refstream-writer"}  # it really ran in the writer thread
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no out folder, no staging folder
    assert not _our_threads()


def test_a_decode_thread_error_fails_the_job_with_its_message(tiny, blackswan_dir, tmp_path, monkeypatch):
    """The SAM2 resize fails on the 2nd chunk (an injected error) in the decode thread."""
    import refstream.pipeline as pipeline_module

    real, calls = pipeline_module.sam2_preprocess, []

    def preprocess(frames, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise RuntimeError("cannot resize chunk 2 (injected)")
        return real(frames, **kwargs)

    monkeypatch.setattr(pipeline_module, "sam2_preprocess", preprocess)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"^cannot resize chunk 2 \(injected\)$"):
        run_to_folder(blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", max_frames=12, overlap=True),
                      out, False, tiny)
    assert set(calls) == {"refstream-decode"}
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not _our_threads()


def test_cli_flags(blackswan_dir, tmp_path, capsys):
    assert main(["run", str(blackswan_dir), "-e", "x", "--model", "tiny", "--sam2-chunk", "0",
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--sam2-chunk 0" in err and "1 runs SAM2's image encoder frame by frame" in err
    assert main(["run", str(blackswan_dir), "-e", "x", "--model", "tiny", "--max-frames", "2", "--sam2-chunk", "2",
                 "--no-overlap", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "masks.json").is_file()


def test_overlap_default_is_on_with_cuda_only(tiny):
    """Not given: off on the CPU (a writer thread beside torch's threads slowed the job there), on with CUDA."""
    assert tiny.device.type == "cpu"
    assert tiny.overlap_for(RunOptions(expressions=["x"])) is False
    assert tiny.overlap_for(RunOptions(expressions=["x"], overlap=True)) is True
    assert tiny.overlap_for(RunOptions(expressions=["x"], overlap=False)) is False
    cuda = copy.copy(tiny)
    cuda.device = torch.device("cuda")  # the decision only: nothing runs on it
    assert cuda.overlap_for(RunOptions(expressions=["x"])) is True
    assert cuda.overlap_for(RunOptions(expressions=["x"], overlap=False)) is False


def test_overlap_flag_has_three_states():
    import argparse

    from refstream.options import add_option_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_option_arguments(parser, RunOptions, only=["expressions", "overlap"])
    for argv, want in (([], None), (["--overlap"], True), (["--no-overlap"], False)):
        options = options_from_args(RunOptions, parser.parse_args(["-e", "x", *argv]))
        assert options.overlap is want, argv


def test_sam2_chunk_default_is_4_with_cuda_and_1_on_the_cpu(tiny):
    """Not given: 1 on the CPU (the full-size SAM2 batched ran slower there), 4 with CUDA; given: as given."""
    from refstream.options import SAM2_CHUNK_DEFAULTS, sam2_chunk_for

    assert SAM2_CHUNK_DEFAULTS == {"cpu": 1, "cuda": 4}
    assert tiny.sam2_chunk_for(RunOptions(expressions=["x"])) == 1
    assert tiny.sam2_chunk_for(RunOptions(expressions=["x"], sam2_chunk=3)) == 3
    cuda = copy.copy(tiny)
    cuda.device = torch.device("cuda")
    assert cuda.sam2_chunk_for(RunOptions(expressions=["x"])) == 4
    assert cuda.sam2_chunk_for(RunOptions(expressions=["x"], sam2_chunk=1)) == 1
    assert sam2_chunk_for(None, "mps") == 1
    from refstream.errors import ConfigError

    with pytest.raises(ConfigError, match="1 runs SAM2's image encoder frame by frame; the default is 4 with CUDA, "
                                          "1 on the CPU"):
        RunOptions(expressions=["x"], sam2_chunk=0)


def test_the_default_run_on_the_cpu_encodes_frame_by_frame(tiny, blackswan_dir):
    """What the CPU default means in a run: SAM2's image encoder sees one frame per call."""
    batches = []
    hook = tiny.model.sam2.vision_encoder.register_forward_hook(
        lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        tiny.run(blackswan_dir, RunOptions(expressions=["the black swan"], model="tiny", max_frames=5), progress=False)
    finally:
        hook.remove()
    assert batches and set(batches) == {1}
