"""Shared pytest fixtures: paths to the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("REFSTREAM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bedroom_mp4(shared_data: Path) -> Path:
    return shared_data / "videos" / "bedroom.mp4"


@pytest.fixture(scope="session")
def blackswan_dir(shared_data: Path) -> Path:
    return shared_data / "ref-davis17-mini" / "DAVIS" / "JPEGImages" / "480p" / "blackswan"
