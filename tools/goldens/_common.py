"""Shared by the scripts in ``tools/goldens/``: which commit of the original code ran, paths, encoding.

Every script takes the path of a checkout of an original repository, imports the ORIGINAL code from it
(nothing of it is copied into RefStream), runs it on inputs rebuilt from recorded seeds and writes a golden
file under ``tests/golden/`` with the commit it actually ran.

The commit is read from a ``COMMIT`` file at the checkout's root when there is one (write it when exporting a
tree with ``git archive COMMIT | tar -x``), else with ``git rev-parse HEAD`` in the checkout, else from
``--commit``.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO / "tests" / "golden"

# the commits the committed goldens were made from (issue 12)
EXPECTED = {
    "LiteLVLM": "5896153d8aa8ed4a2f862f4a27826140b2502a48",
    "VideoGLaMM": "6b15b1e7f75009d0e1a858ac08e28021c4faaf11",
    "davis2017-evaluation": "ac7c43fca936f9722837b7fbd337d284ba37004b",
    "MeViS": "7c0620b9dc0ab7802747957f221674f175c8a47b",
}
URLS = {
    "LiteLVLM": "https://github.com/sejong-rcv/LiteLVLM",
    "VideoGLaMM": "https://github.com/mbzuai-oryx/VideoGLaMM",
    "davis2017-evaluation": "https://github.com/davisvideochallenge/davis2017-evaluation",
    "MeViS": "https://github.com/henghuiding/MeViS",
}


def use_repository() -> None:
    """Put RefStream's root and ``tests/`` on ``sys.path`` (inputs are built with the project's helpers)."""
    for p in (str(REPO / "tests"), str(REPO)):
        if p not in sys.path:
            sys.path.insert(0, p)


def checkout_commit(name: str, checkout: Path, given: str | None = None) -> str:
    """The full commit of ``checkout``: its ``COMMIT`` file, else git HEAD of the work tree it is in (not
    RefStream's own), else ``given`` (``--commit``); printed.

    A commit other than the one the committed golden records is allowed (the new golden then records it),
    with a warning."""
    checkout = Path(checkout)
    if not checkout.is_dir():
        sys.exit(f"{checkout}: not a folder (pass a checkout of {URLS[name]})")
    commit = None
    if (checkout / "COMMIT").is_file():
        commit = (checkout / "COMMIT").read_text().split()[0]
    else:
        try:
            top = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--show-toplevel"], capture_output=True,
                                 text=True)
            head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
            if top.returncode == 0 and head.returncode == 0 and Path(top.stdout.strip()).resolve() != REPO.resolve():
                commit = head.stdout.strip()
        except OSError:
            pass
    if commit is None:
        commit = given
    elif given and not commit.startswith(given) and not given.startswith(commit):
        sys.exit(f"{checkout} is at {commit}, not at --commit {given}")
    if not commit:
        sys.exit(f"cannot tell which commit {checkout} is: it is not in a git checkout and has no COMMIT file; "
                 f"pass --commit")
    print(f"{name}: running the original code of {checkout} at commit {commit}")
    if not EXPECTED[name].startswith(commit) and not commit.startswith(EXPECTED[name][:7]):
        print(f"warning: the committed golden was made at {name} {EXPECTED[name]}; this run records {commit}",
              file=sys.stderr)
    return commit


def parser(description: str, name: str, default_out: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("checkout", type=Path, help=f"a checkout of {URLS[name]} (at {EXPECTED[name][:7]})")
    p.add_argument("--out", type=Path, default=default_out, help=f"where to write (default {default_out.relative_to(REPO)})")
    p.add_argument("--commit", help="the checkout's commit, when it is neither a git checkout nor has a COMMIT file")
    return p


def versions(*modules) -> dict:
    out = {"python": platform.python_version()}
    for m in modules:
        out[m.__name__.split(".")[0]] = getattr(m, "__version__", "?")
    return out


def encode(a) -> dict | None:
    """An array as {shape, dtype, data}: zlib + base64 of its bytes (booleans bit-packed)."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype == bool:
        raw, dtype = np.packbits(a.ravel()).tobytes(), "bool"
    else:
        raw, dtype = np.ascontiguousarray(a).tobytes(), a.dtype.str
    return {"shape": list(a.shape), "dtype": dtype, "data": base64.b64encode(zlib.compress(raw, 9)).decode()}


def write_json(path: Path, data: dict, compact: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=1)
    path.write_text(text)
    print(f"wrote {path}")
