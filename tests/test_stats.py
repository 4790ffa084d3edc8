"""`refstream model-info` and `refstream flops`: full-size VideoGLaMM on the meta device."""

from __future__ import annotations

import json

import pytest

from refstream.cli import main
from refstream.config import load_model_config
from workers.stats import build_skeleton, parameter_counts, stage_flops


@pytest.fixture(scope="module")
def full():
    config = load_model_config("videoglamm")
    return config, build_skeleton(config)


def test_parameter_counts_match_the_released_modules(full):
    counts = parameter_counts(full[1])
    # docs/design.md, section Model size and cost (meta-device counts of the released architectures).
    assert round(counts["clip_vision"] / 1e6, 1) == 303.5
    assert round(counts["clip_text"] / 1e6, 1) == 123.1
    assert round(counts["internvideo2"] / 1e6, 1) == 987.0
    assert round(counts["llm"] / 1e6, 1) == 3820.8
    assert round(counts["sam2"] / 1e6, 1) == 224.4
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_unpruned_flops_match_reference(full):
    config, parts = full
    r = stage_flops(parts, config)
    assert r["sequence_length"] == 3378 and r["visual_tokens"] == 16 * 144 + 16 * 64 and r["fits_positions"]
    tf = {k: v / 1e12 for k, v in r["flops"].items()}
    assert tf["llm_prefill"] == pytest.approx(29.0, abs=0.05)
    assert tf["clip"] / 16 == pytest.approx(0.38, abs=0.005)
    assert tf["internvideo2"] / 4 == pytest.approx(2.25, abs=0.005)
    assert tf["sam2_image_encoder"] == pytest.approx(1.83, abs=0.01)
    assert tf["sam2_memory_attention"] == pytest.approx(0.61, abs=0.01)


@pytest.mark.parametrize("budget, placement, length, fits", [(196, "pooled", 1858, True), (196, "patch", 4210, False),
                                                            (81, "patch", 2370, True), (81, "pooled", 1394, True)])
def test_pruned_sequence_lengths(full, budget, placement, length, fits):
    config, parts = full
    r = stage_flops(parts, config, method="litelvlm", budget=budget, placement=placement)
    assert (r["sequence_length"], r["fits_positions"]) == (length, fits)
    assert r["flops"]["llm_prefill"] < stage_flops(parts, config)["flops"]["llm_prefill"] or not fits


def test_fastv_counts_each_layer_at_its_length(full):
    config, parts = full
    r = stage_flops(parts, config, method="fastv", budget=196, placement="pooled")
    assert r["layer_lengths"][:2] == [3378, 3378] and set(r["layer_lengths"][2:]) == {1858}
    lite = stage_flops(parts, config, method="litelvlm", budget=196, placement="pooled")["flops"]["llm_prefill"]
    none = stage_flops(parts, config)["flops"]["llm_prefill"]
    assert lite < r["flops"]["llm_prefill"] < none


def test_cli_json(capsys):
    assert main(["model-info", "--model", "videoglamm", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["llm"] == 3820760064
    assert main(["flops", "--model", "videoglamm", "--frames", "16", "--method", "litelvlm", "--budget", "81",
                 "--placement", "patch", "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)
    assert flops["sequence_length"] == 2370 and set(flops["flops"]) >= {"clip", "internvideo2", "projectors",
                                                                        "llm_prefill", "sam2_per_frame"}
    assert main(["flops", "--frames", "6"]) == 2
