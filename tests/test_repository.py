"""The repository stands alone: nothing tracked points outside it, and the bundled ``examples/`` are whole.

- no tracked file names a path outside the repository (the sibling data/notes folders this project grew
  up next to, or this machine's absolute paths); cite ``docs/design.md`` or the original sources instead;
- every tracked symbolic link resolves to an existing path inside the repository;
- ``examples/`` stays under 10 MB, every file in it is tracked by git (not ignored) and covered by an entry
  of ``examples/SOURCES.md``, and every path that file names exists;
- every ``examples/...`` path the README and ``docs/design.md`` mention exists.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SOURCES = EXAMPLES / "SOURCES.md"
MAX_EXAMPLES_BYTES = 10 * 1000 * 1000  # "under 10 MB"

# Written in pieces so that this file does not match itself.
FORBIDDEN = {
    "../" + "shared": "a sibling folder of the repository",
    "shared" + "/data": "the shared data folder (the data now ships in examples/)",
    "REFERENCE" + ".md": "notes outside the repository (cite docs/design.md or the original source)",
    "/" + "work/": "an absolute path of the machine the project was developed on",
}


def tracked_files() -> list[Path]:
    """Paths (relative to the repository root) of every file git tracks, symbolic links included."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot list the tracked files with `git ls-files` in {REPO}: {exc} (run the tests from a "
                    f"git checkout of the repository)")
    return [Path(p) for p in out.decode().split("\0") if p]


def test_nothing_tracked_points_outside_the_repository():
    hits = []
    for rel in tracked_files():
        path = REPO / rel
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (frames, masks, video, pictures)
            continue
        text = data.decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, what in FORBIDDEN.items():
                if pattern in line:
                    hits.append(f"{rel}:{number}: {pattern!r} ({what}): {line.strip()[:120]}")
    assert not hits, "tracked files point outside the repository:\n" + "\n".join(hits)


def test_tracked_symlinks_stay_inside_the_repository():
    links = [rel for rel in tracked_files() if (REPO / rel).is_symlink()]
    bad = []
    for rel in links:
        target = (REPO / rel).resolve()
        if not target.exists():
            bad.append(f"{rel} -> {(REPO / rel).readlink()} (missing)")
        elif not target.is_relative_to(REPO):
            bad.append(f"{rel} -> {target} (outside the repository)")
    assert not bad, "\n".join(bad)


def example_files() -> list[Path]:
    """Every file under ``examples/`` (symbolic links themselves, not followed), relative to ``examples/``."""
    assert EXAMPLES.is_dir(), f"{EXAMPLES} is missing: the bundled example data is part of the repository"
    found = []
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_symlink() or path.is_file():
            found.append(path.relative_to(EXAMPLES))
    return found


def test_examples_stay_small_and_are_tracked():
    files = example_files()
    size = sum((EXAMPLES / rel).lstat().st_size for rel in files)
    assert size < MAX_EXAMPLES_BYTES, f"examples/ holds {size / 1e6:.2f} MB; keep it under 10 MB"
    tracked = {str(rel) for rel in tracked_files()}
    untracked = [str(rel) for rel in files if f"examples/{rel.as_posix()}" not in tracked]
    assert not untracked, (f"files in examples/ that git does not track (ignored by .gitignore, or not added): "
                           f"{untracked[:10]}")


def sources_entries() -> list[str]:
    """The backquoted paths of the first column of the table in ``examples/SOURCES.md``."""
    assert SOURCES.is_file(), f"{SOURCES} is missing: the example data needs its provenance"
    entries, in_body = [], False
    for line in SOURCES.read_text(encoding="utf-8").splitlines():
        if line.startswith("|---"):
            in_body = True  # the rows after the header's separator
        elif in_body and line.startswith("|"):
            entries += re.findall(r"`([^`]+)`", line.split("|")[1])
        else:
            in_body = False
    return entries


def test_sources_name_existing_files_and_cover_every_example():
    entries = sources_entries()
    assert len(entries) >= 6, f"expected the provenance table in {SOURCES}, found entries {entries}"
    missing = [e for e in entries if not os.path.lexists(EXAMPLES / e.rstrip("/"))]
    assert not missing, f"examples/SOURCES.md names files that do not exist: {missing}"
    roots = [e.rstrip("/") for e in entries]
    uncovered = [str(rel) for rel in example_files() if rel.as_posix() != "SOURCES.md"
                 and not any(rel.as_posix() == r or rel.as_posix().startswith(r + "/") for r in roots)]
    assert not uncovered, f"files in examples/ without a provenance entry in examples/SOURCES.md: {uncovered[:10]}"


def test_the_mevis_frames_are_the_davis_frames():
    """``mevis-mini`` stores its frames once, as a link to the identical DAVIS frames (the MeViS layout still works)."""
    mevis = EXAMPLES / "mevis-mini" / "valid_u" / "JPEGImages" / "blackswan"
    davis = EXAMPLES / "ref-davis17-mini" / "DAVIS" / "JPEGImages" / "480p" / "blackswan"
    assert mevis.resolve() == davis.resolve()
    assert len(sorted(mevis.glob("*.jpg"))) == 50


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_documented_example_paths_exist(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    paths = sorted(set(re.findall(r"(?<![\w/.])examples/[\w./-]*[\w]", text)))
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{doc} names example paths that do not exist: {missing}"
    if doc == "README.md":
        assert "examples/bedroom.mp4" in paths, "the README's first command runs on examples/bedroom.mp4"
