"""A real multi-node Ray cluster on this machine (:class:`ray_nodes.RayNodes`: a head without CPUs and two worker
nodes, separate ``ray start`` processes): ``refstream serve --address`` and ``refstream bench run --address``
spread their actors over both worker nodes, and a worker node killed mid-job (every process of it, SIGKILL)
loses nothing: the service's jobs finish exactly once with the masks of a job with no fault, and the
benchmark sweep finishes every unit, rerunning only the units that were running on the dead node.

The figures (nodes, jobs, the frame at which the node was removed, lost / duplicated) are printed (``-s``).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time

import pytest
from ray_nodes import RayNodes
from service_procs import REFSTREAM, _until

from refstream.service.client import RefStreamClient
from refstream.service.metrics import metrics_key
from refstream.service.worker import heartbeats

pytestmark = pytest.mark.slow  # a cluster of 3 nodes, actors loading the model on 2 cores: minutes


@pytest.fixture
def cluster():
    nodes = RayNodes().start_head(num_cpus=0)
    try:
        for name in ("w1", "w2"):
            nodes.add_worker(name, num_cpus=3)  # logical CPUs: one node can hold every actor once the other died
        yield nodes
    finally:
        nodes.shutdown()


def _masks(client: RefStreamClient, job: str) -> dict:
    return json.loads(base64.b64decode(client.queue.result(job)["files"]["masks.json"]))


def test_serve_on_a_cluster_survives_the_loss_of_a_worker_node(cluster, redis_server, examples_dir, bedroom_mp4,
                                                              tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [REFSTREAM, "serve", "--address", cluster.address, "--redis-url", redis_server.url, "--model", "tiny",
             "--device", "cpu", "--workers", "2", "--encoders", "1", "--decoders", "1", "--jobs-in-flight", "2",
             "--allowed-root", str(examples_dir), "--lease-ms", "10000", "--metrics-port", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
    client = RefStreamClient(redis_server.url)
    try:
        names = ["worker-0", "worker-1", "encoder-0", "decoder-0"]
        _until(lambda: set(names) <= set(heartbeats(client.queue.r)) or serve.poll() is not None, 300,
               "the pool actors' heartbeats")
        assert serve.poll() is None, log.read_text(errors="replace")[-3000:]

        def placement():
            beats = heartbeats(client.queue.r)
            placed = {name: cluster.node_of(beats[name]["pid"]) for name in names}
            return (beats, placed) if None not in placed.values() else None

        beats, placed = _until(placement, 60, "every actor's process under a node")  # (a beat from a restart)
        print(f"\nactors by node: {placed}; node ids {[beats[n]['node'][:8] for n in names]}")
        # the VideoGLaMM actors land on both worker nodes (two node ids, each actor under its node's raylet)
        assert {placed["worker-0"], placed["worker-1"]} == {"w1", "w2"}
        assert beats["worker-0"]["node"] != beats["worker-1"]["node"]
        assert set(placed.values()) <= {"w1", "w2"}  # the head has no CPUs: nothing lands there

        options = dict(max_frames=48)
        reference = client.submit(str(bedroom_mp4), ["the bed"], **options)  # no fault: the masks to match
        assert client.wait(reference, timeout_s=300)["state"] == "done", client.status(reference)
        jobs = [client.submit(str(bedroom_mp4), ["the bed"], **options) for _ in range(3)]
        kill_at = 12
        running = _until(lambda: [j for j in jobs if client.status(j)["state"] == "running"
                                  and client.status(j)["frames_done"] >= kill_at], 300, f"a job past frame {kill_at}")
        beats = heartbeats(client.queue.r)
        busy = [n for n in ("worker-0", "worker-1") if beats[n].get("state") == "running"] or ["worker-0"]
        victim = cluster.node_of(beats[busy[0]]["pid"])
        frames = {j: client.status(j)["frames_done"] for j in jobs}
        killed = cluster.kill(victim)
        removed_at = time.monotonic()
        print(f"killed node {victim} ({len(killed)} processes) with jobs at frames {list(frames.values())} "
              f"(job {running[0][:8]} past frame {kill_at})")

        statuses = {j: client.wait(j, timeout_s=600) for j in jobs}
        recovered_s = time.monotonic() - removed_at
        assert all(s["state"] == "done" for s in statuses.values()), statuses
        r = client.queue.r
        completions = int(r.hget(metrics_key("refstream"), "job|done|count") or 0)
        retried = int(r.hget(metrics_key("refstream"), "job|retried|count") or 0)
        done = [j for j in [reference, *jobs] if r.exists(f"refstream:result:{j}")]
        lost, duplicated = 1 + len(jobs) - len(done), completions - len(done)
        print(f"nodes: head + 2 workers, {victim} removed mid-job; jobs {1 + len(jobs)} (1 before the fault), "
              f"finished {len(done)}, lost {lost}, duplicated {duplicated}, retried by the queue {retried}; "
              f"deliveries {[s['deliveries'] for s in statuses.values()]}; all done {recovered_s:.0f} s after")
        assert lost == 0 and duplicated == 0 and retried == 0
        assert all(s["deliveries"] == 1 for s in statuses.values())  # re-run in place: never handed to another
        assert client.queue.dead_letters() == []
        assert "job.actor_died" in log.read_text(errors="replace")  # the job held on the dead node ran again
        expected = _masks(client, reference)
        for j in jobs:
            masks = _masks(client, j)
            assert len(masks["frames"]) == 48 and masks["objects"] == expected["objects"]
        beats = heartbeats(client.queue.r)
        survivor = ({"w1", "w2"} - {victim}).pop()
        _until(lambda: all(cluster.node_of(heartbeats(client.queue.r)[n]["pid"]) == survivor for n in names), 60,
               f"every actor to beat from {survivor}")
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(timeout=10)
    assert serve.returncode == 0, log.read_text(errors="replace")[-3000:]


def _events(run) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_bench_sweep_on_a_cluster_reruns_only_the_units_lost_with_a_worker_node(cluster, examples_dir, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:
        bench = subprocess.Popen(
            [REFSTREAM, "bench", "run", "--address", cluster.address, "--dataset", "ref-davis17",
             "--root", str(examples_dir / "ref-davis17-mini"), "--method", "none", "--method", "litelvlm",
             "--budget", "196", "--budget", "81", "--max-frames", "48", "--workers", "2", "--model", "tiny",
             "--device", "cpu", "--out", str(run), "--quiet"],
            stdout=out, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
    try:
        starts = _until(lambda: [e for e in _events(run) if e["event"] == "start"] if len(
            [e for e in _events(run) if e["event"] == "start"]) >= 2 or bench.poll() is not None else None, 300,
            "both video tasks to start")
        assert bench.poll() is None, log.read_text(errors="replace")[-3000:]
        nodes = {cluster.node_of(e["pid"]) for e in starts}
        print(f"\ntasks started on nodes {sorted(nodes)} (node ids {[e['node'][:8] for e in starts]})")
        assert nodes == {"w1", "w2"} and len({e["node"] for e in starts}) == 2  # work lands on both worker nodes
        time.sleep(1)  # mid-task: a task of 8 unit-runs x 48 frames took about 5 s on the quiet 2-core machine
        finished = {tuple(map(tuple, e["units"])) for e in _events(run) if e["event"] == "done"}
        running = [e for e in starts if tuple(map(tuple, e["units"])) not in finished]
        assert running, f"both tasks finished within 1 s of starting: nothing left to lose ({_events(run)})"
        victim_task = running[0]
        victim = cluster.node_of(victim_task["pid"])
        done_before = sum(len(units) for units in finished)
        killed = cluster.kill(victim)
        lost_units = {tuple(u) for u in victim_task["units"]}
        print(f"killed node {victim} ({len(killed)} processes) with {len(lost_units)} unit-runs running on it, "
              f"{done_before} finished elsewhere")
        assert bench.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(timeout=10)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ran"] == 16 and summary["failed"] == 0
    records = [json.loads(p.read_text()) for p in (run / "status").rglob("*.json")]
    assert len(records) == 16 and all(r["status"] == "ok" for r in records)
    twice = {(r["combo"], r["exp_id"]) for r in records if r["attempts"] == 2}
    events = _events(run)
    lost_events = [e for e in events if e["event"] == "lost"]
    reruns = {tuple(u) for e in events if e["event"] == "start" and e["attempt"] == 2 for u in e["units"]}
    print(f"nodes: head + 2 workers, {victim} removed mid-sweep; 16 unit-runs, {len(twice)} attempted twice "
          f"(lost with the node: {len(lost_units)}), {sum(r['attempts'] == 1 for r in records)} once; "
          f"lost events {len(lost_events)}; wall {summary['wall_seconds']} s")
    assert twice == lost_units == reruns  # only the lost units ran again, each once more
    assert len(lost_events) == 1 and {tuple(u) for u in lost_events[0]["units"]} == lost_units
    assert all(r["node"] != victim_task["node"] for r in records if (r["combo"], r["exp_id"]) in lost_units)
