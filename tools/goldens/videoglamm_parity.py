"""Rebuild ``tests/golden/videoglamm_parity.json`` + ``.npz`` with VideoGLaMM's original model code.

    python tools/goldens/videoglamm_parity.py /path/to/VideoGLaMM [--out tests/golden/videoglamm_parity]

The checkout is https://github.com/mbzuai-oryx/VideoGLaMM at 6b15b1e (its root, or its ``VideoGLaMM/``
folder). Needs einops (``arch.py`` imports it).

What runs, from the checkout: ``model/VideoGLaMM.py`` ``VideoGLaMMForCausalLM`` (built from a
``VideoGPTPlusPhi3Config`` with RefStream's tiny Phi-3 sizes), so ``model/videogpt_plus/model/arch.py``
(``MetaModel``, ``VideoGPTPlusMetaForCausalLM.project``, ``apply_adaptive_avg_pooling``,
``prepare_inputs_labels_for_multimodal``), ``language_model/phi3.py`` (``VideoGPTPlusPhi3ForCausalLM.forward``),
``multimodal_projector/builder.py`` (``build_vision_projector``, ``mlp2x_gelu``) and
``VideoGLaMMMetaModel.initialize_lisa_modules`` (``text_hidden_fcs``).

* projectors + pooling: ``project(video_features, context_features, input_type="video")``;
* ``[SEG]`` extraction: ``VideoGLaMM_SAM2.__inference_path`` (the VideoGPT+ Phi-3 forward with the visual
  tokens spliced in and ``seg_token_mask`` shifted), then what ``model_forward`` does with its result
  (l. 372-377): ``text_hidden_fcs[0](output_hidden_states[-1])`` indexed by ``seg_token_mask`` (that one line is
  applied here; ``model_forward`` itself goes on to SAM, which this golden does not cover).

Built with RefStream's code (inputs, as recorded in the golden): the weights of the tiny model
(``configs/tiny.yaml``, seed 0: ``Pipeline(load_model_config("tiny"), "cpu").model``) copied into the original
modules (the Phi-3 state dict, ``mm_projector``, ``image_mm_projector``, ``text_hidden_fcs``), checked by
digest; the input ids, ``prompt_ids(expression, forced_answer)`` around 16 ``IMAGE_TOKEN_INDEX`` tokens; the
features, ``tests/test_parity.py::_inputs(seed)`` (``randn(16, 577, 64)`` CLIP ``hidden_states[-2]``, then
``randn(16, 256, 64)`` InternVideo2 features).

Runtime shims (recorded in the golden's ``how``):

* the package ``__init__``s of ``model.videogpt_plus`` and ``model.videogpt_plus.model`` are not run (they import
  the LLaMA variant); ``multimodal_encoder/builder.py`` ``build_vision_tower``, ``model.segment_anything`` and
  ``segment_anything_2/sam2/build_sam.py`` are stand-ins returning empty modules (the towers and SAM are not
  run here; their parity is tested elsewhere, and they need torchvision / hydra / weights);
* ``torch.Tensor.cuda`` is the identity (``prepare_inputs_labels_for_multimodal`` hard-codes ``.cuda()``);
* ``encode_videos`` is replaced by a reshape of the given features (it hard-codes D=1408 and only runs the
  towers): InternVideo2 features [16, 256, 64] -> [1, 4 chunks, 4*256, 64], CLIP patches [16, 576, 64] ->
  [1, 16, 576, 64];
* the projectors come from the original ``build_vision_projector`` (``mlp2x_gelu``), whose first ``Linear`` is
  then re-made at the tiny input width (the builder hard-codes 1024 / 1408 inputs); their full-size structure is
  recorded under ``builder_structure_full_size``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN_DIR, checkout_commit, parser, use_repository, versions, write_json  # noqa: E402
from sam2_parity import register_package, videoglamm_root  # noqa: E402

NAME = "VideoGLaMM"
OUT = GOLDEN_DIR / "videoglamm_parity"
SEED = 20240607
EXPRESSIONS = ["the black swan", "the water"]
FRAMES, CHUNK = 16, 4


def stub_module(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def import_original(root: Path):
    """The original ``model/VideoGLaMM.py`` with the stand-ins described in the module doc."""
    import torch
    from torch import nn

    sys.path.insert(0, str(root))
    register_package("model.videogpt_plus", root / "model" / "videogpt_plus")
    register_package("model.videogpt_plus.model", root / "model" / "videogpt_plus" / "model")

    class NotRun(nn.Module):
        """Stands in for a vision tower / SAM that this golden does not run."""

    stub_module("model.videogpt_plus.model.multimodal_encoder.builder", build_vision_tower=lambda *a, **k: NotRun())
    stub_module("model.segment_anything", build_sam_vit_h=lambda *a, **k: NotRun())
    stub_module("model.segment_anything_2.sam2.build_sam", build_sam2=lambda *a, **k: NotRun(),
                build_sam2_video_predictor=lambda *a, **k: NotRun())
    torch.Tensor.cuda = lambda self, *a, **k: self
    from model import VideoGLaMM as original  # noqa: N813  (model/VideoGLaMM.py)
    from model.videogpt_plus import constants
    from model.videogpt_plus.model.language_model.phi3 import VideoGPTPlusPhi3Config
    from model.videogpt_plus.model.multimodal_projector.builder import build_vision_projector

    return original, constants, VideoGPTPlusPhi3Config, build_vision_projector


def main(argv=None) -> None:
    args = parser("rebuild tests/golden/videoglamm_parity.{json,npz} with VideoGLaMM's original model code", NAME, OUT) \
        .parse_args(argv)
    commit = checkout_commit(NAME, args.checkout, args.commit)
    root = videoglamm_root(args.checkout)

    from types import SimpleNamespace

    import torch
    import transformers
    from torch import nn

    use_repository()
    from refstream.config import load_model_config
    from refstream.pipeline import Pipeline
    from test_parity import _digest, _inputs

    ours = Pipeline(load_model_config("tiny"), "cpu").model.eval()
    clip_hidden, iv2 = _inputs(SEED)
    original, constants, Config, build_vision_projector = import_original(root)

    # the full-size projectors as the original builder makes them (structure only)
    full = SimpleNamespace(hidden_size=3072, mm_projector_type="mlp2x_gelu", image_mm_projector_type="mlp2x_gelu")
    structure = {name: [str(m) for m in build_vision_projector(full, image_mm_projector=image)]
                 for name, image in (("image_mm_projector", True), ("mm_projector", False))}

    llm_config = ours.llm.config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        llm_config.pop(key, None)
    config = Config(**llm_config)
    config.mm_vision_tower = config.image_mm_vision_tower = "not run"
    config.mm_projector_type = config.image_mm_projector_type = "mlp2x_gelu"
    config.use_sam2, config.train_mask_decoder, config.mask_decoder_itm = True, False, False
    config.out_dim = ours.config.seg_dim
    config.seg_token_idx = ours.seg_token_id
    config.mm_use_im_start_end = config.tune_mm_mlp_adapter = False
    config._attn_implementation = ours.llm.config._attn_implementation
    torch.manual_seed(0)
    model = original.VideoGLaMMForCausalLM(config, use_sam2_video_branch=True).eval()

    # RefStream's tiny weights into the original modules
    missing, unexpected = model.load_state_dict(ours.llm.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(k.split(".")[1] in ("mm_projector", "image_mm_projector", "text_hidden_fcs", "visual_model",
                                   "vision_tower", "image_vision_tower") for k in missing), missing
    for name in ("mm_projector", "image_mm_projector"):
        projector = getattr(model.model, name)
        assert [type(m).__name__ for m in projector] == ["Linear", "GELU", "Linear"]
        tiny = getattr(ours, name)
        projector[0] = nn.Linear(tiny[0].in_features, tiny[0].out_features)
        projector.load_state_dict(tiny.state_dict(), strict=True)
    model.model.text_hidden_fcs[0].load_state_dict(ours.text_hidden_fcs.state_dict(), strict=True)
    digests = {name: _digest(getattr(ours, name)) for name in ("image_mm_projector", "mm_projector", "text_hidden_fcs")}
    digests = {"llm": _digest(ours.llm), **digests}

    video_features = iv2.reshape(FRAMES // CHUNK, CHUNK * iv2.shape[1], iv2.shape[2])  # [chunks, C*L, D]
    context_features = clip_hidden[:, 1:]  # select_feature="patch"
    model.encode_videos = lambda frames, context_images, batch_size: (video_features[None], context_features[None])

    with torch.no_grad():
        merged = model.project(video_features, context_features, input_type="video")[0]
        segs = []
        for expression in EXPRESSIONS:
            prefix, suffix = ours.prompt_ids(expression, ours.config.forced_answer)
            input_ids = torch.tensor([prefix + [constants.IMAGE_TOKEN_INDEX] * FRAMES + suffix])
            _, hidden, seg_mask = model._VideoGLaMM_SAM2__inference_path(
                input_ids, [torch.zeros(FRAMES, 3, 224, 224)], [torch.zeros(FRAMES, 3, 224, 224)], None)
            # model_forward l. 372-377 with one text_hidden_fcs: stack of one + sum is the identity
            rows = model.model.text_hidden_fcs[0](hidden[-1])[seg_mask]
            assert rows.shape[0] == 1, f"{rows.shape[0]} [SEG] tokens for {expression!r}"
            segs.append(rows[0])
    seg = torch.stack(segs)

    # for the record (never an expected value): RefStream on the same inputs
    import test_parity

    visual = test_parity._visual(ours, clip_hidden, iv2)
    measured = {"projectors_pooling": (visual - merged).abs().max().item(),
                "seg_extraction": max((a.embedding - s).abs().max().item()
                                      for a, s in zip(ours.seg_answers(visual, EXPRESSIONS, "forced"), seg))}
    print(f"original: merged {tuple(merged.shape)}, seg {tuple(seg.shape)}; RefStream vs original (record): {measured}")

    meta = {
        "provenance": {
            "repo": "github.com/mbzuai-oryx/VideoGLaMM",
            "commit": commit,
            "code": {
                "projectors_pooling": "VideoGLaMM/model/videogpt_plus/model/arch.py: VideoGPTPlusMetaForCausalLM.project"
                                      "(input_type='video'), apply_adaptive_avg_pooling; multimodal_projector/builder.py "
                                      "build_vision_projector (mlp2x_gelu)",
                "seg_extraction": "VideoGLaMM/model/VideoGLaMM.py: VideoGLaMM_SAM2.__inference_path -> "
                                  "VideoGPTPlusPhi3ForCausalLM.forward (language_model/phi3.py) -> arch.py "
                                  "prepare_inputs_labels_for_multimodal (seg_token_mask = input_ids[:, 1:] == "
                                  "seg_token_idx, shifted, visual positions zero); model_forward l. 372-377 "
                                  "text_hidden_fcs[0](output_hidden_states[-1])[seg_token_mask]; text_hidden_fcs from "
                                  "VideoGLaMMMetaModel.initialize_lisa_modules",
            },
            "how": "tools/goldens/videoglamm_parity.py on a checkout: VideoGLaMMForCausalLM built from a "
                   "VideoGPTPlusPhi3Config with the tiny Phi-3 sizes (package __init__s of model.videogpt_plus(.model) "
                   "not run; the vision-tower builder, model.segment_anything and sam2/build_sam.py replaced by "
                   "stand-ins returning empty modules; Tensor.cuda made a no-op on CPU; encode_videos replaced by a "
                   "reshape because it hard-codes D=1408 and only runs the towers, whose parity is tested elsewhere; "
                   "the builder's projectors get their first Linear re-made at the tiny input width); RefStream's tiny "
                   "model (configs/tiny.yaml, seed 0) weights copied into them (Phi-3 state dict, mm_projector, "
                   "image_mm_projector, text_hidden_fcs). Inputs: torch.Generator().manual_seed(seed): randn(16, 577, "
                   "64) CLIP hidden_states[-2], then randn(16, 256, 64) InternVideo2 features. "
                   f"transformers {transformers.__version__}, torch {torch.__version__}, CPU float32. No original code "
                   "is committed.",
            "generated_with": versions(torch, transformers),
        },
        "seed": SEED,
        "expressions": EXPRESSIONS,
        "forced_answer": ours.config.forced_answer,
        "input_ids_layout": "prefix + [IMAGE_TOKEN_INDEX]*16 + suffix (RefStream prompt_ids(expression, forced_answer))",
        "weights_sha256_16": digests,
        "builder_structure_full_size": structure,
        "max_abs_diff_at_generation": measured,
        "outputs": "videoglamm_parity.npz: merged float32 [16*144+16*64, 64] (original project output), seg float32 [2, 128]",
        "regenerate": "python tools/goldens/videoglamm_parity.py /path/to/VideoGLaMM",
    }
    out = args.out.with_suffix("") if args.out.suffix in (".json", ".npz") else args.out
    write_json(out.with_suffix(".json"), meta, compact=False)
    np.savez_compressed(out.with_suffix(".npz"), merged=merged.numpy(), seg=seg.numpy())
    print(f"wrote {out.with_suffix('.npz')}")


if __name__ == "__main__":
    main()
