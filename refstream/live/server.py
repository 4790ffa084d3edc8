"""The live tracking web app: ``GET /`` (the page), ``WS /ws`` (the protocol), ``GET /metrics``, ``GET /healthz``.

One :class:`refstream.live.engine.LiveEngine` per websocket session, all sharing one
:class:`refstream.live.model.LiveModel`: a loaded model in this process (a lock serialises its use: CLIP's
feature hooks and SAM2's anchor hook are per model, not per call), or the VideoGLaMM GPU worker Ray actor
(``refstream live --ray``: this app then runs as a Ray Serve deployment, :mod:`refstream.live.ray_serve`).
Model calls run on the engines' threads, never on the event loop; results reach the socket through a
latest-result slot, so a slow client skips frames instead of growing a send buffer.

Protocol (names fixed; other tools depend on them):

* client -> server, JSON text: ``{"type": "prompt", "expressions": [...]}`` (replaces the objects),
  ``{"type": "clear"}``, ``{"type": "ping", "t": <client ms>}``;
* server -> client: per processed frame a JSON text ``{"type": "frame", "frame_id", "prompt_id", "t_capture",
  "t_done", "width", "height", "objects": [{"expression", "mask": COCO RLE}]}`` followed by one binary message
  with the frame as JPEG; ``{"type": "status", "state": "grounding"|"tracking"|"idle"|"reconnecting"|...,
  "prompt_id"}`` (``tracking`` also carries ``"tokens"``: the grounding's kept visual tokens as a PNG data URL);
  ``{"type": "pong", "t": <client ms>, "server_t": <Unix s>}``; ``{"type": "error", "message": str}`` (a bad
  prompt gets one and changes nothing).

Security: the websocket's ``Origin`` must be the page's own origin (``http://`` + the request's ``Host``);
with a token, ``?token=`` must match; at most ``max_sessions`` sessions (more are told why and closed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import cv2
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from refstream.errors import RefStreamError
from refstream.live.engine import LiveEngine, LiveResult
from refstream.live.model import LiveModel, LocalLiveModel
from refstream.live.sources import BrowserSource, FrameSource, is_stream, open_source
from refstream.options import LiveOptions
from refstream.outputs import encode_rle
from refstream.pipeline import Pipeline

log = logging.getLogger("refstream.live")

#: websocket close codes: policy violation (origin, token) and "try again later" (too many sessions)
CLOSE_POLICY, CLOSE_BUSY = 1008, 1013


@dataclass
class LiveSettings:
    """What the app serves: the loaded model, the source and the session limits.

    Attributes:
        pipeline: the loaded model, shared by every session (None with ``model``).
        source: what each session watches: a video file or frame folder (each session plays it from the start),
            a camera or stream URL or a started :class:`refstream.live.sources.FrameSource` (one source, shared
            by every session), or ``browser`` (each page sends its own camera's frames).
        options: the sessions' :class:`refstream.options.LiveOptions` (first prompt, pruning, playback).
        token: when set, ``?token=`` must match it.
        max_sessions: sessions at once; more are refused with a message.
        jpeg_quality: of the frames sent (0-100).
        model_lock: serialises the use of ``pipeline``.
        model: where the model calls go, shared by every session (default: ``pipeline`` in this process,
            :class:`refstream.live.model.LocalLiveModel`; :class:`refstream.live.model.RayLiveModel` for a Ray
            actor).
    """

    pipeline: Pipeline | None
    source: str | Path | FrameSource
    options: LiveOptions
    token: str | None = None
    max_sessions: int = 4
    jpeg_quality: int = 80
    model_lock: threading.Lock = field(default_factory=threading.Lock)
    model: LiveModel | None = None

    @property
    def source_kind(self) -> str:
        """``browser``, ``stream`` (a camera or network stream, shared) or ``file``."""
        if str(self.source) == "browser":
            return "browser"
        return "stream" if isinstance(self.source, FrameSource) or is_stream(self.source) else "file"


class LiveMetrics:
    """Prometheus metrics of the app (a registry of its own, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.frames = Counter("refstream_live_frames_processed", "frames segmented", registry=self.registry)
        self.drops = Counter("refstream_live_frames_dropped", "source frames replaced before the tracker took "
                             "them, or results skipped for a slow client", ["where"], registry=self.registry)
        self.frame_seconds = Histogram("refstream_live_frame_seconds", "tracker seconds per frame",
                                       registry=self.registry)
        self.send_seconds = Histogram("refstream_live_capture_to_send_seconds", "capture to send, seconds",
                                      registry=self.registry)
        self.sessions = Gauge("refstream_live_sessions", "open websocket sessions", registry=self.registry)


class _Session:
    """One websocket: its engine, the newest result not sent yet, and status messages to send."""

    def __init__(self, app: "LiveApp", websocket: WebSocket):
        self.app, self.websocket = app, websocket
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.latest: LiveResult | None = None
        self.statuses: list[dict] = []
        self.lock = threading.Lock()
        self.skipped = 0
        self.engine: LiveEngine | None = None

    # called on the engine's threads
    def on_result(self, result: LiveResult) -> None:
        with self.lock:
            if self.latest is not None:
                self.skipped += 1
                self.app.metrics.drops.labels("client").inc()
            self.latest = result
        self.app.metrics.frames.inc()
        if self.engine is not None and self.engine.stats.process_seconds:
            self.app.metrics.frame_seconds.observe(self.engine.stats.process_seconds[-1])
        self.loop.call_soon_threadsafe(self.wake.set)

    def on_status(self, state: str, prompt_id: int) -> None:
        status = {"type": "status", "state": state, "prompt_id": prompt_id}
        view = getattr(self.engine, "tokens_view", None)
        if state == "tracking" and view is not None:  # the kept tokens of the grounding now tracked
            ok, png = cv2.imencode(".png", cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
            if ok:
                status["tokens"] = "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()
        with self.lock:
            self.statuses.append(status)
        self.loop.call_soon_threadsafe(self.wake.set)

    async def send_loop(self) -> None:
        """Send status messages and the newest result (frame JSON + JPEG) whenever there is something new."""
        quality = [int(cv2.IMWRITE_JPEG_QUALITY), self.app.settings.jpeg_quality]
        while True:
            await self.wake.wait()
            self.wake.clear()
            with self.lock:
                statuses, self.statuses = self.statuses, []
                result, self.latest = self.latest, None
            for status in statuses:
                await self.websocket.send_text(json.dumps(status))
            if result is None:
                continue
            message, jpeg = await asyncio.to_thread(self._encode, result, quality, self.browser)
            await self.websocket.send_text(message)
            if jpeg is not None:  # the page has its own camera frames: only the masks go back
                await self.websocket.send_bytes(jpeg)
            self.app.metrics.send_seconds.observe(max(0.0, time.time() - result.t_capture))

    @property
    def browser(self) -> bool:
        return isinstance(getattr(self.engine, "source", None), BrowserSource)

    @staticmethod
    def _encode(result: LiveResult, quality: list[int], masks_only: bool = False) -> tuple[str, bytes | None]:
        message = json.dumps({
            "type": "frame", "frame_id": result.frame_id, "prompt_id": result.prompt_id,
            "t_capture": result.t_capture, "t_done": result.t_done, "width": result.width,
            "height": result.height,
            "objects": [{"expression": e, "mask": encode_rle(m)} for e, m in zip(result.expressions, result.masks)],
        })
        if masks_only:
            return message, None
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(result.frame, cv2.COLOR_RGB2BGR), quality)
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode frame {result.frame_id}")
        return message, jpeg.tobytes()

    async def receive_loop(self) -> None:
        """Handle the client's messages until it goes away."""
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                await self.frame(message.get("bytes") or b"")
                continue
            try:
                data = json.loads(message["text"])
                kind = data.get("type")
            except (ValueError, AttributeError):
                await self.error("messages are JSON objects with a \"type\" (prompt, clear or ping)")
                continue
            if kind == "prompt":
                expressions = data.get("expressions")
                if not isinstance(expressions, list) or not all(isinstance(e, str) for e in expressions):
                    await self.error('a prompt is {"type": "prompt", "expressions": ["the dog", ...]}')
                    continue
                try:
                    self.engine.prompt(expressions)
                except RefStreamError as exc:
                    await self.error(str(exc))
            elif kind == "clear":
                self.engine.clear()
            elif kind == "ping":
                await self.websocket.send_text(json.dumps({"type": "pong", "t": data.get("t"), "server_t": time.time()}))
            else:
                await self.error(f"unknown message type {kind!r}: use prompt, clear or ping")

    async def frame(self, jpeg: bytes) -> None:
        """A camera frame from the page (SOURCE browser): decoded off the event loop, into the engine's slot."""
        source = self.engine.source
        if not isinstance(source, BrowserSource):
            await self.error("binary frames are only taken with SOURCE browser (refstream live browser)")
            return
        try:
            await asyncio.to_thread(source.push, jpeg)
        except RefStreamError as exc:
            await self.error(str(exc))

    async def error(self, text: str) -> None:
        await self.websocket.send_text(json.dumps({"type": "error", "message": text}))


class LiveApp:
    """The FastAPI app of ``refstream live`` (``.api``), with its sessions and metrics."""

    def __init__(self, settings: LiveSettings):
        self.settings = settings
        self.model = settings.model or LocalLiveModel(settings.pipeline, settings.model_lock)
        self.metrics = LiveMetrics()
        self.sessions: set[_Session] = set()
        self.shared_source: FrameSource | None = None
        if settings.source_kind == "stream":  # one camera / stream connection for every session
            options = settings.options
            self.shared_source = open_source(settings.source, size=options.frame_size,
                                             options=options.source_options)
            if not self.shared_source.is_alive() and not self.shared_source.finished.is_set():
                self.shared_source.start()

        @contextlib.asynccontextmanager
        async def lifespan(_api):
            yield
            await asyncio.to_thread(self.close)

        self.api = FastAPI(title="RefStream live", lifespan=lifespan)
        self.api.add_api_route("/", self.page, methods=["GET"], response_class=HTMLResponse)
        self.api.add_api_route("/healthz", self.healthz, methods=["GET"])
        self.api.add_api_route("/metrics", self.prometheus, methods=["GET"])
        self.api.add_api_websocket_route("/ws", self.websocket)

    def engines(self) -> list[LiveEngine]:
        """The engines of the open sessions (one per page; a session still starting has none yet)."""
        return [s.engine for s in list(self.sessions) if s.engine is not None]

    def close(self) -> None:
        """Stop the shared source (the server is shutting down; sessions stop their own engines)."""
        if self.shared_source is not None:
            self.shared_source.stop()
            self.shared_source.join(10)

    async def page(self) -> HTMLResponse:
        html = resources.files("refstream.live").joinpath("static/index.html").read_text()
        return HTMLResponse(html)

    async def healthz(self) -> JSONResponse:
        model = self.model.describe()
        source = self.shared_source
        return JSONResponse({"ok": True, "sessions": len(self.sessions), "model": model["name"],
                             "random_weights": model["random_weights"], "device": model["device"],
                             "runs_in": model["runs_in"], "source": self.settings.source_kind,
                             "source_state": source.state if source is not None else "live"})

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _refusal(self, websocket: WebSocket) -> tuple[int, str] | None:
        origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            return CLOSE_POLICY, f"origin {origin} refused: open the page this server serves (http://{host}/)"
        token = self.settings.token
        if token is not None and websocket.query_params.get("token") != token:
            return CLOSE_POLICY, "a token is required: open the page with ?token=<the --token given to refstream live>"
        if len(self.sessions) >= self.settings.max_sessions:
            return CLOSE_BUSY, (f"too many sessions ({self.settings.max_sessions} open): close another page, or start "
                                f"refstream live with a larger --max-sessions")
        return None

    async def websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        refusal = self._refusal(websocket)
        if refusal is not None:
            code, text = refusal
            log.warning("live session refused: %s", text)
            await websocket.send_text(json.dumps({"type": "error", "message": text}))
            await websocket.close(code)
            return
        session = _Session(self, websocket)
        self.sessions.add(session)
        self.metrics.sessions.set(len(self.sessions))
        try:
            session.engine = await asyncio.to_thread(
                LiveEngine, self.settings.pipeline, self.shared_source or self.settings.source, self.settings.options,
                on_result=session.on_result, on_status=session.on_status, model=self.model)
            session.engine.start()
            sender = asyncio.create_task(session.send_loop())
            try:
                await session.receive_loop()
            finally:
                sender.cancel()
        except WebSocketDisconnect as exc:
            log.info("live session: the page went away (code %s)", exc.code)
        finally:
            if session.engine is not None:
                await asyncio.to_thread(session.engine.stop)
                self.metrics.drops.labels("source").inc(session.engine.slot.drops)
            self.sessions.discard(session)
            self.metrics.sessions.set(len(self.sessions))
            log.info("live session closed (%d open)", len(self.sessions))
