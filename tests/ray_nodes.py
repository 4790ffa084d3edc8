"""A real multi-node Ray cluster on this machine for tests: ``ray start --head`` and ``ray start --address`` as
separate processes (one per node), each with its own short temp folder, explicit free ports (never 6379 / 8265 /
the agents' defaults), a custom resource naming it, and its own token (``RAY_AUTH_MODE=token`` with a fresh
``RAY_AUTH_TOKEN``: no other Ray session on the machine can join it, and it cannot join theirs).

A node is everything under its ``ray start --block`` process (GCS, raylet, agents, and the worker processes
the raylet starts, which sit in process groups of their own); :meth:`RayNodes.kill` SIGKILLs all of them at
once: the node is gone as if its machine died, not shut down politely. No tests here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from refstream.service.ray_session import MARKER_ENV, descendants, start_time

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    """Head + worker nodes as ``ray start`` subprocesses (see the module docstring).

    Args:
        health_check_ms: the GCS pings each raylet this often; a node missing 3 pings is dead (Ray's defaults
            take ~15 s more to find a dead node).
    """

    def __init__(self, health_check_ms: int = 1000):
        self.root = Path(tempfile.mkdtemp(prefix="rsn", dir="/tmp"))  # short: Unix socket paths <= 107 bytes
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != MARKER_ENV}
        # memory_monitor_refresh_ms=0: Ray's memory monitor would kill our actors when the machine (shared with
        # other jobs) is above 95% memory in use; a node dies here only when a test kills it
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex,
                        RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0")
        self.health_check_ms = health_check_ms
        self.nodes: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, str] = {}  # every process seen under a node: killed at the end if still there
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ports(self) -> list[str]:
        return ["--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
                "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
                "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port())]

    def _start(self, name: str, args: list[str], num_cpus: float, timeout: float) -> None:
        folder = self.root / name
        folder.mkdir()
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(num_cpus), "--temp-dir", str(folder), "--resources", json.dumps({f"rsn_{name}": 1}),
             "--object-store-memory", str(100 * 1024 * 1024), "--include-log-monitor", "false",
             *self._ports(), *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.nodes[name] = proc
        deadline = time.monotonic() + timeout
        while b"will now block forever" not in (self.root / f"{name}.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)
        self.snapshot()

    def start_head(self, num_cpus: float = 0, timeout: float = 90) -> "RayNodes":
        """The head: GCS and a raylet with ``num_cpus`` (0: no actor lands there), no dashboard UI."""
        self.port = _free_port()
        config = {"health_check_period_ms": self.health_check_ms, "health_check_failure_threshold": 3,
                  "health_check_timeout_ms": self.health_check_ms}
        self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                             "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
                             "--system-config", json.dumps(config)], num_cpus, timeout)
        return self

    def add_worker(self, name: str, num_cpus: float, timeout: float = 90) -> None:
        """A worker node joining the head, with ``num_cpus`` CPUs and the resource ``rsn_<name>``."""
        self._start(name, ["--address", self.address], num_cpus, timeout)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def pids(self, name: str) -> dict[int, str]:
        """The node's processes now (pid -> start time): its ``ray start`` and everything under it."""
        proc = self.nodes[name]
        tree = descendants(proc.pid)
        if (start := start_time(proc.pid)) is not None:
            tree[proc.pid] = start
        return tree

    def snapshot(self) -> None:
        for name in self.nodes:
            self.seen.update(self.pids(name))

    def node_of(self, pid: int) -> str | None:
        """The node whose process tree holds ``pid`` (e.g. an actor's process), or None."""
        return next((name for name in self.nodes if pid in self.pids(name)), None)

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of the node at once (repeated while new ones appear). Returns the pids killed."""
        killed: list[int] = []
        self.snapshot()
        for _ in range(10):
            pids = [p for p in self.pids(name) if p not in killed] if self.nodes[name].poll() is None else \
                [p for p in descendants(self.nodes[name].pid) if p not in killed]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            killed += pids
            time.sleep(0.05)
        self.nodes[name].wait(timeout=10)
        return killed

    def shutdown(self) -> None:
        """Kill every node and every process seen under them (same pid and start time only); remove the folders."""
        self.snapshot()
        for name, proc in self.nodes.items():
            if proc.poll() is None:
                self.kill(name)
        for pid, start in self.seen.items():
            if start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)
