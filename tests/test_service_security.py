"""Redis security: password (AUTH), the least-rights ACL user, TLS (rediss:// with CA / client certificate)
and masked URLs, against real redis-servers (TLS certificates made here with openssl)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
from conftest import REPO, RedisServer

from refstream.cli import main
from refstream.errors import ConfigError
from refstream.service.client import RefStreamClient
from refstream.service.heartbeat import heartbeats
from refstream.service.metrics import ServiceCollector
from refstream.service.queue import JobQueue, connect
from refstream.service.security import ACL_COMMANDS, ACL_RULE, RedisSettings, mask_url
from refstream.service.serve import _WholeSupervisor
from refstream.service.worker import QueueWorker, stop_key

ADMIN_PASSWORD = "admin-Secr3t-pw"
SERVICE_PASSWORD = "svc-Secr3t-pw"
WRONG_PASSWORD = "Wr0ng-Secr3t-pw"


# ---------------------------------------------------------------------------------------------------- servers
@pytest.fixture
def auth_server(tmp_path):
    """redis-server with ``--requirepass`` (the ``default`` user) and an ACL user ``refstream`` with
    :data:`ACL_RULE` only."""
    server = RedisServer(tmp_path, ("--requirepass", ADMIN_PASSWORD)).start()
    admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD)
    admin.execute_command("ACL", "SETUSER", "refstream", "reset", "on", f">{SERVICE_PASSWORD}", *ACL_RULE.split())
    yield server
    server.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key", "-out",
             f"{name}.crt", "-days", "2", "-subj", f"/CN=refstream test {name}", cwd=folder)


def _make_cert(folder: Path, name: str, ca: str, ext: str | None = None) -> None:
    _openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    extra = ["-extfile", ext] if ext else []
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", *extra, cwd=folder)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("certs")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    _make_cert(folder, "server", "ca", "server.ext")
    _make_cert(folder, "client", "ca")
    return folder


class TLSRedisServer(RedisServer):
    """TLS only (``--port 0``), client certificates required (``--tls-auth-clients yes``)."""

    def __init__(self, folder: Path, certs: Path):
        self.certs = certs
        super().__init__(folder)
        self.args = ("--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(certs / "server.crt"),
                     "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
                     "--tls-auth-clients", "yes")

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def settings(self, **overrides) -> RedisSettings:
        files = dict(ca=str(self.certs / "ca.crt"), cert=str(self.certs / "client.crt"),
                     key=str(self.certs / "client.key"))
        return RedisSettings(self.url, **{**files, **overrides})

    def ping(self) -> None:
        connect(self.settings(), retries=0).ping()


@pytest.fixture
def tls_server(tmp_path, certs):
    server = TLSRedisServer(tmp_path, certs).start()
    yield server
    server.stop()


def _tls_flags(server: TLSRedisServer, **overrides) -> list[str]:
    s = server.settings(**overrides)
    flags = ["--redis-url", s.url]
    for flag, value in (("--redis-ca", s.ca), ("--redis-cert", s.cert), ("--redis-key", s.key)):
        if value:
            flags += [flag, value]
    return flags


def _run_one_job(settings, blackswan_dir, examples_dir) -> tuple[RefStreamClient, str]:
    client = RefStreamClient(settings)
    job = client.submit(str(blackswan_dir), ["the black swan"], max_frames=2, budget=81)
    worker = QueueWorker(settings, model="tiny", device="cpu", allowed_roots=[examples_dir], lease_ms=5000)
    assert worker.run(max_jobs=1, block_ms=50) == 1
    return client, job


# ---------------------------------------------------------------------------------------------------- tests
def test_mask_url_and_the_settings_never_show_a_password(tmp_path):
    assert mask_url("redis://svc:s3cr%40t@10.0.0.1:6380/2") == "redis://svc:***@10.0.0.1:6380/2"
    assert mask_url("rediss://:s3cret@host/0") == "rediss://:***@host/0"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("redis://svc@host/0") == "redis://svc@host/0"  # a user without a password stays
    settings = RedisSettings("redis://svc:s3cret@host/0")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings) and settings.username == "svc"
    assert "pw" not in repr(RedisSettings("redis://host/0", password="pw"))
    with pytest.raises(ConfigError, match="--redis-ca .*no such file"):
        RedisSettings("rediss://host/0", ca=str(tmp_path / "missing-ca.crt"))
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match="rediss://"):
        RedisSettings("redis://host/0", ca=str(tmp_path / "ca.crt"))
    with pytest.raises(ConfigError, match="twice") as info:
        RedisSettings("redis://svc:s3cret@host/0", password="other")
    assert "s3cret" not in str(info.value) and "other" not in str(info.value)
    assert ACL_RULE in (REPO / "README.md").read_text()  # the README shows the rule the tests prove


def test_wrong_password_exits_2_naming_the_user_and_the_password_appears_nowhere(auth_server, capsys, caplog,
                                                                                  tmp_path, monkeypatch):
    caplog.set_level(logging.DEBUG)
    wrong = f"redis://refstream:{WRONG_PASSWORD}@127.0.0.1:{auth_server.port}/0"
    assert main(["status", "--redis-url", wrong, "some-job"]) == 2
    out, err = capsys.readouterr()
    assert "refused the password of user 'refstream'" in err
    assert f"redis://refstream:***@127.0.0.1:{auth_server.port}/0" in err
    # the same through a password file and the environment; and no password at all
    (tmp_path / "pw").write_text(WRONG_PASSWORD + "\n")
    url = f"redis://refstream@127.0.0.1:{auth_server.port}/0"
    assert main(["cancel", "--redis-url", url, "--redis-password-file", str(tmp_path / "pw"), "j"]) == 2
    monkeypatch.setenv("REFSTREAM_REDIS_PASSWORD", WRONG_PASSWORD)
    assert main(["submit", "--redis-url", url, "x.mp4", "-e", "a dog"]) == 2
    monkeypatch.delenv("REFSTREAM_REDIS_PASSWORD")
    assert main(["status", "--redis-url", f"redis://127.0.0.1:{auth_server.port}/0", "j"]) == 2
    out2, err2 = capsys.readouterr()
    assert "requires a password for user 'default'" in err2
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    for secret in (WRONG_PASSWORD, SERVICE_PASSWORD, ADMIN_PASSWORD):
        assert secret not in out + err + out2 + err2 + logged

    # serve, as a process (its own logging set up): exit 2 before Ray starts, the password nowhere
    env = {**os.environ, "PYTHONPATH": str(REPO), "REFSTREAM_REDIS_PASSWORD": WRONG_PASSWORD}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "refstream.cli", "serve", "--redis-url", url, "--model", "tiny",
                           "--device", "cpu", "--metrics-port", "0", "--log-format", "json", "--log-level", "DEBUG"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refused the password of user 'refstream'" in proc.stderr
    assert WRONG_PASSWORD not in proc.stdout + proc.stderr


def test_the_acl_user_runs_the_service_flow_and_nothing_more(auth_server, blackswan_dir, examples_dir, tmp_path,
                                                             capsys, monkeypatch):
    settings = RedisSettings(f"redis://refstream@127.0.0.1:{auth_server.port}/0", password=SERVICE_PASSWORD)
    client, job = _run_one_job(settings, blackswan_dir, examples_dir)
    assert client.status(job)["state"] == "done"
    assert sorted(p.name for p in client.result(job, tmp_path / "out"))[0] == "masks.json"
    # what else the service does: CLI verbs, cancel, a failed job (dead letters), lease renewal and release,
    # queue depth, state counts, heartbeats and the metrics scrape
    monkeypatch.setenv("REFSTREAM_REDIS_PASSWORD", SERVICE_PASSWORD)
    flags = ["--redis-url", settings.url]
    assert main(["submit", *flags, str(blackswan_dir), "-e", "the black swan", "--max-frames", "2"]) == 0
    queued = capsys.readouterr().out.strip()
    assert main(["status", *flags, job]) == 0 and main(["cancel", *flags, queued]) == 0
    assert main(["result", *flags, job, "--out", str(tmp_path / "cli")]) == 0
    queue = JobQueue(connect(settings), lease_ms=100, max_deliveries=1)
    again = client.submit(str(blackswan_dir), ["the black swan"], max_frames=2)
    delivery = queue.take("c1", block_ms=50)
    queue.progress(delivery, "c1", frames_done=1, frames_total=2, stages={"clip": 0.1})
    queue.release(delivery)
    delivery = queue.take("c2", block_ms=50)
    assert delivery.job_id == again
    queue.fail(delivery, "boom", permanent=False)
    assert queue.dead_letters() and queue.depth() == {"pending": 0, "lag": 0}
    assert [d["id"] for d in queue.requeue_dead([again])] == [again] and queue.purge_dead() == []  # dead letters
    assert queue.count_states()["done"] == 1 and "worker" in heartbeats(queue.r)
    supervisor = _WholeSupervisor(queue, "s1", threading.Event(), threading.Event(), lambda *a, **k: None)
    assert supervisor._set_key(stop_key("refstream", "s1"), "stop")
    supervisor._delete_keys()  # serve's stop / abort keys
    families = {f.name: f for f in ServiceCollector(queue).collect()}
    assert families["refstream_redis_up"].samples[0].value == 1 and len(families) > 3
    # every command the rule allows was used by this flow (the rule is no wider than the service needs)
    admin = redis.Redis(port=auth_server.port, password=ADMIN_PASSWORD, decode_responses=True)
    used = {name.removeprefix("cmdstat_") for name in admin.info("commandstats")}
    # SELECT: URLs naming a database other than 0; DISCARD: redis-py ends a failed MULTI with it
    assert set(ACL_COMMANDS) - {"select", "discard"} <= used, set(ACL_COMMANDS) - used
    # and nothing more: other keys, admin commands, pub/sub
    r = connect(settings, retries=0)
    for command in (("FLUSHALL",), ("CONFIG", "GET", "requirepass"), ("SET", "other:key", "1"), ("KEYS", "*"),
                    ("ACL", "LIST"), ("PUBLISH", "refstream:x", "1"), ("SHUTDOWN",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command(*command)


def test_tls_submit_and_serve_through_rediss_with_ca_cert_and_key(tls_server, blackswan_dir, examples_dir,
                                                                  tmp_path, capsys):
    flags = _tls_flags(tls_server)
    assert main(["submit", *flags, str(blackswan_dir), "-e", "the black swan", "--max-frames", "2"]) == 0
    job = capsys.readouterr().out.strip()
    worker = QueueWorker(tls_server.settings(), model="tiny", device="cpu", allowed_roots=[examples_dir])
    assert worker.run(max_jobs=1, block_ms=50) == 1
    assert main(["status", *flags, job]) == 0 and '"state": "done"' in capsys.readouterr().out
    assert main(["result", *flags, job, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "masks.json").is_file()


def test_tls_failures_exit_2_with_a_clear_message(tls_server, capsys, tmp_path):
    certs = tls_server.certs
    wrong_ca = str(certs / "other-ca.crt")
    assert main(["status", *_tls_flags(tls_server, ca=wrong_ca), "j"]) == 2
    err = capsys.readouterr().err
    assert "TLS handshake with Redis" in err and wrong_ca in err and "--redis-ca must be the CA" in err
    assert main(["status", *_tls_flags(tls_server, cert=None, key=None), "j"]) == 2  # no client certificate
    err = capsys.readouterr().err
    assert "TLS handshake with Redis" in err and "--tls-auth-clients yes needs --redis-cert" in err
    missing = str(tmp_path / "nope.crt")
    assert main(["status", *_tls_flags(tls_server), "--redis-cert", missing, "j"]) == 2
    assert f"--redis-cert {missing}: no such file" in capsys.readouterr().err
    plain = f"redis://127.0.0.1:{tls_server.port}/0"  # plain text to a TLS port
    assert main(["status", "--redis-url", plain, "j"]) == 2
    assert "refstream: error: Redis at" in capsys.readouterr().err


def test_pools_serve_with_ray_actors_over_rediss(tls_server, blackswan_dir, examples_dir, tmp_path):
    """``serve --pipeline pools`` over ``rediss://`` with a CA and a client certificate: the Ray actors
    (decoder, encoder, VideoGLaMM worker, each in its own process) beat into Redis through TLS with the
    settings handed to them, and a job finishes."""
    import ray

    from refstream.service.serve import serve

    settings = tls_server.settings()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    stop, pools = threading.Event(), []
    thread = threading.Thread(target=serve, args=(settings,), kwargs=dict(
        pipeline="pools", workers=1, model="tiny", device="cpu", allowed_roots=[examples_dir], stop_event=stop,
        on_start=pools.append, log=lambda *_: None, lease_ms=10_000))
    thread.start()
    try:
        client = RefStreamClient(settings)
        job = client.submit(str(blackswan_dir), ["the black swan"], max_frames=4, budget=81)
        status = client.wait(job, timeout_s=180)
        assert status["state"] == "done", status
        assert "masks.json" in {p.name for p in client.result(job, tmp_path / "out")}
        beats = heartbeats(connect(settings))
        actor_pids = {name: record["pid"] for name, record in beats.items() if record.get("role") != "serve"}
        assert {"decoder-0", "encoder-0", "worker-0"} <= set(actor_pids), beats
        assert os.getpid() not in actor_pids.values()  # they beat from their own processes, through TLS
    finally:
        stop.set()
        thread.join(timeout=60)
        ray.shutdown()
    assert not thread.is_alive()
