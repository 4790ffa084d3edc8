"""Shared pytest fixtures: paths into the repository's bundled ``examples/`` data and a real redis-server.

The data (provenance in ``examples/SOURCES.md``) ships with the repository, so no test skips for it: a
missing example file is a failure, reported by :func:`examples_dir`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """``<repo>/examples``; fails (never skips) when the bundled data is missing."""
    if not (EXAMPLES / "SOURCES.md").is_file():
        pytest.fail(f"the bundled example data is missing: {EXAMPLES} (it is tracked in git; restore it with "
                    f"`git checkout -- examples`)")
    return EXAMPLES


@pytest.fixture(scope="session")
def bedroom_mp4(examples_dir: Path) -> Path:
    """``examples/bedroom.mp4``: 960x540, 30 fps, 200 frames, H.264 (from facebookresearch/sam2)."""
    return examples_dir / "bedroom.mp4"


@pytest.fixture(scope="session")
def blackswan_dir(examples_dir: Path) -> Path:
    """The 50 DAVIS ``blackswan`` JPEG frames (854x480) in the Ref-DAVIS-17 layout."""
    return examples_dir / "ref-davis17-mini" / "DAVIS" / "JPEGImages" / "480p" / "blackswan"


class RedisServer:
    """A real redis-server on a free loopback port, in its own folder (AOF on), for tests."""

    def __init__(self, folder: Path, args: tuple[str, ...] = ()):
        """``args``: extra redis-server options (e.g. ``--requirepass``; tests/test_service_security.py)."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = folder
        self.args = tuple(args)
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--appendonly", "yes",
             "--save", "", "--protected-mode", "no", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                self.ping()
                return self
            except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError):
                return self  # up, and asking for a password
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)

    def ping(self) -> None:
        """Raises redis.exceptions.ConnectionError while the server is not up (overridden for TLS servers)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        redis.Redis(port=self.port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)).ping()

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The odd-input corpus of issue 13 (``tests/corpus/build.py``), each case built on first use into one
    session folder shared by ``tests/test_corpus.py`` and ``tests/test_corpus_service.py``."""
    from corpus.build import Corpus

    return Corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    small CPU kernels do not oversubscribe the 2 cores other jobs share, and MKL's reductions do not depend on
    the batch's row count (batched and frame-by-frame SAM2 are then bit-identical)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
