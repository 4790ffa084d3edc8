"""Typed configuration: model presets (YAML in ``configs/``), re-exported from :mod:`workers.config`.

The schema and the loader live in ``workers`` (the model code below ``refstream`` reads them); these are the
same objects, so ``refstream.config.ModelConfig`` and ``workers.config.ModelConfig`` are one class.
"""

from __future__ import annotations

from workers.config import *  # noqa: F401,F403 - the same objects, named by workers.config.__all__
from workers.config import __all__  # noqa: F401
