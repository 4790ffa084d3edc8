"""Live frame sources: a thread that writes each new frame into a latest-frame slot and a ring buffer.

A source never queues frames. Each subscriber (one per live engine) has a :class:`LatestFrameSlot` (size 1: a
frame nobody took when the next arrives is replaced and counted as a drop) and a ring buffer of the last
frames seen (the encoder frames of a grounding). One source can feed several engines (one camera, several
pages).

* :class:`FileSource`: a video file or frame folder, played in real time at its own rate (or ``fps``),
  optionally looped; one per engine (each page plays from the start).
* :class:`StreamSource`: anything FFmpeg reads live through PyAV: a V4L2 camera (``/dev/video0``), ``rtsp://``,
  ``rtsps://``, ``rtmp://``, ``srt://``, ``http(s)://`` (incl. HLS), ``udp://``, ``tcp://``. Opened with
  low-delay options (RTSP over TCP, ``fflags=nobuffer``, a small probe size) and reconnected with backoff when
  it drops; its state goes to ``reconnecting`` meanwhile. Shared by every engine of an app.
* :class:`BrowserSource`: frames pushed by the page (JPEG bytes over the websocket); one per page.

:func:`open_source` picks the class from the source string. Docs: docs/design.md, section Data flow (Live
tracking (engine)).
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import cv2
import numpy as np

from refstream.errors import ConfigError, InputError
from video_pipeline.decode import open_video

log = logging.getLogger("refstream.live")

#: URL schemes read as live network streams
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "http", "https", "udp", "tcp")
#: what a live page says about SOURCE when it cannot be opened
SOURCE_KINDS = ("a video file or frame folder, a V4L2 camera (/dev/video0), an rtsp://, rtmp://, srt://, "
                "http(s):// (incl. HLS), udp:// or tcp:// stream, or 'browser'")
#: seconds a listener waits for a sender before it checks for stop() and listens again
LISTEN_WAIT = 2.0
#: ring buffer length: the encoder frames of a grounding are chosen from the last frames seen
RING_FRAMES = 16


@dataclass
class LiveFrame:
    """One captured frame: id (0, 1, 2, ... in capture order), capture time (Unix seconds), uint8 [H, W, 3] RGB.

    For a network stream or camera the capture time is when the frame was decoded here (the sender's clock is
    not known); for a file, when it was played; for the browser, when its JPEG arrived.
    """

    frame_id: int
    t_capture: float
    image: np.ndarray


class LatestFrameSlot:
    """A slot that holds only the newest frame (size 1): the consumer always gets the most recent one.

    ``put`` replaces a frame nobody took (counted in :attr:`drops`); ``take`` waits for a frame newer than the
    last one taken. Thread-safe.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: LiveFrame | None = None
        self._taken = True
        self._closed = False
        #: frames replaced before anyone took them
        self.drops = 0
        #: frames put
        self.frames = 0

    def put(self, frame: LiveFrame) -> None:
        with self._cond:
            if not self._taken:
                self.drops += 1
            self._frame, self._taken = frame, False
            self.frames += 1
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> LiveFrame | None:
        """The newest frame not yet taken; None on timeout (seconds) or once closed and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._taken or self._closed, timeout):
                return None
            if self._taken:
                return None
            self._taken = True
            return self._frame

    def close(self) -> None:
        """Wake every waiter; ``take`` returns None once the last frame is taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class FrameSource(threading.Thread):
    """Base of the live sources: a daemon thread that emits frames to its subscribers.

    Args:
        size: (width, height) pixels every frame is resized to, or None (as they come).

    Attributes:
        finished: set when the source has ended (a file played out, an error, :meth:`stop`); its subscribers'
            slots are closed then.
        error: the exception that ended it, or None.
        state: ``live`` (frames flowing or expected) or ``reconnecting`` (a stream dropped, being reopened).
        shared: whether several engines read it (the engines then do not stop it).
    """

    shared = False

    def __init__(self, *, size: tuple[int, int] | None = None, name: str = "refstream-live-source"):
        super().__init__(daemon=True, name=name)
        self.size = size
        self.fps: float | None = None
        self.width = self.height = 0
        self.state = "live"
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._halt = threading.Event()
        self._subscribers: list[tuple[LatestFrameSlot, collections.deque]] = []
        self._state_listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._next_id = 0

    # ---------------------------------------------------------------------------------------- subscribers
    def subscribe(self, slot: LatestFrameSlot, ring: collections.deque,
                  on_state: Callable[[str], None] | None = None) -> None:
        """Deliver every later frame to ``slot`` and ``ring``; ``on_state(state)`` on each state change."""
        with self._lock:
            self._subscribers.append((slot, ring))
            if on_state is not None:
                self._state_listeners.append(on_state)
        if self.finished.is_set():
            slot.close()

    def unsubscribe(self, slot: LatestFrameSlot, on_state: Callable[[str], None] | None = None) -> None:
        with self._lock:
            self._subscribers = [(s, r) for s, r in self._subscribers if s is not slot]
            if on_state is not None and on_state in self._state_listeners:
                self._state_listeners.remove(on_state)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def emit(self, image: np.ndarray, t_capture: float | None = None) -> LiveFrame:
        """Resize ``image`` (uint8 [H, W, 3] RGB) if asked, stamp it and hand it to every subscriber."""
        if self.size is not None and image.shape[1::-1] != tuple(self.size):
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        with self._lock:
            frame = LiveFrame(self._next_id, time.time() if t_capture is None else t_capture, image)
            self._next_id += 1
            subscribers = list(self._subscribers)
        for slot, ring in subscribers:
            ring.append(frame)
            slot.put(frame)
        return frame

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        with self._lock:
            listeners = list(self._state_listeners)
        for listener in listeners:
            listener(state)

    # ------------------------------------------------------------------------------------------ lifetime
    def stop(self) -> None:
        """Ask the thread to end (it finishes its current read first)."""
        self._halt.set()

    def _finish(self) -> None:
        self.finished.set()
        with self._lock:
            subscribers = list(self._subscribers)
        for slot, _ in subscribers:
            slot.close()


class FileSource(FrameSource):
    """Plays a video file or frame folder in real time.

    Args:
        path: a video file or a folder of frames (any input ``refstream run`` takes).
        fps: frames per second to play at (default: the file's own rate; 24 for a frame folder).
        loop: start again at the end (default: stop).
        decoder: ``decord`` or ``pyav``.
        size: (width, height) in pixels to resize every frame to (OpenCV ``INTER_AREA``), or None.

    Raises (at construction):
        InputError: the input cannot be opened (named, with the fix).
    """

    def __init__(self, path, *, fps: float | None = None, loop: bool = False, decoder: str = "decord",
                 size: tuple[int, int] | None = None):
        super().__init__(size=size)
        self.path, self.loop, self.decoder = path, loop, decoder
        with open_video(path, decoder) as source:  # fail at start, naming the input
            self.fps = float(fps or source.fps or 24.0)
            self.num_frames, self.height, self.width = source.num_frames, source.height, source.width
        if size is not None:
            self.width, self.height = size

    def run(self) -> None:
        played, start = 0, time.monotonic()
        try:
            while not self._halt.is_set():
                with open_video(self.path, self.decoder) as source:
                    for _, frames in source.iter_chunks(range(source.num_frames), chunk_size=8):
                        for image in frames:
                            delay = start + played / self.fps - time.monotonic()
                            if delay > 0 and self._halt.wait(delay):
                                return
                            if self._halt.is_set():
                                return
                            self.emit(image)
                            played += 1
                if not self.loop:
                    return
        except Exception as exc:  # noqa: BLE001 - reported through .error and the log; the tracker ends
            self.error = exc
            log.error("live source %s failed: %s: %s", self.path, type(exc).__name__, exc)
        finally:
            self._finish()


def low_delay_options(url: str) -> dict[str, str]:
    """FFmpeg input options for a live ``url`` with the least buffering (user options override them).

    ``probesize=32768`` bytes and ``analyzeduration=500000`` us (a small probe: only the packets read while
    probing are held back), RTSP over TCP (``rtsp_transport=tcp``: no lost UDP packets, no firewall trouble),
    HLS from its newest segment (``live_start_index=-1``), UDP with a tolerant FIFO (``overrun_nonfatal=1``).
    ``fflags=nobuffer`` is not a default: it throws away the packets read while probing, often the only
    keyframe for a whole GOP, so nothing decodes until the next one (measured: 0 of 30 frames of a 1 s push);
    add it with ``--source-option fflags=nobuffer`` for a stream with frequent keyframes. The option names
    are FFmpeg's (ffmpeg-formats(1), ffmpeg-protocols(1)).
    """
    scheme = urlsplit(url).scheme.lower()
    options = {"probesize": "32768", "analyzeduration": "500000"}
    if scheme in ("rtsp", "rtsps"):
        options["rtsp_transport"] = "tcp"
    elif scheme == "udp":
        options.update(overrun_nonfatal="1", fifo_size="1000000")
    elif scheme in ("http", "https") and urlsplit(url).path.endswith(".m3u8"):
        options["live_start_index"] = "-1"
    return options


def _is_listener(url: str, options: dict[str, str]) -> bool:
    """Whether FFmpeg waits for a sender at ``url`` (RTSP ``rtsp_flags=listen``, ``?listen`` on tcp/rtmp/srt...)."""
    query = urlsplit(url).query
    return ("listen" in options.get("rtsp_flags", "") or options.get("listen", "0") not in ("0", "")
            or options.get("mode") == "listener" or any(p.split("=")[0] == "listen" for p in query.split("&") if p))


class StreamSource(FrameSource):
    """A live stream through PyAV: a V4L2 camera or a network URL, reconnected with backoff when it drops.

    Args:
        url: ``/dev/videoN`` (V4L2) or a URL (see :data:`STREAM_SCHEMES`).
        options: FFmpeg input options added to (and overriding) :func:`low_delay_options`, e.g.
            ``{"rtsp_flags": "listen"}`` to wait for an ``ffmpeg -f rtsp`` push, ``{"video_size": "640x480"}``
            for a camera.
        size: (width, height) to scale every frame to (FFmpeg's swscale), or None.
        open_timeout: seconds to wait when opening (and between frames before the stream counts as dropped).
        backoff: (first, longest) seconds between reconnection attempts; the wait doubles after each failure
            and starts again from the first after a frame arrives.

    A stream that carries a duration (a file over HTTP, a finished HLS playlist) is played at its own rate
    (frame timestamps); a live one is taken as it comes. Frame ids keep increasing across reconnects.

    Raises (at construction):
        InputError: the stream cannot be opened (unreachable, refused, no video stream, no such camera),
            naming it and the fix. A listener (``rtsp_flags=listen``, ``?listen``) is not opened at
            construction (nobody sends before it listens); only its port is checked.
    """

    shared = True

    def __init__(self, url: str, *, options: dict[str, str] | None = None, size: tuple[int, int] | None = None,
                 open_timeout: float = 5.0, backoff: tuple[float, float] = (0.5, 8.0)):
        super().__init__(size=size, name="refstream-live-stream")
        self.url, self.open_timeout, self.backoff = url, open_timeout, backoff
        self.camera = url.startswith("/dev/")
        self.options = ({} if self.camera else low_delay_options(url)) | dict(options or {})
        self.listener = not self.camera and _is_listener(url, self.options)
        if self.listener and "rtsp_flags" in self.options:
            # FFmpeg's default listen_timeout (-1, "forever") fails at once with ERANGE in PyAV's build; the
            # open timeout below ends each wait anyway
            self.options.setdefault("listen_timeout", "60")
        self.reconnects = 0
        self._container = None
        if self.listener:
            self._check_port()
        else:
            self._container = self._open()
            stream = self._container.streams.video[0]
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None
        if size is not None:
            self.width, self.height = size

    def close_unstarted(self) -> None:
        """Close the connection opened to check the stream, for a source that will not be started."""
        if self._container is not None and not self.is_alive():
            self._container.close()
            self._container = None

    def _check_port(self) -> None:
        parts = urlsplit(self.url)
        if parts.port is None:
            return
        with socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET) as s:
            try:
                s.bind((parts.hostname or "0.0.0.0", parts.port))
            except OSError as exc:
                raise InputError(f"cannot listen for a stream at {self.url}: {exc.strerror or exc}. Fix: pick a "
                                 f"free port, or stop what listens on {parts.port}.") from None

    def _open(self):
        import av  # lazy: PyAV loads FFmpeg

        kwargs = {"format": "v4l2"} if self.camera else {}
        # PyAV's timeout (an FFmpeg interrupt callback) also ends a listener's wait for a sender, so stop() is
        # noticed within LISTEN_WAIT seconds; the listener then listens again at once
        timeout = (LISTEN_WAIT, self.open_timeout) if self.listener else (self.open_timeout, self.open_timeout)
        try:
            if self.camera and not Path(self.url).exists():
                raise FileNotFoundError(f"no such device {self.url}")
            container = av.open(self.url, options=self.options, timeout=timeout, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every FFmpeg failure becomes one named InputError
            fix = ("check the camera is plugged in and not used by another program (ls /dev/video*)" if self.camera
                   else "check the address and that the stream is being sent (e.g. ffplay the same URL)")
            raise InputError(f"cannot open live source {self.url}: {type(exc).__name__}: {exc}. Fix: {fix}.") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"live source {self.url} has no video stream. Fix: send a stream with video.")
        return container

    def run(self) -> None:
        wait = self.backoff[0]
        try:
            while not self._halt.is_set():
                container, self._container = self._container, None
                try:
                    if container is None:
                        container = self._open_listening() if self.listener else self._open()
                        if container is None:  # halted while listening
                            return
                    if self._read(container):
                        wait = self.backoff[0]
                    reason = "ended"
                except InputError as exc:
                    reason = str(exc)
                except Exception as exc:  # noqa: BLE001 - a dropped stream is reopened, whatever FFmpeg says
                    reason = f"{type(exc).__name__}: {exc}"
                finally:
                    if container is not None:
                        container.close()
                if self._halt.is_set():
                    return
                self._set_state("reconnecting")
                self.reconnects += 1
                log.warning("live source %s dropped (%s); reconnecting in %.1f s", self.url, reason, wait)
                if not self.listener and self._halt.wait(wait):
                    return
                wait = min(2 * wait, self.backoff[1])
        finally:
            self._finish()

    def _open_listening(self):
        """Wait for a sender (a listener's open blocks until one connects); None once stopped."""
        while not self._halt.is_set():
            try:
                return self._open()
            except InputError as exc:
                log.debug("listening at %s: %s", self.url, exc)
        return None

    def _read(self, container) -> bool:
        """Decode frames until the stream ends or fails; True if at least one frame came."""
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # frame threading would hold frames back
        paced = container.duration is not None and not self.camera
        start_wall = first_pts = None
        got = False
        for frame in container.decode(stream):
            if self._halt.is_set():
                break
            if paced and frame.time is not None:
                if start_wall is None:
                    start_wall, first_pts = time.monotonic(), frame.time
                delay = start_wall + (frame.time - first_pts) - time.monotonic()
                if delay > 0 and self._halt.wait(delay):
                    break
            if self.size is not None:
                image = frame.to_ndarray(width=self.size[0], height=self.size[1], format="rgb24")
            else:
                image = frame.to_ndarray(format="rgb24")
            self.emit(image)
            if not got:
                got = True
                self._set_state("live")
                self.width, self.height = image.shape[1], image.shape[0]
        return got


class BrowserSource(FrameSource):
    """Frames the page sends (its camera through getUserMedia), JPEG bytes over the websocket.

    :meth:`push` decodes one JPEG and emits it (capture time = arrival time); frame ids count the pushed frames
    from 0, so the page can match each result to the frame it sent. The thread only waits for :meth:`stop`.
    """

    def __init__(self, *, size: tuple[int, int] | None = None, max_pixels: int = 3840 * 2160):
        super().__init__(size=size, name="refstream-live-browser")
        self.max_pixels = max_pixels
        #: frames the page has sent (decoded or not)
        self.frames_pushed = 0

    def push(self, jpeg: bytes) -> LiveFrame:
        """Decode ``jpeg`` and hand it to the engine.

        Raises:
            InputError: not a JPEG/PNG image OpenCV decodes, or larger than ``max_pixels``.
        """
        self.frames_pushed += 1
        image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            with self._lock:
                self._next_id += 1  # the page counted it: keep the ids of later frames matching the page's
            raise InputError(f"a binary message of {len(jpeg)} bytes is not a JPEG image. Fix: send each camera "
                             "frame as one JPEG (canvas.toBlob('image/jpeg')).")
        if image.shape[0] * image.shape[1] > self.max_pixels:
            with self._lock:
                self._next_id += 1
            raise InputError(f"a frame of {image.shape[1]}x{image.shape[0]} is too large. Fix: send at most "
                             f"{self.max_pixels} pixels per frame.")
        self.height, self.width = image.shape[:2]
        return self.emit(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))

    def run(self) -> None:
        try:
            self._halt.wait()
        finally:
            self._finish()


def is_stream(source) -> bool:
    """Whether ``source`` names a live stream (a V4L2 device or a URL of :data:`STREAM_SCHEMES`)."""
    text = str(source)
    return text.startswith("/dev/") or urlsplit(text).scheme.lower() in STREAM_SCHEMES


def open_source(source, *, fps: float | None = None, loop: bool = False, decoder: str = "decord",
                size: tuple[int, int] | None = None, options: dict[str, str] | None = None) -> FrameSource:
    """The source SOURCE names (not started): ``browser``, a stream (:func:`is_stream`) or a file/folder.

    Raises:
        InputError: it cannot be opened (named, with the fix). ConfigError: ``options`` for a file source.
    """
    if isinstance(source, FrameSource):
        return source
    text = str(source)
    if text == "browser":
        return BrowserSource(size=size)
    if is_stream(text):
        return StreamSource(text, options=options, size=size)
    if options:
        raise ConfigError(f"--source-option is for streams and cameras, not the file {text}. Fix: leave it out.")
    if "://" in text:
        raise InputError(f"cannot open live source {text}: unknown scheme. Fix: use {SOURCE_KINDS}.")
    return FileSource(text, fps=fps, loop=loop, decoder=decoder, size=size)
