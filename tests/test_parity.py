"""Parity with the ORIGINAL VideoGLaMM code, through golden values made by ``tools/goldens/videoglamm_parity.py``.

Provenance (details in ``tests/golden/videoglamm_parity.json``): github.com/mbzuai-oryx/VideoGLaMM @
6b15b1e7f75009d0e1a858ac08e28021c4faaf11, imported by that script from a checkout and run on CPU (no original
code is committed):

* projectors + pooling: ``VideoGLaMM/model/videogpt_plus/model/arch.py`` ``project(input_type="video")`` with
  ``apply_adaptive_avg_pooling`` (``mlp2x_gelu`` from ``multimodal_projector/builder.py``), on RefStream's
  tiny ``image_mm_projector`` / ``mm_projector`` weights; compared with :meth:`VideoGLaMM.clip_tokens`
  (unpruned, pooled) and :meth:`VideoGLaMM.internvideo2_tokens`, concatenated in LLM order;
* ``[SEG]`` extraction: ``VideoGLaMM/model/VideoGLaMM.py`` ``__inference_path`` (VideoGPT+ Phi-3 forward with
  ``prepare_inputs_labels_for_multimodal``: visual tokens spliced at the ``<image>`` run, ``seg_token_mask`` =
  ``input_ids[:, 1:] == seg_token_idx`` shifted) then ``model_forward``'s
  ``text_hidden_fcs[0](output_hidden_states[-1])[seg_token_mask]``, on the tiny Phi-3 and ``text_hidden_fcs``
  weights, teacher-forced answer; compared with :meth:`VideoGLaMM.seg_answers` (``mode="forced"``, two
  expressions batched with right padding).

Inputs are rebuilt here from the recorded seed; the weights are the tiny model's (``configs/tiny.yaml``, seed
0), checked by digest first so that a change of the tiny initialisation is reported as such (regenerate the
goldens then). Measured at generation: projectors + pooling 0.0, ``[SEG]`` 2.4e-7 (max abs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import load_golden
from refstream.config import load_model_config
from refstream.pipeline import Pipeline

GOLDEN = Path(__file__).parent / "golden" / "videoglamm_parity"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


@pytest.fixture(scope="module")
def model():
    return Pipeline(load_model_config("tiny"), "cpu").model.eval()


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clip_hidden = torch.randn(16, 577, 64, generator=g)  # CLIP hidden_states[-2], row 0 = CLS
    iv2 = torch.randn(16, 256, 64, generator=g)  # InternVideo2 features per frame
    return clip_hidden, iv2


class _Features(nn.Module):
    """Stands in for the InternVideo2 encoder: returns the recorded features (the encoder's own parity is
    tested in test_internvideo2.py)."""

    hidden_size = 64

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.features


def _visual(model, clip_hidden, iv2) -> torch.Tensor:
    real = model.internvideo2
    model.internvideo2 = _Features(iv2)
    try:
        iv2_tokens = model.internvideo2_tokens(torch.zeros(16, 3, 224, 224))
    finally:
        model.internvideo2 = real
    return torch.cat([model.clip_tokens(clip_hidden, None, "pooled").flatten(0, 1), iv2_tokens.flatten(0, 1)])


def test_golden_weights_are_the_tiny_model(model, golden):
    meta, _ = golden
    digests = {name: _digest(getattr(model, name)) for name in meta["weights_sha256_16"]}
    assert digests == meta["weights_sha256_16"], (
        "the tiny model's initialisation changed since the parity goldens were recorded: regenerate "
        "tests/golden/videoglamm_parity.* (see its provenance)")
    assert meta["provenance"]["commit"] == "6b15b1e7f75009d0e1a858ac08e28021c4faaf11"


def test_projectors_and_pooling_match_original(model, golden):
    meta, arrays = golden
    assert [type(m).__name__ for m in model.image_mm_projector] == ["Linear", "GELU", "Linear"]
    assert [type(m).__name__ for m in model.mm_projector] == ["Linear", "GELU", "Linear"]
    assert [s.split("(")[0] for s in meta["builder_structure_full_size"]["mm_projector"]] == ["Linear", "GELU", "Linear"]
    visual = _visual(model, *_inputs(meta["seed"]))
    assert visual.shape == arrays["merged"].shape == (16 * 144 + 16 * 64, 64)
    assert (visual - arrays["merged"]).abs().max().item() <= TOL


def test_seg_extraction_matches_original(model, golden):
    meta, arrays = golden
    assert model.config.forced_answer == meta["forced_answer"]
    visual = _visual(model, *_inputs(meta["seed"]))
    answers = model.seg_answers(visual, meta["expressions"], "forced")
    seg = torch.stack([a.embedding for a in answers])
    assert seg.shape == arrays["seg"].shape
    assert (seg - arrays["seg"]).abs().max().item() <= TOL
    for i, e in enumerate(meta["expressions"]):  # one at a time (no batch padding) as the original ran them
        (alone,) = model.seg_answers(visual, [e], "forced")
        assert (alone.embedding - arrays["seg"][i]).abs().max().item() <= TOL
