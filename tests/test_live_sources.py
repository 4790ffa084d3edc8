"""Live sources (refstream/live/sources.py) on real streams: FFmpeg pushes or serves the bundled video on
loopback (RTSP to a PyAV listener, MPEG-TS over TCP, HLS over HTTP), PyAV reads it; drops and reconnects are
real (the sending ffmpeg is killed and started again)."""

from __future__ import annotations

import collections
import functools
import http.server
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from refstream.errors import ConfigError, InputError
from helpers import free_port, wait_for
from refstream.live.sources import (BrowserSource, FileSource, LatestFrameSlot, StreamSource, is_stream,
                                    low_delay_options, open_source)

REFSTREAM = str(Path(sys.executable).with_name("refstream"))
X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "15", "-an"]


def subscribed(source):
    slot, ring, states = LatestFrameSlot(), collections.deque(maxlen=16), []
    source.subscribe(slot, ring, states.append)
    return slot, ring, states


def tcp_server(video: Path, port: int, seconds: float | None = None) -> subprocess.Popen:
    """ffmpeg as a TCP server (one client) sending the video as MPEG-TS in real time (looped)."""
    duration = ["-t", str(seconds)] if seconds else []
    return subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(video),
                             *duration, "-vf", "scale=320:180", *X264, "-f", "mpegts",
                             f"tcp://127.0.0.1:{port}?listen=1"])


def wait_listening(port: int, timeout: float = 20.0) -> None:
    """Wait until ffmpeg listens on ``port`` (read from /proc: connecting would use up its one client)."""
    def listening():
        return any(f":{port:04X} " in line and line.split()[3] == "0A"
                   for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
    wait_for(listening, timeout, f"ffmpeg listening on {port}")


def test_low_delay_options_and_kinds():
    assert low_delay_options("rtsp://cam/live")["rtsp_transport"] == "tcp"
    assert low_delay_options("udp://0.0.0.0:1234")["overrun_nonfatal"] == "1"
    assert low_delay_options("https://x/live.m3u8")["live_start_index"] == "-1"
    assert "fflags" not in low_delay_options("tcp://h:1")  # nobuffer loses the probed keyframe (see its doc)
    assert is_stream("rtsp://a/b") and is_stream("/dev/video0") and is_stream("https://x/y.m3u8")
    assert not is_stream("examples/bedroom.mp4") and not is_stream("browser")


def test_unopenable_sources_name_the_problem(tmp_path, bedroom_mp4):
    port = free_port()  # nothing listens there
    with pytest.raises(InputError, match=rf"cannot open live source tcp://127.0.0.1:{port}.*Fix:"):
        StreamSource(f"tcp://127.0.0.1:{port}")
    with pytest.raises(InputError, match="no such device /dev/video77.*camera"):
        open_source("/dev/video77")
    with pytest.raises(InputError, match="unknown scheme"):
        open_source("gopher://x/y")
    with pytest.raises(ConfigError, match="--source-option is for streams"):
        open_source(bedroom_mp4, options={"rtsp_transport": "udp"})
    with socket.socket() as busy:  # a listener whose port is taken fails at once
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(InputError, match="cannot listen"):
            StreamSource(f"rtsp://127.0.0.1:{taken}/live", options={"rtsp_flags": "listen"})


def test_cli_exits_2_for_an_unreachable_stream():
    port = free_port()
    for source in (f"rtsp://127.0.0.1:{port}/live", f"tcp://127.0.0.1:{port}", "/dev/video77"):
        bad = subprocess.run([REFSTREAM, "live", source, "--model", "tiny"], capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 2, bad.stderr
        assert f"cannot open live source {source}" in bad.stderr and "Fix:" in bad.stderr


def test_rtsp_push_to_a_listener_and_a_second_push_after_a_drop(bedroom_mp4):
    port = free_port()
    url = f"rtsp://127.0.0.1:{port}/live"
    source = StreamSource(url, options={"rtsp_flags": "listen"}, size=(160, 90))
    slot, ring, states = subscribed(source)
    source.start()

    def push(seconds: float) -> None:  # ffmpeg -re ... -f rtsp, retried until the listener takes it
        for _ in range(100):
            done = subprocess.run(["ffmpeg", "-loglevel", "quiet", "-re", "-i", str(bedroom_mp4), "-t", str(seconds),
                                   *X264, "-f", "rtsp", "-rtsp_transport", "tcp", url], timeout=60)
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("ffmpeg could not push to the listener")

    try:
        push(2)
        wait_for(lambda: "reconnecting" in states, 10, "the drop")
        first = slot.frames
        assert first >= 40  # 2 s at the video's 30 fps, minus what the probe holds back
        assert ring[-1].image.shape == (90, 160, 3) and ring[-1].image.dtype == np.uint8
        push(2)
        wait_for(lambda: states[-1] == "reconnecting" and len(states) >= 3, 10, "the second drop")
        assert states[:3] == ["reconnecting", "live", "reconnecting"] and slot.frames >= first + 40
        assert ring[-1].frame_id == slot.frames - 1  # ids keep counting across reconnects
    finally:
        started = time.monotonic()
        source.stop()
        source.join(10)
    assert not source.is_alive() and time.monotonic() - started < 5 and slot.closed


def test_tcp_stream_reconnects_with_backoff(bedroom_mp4):
    port = free_port()
    server = tcp_server(bedroom_mp4, port)
    try:
        wait_listening(port)
        source = StreamSource(f"tcp://127.0.0.1:{port}", backoff=(0.2, 1.0))
        assert (source.width, source.height) == (320, 180) and source.fps == pytest.approx(30, abs=1)
        slot, ring, states = subscribed(source)
        source.start()
        wait_for(lambda: slot.frames >= 20, 30, "frames")
        server.send_signal(signal.SIGKILL)  # the stream dies mid-run
        server.wait()
        wait_for(lambda: states == ["reconnecting"], 30, "reconnecting")
        dropped_at = slot.frames
        time.sleep(1.5)  # refused meanwhile: the backoff doubles up to 1 s
        assert source.reconnects >= 2 and slot.frames == dropped_at
        server = tcp_server(bedroom_mp4, port)  # it comes back
        wait_for(lambda: states[-1] == "live" and slot.frames >= dropped_at + 20, 30, "frames again")
        assert ring[-1].frame_id >= dropped_at + 19
    finally:
        server.kill()
        server.wait()
        source.stop()
        source.join(15)
    assert not source.is_alive()


def test_hls_over_http_plays_at_its_own_rate(bedroom_mp4, tmp_path):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(bedroom_mp4), "-t", "4", "-vf", "scale=320:180", *X264,
                    "-f", "hls", "-hls_time", "1", "-hls_list_size", "0", str(tmp_path / "index.m3u8")], check=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    source = StreamSource(f"http://127.0.0.1:{httpd.server_address[1]}/index.m3u8")
    slot, ring, states = subscribed(source)
    try:
        started = time.monotonic()
        source.start()
        wait_for(lambda: slot.frames >= 60, 30, "60 frames")
        elapsed = time.monotonic() - started
        assert elapsed > 1.5  # 60 frames of a 30 fps playlist with a duration: paced, not read at once
        assert ring[-1].image.shape == (180, 320, 3)
        wait_for(lambda: "reconnecting" in states, 30, "the end of the playlist")  # then it is read again
    finally:
        source.stop()
        source.join(15)
        httpd.shutdown()


def test_browser_source_takes_jpeg_frames_and_refuses_garbage(bedroom_mp4):
    source = open_source("browser", size=(160, 90))
    assert isinstance(source, BrowserSource)
    slot, ring, _ = subscribed(source)
    source.start()
    image = np.zeros((180, 320, 3), np.uint8)
    image[:, :, 2] = 255  # BGR red
    ok, jpeg = cv2.imencode(".jpg", image)
    frame = source.push(jpeg.tobytes())
    assert frame.frame_id == 0 and frame.image.shape == (90, 160, 3) and frame.image[..., 0].mean() > 240  # RGB
    assert source.push(jpeg.tobytes()).frame_id == 1 and slot.take(timeout=1).frame_id == 1 and slot.drops == 1
    with pytest.raises(InputError, match="not a JPEG image"):
        source.push(b"not a jpeg")
    source.stop()
    source.join(5)
    assert slot.closed and not source.is_alive()


def test_a_file_source_feeds_every_subscriber(blackswan_dir):
    source = FileSource(blackswan_dir, fps=100)
    a, b = subscribed(source)[:2], subscribed(source)[:2]
    source.start()
    source.join(30)
    assert a[0].frames == b[0].frames == source.num_frames and a[1][-1] is b[1][-1]
