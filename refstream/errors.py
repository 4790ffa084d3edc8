"""Errors that reach the user (re-exported from the leaf module :mod:`refstream_errors`).

The classes live in ``refstream_errors`` so that the lower packages (``workers``, ``pruning``,
``video_pipeline``, ``eval``) can raise them without importing ``refstream``; these are the same class
objects, so ``except refstream.errors.InputError`` catches an error raised as ``refstream_errors.InputError``.
"""

from __future__ import annotations

from refstream_errors import (
    ConfigError,
    DatasetLayoutError,
    ExpressionError,
    InputError,
    RefStreamError,
    SequenceTooLongError,
    WeightsNotFoundError,
)

__all__ = [
    "ConfigError",
    "DatasetLayoutError",
    "ExpressionError",
    "InputError",
    "RefStreamError",
    "SequenceTooLongError",
    "WeightsNotFoundError",
]
