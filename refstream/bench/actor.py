"""The benchmark GPU worker: a Ray actor that loads the model once and runs video tasks.

A *task* is one video with its pending (expression, run) units, a *run* being a (method, budget) pair of the
sweep. :func:`process_video` does the work with :meth:`refstream.pipeline.Pipeline.run_sweep` (the video's
expression-independent features computed once, one SAM2 pass per run) and writes each unit's outputs into
the run folder with atomic renames, so a unit can be run again at any time and gives the same files
(idempotent; the driver only marks a unit done once its files are in place). The run folder must be visible
to every worker (a shared filesystem on a multi-node cluster).

Failure handling: a task that fails as a whole is retried unit by unit inside the worker, so one bad unit
(an empty expression) fails alone; a video that cannot be read fails each of its units with the reason.
A CUDA error leaves the process's CUDA context unusable, so the actor then exits its process
(``os._exit``): Ray restarts it (``max_restarts > 0``; the constructor reloads the model) and the driver
resubmits the units.
"""

from __future__ import annotations

import io
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refstream.api import load
from refstream.bench import BACKGROUND_PROB, PROB_SCALE
from refstream.options import SweepOptions
from refstream.outputs import logits_to_mask, write_bytes_atomic
from workers.gpu_worker import is_cuda_error

#: Ref-DAVIS: probabilities at or below this are background when objects are merged (and are stored as 0)


@dataclass
class WorkerConfig:
    """Resources and restart policy of a :class:`BenchWorker` actor.

    ``num_gpus``: GPUs per actor (0 on CPU; None = 1 when the cluster has GPUs and ``device`` is not cpu).
    """

    model: str = "videoglamm"
    checkpoint: str | None = None
    device: str = "auto"
    num_gpus: float | None = None
    num_cpus: float = 1
    max_restarts: int = 3


def png_bytes(array: np.ndarray) -> bytes:
    """A 2-D uint8 array as PNG bytes (grayscale)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def unit_files(task: dict, combo: str, exp_id: str) -> list[str]:
    """Files (relative to the run folder) a unit writes: used by the driver to check a finished unit."""
    if task["kind"] == "merged":
        return [f"units/{combo}/{task['video']}/{exp_id}.npz"]
    return [f"predictions/{combo}/{task['video']}/{exp_id}/{f}.png" for f in task.get("frames") or []]


def process_video(pipeline, task: dict, run_dir: str | Path) -> list[dict]:
    """Run one video task and write its units' outputs under ``run_dir``.

    ``task``: ``{"video", "path", "kind" ("binary" | "merged"), "runs": {combo: [method, budget]},
    "units": [{"exp_id", "text", "combos": [combo, ...]}], "options": SweepOptions fields}``.

    Returns:
        one record per (unit, combo): ``{"combo", "video", "exp_id", "status" ("ok" | "failed"), "error",
        "seconds", "stage_seconds", "visual_tokens", "frames", "answer", "worker"}`` (:meth:`BenchWorker.run_video`
        adds ``node``, the Ray node id).

    Raises:
        the exception of a CUDA error (the actor then exits, see the module docstring).
    """
    valid, records = [], []
    for unit in task["units"]:
        if not str(unit["text"]).strip():
            records += [_failed(task, c, unit["exp_id"], "ExpressionError: the referring expression is empty")
                        for c in unit["combos"]]
        else:
            valid.append(unit)
    if not valid:
        return records
    try:
        return records + _sweep(pipeline, task, valid, Path(run_dir))
    except Exception as exc:  # noqa: BLE001 - isolate the failing unit(s)
        if is_cuda_error(exc):
            raise
        if len(valid) == 1:
            error = _describe(exc)
            return records + [_failed(task, c, valid[0]["exp_id"], error) for c in valid[0]["combos"]]
    for unit in valid:  # the task failed as a whole: each unit on its own
        try:
            records += _sweep(pipeline, task, [unit], Path(run_dir))
        except Exception as exc:  # noqa: BLE001
            if is_cuda_error(exc):
                raise
            records += [_failed(task, c, unit["exp_id"], _describe(exc)) for c in unit["combos"]]
    return records


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _failed(task: dict, combo: str, exp_id: str, error: str) -> dict:
    return {"combo": combo, "video": task["video"], "exp_id": exp_id, "status": "failed", "error": error,
            "worker": os.getpid()}


def _sweep(pipeline, task: dict, units: list[dict], run_dir: Path) -> list[dict]:
    video = task["video"]
    combos = [c for c in task["runs"] if any(c in u["combos"] for u in units)]
    run_units = [[u for u in units if c in u["combos"]] for c in combos]
    runs = [(task["runs"][c][0], int(task["runs"][c][1]), [u["text"] for u in us]) for c, us in zip(combos, run_units)]
    options = SweepOptions(**task.get("options", {}))
    merged = task["kind"] == "merged"
    probs: dict[int, list[np.ndarray]] = {}
    infos: dict[int, dict] = {}
    stage: dict[int, dict] = {}
    pending: list[tuple[Path, bytes]] = []
    started = time.perf_counter()

    def on_run_start(r, info):
        infos[r] = info
        if merged:
            probs[r] = [[] for _ in run_units[r]]

    def on_run_frame(r, position, name, logits):
        if merged and position == len(names.setdefault(r, [])):
            names[r].append(name)
        for i, (unit, lg) in enumerate(zip(run_units[r], logits)):
            if merged:
                if lg is None:  # no [SEG]: an all-background object
                    q = np.zeros(size, np.uint16)
                else:
                    p = torch.sigmoid(lg).numpy()
                    q = np.where(p > BACKGROUND_PROB, np.round(p * PROB_SCALE), 0).astype(np.uint16)
                probs[r][i].append(q)
            else:
                mask = logits_to_mask(lg, size).astype(np.uint8) * 255
                pending.append((run_dir / "predictions" / combos[r] / video / unit["exp_id"] / f"{name}.png",
                                png_bytes(mask)))

    def on_run_done(r, seconds):
        stage[r] = seconds
        if merged:
            for i, unit in enumerate(run_units[r]):
                buf = io.BytesIO()
                np.savez_compressed(buf, probs=np.stack(probs[r][i]), frames=np.array(names[r]))
                pending.append((run_dir / "units" / combos[r] / video / f"{unit['exp_id']}.npz", buf.getvalue()))
            probs[r] = None

    names: dict[int, list[str]] = {}
    source = pipeline.open_source(task["path"], options.decoder)  # the frame size, for answers without [SEG]
    with source:
        size = (source.height, source.width)
    result = pipeline.run_sweep(task["path"], [], runs, on_run_frame, options=options, on_run_done=on_run_done,
                                on_run_start=on_run_start)
    for path, data in pending:  # only once every run succeeded: a failed task leaves no partial unit
        write_bytes_atomic(path, data)
    shared = sum(result.shared_seconds.values())
    n_unit_runs = sum(len(us) for us in run_units)
    records = []
    for r, combo in enumerate(combos):
        per_run = sum(stage[r].values())
        for i, unit in enumerate(run_units[r]):
            seconds = per_run / len(run_units[r]) + shared / n_unit_runs  # amortised share of the video's work
            records.append({
                "combo": combo, "video": video, "exp_id": unit["exp_id"], "status": "ok", "error": None,
                "seconds": round(seconds, 4),
                "stage_seconds": {k: round(v / len(run_units[r]) + result.shared_seconds.get(k, 0.0) / n_unit_runs, 4)
                                  for k, v in {**{k: 0.0 for k in result.shared_seconds}, **stage[r]}.items()},
                "visual_tokens": int(infos[r]["visual_tokens"][i]), "kept_per_frame": infos[r]["kept_per_frame"],
                "frames": len(result.frames), "clips": result.clips, "answer": infos[r]["answers"][i],
                "worker": os.getpid(),
                "task_seconds": round(time.perf_counter() - started, 3),
            })
    return records


class BenchWorker:
    """The actor body (wrap with :func:`make_worker_class`): the model is loaded once in the constructor.

    Args:
        config: :class:`WorkerConfig` fields as a dict.
        run_dir: the run folder the units write into.
    """

    def __init__(self, config: dict, run_dir: str):
        self.config = WorkerConfig(**config)
        self.run_dir = run_dir
        started = time.perf_counter()
        self.pipeline = load(self.config.model, checkpoint=self.config.checkpoint, device=self.config.device).pipeline
        self.load_seconds = time.perf_counter() - started
        self.tasks_done = 0
        self.node = _ray_node_id()

    def health(self) -> dict:
        """Liveness and device state (``pid``, ``node``: the Ray node id or None outside Ray, ``device``, ...); a
        CUDA failure here exits the process (Ray restarts the actor)."""
        info = {"ok": True, "pid": os.getpid(), "node": self.node, "device": str(self.pipeline.device),
                "model": self.pipeline.config.name, "load_seconds": round(self.load_seconds, 3),
                "tasks_done": self.tasks_done}
        if self.pipeline.device.type == "cuda":
            try:
                torch.ones(1, device=self.pipeline.device).add_(1)
                torch.cuda.synchronize(self.pipeline.device)
                info["cuda_memory_allocated"] = int(torch.cuda.memory_allocated(self.pipeline.device))
            except Exception as exc:  # noqa: BLE001
                if is_cuda_error(exc):
                    os._exit(1)
                raise
        return info

    def run_video(self, task: dict) -> list[dict]:
        """:func:`process_video` on this worker's model; exits the process on a CUDA error."""
        try:
            records = process_video(self.pipeline, task, self.run_dir)
        except Exception as exc:  # noqa: BLE001
            if is_cuda_error(exc):
                os._exit(1)  # an unexpected exit: Ray restarts the actor (ray.actor.exit_actor would not)
            raise
        self.tasks_done += 1
        return [dict(r, node=self.node) if self.node else r for r in records]


def resolve_num_gpus(config: WorkerConfig) -> float:
    """GPUs per actor: the configured value, else 1 when the cluster has GPUs and the device is not cpu."""
    if config.num_gpus is not None:
        return float(config.num_gpus)
    if config.device == "cpu":
        return 0.0
    import ray  # lazy: Ray is only loaded in processes that run actors

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def make_worker_class(config: WorkerConfig):
    """``ray.remote(BenchWorker)`` with the resources of ``config`` and ``max_restarts`` (tasks are not
    retried by Ray: the driver resubmits failed units itself)."""
    import ray  # lazy: Ray is only loaded in processes that run actors

    return ray.remote(BenchWorker).options(
        num_gpus=resolve_num_gpus(config), num_cpus=config.num_cpus, max_restarts=config.max_restarts,
        max_task_retries=0, scheduling_strategy="SPREAD",  # over the nodes: one node's loss takes fewer
    )


def _ray_node_id() -> str | None:
    """This process's Ray node id (hex), or None outside Ray (``--workers 0``); Ray is not imported for it."""
    import sys

    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
