"""Rebuild ``tests/golden/litelvlm_official_released.json`` with the released LiteLVLM code.

    python tools/goldens/litelvlm_official.py /path/to/LiteLVLM [--out FILE]
    python tools/goldens/litelvlm_official.py /path/to/LiteLVLM --check tests/golden/litelvlm_official_released.json

The checkout is https://github.com/sejong-rcv/LiteLVLM at 5896153. Its
``model/llava/model/multimodal_encoder/clip_encoder.py`` ``CLIPVisionTower.forward`` (the batch-of-one
LiteLVLM path: context-aware ranking from the last layer's q/k/v hooks, similarity-aware selection with the
CLIP text tower, the released combination, ``torch.gather``) runs unchanged on tiny random CLIP towers
(transformers ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``, built from fixed seeds).
Recorded per case, as the original computed them: the selected layer's hidden states (``feature_select``,
``cls_patch``), the last layer's q/k/v projections (the original's own hooks), the projected patch features
of ``sim_aware_pruning`` (a forward hook on ``visual_projection``), the text embeddings (``text_embeds`` of
the text tower's output), and the indices of the kept tokens, read back from the gathered features the
original returns (each gathered row equals exactly one patch row).

Runtime shims (recorded in the golden's ``how``), because the original targets CUDA and the hub:

* ``torch.cuda.Stream`` / ``torch.cuda.stream`` / ``torch.cuda.synchronize`` / ``torch.cuda.empty_cache``
  are no-ops (the two streams only overlap the image and text towers on a GPU);
* ``CLIPVisionTower.load_model`` is replaced: instead of ``from_pretrained`` it sets the tiny random towers
  and a stand-in tokenizer (word ids from a fixed hash, BOS/EOS, right padding, attention mask); the text
  features are recorded, so the tokenizer only has to be deterministic.

``--check FILE`` writes nothing: it replays the tensors recorded in a golden through the same original
``forward`` (towers that return the recorded hidden states, q/k/v, projected patches and text embeddings) and
compares the kept indices with the recorded ones. That checks a golden independently of how transformers
initialises the random towers (which may change between versions and change the regenerated inputs).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN_DIR, checkout_commit, parser, versions, write_json  # noqa: E402

NAME = "LiteLVLM"
OUT = GOLDEN_DIR / "litelvlm_official_released.json"

# (dtype, retained tokens, number of texts): the cases of the committed golden
CASES = [("float64", 5, 1), ("float64", 7, 3), ("float32", 16, 2), ("float64", 3, 5), ("float32", 1, 1),
         ("float64", 9, 2), ("float64", 16, 4), ("float32", 2, 3)]
SEED = 20250501  # case i uses SEED + i for the towers' weights and the image
WIDTH, PROJ, IMAGE, PATCH, LAYERS, HEADS, VOCAB = 16, 8, 16, 4, 2, 2, 64
SELECT_LAYER = -2  # mm_vision_select_layer default of LiteLVLM's eval/referring_seg/infer_and_evaluate.py
QUESTIONS = ["the black swan", "the water on the left", "a small bird", "what is in front", "the tree",
             "the person riding the bike"]


class WordTokenizer:
    """Stand-in for the CLIP tokenizer: one id per word (stable hash), BOS first, EOS last (the highest id, as
    in CLIP's vocabulary), right padding with 0."""

    BOS, EOS = VOCAB - 2, VOCAB - 1

    def __call__(self, text, return_tensors="pt", truncation=True, padding=True):
        import torch
        from transformers import BatchEncoding

        rows = [[self.BOS] + [1 + int(hashlib.sha256(w.encode()).hexdigest(), 16) % (VOCAB - 3) for w in t.split()]
                + [self.EOS] for t in text]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


def tiny_towers(seed: int, dtype):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE, patch_size=PATCH, projection_dim=PROJ, attn_implementation="eager"))
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=16, projection_dim=PROJ, bos_token_id=WordTokenizer.BOS,
        eos_token_id=WordTokenizer.EOS, pad_token_id=0, attn_implementation="eager"))
    return vision.to(dtype).eval(), text.to(dtype).eval()


def original_clip_encoder(checkout: Path):
    """The original ``clip_encoder`` module, with the CUDA stream calls made no-ops."""
    import torch

    sys.path.insert(0, str(checkout.resolve()))
    from model.llava.model.multimodal_encoder import clip_encoder  # the original module, unchanged

    class _NoStream:
        def __init__(self, *a, **k):
            pass

    torch.cuda.Stream = _NoStream
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    return clip_encoder


def gathered_indices(gathered, patches) -> list[int]:
    """The patch index of each gathered row (each must equal exactly one patch row)."""
    out = []
    for row in gathered[0]:
        match = (patches == row).all(dim=-1).nonzero().flatten().tolist()
        assert len(match) == 1, "a gathered row must equal exactly one patch row"
        out += match
    return out


def check(clip_encoder, golden: Path) -> int:
    """Replay the recorded tensors of ``golden`` through the original forward; the number of mismatches."""
    import json

    import torch
    from torch import nn
    from transformers import BatchEncoding

    class Recorded(nn.Module):
        def __init__(self, tensor):
            super().__init__()
            self.tensor = tensor

        def forward(self, x):
            return self.tensor

    class RecordedVision(nn.Module):
        """Answers as the vision tower did: hidden states, and the last layer's q/k/v through the hooked modules."""

        def __init__(self, case, dtype):
            super().__init__()
            t = {n: torch.tensor(case[n], dtype=dtype) for n in ("hidden", "q", "k", "v", "patch_embeds")}
            self.hidden = t["hidden"]
            attn = nn.Module()
            attn.q_proj, attn.k_proj, attn.v_proj = Recorded(t["q"]), Recorded(t["k"]), Recorded(t["v"])
            layer = nn.Module()
            layer.self_attn = attn
            self.vision_model = nn.Module()
            self.vision_model.encoder = nn.Module()
            self.vision_model.encoder.layers = nn.ModuleList([layer])
            self.vision_model.post_layernorm = nn.Identity()
            self.vision_model.post_layernorm.weight = nn.Parameter(torch.zeros(1, dtype=dtype))
            self.visual_projection = Recorded(t["patch_embeds"])  # post_layernorm + projection, as recorded

        dtype = property(lambda self: self.vision_model.post_layernorm.weight.dtype)
        device = property(lambda self: self.vision_model.post_layernorm.weight.device)

        def forward(self, images, output_hidden_states=True):
            attn = self.vision_model.encoder.layers[0].self_attn
            attn.q_proj(images), attn.k_proj(images), attn.v_proj(images)
            return SimpleNamespace(hidden_states=[self.hidden] * (1 - SELECT_LAYER))

    mismatches = 0
    for i, case in enumerate(json.loads(golden.read_text())["cases"]):
        dtype = getattr(torch, case["dtype"])
        text_embeds = torch.tensor(case["text_embeds"], dtype=dtype)
        vision = RecordedVision(case, dtype)

        def load_model(self, device_map=None, vision=vision, text_embeds=text_embeds):
            self.vision_tower = vision
            self.text_tower = lambda **kw: SimpleNamespace(text_embeds=text_embeds)
            self.text_tokenizer = lambda text, **kw: BatchEncoding({"input_ids": torch.zeros(len(text), 2)})
            self.is_loaded = True

        clip_encoder.CLIPVisionTower.load_model = load_model
        tower = clip_encoder.CLIPVisionTower("recorded", SimpleNamespace(mm_vision_select_layer=SELECT_LAYER,
                                                                         with_region=False))
        gathered, _ = tower(torch.zeros(1, 3, IMAGE, IMAGE, dtype=dtype),
                            questions_list=[["?"] * len(text_embeds)], num_retain_tokens=case["budget"])
        got = gathered_indices(gathered, vision.hidden[0, 1:])
        ok = got == case["released_indices"]
        mismatches += not ok
        print(f"case {i}: {'same' if ok else 'DIFFERENT'}: original {got}, recorded {case['released_indices']}")
    print(f"{golden}: {mismatches} case(s) differ from the original code")
    return mismatches


def main(argv=None) -> None:
    p = parser("rebuild tests/golden/litelvlm_official_released.json with the released LiteLVLM code", NAME, OUT)
    p.add_argument("--check", type=Path, metavar="GOLDEN", help="replay GOLDEN's recorded tensors through the "
                   "original code and compare the indices (writes nothing)")
    args = p.parse_args(argv)
    commit = checkout_commit(NAME, args.checkout, args.commit)
    import torch
    import transformers

    clip_encoder = original_clip_encoder(args.checkout)
    if args.check:
        sys.exit(1 if check(clip_encoder, args.check) else 0)

    cases = []
    for i, (dtype_name, budget, n_texts) in enumerate(CASES):
        dtype = getattr(torch, dtype_name)
        vision, text = tiny_towers(SEED + i, dtype)

        def load_model(self, device_map=None, vision=vision, text=text):
            self.vision_tower, self.text_tower, self.text_tokenizer = vision, text, WordTokenizer()
            self.is_loaded = True

        clip_encoder.CLIPVisionTower.load_model = load_model
        tower = clip_encoder.CLIPVisionTower(
            "tiny-random-clip", SimpleNamespace(mm_vision_select_layer=SELECT_LAYER, mm_vision_select_feature="patch",
                                                with_region=False))
        image = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(SEED + i), dtype=dtype)
        questions = [QUESTIONS[(i + t) % len(QUESTIONS)] for t in range(n_texts)]

        seen: dict = {}
        hooks = [
            vision.visual_projection.register_forward_hook(lambda m, a, out: seen.__setitem__("proj", out)),
            text.register_forward_hook(lambda m, a, out: seen.__setitem__("text", out.text_embeds)),
            vision.vision_model.encoder.layers[-1].self_attn.q_proj.register_forward_hook(
                lambda m, a, out: seen.__setitem__("q", out)),
            vision.vision_model.encoder.layers[-1].self_attn.k_proj.register_forward_hook(
                lambda m, a, out: seen.__setitem__("k", out)),
            vision.vision_model.encoder.layers[-1].self_attn.v_proj.register_forward_hook(
                lambda m, a, out: seen.__setitem__("v", out)),
            vision.register_forward_hook(
                lambda m, a, out: seen.__setitem__("hidden", out.hidden_states[SELECT_LAYER])),
        ]
        try:
            gathered, _ = tower(image, questions_list=[questions], num_retain_tokens=budget)
        finally:
            for h in hooks:
                h.remove()
        assert seen["proj"].shape == (1, (IMAGE // PATCH) ** 2, PROJ)
        indices = gathered_indices(gathered, seen["hidden"][0, 1:])
        cases.append({"dtype": dtype_name, "budget": budget, "seed": SEED + i, "questions": questions,
                      "hidden": seen["hidden"].tolist(), "q": seen["q"].tolist(), "k": seen["k"].tolist(),
                      "v": seen["v"].tolist(), "patch_embeds": seen["proj"].tolist(),
                      "text_embeds": seen["text"].tolist(), "released_indices": indices})
        print(f"case {i}: {dtype_name}, budget {budget}, {n_texts} text(s): {indices}")

    write_json(args.out, {
        "source": f"github sejong-rcv/LiteLVLM @ {commit}, model/llava/model/multimodal_encoder/clip_encoder.py, "
                  "CLIPVisionTower.forward run on CPU with tiny random CLIP towers; indices read back from the "
                  "gathered features",
        "how": {
            "script": "tools/goldens/litelvlm_official.py",
            "towers": f"transformers CLIPVisionModelWithProjection / CLIPTextModelWithProjection, width {WIDTH}, "
                      f"projection {PROJ}, {LAYERS} layers, {HEADS} heads, image {IMAGE} px, patch {PATCH}; "
                      "transformers' own initialisation after torch.manual_seed(case seed); "
                      "mm_vision_select_layer -2",
            "inputs": "image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(case seed))",
            "runtime_shims": ["torch.cuda.Stream/stream/synchronize/empty_cache: no-ops on CPU",
                              "CLIPVisionTower.load_model sets the tiny towers and a word-hash tokenizer instead "
                              "of from_pretrained (text_embeds are recorded)"],
            "recorded": "hidden = hidden_states[-2] (cls_patch), q/k/v = the last layer's q_proj/k_proj/v_proj "
                        "outputs (the original's hooks), patch_embeds = visual_projection output inside "
                        "sim_aware_pruning, text_embeds = text tower output",
            "generated_with": versions(torch, transformers),
        },
        "regenerate": "python tools/goldens/litelvlm_official.py /path/to/LiteLVLM",
        "cases": cases,
    })


if __name__ == "__main__":
    main()
