"""Load through the whole service: 50 jobs from 4 client processes at once (50 results, none duplicated, none
lost). One ``refstream serve`` subprocess (its own local Ray, tiny model, CPU, one worker), a real
redis-server, and 4 client OS processes, each with its own :class:`RefStreamClient`, that start submitting at
the same moment (they wait on a gate file created once all of them are connected): 13 + 13 + 12 + 12 jobs on
the blackswan folder (4 frames), each job with its own expression, so that every result can be checked to be
its own job's. Run for each ``--pipeline`` (``whole``, ``pools``). Slow (a Ray start and 50 jobs on the CPU):
``pytest -m slow -s tests/test_service_load.py`` (``-s`` shows the counts and the wall time).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from service_procs import _counts, _until, serves_fixture

from refstream.service.client import RefStreamClient
from refstream.service.worker import heartbeats

pytestmark = pytest.mark.slow

serves = serves_fixture()

JOBS_PER_CLIENT = (13, 13, 12, 12)
OUTPUT_FILES = ["masks.json", "overlay.mp4", "summary.json", "tokens.png"]

# One client process: connect, say it is ready, wait for the gate, submit its jobs, print them as JSON.
CLIENT = r"""
import json, sys, time
from pathlib import Path
from refstream.service.client import RefStreamClient

url, video, client, n, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
c = RefStreamClient(url)
c.queue.r.ping()
(gate.parent / f"ready-{client}").touch()
while not gate.exists():
    time.sleep(0.001)
first = time.time()
jobs = {}
for i in range(n):
    expression = f"the black swan {client}-{i}"
    jobs[c.submit(video, [expression], max_frames=4, budget=81)] = expression
print(json.dumps({"client": client, "first": first, "last": time.time(), "jobs": jobs}))
"""


@pytest.mark.parametrize("pipeline", ["whole", "pools"])
def test_50_jobs_from_4_client_processes_at_once(serves, redis_server, blackswan_dir, tmp_path, pipeline):
    client = RefStreamClient(redis_server.url)
    started = time.monotonic()
    proc = serves.start("--lease-ms", "10000", "--pipeline", pipeline)
    _until(lambda: proc.poll() is not None or ("serve.started" in serves.log(0)
                                               and "worker-0" in heartbeats(client.queue.r)),
           240, "serve to start and its worker to load the model", serves)
    assert proc.poll() is None, serves.log(0)[-3000:]
    ready_s = time.monotonic() - started

    gate = tmp_path / "gate" / "go"
    gate.parent.mkdir()
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, redis_server.url, str(blackswan_dir), str(i), str(n),
                                 str(gate)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, n in enumerate(JOBS_PER_CLIENT)]
    try:
        _until(lambda: all((gate.parent / f"ready-{i}").exists() for i in range(len(clients)))
               or any(c.poll() is not None for c in clients), 120, "the clients to connect")
        gate.touch()  # all 4 start submitting now
        released = time.monotonic()
        outputs = [c.communicate(timeout=120) for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert [c.returncode for c in clients] == [0] * len(clients), [err[-2000:] for _, err in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    expected: dict[str, str] = {}  # job id -> its expression
    for report in reports:
        assert len(report["jobs"]) == JOBS_PER_CLIENT[report["client"]]
        expected.update(report["jobs"])
    jobs = list(expected)
    assert len(jobs) == sum(JOBS_PER_CLIENT) == 50  # 50 distinct ids
    assert len(set(expected.values())) == 50
    spread = max(r["first"] for r in reports) - min(r["first"] for r in reports)
    overlap = min(r["last"] for r in reports) - max(r["first"] for r in reports)

    _until(lambda: all(client.status(j)["state"] in ("done", "failed", "cancelled") for j in jobs), 480,
           "all 50 jobs to end", serves, poll=0.5)
    wall = time.monotonic() - released
    statuses = {j: client.status(j) for j in jobs}
    assert {j: (s["state"], s["deliveries"]) for j, s in statuses.items()} == {j: ("done", 1) for j in jobs}, \
        {j: s for j, s in statuses.items() if (s["state"], s["deliveries"]) != ("done", 1)}
    for job, expression in expected.items():
        files = client.result(job, tmp_path / "results" / job)
        assert sorted(p.name for p in files) == OUTPUT_FILES
        masks = json.loads((tmp_path / "results" / job / "masks.json").read_text())
        assert len(masks["frames"]) == 4
        assert [o["expression"] for o in masks["objects"]] == [expression], job  # its own job's result
        assert [len(o["masks"]) for o in masks["objects"]] == [4]
    counts = _counts(client, jobs)
    print(f"load[{pipeline}]: {counts}")
    print(f"load[{pipeline}]: 50 jobs from 4 client processes in {wall:.1f} s after the gate "
          f"({50 / wall:.2f} jobs/s; serve ready after {ready_s:.1f} s; the clients' first submits within "
          f"{spread * 1000:.0f} ms, their submit windows overlap {overlap * 1000:.0f} ms)")
    assert counts == {"submitted": 50, "finished": 50, "lost": 0, "duplicated": 0, "pending": 0, "lag": 0,
                      "dead": 0}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, serves.log(0)[-3000:]
