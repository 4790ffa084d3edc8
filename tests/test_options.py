"""The one options model (refstream/options.py): defaults, validation and the messages, the same everywhere."""

from __future__ import annotations

import argparse
import json

import pytest

from refstream.cli import build_parser, main
from refstream.errors import ConfigError, ExpressionError
from refstream.options import (
    JobOptions, ModelOptions, RunOptions, SharedOptions, SweepOptions, add_option_arguments, make_method,
    options_from_args, parse_method_spec,
)
from refstream.service.jobs import JobRequest

BAD = [  # (field values, the words the message must hold)
    ({"budget": 0}, "--budget 0: must be an integer >= 1"),
    ({"frames": 6}, "--frames 6: must be a positive multiple of 4"),
    ({"stride": 0}, "--stride 0: must be an integer >= 1"),
    ({"max_frames": 0}, "--max-frames 0: must be an integer >= 1"),
    ({"clip_length": 0}, "--clip-length 0: must be an integer >= 1"),
    ({"placement": "grid"}, "--placement 'grid': Input should be 'pooled' or 'patch'"),
    ({"variant": "nope"}, "--variant 'nope'"),
    ({"method": "bogus"}, "--method 'bogus': unknown pruning method 'bogus'; choose one of:"),
    ({"method": "random:seed=x"}, "--method 'random:seed=x'"),
    ({"answer": "maybe"}, "--answer 'maybe'"),
    ({"unknown_option": 1}, "unknown option 'unknown_option'"),
]


@pytest.mark.parametrize("values,words", BAD)
def test_a_bad_option_is_refused_with_one_message_everywhere(values, words):
    messages = []
    for build in (lambda: RunOptions(expressions=["the dog"], **values),
                  lambda: JobOptions(expressions=["the dog"], **values),
                  lambda: JobRequest(input="/v.mp4", expressions=["the dog"], **values),
                  lambda: JobRequest.from_json(json.dumps({"input": "/v.mp4", "expressions": ["the dog"], **values}))):
        with pytest.raises(ConfigError) as err:
            build()
        messages.append(str(err.value))
    assert words in messages[0]
    assert len(set(messages)) == 1, messages
    if set(values) <= set(SweepOptions.model_fields):  # the sweep shares the fields it has, and their messages
        with pytest.raises(ConfigError) as err:
            SweepOptions(**values)
        assert str(err.value) == messages[0]


def test_the_bug_the_issue_found_is_gone():
    with pytest.raises(ConfigError) as err:
        JobRequest(input="/v.mp4", expressions=["the bed"], method="bogus", variant="nope")
    assert "--method 'bogus'" in str(err.value) and "--variant 'nope'" in str(err.value)


@pytest.mark.parametrize("expressions", [[], [""], ["the dog", "   "]])
def test_expressions_are_checked_as_expressions(expressions):
    for build in (lambda: RunOptions(expressions=expressions), lambda: JobRequest(input="/v", expressions=expressions)):
        with pytest.raises(ExpressionError, match="--expression"):
            build()


def test_expressions_are_stripped_and_options_frozen():
    options = RunOptions(expressions=["  the black swan "])
    assert options.expressions == ["the black swan"]
    with pytest.raises(Exception):
        options.budget = 81


def test_one_default_per_field():
    """Each field is declared once: every class that has it inherits the very same FieldInfo and default."""
    for cls in (RunOptions, JobOptions, SweepOptions, JobRequest):
        for name, field in cls.model_fields.items():
            owner = next(c for c in (SharedOptions, JobOptions, ModelOptions, SweepOptions, JobRequest)
                         if name in c.model_fields and name in c.__annotations__)
            assert field.default == owner.model_fields[name].default, (cls.__name__, name)
    assert RunOptions(expressions=["x"]).budget == JobRequest(input="v", expressions=["x"]).budget == 196
    assert not set(JobRequest.model_fields) & {"model", "checkpoint", "device", "dtype"}  # the service owns those
    assert set(SweepOptions.model_fields) - set(SharedOptions.model_fields) == {"sam2_pass"}


def test_cpu_half_precision_is_refused_before_loading():
    with pytest.raises(ConfigError, match="--dtype bfloat16 needs a CUDA GPU"):
        RunOptions(expressions=["x"], device="cpu", dtype="bfloat16")
    assert RunOptions(expressions=["x"], device="cuda", dtype="bfloat16").dtype == "bfloat16"


def test_run_cli_is_derived_from_the_model():
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices["run"]._actions if a.dest == "budget")
    assert run.default == argparse.SUPPRESS and "(default 196)" in run.help
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run_parser._actions}
    assert set(RunOptions.model_fields) <= dests
    choices = {a.dest: a.choices for a in run_parser._actions}
    assert choices["placement"] == ["pooled", "patch"] and choices["dtype"] == ["auto", "float32", "bfloat16", "float16"]
    args = parser.parse_args(["run", "v.mp4", "-e", "the dog", "-e", "the cat", "--budget", "81", "--out", "o"])
    options = options_from_args(RunOptions, args)
    assert options == RunOptions(expressions=["the dog", "the cat"], budget=81)


def test_cli_refuses_bad_options_with_the_models_message(tmp_path, capsys):
    for argv, words in (
        (["--budget", "0"], "--budget 0: must be an integer >= 1"),
        (["--frames", "6"], "--frames 6: must be a positive multiple of 4"),
        (["--method", "bogus"], "--method 'bogus': unknown pruning method"),
    ):
        code = main(["run", str(tmp_path / "missing.mp4"), "-e", "the dog", "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and words in err
        assert not (tmp_path / "o").exists()


def test_add_option_arguments_only_and_exclude():
    parser = argparse.ArgumentParser()
    add_option_arguments(parser, RunOptions, only=["budget", "method"], exclude=["method"])
    assert [a.dest for a in parser._actions if a.dest != "help"] == ["budget"]
    assert options_from_args(JobOptions, parser.parse_args(["--budget", "81"]), expressions=["x"]).budget == 81


def test_method_specs():
    assert parse_method_spec("litelvlm:official") == ("litelvlm", {"variant": "official"})
    assert make_method("litelvlm", "official").variant == "official"
    assert make_method("litelvlm:context-heavy", "official").variant == "context-heavy"
    with pytest.raises(ConfigError, match="bad --method"):
        parse_method_spec(":x")


def test_static_names_match_the_registry():
    from pruning.litelvlm import VARIANTS
    from pruning.registry import available_methods
    from refstream.options import METHOD_NAMES, VARIANT_NAMES

    assert tuple(available_methods()) == METHOD_NAMES and VARIANTS == VARIANT_NAMES


def test_building_the_command_line_loads_no_model_stack():
    import subprocess
    import sys

    code = ("import sys; from refstream.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_submit_cli_is_derived_from_the_job_options():
    parser = build_parser()
    submit = parser._subparsers._group_actions[0].choices["submit"]
    dests = {a.dest for a in submit._actions}
    assert set(JobOptions.model_fields) <= dests and not dests & {"model", "device", "dtype"}
    args = parser.parse_args(["submit", "v.mp4", "-e", "the dog", "--clip-length", "64", "--frames", "8"])
    assert options_from_args(JobOptions, args) == JobOptions(expressions=["the dog"], clip_length=64, frames=8)


def test_an_expression_without_a_visible_character_is_refused():
    from refstream.options import JobOptions, LiveOptions, clean_expressions

    for invisible in ("\u200b\u200b", "\u200d", "\ufeff \u200b", "\u2060"):
        with pytest.raises(ValueError, match="no visible character.*U\\+"):
            clean_expressions([invisible])
        with pytest.raises(Exception, match="no visible character"):
            JobOptions(expressions=[invisible])
    assert clean_expressions(["le cygne\u200b noir"]) == ["le cygne\u200b noir"]  # words with one inside: kept
    assert LiveOptions(expressions=["黒い白鳥"]).expressions == ["黒い白鳥"]
