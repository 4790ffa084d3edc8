"""The options model: every option of a RefStream job, defined once, with its default, unit and validation.

One pydantic hierarchy; each field is declared in exactly one class and inherited by everything that
takes it, so defaults and validation cannot drift between the CLI, the service and the benchmark:

=====================  =================================================================================
:class:`SharedOptions`  how frames are chosen and how the LLM is asked: the same for every run of a video
                        (variant, placement, frames, clip_length, stride, max_frames, decoder, clip_text,
                        answer, seed) and how SAM2 is fed (sam2_chunk, overlap: speed only, same masks)
:class:`JobOptions`     + what one job asks for: ``expressions``, ``method``, ``budget``
:class:`ModelOptions`   which model, where and how precisely it runs: ``model``, ``checkpoint``, ``device``,
                        ``dtype``
:class:`RunOptions`     :class:`JobOptions` + :class:`ModelOptions`: every option of ``refstream run``
:class:`SweepOptions`   :class:`SharedOptions` + ``sam2_pass``: the options of a benchmark sweep (the sweep
                        itself names methods and budgets)
=====================  =================================================================================

``refstream.service.jobs.JobRequest`` extends :class:`JobOptions` with the job's ``input`` (the service owns
the model). The ``run`` command line is derived from :class:`RunOptions` by :func:`add_option_arguments`
(flag, type, choices, help text and the one default all come from the field).

A bad option is refused at construction, everywhere the same way: :class:`refstream.errors.ConfigError`
(or :class:`refstream.errors.ExpressionError` for expressions) whose message names each bad option as its
command-line flag, the value given and the fix. The pruning ``method`` (``NAME[:OPTION,KEY=VALUE]``) and the
LiteLVLM ``variant`` are checked against the pruning registry (:mod:`pruning.registry`).
"""

from __future__ import annotations

import argparse
import typing
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from refstream.errors import ConfigError, ExpressionError, RefStreamError
from refstream_errors import flag_name, option

#: the precisions a model can run in; ``auto`` = float32 on the CPU, bfloat16 on CUDA
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
#: LiteLVLM's variants and the built-in pruning methods, for ``--help`` and the CLI's choices; validation asks
#: the registry itself (``pruning.litelvlm.VARIANTS``, ``pruning.registry.available_methods``), and a test
#: keeps these two lists equal to it
VARIANT_NAMES = ("paper", "official", "context-heavy")
#: the default of ``max_pixels``: 8K UHD, 7680 x 4320 pixels (the same number as
#: ``video_pipeline.video_file.MAX_PIXELS``, which is not imported here: it loads PyAV; a test keeps them equal)
MAX_PIXELS = 7680 * 4320
#: default ``sam2_chunk`` (frames per SAM2 image-encoder batch) by device type. On the 2-core CPU batching did
#: not pay for the real model: the full-size SAM2 (Hiera-L, 1024 px) ran 0.077-0.081 frames/s with 4 frames
#: per batch vs 0.087-0.092 frame by frame (docs/bench_sam2_cpu.txt), hence 1; with tiny 4 took 0.97x. On GPUs
#: (fewer, larger kernels) 4, not measured yet.
SAM2_CHUNK_DEFAULTS = {"cpu": 1, "cuda": 4}


def sam2_chunk_for(value: int | None, device_type: str) -> int:
    """``value`` when given, else :data:`SAM2_CHUNK_DEFAULTS` of ``device_type`` (``cpu``, ``cuda``; others: 1)."""
    return int(value) if value is not None else SAM2_CHUNK_DEFAULTS.get(device_type, 1)
METHOD_NAMES = ("fastv", "litelvlm", "none", "prumerge", "prumerge+", "random", "trim", "visionzip", "vispruner")


def _registry():
    """``pruning.registry`` and ``pruning.litelvlm``, imported on first validation: they import torch, and
    building the command line or the service client (``refstream status``) must not load it."""
    import pruning.litelvlm  # lazy: heavy (torch), see the docstring
    import pruning.registry  # lazy: heavy (torch), see the docstring

    return pruning.registry, pruning.litelvlm


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``name[:opt[,key=value...]]`` -> (name, options).

    A bare option is LiteLVLM's variant (``litelvlm:official``); ``key=value`` sets any option
    (``random:seed=3``, ``visionzip:dominant_ratio=0.8``). Values are parsed as int, then float, else str.

    Raises:
        ConfigError: an empty name.
    """
    name, _, rest = spec.partition(":")
    if not name:
        raise ConfigError(f"bad {option('method', spec, quoted=True)}: expected NAME or NAME:OPTION[,KEY=VALUE...]")
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            key, value = "variant", item
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key.strip()] = value
    return name, options


def make_method(spec: str, variant: str = "paper"):
    """A :class:`pruning.registry.PruningMethod` from a ``--method`` spec; ``variant`` fills LiteLVLM's default.

    Raises:
        ConfigError: an unknown method name or option (the message lists the choices).
    """
    method_name, method_options = parse_method_spec(spec)
    if method_name == "litelvlm":
        method_options.setdefault("variant", variant)
    return _registry()[0].get_method(method_name, **method_options)


def flag(name: str) -> str:
    """The command-line flag of an option field (``max_frames`` -> ``--max-frames``; ``expressions`` ->
    ``--expression``, which is repeated): :func:`refstream_errors.flag_name`."""
    return flag_name(name)


def options_error(exc: ValidationError) -> RefStreamError:
    """One user-facing error for a failed validation: each bad option as ``--flag VALUE: problem and fix``
    (``name=VALUE: ...`` when the Python API shows it: :func:`refstream_errors.option`).

    Returns :class:`ExpressionError` when an expression is at fault, else :class:`ConfigError`.
    """
    lines, expression = [], False
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        expression |= field == "expressions"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown option {field!r}: remove it (the options are listed by refstream run --help "
                         "and are the fields of refstream.options.RunOptions)")
        elif field:
            lines.append(f"{option(field, err.get('input'), quoted=True)}: {message}")
        else:
            lines.append(message)
    text = "invalid option" + ("s" if len(lines) > 1 else "") + ": " + "; ".join(lines)
    return ExpressionError(text) if expression else ConfigError(text)


class _Options(BaseModel):
    """Frozen, strict about unknown fields, and raising :class:`RefStreamError` instead of pydantic's error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise options_error(exc) from None

    @classmethod
    def parse(cls, data: dict | str | bytes):
        """Validate a mapping or a JSON document (the service's payloads).

        Raises:
            ConfigError / ExpressionError: as the constructor, for bad or unknown fields.
        """
        try:
            if isinstance(data, (str, bytes)):
                return cls.model_validate_json(data)
            return cls.model_validate(data)
        except ValidationError as exc:
            raise options_error(exc) from None


def clean_expressions(value: list[str], required: bool = True) -> list[str]:
    """Referring expressions stripped; raises ValueError (no expression when ``required``, or an empty one).
    The one check behind :class:`JobOptions`, :class:`LiveOptions` and a live prompt."""
    if required and not value:
        raise ValueError(f"no referring expression: pass {option('expressions', ['the black swan'])}")
    cleaned = [e.strip() for e in value]
    if any(not e for e in cleaned):
        raise ValueError(f"a referring expression is empty: pass {option('expressions', ['the black swan'])}")
    for e in cleaned:
        if not any(_visible(ch) for ch in e):
            raise ValueError(f"a referring expression has no visible character ({len(e)} invisible: "
                             f"{', '.join(sorted({f'U+{ord(ch):04X}' for ch in e}))}): pass words, e.g. "
                             f"{option('expressions', ['the black swan'])}")
    return cleaned


def _visible(ch: str) -> bool:
    """A character that shows: not whitespace, not a format or control character (zero-width spaces, joiners,
    BOMs, bidi marks: Unicode categories Cf, Cc, Z*)."""
    return not ch.isspace() and unicodedata.category(ch)[0] not in ("C", "Z")


def _positive(value: int | None, fix: str) -> int | None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise ValueError(f"must be an integer >= 1; {fix}")
    return value


class SharedOptions(_Options):
    """How frames are chosen and the LLM is asked: the same for every run over one video."""

    variant: str = Field(
        "paper", description="LiteLVLM variant: paper, official (the released code's selection) or "
                             "context-heavy (the paper's 5% similarity-aware variant)",
        json_schema_extra={"choices": list(VARIANT_NAMES)})
    placement: Literal["pooled", "patch"] = Field(
        "pooled", description="pooled: the budget becomes round(B/4) of the 144 pooled 12x12 cells; "
                              "patch: B unpooled patches per frame")
    frames: int = Field(16, description="encoder frames (CLIP and InternVideo2), a multiple of 4")
    clip_length: int | None = Field(
        None, description="cut the video into clips of N frames, each with its own encoder frames, LLM answer "
                          "and SAM2 state (VideoGLaMM's Ref-DAVIS protocol: 64); default: one clip",
        json_schema_extra={"metavar": "N"})
    stride: int = Field(1, description="segment every k-th frame (1: every frame)")
    max_frames: int | None = Field(None, description="segment at most this many frames (default: all)",
                                   json_schema_extra={"metavar": "N"})
    decoder: Literal["decord", "pyav"] = Field("decord", description="video decoder")
    max_pixels: int = Field(
        MAX_PIXELS, description="refuse frames above this many pixels (width x height), checked from the file's "
        "headers before anything is decoded; the default takes 8K (7680x4320)", json_schema_extra={"metavar": "N"})
    clip_text: Literal["question", "expression"] = Field(
        "question", description="text given to CLIP for LiteLVLM: the LLM question or the bare expression")
    answer: Literal["forced", "generate", "sample"] = Field(
        "forced", description='forced: answer "Sure, [SEG]." in one prefill; generate: greedy decoding; sample: '
        "sampling with the checkpoint's temperature and top-p (generation_config.json), seeded by --seed")
    seed: int = Field(0, description="seed of --answer sample (recorded with the results)")
    sam2_chunk: int | None = Field(
        None, description="frames whose SAM2 image features are computed in one batch (1: frame by frame); the "
        "masks do not change; default: 4 with CUDA, 1 on the CPU (where batching measured slower)",
        json_schema_extra={"metavar": "N"})
    overlap: bool | None = Field(
        None, description="decode the next frames and write the outputs in background threads while SAM2 runs "
        "(--no-overlap: one thread, in turn); default: on with CUDA, off on the CPU, where torch's threads "
        "already use every core and a writer thread beside them made the job slower (docs/bench_sam2_cpu.txt)")

    @field_validator("variant")
    @classmethod
    def _variant(cls, value: str) -> str:
        variants = _registry()[1].VARIANTS  # the variants pruning.litelvlm implements
        if value not in variants:
            raise ValueError(f"unknown LiteLVLM variant; choose one of: {', '.join(variants)}")
        return value

    @field_validator("frames")
    @classmethod
    def _frames(cls, value: int) -> int:
        if isinstance(value, bool) or value < 4 or value % 4:
            raise ValueError("must be a positive multiple of 4 (InternVideo2 takes 4-frame chunks); VideoGLaMM uses 16")
        return value

    @field_validator("clip_length")
    @classmethod
    def _clip_length(cls, value: int | None) -> int | None:
        return _positive(value, "VideoGLaMM's Ref-DAVIS protocol uses 64; omit it for one clip")

    @field_validator("stride")
    @classmethod
    def _stride(cls, value: int) -> int:
        return _positive(value, "1 segments every frame")

    @field_validator("max_frames")
    @classmethod
    def _max_frames(cls, value: int | None) -> int | None:
        return _positive(value, "omit it to segment every frame")

    @field_validator("max_pixels")
    @classmethod
    def _max_pixels(cls, value: int) -> int:
        return _positive(value, f"the default {MAX_PIXELS} takes 8K (7680x4320)")

    @field_validator("sam2_chunk")
    @classmethod
    def _sam2_chunk(cls, value: int | None) -> int | None:
        if value is None:
            return None
        return _positive(value, "1 runs SAM2's image encoder frame by frame; the default is "
                                f"{SAM2_CHUNK_DEFAULTS['cuda']} with CUDA, {SAM2_CHUNK_DEFAULTS['cpu']} on the CPU")


class JobOptions(SharedOptions):
    """What one job asks for: the referring expressions, the pruning method and its budget."""

    expressions: list[str] = Field(
        description="referring expression; repeat for several objects (they share one pruning per frame)",
        json_schema_extra={"short": "-e", "metavar": "TEXT"})
    method: str = Field(
        "litelvlm", description="pruning method: NAME or NAME:OPTION[,KEY=VALUE] (litelvlm:official, "
                                "random:seed=3); one of " + ", ".join(METHOD_NAMES),
        json_schema_extra={"metavar": "NAME[:OPTS]"})
    budget: int = Field(196, description="visual tokens kept per frame, of CLIP's 576")

    @field_validator("expressions")
    @classmethod
    def _expressions(cls, value: list[str]) -> list[str]:
        return clean_expressions(value)

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: int) -> int:
        return _positive(value, "576 keeps every token; the paper uses 196 and 81")

    @field_validator("method")
    @classmethod
    def _method_in_registry(cls, value: str) -> str:
        try:
            make_method(value)
        except RefStreamError as exc:
            raise ValueError(exc.args[0] if exc.args else str(exc)) from None  # markers kept: rendered later
        return value


class ModelOptions(_Options):
    """Which model runs, from which weights, where, and in which precision."""

    model: str = Field("videoglamm", description="tiny | videoglamm | path/to/config.yaml",
                       json_schema_extra={"metavar": "PRESET|CONFIG"})
    checkpoint: str | None = Field(None, description="the VideoGLaMM checkpoint folder",
                                   json_schema_extra={"metavar": "DIR"})
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible, else the CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model precision: auto = float32 on the CPU, bfloat16 on CUDA")

    @model_validator(mode="after")
    def _cpu_precision(self):
        if self.device == "cpu" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"{option('dtype', self.dtype)} needs a CUDA GPU; on the CPU use "
                             f"{option('dtype', 'float32')} (or auto)")
        return self


class RunOptions(JobOptions, ModelOptions):
    """Every option of ``refstream run`` (and of :meth:`refstream.Segmenter.segment`).

    Raises (at construction):
        ExpressionError: no expression, or an empty one.
        ConfigError: any other bad or unknown option, named with its flag and the fix.
    """


class SweepOptions(SharedOptions):
    """Options of :meth:`refstream.pipeline.Pipeline.run_sweep` shared by every (method, budget) run."""

    sam2_pass: Literal["run", "video"] = Field(
        "run", description="run: one SAM2 pass per (method, budget); video: one pass for every run")


class LiveOptions(JobOptions):
    """Options of live tracking (:class:`refstream.live.engine.LiveEngine`): a job's options, the first prompt
    optional (it can come later), and how the source is played."""

    expressions: list[str] = Field(
        default_factory=list,
        description="referring expression to track from the start; repeat for several objects (optional)",
        json_schema_extra={"short": "-e", "metavar": "TEXT"})
    fps: float | None = Field(None, description="play a file source at this rate (default: its own)",
                              json_schema_extra={"metavar": "FPS"})
    loop: bool = Field(False, description="play a file source again from the start when it ends")
    decoder: Literal["decord", "pyav"] = Field(
        "pyav", description="decoder of a file source: pyav (streams with flat memory) or decord (its reader "
        "buffers swing RSS by 250-500 MiB on a looped 540p file, measured by tests/test_live_memory.py's author)")
    reground_every: float | None = Field(
        None, description="re-ground the current expressions every so many seconds (drift recovery; default off)",
        json_schema_extra={"metavar": "SECONDS"})
    size: str | None = Field(None, description="resize the source's frames to WIDTHxHEIGHT pixels (default: as they are)",
                             json_schema_extra={"metavar": "WxH"})

    source_option: list[str] = Field(
        default_factory=list,
        description="an FFmpeg input option KEY=VALUE for a stream or camera source, e.g. rtsp_flags=listen or "
        "video_size=640x480 (repeatable; overrides the low-delay defaults)",
        json_schema_extra={"metavar": "KEY=VALUE"})

    @field_validator("source_option")
    @classmethod
    def _source_option(cls, value: list[str]) -> list[str]:
        for item in value:
            key, sep, _ = item.partition("=")
            if not (sep and key.strip()):
                raise ValueError(f"{item!r} is not KEY=VALUE (e.g. rtsp_transport=udp)")
        return value

    @property
    def source_options(self) -> dict[str, str]:
        """``source_option`` as a dict of FFmpeg input options."""
        return dict(item.partition("=")[::2] for item in self.source_option)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        width, sep, height = value.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) >= 2 and int(height) >= 2):
            raise ValueError("must be WIDTHxHEIGHT in pixels, e.g. 426x240")
        return f"{int(width)}x{int(height)}"

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """``size`` as (width, height) pixels, or None."""
        if self.size is None:
            return None
        width, _, height = self.size.partition("x")
        return int(width), int(height)

    @field_validator("expressions")
    @classmethod
    def _expressions(cls, value: list[str]) -> list[str]:
        return clean_expressions(value, required=False)

    @field_validator("fps", "reground_every")
    @classmethod
    def _positive_seconds(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be > 0 (omit it for the default)")
        return value


# ------------------------------------------------------------------------------------------- command line
def _is_optional(annotation) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


#: the order options are listed in ``--help``: what to segment, how to prune, which frames, which model
FLAG_ORDER = ("expressions", "method", "variant", "budget", "placement", "frames", "clip_length", "stride",
              "max_frames", "decoder", "max_pixels", "clip_text", "answer", "seed", "sam2_pass", "sam2_chunk", "overlap",
              "model", "checkpoint", "device", "dtype")


def _flag_rank(name: str) -> int:
    return FLAG_ORDER.index(name) if name in FLAG_ORDER else len(FLAG_ORDER)


def add_option_arguments(parser: argparse.ArgumentParser, model: type[_Options], *, only=None, exclude=()) -> None:
    """Add one ``--flag`` per field of ``model`` to ``parser``: type, choices, help and the default shown come
    from the field. Arguments default to "not given" so that the model's own default applies.

    Args:
        only: field names to add (default: every field), in this order.
        exclude: field names to leave out.
    """
    names = list(only) if only is not None else sorted(model.model_fields, key=_flag_rank)
    for name in names:
        if name in exclude:
            continue
        field = model.model_fields[name]
        extra = field.json_schema_extra or {}
        annotation, _ = _is_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        flags = [flag(name)] + ([extra["short"]] if "short" in extra else [])
        help_text = field.description or ""
        if typing.get_origin(annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif "choices" in extra:
            kwargs["choices"] = list(extra["choices"])
        elif typing.get_origin(annotation) is list:
            kwargs["action"] = "append"
        elif annotation is bool:
            # on by default or decided at run time (None): --flag / --no-flag; off by default: --flag
            kwargs["action"] = argparse.BooleanOptionalAction if field.default is not False else "store_true"
        elif annotation is int:
            kwargs["type"] = int
            kwargs["metavar"] = "N"
        elif annotation is float:
            kwargs["type"] = float
        if "metavar" in extra:
            kwargs["metavar"] = extra["metavar"]
        if field.is_required():
            help_text += " (required)"
        elif field.default not in (None, False) and field.default is not True and field.default_factory is None:
            help_text += f" (default {field.default})"
        kwargs["help"] = help_text.replace("%", "%%")
        parser.add_argument(*flags, **kwargs)


def options_from_args(model: type[_Options], args: argparse.Namespace, **extra):
    """Build ``model`` from the fields present in ``args`` (plus ``extra``); raises as the constructor."""
    given = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    given.update(extra)
    if "expressions" in model.model_fields:
        given.setdefault("expressions", [])
    return model(**given)
