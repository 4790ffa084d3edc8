"""``refstream live``'s web app over a real uvicorn server and a real websocket client (tiny model, real video)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.request import urlopen

import cv2
import numpy as np
import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import refstream
from refstream.live.server import CLOSE_BUSY, CLOSE_POLICY, LiveApp, LiveSettings
from refstream.options import LiveOptions
from refstream.outputs import decode_rle
from helpers import free_port

REFSTREAM = str(Path(sys.executable).with_name("refstream"))


class Server:
    """A LiveApp on a real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, pipeline, source, **settings):
        self.app = LiveApp(LiveSettings(pipeline, source, LiveOptions(fps=25, loop=True), **settings))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app.api, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def ws(self, query: str = "", origin: str | None = "self"):
        origin = f"http://127.0.0.1:{self.port}" if origin == "self" else origin
        return connect(f"ws://127.0.0.1:{self.port}/ws{query}", origin=origin, open_timeout=30)


@pytest.fixture(scope="module")
def tiny():
    return refstream.load("tiny", device="cpu").pipeline


def messages(ws, until, timeout: float = 120.0) -> list:
    """Receive until ``until(message)`` is true (text messages parsed); returns everything received."""
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        message = json.loads(raw) if isinstance(raw, str) else raw
        got.append(message)
        if until(message):
            return got
    raise AssertionError(f"timed out; last messages: {[m if isinstance(m, dict) else len(m) for m in got[-5:]]}")


def test_protocol_prompt_frames_ping_errors_and_clear(tiny, blackswan_dir):
    with Server(tiny, blackswan_dir) as server, server.ws() as ws:
        ws.send(json.dumps({"type": "ping", "t": 1234}))
        pong = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "pong")[-1]
        assert pong["t"] == 1234 and abs(pong["server_t"] - time.time()) < 60
        ws.send(json.dumps({"type": "prompt", "expressions": ["the black swan", "the water"]}))
        got = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "frame" and m["prompt_id"] == 1)
        statuses = [(m["state"], m["prompt_id"]) for m in got if isinstance(m, dict) and m["type"] == "status"]
        assert ("grounding", 1) in statuses and ("tracking", 1) in statuses
        tracking = next(m for m in got if isinstance(m, dict) and m.get("state") == "tracking")
        png = base64.b64decode(tracking["tokens"].removeprefix("data:image/png;base64,"))
        picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)  # the kept tokens, drawn
        assert picture.shape == (336, 336, 3) and len(np.unique(picture.reshape(-1, 3), axis=0)) > 100
        frame = got[-1]
        assert (frame["width"], frame["height"]) == (854, 480) and frame["t_done"] >= frame["t_capture"]
        assert [o["expression"] for o in frame["objects"]] == ["the black swan", "the water"]
        assert decode_rle(frame["objects"][0]["mask"]).shape == (480, 854)
        jpeg = ws.recv(timeout=30)  # the frame itself follows its JSON
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (480, 854, 3)

        ws.send(json.dumps({"type": "prompt", "expressions": ["  "]}))  # bad: an error, nothing changes
        error = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "error")[-1]
        assert "empty" in error["message"]
        later = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "frame")[-1]
        assert later["prompt_id"] == 1
        ws.send(json.dumps({"type": "dance"}))
        assert "unknown message type" in messages(ws, lambda m: isinstance(m, dict) and m["type"] == "error")[-1]["message"]
        ws.send(json.dumps({"type": "clear"}))
        cleared = messages(ws, lambda m: isinstance(m, dict) and m["type"] == "frame" and m["prompt_id"] == 2)[-1]
        assert cleared["objects"] == []
        assert server.app.metrics.frames._value.get() > 0


def refused(ws) -> tuple[str, int]:
    message = json.loads(ws.recv(timeout=30))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    return message["message"], closed.value.rcvd.code


def test_origin_token_and_session_limits(tiny, blackswan_dir):
    with Server(tiny, blackswan_dir, token="s3cret", max_sessions=1) as server:
        with server.ws("?token=s3cret", origin="http://evil.example") as ws:
            text, code = refused(ws)
            assert code == CLOSE_POLICY and "origin http://evil.example refused" in text
        with server.ws() as ws:
            text, code = refused(ws)
            assert code == CLOSE_POLICY and "?token=" in text
        with server.ws("?token=s3cret") as first:
            messages(first, lambda m: isinstance(m, dict) and m["type"] == "frame")
            with server.ws("?token=s3cret") as second:
                text, code = refused(second)
                assert code == CLOSE_BUSY and "--max-sessions" in text
            assert len(server.app.sessions) == 1
        deadline = time.monotonic() + 30
        while server.app.sessions:  # the closed page's session (engine threads included) is freed
            assert time.monotonic() < deadline, "session not freed"
            time.sleep(0.05)
        with server.ws("?token=s3cret") as again:
            messages(again, lambda m: isinstance(m, dict) and m["type"] == "frame")


def test_cli_serves_until_sigterm_and_refuses_bad_sources(tmp_path, bedroom_mp4):
    bad = subprocess.run([REFSTREAM, "live", str(tmp_path / "missing.mp4"), "--model", "tiny"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "missing.mp4" in bad.stderr
    outside = subprocess.run([REFSTREAM, "live", str(bedroom_mp4), "--model", "tiny", "--allowed-root", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert outside.returncode == 2 and "allowed roots" in outside.stderr
    open_host = subprocess.run([REFSTREAM, "live", str(bedroom_mp4), "--model", "tiny", "--host", "0.0.0.0"],
                               capture_output=True, text=True, timeout=120)
    assert open_host.returncode == 2 and "--token" in open_host.stderr
    for source in (str(bedroom_mp4), "browser"):
        proc = subprocess.Popen([REFSTREAM, "live", source, "--model", "tiny", "--device", "cpu", "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = proc.stdout.readline()
            assert "refstream live: open http://127.0.0.1:" in line, line
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0


def test_a_stream_source_is_shared_and_its_drop_shows_as_reconnecting(tiny, bedroom_mp4):
    from test_live_sources import tcp_server, wait_listening

    port = free_port()
    sender = tcp_server(bedroom_mp4, port)
    try:
        wait_listening(port)
        with Server(tiny, f"tcp://127.0.0.1:{port}") as server, server.ws() as first, server.ws() as second:
            health = json.loads(urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30).read())
            assert health["source"] == "stream" and health["source_state"] == "live"
            first.send(json.dumps({"type": "prompt", "expressions": ["the bed"]}))
            frame = messages(first, lambda m: isinstance(m, dict) and m["type"] == "frame" and m["prompt_id"] == 1)[-1]
            assert (frame["width"], frame["height"]) == (320, 180) and len(frame["objects"]) == 1
            other = messages(second, lambda m: isinstance(m, dict) and m["type"] == "frame")[-1]
            assert other["prompt_id"] == 0  # one connection to the stream, two pages, each its own prompt
            assert server.app.shared_source.subscribers == 2
            sender.kill()  # the stream drops: every page is told, tracking resumes when it is back
            sender.wait()
            messages(first, lambda m: isinstance(m, dict) and m.get("state") == "reconnecting")
            messages(second, lambda m: isinstance(m, dict) and m.get("state") == "reconnecting")
            sender = tcp_server(bedroom_mp4, port)
            back = messages(first, lambda m: isinstance(m, dict) and m.get("state") == "tracking", timeout=60)[-1]
            assert back["prompt_id"] == 1
            later = messages(first, lambda m: isinstance(m, dict) and m["type"] == "frame")[-1]
            assert later["frame_id"] > frame["frame_id"] and later["prompt_id"] == 1
        assert not server.app.shared_source.is_alive()  # stopped with the server
    finally:
        sender.kill()
        sender.wait()
