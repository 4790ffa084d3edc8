"""``refstream live SOURCE --ray [--address ADDR]``: the live app as a Ray Serve deployment with FastAPI ingress,
the model in the VideoGLaMM GPU worker actor (so a cluster's GPU does the work).

What runs where:

* the driver (the ``refstream live`` process, :func:`serve_live`): joins ``--address`` or starts a local Ray of
  its own, starts the worker actor and Serve (HTTP proxy on ``--host:--port``), prints the address, waits for
  SIGINT/SIGTERM, then deletes the app, shuts Serve down and leaves Ray (exit 0);
* the worker actor (:class:`refstream.service.gpu_worker.VideoGLaMMWorker`, :func:`start_worker`):
  ``num_gpus=1`` when the cluster has a GPU (``--device auto`` or ``cuda``), else on the CPU; it holds the
  model and every session's grounding and SAM2 streams (``live_*`` methods), one call at a time;
* the deployment's one replica (:class:`LiveDeployment`), placed on the driver's node when that node is in the
  cluster (SOURCE is the file the driver checked): the :class:`refstream.live.server.LiveApp` (page,
  websocket, ``/metrics``, ``/healthz``; the same Origin, token and ``--max-sessions`` checks) whose engines
  decode the source and call the worker through :class:`refstream.live.model.RayLiveModel` from their threads;
* Serve's HTTP proxy carries the page, the metrics and the websockets to the replica.

Frames go to the worker as uint8 arrays through Ray's object store; masks come back bit-packed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray import serve

from refstream.errors import ConfigError, RefStreamError
from refstream.live.model import RayLiveModel
from refstream.live.server import LiveApp, LiveSettings
from refstream.live.sources import is_stream
from refstream.options import LiveOptions, ModelOptions
from refstream.service.gpu_worker import gpu_worker_class

log = logging.getLogger("refstream.live")

#: the Serve application's name (its route is ``/``)
APP_NAME = "refstream-live"


@serve.deployment(name="LiveApp", num_replicas=1, graceful_shutdown_timeout_s=5.0,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress()
class LiveDeployment:
    """The Serve replica: a :class:`refstream.live.server.LiveApp` whose sessions' model calls go to ``worker``.

    Args:
        worker: the VideoGLaMM worker actor handle (``parts="all"``).
        source: what the sessions watch (:class:`refstream.live.server.LiveSettings`): a file or frame folder (a
            path valid on the replica's node), a camera or stream URL (opened by the replica), or ``browser``.
        options: the sessions' :class:`refstream.options.LiveOptions`.
        token, max_sessions, jpeg_quality: as :class:`refstream.live.server.LiveSettings`.
    """

    async def __init__(self, worker, source: str, options: LiveOptions, token: str | None = None,
                       max_sessions: int = 4, jpeg_quality: int = 80):
        info = await worker.live_info.remote()  # awaited: this runs on the replica's event loop
        self.live = LiveApp(LiveSettings(None, source, options, token=token, max_sessions=max_sessions,
                                        jpeg_quality=jpeg_quality, model=RayLiveModel(worker, info)))

    def __serve_build_asgi_app__(self):
        return self.live.api


class _Stopped(Exception):
    """SIGINT/SIGTERM while :func:`serve_live` was still starting."""


def start_ray(address: str | None) -> None:
    """Join ``address`` (``auto``, ``host:port`` or ``ray://host:port``), or start a local Ray of our own (at
    least 2 logical CPUs: the replica and the worker take one each); nothing when Ray is already initialised.

    Raises:
        ConnectionError: ``address`` cannot be reached (from ``ray.init``).
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                 object_store_memory=200 * 1024 * 1024)


def start_worker(model: ModelOptions, *, max_tracks: int, name: str | None = None,
                 stop: threading.Event | None = None):
    """Start the VideoGLaMM worker actor for live tracking and wait until its model is loaded.

    ``--device auto`` takes one GPU when the cluster has one (``num_gpus=1``), else the CPU; ``cuda`` needs a
    GPU in the cluster. The actor is owned by this process: it ends when this process leaves Ray. Setting
    ``stop`` while waiting for the actor gives up (``_Stopped``).

    Returns:
        the actor handle.

    Raises:
        ConfigError: ``--device cuda`` or a half ``--dtype`` on a cluster without a GPU, or a bad model option.
        RefStreamError: the model could not be loaded (e.g. weights not found), as the actor raised it.
    """
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    device = model.device
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    elif device == "cuda" and gpus < 1:
        raise ConfigError("--device cuda: the Ray cluster has no GPU (`ray status` lists its resources); join one "
                          "that has (--address) or use --device cpu")
    if device == "cpu" and model.dtype not in ("auto", "float32"):
        raise ConfigError(f"--dtype {model.dtype} needs a GPU and the Ray cluster has none: use --dtype float32 "
                          f"(or auto), or join a cluster with a GPU (--address)")
    worker_class = gpu_worker_class(num_gpus=1.0 if device == "cuda" else 0.0, num_cpus=1.0)
    worker = worker_class.options(name=name or f"refstream-live-worker-{uuid.uuid4().hex[:8]}").remote(
        model.model, model.checkpoint, device, parts="all", dtype=model.dtype, live_max_tracks=max_tracks)
    ready, waited = worker.live_info.remote(), 0
    try:
        while not ray.wait([ready], timeout=1.0)[0]:  # pending: resources (a GPU) not free yet, or a slow load
            if stop is not None and stop.is_set():
                raise _Stopped()
            waited += 1
            if waited % 30 == 0:
                log.warning("the live worker actor is not up after %d s (it needs %s; a big model also takes a "
                            "while to load)", waited, "1 GPU + 1 CPU" if device == "cuda" else "1 CPU")
        ray.get(ready)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, RefStreamError):
            raise cause from None
        raise
    return worker


def free_port(host: str) -> int:
    """A port free on ``host`` now (Serve cannot report the port it bound for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _on_driver_node() -> dict:
    """Replica resources that place it on this process's node, when this node is part of the cluster."""
    here = ray.util.get_node_ip_address()
    nodes = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if here in nodes:
        return {f"node:{here}": 0.001}
    log.warning("this machine (%s) is not a node of the Ray cluster: the live app's replica runs on another node, "
                "where SOURCE must exist at the same path", here)
    return {}


def serve_live(source, options: LiveOptions, model: ModelOptions, *, address: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, token: str | None = None, max_sessions: int = 4,
               stop: threading.Event | None = None, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve the live app on Ray Serve until ``stop`` is set (SIGINT/SIGTERM set it when called on the main
    thread; during the start they abandon it), then delete the app, shut Serve down and leave Ray (when this call
    joined or started it). Returns 0.

    Args:
        source: a file or frame folder, a camera or stream URL, or ``browser`` (checked by the caller).
        options, model: the live and model options.
        address: a Ray cluster to join (None: a local Ray of our own).
        host, port: where Serve's HTTP proxy listens (port 0: a free port, chosen here).
        token, max_sessions: as ``refstream live`` (the same checks, in the replica).
        stop: set to stop (created when None).
        on_ready: called with the page's address once the app is ready.

    Raises:
        ConfigError: Ray Serve already runs on that cluster (its own HTTP options and routes would apply: stop it
            with ``serve shutdown`` or use another cluster), or see :func:`start_worker`.
        ConnectionError: ``address`` cannot be reached.
    """
    stop = stop or threading.Event()
    own_ray = not ray.is_initialized()
    start_ray(address)
    started_serve = ready = False
    previous = {}

    def on_signal(*_) -> None:
        stop.set()  # still starting: the start gives up at its next check (a pending worker actor: within 1 s)
        if not ready:  # and a second signal is handled as before ours (Ray's SIGTERM exit, KeyboardInterrupt)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    if threading.current_thread() is threading.main_thread():  # after ray.init, whose SIGTERM handler exits 15
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if any(a.get("name") == "SERVE_CONTROLLER_ACTOR" for a in ray.util.list_named_actors(all_namespaces=True)):
            raise ConfigError("Ray Serve already runs on this Ray cluster: refstream live --ray starts its own (on "
                              "--host/--port, route /); stop that one (`serve shutdown`) or join another cluster")
        worker = start_worker(model, max_tracks=2 * max_sessions,  # room for tracks a crashed replica left behind
                              stop=stop)
        port = port or free_port(host)
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        started_serve = True
        deployment = LiveDeployment.options(
            max_ongoing_requests=max_sessions + 8,  # websockets count: leave room for refusals, /healthz, /metrics
            ray_actor_options={"num_cpus": 1, "resources": _on_driver_node()})
        where = str(source) if str(source) == "browser" or is_stream(source) else str(Path(source).resolve())
        serve.run(deployment.bind(worker, where, options, token, max_sessions),
                  name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
        if stop.is_set():
            raise _Stopped()
        ready = True
        query = f"?token={token}" if token else ""
        if on_ready is not None:
            on_ready(f"http://{host}:{port}/{query}")
        while not stop.wait(0.5):
            pass
    except _Stopped:
        log.warning("refstream live --ray: stopped while starting")
    finally:  # once serving, a repeated signal meanwhile only sets stop again
        try:
            if started_serve:
                try:
                    serve.delete(APP_NAME)
                finally:
                    serve.shutdown()
        finally:
            if own_ray:
                ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
