"""Errors that reach the user: a leaf module that imports nothing of the project.

Every package (``refstream``, ``workers``, ``pruning``, ``video_pipeline``, ``eval``) raises these, so they
live below all of them (the layer rules are in ``.importlinter``); :mod:`refstream.errors` re-exports the
same classes, so ``except refstream.errors.InputError`` and ``except refstream_errors.InputError`` catch the
same errors.

Every error a user can cause (bad input file, empty expression, missing weights, wrong dataset layout)
is a :class:`RefStreamError`. The CLI prints its message and exits with code 2; the message names the
problem *and* the fix, in the style of LitServe's errors.
"""

from __future__ import annotations


class RefStreamError(Exception):
    """A user-facing error: bad input or configuration. The CLI exits with :attr:`exit_code` (2)."""

    exit_code = 2


class InputError(RefStreamError):
    """The input video or frame folder is missing, empty, corrupt or unsupported."""


class ExpressionError(RefStreamError):
    """A referring expression is empty or otherwise unusable."""


class ConfigError(RefStreamError):
    """A model preset, config file or option combination is invalid."""


class WeightsNotFoundError(RefStreamError):
    """Model weights are not where the configuration says they are."""


class SequenceTooLongError(RefStreamError):
    """The LLM input sequence would exceed the model's maximum positions."""


class DatasetLayoutError(RefStreamError):
    """A dataset folder does not have the expected layout (the message shows the layout)."""
