"""``refstream bench soak``: many short jobs from several client processes through ``serve --pipeline pools``,
then PASS/FAIL on what a long-running service must keep: nothing lost or run twice, flat memory, flat
throughput, nothing left behind.

Setup: a ``redis-server`` started here on a free loopback port (AOF on; or ``--redis-url``, a Redis used by
nothing else), one ``refstream serve`` subprocess (pools, tiny model by default, ``--result-ttl-s`` short so that
results expire during the run, and every job limit set, so that the submit-time probe and the worker's check run
on every job), and ``--clients`` client OS processes. Each client keeps ``--window`` jobs in flight: submit, wait,
fetch the result into a folder, check that ``masks.json`` is its own job's (its expression, its frame count),
delete the folder; ``--jobs`` jobs in all (each a few frames of the bundled blackswan clip, about 0.2-1 s).
``serve`` and the clients run with ``TMPDIR`` in a folder of their own, so that what they leave there is seen;
the third-party folders kept on purpose go elsewhere and are reported apart: Ray's session logs
(``RAY_TMPDIR``) and torch's compile cache (``TORCHINDUCTOR_CACHE_DIR``, created empty when ``torch._dynamo`` is
imported).

Measured (the job count is the service's ``done`` counter in Redis, polled every 0.1 s):

* submitted / finished (the client got its own result) / lost / duplicated (completions counted by the queue
  beyond one per job) and deliveries per job;
* RSS (``VmRSS``) of every process: ``serve``, each process under it (Ray's gcs_server, raylet and agents, the
  decode / encoder / VideoGLaMM actors), redis-server and the clients, after job 50 and after the last job,
  with the change split into private pages (``RssAnon``) and shared ones (``RssShmem``: for Ray's processes
  the pages of the object store they have touched, bounded by its size);
* Redis ``used_memory`` before the first job, after jobs 50, ``jobs // 2`` and the last, and once the TTL has
  expired after the last one; the job and dead-letter stream lengths;
* throughput (jobs/s) of the first 100 jobs and of the last 100 (between their completions);
* after ``serve`` is stopped (SIGTERM): files left in its and the clients' temporary folders, and processes
  left that were seen under ``serve``.

Criteria (issue 13, "Soak"): 0 lost, 0 duplicated; every process's RSS after the last job at most 10% above
its RSS after job 50; Redis memory bounded (after the last job at most 10% + 1 MiB above mid-run, the job stream
trimmed to at most :data:`MAX_STREAM` entries, and with a TTL every job record and result gone after it, memory
back within 1 MiB of where it started); throughput of the last 100 at least 90% of the first 100; no temp files
or processes left. The exit code is 1 when one fails.

Run: ``refstream bench soak [--jobs 500] [--clients 4] [--json FILE]`` or ``python -m refstream.bench.soak``.
Heavy imports (Ray, torch, Redis) are inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from refstream.bench.service import DEFAULT_VIDEO, _descendants, _environment, _Redis, _wait_heartbeats

log = logging.getLogger("refstream.bench")
REPO = Path(__file__).resolve().parents[2]
RSS_GROWTH = 0.10  # RSS after the last job at most this much above after job 50
THROUGHPUT_DROP = 0.10  # last-100 throughput at least (1 - this) of the first 100
MEMORY_SLACK = 1024 * 1024  # Redis used_memory: allocator noise allowed on top of the bounds, bytes
MAX_STREAM = 50  # job stream entries allowed after the last job (trimmed: only the jobs still needed)
FIRST_SAMPLE = 50  # the RSS baseline is taken after this many jobs
WINDOW_JOBS = 100  # throughput windows: the first and the last this many jobs


# ---------------------------------------------------------------------------------------------- processes
def _memory(pid: int) -> dict[str, int]:
    """``VmRSS`` of ``pid`` and its parts, bytes: ``rss``, ``anon`` (private: heap, stacks), ``shmem`` (shared
    memory pages it has touched, e.g. Ray's object store) and ``file`` (mapped files); empty when it is gone
    (``/proc/PID/status``, man 5 proc)."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssShmem:": "shmem", "RssFile:": "file"}
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in fields:
                out[fields[key]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as exc:
        log.debug("no RSS of process %d (%s)", pid, exc)
        return {}
    return out if out.get("rss") else {}


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, ``/proc/PID/stat`` field 22); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _label(pid: int) -> str:
    """A short name of a process: Ray actors by class (``ray::DecodeActor``), others by program or script."""
    try:
        argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    scripts = [a for a in argv[1:4] if a.endswith(".py")]
    return Path(scripts[0]).name if scripts else Path(argv[0]).name


class Processes:
    """The soak's processes: ``serve`` and everything under it, redis-server (when started here), the clients."""

    def __init__(self):
        self.named: dict[int, str] = {}  # pid -> role for the processes started here
        self.serve_pid: int | None = None
        self.seen: dict[int, tuple[str | None, str]] = {}  # every pid seen under serve -> (start time, label)

    def tree(self) -> list[int]:
        """``serve`` and its descendants now (remembered, for the leftover check)."""
        if self.serve_pid is None:
            return []
        pids = [self.serve_pid, *_descendants(self.serve_pid)]
        for pid in pids:
            if pid not in self.seen and (start := _start_time(pid)) is not None:
                self.seen[pid] = (start, _label(pid))
        return pids

    def sample(self) -> dict[str, dict]:
        """``{key: {"pid", "name", "rss"}}`` of every process now; key = ``name:pid``."""
        out = {}
        pids = {pid: ("serve" if pid == self.serve_pid else None) for pid in self.tree()}
        pids.update(self.named)
        for pid, role in pids.items():
            memory = _memory(pid)
            if memory:
                name = role or _label(pid)
                out[f"{name}:{pid}"] = {"pid": pid, "name": name, **memory}
        return out

    def left(self) -> list[dict]:
        """Processes seen under ``serve`` that still run (the same pid and start time)."""
        return [{"pid": pid, "name": label} for pid, (start, label) in self.seen.items()
                if start is not None and _start_time(pid) == start]

    def kill_left(self) -> None:
        """SIGKILL what :meth:`left` finds (only those very processes)."""
        for proc in self.left():
            try:
                os.kill(proc["pid"], signal.SIGKILL)
            except OSError as exc:
                log.debug("process %d already gone (%s)", proc["pid"], exc)


def _files_under(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (relative paths, sorted)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------- client
def run_client(spec: dict) -> dict:
    """One client process: ``spec["jobs"]`` jobs with ``spec["window"]`` in flight; whichever ends first is
    handled first (its status polled every 0.1 s): its result fetched, checked to be its own job's, then deleted.
    Prints nothing; returns the report (the caller prints it).

    Before submitting it creates ``ready-{client}`` in ``spec["gate"]``'s folder and waits for the gate file;
    after its last result it creates ``finished-{client}`` and waits for ``exit`` there (so its RSS can be read
    after the last job).
    """
    from refstream.service.client import RefStreamClient  # lazy: see the module docstring

    gate = Path(spec["gate"])
    client = RefStreamClient(spec["redis_url"])
    client.queue.r.ping()
    (gate.parent / f"ready-{spec['client']}").touch()
    while not gate.exists():
        time.sleep(0.01)
    out = Path(spec["out"])
    report = {"client": spec["client"], "pid": os.getpid(), "jobs": {}, "bad": {}, "deliveries": {}}
    flying: dict[str, str] = {}  # job id -> expression
    n = 0
    deadline = time.monotonic() + spec["timeout"]
    while n < spec["jobs"] or flying:
        while n < spec["jobs"] and len(flying) < spec["window"]:
            expression = f"the black swan {spec['client']}-{n}"
            job = client.submit(spec["video"], [expression], max_frames=spec["max_frames"], budget=spec["budget"])
            report["jobs"][job] = expression
            flying[job] = expression
            n += 1
        ended = _ended(client, list(flying))  # whichever of its jobs ended first, handled at once
        if not ended:
            if time.monotonic() > deadline:
                report["bad"].update({job: "timed out" for job in flying})
                break
            time.sleep(0.1)
            continue
        for job, status in ended.items():
            report["deliveries"][job] = status.get("deliveries", 0)
            problem = _finish(client, job, flying.pop(job), status, spec, out / job)
            if problem:
                report["bad"][job] = problem
    if out.exists():
        out.rmdir()  # empty unless a job's folder was left behind (then OSError: the soak fails loudly)
    (gate.parent / f"finished-{spec['client']}").touch()
    while not (gate.parent / "exit").exists():
        time.sleep(0.05)
    return report


def _ended(client, jobs: list[str]) -> dict[str, dict]:
    """The statuses of those of ``jobs`` that ended (or whose record is gone: ``{"state": "expired"}``)."""
    from refstream.service.queue import JobNotFound  # lazy: see the module docstring

    ended = {}
    for job in jobs:
        try:
            status = client.status(job)
        except JobNotFound as exc:
            status = {"state": "expired", "error": str(exc)}
        if status["state"] in ("done", "failed", "cancelled", "expired"):
            ended[job] = status
    return ended


def _finish(client, job: str, expression: str, status: dict, spec: dict, folder: Path) -> str | None:
    """Write an ended job's files, check them, delete them; returns what was wrong (None: nothing)."""
    try:
        if status["state"] != "done":
            return f"{status['state']}: {status['error']}"
        client.result(job, folder)
        masks = json.loads((folder / "masks.json").read_text())
        objects = masks["objects"]
        if [o["expression"] for o in objects] != [expression]:
            return f"someone else's result: {[o['expression'] for o in objects]}"
        if len(masks["frames"]) != spec["max_frames"] or len(objects[0]["masks"]) != spec["max_frames"]:
            return f"{len(masks['frames'])} frames, expected {spec['max_frames']}"
        return None
    except Exception as exc:  # noqa: BLE001 - reported as this job's problem, the client goes on
        return f"{exc.__class__.__name__}: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- driver
class _Monitor(threading.Thread):
    """Polls the queue's ``done`` / ``failed`` counters every 0.1 s: the time each job count was reached, and
    ``on_count(n)`` once per count reached (to take the samples)."""

    def __init__(self, redis_client, prefix: str = "refstream"):
        super().__init__(daemon=True, name="soak-monitor")
        from refstream.service.metrics import metrics_key  # lazy: see the module docstring

        self.r, self.key = redis_client, metrics_key(prefix)
        self.times: list[float] = []  # times[k - 1]: when k jobs were done
        self.failed = 0
        self.stop = threading.Event()
        self.watchers: list = []  # (count, callback), called once from this thread
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(0.1):
                done, failed = self.r.hmget(self.key, "job|done|count", "job|failed|count")
                now = time.perf_counter()
                done, self.failed = int(done or 0), int(failed or 0)
                while len(self.times) < done:
                    self.times.append(now)
                for item in list(self.watchers):
                    if done >= item[0]:
                        self.watchers.remove(item)
                        item[1]()
        except BaseException as exc:  # noqa: BLE001 - reported by the driver
            self.error = exc


def _redis_sample(r, stream: str, dead: str, prefix: str = "refstream") -> dict:
    """Redis ``used_memory``, its key count, the job records / results alive and the two stream lengths."""
    info = r.info("memory")
    jobs = sum(1 for _ in r.scan_iter(match=f"{prefix}:job:*", count=1000))
    results = sum(1 for _ in r.scan_iter(match=f"{prefix}:result:*", count=1000))
    return {"used_memory": int(info["used_memory"]), "keys": int(r.dbsize()), "job_records": jobs,
            "results": results, "stream": int(r.xlen(stream)), "dead": int(r.xlen(dead)),
            "time": time.perf_counter()}


def _split(jobs: int, clients: int) -> list[int]:
    return [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]


def first_sample_for(jobs: int) -> int:
    """The job after which the RSS baseline is taken: :data:`FIRST_SAMPLE` (50, the issue's) from 250 jobs on,
    else a fifth of the jobs (at least 1)."""
    return min(FIRST_SAMPLE, max(1, jobs // 5))


def run_soak(jobs: int = 500, clients: int = 4, window: int = 2, max_frames: int = 4, video: str | None = None,
             model: str = "tiny", budget: int = 81, result_ttl_s: int = 20, redis_url: str | None = None,
             timeout: float = 3600, wait_ttl: bool = True, jobs_in_flight: int | None = None) -> dict:
    """Run the soak; returns the report (see :func:`format_table` and :func:`verdicts`).

    Args:
        jobs: jobs in all (at least :data:`WINDOW_JOBS`` + ``FIRST_SAMPLE`` for the full criteria; fewer
            shrink the windows to a fifth of the jobs each, and the first sample to a fifth: job 50, the issue's
            baseline, from 250 jobs on. Earlier than that Ray's raylet is still settling: in a 250-job run
            sampled from job 25 it gained +1.4 MiB private memory, in 500-job runs from job 50 +0.3 to +0.6).
        clients: client processes; window: jobs each keeps in flight.
        max_frames: frames per job (of ``video``, default the bundled blackswan folder).
        model: ``serve --model`` (preset or YAML); budget: tokens kept per job.
        result_ttl_s: ``serve --result-ttl-s`` (short, so that results expire during the run).
        redis_url: a Redis used by nothing else (None: start a redis-server here).
        timeout: seconds for the whole run (and each job's wait).
        wait_ttl: after the last job, wait for the TTL and sample Redis once more.
        jobs_in_flight: ``serve --jobs-in-flight`` (None: serve's default).

    Raises:
        FileNotFoundError: no such video; RuntimeError: serve or a client failed (its log's tail is quoted);
        TimeoutError: the run took longer than ``timeout``.
    """
    from refstream.service.queue import JobQueue, connect  # lazy: see the module docstring

    video = str(Path(video or DEFAULT_VIDEO).resolve())
    if not Path(video).exists():
        raise FileNotFoundError(f"{video}: no such video (pass --video)")
    first_sample = first_sample_for(jobs)
    window_jobs = min(WINDOW_JOBS, max(2, jobs // 5))
    root = Path(tempfile.mkdtemp(prefix="rs-soak-"))  # short: Ray's socket paths live under it
    tmp, ray_tmp, out, logs, gate = (root / "t", root / "ray", root / "out", root / "logs", root / "gate" / "go")
    cache = root / "torchinductor"  # torch creates its (empty) compile cache folder when torch._dynamo is imported
    for folder in (tmp, ray_tmp, out, logs, gate.parent):
        folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=str(tmp), RAY_TMPDIR=str(ray_tmp), TORCHINDUCTOR_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    procs = Processes()
    (root / "redis").mkdir()
    redis_server = _Redis(root / "redis") if redis_url is None else None
    if redis_server is not None:
        procs.named[redis_server.proc.pid] = "redis-server"
    url = redis_url or redis_server.url
    serve = None
    client_procs: list[subprocess.Popen] = []
    started = time.perf_counter()
    limits = {"max_frames_per_job": 64, "max_pixels_per_frame": 7680 * 4320, "max_expressions": 4,
              "max_expression_chars": 200}
    try:
        queue = JobQueue(connect(url))
        baseline = _redis_sample(queue.r, queue.stream, queue.dead)
        serve_cmd = [sys.executable, "-m", "refstream.cli", "serve", "--redis-url", url, "--pipeline", "pools",
                     "--model", model, "--device", "cpu", "--workers", "1", "--allowed-root",
                     str(Path(video).parent), "--metrics-port", "0", "--log-level", "WARNING",
                     "--result-ttl-s", str(result_ttl_s),
                     *[a for name, value in limits.items() for a in ("--" + name.replace("_", "-"), str(value))]]
        if jobs_in_flight:
            serve_cmd += ["--jobs-in-flight", str(jobs_in_flight)]
        with open(logs / "serve.log", "wb") as serve_log:
            serve = subprocess.Popen(serve_cmd, stdout=serve_log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        procs.serve_pid = serve.pid
        try:
            _wait_heartbeats(url, ["worker-0", "encoder-0", "decoder-0"], min(600.0, timeout), serve)
        except TimeoutError as exc:
            raise RuntimeError(f"serve did not start: {exc}\n{_tail(logs / 'serve.log')}") from None
        startup_s = time.perf_counter() - started
        published = queue.r.hgetall(queue.limits_key)

        shares = _split(jobs, clients)
        for i, n in enumerate(shares):
            spec = {"client": i, "jobs": n, "window": window, "redis_url": url, "video": video,
                    "max_frames": max_frames, "budget": budget, "gate": str(gate), "out": str(out / f"c{i}"),
                    "timeout": timeout}
            with open(logs / f"client{i}.log", "wb") as err:
                client_procs.append(subprocess.Popen(
                    [sys.executable, "-m", "refstream.bench.soak", "--client-spec", json.dumps(spec)],
                    stdout=subprocess.PIPE, stderr=err, env=env))
            procs.named[client_procs[-1].pid] = f"client-{i}"
        _until(lambda: all((gate.parent / f"ready-{i}").exists() for i in range(clients)), 120,
               "the clients to connect", client_procs, logs)

        samples: dict[str, dict] = {"redis": {"before": baseline}}
        monitor = _Monitor(queue.r)
        mid = max(first_sample + 1, jobs // 2)

        def take(name: str, rss: bool) -> None:
            samples["redis"][name] = _redis_sample(queue.r, queue.stream, queue.dead)
            if rss:
                samples[f"rss_{name}"] = procs.sample()

        monitor.watchers += [(first_sample, lambda: take(f"after_{first_sample}", True)),
                             (mid, lambda: take(f"after_{mid}", False))]
        monitor.start()
        released = time.perf_counter()
        gate.touch()  # every client starts now
        deadline = time.monotonic() + timeout
        _until(lambda: all((gate.parent / f"finished-{i}").exists() for i in range(clients)),
               timeout, "every client to finish", client_procs, logs)
        wall = time.perf_counter() - released
        time.sleep(0.3)  # the monitor's last poll
        take(f"after_{jobs}", True)
        (gate.parent / "exit").touch()
        reports = []
        for i, c in enumerate(client_procs):
            stdout, _ = c.communicate(timeout=max(10.0, deadline - time.monotonic()))
            if c.returncode != 0:
                raise RuntimeError(f"client {i} failed (exit {c.returncode}):\n{_tail(logs / f'client{i}.log')}")
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        if wait_ttl and result_ttl_s:
            last_done = monitor.times[-1] if monitor.times else time.perf_counter()
            time.sleep(max(0.0, last_done + result_ttl_s - time.perf_counter()))
            # Redis expires keys lazily and in active cycles: give them a few seconds past the TTL
            _until(lambda: _redis_sample(queue.r, queue.stream, queue.dead)["results"] == 0, 30,
                   "the results to expire")
            time.sleep(1.0)
            take("after_ttl", False)
        monitor.stop.set()
        monitor.join(timeout=5)
        if monitor.error is not None:
            raise RuntimeError(f"the monitor failed: {monitor.error!r}")
        completions = int(queue.r.hget(monitor.key, "job|done|count") or 0)
        stopped = _stop_serve(serve, procs)
        serve = None
        left_files = _files_under(tmp) + [f"out/{p}" for p in _files_under(out)]
        ray_logs = sum(p.stat().st_size for p in ray_tmp.rglob("*") if p.is_file())
        torch_cache = len(_files_under(cache))
        serve_log = _notable(logs / "serve.log")
    finally:
        for c in client_procs:
            if c.poll() is None:
                c.kill()
                c.wait()
        if serve is not None:
            _stop_serve(serve, procs)
        procs.kill_left()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(root, ignore_errors=True)
    submitted = {j: e for r in reports for j, e in r["jobs"].items()}
    bad = {j: p for r in reports for j, p in r["bad"].items()}
    deliveries = {j: d for r in reports for j, d in r["deliveries"].items()}
    finished = len(submitted) - len(bad)
    times = monitor.times
    first = (window_jobs - 1) / (times[window_jobs - 1] - times[0]) if len(times) >= window_jobs else 0.0
    last = ((window_jobs - 1) / (times[-1] - times[-window_jobs]) if len(times) >= window_jobs else 0.0)
    report = {
        "environment": _environment("cpu"), "jobs": jobs, "clients": clients, "window": window,
        "max_frames": max_frames, "video": video, "model": model, "budget": budget, "result_ttl_s": result_ttl_s,
        "limits": {k: int(v) for k, v in published.items()}, "startup_s": startup_s, "wall_s": wall,
        "jobs_per_s": jobs / wall, "first_sample": first_sample, "mid_sample": mid, "window_jobs": window_jobs,
        "counts": {"submitted": len(submitted), "finished": finished, "lost": len(submitted) - finished,
                   "duplicated": completions - finished, "completions": completions,
                   "failed": monitor.failed, "redelivered": sum(1 for d in deliveries.values() if d != 1),
                   "distinct_expressions": len(set(submitted.values()))},
        "bad": dict(list(bad.items())[:10]),
        "rss": _rss_table(samples.get(f"rss_after_{first_sample}", {}), samples.get(f"rss_after_{jobs}", {})),
        "redis": samples["redis"], "throughput": {"first": first, "last": last,
                                                  "ratio": last / first if first else 0.0},
        "shutdown": {**stopped, "temp_files_left": left_files[:50], "temp_files_left_count": len(left_files),
                     "ray_session_bytes": ray_logs, "torch_cache_files": torch_cache},
        "total_s": time.perf_counter() - started, "serve_log": serve_log,
    }
    report["criteria"] = verdicts(report)
    report["passed"] = all(c["pass"] for c in report["criteria"])
    return report


def _notable(path: Path, keep: int = 20) -> list[str]:
    """The last ``keep`` warning / error lines of a log (e.g. Ray killing a worker for memory)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    words = ("WARNING", "ERROR", "Traceback", "killed", "memory", "died")
    return [line[:300] for line in lines if any(w in line for w in words)
            and "Token authentication is enabled" not in line][-keep:]


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _until(condition, timeout: float, what: str, procs: list | None = None, logs: Path | None = None) -> None:
    """Poll ``condition`` every 50 ms; a client process that exits early or the timeout raise."""
    deadline = time.monotonic() + timeout
    while not condition():
        for i, p in enumerate(procs or []):
            if p.poll() is not None and p.returncode != 0:
                raise RuntimeError(f"client {i} exited with {p.returncode} while waiting for {what}:\n"
                                   f"{_tail(logs / f'client{i}.log') if logs else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _stop_serve(serve: subprocess.Popen, procs: Processes) -> dict:
    """SIGTERM ``serve`` (it finishes the jobs it holds and exits), wait, then list what is left of it."""
    procs.tree()  # remember everything under it before it goes
    t0 = time.perf_counter()
    serve.send_signal(signal.SIGTERM)
    try:
        code = serve.wait(timeout=120)
    except subprocess.TimeoutExpired:
        serve.kill()
        code = serve.wait(timeout=10)
    stop_s = time.perf_counter() - t0
    grace = time.monotonic() + 10  # Ray's processes end shortly after their driver
    while procs.left() and time.monotonic() < grace:
        time.sleep(0.2)
    return {"serve_exit": code, "stop_s": stop_s, "processes_left": procs.left(), "processes_seen": len(procs.seen)}


def _rss_table(before: dict, after: dict) -> list[dict]:
    """Per process: RSS after the first sample and after the last job (bytes) and their ratio (processes in
    both samples; the others are listed with the side they are missing from as None)."""
    rows = []
    for key in sorted(set(before) | set(after), key=lambda k: (before.get(k) or after.get(k))["name"]):
        b, a = before.get(key), after.get(key)
        rows.append({"name": (b or a)["name"], "pid": (b or a)["pid"], "before": b["rss"] if b else None,
                     "after": a["rss"] if a else None,
                     "ratio": a["rss"] / b["rss"] if a and b and b["rss"] else None,
                     # where a change lies: private pages vs shared ones (Ray's object store is shared memory)
                     "anon_delta": a["anon"] - b["anon"] if a and b and "anon" in a and "anon" in b else None,
                     "shmem_delta": a["shmem"] - b["shmem"] if a and b and "shmem" in a and "shmem" in b else None})
    return rows


def verdicts(report: dict) -> list[dict]:
    """The criteria: ``{"name", "pass", "value"}`` each (see the module docstring)."""
    counts, redis_s, shutdown = report["counts"], report["redis"], report["shutdown"]
    jobs, first, mid = report["jobs"], report["first_sample"], report["mid_sample"]
    compared = [r for r in report["rss"] if r["ratio"] is not None]
    worst = max(compared, key=lambda r: r["ratio"]) if compared else None
    # a process of job 50 gone by the end (an actor restarted: its memory is no longer comparable); Ray's idle
    # workers come and go by design
    gone = [f"{r['name']}:{r['pid']}" for r in report["rss"] if r["after"] is None and r["name"] != "ray::IDLE"]
    end, middle = redis_s.get(f"after_{jobs}", {}), redis_s.get(f"after_{mid}", {})
    memory_ok = bool(end and middle) and end["used_memory"] <= middle["used_memory"] * 1.10 + MEMORY_SLACK
    expiry = redis_s.get("after_ttl")
    value = (f"{end.get('used_memory', 0) / 2**20:.2f} MiB after job {jobs} vs {middle.get('used_memory', 0) / 2**20:.2f}"
             f" after job {mid}; job stream {end.get('stream')} entries, {end.get('dead')} dead letters")
    if expiry:
        before = redis_s["before"]
        memory_ok = (memory_ok and expiry["job_records"] == 0 and expiry["results"] == 0
                     and expiry["used_memory"] <= before["used_memory"] + MEMORY_SLACK)
        value += (f"; after the TTL {expiry['used_memory'] / 2**20:.2f} MiB (before the run "
                  f"{before['used_memory'] / 2**20:.2f}), {expiry['job_records']} records, {expiry['results']} results")
    memory_ok = memory_ok and end.get("stream", MAX_STREAM + 1) <= MAX_STREAM and end.get("dead", 1) == 0
    tp = report["throughput"]
    return [
        {"name": "0 lost", "pass": counts["lost"] == 0 and counts["submitted"] == jobs,
         "value": f"{counts['submitted']} submitted, {counts['finished']} finished, {counts['lost']} lost"},
        {"name": "0 duplicated", "pass": counts["duplicated"] == 0 and counts["redelivered"] == 0
         and counts["distinct_expressions"] == jobs,
         "value": f"{counts['duplicated']} duplicated, {counts['redelivered']} delivered more than once"},
        {"name": f"RSS after job {jobs} <= {1 + RSS_GROWTH:.2f}x after job {first} (every process)",
         "pass": bool(compared) and worst["ratio"] <= 1 + RSS_GROWTH and not gone,
         "value": (f"worst {worst['name']} {worst['ratio']:.3f}x{_change_parts(worst)} over {len(compared)} "
                   "processes"
                   if worst else "no data") + (f"; gone before the end (restarted?): {', '.join(gone)}" if gone else "")},
        {"name": "Redis memory bounded", "pass": memory_ok, "value": value},
        {"name": f"throughput last {report['window_jobs']} >= {1 - THROUGHPUT_DROP:.2f}x first {report['window_jobs']}",
         "pass": tp["ratio"] >= 1 - THROUGHPUT_DROP,
         "value": f"{tp['last']:.3f} / {tp['first']:.3f} jobs/s = {tp['ratio']:.3f}x"},
        {"name": "no temp files left", "pass": shutdown["temp_files_left_count"] == 0,
         "value": f"{shutdown['temp_files_left_count']} left" + (f": {shutdown['temp_files_left'][:3]}"
                                                                 if shutdown["temp_files_left"] else "")},
        {"name": "no processes left", "pass": not shutdown["processes_left"] and shutdown["serve_exit"] == 0,
         "value": f"{len(shutdown['processes_left'])} of {shutdown['processes_seen']} left"
                  + (f" ({', '.join(p['name'] for p in shutdown['processes_left'])})" if shutdown["processes_left"]
                     else "") + f"; serve exit {shutdown['serve_exit']} after SIGTERM in {shutdown['stop_s']:.1f} s"},
    ]


def _change_parts(row: dict) -> str:
    """`` (+5.2 MiB: +0.3 private, +4.9 shared)`` for a row with the parts of its change, else ``""``."""
    if row.get("anon_delta") is None or row.get("shmem_delta") is None or row["before"] is None:
        return ""
    mib = 2**20
    return (f" ({(row['after'] - row['before']) / mib:+.1f} MiB: {row['anon_delta'] / mib:+.1f} private, "
            f"{row['shmem_delta'] / mib:+.1f} shared)")


def format_table(report: dict) -> str:
    """The report as text: setup, hardware and versions, counts, RSS per process, Redis, throughput, criteria."""
    env, mib = report["environment"], 2**20
    c = report["counts"]
    lines = [
        f"refstream bench soak: {report['jobs']} jobs x {report['max_frames']} frames of {Path(report['video']).name} "
        f"from {report['clients']} client processes ({report['window']} in flight each), serve --pipeline pools, "
        f"model {report['model']}, budget {report['budget']}, result TTL {report['result_ttl_s']} s, cpu",
        f"hardware: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; {env['platform']}",
        f"versions: python {env['python']}, torch {env['torch']}, ray {env['ray']}, redis-py {env['redis-py']}, "
        f"redis-server {env['redis-server']}",
        f"limits published by serve: {report['limits']}",
        f"wall {report['wall_s']:.1f} s for the jobs ({report['jobs_per_s']:.2f} jobs/s), serve ready after "
        f"{report['startup_s']:.1f} s, whole run {report['total_s']:.1f} s",
        "",
        f"jobs: {c['submitted']} submitted, {c['finished']} finished, {c['lost']} lost, {c['duplicated']} duplicated "
        f"({c['completions']} completions counted, {c['failed']} failed, {c['redelivered']} delivered more than once)",
        "",
        f"{'process':<24}{'pid':>8}{'RSS after job ' + str(report['first_sample']) + ', MiB':>24}"
        f"{'after job ' + str(report['jobs']) + ', MiB':>22}{'ratio':>9}{'private / shared change, MiB':>30}",
    ]
    for row in report["rss"]:
        b = f"{row['before'] / mib:.1f}" if row["before"] else "-"
        a = f"{row['after'] / mib:.1f}" if row["after"] else "-"
        r = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        parts = (f"{row['anon_delta'] / mib:+.1f} / {row['shmem_delta'] / mib:+.1f}"
                 if row.get("anon_delta") is not None and row.get("shmem_delta") is not None else "-")
        lines.append(f"{row['name']:<24}{row['pid']:>8}{b:>24}{a:>22}{r:>9}{parts:>30}")
    lines += ["", f"{'redis':<22}{'used_memory MiB':>16}{'keys':>8}{'records':>9}{'results':>9}{'job stream':>12}"
                  f"{'dead':>6}"]
    for name, s in report["redis"].items():
        lines.append(f"{name:<22}{s['used_memory'] / mib:>16.2f}{s['keys']:>8}{s['job_records']:>9}{s['results']:>9}"
                     f"{s['stream']:>12}{s['dead']:>6}")
    tp, sd = report["throughput"], report["shutdown"]
    lines += ["", f"throughput: first {report['window_jobs']} jobs {tp['first']:.3f} jobs/s, last "
                  f"{report['window_jobs']} {tp['last']:.3f} jobs/s, ratio {tp['ratio']:.3f}",
              f"shutdown: serve exit {sd['serve_exit']} after SIGTERM in {sd['stop_s']:.1f} s; processes left "
              f"{len(sd['processes_left'])} of {sd['processes_seen']} seen; temp files left "
              f"{sd['temp_files_left_count']}; Ray's session logs {sd['ray_session_bytes'] / mib:.1f} MiB (Ray's own, "
              f"in RAY_TMPDIR, removed by the soak); torch's compile cache folder {sd['torch_cache_files']} file(s) "
              "(TORCHINDUCTOR_CACHE_DIR)", ""]
    width = max(len(k["name"]) for k in report["criteria"])
    for k in report["criteria"]:
        lines.append(f"{'PASS' if k['pass'] else 'FAIL'}  {k['name']:<{width}}  {k['value']}")
    if report.get("serve_log"):
        lines += ["", "serve log, warnings and errors (last ones):", *("  " + line for line in report["serve_log"])]
    lines.append(f"soak: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def _arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--jobs", type=int, default=500, help="jobs in all (default 500)")
    b.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    b.add_argument("--window", type=int, default=2, help="jobs each client keeps in flight (default 2)")
    b.add_argument("--max-frames", type=int, default=4, help="frames per job (default 4)")
    b.add_argument("--video", default=None, help="video file or frame folder (default: Ref-DAVIS-17 blackswan)")
    b.add_argument("--model", "--config", dest="model", default="tiny",
                   help="serve --model: a preset or a model YAML (default tiny)")
    b.add_argument("--budget", type=int, default=81)
    b.add_argument("--result-ttl-s", type=int, default=20,
                   help="serve --result-ttl-s (default 20: the records Redis holds reach their steady state, about "
                        "TTL x jobs/s, before job 50, where the RSS baseline is taken)")
    b.add_argument("--jobs-in-flight", type=int, default=None, help="serve --jobs-in-flight (default serve's)")
    b.add_argument("--redis-url", "--redis", dest="redis_url", default=None,
                   help="a Redis used by nothing else (default: start a redis-server on a free port)")
    b.add_argument("--no-ttl-wait", action="store_true", help="do not wait for the TTL after the last job")
    b.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run (default 3600)")
    b.add_argument("--json", default=None, metavar="FILE")


def add_bench_soak_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``soak`` to the ``refstream bench`` subcommands."""
    b = bench_subparsers.add_parser("soak", help="many short jobs from several client processes through serve: "
                                                 "lost, duplicated, memory, throughput, leftovers (PASS/FAIL)")
    _arguments(b)
    return b


def main_bench_soak(args: argparse.Namespace) -> int:
    """Run the soak, print the table (and write ``--json``). Exit code 1 when a criterion fails."""
    report = run_soak(jobs=args.jobs, clients=args.clients, window=args.window, max_frames=args.max_frames,
                      video=args.video, model=args.model, budget=args.budget, result_ttl_s=args.result_ttl_s,
                      redis_url=args.redis_url, timeout=args.timeout, wait_ttl=not args.no_ttl_wait,
                      jobs_in_flight=args.jobs_in_flight)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refstream.bench.soak", description=__doc__.split("\n")[0])
    _arguments(parser)
    parser.add_argument("--client-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_spec:
        print(json.dumps(run_client(json.loads(args.client_spec))))
        return 0
    return main_bench_soak(args)


if __name__ == "__main__":
    sys.exit(main())
