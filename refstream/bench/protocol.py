"""Evaluation protocols as data: how the original VideoGLaMM code evaluates each dataset.

One YAML per dataset in ``configs/protocols/`` (``ref-davis17.yaml``, ``mevis.yaml``, ``refytvos.yaml``), each
field with the original file and lines it was read from (``sources``). ``refstream bench run`` takes the
dataset's protocol for every field the command line leaves alone; a flag that changes a protocol field is
allowed, printed as a warning, and the results are marked ``"protocol": {..., "off_protocol": true}``.

Fields the sweep applies today: ``clip_length``, ``answer``, ``merge`` and ``seed``. The others (``dtype``,
``max_new_tokens``, ``runs_scored``, ``frames``) are recorded and shown so a result can be read against the
original; docs/design.md, section Evaluation, says where RefStream still differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from refstream.errors import ConfigError

#: the fields a run applies from its protocol, as (protocol field, ``bench run`` flag)
APPLIED = (("clip_length", "--clip-length"), ("answer", "--answer"), ("merge", "--merge"), ("seed", "--seed"))
#: what every result JSON records under ``"protocol"``
RECORDED = ("name", "clip_length", "merge", "answer", "seed")


class Protocol(BaseModel):
    """One dataset's evaluation protocol (``configs/protocols/<dataset>.yaml``).

    Attributes:
        name: e.g. ``videoglamm-ref-davis17``.
        dataset: ``ref-davis17`` | ``mevis`` | ``refytvos`` (the ``bench run --dataset`` names).
        split: the split the protocol scores.
        clip_length: frames per clip (each clip: its own encoder frames, LLM answer, SAM2 state); None: the
            whole video is one clip.
        merge: how several objects become one label map (``first-wins`` | ``highest-probability``, see
            :func:`refstream.bench.runs.merge_objects`); None: one object per expression.
        mask_threshold: a pixel is foreground where its mask logit is above this.
        frames: ``all`` frames of the video, or the ``listed`` ones (the dataset's meta).
        encoder_frames: CLIP and InternVideo2 frames per clip.
        answer: ``forced`` | ``generate`` (how the LLM answers; see :class:`refstream.options.SharedOptions`).
        max_new_tokens: the original's generation limit.
        seed: recorded with every result.
        dtype: the original's precision.
        runs_scored: the annotator runs the original scores (Ref-DAVIS-17).
        output: the prediction layout.
        sources: field -> the original file and lines it was read from; every field but ``name``, ``dataset``
            and ``sources`` must have one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dataset: Literal["ref-davis17", "mevis", "refytvos"]
    split: str
    clip_length: int | None = Field(ge=1)
    merge: Literal["first-wins", "highest-probability"] | None
    mask_threshold: float
    frames: Literal["all", "listed"]
    encoder_frames: int = Field(ge=4, multiple_of=4)
    answer: Literal["forced", "generate"]
    max_new_tokens: int = Field(ge=1)
    seed: int
    dtype: Literal["float32", "float16", "bfloat16"]
    runs_scored: list[str]
    output: str
    sources: dict[str, str]

    @model_validator(mode="after")
    def _every_field_cited(self) -> "Protocol":
        missing = [f for f in type(self).model_fields if f not in ("name", "dataset", "sources")
                   and f not in self.sources]
        if missing:
            raise ValueError(f"sources must cite the original for every field; missing: {', '.join(missing)}")
        return self

    def record(self, overrides: dict[str, object] | None = None) -> dict:
        """What a result JSON stores under ``"protocol"``: ``name``, ``clip_length``, ``merge``, ``answer``,
        ``seed`` (the values used), ``off_protocol`` and, when off, ``overrides`` (field -> value used)."""
        overrides = dict(overrides or {})
        values = {k: overrides.get(k, getattr(self, k)) for k in RECORDED}
        values["off_protocol"] = bool(overrides)
        if overrides:
            values["overrides"] = {k: {"protocol": getattr(self, k), "used": v} for k, v in overrides.items()}
        return values


def protocol_dir() -> Path:
    """``configs/protocols`` (the source checkout's, else the installed copy)."""
    from workers.config import CONFIG_DIR

    return CONFIG_DIR / "protocols"


def load_protocol(dataset: str) -> Protocol:
    """The protocol of ``dataset`` (``ref-davis17``, ``mevis``, ``refytvos``).

    Raises:
        ConfigError: no protocol file for it, or the file does not follow :class:`Protocol` (the message
            names the file and the field).
    """
    path = protocol_dir() / f"{dataset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in protocol_dir().glob("*.yaml"))
        raise ConfigError(f"no evaluation protocol for {dataset!r} ({path} is missing). Fix: use one of "
                          f"{', '.join(known) or 'ref-davis17, mevis, refytvos'} or reinstall RefStream.")
    try:
        return Protocol(**(yaml.safe_load(path.read_text()) or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path} is not a valid protocol ({problems}). Fix: restore it from the RefStream "
                          "repository.") from None
    except (yaml.YAMLError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid protocol ({exc}). Fix: restore it from the RefStream "
                          "repository.") from None


def apply_protocol(protocol: Protocol, given: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """The applied fields' values for a run: the protocol's, except where ``given`` (flags the user passed).

    Args:
        given: protocol field -> the value a flag asked for (only flags actually given).

    Returns:
        (values for every applied field, overrides: the given values that differ from the protocol).
    """
    values = {field: getattr(protocol, field) for field, _ in APPLIED}
    overrides = {k: v for k, v in given.items() if k in values and v != values[k]}
    values.update(given)
    return values, overrides
