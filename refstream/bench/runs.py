"""``refstream bench run`` (a method x budget sweep over a benchmark, on Ray) and ``refstream bench report``.

Run folder ``RUN`` (everything written atomically; rerunning the command resumes)::

    RUN/run.json                                  the sweep's settings (a resume must match them)
    RUN/status/<combo>/<video>/<exp_id>.json      one record per finished or failed unit: status, seconds,
                                                  attempts, error, visual tokens (a unit = video x expression,
                                                  per combo = method x budget, named <method>_<budget>)
    RUN/predictions/<combo>/...                   official layouts:
        ref-davis17: anno_0..anno_3/<vid>/<frame>.png  indexed PNGs, objects merged by the protocol's rule
                                                       (:func:`merge_objects`: first object above 0.5 wins)
        mevis, refytvos: <vid>/<exp_id>/<frame>.png    0/255 PNGs, every frame
    RUN/units/<combo>/<vid>/<exp_id>.npz          Ref-DAVIS only: one object's probabilities (uint16 p*65535,
                                                  0 at or below 0.1) before the merge
    RUN/results/<combo>.json                      J, F, J&F (where GT exists), frames/s, visual tokens
    RUN/submissions/<combo>.zip                   Refer-YouTube-VOS (Annotations/<vid>/<exp_id>/<frame>.png)
                                                  and MeViS valid (<vid>/<exp_id>/<frame>.png)
    RUN/summary.json, RUN/failures.json
    RUN/events.jsonl                              Ray runs: one JSON line per task dispatched ("start": its
                                                  units, attempt, actor pid and Ray node id) and per outcome
                                                  ("done", "failed", "lost": the actor or its node died), appended

Work is spread over Ray actors (:mod:`refstream.bench.actor`) one video at a time: a video's decoded frames, CLIP
features, InternVideo2 tokens and text embeddings are computed once for all its expressions, methods and
budgets; per (method, budget) its expressions share one SAM2 pass. A failed unit is retried (``--retries``,
alone in a new task), then recorded as failed, listed at the end, and the command exits 1.

On a cluster (``--address``) the actors are spread over the nodes (``SPREAD``). When a node dies, the tasks
running on its actors are lost: their units (and only those: finished units are on disk, recorded) run again
as retries, once Ray has restarted the actors on the nodes left (the driver waits while an actor is merely
unavailable, and replaces one only once Ray says it is dead for good). ``RUN/events.jsonl`` shows which units
ran on which node, and each unit's record its ``attempts`` and ``node``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from eval.davis import evaluate_ref_davis17
from eval.mevis import MevisSplit, _score_one
from eval.refytvos import RefYTVOS, make_submission_zip
from refstream.bench import PROB_SCALE
from refstream.bench.datasets import load_dataset
from refstream.bench.protocol import APPLIED, apply_protocol, load_protocol
from refstream.errors import ConfigError, RefStreamError
from refstream.options import JobOptions, ModelOptions, SweepOptions, add_option_arguments, options_from_args
from refstream.outputs import atomic_file, write_bytes_atomic, write_text_atomic
from video_pipeline.decode import open_video
from video_pipeline.plan import plan_frames

log = logging.getLogger("refstream.bench")

#: the sweep options a run folder records (its ``run.json`` settings); see refstream.options.SweepOptions
SWEEP_FIELDS = ("placement", "variant", "frames", "stride", "max_frames", "clip_text", "answer", "clip_length", "seed")
SETTINGS = ("dataset", "root", "split", "model", "checkpoint", "placement", "variant", "frames", "stride",
            "max_frames", "clip_text", "answer", "videos", "clip_length", "merge", "protocol", "seed")


# ----------------------------------------------------------------------------------------------- helpers
def combo_name(method: str, budget: int) -> str:
    """A file-safe name for (method spec, budget): ``litelvlm_196``, ``litelvlm-official_81``."""
    return f"{re.sub(r'[^A-Za-z0-9.+-]+', '-', method).strip('-')}_{int(budget)}"


#: how Ref-DAVIS-17 objects become one indexed PNG (see :func:`merge_objects`)
MERGE_RULES = ("first-wins", "highest-probability")


def merge_objects(probs: np.ndarray, obj_ids, rule: str = "first-wins", threshold: float = 0.5) -> np.ndarray:
    """Merge one frame's per-object probabilities into Ref-DAVIS-17 labels.

    Every object is binarised first: foreground where ``p > threshold`` (0.5: ``logit > 0``). Then:

    * ``first-wins`` (VideoGLaMM's evaluation): a pixel takes the id of the first object (in ``obj_ids`` order)
      that is foreground there. The original binarises each mask at ``logit > 0``
      (mbzuai-oryx/VideoGLaMM@6b15b1e ``VideoGLaMM/model/VideoGLaMM.py`` L873), zeroes values below 0.5 (a
      no-op on 0/1 masks) and takes ``torch.argmax`` against a 0.1 background plane, whose ties go to the
      first object (``VideoGLaMM/eval_referdavis_infer.py`` L248-254);
    * ``highest-probability`` (ReferFormer's ``inference_davis.py`` L252-257, wjn922/ReferFormer@06fc218, on
      probabilities): the object with the highest probability among those above the threshold; ties to the
      first.

    Args:
        probs: float [N, ...] per-object probabilities (``sigmoid(logit)``), N >= 0.
        obj_ids: the N object ids (the values written), in the order ties are settled.
        rule: one of :data:`MERGE_RULES`.
        threshold: probability a pixel must exceed to be an object's (0.5 in both originals).

    Returns:
        uint8 [...] labels (uint16 for ids above 255); 0 is background.

    Raises:
        ConfigError: an unknown ``rule``.
    """
    if rule not in MERGE_RULES:
        raise ConfigError(f"unknown merge rule {rule!r}. Fix: use one of {', '.join(MERGE_RULES)}.")
    obj_ids = np.asarray(list(obj_ids))
    dtype = np.uint8 if (obj_ids.size == 0 or obj_ids.max() < 256) else np.uint16
    if probs.shape[0] == 0:
        return np.zeros(probs.shape[1:], dtype)
    foreground = probs > threshold
    if rule == "first-wins":
        best = np.argmax(foreground, axis=0)  # the first True (argmax returns the first maximum)
    else:
        best = np.argmax(np.where(foreground, probs, -1.0), axis=0)
    return np.where(foreground.any(axis=0), obj_ids[best], 0).astype(dtype)


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(type(x).__name__)


def _indexed_png(labels: np.ndarray) -> bytes:
    """An indexed (palette) PNG with the DAVIS palette."""

    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = []
    for i in range(256):  # the DAVIS / PASCAL VOC colour map
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    image.putpalette(palette)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- the sweep
class BenchRun:
    """A sweep in a run folder (see the module docstring). Build it from parsed arguments with
    :meth:`from_args`, then :meth:`run`."""

    def __init__(self, settings: dict, methods: list[str], budgets: list[int], out: str | Path, *,
                 address: str | None = None, workers: int | None = None, retries: int = 1, device: str = "auto",
                 num_gpus: float | None = None, decoder: str = "decord", sam2_pass: str = "run",
                 progress: bool = True, score: bool = True, sam2_chunk: int | None = None,
                 overlap: bool | None = None):

        if not methods:
            raise ConfigError("bench run: pass at least one --method (e.g. --method none --method litelvlm)")
        if not budgets:
            raise ConfigError("bench run: pass --budget B (>= 1) at least once")
        # the one options model validates the sweep's options, and each method and budget as a job would
        speed = {"overlap": overlap, **({"sam2_chunk": sam2_chunk} if sam2_chunk is not None else {})}  # not results
        shared = SweepOptions(**{k: settings[k] for k in SWEEP_FIELDS if settings.get(k) is not None},
                              decoder=decoder, sam2_pass=sam2_pass, **speed)
        for m in methods:
            for b in budgets:
                JobOptions(expressions=["-"], method=m, budget=b, **shared.model_dump(exclude={"sam2_pass"}))
        self.sweep = shared
        self.settings = settings
        self.methods, self.budgets = list(dict.fromkeys(methods)), list(dict.fromkeys(budgets))
        self.combos = {combo_name(m, b): (m, b) for m in self.methods for b in self.budgets}
        self.out = Path(out)
        self.address, self.workers, self.retries = address, workers, retries
        self.device, self.num_gpus, self.decoder, self.sam2_pass = device, num_gpus, decoder, sam2_pass
        self.progress, self.score = progress, score
        self.dataset = load_dataset(settings["dataset"], settings["root"], settings["split"], settings["videos"])
        self.kind = self.dataset.kind
        self.merge_rule = settings.get("merge") or "first-wins"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchRun":
        """From ``refstream bench run`` arguments (sweep and model options parsed by the one options model)."""
        protocol = load_protocol(args.dataset)
        given = {}
        if hasattr(args, "clip_length"):
            given["clip_length"] = args.clip_length or None  # --clip-length 0: the whole video as one clip
        if hasattr(args, "answer"):
            given["answer"] = args.answer
        if hasattr(args, "seed"):
            given["seed"] = args.seed
        if args.merge is not None:
            if protocol.merge is None:
                raise ConfigError(f"--merge is for ref-davis17 (several objects per PNG); {args.dataset} has one "
                                  "object per expression. Fix: leave --merge out.")
            given["merge"] = args.merge
        values, overrides = apply_protocol(protocol, given)
        if overrides:
            def shown(value):
                return "0 (the whole video)" if value is None else value

            changed = ", ".join(f"{flag} {shown(values[field])} (protocol: {shown(getattr(protocol, field))})"
                                for field, flag in APPLIED if field in overrides)
            print(f"WARNING: bench run: {changed} leaves the {protocol.name} protocol "
                  f"(configs/protocols/{args.dataset}.yaml); results are marked off_protocol.", file=sys.stderr)
        shared = options_from_args(SweepOptions, args, clip_length=values["clip_length"], answer=values["answer"],
                                   seed=values["seed"])
        model = options_from_args(ModelOptions, args)
        settings = {
            "dataset": args.dataset, "root": str(Path(args.root).resolve()), "split": args.split,
            "model": model.model, "checkpoint": model.checkpoint, "videos": args.video,
            **{k: getattr(shared, k) for k in SWEEP_FIELDS},
            "merge": values["merge"], "protocol": protocol.record(overrides),
        }
        return cls(settings, args.method or [], args.budget or [], args.out, address=args.address,
                   workers=args.workers, retries=args.retries, device=model.device, num_gpus=args.gpus_per_worker,
                   decoder=shared.decoder, sam2_pass=shared.sam2_pass, progress=not args.quiet,
                   score=not args.no_score, sam2_chunk=shared.sam2_chunk, overlap=shared.overlap)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def status_path(self, combo: str, video: str, exp_id: str) -> Path:
        return self.out / "status" / combo / video / f"{exp_id}.json"

    def _check_settings(self) -> None:
        path = self.out / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            diff = [k for k in SETTINGS if old.get("settings", {}).get(k) != self.settings.get(k)]
            if diff:
                shown = "; ".join(f"{k}: {old['settings'].get(k)!r} there, {self.settings.get(k)!r} now" for k in diff)
                raise ConfigError(f"{self.out} holds a run with other settings ({shown}); use another --out")
            combos = dict(old.get("combos", {}))
            combos.update({k: list(v) for k, v in self.combos.items()})
        else:
            combos = {k: list(v) for k, v in self.combos.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"settings": self.settings, "combos": combos})

    def _done(self, combo: str, video: str, exp_id: str) -> bool:
        path = self.status_path(combo, video, exp_id)
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text()).get("status") == "ok"
        except ValueError as exc:
            log.warning("unreadable unit status %s (%s): the unit runs again", path, exc)
            return False

    def _options(self) -> dict:
        """The :class:`refstream.options.SweepOptions` fields a worker needs (JSON-safe)."""
        return self.sweep.model_dump()

    def _task(self, video: str, units: list[tuple]) -> dict:
        """units: [(Unit, [combo, ...])]"""
        return {
            "video": video, "path": str(self.dataset.video_paths[video]), "kind": self.kind,
            "runs": {c: list(self.combos[c]) for c in dict.fromkeys(c for _, cs in units for c in cs)},
            "units": [{"exp_id": u.exp_id, "text": u.text, "combos": list(cs)} for u, cs in units],
            "options": self._options(), "frames": self.dataset.frames.get(video),
        }

    def pending_tasks(self) -> tuple[list[dict], int, int]:
        """(tasks, pending unit-combos, finished unit-combos skipped)."""
        by_video: dict[str, list] = {}
        pending = skipped = 0
        for unit in self.dataset.units:
            todo = [c for c in self.combos if not self._done(c, unit.video, unit.exp_id)]
            skipped += len(self.combos) - len(todo)
            if todo:
                by_video.setdefault(unit.video, []).append((unit, todo))
                pending += len(todo)
        return [self._task(v, us) for v, us in by_video.items()], pending, skipped

    # -- execution --------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every pending unit, assemble, score, zip; returns the summary (also ``RUN/summary.json``)."""
        started = time.perf_counter()
        self._check_settings()
        tasks, pending, skipped = self.pending_tasks()
        self._say(f"bench run: {self.dataset.name} {self.dataset.split}: {len(self.dataset.units)} units x "
                  f"{len(self.combos)} runs ({', '.join(self.combos)}); {skipped} already done, {pending} to do "
                  f"in {len(tasks)} video task(s)")
        failures: dict[tuple, dict] = {}
        if tasks:
            if self.workers == 0:
                self._execute_local(tasks, pending, failures)
            else:
                self._execute_ray(tasks, pending, failures)
        results = {}
        for combo in self.combos:
            results[combo] = self.finish_combo(combo)
        wall = time.perf_counter() - started
        failed = [f for f in failures.values()]
        summary = {"dataset": self.dataset.name, "split": self.dataset.split, "settings": self.settings,
                   "combos": {c: list(v) for c, v in self.combos.items()}, "results": results,
                   "units": len(self.dataset.units), "skipped": skipped, "ran": pending,
                   "failed": len(failed), "wall_seconds": round(wall, 2)}
        _write_json(self.out / "failures.json", failed)
        _write_json(self.out / "summary.json", summary)
        for f in failed:
            self._say(f"FAILED {f['combo']} {f['video']}/{f['exp_id']} after {f.get('attempts')} attempt(s): {f['error']}")
        self._say(f"bench run: done in {wall:.1f} s; {len(failed)} unit(s) failed; wrote {self.out}")
        return summary

    def _say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    def _record(self, rec: dict, attempts: int, bar) -> None:
        rec = dict(rec, attempts=attempts)
        _write_json(self.status_path(rec["combo"], rec["video"], rec["exp_id"]), rec)
        bar.update(1)

    def _handle(self, task: dict, records: list[dict] | None, error: str | None, attempt: int, queue: list,
                failures: dict, bar) -> None:
        """Write the records of a finished task; requeue failed units alone (until ``retries``)."""
        if records is None:  # the task itself failed (actor died, ...): every unit of it failed
            records = [{"combo": c, "video": task["video"], "exp_id": u["exp_id"], "status": "failed", "error": error}
                       for u in task["units"] for c in u["combos"]]
        retry: dict[str, list[str]] = {}
        for rec in records:
            key = (rec["combo"], rec["video"], rec["exp_id"])
            if rec["status"] == "ok":
                failures.pop(key, None)
                self._record(rec, attempt, bar)
            elif attempt <= self.retries:
                retry.setdefault(rec["exp_id"], []).append(rec["combo"])
                failures[key] = dict(rec, attempts=attempt)
            else:
                failures[key] = dict(rec, attempts=attempt)
                self._record(rec, attempt, bar)
        if retry:
            bar.set_postfix_str(f"retrying {sum(map(len, retry.values()))}")
        for unit in task["units"]:
            if unit["exp_id"] in retry:  # alone in a new task, with only the runs that failed
                queue.append((dict(task, units=[dict(unit, combos=retry[unit["exp_id"]])],
                                   runs={c: task["runs"][c] for c in retry[unit["exp_id"]]}), attempt + 1))

    def _bar(self, total: int):

        return tqdm(total=total, desc="units", unit="unit", disable=not self.progress, file=sys.stderr,
                    smoothing=0.1, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining} ETA, {rate_fmt}]{postfix}")

    def _worker_config(self) -> dict:
        s = self.settings
        return {"model": s["model"], "checkpoint": s["checkpoint"], "device": self.device, "num_gpus": self.num_gpus}

    def _execute_local(self, tasks: list[dict], pending: int, failures: dict) -> None:
        """In this process, without Ray (``--workers 0``)."""
        from refstream.bench.actor import BenchWorker  # lazy: the model stack; the parser and reports need none of it

        worker = BenchWorker(self._worker_config(), str(self.out))
        queue = [(t, 1) for t in tasks]
        with self._bar(pending) as bar:
            while queue:
                task, attempt = queue.pop(0)
                try:
                    records, error = worker.run_video(task), None
                except Exception as exc:  # noqa: BLE001
                    records, error = None, f"{type(exc).__name__}: {exc}"
                self._handle(task, records, error, attempt, queue, failures, bar)

    def _execute_ray(self, tasks: list[dict], pending: int, failures: dict) -> None:
        import ray  # lazy: Ray is loaded only when a sweep runs on it (``--workers 0`` runs in this process)

        started_ray = False
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         object_store_memory=512 * 1024 * 1024)
            started_ray = True
        try:
            config = self._worker_config()
            from refstream.bench.actor import WorkerConfig, make_worker_class  # lazy: as in _execute_local

            cls = make_worker_class(WorkerConfig(**config))
            count = self.workers
            if count is None:  # one per GPU, else one
                count = max(1, int(ray.cluster_resources().get("GPU", 0))) if self.device != "cpu" else 1
            tasks = split_tasks(tasks, count)
            count = max(1, min(count, len(tasks)))
            actors = [cls.remote(config, str(self.out.resolve())) for _ in range(count)]
            health = ray.get([a.health.remote() for a in actors], timeout=600)
            where = {a: h for a, h in zip(actors, health)}  # the last health seen: pid and node of each actor
            self._say(f"bench run: {count} worker(s) ready: " + ", ".join(
                f"pid {h['pid']} on {h['device']}" + (f" (node {h['node'][:8]})" if h.get("node") else "")
                for h in health))
            queue = [(t, 1) for t in tasks]
            running: dict = {}
            idle = list(actors)
            lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError)  # the actor or its node died under the task
            with self._bar(pending) as bar:
                while queue or running:
                    while queue and idle:
                        task, attempt = queue.pop(0)
                        actor = idle.pop(0)
                        running[actor.run_video.remote(task)] = (actor, task, attempt)
                        self._event("start", task, attempt, where.get(actor))
                    done, _ = ray.wait(list(running), num_returns=1)
                    ref = done[0]
                    actor, task, attempt = running.pop(ref)
                    try:
                        records, error = ray.get(ref), None
                        self._event("done", task, attempt, where.get(actor))
                    except lost as exc:  # the actor died (restarting, or gone), or its node did
                        records, error = None, f"worker died: {type(exc).__name__}: {str(exc)[:300]}"
                        self._event("lost", task, attempt, where.get(actor), error=error)
                        actor = self._replace_if_dead(actor, cls, config)
                        where[actor] = self._health(actor) or where.get(actor)
                    except ray.exceptions.RayError as exc:
                        cause = getattr(exc, "cause", None) or exc
                        records, error = None, f"{type(cause).__name__}: {str(cause)[:500]}"
                        self._event("failed", task, attempt, where.get(actor), error=error)
                    idle.append(actor)
                    self._handle(task, records, error, attempt, queue, failures, bar)
            for a in actors:
                ray.kill(a)
        finally:
            if started_ray:
                ray.shutdown()

    def _replace_if_dead(self, actor, cls, config, timeout_s: float = 600.0):
        """Keep an actor Ray is restarting (also on another node, once its own node is found dead); replace
        one that is gone for good (restarts used up).

        ``ActorUnavailableError`` (its node not yet found dead, or the restart under way) and timeouts are
        waited out for up to ``timeout_s`` seconds: a new actor beside the restarted one would hold resources
        the sweep's other actors need.
        """
        import ray  # lazy: see _execute_ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(actor.health.remote(), timeout=max(1.0, min(60.0, deadline - time.monotonic())))
                return actor
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    log.warning("bench worker actor still unavailable after %.0f s (%s); starting a new one",
                                timeout_s, type(exc).__name__)
                    return cls.remote(config, str(self.out.resolve()))
                time.sleep(1.0)
            except ray.exceptions.RayError as exc:
                log.warning("bench worker actor is gone (%s: %s); starting a new one", type(exc).__name__, exc)
                return cls.remote(config, str(self.out.resolve()))

    def _health(self, actor) -> dict | None:
        """The actor's health (pid, node), or None when it does not answer within a minute."""
        import ray  # lazy: see _execute_ray

        try:
            return ray.get(actor.health.remote(), timeout=60)
        except ray.exceptions.RayError:
            return None

    def _event(self, event: str, task: dict, attempt: int, health: dict | None, **fields) -> None:
        """Append one line to ``RUN/events.jsonl``: a task's ``event`` with its units, attempt, actor pid and node."""
        line = {"t": round(time.time(), 3), "event": event, "video": task["video"], "attempt": attempt,
                "units": [[c, u["exp_id"]] for u in task["units"] for c in u["combos"]],
                "pid": (health or {}).get("pid"), "node": (health or {}).get("node"), **fields}
        with open(self.out / "events.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")

    # -- assembling, scoring, zipping -------------------------------------------------------------------
    def _unit_records(self, combo: str) -> list[dict]:
        out = []
        for unit in self.dataset.units:
            path = self.status_path(combo, unit.video, unit.exp_id)
            if path.is_file():
                out.append(json.loads(path.read_text()))
            else:
                out.append({"combo": combo, "video": unit.video, "exp_id": unit.exp_id, "status": "missing"})
        return out

    def finish_combo(self, combo: str) -> dict:
        """Assemble (Ref-DAVIS merge), score where GT exists, zip for the servers; ``RUN/results/<combo>.json``."""
        records = self._unit_records(combo)
        ok = [r for r in records if r["status"] == "ok"]
        bad = [r for r in records if r["status"] != "ok"]
        method, budget = self.combos[combo]
        frames_by_video = {}
        for r in ok:
            frames_by_video[r["video"]] = r["frames"]
        seconds = sum(r.get("seconds", 0.0) for r in ok)
        result = {
            "dataset": self.dataset.name, "split": self.dataset.split, "combo": combo, "method": method,
            "budget": budget, "placement": self.settings["placement"], "model": self.settings["model"],
            "units": len(records), "units_ok": len(ok), "units_failed": len(bad),
            "failed": [f"{r['video']}/{r['exp_id']}: {r.get('error') or r['status']}" for r in bad],
            "visual_tokens": float(np.mean([r["visual_tokens"] for r in ok])) if ok else None,
            "kept_per_frame": ok[0].get("kept_per_frame") if ok else None,
            "frames": int(sum(frames_by_video.values())), "seconds": round(seconds, 3),
            "frames_per_second": round(sum(frames_by_video.values()) / seconds, 3) if seconds > 0 else None,
            "J": None, "F": None, "J&F": None,
            "protocol": self.settings.get("protocol"),
            "answer": self._answer_settings(),
        }
        partial = bool(bad) or self.settings["max_frames"] is not None or self.settings["stride"] != 1
        if self.kind == "merged":
            self._assemble_ref_davis(combo)
        if self.score and self.dataset.has_gt and ok:
            result.update(self._score(combo, missing_as_empty=partial))
            result["scored_partial"] = partial
        if not self.dataset.has_gt and self.dataset.name in ("refytvos", "mevis") and ok:
            result["submission"] = str(self._zip(combo, complete=not partial))
        _write_json(self.out / "results" / f"{combo}.json", result)
        return result

    def _answer_settings(self) -> dict:
        """How the LLM answered: the mode, and for generate / sample the limits and sampling values used."""
        from workers.config import load_model_config

        mode = self.sweep.answer
        answer = {"mode": mode, "seed": self.sweep.seed}
        if mode != "forced":
            config = load_model_config(self.settings["model"], self.settings.get("checkpoint"))
            answer["max_new_tokens"] = config.max_new_tokens
            if mode == "sample":
                answer.update(temperature=config.temperature, top_p=config.top_p)
        return answer

    def _assemble_ref_davis(self, combo: str) -> None:

        groups: dict[tuple[str, str], list] = {}
        for u in self.dataset.units:
            groups.setdefault((u.group, u.video), []).append(u)
        runs = [f"anno_{k}" for k in range(4)]
        for run in runs:
            for video in self.dataset.videos():
                units = [u for u in groups.get((run, video), []) if self._done(combo, video, u.exp_id)]
                probs, ids, frames = [], [], None
                for u in sorted(units, key=lambda u: u.obj_id):
                    with np.load(self.out / "units" / combo / video / f"{u.exp_id}.npz") as z:
                        probs.append(z["probs"])
                        frames = [str(f) for f in z["frames"]]
                    ids.append(u.obj_id)
                if frames is None:
                    frames, size = self._video_frames(video)
                    stacked = np.zeros((0, len(frames), *size), np.float32)
                else:
                    stacked = np.stack(probs).astype(np.float32) / PROB_SCALE
                folder = self.out / "predictions" / combo / run / video
                for t, name in enumerate(frames):
                    labels = merge_objects(stacked[:, t], ids, self.merge_rule)
                    write_bytes_atomic(folder / f"{name}.png", _indexed_png(labels))

    def _video_frames(self, video: str) -> tuple[list[str], tuple[int, int]]:

        s = self.settings
        with open_video(self.dataset.video_paths[video], self.decoder) as src:
            plan = plan_frames(src.num_frames, s["frames"], s["stride"], s["max_frames"])
            return [src.frame_names[i] for i in plan.sam2_indices], (src.height, src.width)

    def _score(self, combo: str, missing_as_empty: bool) -> dict:
        pred = self.out / "predictions" / combo
        if self.dataset.name == "ref-davis17":

            res = evaluate_ref_davis17(self.dataset.root, pred, missing_as_empty=missing_as_empty,
                                       sequences=self.dataset.videos())
            runs = {k: v["J&F"] for k, v in res["runs"].items()}
            # VideoGLaMM's metrics script scores 3 of the 4 annotator runs, each alone (the protocol's runs_scored):
            # their mean is reported beside the mean of all 4
            scored = [k for k in load_protocol("ref-davis17").runs_scored if runs.get(k) is not None]
            return {"J": res["J"]["mean"], "F": res["F"]["mean"], "J&F": res["J&F"], "runs": runs,
                    "runs_scored": scored,
                    "J&F_runs_scored": float(np.mean([runs[k] for k in scored])) if scored else None}

        split = MevisSplit(self.dataset.root)
        per = {}
        for u in self.dataset.units:
            if not (pred / u.video / u.exp_id).is_dir() and not missing_as_empty:
                continue
            key, (j, f) = _score_one(split, pred, u.video, u.exp_id, True)
            per[key] = [j, f]
        if not per:
            return {}
        j = float(np.mean([v[0] for v in per.values()]))
        f = float(np.mean([v[1] for v in per.values()]))
        return {"J": j, "F": f, "J&F": (j + f) / 2, "per_expression": per}

    def _zip(self, combo: str, complete: bool) -> Path:
        pred = self.out / "predictions" / combo
        out = self.out / "submissions" / f"{combo}.zip"
        if self.dataset.name == "refytvos" and complete and set(self.dataset.videos()) >= set(self._all_valid()):

            return make_submission_zip(RefYTVOS(self.dataset.root), pred, out)
        prefix = "Annotations/" if self.dataset.name == "refytvos" else ""
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for u in self.dataset.units:
                folder = pred / u.video / u.exp_id
                for f in sorted(folder.glob("*.png")) if folder.is_dir() else []:
                    zf.write(f, f"{prefix}{u.video}/{u.exp_id}/{f.name}")
        return out

    def _all_valid(self) -> list[str]:
        return RefYTVOS(self.dataset.root).valid_videos()


def split_tasks(tasks: list[dict], workers: int) -> list[dict]:
    """With fewer video tasks than workers, split the biggest task's runs (method x budget) in two until every
    worker has one: each part recomputes the video's shared features (CLIP, InternVideo2: small next to the
    SAM2 passes) but the parts run in parallel."""
    tasks = list(tasks)
    while len(tasks) < workers:
        big = max(range(len(tasks)), key=lambda i: len(tasks[i]["runs"]))
        runs = list(tasks[big]["runs"])
        if len(runs) < 2:
            break
        task = tasks.pop(big)
        for part in (runs[: len(runs) // 2], runs[len(runs) // 2:]):
            units = [dict(u, combos=[c for c in u["combos"] if c in part]) for u in task["units"]]
            tasks.append(dict(task, runs={c: task["runs"][c] for c in part}, units=[u for u in units if u["combos"]]))
    return tasks


# ---------------------------------------------------------------------------------------------- report
def load_results(run: str | Path) -> list[dict]:
    """The per-combo results of a run folder (``results/*.json``), in the run's combo order."""
    run = Path(run)
    files = sorted((run / "results").glob("*.json"))
    if not files:
        raise RefStreamError(f"{run}: no results/*.json (not a finished `refstream bench run` folder)")
    order = list(json.loads((run / "run.json").read_text()).get("combos", {})) if (run / "run.json").is_file() else []
    results = [json.loads(f.read_text()) for f in files]
    results.sort(key=lambda r: order.index(r["combo"]) if r["combo"] in order else len(order))
    return results


def report_rows(results: list[dict]) -> list[dict]:
    """Rows method x budget with J, F, J&F (x100), Rel. = 100 * J&F / J&F of the ``none`` row of the same
    dataset (same budget when there is one, else its largest budget), frames/s and visual tokens."""
    rows = []
    for r in results:
        nones = [x for x in results if x["dataset"] == r["dataset"] and x["method"] == "none" and x.get("J&F") is not None]
        ref = next((x for x in nones if x["budget"] == r["budget"]), None) or max(nones, key=lambda x: x["budget"], default=None)
        jf = r.get("J&F")
        rel = 100.0 * jf / ref["J&F"] if (jf is not None and ref and ref["J&F"]) else None
        pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
        rows.append({"dataset": r["dataset"], "method": r["method"], "budget": r["budget"], "J": pct(r.get("J")),
                     "F": pct(r.get("F")), "J&F": pct(jf), "Rel.": rel, "frames/s": r.get("frames_per_second"),
                     "visual tokens": r.get("visual_tokens"), "units": f"{r['units_ok']}/{r['units']}"})
    return rows


COLUMNS = ("dataset", "method", "budget", "J", "F", "J&F", "Rel.", "frames/s", "visual tokens", "units")


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("J", "F", "J&F", "Rel."):
        return f"{v:.1f}"
    if key == "frames/s":
        return f"{v:.2f}"
    if key == "visual tokens":
        return f"{v:.0f}"
    return str(v)


def report_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if c in ("dataset", "method") else "---:" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r[c] is None else (round(r[c], 4) if isinstance(r[c], float) else r[c]) for c in COLUMNS])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- CLI
def add_bench_run_parsers(bench_subparsers) -> None:
    """Add ``run`` and ``report`` to the ``refstream bench`` subparsers (dispatch with :func:`run_bench_command`)."""
    p = bench_subparsers.add_parser("run", help="a method x budget sweep over Ref-DAVIS-17 / Refer-YouTube-VOS / MeViS on Ray")
    p.add_argument("--dataset", required=True, choices=["ref-davis17", "refytvos", "mevis"])
    p.add_argument("--root", required=True, help="the dataset folder (MeViS: the root holding the split, or the split)")
    p.add_argument("--split", default=None, help="ref-davis17/refytvos: valid; mevis: valid_u (scored here) or valid")
    p.add_argument("--method", action="append", help="repeatable: none, random, litelvlm[:variant], ...")
    p.add_argument("--budget", action="append", type=int, help="repeatable: visual tokens per frame, e.g. 576 196 81")
    p.add_argument("--out", required=True, help="the run folder (rerun the command to resume)")
    p.add_argument("--address", default=None, help="Ray cluster: auto | ray://HOST:10001 (default: a local one)")
    p.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, else 1; 0 = no Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default 1 when the cluster has GPUs, else 0")
    p.add_argument("--video", action="append", help="repeatable: only these videos")
    add_option_arguments(p, SweepOptions)
    p.add_argument("--merge", choices=MERGE_RULES, default=None,
                   help="ref-davis17: how objects are merged into one PNG (default: the protocol's, first-wins)")
    add_option_arguments(p, ModelOptions, only=["model", "checkpoint", "device"])
    p.add_argument("--retries", type=int, default=1, help="times a failed unit is retried before it is reported")
    p.add_argument("--no-score", action="store_true")
    p.add_argument("--quiet", action="store_true")
    r = bench_subparsers.add_parser("report", help="markdown + CSV table of bench runs (method x budget)")
    r.add_argument("runs", nargs="+", metavar="RUN")
    r.add_argument("--markdown", default=None, metavar="FILE", help="default RUN/report.md (first RUN)")
    r.add_argument("--csv", default=None, metavar="FILE", help="default RUN/report.csv (first RUN)")


def run_bench_command(args: argparse.Namespace) -> int:
    """``refstream bench run`` / ``report`` (``args.bench``). Exit code: 0, 1 when units failed, 2 bad input."""
    which = getattr(args, "bench", None)
    if which == "run":
        summary = BenchRun.from_args(args).run()
        print(report_markdown(report_rows(list(summary["results"].values()))))
        print(f"wall time {summary['wall_seconds']:.1f} s; {summary['ran']} unit-runs ran, {summary['skipped']} "
              f"skipped (done), {summary['failed']} failed; {args.out}")
        return 1 if summary["failed"] else 0
    if which == "report":
        results = [r for run in args.runs for r in load_results(run)]
        rows = report_rows(results)
        md, table = report_markdown(rows), report_csv(rows)
        first = Path(args.runs[0])
        write_text_atomic(Path(args.markdown) if args.markdown else first / "report.md", md)
        write_text_atomic(Path(args.csv) if args.csv else first / "report.csv", table)
        print(md)
        return 0
    raise ConfigError(f"unknown bench command {which!r}")


def main(argv=None) -> int:
    """``python -m refstream.bench.runs run|report ...`` (the same as ``refstream bench run|report``)."""
    parser = argparse.ArgumentParser(prog="refstream bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    add_bench_run_parsers(sub)
    args = parser.parse_args(argv)
    try:
        return run_bench_command(args)
    except RefStreamError as exc:
        print(f"refstream: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
