"""``refstream dead-letters list|requeue|purge``: a job that failed (its input missing) is listed, requeued once
its input exists and then done exactly once; purge deletes dead jobs. Real redis-server, a real worker loop
(tiny model) and the real blackswan frames."""

from __future__ import annotations

import json
import shutil
import threading

from refstream.cli import main
from refstream.service.client import RefStreamClient
from refstream.service.metrics import metrics_key
from refstream.service.queue import JobNotFound
from refstream.service.worker import QueueWorker


def _frames(blackswan_dir, folder, n=4):
    folder.mkdir(parents=True)
    for f in sorted(blackswan_dir.glob("*.jpg"))[:n]:
        shutil.copy(f, folder / f.name)


def test_a_failed_job_is_listed_requeued_once_fixed_and_done_once(redis_server, blackswan_dir, tmp_path, capsys):
    url = ["--redis-url", redis_server.url]
    root = tmp_path / "videos"
    root.mkdir()
    client = RefStreamClient(redis_server.url)
    job = client.submit(str(root / "late"), ["the black swan"], budget=81)  # the folder does not exist yet
    other = client.submit(str(root / "never"), ["the black swan"], budget=81)
    worker = QueueWorker(redis_server.url, model="tiny", device="cpu", allowed_roots=[root], threads=1)
    assert worker.run(max_jobs=2, block_ms=50) == 2
    assert client.status(job)["state"] == "failed" and "no such file or folder" in client.status(job)["error"]

    assert main(["dead-letters", "list", *url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["JOB_ID", "REASON", "DELIVERIES", "TIME", "(UTC)", "ERROR"]
    assert [line.split()[:3] for line in table[1:]] == [[job, "failed", "1"], [other, "failed", "1"]]
    assert "no such file or folder" in table[1]
    assert main(["dead-letters", "list", *url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in listed] == [job, other] and all(float(d["time"]) > 0 for d in listed)

    _frames(blackswan_dir, root / "late")  # the input is fixed
    # two requeues at the same moment: the job goes back on the queue once (the loser finds the entry claimed,
    # or already gone if it came second)
    results, entries = [], client.queue.r.xlen(client.queue.stream)
    barrier = threading.Barrier(2)

    def requeue():
        barrier.wait()
        try:
            results.append(len(client.queue.requeue_dead([job])))
        except JobNotFound:
            results.append(0)

    threads = [threading.Thread(target=requeue) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1] and client.queue.r.xlen(client.queue.stream) == entries + 1
    status = client.status(job)
    assert (status["state"], status["deliveries"], status["error"]) == ("queued", 0, None)  # fresh delivery count
    assert client.queue.depth() == {"pending": 0, "lag": 1}
    assert main(["dead-letters", "requeue", *url, job]) == 2  # no longer dead
    assert f"not in the dead letters: {job}" in capsys.readouterr().err

    assert worker.run(max_jobs=1, block_ms=50) == 1
    status = client.status(job)
    assert (status["state"], status["deliveries"], status["frames_done"]) == ("done", 1, 4)
    assert int(client.queue.r.hget(metrics_key("refstream"), "job|done|count")) == 1  # ran once
    assert client.queue.depth() == {"pending": 0, "lag": 0}
    assert client.queue.take("nobody", block_ms=50) is None  # nothing else queued
    assert sorted(p.name for p in client.result(job, tmp_path / "out"))[0] == "masks.json"

    # purge: what is removed is printed, the record goes too
    assert main(["dead-letters", "purge", *url]) == 2  # neither ids nor --all
    assert "name the jobs (JOB_ID ...) or pass --all" in capsys.readouterr().err
    assert main(["dead-letters", "purge", *url, "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"purged {other}", "1 dead job(s) purged"]
    assert client.queue.dead_letters() == [] and not client.queue.r.exists(f"refstream:job:{other}")
    assert main(["dead-letters", "list", *url]) == 0 and capsys.readouterr().out.strip() == "no dead letters"


def test_requeue_all_after_retries_ran_out(redis_server, blackswan_dir, tmp_path, capsys):
    """A job sent to the dead letters by max_deliveries (a crashing handler) comes back with --all, runs once."""
    from refstream.service.queue import JobQueue, connect

    queue = JobQueue(connect(redis_server.url), lease_ms=10, max_deliveries=1)
    client = RefStreamClient(redis_server.url)
    job = client.submit(str(blackswan_dir), ["the black swan"], max_frames=2)

    def crash(request, progress):
        raise RuntimeError("worker crashed")

    assert queue.work("w", crash, max_jobs=1) == 1
    (dead,) = queue.dead_letters()
    assert (dead["id"], dead["reason"], dead["deliveries"], dead["error"]) == (
        job, "retries", "1", "RuntimeError: worker crashed")
    assert main(["dead-letters", "requeue", "--redis-url", redis_server.url, "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"requeued {job}", "1 dead job(s) requeued"]
    ran = []
    assert queue.work("w", lambda request, progress: ran.append(1) or {"ok": 1}, max_jobs=1) == 1
    assert ran == [1] and queue.status(job)["state"] == "done" and queue.dead_letters() == []


def test_the_job_stream_is_trimmed_below_the_oldest_entry_still_needed(redis_server):
    """Acknowledged entries go, pending (reclaimable) and undelivered ones stay; the lag stays right."""
    from refstream.service.jobs import JobRequest
    from refstream.service.queue import JobQueue, connect

    queue = JobQueue(connect(redis_server.url), lease_ms=10, trim_every_s=0)
    request = JobRequest(input="/videos/a.mp4", expressions=["a dog"])
    jobs = [queue.submit(request) for _ in range(6)]
    first, second = queue.take("dies", block_ms=10), queue.take("w", block_ms=10)
    queue.complete(second, {"ok": 1})  # the first one is still pending: nothing may go
    assert queue.r.xlen(queue.stream) == 6
    assert queue.depth() == {"pending": 1, "lag": 4}
    # the first consumer died: its job is reclaimed after the lease and finished, then everything is trimmed
    assert queue.work("w", lambda r, p: {"ok": 1}, max_jobs=5) == 5
    assert queue.status(first.job_id)["deliveries"] == 2
    assert [queue.status(j)["state"] for j in jobs] == ["done"] * 6
    assert queue.r.xlen(queue.stream) == 0 and queue.depth() == {"pending": 0, "lag": 0}
    later = queue.submit(request)
    assert queue.trim() == 0 and queue.r.xlen(queue.stream) == 1 and queue.depth()["lag"] == 1  # not delivered
    assert queue.take("w", block_ms=10).job_id == later
