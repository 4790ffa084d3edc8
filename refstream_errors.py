"""Errors that reach the user: a leaf module that imports nothing of the project.

Every package (``refstream``, ``workers``, ``pruning``, ``video_pipeline``, ``eval``) raises these, so they
live below all of them (the layer rules are in ``.importlinter``); :mod:`refstream.errors` re-exports the
same classes, so ``except refstream.errors.InputError`` and ``except refstream_errors.InputError`` catch the
same errors.

Every error a user can cause (bad input file, empty expression, missing weights, wrong dataset layout)
is a :class:`RefStreamError`. The CLI prints its message and exits with code 2; the message names the
problem *and* the fix, in the style of LitServe's errors.

A message that names an option speaks the caller's language through ONE mechanism: the raiser writes
:func:`option` (``f"read it with {option('decoder', 'pyav')}"``), which leaves a marker in the text, and the
error is rendered when it is shown (``str(error)``): as a command-line flag (``--decoder pyav``: the default,
and what ``refstream`` sets while a command runs) or as a Python argument (``decoder='pyav'``: what the Python
API, :mod:`refstream.api`, sets on the errors it raises; see :func:`option_style` and
:attr:`RefStreamError.style`).
"""

from __future__ import annotations

import ast
import contextvars
import re
from contextlib import contextmanager
from typing import Iterator, Literal

Style = Literal["cli", "api"]
_STYLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("refstream_option_style", default=None)
_NO_VALUE = object()
#: an option marker: US, name, optionally RS + repr(value), US (ASCII unit/record separators never appear in
#: paths or text a user types, and are removed by rendering)
_VALUE, _QUOTED = "\x1e", "\x1d"
_MARKER = re.compile("\x1f([A-Za-z_][A-Za-z0-9_]*)(?:([\x1d\x1e])(.*?))?\x1f", re.S)
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def flag_name(name: str) -> str:
    """The command-line flag of an option (``max_frames`` -> ``--max-frames``; ``expressions`` ->
    ``--expression``, which is repeated)."""
    return "--expression" if name == "expressions" else "--" + name.replace("_", "-")


def option(name: str, value: object = _NO_VALUE, *, quoted: bool = False) -> str:
    """A reference to option ``name`` (optionally set to ``value``) inside a user-facing message.

    Rendered when the message is shown (:func:`render_options`): ``--max-frames 4`` / ``--decoder pyav`` on the
    command line, ``max_frames=4`` / ``decoder='pyav'`` in the Python API; without a value ``--max-frames`` /
    ``max_frames``. ``value`` must be a Python literal (str, int, float, bool, None, or a list of them).
    ``quoted=True`` echoes a value the user gave as its ``repr`` in both styles (``--method 'bogus'``), so that
    stray spaces or an empty string show.
    """
    if value is _NO_VALUE:
        return f"\x1f{name}\x1f"
    return f"\x1f{name}{_QUOTED if quoted else _VALUE}{value!r}\x1f"


def _cli_value(value: object) -> str:
    text = str(value)
    return text if _PLAIN.fullmatch(text) else '"' + text.replace('"', '\\"') + '"'


def render_options(text: str, style: Style | None = None) -> str:
    """``text`` with every :func:`option` marker written as a flag (``style="cli"``) or an argument
    (``"api"``); ``None``: the current :func:`option_style` (``"cli"`` unless set)."""
    style = style or _STYLE.get() or "cli"

    def one(match: re.Match) -> str:
        name, kind, literal = match.group(1), match.group(2), match.group(3)
        if style == "api":
            return name if literal is None else f"{name}={literal}"
        flag = flag_name(name)
        if literal is None:
            return flag
        if kind == _QUOTED:
            return f"{flag} {literal}"
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            value = literal
        values = value if isinstance(value, list) and value else [value]
        return " ".join(f"{flag} {_cli_value(v)}" for v in values)

    return _MARKER.sub(one, text)


@contextmanager
def option_style(style: Style) -> Iterator[None]:
    """Render option markers as ``style`` (``"cli"`` or ``"api"``) in this context (a
    :class:`contextvars.ContextVar`: per thread and per asyncio task)."""
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)


def current_option_style() -> Style | None:
    """The style set by the innermost :func:`option_style`, or None (nothing set: errors then render as
    flags, unless they carry their own :attr:`RefStreamError.style`)."""
    return _STYLE.get()


@contextmanager
def api_errors() -> Iterator[None]:
    """Mark the :class:`RefStreamError` raised inside as the Python API's (``style = "api"``: ``decoder='pyav'``)
    unless a caller set a style around it (``refstream run`` calls the API inside ``option_style("cli")``)."""
    try:
        yield
    except RefStreamError as exc:
        if exc.style is None and _STYLE.get() is None:
            exc.style = "api"
        raise


class RefStreamError(Exception):
    """A user-facing error: bad input or configuration. The CLI exits with :attr:`exit_code` (2).

    ``str(error)`` renders the :func:`option` markers of the message in :attr:`style` when set (the Python
    API sets ``"api"``), else in the current :func:`option_style`.
    """

    exit_code = 2
    style: Style | None = None

    def __str__(self) -> str:
        return render_options(super().__str__(), self.style)

    def in_style(self, style: Style) -> "RefStreamError":
        """Set :attr:`style` (how the options this error names are written) and return the error."""
        self.style = style
        return self


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
