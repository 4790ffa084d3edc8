"""serve's local Ray: task events off (the GCS stays flat over a long run), the object store taken at start (the
raylet stays flat) and glibc malloc settings that every Ray process inherits (the actors' RSS stays flat),
without changing serve's own environment.

Runs ``refstream.service.serve._start_ray`` in a child process (a Ray of its own, closed at the end)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from refstream.service.serve import RAY_PROCESS_ENV, RAY_SYSTEM_CONFIG

PROBE = textwrap.dedent("""
    import json, os, sys
    import ray
    from refstream.service.serve import _start_ray

    session = _start_ray(None)
    try:
        @ray.remote(num_cpus=0)
        def worker_env(names):
            return {name: os.environ.get(name) for name in names}

        names = sys.argv[1:]
        session.record()
        raylet = [pid for pid in session.pids if open(f"/proc/{pid}/comm").read().strip() == "raylet"]
        raylet_env = dict(e.split("=", 1) for e in open(f"/proc/{raylet[0]}/environ").read().split("\\0") if "=" in e)
        print(json.dumps({
            "config": ray._private.worker._global_node._config,  # what the cluster was started with
            "worker": ray.get(worker_env.remote(names)),
            "raylet": {name: raylet_env.get(name) for name in names},
            "raylet_shmem_kib": int(next(line.split()[1] for line in open(f"/proc/{raylet[0]}/status")
                                         if line.startswith("RssShmem:"))),
            "serve": {name: os.environ.get(name) for name in names},
        }))
    finally:
        session.close()
""")


def test_serve_local_ray_has_task_events_off_and_the_malloc_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in RAY_PROCESS_ENV}
    ray_tmp = tempfile.mkdtemp(prefix="rs-env-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env.update(REFSTREAM_STATE_DIR=str(tmp_path / "state"), RAY_TMPDIR=ray_tmp)
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE, *RAY_PROCESS_ENV], env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["config"]["task_events_report_interval_ms"] == 0
    for key, value in RAY_SYSTEM_CONFIG.items():
        assert got["config"][key] == value
    assert got["worker"] == RAY_PROCESS_ENV  # an actor or task process: started by the raylet later
    assert got["raylet"] == RAY_PROCESS_ENV
    assert got["raylet_shmem_kib"] >= 190 * 1024  # the 200 MiB object store is taken at start (plasma is in it)
    assert got["serve"] == {name: None for name in RAY_PROCESS_ENV}  # serve's own environment is put back


def test_a_value_already_set_is_kept(tmp_path):
    from refstream.service.serve import _environment

    os.environ["MALLOC_ARENA_MAX"] = "4"
    try:
        with _environment(RAY_PROCESS_ENV):
            assert os.environ["MALLOC_ARENA_MAX"] == "4"
            assert os.environ["MALLOC_TRIM_THRESHOLD_"] == RAY_PROCESS_ENV["MALLOC_TRIM_THRESHOLD_"]
        assert os.environ["MALLOC_ARENA_MAX"] == "4" and "MALLOC_TRIM_THRESHOLD_" not in os.environ
    finally:
        del os.environ["MALLOC_ARENA_MAX"]
