"""``refstream bench pruning``: what each pruning method costs next to the CLIP vision forward it prunes.

Full-size CLIP ViT-L/14-336 with random weights (the cost does not depend on the weights), 16 real frames
at 336 px, budgets 196 / 81 / 64 by default, every registered method under each placement. Measured in
one run, side by side:

- the CLIP vision forward VideoGLaMM needs anyway (``hidden_states[-2]``), without hooks, and the same
  forward with the hooks pruning needs (last-layer q/k/v, layer -2 q/k);
- what LiteLVLM adds: the text tower for N texts, the projection heads (``post_layernorm`` +
  ``visual_projection`` of the 576 patches), the hooks, and the selection;
- each method's selection time (median of ``repeats``), batched over the frames.

Targets (RefStream issue "Pruning"): LiteLVLM selection <= 0.1% of the vision forward for 16 frames, and
everything LiteLVLM adds <= 1%. A table with hardware and versions is printed; ``--json`` saves it.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import CLIPConfig, CLIPModel

from pruning.clip_features import ClipFeatureExtractor
from pruning.registry import available_methods, get_method
from refstream.bench import cpu_name
from video_pipeline.decode import open_video
from video_pipeline.plan import plan_frames
from video_pipeline.preprocess import clip_preprocess
from workers.tokenizers import tiny_clip_tokenizer

BUDGETS = (196, 81, 64)
SELECTION_TARGET = 0.001
TOTAL_TARGET = 0.01


def clip_config(size: str):
    """CLIPConfig of ``openai/clip-vit-large-patch14-336`` (``full``) or a tiny one for tests (``tiny``)."""
    if size == "full":
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, hidden_act="quick_gelu")
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408)
        return CLIPConfig(vision_config=vision, text_config=text, projection_dim=768)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=336,
                  patch_size=14)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=258,
                max_position_embeddings=77, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=32)


def environment() -> dict:
    """Hardware and software versions for the report."""
    return {
        "cpu": cpu_name(), "cores": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "platform": platform.platform(),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _frames(video: str | None, count: int) -> np.ndarray:
    """``count`` encoder frames of a real video (VideoGLaMM's frame plan), or random pixels without one."""
    if video:
        with open_video(video) as source:
            return source.read(plan_frames(source.num_frames, count).encoder_indices)
    return np.random.default_rng(0).integers(0, 256, (count, 480, 640, 3), dtype=np.uint8)


def _hook_overhead(clip, hidden: torch.Tensor, repeats: int) -> float:
    """Seconds the q/k/v hooks add to one batch: (hooked - plain) time of the two hooked layers, medians."""
    layers = clip.vision_model.encoder.layers
    store: dict = {}
    hooked = [(layers[-1], ("q_proj", "k_proj", "v_proj")), (layers[-2], ("q_proj", "k_proj"))]

    def run_layers() -> None:
        for layer, _ in hooked:
            layer(hidden, None)

    def median_time() -> float:
        return statistics.median(_timed(run_layers)[1] for _ in range(max(3, repeats)))

    with torch.inference_mode():
        run_layers()  # warm-up
        plain = median_time()
        handles = [getattr(layer.self_attn, name).register_forward_hook(
            lambda _m, _i, out, name=name: store.__setitem__(name, out)) for layer, names in hooked for name in names]
        try:
            with_hooks = median_time()
        finally:
            for handle in handles:
                handle.remove()
    return max(0.0, with_hooks - plain)


def run_benchmark(
    *, size: str = "full", frames: int = 16, budgets=BUDGETS, methods=None, placements=("pooled", "patch"),
    texts: int = 1, repeats: int = 5, forward_repeats: int = 2, video: str | None = None, log=print,
) -> dict:
    """Run the measurements and return the report dictionary (see the module docstring)."""
    torch.manual_seed(0)
    log(f"building CLIP ({size}) with random weights ...")
    clip, extractor = _random_clip(size, frames)
    pixels = clip_preprocess(_frames(video, frames))
    questions = _questions(texts)
    report: dict = {"environment": environment(), "size": size, "frames": frames, "texts": texts,
                    "video": video, "budgets": list(budgets),
                    "note": "text tower fed byte-level tokens (about 4x CLIP BPE's count): its time is an upper bound"}
    with torch.inference_mode():
        features, forward = _time_clip_forward(extractor, pixels, forward_repeats, log)
        report["clip_forward_s"] = forward
        report.update(_time_litelvlm_parts(clip, extractor, features, questions, repeats))
        text_embeds = extractor.encode_texts(questions)
    report["forward_difference_s"] = forward["with_hooks"] - forward["plain"]
    report["rows"] = _method_rows(features, text_embeds, methods, placements, budgets, repeats, forward["plain"])
    report["litelvlm"] = _litelvlm_verdict(report)
    report["peak_rss_mb"] = _peak_rss_mb()
    return report


def _random_clip(size: str, frames: int) -> tuple:
    """``(clip, extractor)``: CLIP of :func:`clip_config` with random weights, and its feature extractor.

    CLIP's BPE tokenizer cannot be downloaded here; the byte-level stand-in gives about 4x more tokens per
    question than BPE (one per character), so the text-tower time measured is an upper bound.
    """
    clip = CLIPModel(clip_config(size)).eval().requires_grad_(False)
    return clip, ClipFeatureExtractor(clip, tiny_clip_tokenizer(), chunk_size=frames)


def _questions(texts: int) -> list[str]:
    """``texts`` VideoGLaMM questions, one per referring expression (the text tower's input)."""
    question = "What is {e} in this video? Please respond with segmentation masks."
    expressions = ["the black swan", "the water on the left", "the green plants"][:texts] + [
        f"object {i}" for i in range(max(0, texts - 3))]
    return [question.format(e=e) for e in expressions]


def _time_clip_forward(extractor, pixels: torch.Tensor, repeats: int, log) -> tuple:
    """The CLIP vision forward without and with the pruning hooks, alternated ``repeats`` times (so that drift
    hits both equally). Returns ``(features of the hooked forward, {"plain", "with_hooks": fastest seconds,
    "runs_plain", "runs_hooked": every run})``."""
    plain, hooked = [], []
    for i in range(repeats):
        log(f"CLIP vision forward {i + 1}/{repeats}: plain ...")
        plain.append(_timed(lambda: extractor.encode_frames(pixels, with_scores=False))[1])
        log(f"CLIP vision forward {i + 1}/{repeats}: with q/k/v hooks ...")
        features, seconds = _timed(lambda: extractor.encode_frames(pixels, with_scores=True, with_penultimate=True))
        hooked.append(seconds)
    return features, {"plain": min(plain), "with_hooks": min(hooked), "runs_plain": plain, "runs_hooked": hooked}


def _time_litelvlm_parts(clip, extractor, features, questions: list[str], repeats: int) -> dict[str, float]:
    """Seconds of what LiteLVLM adds besides the selection (medians of ``repeats``): ``projection_heads_s``,
    ``text_tower_s`` and ``hooks_s``.

    The projection heads are computed inside ``encode_frames(with_scores=True)``: timed here on their own. Two
    16-frame forwards differ by seconds from run to run, far more than the hooks cost, so the hooks are timed
    where they act: the two hooked layers run alone, with and without their hooks.
    """
    proj_times = [
        _timed(lambda: clip.visual_projection(clip.vision_model.post_layernorm(features.hidden[:, 1:])))[1]
        for _ in range(repeats)
    ]
    hooks_s = _hook_overhead(clip, features.hidden, repeats)
    text_times = [_timed(lambda: extractor.encode_texts(questions))[1] for _ in range(repeats)]
    return {"projection_heads_s": statistics.median(proj_times), "text_tower_s": statistics.median(text_times),
            "hooks_s": hooks_s}


def _method_rows(features, text_embeds, methods, placements, budgets, repeats: int, t_plain: float) -> list[dict]:
    """One row per method (every registered one unless ``methods``), placement and budget: tokens kept, the
    median selection time and its ratio to the plain CLIP forward ``t_plain`` (None for methods that prune
    inside the LLM), and the peak RSS so far."""
    rows = []
    for name in methods or [m for m in available_methods() if not m.startswith("_")]:
        method_name, _, variant = name.partition(":")
        method = get_method(method_name, **({"variant": variant} if variant else {}))
        texts = text_embeds if method.needs_text else None
        for placement in placements:
            for budget in budgets:
                row = {"method": name, "placement": placement, "budget": budget}
                if method.stage == "llm":
                    row.update(kept=None, select_ms=None, ratio=None, note="prunes inside the LLM (see refstream flops)")
                else:
                    with torch.inference_mode():
                        selection = method.select(features, texts, budget, placement)
                        times = [_timed(lambda: method.select(features, texts, budget, placement))[1]
                                 for _ in range(repeats)]
                    t = statistics.median(times)
                    row.update(kept=selection.kept_per_frame, select_ms=t * 1e3, ratio=t / t_plain)
                row["peak_rss_mb"] = _peak_rss_mb()
                rows.append(row)
    return rows


def _litelvlm_verdict(report: dict) -> dict:
    """LiteLVLM against the targets: its slowest selection row, and everything it adds, as fractions of the
    plain CLIP forward."""
    t_plain = report["clip_forward_s"]["plain"]
    lite = [r for r in report["rows"] if r["method"].split(":")[0] == "litelvlm" and r["select_ms"] is not None]
    worst_select = max(r["select_ms"] for r in lite) / 1e3 if lite else float("nan")
    adds = report["text_tower_s"] + report["projection_heads_s"] + report["hooks_s"] + worst_select
    return {
        "selection_ratio_worst": worst_select / t_plain,
        "selection_target": SELECTION_TARGET,
        "adds_s": adds,
        "adds_ratio": adds / t_plain,
        "adds_target": TOTAL_TARGET,
        "selection_ok": worst_select / t_plain <= SELECTION_TARGET,
        "adds_ok": adds / t_plain <= TOTAL_TARGET,
    }


def format_table(report: dict) -> str:
    """The report as a fixed-width text table."""
    env = report["environment"]
    cf = report["clip_forward_s"]
    lines = [
        f"refstream bench pruning: CLIP ViT-L/14-336 ({report['size']}, random weights), {report['frames']} frames, "
        f"{report['texts']} text(s)",
        f"hardware: {env['cpu']}, {env['cores']} threads | python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']}",
        f"CLIP vision forward: {cf['plain']:.3f} s plain, {cf['with_hooks']:.3f} s with hooks "
        f"(runs {', '.join(f'{x:.2f}' for x in cf['runs_plain'])} / {', '.join(f'{x:.2f}' for x in cf['runs_hooked'])})",
        f"text tower: {report['text_tower_s'] * 1e3:.1f} ms | projection heads: {report['projection_heads_s'] * 1e3:.1f} ms"
        f" | hooks: {report['hooks_s'] * 1e3:.2f} ms (timed on the hooked layers; whole-forward difference "
        f"{report['forward_difference_s'] * 1e3:+.0f} ms is run-to-run noise)",
        "",
        f"{'method':<22}{'placement':<10}{'budget':>7}{'kept':>6}{'select ms':>11}{'% of CLIP':>11}{'peak RSS MB':>13}",
    ]
    for r in report["rows"]:
        kept = "-" if r["kept"] is None else str(r["kept"])
        ms = "-" if r["select_ms"] is None else f"{r['select_ms']:.2f}"
        pct = "-" if r["ratio"] is None else f"{100 * r['ratio']:.4f}"
        lines.append(f"{r['method']:<22}{r['placement']:<10}{r['budget']:>7}{kept:>6}{ms:>11}{pct:>11}"
                     f"{r['peak_rss_mb']:>13.0f}" + (f"  {r['note']}" if r.get("note") else ""))
    lite = report["litelvlm"]
    lines += [
        "",
        f"LiteLVLM selection, worst row: {100 * lite['selection_ratio_worst']:.4f}% of the CLIP forward "
        f"(target <= {100 * lite['selection_target']:.1f}%): {'OK' if lite['selection_ok'] else 'MISSED'}",
        f"everything LiteLVLM adds (text tower + heads + hooks + selection): {lite['adds_s'] * 1e3:.1f} ms = "
        f"{100 * lite['adds_ratio']:.3f}% (target <= {100 * lite['adds_target']:.0f}%): "
        f"{'OK' if lite['adds_ok'] else 'MISSED'}",
        f"peak RSS {report['peak_rss_mb']:.0f} MiB",
    ]
    return "\n".join(lines)


def main_bench_pruning(args) -> int:
    """CLI entry for ``refstream bench pruning``."""
    report = run_benchmark(
        size=args.size, frames=args.frames, budgets=args.budget or BUDGETS, methods=args.method or None,
        placements=args.placement or ("pooled", "patch"), texts=args.texts, repeats=args.repeats,
        forward_repeats=args.forward_repeats, video=args.video, log=(lambda *_: None) if args.quiet else print,
    )
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0
