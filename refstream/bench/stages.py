"""``refstream bench stages``: the measured cost of the VideoGLaMM model, stage by stage (RefStream issue 14).

The architecture of a model config (default ``configs/videoglamm.yaml``: CLIP ViT-L/14-336, InternVideo2-1B,
Phi-3-mini, SAM2 Hiera-L) is built with **random weights, no checkpoint**: each stage's modules are built on
the meta device (:func:`workers.stats.build_skeleton`), then only that stage's parameters are materialised
(:func:`materialize`: empty tensors filled from N(0, 0.02) under a fixed seed, norm weights 1, biases 0; the
non-persistent buffers rebuilt by :func:`workers.loading.materialize_meta_buffers`), timed, and freed before
the next stage (``gc`` + the RSS after freeing is recorded). The weights do not change the work a forward
does, so the times are those of the released model; the outputs mean nothing.

Stages, in run order (``--stages`` picks some; the others are skipped):

``decode``        every SAM2 frame of the video (chunks of 8) and the encoder frames (as ``Pipeline``)
``clip``          CLIP preprocess + vision forward with the q/k/v hooks the methods need + the text tower
``prune``         the pruning method's selection (per row)
``internvideo2``  InternVideo2 preprocess + forward (T/4 chunks of 4 frames)
``projectors``    ``image_mm_projector`` + pooling + the kept cells, ``mm_projector`` + pooling (per row)
``llm``           Phi-3 prefill of the whole sequence + ``text_hidden_fcs`` (per row; the forced answer)
``sam2``          per frame: the image encoder, and memory attention + mask decoder + memory encoder
                  (``Sam2Stream.step`` with forward hooks on ``vision_encoder``/``memory_attention``), timed
                  on ``--sam2-frames N`` frames and extrapolated to the video's SAM2 frames
``write``         ``JobWriter.add`` (COCO RLE + overlay video) for every SAM2 frame, and its close

Rows are (method, budget, placement); the first row is always the unpruned reference (``none``, 576, pooled).
Stages that do not depend on the row (decode, clip, internvideo2, sam2, write) are measured once and shared.
The LLM's input length is :func:`workers.stats.stage_flops`' ``sequence_length`` (the code of ``refstream
flops``: the kept CLIP units + the InternVideo2 tokens of every encoder frame + ``--text-tokens``); its
embeddings are the projectors' real output when that stage ran (random otherwise) around random text
embeddings. A stage's input comes from the stage before it when that one ran, else it is a random tensor of
the right shape (the report says which). FLOPs per stage are ``refstream flops``' numbers.

Per row: wall seconds per stage, tokens into the LLM, TFLOPs per stage, achieved GFLOP/s, the peak RSS while
the stage ran (a 10 ms sampler of ``/proc/self/statm``; CUDA: ``torch.cuda.max_memory_allocated``), and the
paper's Table 6 summary: LLM prefill seconds and whole-job seconds, each as a ratio of the unpruned row.
On CUDA every timed region is bracketed by ``torch.cuda.synchronize()``.

``refstream`` imports this module to build its parser: torch and the model code are imported inside the
functions that run the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

from refstream.bench import cpu_name
from refstream.errors import ConfigError
from refstream.memory import release_freed_memory

STAGES = ("decode", "clip", "prune", "internvideo2", "projectors", "llm", "sam2", "write")
#: stages measured once per video and shared by every row (the others are measured per row)
SHARED = ("decode", "clip", "internvideo2", "sam2", "write")
DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "examples" / "bedroom.mp4"
DEFAULT_EXPRESSION = "the bed"
UNPRUNED = ("none", 576, "pooled")
INIT_STD = 0.02
RANDOM_NOTE = ("random weights N(0, 0.02) (no checkpoint): the times are the architecture's, the outputs mean "
               "nothing")


# ----------------------------------------------------------------------------------------------- helpers
def rss_mb() -> float:
    """Resident set size of this process now, MiB (``/proc/self/statm``; the peak so far where unreadable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def available_mb() -> float | None:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB (None where unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


class PeakRSS:
    """Peak RSS (MiB) while a block runs: a daemon thread samples :func:`rss_mb` every ``interval`` seconds.

    Use as a context manager; ``peak_mb`` holds the maximum (including the values at entry and exit).
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> "PeakRSS":
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


class StageClock:
    """Times stages on one device: wall seconds between ``torch.cuda.synchronize()`` calls on CUDA, peak RSS
    (:class:`PeakRSS`) and, on CUDA, ``torch.cuda.max_memory_allocated`` (reset at each block's start).

    ``with clock("llm", row=2): ...`` adds the block's seconds to ``clock.seconds[(stage, row)]`` and keeps the
    peaks per key (``row`` None = a shared stage).
    """

    def __init__(self, device):
        self.device = device
        self.seconds: dict = {}
        self.peak_rss_mb: dict = {}
        self.cuda_max_mb: dict = {}

    def sync(self) -> None:
        """Wait for the device's queued work (no-op on the CPU)."""
        if self.device.type == "cuda":
            import torch  # lazy (see the module docstring)

            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage: str, row: int | None = None):
        import torch  # lazy (see the module docstring)

        key = (stage, row)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        with PeakRSS() as peak:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.sync()
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        self.peak_rss_mb[key] = max(self.peak_rss_mb.get(key, 0.0), peak.peak_mb)
        if cuda:
            self.cuda_max_mb[key] = max(self.cuda_max_mb.get(key, 0.0),
                                        torch.cuda.max_memory_allocated(self.device) / 2**20)


def parse_stages(text: str | None) -> tuple[str, ...]:
    """``--stages`` (comma-separated, or ``all``/None) -> the stages in run order.

    Raises:
        ConfigError: an unknown stage name (the message lists the stages).
    """
    if text is None or text.strip() in ("", "all"):
        return STAGES
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose among {','.join(STAGES)} "
                          "(comma-separated, e.g. --stages llm,sam2) or all")
    return tuple(s for s in STAGES if s in names)


def plan_rows(methods, budgets, placements) -> list[tuple[str, int, str]]:
    """The rows: the unpruned reference (``none``, 576, pooled) first, then every pruning method x budget
    (< 576) x placement. ``none`` and budgets >= 576 add no row of their own (they are the reference).

    Raises:
        ConfigError: a budget < 1, an unknown placement, or a method that prunes inside the LLM.
    """
    rows = [UNPRUNED]
    for budget in budgets:
        if budget < 1:
            raise ConfigError(f"--budget must be >= 1, got {budget}")
    for placement in placements:
        if placement not in ("pooled", "patch"):
            raise ConfigError(f"--placement must be pooled or patch, got {placement!r}")
    for method in methods:
        if method.split(":")[0] == "none":
            continue
        for budget in budgets:
            if budget >= 576:
                continue
            for placement in placements:
                row = (method, budget, placement)
                if row not in rows:
                    rows.append(row)
    return rows


def resolve_dtype(name: str, device):
    """``auto`` -> float32 on the CPU, bfloat16 on CUDA; else float32 / bfloat16 / float16 (allowed on the CPU
    too: a bf16 CPU run halves the memory, with slower kernels).

    Raises:
        ConfigError: an unknown name.
    """
    import torch  # lazy (see the module docstring)

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in names:
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16; got {name!r}")
    return names[name]


def materialize(module, device, dtype, seed: int, std: float = INIT_STD):
    """Give a meta-device module real random weights on ``device`` in ``dtype``, fast, without a checkpoint.

    Parameters become empty tensors filled in place under ``torch.Generator(seed)``: norm weights (1-D
    ``weight`` of a module whose class name contains ``Norm``) 1, 1-D ``bias`` 0, everything else
    N(0, ``std``) (small, so activations stay finite through 32 layers). Buffers left on the meta device
    (rotary ``inv_freq``, position ids, SAM2's random Fourier features) are rebuilt from the module configs
    (:func:`workers.loading.materialize_meta_buffers`), then moved and cast like the parameters.

    Args:
        module: a ``torch.nn.Module`` built under ``torch.device("meta")``.
        device: a ``torch.device``. dtype: the parameter dtype. seed: the generator seed.

    Returns:
        the module, in eval mode, ``requires_grad_(False)``.

    Raises:
        RuntimeError: a buffer could not be rebuilt (named by ``materialize_meta_buffers``).
    """
    import torch  # lazy (see the module docstring)

    from workers.loading import materialize_meta_buffers

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "norm" in type(mod).__name__.lower()
            for name, param in list(mod._parameters.items()):
                if param is None:
                    continue
                if not param.is_meta:
                    mod._parameters[name] = torch.nn.Parameter(param.to(device, dtype), requires_grad=False)
                    continue
                tensor = torch.empty(param.shape, dtype=dtype, device=device)
                if param.dim() == 1 and name == "weight" and is_norm:
                    tensor.fill_(1.0)
                elif param.dim() == 1 and name == "bias":
                    tensor.zero_()
                else:
                    tensor.normal_(0.0, std, generator=generator)
                mod._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    materialize_meta_buffers(module)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def module_bytes(module, dtype) -> int:
    """Bytes the parameters of ``module`` take in ``dtype`` (meta modules included)."""
    import torch  # lazy (see the module docstring)

    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in module.parameters()) * size


def check_memory(what: str, needed: int, device) -> None:
    """Refuse to materialise ``needed`` bytes when the device has less free memory (with a 10% margin).

    Raises:
        ConfigError: not enough memory; names the stage, the sizes and the fixes (``--stages``, ``--dtype``).
    """
    import torch  # lazy (see the module docstring)

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] / 2**20
    else:
        free = available_mb()
    need_mb = needed / 2**20
    if free is not None and need_mb * 1.1 > free:
        raise ConfigError(
            f"the {what} stage needs about {need_mb / 1024:.1f} GiB for its weights but only {free / 1024:.1f} GiB "
            f"are free on {device.type}: run it alone (--stages {what}), or halve it with --dtype bfloat16")


def _free() -> None:
    """Collect garbage, hand freed heap pages back to the OS (glibc ``malloc_trim``: without it the pages freed
    by a stage's forward in the worker threads' arenas stay in the RSS) and return cached CUDA blocks. The
    caller drops its references first."""
    release_freed_memory()
    try:
        import torch  # lazy (see the module docstring)

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def environment(device) -> dict:
    """Hardware and software versions for the report (CPU, threads, RAM, GPU, Python, torch, transformers)."""
    import numpy as np
    import torch
    import transformers

    env = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "load_average_start": list(os.getloadavg()),
    }
    try:
        total = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
        env["ram_gib"] = round(total / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        env["ram_gib"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    return env


# ----------------------------------------------------------------------------------------------- the run
def run_stages(
    model: str = "videoglamm", *, device: str = "cpu", dtype: str = "auto", video: str | Path | None = None,
    frames: int = 16, max_frames: int | None = None, methods=("none", "litelvlm"), budgets=(576, 196, 81),
    placements=("pooled",), stages=STAGES, sam2_frames: int = 8, text_tokens: int | None = None,
    expression: str = DEFAULT_EXPRESSION, decoder: str = "decord", seed: int = 0, log=print,
) -> dict:
    """Measure every stage of ``stages`` for every row (see the module docstring) and return the report.

    Args:
        model: a preset (``videoglamm``, ``tiny``) or a YAML path (``configs/tiny.yaml``).
        device: ``cpu`` or ``cuda``. dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        video: a video file or frame folder (default: ``examples/bedroom.mp4``).
        frames: encoder frames (a positive multiple of 4). max_frames: at most this many SAM2 frames.
        methods, budgets, placements: the rows (:func:`plan_rows`).
        stages: what to run (:data:`STAGES` order; the others are skipped).
        sam2_frames: SAM2 frames actually run; the rest of the video's frames are extrapolated.
        text_tokens: prompt text tokens in the LLM input (default: ``refstream flops``' 50).
        expression: the referring expression (CLIP text tower input for methods that read text).
        decoder: ``decord`` or ``pyav``. seed: weight init seed (stage k uses ``seed + k``).
        log: progress lines (``print`` or a no-op).

    Returns:
        the report dictionary (``environment``, ``settings``, ``stages`` (shared), ``rows``, ``summary``).

    Raises:
        ConfigError: bad options (named by their flag), too little memory for a stage, CUDA not available.
    """
    import numpy as np
    import torch

    from pruning.clip_features import ClipFeatureExtractor, ClipFrameFeatures
    from refstream.config import load_model_config
    from refstream.options import make_method
    from refstream.outputs import JobWriter, logits_to_mask
    from refstream.pipeline import resolve_device
    from video_pipeline.decode import open_video
    from video_pipeline.plan import plan_frames
    from video_pipeline.preprocess import clip_preprocess, internvideo_preprocess, sam2_preprocess
    from workers.sam2_decoder import Sam2VideoDecoder, sam2_image_size
    from workers.stats import PHI3_PROMPT_TOKENS, build_skeleton, stage_flops
    from workers.tokenizers import tiny_clip_tokenizer
    from workers.videoglamm import VideoGLaMM, pool_grid

    if frames < 4 or frames % 4:
        raise ConfigError(f"--frames must be a positive multiple of 4 (InternVideo2 reads chunks of 4), got {frames}")
    if sam2_frames < 1:
        raise ConfigError(f"--sam2-frames must be >= 1, got {sam2_frames}")
    if text_tokens is None:
        text_tokens = PHI3_PROMPT_TOKENS
    if text_tokens < 1:
        raise ConfigError(f"--text-tokens must be >= 1, got {text_tokens}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = load_model_config(model)
    rows = plan_rows(methods, budgets, placements)
    row_methods = [make_method(m) for m, _, _ in rows]
    for (name, _, _), method in zip(rows, row_methods):
        if method.stage == "llm":
            raise ConfigError(f"--method {name} prunes inside the LLM: its cost per layer is in `refstream flops "
                              f"--method {name}`; bench stages times methods that prune before the LLM")
    video = Path(video) if video is not None else DEFAULT_VIDEO
    stages = tuple(s for s in STAGES if s in stages)
    clock = StageClock(dev)
    notes: dict[str, str] = {}
    synthetic: list[str] = []
    rss_after: dict[str, float] = {}  # RSS after each materialised stage was freed (MiB)
    rng = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=rng) * INIT_STD).to(dev, torch_dtype)

    report: dict = {
        "environment": environment(dev),
        "settings": {"model": config.name, "device": str(dev), "dtype": str(torch_dtype).replace("torch.", ""),
                     "video": str(video), "frames": frames, "max_frames": max_frames, "stages": list(stages),
                     "sam2_frames": sam2_frames, "text_tokens": text_tokens, "expression": expression,
                     "random_weights": RANDOM_NOTE},
    }

    # ---- FLOPs and token counts: the code of `refstream flops`, on the meta device
    log(f"{config.name}: FLOPs per stage on the meta device ...")
    skeleton = build_skeleton(config)
    flops = [stage_flops(skeleton, config, frames=frames, method=m, budget=b, placement=p, text_tokens=text_tokens)
             for m, b, p in rows]

    # ---- decode (always run: later stages need frames; timed and reported when asked for)
    with open_video(video, decoder) as source:
        plan = plan_frames(source.num_frames, frames, 1, max_frames)
        height, width, fps = source.height, source.width, source.fps
        kept: list = []
        with clock("decode"):
            encoder_frames = source.read(plan.encoder_indices)
            for _, chunk in source.iter_chunks(plan.sam2_indices, chunk_size=8):
                for frame in chunk:
                    if len(kept) < sam2_frames:
                        kept.append(frame)
    total_frames = len(plan.sam2_indices)
    sam2_timed = min(sam2_frames, total_frames)
    sam2_kept = np.stack(kept[:sam2_timed])
    log(f"decode: {total_frames} SAM2 frames {width}x{height}, {frames} encoder frames "
        f"({clock.seconds[('decode', None)]:.2f} s)")

    # ---- CLIP (full CLIPModel: vision forward with hooks + text tower)
    needs_scores = any(m.needs_scores for m in row_methods)
    needs_pen = any(m.needs_penultimate for m in row_methods)
    needs_text = any(m.needs_text for m in row_methods)
    features = text_embeds = None
    vcfg = skeleton["clip"].config.vision_config
    if "clip" in stages:
        clip = skeleton["clip"]
        check_memory("clip", module_bytes(clip, torch_dtype), dev)
        log(f"clip: materialising {sum(p.numel() for p in clip.parameters()) / 1e6:.1f} M parameters ...")
        clip = materialize(clip, dev, torch_dtype, seed)
        extractor = ClipFeatureExtractor(clip, tiny_clip_tokenizer(), chunk_size=frames)
        with torch.inference_mode():  # warm-up on one frame, not timed
            extractor.encode_frames(clip_preprocess(encoder_frames[:1]), with_scores=needs_scores,
                                    with_penultimate=needs_pen)
        with torch.inference_mode(), clock("clip"):
            pixels = clip_preprocess(encoder_frames)
            features = extractor.encode_frames(pixels, with_scores=needs_scores, with_penultimate=needs_pen)
            if needs_text:
                text_embeds = extractor.encode_texts([config.clip_question.format(expression=expression.lower())])
        notes["clip"] = "text tower on byte-level tokens (no CLIP BPE offline): an upper bound" if needs_text else ""
        skeleton["clip"] = None
        del clip, extractor
        _free()
        rss_after["clip"] = rss_mb()
        log(f"clip: {clock.seconds[('clip', None)]:.2f} s")
    elif {"prune", "projectors"} & set(stages):
        side = vcfg.image_size // vcfg.patch_size
        n, d = 1 + side * side, vcfg.hidden_size
        empty = torch.empty(0, device=dev, dtype=torch_dtype)
        features = ClipFrameFeatures(
            hidden=randn(frames, n, d), q=randn(frames, n, d) if needs_scores else empty,
            k=randn(frames, n, d) if needs_scores else empty, v=randn(frames, n, d) if needs_scores else empty,
            patch_embeds=randn(frames, n - 1, skeleton["clip"].config.projection_dim) if needs_scores else None,
            penultimate_q=randn(frames, n, d) if needs_pen else None,
            penultimate_k=randn(frames, n, d) if needs_pen else None, num_heads=vcfg.num_attention_heads)
        text_embeds = randn(1, skeleton["clip"].config.projection_dim) if needs_text else None
        synthetic.append("CLIP features (clip skipped)")

    # ---- pruning (per row)
    selections: list = [None] * len(rows)
    if {"prune", "projectors"} & set(stages):
        with torch.inference_mode():
            for r, ((name, budget, placement), method) in enumerate(zip(rows, row_methods)):
                texts = text_embeds if method.needs_text else None
                if "prune" in stages:
                    method.select(features, texts, budget, placement)  # warm-up (first-call allocations)
                    with clock("prune", r):
                        selections[r] = method.select(features, texts, budget, placement)
                else:
                    selections[r] = method.select(features, texts, budget, placement)

    # ---- InternVideo2
    iv2_features = None
    if "internvideo2" in stages:
        iv2 = skeleton["internvideo2"]
        check_memory("internvideo2", module_bytes(iv2, torch_dtype), dev)
        log(f"internvideo2: materialising {sum(p.numel() for p in iv2.parameters()) / 1e6:.1f} M parameters ...")
        iv2 = materialize(iv2, dev, torch_dtype, seed + 1)
        with torch.inference_mode(), clock("internvideo2"):
            iv2_features = iv2(internvideo_preprocess(encoder_frames).to(dev, torch_dtype))
        skeleton["internvideo2"] = None
        del iv2
        _free()
        rss_after["internvideo2"] = rss_mb()
        log(f"internvideo2: {clock.seconds[('internvideo2', None)]:.2f} s")
    elif "projectors" in stages:
        iv2 = skeleton["internvideo2"]
        iv2_features = randn(frames, iv2.tokens_per_frame, iv2.hidden_size)
        synthetic.append("InternVideo2 features (internvideo2 skipped)")

    # ---- projectors (per row)
    visual: list = [None] * len(rows)
    if "projectors" in stages:
        image_proj = materialize(skeleton["image_mm_projector"], dev, torch_dtype, seed + 2)
        video_proj = materialize(skeleton["mm_projector"], dev, torch_dtype, seed + 3)
        host = argparse.Namespace(dtype=torch_dtype, image_mm_projector=image_proj, config=config)
        with torch.inference_mode():
            for r, (_, _, placement) in enumerate(rows):
                with clock("projectors", r):
                    clip_tokens = VideoGLaMM.clip_tokens(host, features.hidden, selections[r], placement)
                    iv2_tokens = pool_grid(video_proj(iv2_features.to(torch_dtype)), config.internvideo2_pool)
                    visual[r] = torch.cat([clip_tokens.flatten(0, 1), iv2_tokens.flatten(0, 1)])
                if visual[r].shape[0] != flops[r]["visual_tokens"]:
                    raise RuntimeError(f"row {rows[r]}: the projectors made {visual[r].shape[0]} visual tokens but "
                                       f"refstream flops counts {flops[r]['visual_tokens']}")
        del image_proj, video_proj, host
        _free()
    features = iv2_features = None
    gc.collect()

    # ---- LLM prefill (per row)
    seg = None
    if "llm" in stages:
        llm = skeleton["llm"]
        body = llm.model  # the prefill never reads lm_head (forced answer); it stays on the meta device
        check_memory("llm", module_bytes(body, torch_dtype), dev)
        log(f"llm: materialising {sum(p.numel() for p in body.parameters()) / 1e6:.1f} M parameters "
            f"({module_bytes(body, torch_dtype) / 2**30:.1f} GiB) ...")
        body = materialize(body, dev, torch_dtype, seed + 4)
        fcs = materialize(skeleton["text_hidden_fcs"], dev, torch_dtype, seed + 5)
        hidden = llm.config.hidden_size
        with torch.inference_mode():  # warm-up on a short sequence (first-call allocations), not timed
            body(inputs_embeds=randn(1, 32, hidden), use_cache=False)
        for r, row in enumerate(rows):
            length = flops[r]["sequence_length"]
            if not flops[r]["fits_positions"]:
                notes[f"llm:{r}"] = f"skipped: {length} tokens exceed the LLM's {flops[r]['max_positions']} positions"
                log(f"llm {row}: {notes[f'llm:{r}']}")
                continue
            if visual[r] is not None:
                embeds = torch.cat([randn(text_tokens, hidden), visual[r]]).unsqueeze(0)
            else:
                embeds = randn(1, length, hidden)
                if r == 0:
                    synthetic.append("LLM visual embeddings (projectors skipped)")
            mask = torch.ones(1, length, dtype=torch.long, device=dev)
            log(f"llm {row}: prefill of {length} tokens ...")
            with torch.inference_mode(), clock("llm", r):
                out = body(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
                seg = fcs(out[:, -2])
            if not torch.isfinite(out).all():
                notes[f"llm:{r}"] = "non-finite hidden states"
            log(f"llm {row}: {clock.seconds[('llm', r)]:.2f} s")
            del out, embeds
        skeleton["llm"] = None
        del body, fcs, llm
        _free()
        rss_after["llm"] = rss_mb()
    visual = [None] * len(rows)
    gc.collect()

    # ---- SAM2 (shared: timed on sam2_timed frames, extrapolated to total_frames)
    masks_for_write = None
    sam2_detail: dict = {}
    if "sam2" in stages:
        sam2 = skeleton["sam2"]
        check_memory("sam2", module_bytes(sam2, torch_dtype), dev)
        log(f"sam2: materialising {sum(p.numel() for p in sam2.parameters()) / 1e6:.1f} M parameters ...")
        sam2 = materialize(sam2, dev, torch_dtype, seed + 6)
        if seg is None:
            seg = randn(1, config.seg_dim)
            synthetic.append("[SEG] embedding (llm skipped)")
        size = sam2_image_size(sam2)
        spans = {"vision_encoder": [], "memory_attention": []}
        starts: dict = {}
        handles = []
        def enter(name):
            def hook(*_args):  # returns None: the inputs are left as they are
                clock.sync()
                starts[name] = time.perf_counter()
            return hook

        def leave(name):
            def hook(*_args):  # returns None: the output is left as it is
                clock.sync()
                spans[name].append(time.perf_counter() - starts[name])
            return hook

        for name in spans:
            module = getattr(sam2, name)
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name)))
        per_frame, encoder_s, memory_s = [], [], []
        masks_for_write = []
        try:
            stream = Sam2VideoDecoder(sam2).open_stream(seg.float(), (height, width))
            try:
                for j in range(sam2_timed):
                    before = {k: len(v) for k, v in spans.items()}
                    with torch.inference_mode(), clock("sam2_frame", j):
                        pixels = sam2_preprocess(sam2_kept[j:j + 1], style="videoglamm", size=size)
                        logits = stream.step(pixels[0].to(dev, torch_dtype))
                        mask = logits_to_mask(logits[0].float().cpu(), (height, width))
                    masks_for_write.append(mask)
                    per_frame.append(clock.seconds[("sam2_frame", j)])
                    encoder_s.append(sum(spans["vision_encoder"][before["vision_encoder"]:]))
                    memory_s.append(sum(spans["memory_attention"][before["memory_attention"]:]))
                    log(f"sam2 frame {j + 1}/{sam2_timed}: {per_frame[-1]:.2f} s (image encoder {encoder_s[-1]:.2f} s)")
            finally:
                stream.close()
        finally:
            for handle in handles:
                handle.remove()
        rest = [t - e for t, e in zip(per_frame, encoder_s)]
        # the memory bank fills over the first num_maskmem frames: later frames cost what the timed frames
        # with the fullest bank cost (the anchor frame has no memory attention)
        full_bank = int(sam2.config.num_maskmem)
        steady = [x for j, x in enumerate(rest) if j >= min(full_bank, sam2_timed - 1)] or rest[-1:]
        extra = total_frames - sam2_timed
        # measured frames count as measured; the others at the median image encoder (robust to a first-call
        # overhead) and at the memory attention + decoder cost of the fullest memory bank timed
        encoder_total = sum(encoder_s) + extra * statistics.median(encoder_s)
        rest_total = sum(rest) + extra * statistics.mean(steady)
        sam2_detail = {
            "timed_frames": sam2_timed, "video_frames": total_frames, "extrapolated": extra > 0,
            "per_frame_s": per_frame, "image_encoder_per_frame_s": encoder_s,
            "memory_attention_per_frame_s": memory_s, "memory_decoder_per_frame_s": rest,
            "steady_memory_decoder_s": statistics.mean(steady), "memory_bank_full": sam2_timed > full_bank,
        }
        clock.seconds[("sam2_image_encoder", None)] = encoder_total
        clock.seconds[("sam2_memory_decoder", None)] = rest_total
        peak = max(clock.peak_rss_mb[("sam2_frame", j)] for j in range(sam2_timed))
        for key in ("sam2_image_encoder", "sam2_memory_decoder"):
            clock.peak_rss_mb[(key, None)] = peak
            if dev.type == "cuda":
                clock.cuda_max_mb[(key, None)] = max(clock.cuda_max_mb[("sam2_frame", j)] for j in range(sam2_timed))
        if extra > 0:
            notes["sam2"] = (f"extrapolated from {sam2_timed} frames to {total_frames}"
                             + ("" if sam2_timed > full_bank else
                                f" (memory bank not yet full in the timed frames: fewer than {full_bank + 1}; "
                                "a lower bound)"))
        skeleton["sam2"] = None
        del sam2, stream
        _free()
        rss_after["sam2"] = rss_mb()
        log(f"sam2: image encoder {encoder_total:.2f} s, memory attention + decoder {rest_total:.2f} s "
            f"for {total_frames} frames")

    # ---- write (shared): JobWriter over every SAM2 frame (frames decoded again, outside the timing)
    if "write" in stages:
        if not masks_for_write:
            yy, xx = np.mgrid[:height, :width]
            masks_for_write = [((yy - height / 2) ** 2 / (height / 3) ** 2 + (xx - width / 2) ** 2 / (width / 3) ** 2)
                               < 1]
            synthetic.append("masks (sam2 skipped): one ellipse")
        with tempfile.TemporaryDirectory(prefix="refstream-bench-stages-") as tmp, open_video(video, decoder) as source:
            writer = JobWriter(Path(tmp) / "out", 1, width, height, fps)
            position = 0
            for _, chunk in source.iter_chunks(plan.sam2_indices, chunk_size=8):
                for frame in chunk:
                    writer.add(frame, masks_for_write[position % len(masks_for_write)][None])
                    position += 1
            close_start = time.perf_counter()
            writer.close()
            clock.seconds[("write", None)] = writer.seconds + time.perf_counter() - close_start
            clock.peak_rss_mb[("write", None)] = rss_mb()
        log(f"write: {clock.seconds[('write', None)]:.2f} s")

    report["environment"]["load_average_end"] = list(os.getloadavg())
    report["environment"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    report["synthetic_inputs"] = synthetic
    report["rss_after_free_mb"] = rss_after
    report["sam2"] = sam2_detail
    report["rows"] = _rows(rows, flops, stages, clock, notes, total_frames)
    report["summary"] = _summary(report["rows"], stages)
    report["notes"] = {k: v for k, v in notes.items() if v and ":" not in k}
    return report


#: report columns: stage -> (the clock key, the FLOPs key of stage_flops, FLOPs multiplier kind)
COLUMNS = (
    ("decode", "decode", None),
    ("clip", "clip", "clip"),
    ("prune", "prune", None),
    ("internvideo2", "internvideo2", "internvideo2"),
    ("projectors", "projectors", "projectors"),
    ("llm", "llm", "llm_prefill"),
    ("sam2_image_encoder", "sam2", "sam2_image_encoder"),
    ("sam2_memory_decoder", "sam2", "sam2_memory_attention"),
    ("write", "write", None),
)


def _rows(rows, flops, stages, clock, notes, total_frames) -> list[dict]:
    out = []
    for r, ((method, budget, placement), fl) in enumerate(zip(rows, flops)):
        per_stage = {}
        for column, stage, flops_key in COLUMNS:
            if stage not in stages:
                continue
            key = (column, None) if (column, None) in clock.seconds else (column, r)
            if key not in clock.seconds:
                continue  # e.g. the LLM of a row that exceeds the positions
            seconds = clock.seconds[key]
            value = None
            if flops_key is not None:
                value = fl["flops"][flops_key] * (total_frames if column.startswith("sam2") else 1)
            per_stage[column] = {
                "seconds": seconds, "shared": key[1] is None,
                "tflops": None if value is None else value / 1e12,
                "gflops_per_s": None if value is None or seconds <= 0 else value / seconds / 1e9,
                "peak_rss_mb": clock.peak_rss_mb.get(key),
                "cuda_max_allocated_mb": clock.cuda_max_mb.get(key),
            }
        out.append({
            "method": method, "budget": budget, "placement": placement, "unpruned": (method, budget, placement) == UNPRUNED,
            "clip_tokens_per_frame": fl["clip_tokens_per_frame"], "visual_tokens": fl["visual_tokens"],
            "tokens_into_llm": fl["sequence_length"], "fits_positions": fl["fits_positions"],
            "flops_tf": {k: v / 1e12 for k, v in fl["flops"].items()},
            "stages": per_stage, "note": notes.get(f"llm:{r}", ""),
        })
    return out


def _summary(rows: list[dict], stages) -> dict:
    """Table 6: LLM prefill and whole-job seconds per row, as ratios of the unpruned (first) row; with the
    ratios the FLOPs predict next to them."""
    ref = rows[0]
    complete = all(s in stages for s in STAGES)

    def job(row):
        return sum(v["seconds"] for v in row["stages"].values())

    def job_flops(row):
        return sum(v["tflops"] or 0.0 for v in row["stages"].values())

    out = {"whole_job_stages": [c for c, s, _ in COLUMNS if s in stages], "complete": complete, "rows": []}
    for row in rows:
        entry = {"method": row["method"], "budget": row["budget"], "placement": row["placement"],
                 "tokens_into_llm": row["tokens_into_llm"]}
        if "llm" in row["stages"] and "llm" in ref["stages"]:
            prefill, base = row["stages"]["llm"]["seconds"], ref["stages"]["llm"]["seconds"]
            entry.update(prefill_s=prefill, prefill_ratio=prefill / base,
                         prefill_flops_ratio=row["flops_tf"]["llm_prefill"] / ref["flops_tf"]["llm_prefill"])
        if row["stages"]:
            entry.update(job_s=job(row), job_ratio=job(row) / job(ref) if job(ref) else None,
                         job_flops_ratio=job_flops(row) / job_flops(ref) if job_flops(ref) else None)
        out["rows"].append(entry)
    return out


# ----------------------------------------------------------------------------------------------- output
def _fmt(value, spec: str, dash: str = "-") -> str:
    return dash if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """The report as fixed-width text: header (hardware, versions, settings), one block per row, Table 6."""
    env, st = report["environment"], report["settings"]
    gpu = f" | GPU {env['gpu']} ({env['gpu_memory_gib']} GiB), CUDA {env['cuda']}" if env.get("gpu") else ""
    lines = [
        f"refstream bench stages: {st['model']} on {st['device']} in {st['dtype']}, {st['frames']} encoder frames, "
        f"video {Path(st['video']).name}",
        f"hardware: {env['cpu']}, {env['threads']} threads, {env.get('ram_gib')} GiB RAM{gpu}",
        f"versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"numpy {env['numpy']} | {env['platform']}",
        f"load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in env['load_average_start'])}, at end "
        f"{'/'.join(f'{x:.1f}' for x in env.get('load_average_end', [0, 0, 0]))}",
        f"stages run: {','.join(st['stages'])}; {st['random_weights']}",
    ]
    for run in env.get("runs", []):
        lines.append(f"  run of --stages {','.join(run['stages'])}: load average "
                     f"{'/'.join(f'{x:.1f}' for x in run['load_average_start'])} -> "
                     f"{'/'.join(f'{x:.1f}' for x in run['load_average_end'] or [])}, peak RSS {run['peak_rss_mb']:.0f} MiB")
    if report["synthetic_inputs"]:
        lines.append("random inputs of the right shapes for: " + "; ".join(report["synthetic_inputs"]))
    for stage, note in report["notes"].items():
        lines.append(f"{stage}: {note}")
    cuda = any(v.get("cuda_max_allocated_mb") is not None for r in report["rows"] for v in r["stages"].values())
    for row in report["rows"]:
        label = "unpruned" if row["unpruned"] else f"{row['clip_tokens_per_frame']} CLIP units/frame kept"
        lines += [
            "",
            f"{row['method']} budget {row['budget']} {row['placement']} ({label}): {row['visual_tokens']} visual tokens, "
            f"{row['tokens_into_llm']} tokens into the LLM" + (f"  [{row['note']}]" if row["note"] else ""),
            f"  {'stage':<22}{'wall s':>10}{'TFLOPs':>9}{'GFLOP/s':>9}{'peak RSS MiB':>14}"
            + (f"{'CUDA max MiB':>14}" if cuda else "") + "  ",
        ]
        for column, value in row["stages"].items():
            tag = "shared" if value["shared"] else ""
            if column.startswith("sam2") and report["sam2"].get("extrapolated"):
                tag += f", extrapolated from {report['sam2']['timed_frames']} frames"
            lines.append(
                f"  {column:<22}{value['seconds']:>10.2f}{_fmt(value['tflops'], '.3f'):>9}"
                f"{_fmt(value['gflops_per_s'], '.1f'):>9}{_fmt(value['peak_rss_mb'], '.0f'):>14}"
                + (f"{_fmt(value['cuda_max_allocated_mb'], '.0f'):>14}" if cuda else "") + f"  {tag.strip(', ')}")
    summary = report["summary"]
    lines += ["", "Table 6 style summary (ratios to the unpruned row; 'FLOPs' = what refstream flops predicts)"
              + ("" if summary["complete"] else f" -- whole job = the stages run only: {','.join(summary['whole_job_stages'])}"),
              f"  {'method':<10}{'budget':>7}{'placement':>10}{'LLM tokens':>11}{'prefill s':>11}{'ratio':>8}{'FLOPs':>8}"
              f"{'job s':>10}{'ratio':>8}{'FLOPs':>8}"]
    for e in summary["rows"]:
        lines.append(
            f"  {e['method']:<10}{e['budget']:>7}{e['placement']:>10}{e['tokens_into_llm']:>11}"
            f"{_fmt(e.get('prefill_s'), '.2f'):>11}{_fmt(e.get('prefill_ratio'), '.3f'):>8}"
            f"{_fmt(e.get('prefill_flops_ratio'), '.3f'):>8}{_fmt(e.get('job_s'), '.1f'):>10}"
            f"{_fmt(e.get('job_ratio'), '.3f'):>8}{_fmt(e.get('job_flops_ratio'), '.3f'):>8}")
    lines.append(f"peak RSS of the process {report['environment']['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)


#: settings that must agree for reports to be merged
MERGE_KEYS = ("model", "device", "dtype", "video", "frames", "max_frames", "sam2_frames", "text_tokens")


def merge_reports(reports: list[dict]) -> dict:
    """One report from reports of the same settings whose stages ran in separate processes (``--stages llm``
    alone, then the rest: so that each fits in memory). Each stage must come from exactly one report; the
    summary (Table 6) is recomputed over the union, and the environment of every run is kept.

    Raises:
        ConfigError: settings or rows that differ, or a stage measured twice (named, with the fix).
    """
    if not reports:
        raise ConfigError("--merge needs at least one JSON report written by refstream bench stages --json")
    base = json.loads(json.dumps(reports[0]))
    keys = [(r["method"], r["budget"], r["placement"]) for r in base["rows"]]
    seen = set(base["settings"]["stages"])
    for i, other in enumerate(reports[1:], start=2):
        for key in MERGE_KEYS:
            if other["settings"].get(key) != base["settings"].get(key):
                raise ConfigError(f"--merge: report {i} has {key} {other['settings'].get(key)!r} but report 1 has "
                                  f"{base['settings'].get(key)!r}; merge only runs made with the same options")
        if [(r["method"], r["budget"], r["placement"]) for r in other["rows"]] != keys:
            raise ConfigError(f"--merge: report {i} has other rows (--method/--budget/--placement) than report 1")
        twice = seen & set(other["settings"]["stages"])
        if twice:
            raise ConfigError(f"--merge: stage(s) {', '.join(sorted(twice))} are in more than one report; run each "
                              "stage once (--stages)")
        seen |= set(other["settings"]["stages"])
        for row, extra in zip(base["rows"], other["rows"]):
            row["stages"].update(extra["stages"])
            row["note"] = "; ".join(n for n in (row["note"], extra["note"]) if n)
        base["synthetic_inputs"] += [s for s in other["synthetic_inputs"] if s not in base["synthetic_inputs"]]
        base["notes"].update(other["notes"])
        base["rss_after_free_mb"].update(other.get("rss_after_free_mb", {}))
        base["sam2"] = base["sam2"] or other["sam2"]
    order = [c for c, _, _ in COLUMNS]
    for row in base["rows"]:
        row["stages"] = {c: row["stages"][c] for c in order if c in row["stages"]}
    stages = tuple(s for s in STAGES if s in seen)
    base["settings"]["stages"] = list(stages)
    base["settings"]["merged_runs"] = [r["settings"]["stages"] for r in reports]
    env = base["environment"]
    env["runs"] = [{"stages": r["settings"]["stages"], "load_average_start": r["environment"]["load_average_start"],
                    "load_average_end": r["environment"].get("load_average_end"),
                    "peak_rss_mb": r["environment"]["peak_rss_mb"]} for r in reports]
    env["load_average_end"] = reports[-1]["environment"].get("load_average_end", env.get("load_average_end"))
    env["peak_rss_mb"] = max(r["environment"]["peak_rss_mb"] for r in reports)
    base["summary"] = _summary(base["rows"], stages)
    return base


def add_bench_stages_parser(bsub) -> None:
    """Add ``refstream bench stages`` to the ``bench`` subparsers."""
    p = bsub.add_parser(
        "stages", help="measured seconds, FLOP/s and memory per stage of the full model (random weights)",
        description="Build the model's architecture with random weights (no checkpoint), one stage at a time, "
        "and time every stage on a real video for the unpruned row and each pruning method x budget x "
        "placement: seconds, tokens into the LLM, FLOPs (as refstream flops), GFLOP/s, peak memory, and the "
        "prefill / whole-job ratios to the unpruned row.")
    p.add_argument("--model", "--config", dest="model", default="videoglamm",
                   help="preset (videoglamm, tiny) or a YAML path such as configs/tiny.yaml (default videoglamm)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--video", default=None, help="a video file or frame folder (default: examples/bedroom.mp4)")
    p.add_argument("--decoder", default="decord", choices=["decord", "pyav"])
    p.add_argument("--frames", type=int, default=16, help="encoder frames (a multiple of 4; default 16)")
    p.add_argument("--max-frames", type=int, default=None, help="at most this many SAM2 frames (default: all)")
    p.add_argument("--method", action="append", help="repeatable; default none and litelvlm (none = the "
                   "unpruned row, always first)")
    p.add_argument("--budget", type=int, action="append", help="repeatable; default 576 196 81 (576 = unpruned)")
    p.add_argument("--placement", action="append", choices=["pooled", "patch"], help="repeatable; default pooled")
    p.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)} (default all)")
    p.add_argument("--sam2-frames", type=int, default=8,
                   help="SAM2 frames actually run; the others are extrapolated (default 8: a full memory bank)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="prompt text tokens in the LLM input (default 50, as refstream flops)")
    p.add_argument("--expression", default=DEFAULT_EXPRESSION)
    p.add_argument("--seed", type=int, default=0, help="weight init seed")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the table to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge reports of the same options whose stages ran separately (e.g. --stages "
                   "llm, then the rest) into one table")


def main_bench_stages(args) -> int:
    """CLI entry for ``refstream bench stages``."""
    if args.merge:
        reports = []
        for name in args.merge:
            try:
                reports.append(json.loads(Path(name).read_text()))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--merge {name}: cannot read a JSON report ({exc}); write one with --json") from exc
        report = merge_reports(reports)
        return _emit(report, args)
    report = run_stages(
        args.model, device=args.device, dtype=args.dtype, video=args.video, frames=args.frames,
        max_frames=args.max_frames, methods=args.method or ("none", "litelvlm"),
        budgets=args.budget or (576, 196, 81), placements=args.placement or ("pooled",),
        stages=parse_stages(args.stages), sam2_frames=args.sam2_frames, text_tokens=args.text_tokens,
        expression=args.expression, decoder=args.decoder, seed=args.seed,
        log=(lambda *_: None) if args.quiet else (lambda *a: print(*a, flush=True)),
    )
    return _emit(report, args)


def _emit(report: dict, args) -> int:
    table = format_table(report)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0
