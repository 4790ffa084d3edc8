"""Issue 13's corpus of odd inputs through ``refstream run`` (cases and expectations: ``tests/corpus/build.py``).

For each case: exit 0 with the right frames (count, size, orientation; the overlay's pixels and the frames
:func:`video_pipeline.decode.open_video` reads against an independent PyAV / Pillow decode), or exit 2 with a
message naming the problem and the fix; never exit 1, a traceback or a hang.

The default suite calls the CLI's ``main`` in this process (one tiny model load for the whole corpus, through
a cache put in front of :func:`refstream.api.load`); ``@pytest.mark.slow`` runs every case as a real
``refstream run`` subprocess (``pytest -m slow tests/test_corpus.py``).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from corpus.build import CASES, Built, MissingEncoder, check_decoded_frames, check_message, check_run_outputs

REFSTREAM = str(Path(sys.executable).with_name("refstream"))
CASE_TIMEOUT_S = 120  # a case over this is a hang (each takes about a second)
NAMES = [c.name for c in CASES]


def test_the_corpus_covers_every_class_of_issue_13():
    classes = {c.klass for c in CASES}
    assert len(CASES) >= 40 and len(set(NAMES)) == len(NAMES)
    assert {"--out", "decord fails", "rotation", "resolution change", "16-bit grey", "pixel limit", "expression",
            "truncated", "damaged", "already passes", "codec", "size", "frame folder", "container", "timing",
            "naming"} <= classes


def _built(corpus, name: str) -> Built:
    try:
        return corpus.get(name)
    except MissingEncoder as e:
        pytest.skip(str(e))


# In the default suite: 4 encoder frames and 64 tokens per frame instead of 16 and 196 (a quarter of the CLIP and
# a sixth of the LLM work per case; the decoding, the frames segmented and the outputs are the same). The slow
# subprocess variant runs the defaults.
QUICK = ("--frames", "4", "--budget", "64")


def _argv(built: Built, out: Path, *options: str) -> list[str]:
    expressions = [arg for e in built.expressions for arg in ("-e", e)]
    return ["run", built.input, *expressions, "--model", "tiny", "--device", "cpu", "--quiet", *options, "--out",
            str(out)]


def _check(built: Built, code: int, err: str, out: Path, fresh_out: bool) -> None:
    """The outcome of one run against the case's expectation."""
    exp = built.expected
    assert "Traceback" not in err, err[-3000:]
    assert code in (0, 2), f"exit {code} (1 is an internal error):\n{err[-3000:]}"
    assert code == exp.exit, f"exit {code}, expected {exp.exit}:\n{err[-3000:]}"
    lines = err.splitlines()
    for pattern in exp.forbidden:
        noise = [line for line in lines if re.search(pattern, line)]
        assert not noise, f"{len(noise)} stderr line(s) match {pattern!r}, e.g. {noise[0]!r}"
    if code == 2:
        check_message(built, err)
        if fresh_out:
            assert not out.exists(), "a refused run left an output folder behind"
        return
    check_run_outputs(built, out)
    check_decoded_frames(built)
    if exp.warnings is not None:
        warned = [line for line in lines if re.search(exp.warnings, line, re.IGNORECASE)]
        assert len(warned) == 1, f"{len(warned)} stderr lines match {exp.warnings!r} (one expected):\n{err[-3000:]}"


class _Lines(logging.Handler):
    """Collects log records as the CLI would print them to stderr (Python's last-resort handler: the message)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def model_cache():
    return {}


@pytest.fixture
def cached_load(monkeypatch, model_cache):
    """``refstream run`` loads its model through :func:`refstream.api.load` at each call; here the tiny model is
    loaded once for the corpus (the Segmenter is meant to be reused: one model, many videos)."""
    import refstream.api

    real = refstream.api.load

    def load(model="videoglamm", **kwargs):
        key = (str(model), tuple(sorted(kwargs.items())))
        if key not in model_cache:
            model_cache[key] = real(model, **kwargs)
        return model_cache[key]

    monkeypatch.setattr(refstream.api, "load", load)


@pytest.mark.timeout(CASE_TIMEOUT_S)
@pytest.mark.parametrize("name", NAMES)
def test_run(name, corpus, cached_load, tmp_path, capfd):
    """``refstream run`` in this process: exit code, stderr (file descriptor 2, so FFmpeg's own lines too, and
    the log lines), outputs."""
    from refstream.cli import main

    built = _built(corpus, name)
    out = Path(built.out) if built.out else tmp_path / "out"
    logs = _Lines()
    logging.getLogger().addHandler(logs)
    try:
        code = main(_argv(built, out, *QUICK))
        crash = ""
    except SystemExit as e:  # argparse
        code, crash = e.code, ""
    except Exception:  # what the console script would print as a traceback, exiting 1
        code, crash = 1, traceback.format_exc()
    finally:
        logging.getLogger().removeHandler(logs)
    captured = capfd.readouterr()
    err = "\n".join([captured.err, *logs.lines, crash])
    _record(name, code, err)
    _check(built, code, err, out, built.out is None)


def _record(name: str, code: int, err: str) -> None:
    """With ``$REFSTREAM_CORPUS_TABLE`` set to a file: append the case's outcome to it as a JSON line (case,
    class, exit code, the message's last line), for the corpus table of a report."""
    path = os.environ.get("REFSTREAM_CORPUS_TABLE")
    if path:
        import json

        klass = next(c.klass for c in CASES if c.name == name)
        lines = [line for line in err.splitlines() if line.strip()]
        with open(path, "a") as fh:
            fh.write(json.dumps({"case": name, "class": klass, "exit": code,
                                 "message": lines[-1] if lines else ""}) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_run_subprocess(name, corpus, tmp_path):
    """The same, each case a real ``refstream run`` process: what a user sees (its exit code and stderr)."""
    built = _built(corpus, name)
    out = Path(built.out) if built.out else tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run([REFSTREAM, *_argv(built, out)], capture_output=True, text=True, env=env,
                              timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"refstream run hung (no exit in {CASE_TIMEOUT_S} s): {(e.stderr or b'')[-2000:]!r}")
    _check(built, proc.returncode, proc.stderr, out, built.out is None)
