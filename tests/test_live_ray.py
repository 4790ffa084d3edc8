"""``refstream live --ray``: the model in the VideoGLaMM GPU worker actor, the app on Ray Serve (real local Ray,
real Serve, a real websocket client; tiny model on the CPU).

The CLI test runs first and starts a Ray of its own (in its subprocess); the others share one module-scoped
local Ray (4 logical CPUs) and one worker actor, and shut Serve and Ray down at the end of the module.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_live_server import REFSTREAM, free_port, messages, refused
from websockets.sync.client import connect

import refstream
from refstream.cli import main
from refstream.errors import ConfigError
from refstream.live.engine import LiveEngine
from refstream.live.model import LiveModelError, LocalLiveModel, RayLiveModel, pack_masks, unpack_masks
from refstream.live.server import CLOSE_BUSY, CLOSE_POLICY
from refstream.options import LiveOptions, ModelOptions
from refstream.outputs import decode_rle
from helpers import wait_for

ray = pytest.importorskip("ray")


def test_cli_ray_serves_until_sigterm(bedroom_mp4, tmp_path):
    """``refstream live SOURCE --ray --port 0``: a local Ray of its own, the address printed, /healthz answered
    by the app on Serve with the model in the worker actor, exit 0 on SIGTERM."""
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([REFSTREAM, "live", str(bedroom_mp4), "--model", "tiny", "--device", "cpu", "--ray",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"refstream live: open http://127\.0\.0\.1:(\d+)/ \(Ray Serve", line)
        assert match, f"{line!r}; stderr: {(tmp_path / 'stderr.txt').read_text()[-3000:]}"
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/healthz", timeout=30).read())
        assert health["ok"] and health["model"] == "tiny" and health["runs_in"] == "ray actor"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]


def test_address_needs_ray(bedroom_mp4, capsys):
    assert main(["live", str(bedroom_mp4), "--model", "tiny", "--address", "auto"]) == 2
    assert "give --ray too" in capsys.readouterr().err


def test_masks_pack_and_unpack():
    masks = np.random.default_rng(0).random((2, 5, 7)) > 0.5
    packed, shape = pack_masks(masks)
    assert packed.dtype == np.uint8 and packed.size == 9 and shape == (2, 5, 7)
    assert np.array_equal(unpack_masks(packed, shape), masks)


# ------------------------------------------------------------------------------------ one Ray for the rest
@pytest.fixture(scope="module")
def ray_local():
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    yield ray
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def worker(ray_local):
    from refstream.live.ray_serve import start_worker

    return start_worker(ModelOptions(model="tiny", device="cpu"), max_tracks=2)


@pytest.fixture(scope="module")
def tiny():
    return refstream.load("tiny", device="cpu").pipeline


@pytest.fixture(scope="module")
def swan_frames(blackswan_dir) -> np.ndarray:
    """The first 20 blackswan frames, uint8 [20, 480, 854, 3] RGB."""
    paths = sorted(Path(blackswan_dir).glob("*.jpg"))[:20]
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])


def test_ray_model_equals_the_local_model_and_sessions_stay_apart(worker, tiny, swan_frames):
    local, remote = LocalLiveModel(tiny), RayLiveModel(worker)
    assert remote.num_frames == 16 and remote.describe() == {"name": "tiny", "random_weights": True,
                                                            "device": "cpu", "runs_in": "ray actor"}
    both = ["the black swan", "the water"]
    expected, grounding = (m.ground(swan_frames[:16], both, LiveOptions()) for m in (local, remote))
    assert grounding.expressions == both and grounding.view.shape == (336, 336, 3)
    for e, g in zip(expected.embeddings, grounding.embeddings):
        assert (e is None) == (g is None) and (e is None or torch.allclose(e, g, atol=1e-4))  # threads: rounding
    water = remote.ground(swan_frames[:16], ["the water"], LiveOptions())
    local.open_track("a", grounding, swan_frames[15])  # the same [SEG] embeddings on both
    remote.open_track("a", grounding, swan_frames[15])
    remote.open_track("b", water, swan_frames[15])  # a second session at once, on the same worker
    for image in swan_frames[16:19]:
        want, got, other = local.step("a", image), remote.step("a", image), remote.step("b", image)
        assert got.shape == (2, 480, 854) and got.dtype == bool and other.shape == (1, 480, 854)
        assert (got != want).mean() < 1e-3, (got != want).mean()  # the same model; float rounding aside
    info = ray.get(worker.live_info.remote())
    assert info["tracks"] == 2 and info["max_tracks"] == 2
    with pytest.raises(LiveModelError, match="--max-sessions"):  # the worker's limit: no third stream
        remote.open_track("c", water, swan_frames[15])

    # a failing session closes its own track; the other one goes on
    with pytest.raises(LiveModelError, match="frame size changed"):
        remote.step("a", swan_frames[19][:240])
    with pytest.raises(LiveModelError, match="no live track 'a'"):
        remote.step("a", swan_frames[19])
    assert remote.step("b", swan_frames[19]).shape == (1, 480, 854)
    remote.close_track("b")
    remote.close_track("b")  # closing twice is fine
    assert ray.get(worker.live_info.remote())["tracks"] == 0
    local.close_track("a")


def test_engine_tracks_on_the_worker_and_frees_its_track(worker, bedroom_mp4):
    results, states = [], []
    engine = LiveEngine(None, bedroom_mp4, LiveOptions(expressions=["the bed"], fps=30, loop=True),
                        on_result=results.append, on_status=lambda s, p: states.append((s, p)),
                        model=RayLiveModel(worker))
    with engine:
        wait_for(lambda: sum(r.prompt_id == 1 for r in results) >= 5, 120, "5 frames tracked for prompt 1")
        assert ray.get(worker.live_info.remote())["tracks"] == 1
        assert engine.clear() == 2
        wait_for(lambda: sum(r.prompt_id == 2 for r in results) >= 2, 120, "2 frames after clear")
        assert ray.get(worker.live_info.remote())["tracks"] == 0  # clear closed the stream
        assert engine.prompt("the girl") == 3
        wait_for(lambda: sum(r.prompt_id == 3 for r in results) >= 2, 120, "2 frames tracked for prompt 3")
    tracked = next(r for r in results if r.prompt_id == 1)
    assert tracked.masks.shape == (1, 540, 960) and tracked.masks.dtype == bool
    assert all(r.masks.shape == (0, 540, 960) for r in results if r.prompt_id == 2)
    assert ("tracking", 1) in states and ("idle", 2) in states and states[-1][0] == "ended"
    assert engine.tokens_view.shape == (336, 336, 3)
    assert ray.get(worker.live_info.remote())["tracks"] == 0  # the stopped engine closed its track


def test_serve_app_websocket_with_the_same_checks(worker, blackswan_dir):
    from ray import serve

    from refstream.live.ray_serve import APP_NAME, LiveDeployment, serve_live

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(LiveDeployment.options(max_ongoing_requests=9).bind(
        worker, str(blackswan_dir), LiveOptions(fps=25, loop=True), "s3cret", 1), name=APP_NAME, route_prefix="/")
    try:
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).read())
        assert health == {"ok": True, "sessions": 0, "model": "tiny", "random_weights": True, "device": "cpu",
                          "runs_in": "ray actor", "source": "file", "source_state": "live"}
        with pytest.raises(ConfigError, match="Ray Serve already runs"):  # never another app on a running Serve
            serve_live(blackswan_dir, LiveOptions(), ModelOptions(model="tiny", device="cpu"))

        def ws(query: str = "?token=s3cret", origin: str | None = None):
            return connect(f"ws://127.0.0.1:{port}/ws{query}", origin=origin or f"http://127.0.0.1:{port}",
                           open_timeout=60)

        with ws(origin="http://evil.example") as page:
            text, code = refused(page)
            assert code == CLOSE_POLICY and "origin http://evil.example refused" in text
        with ws("") as page:
            text, code = refused(page)
            assert code == CLOSE_POLICY and "?token=" in text
        with ws() as page:
            page.send(json.dumps({"type": "prompt", "expressions": ["the black swan"]}))
            got = messages(page, lambda m: isinstance(m, dict) and m["type"] == "frame" and m["prompt_id"] == 1)
            statuses = [(m["state"], m["prompt_id"]) for m in got if isinstance(m, dict) and m["type"] == "status"]
            assert ("grounding", 1) in statuses and ("tracking", 1) in statuses
            frame = got[-1]
            assert (frame["width"], frame["height"]) == (854, 480)
            assert [o["expression"] for o in frame["objects"]] == ["the black swan"]
            assert decode_rle(frame["objects"][0]["mask"]).shape == (480, 854)
            jpeg = page.recv(timeout=30)  # the frame itself follows its JSON, through Serve's proxy
            assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (480, 854, 3)
            with ws() as second:
                text, code = refused(second)
                assert code == CLOSE_BUSY and "--max-sessions" in text
        wait_for(lambda: ray.get(worker.live_info.remote())["tracks"] == 0, 60, "the closed page's track freed")
    finally:
        serve.delete(APP_NAME)


def test_cuda_on_a_cluster_without_gpu_is_refused(ray_local):
    from refstream.live.ray_serve import start_worker

    if ray.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this cluster has a GPU")
    with pytest.raises(ConfigError, match="no GPU"):
        start_worker(ModelOptions(model="tiny", device="cuda"), max_tracks=1)
