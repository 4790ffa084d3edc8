"""Build ``tests/golden/internvideo2_parity.json`` + ``.npz`` with VideoGLaMM's original InternVideo2 encoder.

    python tools/goldens/internvideo2_parity.py /path/to/VideoGLaMM [--out tests/golden/internvideo2_parity]

The checkout is https://github.com/mbzuai-oryx/VideoGLaMM at 6b15b1e (its root, or its ``VideoGLaMM/``
folder). Needs timm (>= 0.9, for ``timm/layers``), einops, opencv-python-headless and pyyaml (what the
original module imports).

What runs, from the checkout: ``model/videogpt_plus/model/internvideo/build_internvideo.py``
``build_internvideo(checkpoint)`` exactly as ``multimodal_encoder/builder.py`` calls it for VideoGLaMM's video
tower (from the ``VideoGLaMM/`` folder, whose relative config path it reads): the stage-2 config
``internvideo2_stage2_config_vision.py`` (``Config.from_file``, ``eval_dict_leaf``), ``utils.py``
``setup_internvideo2V`` / ``InternVideo2_Stage2V`` (checkpoint loading with
``interpolate_pos_embed_internvideo2_new``, ``load_state_dict(strict=False)``, ``eval()``) and
``internvideo2.py`` ``pretrain_internvideo2_1b_patch14_224`` / ``PretrainInternVideo2``; then the tower is
called as ``arch.py`` ``encode_videos`` calls it: the frames in chunks of ``CHUNK_SIZE`` = 4 consecutive frames,
``InternVideo2_Stage2V.forward`` (``x_vis_return_idx=-2``, ``x_vis_only=True``), CLS dropped.

The weights are a tiny random state dict in the original names (built here from ``WEIGHT_SEED``; 1B geometry -
224 px, patch 14, 4 frames, tubelet 1 - at width 64, 4 heads, MLP 128, depth 3), written as a stage-2 checkpoint
(``{"model": {"vision_encoder.<name>": tensor}}``) that the original loads; every one of its tensors is checked to
have been loaded. The video is ``torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(FRAME_SEED))``
(2 chunks). The golden keeps the state dict and the original's features; the frames are rebuilt from the seed
(their per-frame channel means are stored to detect a change of torch's generator).

Runtime shims (recorded in the golden's ``how``):

* ``PretrainInternVideo2`` as ``pretrain_internvideo2_1b_patch14_224`` sees it is the original class with only the
  sizes changed (``embed_dim`` 64, ``depth`` 3, ``num_heads`` 4, ``mlp_ratio`` 2); every other argument is the
  1B builder's and the stage-2 config's (so ``use_flash_attn`` / fused RMSNorm / fused MLP off, as the config's
  ``use_half_precision = False`` sets them, and gradient checkpointing on, which changes no value);
* ``flash_attention_class.py`` is replaced by a stand-in (it imports flash-attn at module level; the class is
  only built with ``use_flash_attn=True``);
* ``timm.models.layers`` (``DropPath``, ``to_2tuple``, ``trunc_normal_``) is served from the installed timm's
  ``timm/layers/{helpers,drop,weight_init}.py`` without timm's package ``__init__`` (which imports torchvision);
* the package ``__init__``s of ``model.videogpt_plus`` and ``model.videogpt_plus.model`` are not run (they import
  the language models).

For the record (never an expected value) the script also runs RefStream's converted encoder
(``workers.internvideo2``) on the same weights and frames (``measured_vs_refstream``; skip with ``--no-measure``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN_DIR, checkout_commit, parser, use_repository, versions, write_json  # noqa: E402
from sam2_parity import register_package, videoglamm_root  # noqa: E402

NAME = "VideoGLaMM"
OUT = GOLDEN_DIR / "internvideo2_parity"
DIM, HEADS, MLP, DEPTH, FRAMES, PATCH, SIZE = 64, 4, 128, 3, 4, 14, 224
VIDEO_FRAMES = 8  # two chunks of 4
WEIGHT_SEED, FRAME_SEED = 3, 11
TOKENS = FRAMES * (SIZE // PATCH) ** 2  # 1024


def tiny_state_dict(seed: int = WEIGHT_SEED) -> dict:
    """Random weights in the original ``PretrainInternVideo2`` names, scaled so the blocks do visible work."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    sd = {
        "patch_embed.proj.weight": rnd(DIM, 3, 1, PATCH, PATCH, std=0.05),
        "patch_embed.proj.bias": rnd(DIM),
        "cls_token": rnd(1, 1, DIM, std=0.5),
        "pos_embed": rnd(1, 1 + TOKENS, DIM, std=0.5),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": rnd(DIM, mean=1.0),
            p + "attn.qkv.weight": rnd(3 * DIM, DIM, std=0.2),
            p + "attn.q_norm.weight": rnd(DIM, mean=1.0, std=0.3),
            p + "attn.k_norm.weight": rnd(DIM, mean=1.0, std=0.3),
            p + "attn.proj.weight": rnd(DIM, DIM, std=0.15),
            p + "attn.proj.bias": rnd(DIM),
            p + "ls1.gamma": rnd(DIM, mean=0.5, std=0.2),
            p + "norm2.weight": rnd(DIM, mean=1.0),
            p + "mlp.fc1.weight": rnd(MLP, DIM, std=0.15),
            p + "mlp.fc1.bias": rnd(MLP),
            p + "mlp.fc2.weight": rnd(DIM, MLP, std=0.1),
            p + "mlp.fc2.bias": rnd(DIM),
            p + "ls2.gamma": rnd(DIM, mean=0.5, std=0.2),
        })
    return sd


def timm_layers_without_init() -> None:
    """Provide ``timm.models.layers`` from timm's own layer files, skipping its package ``__init__``."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("timm is not installed (pip install timm): the original internvideo2.py imports timm.models.layers")
    folder = Path(list(spec.submodule_search_locations)[0])
    register_package("timm", folder)
    register_package("timm.layers", folder / "layers")
    from timm.layers.drop import DropPath
    from timm.layers.helpers import to_2tuple
    from timm.layers.weight_init import trunc_normal_

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    register_package("timm.models", folder / "models")
    sys.modules["timm.models.layers"] = layers


def run_original(root: Path, checkpoint: Path, frames):
    """The original tower built by ``build_internvideo(checkpoint)``, called as ``encode_videos`` calls it."""
    import torch
    from einops import rearrange

    timm_layers_without_init()
    sys.path.insert(0, str(root))
    register_package("model.videogpt_plus", root / "model" / "videogpt_plus")
    register_package("model.videogpt_plus.model", root / "model" / "videogpt_plus" / "model")

    class FlashAttention(torch.nn.Module):
        def __init__(self, *a, **k):
            raise RuntimeError("flash attention is off in this run (use_flash_attn=False)")

    flash = types.ModuleType("model.videogpt_plus.model.internvideo.flash_attention_class")
    flash.FlashAttention = FlashAttention
    sys.modules[flash.__name__] = flash

    from model.videogpt_plus.constants import CHUNK_SIZE
    from model.videogpt_plus.model.internvideo import internvideo2
    from model.videogpt_plus.model.internvideo.build_internvideo import build_internvideo

    original_class = internvideo2.PretrainInternVideo2

    def tiny_sizes(**kwargs):
        kwargs.update(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / DIM)
        return original_class(**kwargs)

    internvideo2.PretrainInternVideo2 = tiny_sizes
    cwd, path = os.getcwd(), list(sys.path)
    try:
        os.chdir(root)  # build_internvideo reads its config by a path relative to VideoGLaMM/
        tower = build_internvideo(str(checkpoint))
    finally:
        os.chdir(cwd)
        sys.path[:] = path  # Config.from_file put the internvideo folder first on sys.path
        internvideo2.PretrainInternVideo2 = original_class
    assert not tower.training

    with torch.no_grad():
        # arch.py encode_videos, for one video: chunks of CHUNK_SIZE consecutive frames, CLS dropped
        video = rearrange(frames, "(b t) c h w -> b t c h w", b=1)
        chunks = torch.stack(video[0].chunk(video.shape[1] // CHUNK_SIZE, dim=0), dim=0)
        features = tower(chunks)[:, 1:]
    return tower, features, CHUNK_SIZE


def main(argv=None) -> None:
    p = parser("build tests/golden/internvideo2_parity.{json,npz} with VideoGLaMM's original InternVideo2 encoder",
               NAME, OUT)
    p.add_argument("--no-measure", action="store_true", help="do not run RefStream's encoder for the record")
    args = p.parse_args(argv)
    commit = checkout_commit(NAME, args.checkout, args.commit)
    root = videoglamm_root(args.checkout)

    import torch

    sd = tiny_state_dict()
    frames = torch.randn(VIDEO_FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(FRAME_SEED))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "internvideo2_tiny_stage2.pt"
        torch.save({"model": {f"vision_encoder.{k}": v for k, v in sd.items()}}, checkpoint)
        tower, features, chunk = run_original(root, checkpoint, frames)
    loaded = tower.vision_encoder.state_dict()
    not_loaded = [k for k, v in sd.items() if not torch.equal(loaded[k], v)]
    assert not not_loaded, f"the original did not load {not_loaded}"
    assert features.shape == (VIDEO_FRAMES // chunk, chunk * 256, DIM)
    features = features.reshape(VIDEO_FRAMES, 256, DIM)  # arch.py project: 'b (t l) d -> (b t) l d', t=4
    print(f"original: features {tuple(features.shape)}, std {features.std().item():.3g}")

    import einops
    import timm

    meta = {
        "what": "ORIGINAL VideoGLaMM InternVideo2 video tower (build_internvideo -> InternVideo2_Stage2V.forward) on a "
                "tiny random state dict; features per frame after the CLS is dropped, for tests/test_internvideo2.py",
        "source": {
            "repo": "https://github.com/mbzuai-oryx/VideoGLaMM",
            "commit": commit,
            "files_run": ["model/videogpt_plus/model/internvideo/build_internvideo.py (build_internvideo)",
                          "model/videogpt_plus/model/internvideo/internvideo2_stage2_config_vision.py (the config)",
                          "model/videogpt_plus/model/internvideo/config.py (Config.from_file, eval_dict_leaf)",
                          "model/videogpt_plus/model/internvideo/utils.py (setup_internvideo2V, InternVideo2_Stage2V)",
                          "model/videogpt_plus/model/internvideo/internvideo2.py (pretrain_internvideo2_1b_patch14_224, "
                          "PretrainInternVideo2, Block, Attention, RMSNorm, LayerScale, Mlp, PatchEmbed)",
                          "model/videogpt_plus/model/internvideo/pos_embed.py"],
            "call_sequence": "model/videogpt_plus/model/arch.py encode_videos: frames in chunks of CHUNK_SIZE=4, "
                             "vision tower forward (x_vis_return_idx=-2, x_vis_only=True), [:, 1:]",
        },
        "how": {
            "script": "tools/goldens/internvideo2_parity.py",
            "where": "the checkout given to the script, imported unchanged; CPU float32",
            "generated_with": {**versions(torch, einops, timm), "torch_threads": torch.get_num_threads()},
            "runtime_shims": [
                "PretrainInternVideo2 as pretrain_internvideo2_1b_patch14_224 calls it: the original class with only "
                f"embed_dim={DIM}, depth={DEPTH}, num_heads={HEADS}, mlp_ratio={MLP / DIM} changed (all other arguments "
                "from the 1B builder and the stage-2 config: flash-attn/fused RMSNorm/fused MLP off, checkpointing on)",
                "flash_attention_class.py replaced by a stand-in (module-level flash_attn import; unused)",
                "timm.models.layers served from timm/layers/{helpers,drop,weight_init}.py without timm's __init__ "
                "(which imports torchvision)",
                "package __init__s of model.videogpt_plus(.model) not run",
            ],
            "weights": f"tiny_state_dict(seed={WEIGHT_SEED}) in this script: width {DIM}, {HEADS} heads, MLP {MLP}, depth "
                       f"{DEPTH}, patch {PATCH}, {SIZE} px, {FRAMES} frames, tubelet 1; saved as a stage-2 checkpoint "
                       "{'model': {'vision_encoder.<name>': tensor}} and loaded by setup_internvideo2V; every tensor "
                       "checked loaded",
            "inputs": f"frames = torch.randn({VIDEO_FRAMES}, 3, {SIZE}, {SIZE}, "
                      f"generator=torch.Generator().manual_seed({FRAME_SEED})) (ImageNet-normalised frames stand-in)",
        },
        "geometry": {"dim": DIM, "heads": HEADS, "mlp": MLP, "depth": DEPTH, "frames_per_chunk": FRAMES,
                     "patch": PATCH, "size": SIZE, "video_frames": VIDEO_FRAMES},
        "weight_seed": WEIGHT_SEED,
        "frame_seed": FRAME_SEED,
        "arrays": {
            "features": f"[{VIDEO_FRAMES}, 256, {DIM}] float32, the original's features per frame (blocks 0..depth-2, "
                        "no final norm, CLS dropped)",
            "frame_channel_means": f"[{VIDEO_FRAMES}, 3] float32 means of the input frames (a check on the seed)",
            "w.<name>": "float32 state dict in the original PretrainInternVideo2 names (no 'vision_encoder.' prefix)",
        },
        "regenerate": "python tools/goldens/internvideo2_parity.py /path/to/VideoGLaMM",
    }
    if not args.no_measure:
        use_repository()
        from workers.config import load_model_config
        from workers.internvideo2 import build_internvideo2, internvideo2_vision_config

        enc = build_internvideo2(internvideo2_vision_config(load_model_config("tiny").internvideo2))
        enc.load_original_state_dict(sd)
        with torch.no_grad():
            ours = enc(frames)
        meta["measured_vs_refstream"] = {"max_abs_diff": (ours - features).abs().max().item(),
                                         "feature_std": features.std().item()}
        print(f"RefStream vs original (record): {meta['measured_vs_refstream']}")
    out = args.out.with_suffix("") if args.out.suffix in (".json", ".npz") else args.out
    write_json(out.with_suffix(".json"), meta, compact=False)
    np.savez_compressed(out.with_suffix(".npz"), features=features.numpy(),
                        frame_channel_means=frames.mean(dim=(2, 3)).numpy(),
                        **{f"w.{k}": v.numpy() for k, v in sd.items()})
    print(f"wrote {out.with_suffix('.npz')} ({out.with_suffix('.npz').stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
