"""Rebuild ``tests/golden/sam2_parity.json`` + ``.npz`` with VideoGLaMM's original SAM2 video predictor.

    python tools/goldens/sam2_parity.py /path/to/VideoGLaMM [--out tests/golden/sam2_parity]

The checkout is https://github.com/mbzuai-oryx/VideoGLaMM at 6b15b1e (its root, or its ``VideoGLaMM/``
folder). Needs hydra-core 1.3 and omegaconf 2.3 (the original builds SAM2 from a hydra YAML).

What runs, unchanged, from the checkout: ``model/segment_anything_2/sam2/build_sam.py``
``build_sam2_video_predictor`` (``apply_postprocessing=True``, ``device="cpu"``), ``sam2_video_predictor.py``
and ``modeling/*``, called as ``model/VideoGLaMM.py`` ``inference_video_branch`` (l. 846-873) calls them for
one ``[SEG]``: ``init_state_from_tensor``, ``reset_state``, ``add_new_text(frame_idx=0, obj_id=0)``,
``propagate_in_video``. The model config is the checkout's ``sam2_configs/sam2_hiera_l.yaml`` with only sizes
changed (``YAML_SIZES`` below; every flag stays as shipped), written to a temporary folder and composed with
``hydra.initialize_config_dir``.

Built with RefStream's code (inputs, as the golden's provenance says): the weights,
``tests/test_parity_sam2.py::parity_model(model_seed)`` converted to the original names by
``workers.checkpoint.sam2_state_dict_to_original`` and loaded with ``strict=True``; the frames, the first 6
DAVIS ``blackswan`` JPEGs of ``examples/`` through ``video_pipeline.preprocess.sam2_preprocess(size=256)``.
The ``[SEG]`` vector is ``torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(seg_seed))``.

Recorded: the original's 64x64 low-resolution logits per frame (captured by wrapping the predictor's
``_get_orig_video_res_output``, whose video-resolution output is checked to be their bilinear resize), once
as shipped (memory features stored in bfloat16) and once with ``torch.Tensor.to`` ignoring bfloat16 casts.
Then, as a measurement for the record (never an expected value), RefStream's ``Sam2VideoDecoder`` on the same
weights and inputs (``measured_vs_refstream``; skip with ``--no-measure``).

Runtime shims (recorded in the golden's ``how``):

* ``torch.Tensor.cuda`` is the identity (the original hard-codes ``.cuda()``);
* ``inference_state["device"]`` / ``["storage_device"]`` are set to CPU after ``init_state_from_tensor``
  (which hard-codes ``torch.device("cuda")``);
* the package ``model.segment_anything_2.sam2`` is registered without running its ``__init__.py`` (which only
  calls ``hydra.initialize_config_module`` on a path relative to the original's working folder).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN_DIR, REPO, checkout_commit, parser, use_repository, versions, write_json  # noqa: E402

NAME = "VideoGLaMM"
OUT = GOLDEN_DIR / "sam2_parity"
MODEL_SEED, SEG_SEED = 7, 11
IMAGE_SIZE = 256
FRAMES = [f"{i:05d}.jpg" for i in range(6)]

# sam2_hiera_l.yaml with only these values changed (RefStream's tests/test_parity_sam2.py::parity_sam2_video_config)
YAML_SIZES = {
    "model.image_encoder.trunk.embed_dim": 32,
    "model.image_encoder.trunk.num_heads": 1,
    "model.image_encoder.trunk.stages": [1, 1, 2, 1],
    "model.image_encoder.trunk.global_att_blocks": [3],
    "model.image_encoder.trunk.window_pos_embed_bkg_spatial_size": [4, 4],
    "model.image_encoder.trunk.window_spec": [8, 4, 8, 4],
    "model.image_encoder.neck.position_encoding.num_pos_feats": 128,
    "model.image_encoder.neck.d_model": 128,
    "model.image_encoder.neck.backbone_channel_list": [256, 128, 64, 32],
    "model.memory_attention.d_model": 128,
    "model.memory_attention.num_layers": 2,
    "model.memory_attention.layer.d_model": 128,
    "model.memory_attention.layer.dim_feedforward": 256,
    "model.memory_attention.layer.self_attention.feat_sizes": [16, 16],
    "model.memory_attention.layer.self_attention.embedding_dim": 128,
    "model.memory_attention.layer.cross_attention.feat_sizes": [16, 16],
    "model.memory_attention.layer.cross_attention.embedding_dim": 128,
    "model.memory_encoder.in_dim": 128,
    "model.memory_encoder.mask_downsampler.embed_dim": 128,
    "model.memory_encoder.fuser.layer.dim": 128,
    "model.image_size": IMAGE_SIZE,
}
# of those, the ones sam2_hiera_l.yaml leaves at the constructor's default (256): added to the YAML
YAML_ADDED = {"model.memory_encoder.in_dim", "model.memory_encoder.mask_downsampler.embed_dim"}


def videoglamm_root(checkout: Path) -> Path:
    """The folder holding the original ``model/`` package (the repository has it under ``VideoGLaMM/``)."""
    for candidate in (checkout / "VideoGLaMM", checkout):
        if (candidate / "model" / "VideoGLaMM.py").is_file():
            return candidate.resolve()
    sys.exit(f"{checkout}: no VideoGLaMM/model/VideoGLaMM.py or model/VideoGLaMM.py (pass a VideoGLaMM checkout)")


def register_package(name: str, folder: Path) -> None:
    """Register ``name`` as a package at ``folder`` without running its ``__init__.py``."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(folder)]
    sys.modules[name] = pkg


def tiny_yaml(root: Path, folder: Path) -> str:
    """Write sam2_hiera_l.yaml with ``YAML_SIZES`` to ``folder``; the config name for hydra."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(root / "model" / "segment_anything_2" / "sam2_configs" / "sam2_hiera_l.yaml")
    for key, value in YAML_SIZES.items():
        listed = OmegaConf.select(cfg, key, default="missing") != "missing"
        assert listed != (key in YAML_ADDED), f"{key}: {'listed' if listed else 'not listed'} in sam2_hiera_l.yaml"
        OmegaConf.update(cfg, key, value, force_add=True)
    (folder / "sam2_parity_tiny.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(cfg))
    return "sam2_parity_tiny"


@contextlib.contextmanager
def memory_in_fp32(enabled: bool):
    """With ``enabled``, ``Tensor.to(torch.bfloat16)`` is a no-op while inside: SAM2's memory features (stored as
    bf16 by the original, ``sam2_video_predictor.py`` L967) stay fp32, for a tight comparison."""
    import torch

    to = torch.Tensor.to

    def no_bf16(self, *args, **kwargs):
        if torch.bfloat16 in args or kwargs.get("dtype") is torch.bfloat16:
            return self
        return to(self, *args, **kwargs)

    if enabled:
        torch.Tensor.to = no_bf16
    try:
        yield
    finally:
        torch.Tensor.to = to


def run_original(build_predictor, config_name: str, state_dict, frames, seg, video_size, fp32_memory: bool):
    """The original text-prompted propagation; [T, 64, 64] low-res logits and the video-res check."""
    import torch
    import torch.nn.functional as F

    predictor = build_predictor(config_name, ckpt_path=None, device="cpu", mode="eval", apply_postprocessing=True)
    predictor.load_state_dict(state_dict, strict=True)
    low_res, video_check = {}, []
    original = predictor._get_orig_video_res_output

    def recording(inference_state, any_res_masks):
        low, video = original(inference_state, any_res_masks)
        resized = F.interpolate(low, video.shape[-2:], mode="bilinear", align_corners=False)
        video_check.append((video - resized).abs().max().item())
        return low, video

    predictor._get_orig_video_res_output = recording
    with memory_in_fp32(fp32_memory):
        with torch.no_grad():
            state = predictor.init_state_from_tensor(frames, *video_size)
            state["device"] = state["storage_device"] = torch.device("cpu")
            predictor.reset_state(state)
            predictor.add_new_text(inference_state=state, frame_idx=0, obj_id=0, text=seg)
            for frame_idx, obj_ids, video_res in predictor.propagate_in_video(state):
                assert list(obj_ids) == [0]
                low_res[frame_idx] = state["output_dict"]["cond_frame_outputs" if frame_idx == 0 else
                                                          "non_cond_frame_outputs"][frame_idx]["pred_masks"]
    logits = torch.stack([low_res[i][0, 0].float() for i in range(len(frames))])
    return logits, video_check


def measure_refstream(model, frames, seg, video_size, low_res, fp32_memory: bool) -> list[dict]:
    """RefStream's decoder on the same inputs, against the original's logits (a record, not a golden value)."""
    import torch
    import torch.nn.functional as F

    from workers.sam2_decoder import Sam2VideoDecoder

    with memory_in_fp32(fp32_memory):
        with torch.no_grad():
            out = dict(Sam2VideoDecoder(model).propagate(frames, seg, video_size))
    rows = []
    for i, low in enumerate(low_res):
        ref = F.interpolate(low[None, None], video_size, mode="bilinear", align_corners=False)[0, 0]
        rows.append({"frame": i, "max_abs_diff": (out[i] - ref).abs().max().item(),
                     "mask_agreement": ((out[i] > 0) == (ref > 0)).float().mean().item(),
                     "orig_positive_fraction": (ref > 0).float().mean().item(), "orig_logit_std": ref.std().item()})
    return rows


def main(argv=None) -> None:
    p = parser("rebuild tests/golden/sam2_parity.{json,npz} with VideoGLaMM's original SAM2 video predictor", NAME, OUT)
    p.add_argument("--no-measure", action="store_true", help="do not run RefStream's decoder for the record")
    args = p.parse_args(argv)
    commit = checkout_commit(NAME, args.checkout, args.commit)
    root = videoglamm_root(args.checkout)

    import hydra
    import omegaconf
    import torch
    import transformers
    from PIL import Image

    use_repository()
    from test_parity_sam2 import parity_model, state_digest
    from video_pipeline.preprocess import sam2_preprocess
    from workers.checkpoint import sam2_state_dict_to_original

    # inputs and weights (RefStream's code builds them, as recorded in the golden)
    model = parity_model(MODEL_SEED).eval()
    state_dict = sam2_state_dict_to_original(model.state_dict())
    blackswan = REPO / "examples" / "ref-davis17-mini" / "DAVIS" / "JPEGImages" / "480p" / "blackswan"
    raw = np.stack([np.asarray(Image.open(blackswan / f).convert("RGB")) for f in FRAMES])
    video_size = raw.shape[1:3]
    frames = sam2_preprocess(raw, size=IMAGE_SIZE)
    seg = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(SEG_SEED))

    # the original
    sys.path.insert(0, str(root))
    register_package("model.segment_anything_2.sam2", root / "model" / "segment_anything_2" / "sam2")
    torch.Tensor.cuda = lambda self, *a, **k: self
    from model.segment_anything_2.sam2.build_sam import build_sam2_video_predictor

    with tempfile.TemporaryDirectory() as tmp:
        config_name = tiny_yaml(root, Path(tmp))
        with hydra.initialize_config_dir(config_dir=tmp, version_base="1.2"):
            logits, check_bf16 = run_original(build_sam2_video_predictor, config_name, state_dict, frames, seg,
                                              video_size, fp32_memory=False)
            logits_fp32, check_fp32 = run_original(build_sam2_video_predictor, config_name, state_dict, frames, seg,
                                                   video_size, fp32_memory=True)
    print(f"original: {len(logits)} frames, video-res output vs resized low-res: max {max(check_bf16 + check_fp32)}")

    meta = {
        "what": "ORIGINAL VideoGLaMM SAM2 text-prompted video propagation on RefStream's tiny random weights; "
                "low-resolution (64x64) mask logits of the original per frame, for tests/test_parity_sam2.py",
        "source": {
            "repo": "https://github.com/mbzuai-oryx/VideoGLaMM",
            "commit": commit,
            "files_run": ["model/segment_anything_2/sam2/build_sam.py (build_sam2_video_predictor, apply_postprocessing=True)",
                          "model/segment_anything_2/sam2/sam2_video_predictor.py (init_state_from_tensor, reset_state, "
                          "add_new_text, propagate_in_video)",
                          "model/segment_anything_2/sam2/modeling/ (sam2_base.py, backbones/, sam/, memory_attention.py, "
                          "memory_encoder.py, position_encoding.py, sam2_utils.py)",
                          "model/segment_anything_2/sam2/utils/misc.py"],
            "call_sequence": "model/VideoGLaMM.py inference_video_branch l. 846-873 (one [SEG], obj_id 0, frame 0)",
        },
        "how": {
            "script": "tools/goldens/sam2_parity.py",
            "where": "the checkout given to the script, imported unchanged; CPU",
            "generated_with": {**versions(torch, transformers, hydra, omegaconf), "torch_threads": torch.get_num_threads()},
            "reproducibility": "CPU float32 results depend on the thread count at the 1e-6 level; memory features "
                               "stored in bfloat16 carry that to ~1e-4 on later frames (runs with 1 and 2 threads "
                               "differ by up to 1.0e-4 with bf16 memory, 2.7e-6 without)",
            "runtime_shims": ["torch.Tensor.cuda replaced by identity (the original hard-codes .cuda())",
                              "inference_state['device'] and ['storage_device'] set to cpu after init_state_from_tensor",
                              "package model.segment_anything_2.sam2 registered without running its __init__ (hydra "
                              "initialize_config_module); the YAML composed with hydra.initialize_config_dir instead"],
            "config": "the checkout's model/segment_anything_2/sam2_configs/sam2_hiera_l.yaml with only sizes changed: "
                      + ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in YAML_SIZES.items())
                      + ". All flags as in sam2_hiera_l.yaml. Equivalent to tests/test_parity_sam2.py::parity_sam2_video_config",
            "weights": "tests/test_parity_sam2.py::parity_model(model_seed) (workers.sam2_decoder.build_sam2(..., init='test') "
                       "+ shared positional matrix), converted by workers.checkpoint.sam2_state_dict_to_original, "
                       "load_state_dict(strict=True): all keys matched",
            "inputs": "first 6 JPEGs of DAVIS 480p blackswan (examples/ref-davis17-mini), "
                      "video_pipeline.preprocess.sam2_preprocess(size=256); [SEG] = torch.randn(1, 1, 128, "
                      "generator=torch.Generator().manual_seed(seg_seed)) (stored as 'seg')",
            "fp32_memory_run": "second run with torch.Tensor.to patched to ignore bfloat16 casts",
            "low_res_capture": "predictor._get_orig_video_res_output wrapped to check its video-resolution output "
                               "against the bilinear resize of output_dict[...][frame]['pred_masks'] (max difference "
                               f"{max(check_bf16 + check_fp32)})",
        },
        "model_seed": MODEL_SEED,
        "seg_seed": SEG_SEED,
        "weights_digest": state_digest(model),
        "image_size": IMAGE_SIZE,
        "video_size": list(video_size),
        "frames": FRAMES,
        "arrays": {
            "orig_low_res_logits": "[6, 64, 64] float32, original pred_masks per frame (bf16 memory, as shipped)",
            "orig_low_res_logits_fp32_memory": "[6, 64, 64] float32, same with bf16 memory storage disabled",
            "seg": "[1, 1, 128] float32 [SEG] vector",
            "frame_channel_means": "[6, 3] float32 means of the preprocessed frames",
        },
        "regenerate": "python tools/goldens/sam2_parity.py /path/to/VideoGLaMM",
    }
    if not args.no_measure:
        rows = {name: measure_refstream(model, frames, seg, video_size, low, fp32)
                for name, low, fp32 in (("bf16_memory", logits, False), ("fp32_memory", logits_fp32, True))}
        meta["measured_vs_refstream"] = {
            **rows,
            "max_abs_diff_bf16": max(r["max_abs_diff"] for r in rows["bf16_memory"]),
            "max_abs_diff_fp32_memory": max(r["max_abs_diff"] for r in rows["fp32_memory"]),
        }
        print(f"RefStream vs original (record): bf16 {meta['measured_vs_refstream']['max_abs_diff_bf16']:.3g}, "
              f"fp32 memory {meta['measured_vs_refstream']['max_abs_diff_fp32_memory']:.3g}")
    out = args.out.with_suffix("") if args.out.suffix in (".json", ".npz") else args.out
    write_json(out.with_suffix(".json"), meta, compact=False)
    np.savez_compressed(out.with_suffix(".npz"), orig_low_res_logits=logits.numpy(),
                        orig_low_res_logits_fp32_memory=logits_fp32.numpy(), seg=seg.numpy(),
                        frame_channel_means=frames.mean(dim=(2, 3)).numpy())
    print(f"wrote {out.with_suffix('.npz')}")


if __name__ == "__main__":
    main()
