"""Issue 13's corpus of odd inputs (``tests/corpus/build.py``) submitted as service jobs to ONE ``serve``,
interleaved with good jobs (the bundled blackswan frames): each corpus job must end like ``refstream run``
(``done`` with the right frames, or ``failed`` at once, 1 delivery, never dead-lettered as an internal error,
naming the same problem), every good job must be ``done`` and ``serve`` must still be serving at the end.

Default suite: a subset (one per class that a job can meet) through ``serve`` in a thread of this process
(``--pipeline pools``, a local Ray). ``@pytest.mark.slow``: every case through ``refstream serve`` as a
subprocess (``pytest -m slow tests/test_corpus_service.py``).
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import RedisServer
from corpus.build import CASES, Built, MissingEncoder, check_message, check_run_outputs

from refstream.errors import RefStreamError

SUBSET = [  # one case per class a job can meet; the good jobs go between them
    "vp9_deadline_realtime", "single_jpeg", "rotated_90_display_matrix", "resolution_change_ts", "grey16_png_folder",
    "png_20000x10000_in_folder", "expression_10000_characters", "expression_zero_width_spaces_only",
    "truncated_inside_moov", "bit_flipped_h264", "fifo_named_like_a_video", "symlink_loop",
]
JOB_TIMEOUT_S = 180  # a job still running after this is a hang
GOOD = {"max_frames": 2, "budget": 81}


@dataclass
class Served:
    """What one serve did with the submitted jobs.

    Attributes:
        outcomes: per case name: ``("skipped", reason)``, ``("refused", message)`` (refused at submit, nothing
            queued), ``("crashed", traceback)`` (the client raised something else at submit) or
            ``("job", status, result folder)``.
        good: the statuses of the good jobs, in submission order.
        alive: whether serve was still running (and took the last good job) after every corpus job ended.
        log: serve's log (subprocess) for failure messages.
    """

    outcomes: dict[str, tuple] = field(default_factory=dict)
    good: list[dict] = field(default_factory=list)
    alive: bool = False
    dead_letters: list = field(default_factory=list)
    log: str = ""


def _submit_all(client, corpus, names: list[str], blackswan: Path, folder: Path) -> tuple[dict, list[str]]:
    """Submit a good job, then each case followed by a good job every third case, then a good job last."""
    jobs: dict[str, object] = {}
    good = [client.submit(str(blackswan), ["the black swan"], **GOOD)]
    for k, name in enumerate(names):
        try:
            built = corpus.get(name)
        except MissingEncoder as e:
            jobs[name] = ("skipped", str(e))
            continue
        try:
            jobs[name] = client.submit(built.input, list(built.expressions))
        except RefStreamError as e:  # refused at submit (the same validation as refstream run)
            jobs[name] = ("refused", str(e))
        except Exception:  # noqa: BLE001 - what `refstream submit` would print as a traceback (exit 1)
            jobs[name] = ("crashed", traceback.format_exc())
        if k % 3 == 2:
            good.append(client.submit(str(blackswan), ["the black swan"], **GOOD))
    return jobs, good


def _collect(client, jobs: dict, good: list[str], folder: Path) -> Served:
    served = Served()
    for name, job in jobs.items():
        if isinstance(job, tuple):
            served.outcomes[name] = job
            continue
        status = client.wait(job, timeout_s=JOB_TIMEOUT_S)
        out = folder / name
        if status["state"] == "done":
            client.result(job, out)
        served.outcomes[name] = ("job", status, out)
    served.good = [client.wait(job, timeout_s=JOB_TIMEOUT_S) for job in good]
    return served


@pytest.fixture(scope="module")
def served_in_process(corpus, blackswan_dir, examples_dir, tmp_path_factory) -> Served:
    """The SUBSET through ``serve(pipeline="pools")`` in a thread (a local Ray, a real redis-server)."""
    ray = pytest.importorskip("ray")
    from refstream.service.client import RefStreamClient
    from refstream.service.serve import serve

    folder = tmp_path_factory.mktemp("corpus-service")
    names = [n for n in SUBSET if _service_case(corpus, n)]
    redis = RedisServer(folder).start()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(redis.url,), kwargs=dict(
        pipeline="pools", workers=1, model="tiny", device="cpu", allowed_roots=[examples_dir, corpus.root],
        lease_ms=10_000, max_deliveries=1, stop_event=stop, log=lambda *_: None))
    try:
        client = RefStreamClient(redis.url)
        jobs, good = _submit_all(client, corpus, names, blackswan_dir, folder)
        thread.start()
        served = _collect(client, jobs, good, folder / "results")
        last = client.submit(str(blackswan_dir), ["the black swan"], **GOOD)  # still serving after them all
        served.good.append(client.wait(last, timeout_s=JOB_TIMEOUT_S))
        served.alive = thread.is_alive()
        served.dead_letters = client.queue.dead_letters()
    finally:
        stop.set()
        if thread.ident is not None:
            thread.join(timeout=120)
        ray.shutdown()
        redis.stop()
    assert not thread.is_alive(), "serve did not stop"
    return served


def _service_case(corpus, name: str) -> bool:
    """Whether a case is submitted as a job (a case whose encoder is missing is, and reports its skip)."""
    try:
        return corpus.get(name).service
    except MissingEncoder:
        return True


def _check_outcome(served: Served, corpus, name: str) -> None:
    built: Built = corpus.get(name)
    outcome = served.outcomes[name]
    if outcome[0] == "skipped":
        pytest.skip(outcome[1])
    assert outcome[0] != "crashed", \
        f"the client raised at submit (refstream submit: a traceback, exit 1):\n{outcome[1]}"
    exp = built.expected
    if outcome[0] == "refused":
        assert exp.exit == 2, f"refused at submit, but refstream run succeeds: {outcome[1]}"
        check_message(built, outcome[1], cli=False)
        return
    _, status, out = outcome
    error = status.get("error") or ""
    assert "Traceback" not in error, error
    assert status["deliveries"] == 1, f"{status['deliveries']} deliveries (bad input fails at once): {status}"
    dead = [d for d in served.dead_letters if d.get("id") == status["id"]]
    if exp.exit == 2:
        assert status["state"] == "failed", f"the job ended {status['state']}, refstream run exits 2: {status}"
        check_message(built, error, cli=False)
    else:
        assert status["state"] == "done", f"the job ended {status['state']}, refstream run exits 0: {error}"
        check_run_outputs(built, out)
    # bad input goes to the dead letters at once as reason "failed" (to be fixed and requeued); any other reason
    # ("retries": failed max_deliveries times) is an internal error
    assert [d["reason"] for d in dead] == (["failed"] if exp.exit == 2 else []), \
        f"dead-lettered as an internal error, not bad input: {dead}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", SUBSET)
def test_service_job(name, served_in_process, corpus):
    _check_outcome(served_in_process, corpus, name)


@pytest.mark.timeout(900)
def test_good_jobs_around_the_corpus_finish_and_serve_keeps_serving(served_in_process):
    assert [s["state"] for s in served_in_process.good] == ["done"] * len(served_in_process.good)
    assert all(s["frames_done"] == GOOD["max_frames"] for s in served_in_process.good)
    assert served_in_process.alive


# ---------------------------------------------------------------------------------------------------- slow
ALL = [c.name for c in CASES]


@pytest.fixture(scope="module")
def served_subprocess(corpus, blackswan_dir, examples_dir, tmp_path_factory) -> Served:
    """Every service case through ``refstream serve`` (a subprocess with its own local Ray; the default pools
    pipeline), every process under it cleaned up afterwards (tests/service_procs.py)."""
    from service_procs import Serves

    from refstream.service.client import RefStreamClient

    folder = tmp_path_factory.mktemp("corpus-serve")
    names = [n for n in ALL if _service_case(corpus, n)]
    redis = RedisServer(folder).start()
    serves = Serves(redis.url, corpus.root, folder)
    try:
        client = RefStreamClient(redis.url)
        jobs, good = _submit_all(client, corpus, names, blackswan_dir, folder)
        proc = serves.start("--allowed-root", str(examples_dir), "--lease-ms", "10000", "--max-deliveries", "1")
        served = _collect(client, jobs, good, folder / "results")
        last = client.submit(str(blackswan_dir), ["the black swan"], **GOOD)
        served.good.append(client.wait(last, timeout_s=JOB_TIMEOUT_S))
        served.alive = proc.poll() is None
        served.dead_letters = client.queue.dead_letters()
        served.log = serves.log(0)
    finally:
        serves.cleanup()
        redis.stop()
    return served


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", ALL)
def test_serve_job(name, served_subprocess, corpus):
    if name not in served_subprocess.outcomes:
        assert not corpus.get(name).service
        pytest.skip("not a service case (an --out problem, or an input outside the allowed roots)")
    _check_outcome(served_subprocess, corpus, name)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_serve_keeps_serving_good_jobs_around_the_whole_corpus(served_subprocess):
    assert [s["state"] for s in served_subprocess.good] == ["done"] * len(served_subprocess.good), \
        served_subprocess.log[-3000:]
    assert served_subprocess.alive, served_subprocess.log[-3000:]
