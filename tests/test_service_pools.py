"""``serve --pipeline pools``: decode / encoder / VideoGLaMM actor pools, frames streamed in bounded chunks."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from service_procs import _until

from refstream.cli import main
from refstream.service.client import RefStreamClient


@pytest.fixture
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    yield ray
    ray.shutdown()


def _serve(redis_url, data_root, pools, allowed_roots_extra=(), **kwargs):
    from refstream.service.serve import serve

    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(redis_url,), kwargs=dict(
        pipeline="pools", workers=1, model="tiny", device="cpu", allowed_roots=[data_root, *allowed_roots_extra],
        stop_event=stop,
        on_start=pools.append, log=lambda *_: None, **kwargs))
    thread.start()
    return stop, thread


def test_pools_job_equals_refstream_run_with_bounded_chunks(ray_local, redis_server, examples_dir, blackswan_dir,
                                                            tmp_path):
    ray = ray_local
    pools = []
    # the actors' torch threads = this process's (where `refstream run` runs below): the same numerics
    import torch

    stop, thread = _serve(redis_server.url, examples_dir, pools, lease_ms=10_000,
                          num_cpus=float(torch.get_num_threads()))
    try:
        client = RefStreamClient(redis_server.url)
        job = client.submit(str(blackswan_dir), ["the black swan", "the water"], max_frames=20, budget=81)
        status = client.wait(job, timeout_s=120)
        assert status["state"] == "done", status
        assert status["frames_done"] == status["frames_total"] == 20 and "sam2" in status["stages"]
        files = client.result(job, tmp_path / "out")
        assert sorted(p.name for p in files) == ["masks.json", "overlay.mp4", "summary.json", "tokens.png"]
        stats = ray.get(pools[0].decoders[0].stats.remote())
        assert stats["chunks_out"] == 3 and 1 <= stats["max_ahead"] <= stats["ahead"] == 2  # 20 frames, chunks of 8
        assert stats["jobs"] == 0
        # FastV prunes inside the LLM: every CLIP token goes to the VideoGLaMM actor with the FastV settings
        fastv = client.submit(str(blackswan_dir), ["the black swan"], max_frames=6, budget=81, method="fastv")
        assert client.wait(fastv, timeout_s=120)["state"] == "done", client.status(fastv)
        client.result(fastv, tmp_path / "fastv")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    served, direct = _run_and_compare(tmp_path / "out", blackswan_dir, "-e", "the black swan", "-e", "the water",
                                      "--max-frames", "20", "--budget", "81")
    assert served["frames"] == direct["frames"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    expected = json.loads((tmp_path / "out-direct" / "summary.json").read_text())
    for key in ("frames", "visual_tokens_into_llm", "llm_sequence_length", "pruning"):
        assert summary[key] == expected[key]

    served, _ = _run_and_compare(tmp_path / "fastv", blackswan_dir, "-e", "the black swan", "--max-frames", "6",
                                 "--budget", "81", "--method", "fastv")
    assert "llm_layer_lengths" in served["pruning"]
    assert (tmp_path / "fastv" / "tokens.png").read_bytes() == (tmp_path / "fastv-direct" / "tokens.png").read_bytes()


def _run_and_compare(served_dir, video, *options):
    """``refstream run VIDEO OPTIONS`` into ``<served_dir>-direct``; its masks.json objects and pruning must
    equal the service's in ``served_dir``. Returns both masks.json."""
    direct_dir = served_dir.with_name(served_dir.name + "-direct")
    assert main(["run", str(video), *options, "--model", "tiny", "--device", "cpu", "--quiet", "--out",
                 str(direct_dir)]) == 0
    served = json.loads((served_dir / "masks.json").read_text())
    direct = json.loads((direct_dir / "masks.json").read_text())
    assert served["objects"] == direct["objects"] and served["pruning"] == direct["pruning"]
    return served, direct


def test_bad_jobs_among_good_jobs_fail_cleanly_in_pools_mode(ray_local, redis_server, examples_dir, blackswan_dir,
                                                             tmp_path):
    """A corrupt video, an input outside the allowed roots and an empty expression (queued by a client that
    skips validation) among good jobs: each bad job fails at once (1 delivery) naming the problem; the good
    jobs around them finish."""
    from refstream.errors import ExpressionError
    from refstream.service.jobs import JobRequest

    pools = []
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    corrupt = allowed / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(2048))
    client = RefStreamClient(redis_server.url)
    good = [client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81)]
    bad = client.submit(str(corrupt), ["x"])
    good.append(client.submit(str(blackswan_dir), ["the water"], max_frames=4, budget=81))
    outside = client.submit(str(tmp_path / "elsewhere.mp4"), ["x"])
    with pytest.raises(ExpressionError):
        client.submit(str(blackswan_dir), ["  "])  # refused at submit: nothing queued
    empty = client.queue.submit(JobRequest.model_construct(  # what a client without validation could queue
        input=str(blackswan_dir), expressions=["  "], method="litelvlm", variant="paper", budget=81,
        placement="pooled", frames=16, stride=1, max_frames=4, clip_text="question", answer="forced"))
    good.append(client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81))
    stop, thread = _serve(redis_server.url, examples_dir, pools, allowed_roots_extra=[allowed])
    try:
        for job in good:
            status = client.wait(job, timeout_s=120)
            assert status["state"] == "done" and status["deliveries"] == 1, status
        statuses = {name: client.wait(job, timeout_s=60) for name, job in
                    (("corrupt", bad), ("outside", outside), ("empty", empty))}
        assert all(s["state"] == "failed" and s["deliveries"] == 1 for s in statuses.values()), statuses
        assert "corrupt.mp4" in statuses["corrupt"]["error"]
        assert "allowed roots" in statuses["outside"]["error"]
        assert "expression is empty" in statuses["empty"]["error"]
        # bad input fails at once (a dead letter with reason "failed"), it is not retried
        assert sorted((d["reason"], d["deliveries"]) for d in client.queue.dead_letters()) == [("failed", "1")] * 3
    finally:
        stop.set()
        thread.join(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("actor", ["worker-0", "decoder-0"])
def test_killed_actor_mid_job_is_restarted_and_the_job_finishes_once(actor, ray_local, redis_server, examples_dir,
                                                                     bedroom_mp4):
    """kill -9 the VideoGLaMM actor, or the decode actor it pulls frames from, mid-job: Ray restarts it and
    the job runs again at once on the restarted actor and finishes with every frame, once."""
    from refstream.service.worker import heartbeats

    pools = []
    stop, thread = _serve(redis_server.url, examples_dir, pools, lease_ms=3000)
    try:
        client = RefStreamClient(redis_server.url)
        job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=120)
        _until(lambda: client.status(job)["frames_done"] >= 10, 180, "10 frames done")
        pid = heartbeats(client.queue.r)[actor]["pid"]  # the actor is busy: its heartbeat, not a method call
        os.kill(pid, signal.SIGKILL)
        status = client.wait(job, timeout_s=300)
        assert status["state"] == "done" and status["frames_done"] == 120
        result = client.queue.result(job)
        assert len(result["files"]) == 4
        masks = json.loads(__import__("base64").b64decode(result["files"]["masks.json"]))
        assert len(masks["objects"][0]["masks"]) == len(masks["frames"]) == 120
        assert int(client.queue.r.hget("refstream:metrics", "job|done|count") or 0) == 1  # finished once
        _until(lambda: heartbeats(client.queue.r)[actor]["pid"] != pid, 30,  # the restarted actor's new pid
               "the restarted actor's heartbeat")
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not thread.is_alive()


def test_waiting_jobs_keep_their_lease_cancel_stops_the_stream_and_actors_beat(ray_local, redis_server, examples_dir,
                                                                              bedroom_mp4, blackswan_dir):
    """Two jobs on one VideoGLaMM actor with a 1.5 s lease and 3 coordinator slots: the second job waits
    behind the first for longer than the lease while the idle third slot polls for abandoned jobs
    (XAUTOCLAIM), but it is never taken over (its lease is renewed while it waits: 1 delivery each).
    A job cancelled mid-stream stops at once and the actor takes the next job. Every pool actor beats."""
    from refstream.service.worker import heartbeats

    pools = []
    stop, thread = _serve(redis_server.url, examples_dir, pools, lease_ms=1500, jobs_in_flight=3)
    try:
        client = RefStreamClient(redis_server.url)
        long_job = client.submit(str(bedroom_mp4), ["the bed"], max_frames=80)
        short_job = client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81)
        deadline = time.monotonic() + 180
        seen_running = False
        while client.status(long_job)["state"] != "done":
            assert time.monotonic() < deadline, client.status(long_job)
            beats = heartbeats(client.queue.r)
            seen_running |= beats.get("worker-0", {}).get("state") == "running"
            time.sleep(0.2)
        assert client.wait(short_job, timeout_s=120)["state"] == "done"
        assert client.status(long_job)["deliveries"] == client.status(short_job)["deliveries"] == 1
        assert seen_running
        beats = heartbeats(client.queue.r)
        assert {beats[n]["role"] for n in ("worker-0", "encoder-0", "decoder-0")} == {"videoglamm", "encode", "decode"}
        _until(lambda: heartbeats(client.queue.r)["worker-0"]["frames_done"] >= 84, 5,  # it beats once a second
               "the VideoGLaMM actor's heartbeat to show 84 frames")
        assert heartbeats(client.queue.r)["worker-0"]["handled"] == 2

        cancelled = client.submit(str(bedroom_mp4), ["the bed"], max_frames=150)
        _until(lambda: client.status(cancelled)["frames_done"] >= 5, 120, "the job to be cancelled to start")
        assert client.cancel(cancelled)
        after = client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81)
        assert client.wait(after, timeout_s=120)["state"] == "done"
        assert client.status(cancelled)["state"] == "cancelled"
        assert client.queue.result(cancelled) is None
        assert heartbeats(client.queue.r)["worker-0"]["frames_done"] < 84 + 150 + 4  # the stream stopped early
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_pools_that_do_not_fit_the_ray_cluster_are_refused_with_the_fix(ray_local):
    from refstream.errors import ConfigError
    from refstream.service.streaming import check_resources

    fits = dict(workers=1, encoders=1, decoders=1, num_gpus=0.0, encoder_gpus=0.0, num_cpus=0.5)
    check_resources(**fits)  # 1.5 of 2 CPUs, no GPU: fine
    with pytest.raises(ConfigError, match=r"1 GPU\(s\), but Ray has 0.*--num-gpus / --encoder-gpus"):
        check_resources(**{**fits, "num_gpus": 0.5, "encoder_gpus": 0.5})
    with pytest.raises(ConfigError, match=r"6 actor\(s\) x 0.5 CPU = 3 CPU\(s\), but Ray has 2"):
        check_resources(**{**fits, "workers": 2, "encoders": 2, "decoders": 2})
    notes = []
    check_resources(**{**fits, "num_gpus": 1.0}, strict=False, note=lambda *a, **k: notes.append(a))
    assert notes and notes[0][0] == "serve.resources" and "nodes with them join" in notes[0][1]
