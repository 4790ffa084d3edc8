"""``refstream bench service``: the same jobs through the service and in one process, on the same machine.

Service: a real ``redis-server`` started here on a free loopback port (AOF on), ``serve`` with one Ray
worker actor (given every core: Ray sets the actor's OpenMP/torch threads to its CPUs) and the client
(``submit``, ``wait``, ``result`` into a folder). In-process: one Python process (a subprocess, so its
memory is its own) that loads the model once and calls ``run_to_folder`` for each job. Both write the
same four files per job.

Each mode: load the model, one warm-up job (not counted), one job alone for the **first-mask latency**
(submit or call -> the first frame's mask is known: ``frames_done >= 1`` in Redis for the service;
median of 3), then
``--jobs`` jobs back to back (the service gets them all queued at once) for the **throughput** (jobs/s and
frames/s from the first submit to the last result written; the fastest of ``--rounds`` batches). **Peak memory**: the peak RSS (``VmHWM``) of
each process involved, summed: the in-process run's one process; for the service the driver (client +
supervisor), the worker actor(s), redis-server and Ray's own processes (gcs_server, raylet, ...).

Target (RefStream issue "The service"): service throughput >= 0.85x in-process with one worker.

Run: ``refstream bench service [--jobs 8] [--max-frames 16] [--json FILE]`` or ``python -m refstream.bench.service``.

``refstream`` imports this module to build its parser, so Ray, Redis, torch, the pipeline and the service
modules are imported inside the functions that run the benchmark (each such import says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from refstream.bench import cpu_name
from refstream.service.heartbeat import heartbeats

TARGET = 0.85
LATENCY_REPEATS = 3  # first-mask latency: median of this many single jobs on an idle system
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the bundled data of a repository checkout
DEFAULT_VIDEO = EXAMPLES / "ref-davis17-mini" / "DAVIS" / "JPEGImages" / "480p" / "blackswan"
log = logging.getLogger("refstream.bench")


# ---------------------------------------------------------------------------------------------- helpers
def _proc_status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field in bytes (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError) as exc:
        log.debug("no %s of process %d (%s): counted as 0", field, pid, exc)
    return 0


def _descendants(root: int) -> list[int]:
    """Every process under ``root`` (from ``/proc``; processes that end meanwhile are left out)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError) as exc:
                log.debug("process %s left out (%s)", entry.name, exc)
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError as exc:
        log.debug("no name of process %d (%s)", pid, exc)
        return "?"


def _environment(device: str) -> dict:
    """Hardware and versions for the report."""
    import ray  # lazy: see the module docstring
    import redis
    import torch

    exe = shutil.which("redis-server")
    server = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()[2] if exe else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "ray": ray.__version__, "redis-py": redis.__version__,
            "redis-server": (server or "").removeprefix("v=") or None, "device": device}


class _Redis:
    """A redis-server on a free loopback port in a temporary folder (AOF on, no RDB snapshots)."""

    def __init__(self, folder: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes",
             "--save", "", "--protected-mode", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis  # lazy: see the module docstring

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                break
            except redis.exceptions.ConnectionError as exc:
                log.debug("redis-server not answering yet (%s)", exc)
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- in-process
def run_inprocess(spec: dict) -> dict:
    """The in-process side (meant to run in its own process): model once, ``run_to_folder`` per job."""
    from refstream.api import load  # lazy: see the module docstring
    from refstream.options import JobOptions
    from refstream.pipeline import run_to_folder

    def options() -> JobOptions:
        return JobOptions(expressions=list(spec["expressions"]), budget=spec["budget"], max_frames=spec["max_frames"])

    out = Path(spec["out"])
    segmenter = load(spec["model"], checkpoint=spec.get("checkpoint"), device=spec["device"])
    load_s = segmenter.load_seconds
    pipeline = segmenter.pipeline
    run_to_folder(spec["video"], options(), out / "warmup", progress=False, pipeline=pipeline)
    latencies = []
    for i in range(LATENCY_REPEATS):
        first: dict[str, float] = {}
        t0 = time.perf_counter()
        summary = run_to_folder(spec["video"], options(), out / f"latency{i}", progress=False, pipeline=pipeline,
                                on_frames=lambda *_: first.setdefault("t", time.perf_counter()))
        latencies.append(first["t"] - t0)
    first_mask_s = statistics.median(latencies)
    walls = []
    for r in range(spec["rounds"]):
        frames = 0
        t0 = time.perf_counter()
        for i in range(spec["jobs"]):
            frames += run_to_folder(spec["video"], options(), out / f"r{r}job{i}", progress=False,
                                    pipeline=pipeline)["frames"]
        walls.append(time.perf_counter() - t0)
    return {"load_s": load_s, "first_mask_s": first_mask_s, "wall_s": min(walls), "walls_s": walls, "frames": frames,
            "frames_per_job": summary["frames"], "peak_rss": {"process": _proc_status(os.getpid(), "VmHWM")}}


def _inprocess_subprocess(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "refstream.bench.service", "--inprocess-spec", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- service
def _wait_heartbeats(url: str, names: list[str], timeout: float, serve=None) -> list[dict]:
    """The actors' Redis heartbeats, once every one of ``names`` has loaded its model and beats.

    Raises:
        TimeoutError: not every actor beats after ``timeout`` seconds, or the ``serve`` process (a
            ``subprocess.Popen``, optional) exited first (its exit code in the message).
    """
    from refstream.service.queue import connect  # lazy: see the module docstring

    client = connect(url)
    deadline = time.monotonic() + timeout
    while missing := [n for n in names if n not in (beats := heartbeats(client))]:
        if serve is not None and serve.poll() is not None:
            raise TimeoutError(f"serve exited with {serve.returncode} before its actors beat ({', '.join(missing)})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"actors not ready after {timeout} s: {', '.join(missing)}")
        time.sleep(0.1)
    return [beats[n] for n in names]


def run_service(spec: dict, workers: int = 1) -> dict:
    """The service side, driven from this process: redis-server, ``serve`` (Ray) in a thread, the client.

    Returns:
        ``load_s`` (start to every actor beating), ``first_mask_s``, ``wall_s`` (best round), ``walls_s``,
        ``frames`` (of the last round), ``peak_rss`` (bytes by process group), ``stage_seconds_job0`` and
        ``worker_threads`` (torch threads per actor).
    """
    import ray  # lazy: see the module docstring

    from refstream.service.client import RefStreamClient

    out = Path(spec["out"])
    redis_server = _Redis(out)
    stop = threading.Event()
    thread = None
    try:
        started = time.perf_counter()
        actors: list = []
        thread = _start_serve(spec, redis_server.url, workers, stop, actors.append)
        while not actors:
            time.sleep(0.01)
        health = _wait_heartbeats(redis_server.url, _actor_names(spec, workers), 600)  # once the models loaded
        startup_s = time.perf_counter() - started
        jobs = _ServiceJobs(RefStreamClient(redis_server.url), spec, out)
        jobs.finish(jobs.submit(), "svc-warmup")
        first_mask_s = _service_first_mask(jobs)
        walls, frames, last = _service_throughput(jobs, spec["rounds"], spec["jobs"])
        seconds = [jobs.client.status(j)["stages"] for j in last]
        return {"load_s": startup_s, "first_mask_s": first_mask_s, "wall_s": min(walls), "walls_s": walls,
                "frames": frames, "peak_rss": _service_peak_rss({h["pid"] for h in health}, redis_server.proc.pid),
                "stage_seconds_job0": seconds[0] if seconds else {},
                "worker_threads": sorted(h.get("threads", 0) for h in health)}
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=120)
        if ray.is_initialized():
            ray.shutdown()
        redis_server.stop()


def _start_serve(spec: dict, redis_url: str, workers: int, stop: threading.Event, on_start) -> threading.Thread:
    """Start Ray (every core) and ``serve`` in a daemon thread; ``on_start`` gets its actors (or pools)."""
    import ray  # lazy: see the module docstring

    from refstream.service.serve import serve

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    num_cpus = spec.get("threads") or (cores / workers if spec["pipeline"] == "whole" else None)
    thread = threading.Thread(target=serve, args=(redis_url,), daemon=True, kwargs=dict(
        workers=workers, model=spec["model"], checkpoint=spec.get("checkpoint"), device=spec["device"],
        allowed_roots=[str(Path(spec["video"]).resolve().parent)], num_cpus=num_cpus,
        num_gpus=1.0 if spec["device"] == "cuda" else 0.0, stop_event=stop, on_start=on_start,
        pipeline=spec["pipeline"], jobs_in_flight=spec.get("jobs_in_flight")))
    thread.start()
    return thread


def _actor_names(spec: dict, workers: int) -> list[str]:
    """The heartbeat names of the actors ``serve`` starts (pools: one encoder and one decoder too)."""
    names = [f"worker-{i}" for i in range(workers)]
    return names + (["encoder-0", "decoder-0"] if spec["pipeline"] == "pools" else [])


class _ServiceJobs:
    """The benchmark's jobs through the service client: submit one, wait for it and write its files."""

    def __init__(self, client, spec: dict, out: Path):
        self.client, self.spec, self.out = client, spec, out

    def submit(self) -> str:
        """Queue one job of the benchmark; returns its id."""
        return self.client.submit(self.spec["video"], list(self.spec["expressions"]),
                                  max_frames=self.spec["max_frames"], budget=self.spec["budget"])

    def finish(self, job: str, folder: str, poll_s: float = 0.2) -> int:
        """Wait for ``job``, write its files into ``out/folder``; returns its frames.

        The client's default poll (0.2 s): the jobs are all queued, so only the last one's detection waits on
        it, and faster polling would steal CPU from the worker on a small machine.

        Raises:
            RuntimeError: the job did not end ``done``.
        """
        status = self.client.queue.wait(job, timeout_s=self.spec["timeout"], poll_s=poll_s)
        if status["state"] != "done":
            raise RuntimeError(f"service job {job} {status['state']}: {status['error']}")
        self.client.result(job, self.out / folder)
        return status["frames_done"]


def _service_first_mask(jobs: _ServiceJobs) -> float:
    """Median seconds from submit to ``frames_done >= 1`` in Redis, of :data:`LATENCY_REPEATS` jobs alone."""
    latencies = []
    for i in range(LATENCY_REPEATS):
        t0 = time.perf_counter()
        job = jobs.submit()
        while (status := jobs.client.status(job))["frames_done"] < 1:
            if status["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"service job {job} {status['state']}: {status['error']}")
            time.sleep(0.005)
        latencies.append(time.perf_counter() - t0)
        jobs.finish(job, f"svc-latency{i}", poll_s=0.01)
    return statistics.median(latencies)


def _service_throughput(jobs: _ServiceJobs, rounds: int, count: int) -> tuple[list[float], int, list[str]]:
    """``rounds`` batches of ``count`` jobs queued at once; returns the wall seconds of each batch, the frames of
    the last one and its job ids."""
    walls, frames, ids = [], 0, []
    for r in range(rounds):
        t0 = time.perf_counter()
        ids = [jobs.submit() for _ in range(count)]
        frames = sum(jobs.finish(j, f"svc-r{r}job{i}") for i, j in enumerate(ids))
        walls.append(time.perf_counter() - t0)
    return walls, frames, ids


def _service_peak_rss(worker_pids: set[int], redis_pid: int) -> dict[str, int]:
    """Peak RSS (``VmHWM``, bytes) of the driver, the worker actors, redis-server and Ray's own processes."""
    peak = {"driver": _proc_status(os.getpid(), "VmHWM"), "workers": 0, "redis-server": 0, "ray": 0}
    below = _descendants(os.getpid())
    for pid in below:
        hwm = _proc_status(pid, "VmHWM")
        if pid in worker_pids:
            peak["workers"] += hwm
        elif pid == redis_pid:
            peak["redis-server"] += hwm
        else:
            peak["ray"] += hwm
    for pid in worker_pids - set(below):  # actor not under this process tree
        peak["workers"] += _proc_status(pid, "VmHWM")
    return peak


# ---------------------------------------------------------------------------------------------- report
def run_benchmark(jobs: int = 8, max_frames: int | None = 16, video: str | None = None, model: str = "tiny",
                  checkpoint: str | None = None, device: str = "cpu", expressions=("the black swan",),
                  budget: int = 196, workers: int = 1, timeout: float = 1800, rounds: int = 3,
                  pipeline: str = "pools", jobs_in_flight: int | None = None, threads: int | None = None) -> dict:
    """Both modes on the same jobs; returns the report (see :func:`format_table`)."""
    video = str(Path(video or DEFAULT_VIDEO).resolve())
    if not Path(video).exists():
        raise FileNotFoundError(f"{video}: no such video (pass --video)")
    with tempfile.TemporaryDirectory(prefix="refstream-bench-service-") as tmp:
        spec = {"video": video, "expressions": list(expressions), "model": model, "checkpoint": checkpoint,
                "device": device, "budget": budget, "max_frames": max_frames, "jobs": jobs, "timeout": timeout,
                "rounds": rounds, "pipeline": pipeline, "jobs_in_flight": jobs_in_flight, "threads": threads}
        (Path(tmp) / "inproc").mkdir()
        (Path(tmp) / "service").mkdir()
        inproc = _inprocess_subprocess({**spec, "out": str(Path(tmp) / "inproc")}, timeout)
        service = run_service({**spec, "out": str(Path(tmp) / "service")}, workers=workers)
    for side in (inproc, service):
        side["jobs_per_s"] = jobs / side["wall_s"]
        side["frames_per_s"] = side["frames"] / side["wall_s"]
        side["peak_rss_total"] = sum(side["peak_rss"].values())
    ratio = service["jobs_per_s"] / inproc["jobs_per_s"]
    return {"environment": _environment(device), "jobs": jobs, "frames_per_job": inproc["frames_per_job"],
            "video": video, "model": model, "budget": budget, "workers": workers, "rounds": rounds,
            "pipeline": pipeline, "jobs_in_flight": jobs_in_flight,
            "in_process": inproc,
            "service": service, "ratio": ratio, "target": TARGET, "meets_target": ratio >= TARGET}


def format_table(report: dict) -> str:
    env, a, b = report["environment"], report["in_process"], report["service"]
    mib = 1024 * 1024
    rows = [
        ("throughput, jobs/s", f"{a['jobs_per_s']:.3f}", f"{b['jobs_per_s']:.3f}", f"{report['ratio']:.3f}x"),
        ("throughput, frames/s", f"{a['frames_per_s']:.2f}", f"{b['frames_per_s']:.2f}",
         f"{b['frames_per_s'] / a['frames_per_s']:.3f}x"),
        (f"wall time of {report['jobs']} jobs, s (best of {report['rounds']})", f"{a['wall_s']:.2f}",
         f"{b['wall_s']:.2f}", ""),
        ("first-mask latency, s", f"{a['first_mask_s']:.3f}", f"{b['first_mask_s']:.3f}",
         f"+{b['first_mask_s'] - a['first_mask_s']:.3f} s"),
        ("startup (model load; + Ray), s", f"{a['load_s']:.2f}", f"{b['load_s']:.2f}", ""),
        ("peak RSS, sum of processes, MiB", f"{a['peak_rss_total'] / mib:.0f}", f"{b['peak_rss_total'] / mib:.0f}", ""),
    ]
    for part, value in b["peak_rss"].items():
        rows.append((f"  service: {part}", "", f"{value / mib:.0f}", ""))
    head = ("", "in-process", f"service ({report['workers']} worker, {report.get('pipeline', 'whole')})",
            "service / in-process")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = [
        f"refstream bench service: {report['jobs']} jobs x {report['frames_per_job']} frames of "
        f"{Path(report['video']).name}, model {report['model']}, budget {report['budget']}, {env['device']}",
        f"hardware: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; {env['platform']}",
        f"versions: python {env['python']}, torch {env['torch']} ({env['torch_threads']} threads), ray {env['ray']}, "
        f"redis-py {env['redis-py']}, redis-server {env['redis-server']}; "
        f"torch threads per actor: {b.get('worker_threads')}",
        "",
        "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(head, widths))),
    ]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    verdict = "meets" if report["meets_target"] else "MISSES"
    lines += ["", f"target: service throughput >= {report['target']:.2f}x in-process with one worker: "
              f"{report['ratio']:.3f}x ({verdict})"]
    return "\n".join(lines)


def _arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--jobs", type=int, default=8, help="jobs per mode (default 8)")
    b.add_argument("--max-frames", type=int, default=16, help="frames segmented per job (default 16; 0 = all)")
    b.add_argument("--video", default=None, help="video file or frame folder (default: Ref-DAVIS-17 blackswan)")
    b.add_argument("--expression", "-e", action="append", default=None, metavar="TEXT")
    b.add_argument("--model", default="tiny")
    b.add_argument("--checkpoint", default=None)
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--budget", type=int, default=196)
    b.add_argument("--workers", type=int, default=1, help="service worker actors (default 1)")
    b.add_argument("--pipeline", default="pools", choices=["pools", "whole"], help="serve's pipeline (default pools)")
    b.add_argument("--jobs-in-flight", type=int, default=None, help="serve --jobs-in-flight (pools)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch threads per service actor (default: this machine's cores / --workers)")
    b.add_argument("--timeout", type=float, default=1800, help="seconds per job wait (default 1800)")
    b.add_argument("--rounds", type=int, default=3,
                   help="timed batches per mode, the fastest kept (default 3; guards against other load)")
    b.add_argument("--json", default=None, metavar="FILE")


def add_bench_service_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``service`` to the ``refstream bench`` subcommands."""
    b = bench_subparsers.add_parser("service", help="jobs through the service (Redis + Ray worker) vs one process")
    _arguments(b)
    return b


def main_bench_service(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table (and write ``--json``). Exit code 0 (the table says the verdict)."""
    report = run_benchmark(jobs=args.jobs, max_frames=args.max_frames or None, video=args.video, model=args.model,
                           checkpoint=args.checkpoint, device=args.device,
                           expressions=args.expression or ["the black swan"], budget=args.budget,
                           workers=args.workers, timeout=args.timeout, rounds=args.rounds, pipeline=args.pipeline,
                           jobs_in_flight=args.jobs_in_flight, threads=args.threads)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refstream.bench.service", description=__doc__.split("\n")[0])
    _arguments(parser)
    parser.add_argument("--inprocess-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inprocess_spec:
        print(json.dumps(run_inprocess(json.loads(args.inprocess_spec))))
        return 0
    return main_bench_service(args)


if __name__ == "__main__":
    sys.exit(main())
