"""The ``refstream`` command line.

``refstream run INPUT --expression "the bed" [--expression ...] --model tiny --out out/``

Exit codes: 0 success; 2 bad input or configuration (the message names the problem and the fix);
1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import sys
from pathlib import Path
from typing import Sequence

from eval.cli import add_eval_parser, run_eval
from refstream.bench.live import add_bench_live_parser, main_bench_live
from refstream.bench.metrics import add_bench_metrics_parser, main_bench_metrics
from refstream.bench.reproduce import add_reproduce_parser, run_reproduce_command
from refstream.bench.runs import add_bench_run_parsers, run_bench_command
from refstream.bench.service import add_bench_service_parser, main_bench_service
from refstream.bench.soak import add_bench_soak_parser, main_bench_soak
from refstream.bench.stages import add_bench_stages_parser, main_bench_stages
from refstream.config import load_model_config
from refstream.convert import add_convert_parser, run_convert
from refstream.errors import ConfigError, RefStreamError
from refstream.options import LiveOptions, ModelOptions, RunOptions, add_option_arguments, options_from_args
from refstream.outputs import RANDOM_WEIGHTS_NOTE
from refstream_errors import option_style
from refstream.service.cli import SERVICE_COMMANDS, add_service_parsers, run_service_command

# Each command's own module is imported when the command runs (the lazy imports below): they load torch,
# transformers or Ray, and ``refstream --help``, ``refstream status`` or ``refstream submit`` need none of them.


def _add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="segment the object(s) a referring expression names in every frame of a video",
        description="Segment the object(s) named by referring expressions in every frame of a video "
        "(LiteLVLM token pruning in front of VideoGLaMM). Every option below comes from "
        "refstream.options.RunOptions, which the Python API, the service and the benchmark share.",
    )
    p.add_argument("input", help="a video file (anything FFmpeg reads) or a folder of JPEG/PNG frames")
    add_option_arguments(p, RunOptions)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


METHODS_HELP = (
    "none, random, litelvlm, trim, visionzip, vispruner, prumerge, prumerge+, fastv; "
    "NAME:OPTION or NAME:KEY=VALUE sets options (litelvlm:official, random:seed=3)"
)


def _add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="draw the tokens each pruning method keeps (frames x methods grid)")
    p.add_argument("input", help="a video file or a folder of frames")
    p.add_argument("--expression", "-e", action="append", default=[], metavar="TEXT")
    p.add_argument("--method", action="append", default=[], metavar="NAME[:OPTS]", help=METHODS_HELP)
    p.add_argument("--budget", type=int, default=196)
    p.add_argument("--placement", default="pooled", choices=["pooled", "patch"])
    p.add_argument("--model", default="videoglamm")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--frames", type=int, default=16, help="encoder frames (the rows are chosen among them)")
    p.add_argument("--rows", type=int, default=4, help="encoder frames drawn, evenly spaced (default 4)")
    p.add_argument("--decoder", default="decord", choices=["decord", "pyav"])
    p.add_argument("--clip-text", default="question", choices=["question", "expression"])
    p.add_argument("--out", required=True, metavar="FILE.png")


def _cmd_explain(args: argparse.Namespace) -> int:
    from refstream.explain import explain  # lazy: torch, transformers (see the top)

    result = explain(
        args.input, args.expression, args.method, args.budget, args.out, model=args.model,
        checkpoint=args.checkpoint, placement=args.placement, frames=args.frames, rows=args.rows,
        decoder=args.decoder, clip_text=args.clip_text,
    )
    kept = ", ".join(f"{k} {v}" for k, v in result["methods"].items())
    print(f"wrote {result['out']}: frames {result['rows']} x methods ({kept} tokens per frame)")
    return 0


def _add_analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="analyses of CLIP features")
    asub = p.add_subparsers(dest="analysis", required=True)
    r = asub.add_parser("reversal", help="[REF]-token similarity ranks to [EOS] and [CLS] (paper Figure 2)")
    r.add_argument("--davis-root", required=True, metavar="D", help="Ref-DAVIS-17 root (DAVIS/ + davis_text_annotations/)")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--model", default="videoglamm", help="whose CLIP weights to use (tiny = random)")
    r.add_argument("--checkpoint", default=None)
    r.add_argument("--annotation", default="Davis17_annot1")
    r.add_argument("--clip-text", default="question", choices=["question", "expression"])
    r.add_argument("--frames-per-video", type=int, default=None)
    r.add_argument("--quiet", action="store_true")


def _cmd_analyze(args: argparse.Namespace) -> int:
    # lazy: torch, transformers (see the top)
    from eval.ref_davis import RefDavis
    from refstream.analyze import plot_reversal, reversal_analysis
    from workers.build import build_clip

    dataset = RefDavis(args.davis_root)
    config = load_model_config(args.model, args.checkpoint)
    clip, tokenizer = build_clip(config)
    result = reversal_analysis(
        dataset, clip, tokenizer, annotation=args.annotation, clip_text=args.clip_text,
        question=config.question, frames_per_video=args.frames_per_video, progress=not args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": config.name, "random_weights": config.random_weights, "annotation": args.annotation,
               "clip_text": args.clip_text, **result.summary()}
    if config.random_weights:
        summary["note"] = "random CLIP weights: this checks the plumbing only; the reversal needs real weights"
    (out / "reversal.json").write_text(json.dumps(summary, indent=2))
    plot_reversal(result, out / "reversal.png", title=f"{config.name} CLIP, {dataset.root.name}")
    eos, cls = summary["eos"], summary["cls"]
    print(f"{summary['ref_tokens']} [REF] tokens in {summary['frames']} frames: mean rank to [EOS] "
          f"{eos['mean_rank']:.1f}, to [CLS] {cls['mean_rank']:.1f} (of {summary['tokens_per_frame']}; 0 = most similar)")
    print(f"wrote {out / 'reversal.png'} and {out / 'reversal.json'}")
    if summary.get("note"):
        print(f"NOTE: {summary['note']}.")
    return 0


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (print a table with hardware and versions)")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("pruning", help="pruning cost next to the CLIP vision forward, every method and budget")
    b.add_argument("--size", default="full", choices=["full", "tiny"], help="CLIP size (full = ViT-L/14-336)")
    b.add_argument("--frames", type=int, default=16)
    b.add_argument("--budget", type=int, action="append", help="repeatable; default 196 81 64")
    b.add_argument("--method", action="append", help="repeatable; default every registered method")
    b.add_argument("--placement", action="append", choices=["pooled", "patch"], help="default both")
    b.add_argument("--texts", type=int, default=1, help="number of texts (expressions) for the text tower")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats of each selection (median)")
    b.add_argument("--forward-repeats", type=int, default=2, help="CLIP forwards per configuration (min)")
    b.add_argument("--video", default=None, help="frames from this video (default: examples/bedroom.mp4 "
                   "when present, else random pixels)")
    b.add_argument("--json", default=None, metavar="FILE")
    b.add_argument("--quiet", action="store_true")
    add_bench_metrics_parser(bsub)
    add_bench_run_parsers(bsub)
    add_bench_service_parser(bsub)
    add_bench_soak_parser(bsub)
    add_bench_live_parser(bsub)
    add_bench_stages_parser(bsub)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "service":
        return main_bench_service(args)
    if args.bench == "soak":
        return main_bench_soak(args)
    if args.bench in ("run", "report"):
        return run_bench_command(args)
    if args.bench == "metrics":
        return main_bench_metrics(args)
    if args.bench == "live":
        return main_bench_live(args)
    if args.bench == "stages":
        return main_bench_stages(args)
    from refstream.bench.pruning import main_bench_pruning  # lazy: torch (see the top)

    if args.video is None:
        default = Path(__file__).resolve().parents[1] / "examples" / "bedroom.mp4"
        args.video = str(default) if default.is_file() else None
    return main_bench_pruning(args)


def _add_model_parsers(sub) -> None:
    p = sub.add_parser("model-info", help="parameters per VideoGLaMM module (meta device: no weights needed)")
    p.add_argument("--model", default="videoglamm")
    p.add_argument("--json", action="store_true", help="print JSON")
    f = sub.add_parser("flops", help="LLM sequence length and FLOPs per stage (meta device: no weights needed)")
    f.add_argument("--model", default="videoglamm")
    f.add_argument("--frames", type=int, default=16)
    f.add_argument("--method", default="none", help="pruning method (fastv counts each LLM layer at its length)")
    f.add_argument("--budget", type=int, default=576)
    f.add_argument("--placement", default="pooled", choices=["pooled", "patch"])
    f.add_argument("--text-tokens", type=int, default=50,
                   help="prompt text tokens (50 = the default question with the Phi-3 tokenizer)")
    f.add_argument("--fastv-layer", type=int, default=2)
    f.add_argument("--json", action="store_true", help="print JSON")


def _cmd_model_info(args: argparse.Namespace) -> int:
    from workers.stats import build_skeleton, parameter_counts  # lazy: torch, transformers

    config = load_model_config(args.model)
    counts = parameter_counts(build_skeleton(config))
    if args.json:
        print(json.dumps({"model": config.name, "parameters": counts}, indent=2))
    else:
        print(f"{config.name}: parameters per module")
        for name, value in counts.items():
            print(f"  {name:<24}{value / 1e6:>12,.1f} M")
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from workers.stats import build_skeleton, stage_flops  # lazy: torch, transformers

    if args.frames < 4 or args.frames % 4:
        raise ConfigError(f"--frames must be a positive multiple of 4, got {args.frames}")
    if args.budget < 1:
        raise ConfigError(f"--budget must be >= 1, got {args.budget}")
    config = load_model_config(args.model)
    result = stage_flops(build_skeleton(config), config, frames=args.frames, method=args.method, budget=args.budget,
                         placement=args.placement, text_tokens=args.text_tokens, fastv_layer=args.fastv_layer)
    result["model"] = config.name
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    fits = "" if result["fits_positions"] else f"  (exceeds the LLM's {result['max_positions']} positions)"
    print(f"{config.name}, {args.frames} frames, {args.method} budget {args.budget} {args.placement}: "
          f"{result['visual_tokens']} visual tokens, LLM sequence {result['sequence_length']}{fits}")
    for stage, value in result["flops"].items():
        print(f"  {stage:<24}{value / 1e12:>10.3f} TFLOPs")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from refstream.preflight import preflight  # lazy: PyAV (see the top)

    options = options_from_args(RunOptions, args)
    preflight(args.input, options, args.out)  # every check that needs no model, before the model loads
    from refstream.api import load  # lazy: the model stack (torch, transformers), only once the checks passed

    if load_model_config(options.model, options.checkpoint).random_weights:
        print(f"WARNING: {RANDOM_WEIGHTS_NOTE}.", file=sys.stderr)
    segmenter = load(options.model, checkpoint=options.checkpoint, device=options.device, dtype=options.dtype)
    summary = segmenter.segment_to_folder(args.input, options, args.out, progress=not args.quiet)
    _print_summary(summary, args.out)
    return 0


def _add_live_parser(sub) -> None:
    p = sub.add_parser(
        "live", help="track what typed expressions name on a live video source, in a browser page",
        description="Serve a page that shows SOURCE with the masks of the objects typed into it, in real time "
        "(LiveOptions and ModelOptions: the same options as refstream run). Serves until SIGINT/SIGTERM.")
    p.add_argument("source", help="a video file or frame folder (played in real time), a V4L2 camera (/dev/video0), a "
                   "stream URL (rtsp://, rtmp://, srt://, http(s):// incl. HLS, udp://, tcp://) or 'browser' (each "
                   "page's own camera)")
    add_option_arguments(p, LiveOptions, exclude=("sam2_chunk", "overlap"))  # live steps one frame at a time
    add_option_arguments(p, ModelOptions)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--token", default=None, help="required as ?token= (and required to bind a non-loopback host)")
    p.add_argument("--max-sessions", type=int, default=4, help="pages at once (default 4)")
    p.add_argument("--allowed-root", action="append", default=[], metavar="DIR",
                   help="only play sources under these folders (repeatable; the same rule as serve)")
    p.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve deployment, the model in the VideoGLaMM GPU worker actor (a GPU of the "
                   "cluster when it has one); default: one process")
    p.add_argument("--address", default=None,
                   help="with --ray: join this Ray cluster (auto, host:port or ray://host:port; default: start a "
                   "local Ray)")


def _cmd_live(args: argparse.Namespace) -> int:
    import uvicorn  # lazy with the rest: see the top

    from refstream.api import load
    from refstream.live.server import LiveApp, LiveSettings
    from refstream.live.sources import is_stream, open_source
    from refstream.service.jobs import InputPolicy

    options = options_from_args(LiveOptions, args)
    model = options_from_args(ModelOptions, args)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.token:
        raise ConfigError(f"--host {args.host} lets other machines in: give a --token they must pass as ?token=")
    if args.max_sessions < 1:
        raise ConfigError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    if args.address and not args.ray:
        raise ConfigError(f"--address {args.address} joins a Ray cluster: give --ray too")
    source = args.source
    if is_stream(source):  # opened now (fails fast, before the model loads) and shared by every page
        source = open_source(source, size=options.frame_size, options=options.source_options)
    elif source != "browser":
        if args.allowed_root:  # the same rule as refstream serve: symlinks and .. resolved first
            InputPolicy(args.allowed_root).check(source)
        open_source(source, fps=options.fps, decoder=options.decoder, size=options.frame_size,
                    options=options.source_options)  # fail fast on a bad source, before loading the model
    if args.ray:
        from refstream.live.ray_serve import serve_live  # lazy: Ray and Serve load only with --ray

        if not isinstance(source, str):  # a stream is opened again inside the Serve replica
            source.close_unstarted()
            source = args.source
        return serve_live(source, options, model, address=args.address, host=args.host, port=args.port,
                          token=args.token, max_sessions=args.max_sessions,
                          on_ready=lambda url: print(f"refstream live: open {url} (Ray Serve; Ctrl-C to stop)",
                                                     flush=True))
    segmenter = load(model.model, checkpoint=model.checkpoint, device=model.device, dtype=model.dtype)
    app = LiveApp(LiveSettings(segmenter.pipeline, source, options, token=args.token,
                               max_sessions=args.max_sessions))
    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # ours below: uvicorn's would re-raise SIGTERM on exit (exit code -15)
            yield

    server = Server(uvicorn.Config(app.api, host=args.host, port=args.port, log_level="warning"))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a clean stop: sessions closed, exit code 0
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            query = f"?token={args.token}" if args.token else ""
            print(f"refstream live: open http://{args.host}:{port}/{query} (Ctrl-C to stop)", flush=True)
        await task

    asyncio.run(serve())
    return 0


def _print_summary(summary: dict, out: str) -> None:
    pruning = summary["pruning"]
    stages = "  ".join(f"{k} {v:.2f}s" for k, v in summary["stage_seconds"].items())
    lines = [
        f"{summary['frames']} frames, {len(summary['expressions'])} expression(s), model {summary['model']} "
        f"on {summary['device']}",
        f"pruning: {pruning['method']}" + (f" ({pruning['variant']})" if pruning.get("variant") else "")
        + f", budget {pruning['budget']}, {pruning['placement']}: {pruning['kept_per_frame']} {pruning['unit']}s/frame, "
        f"{summary['visual_tokens_into_llm']} visual tokens into the LLM (sequence {summary['llm_sequence_length']})",
        f"stages: {stages}",
        f"total {summary['total_seconds']:.2f}s (model load {summary['model_load_seconds']:.2f}s), "
        f"peak RSS {summary['peak_rss_mb']:.0f} MiB",
        f"wrote {', '.join(summary['outputs'])} to {out}",
    ]
    if summary.get("note"):
        lines.append(f"NOTE: {summary['note']}.")
    print("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refstream", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_live_parser(sub)
    _add_explain_parser(sub)
    _add_analyze_parser(sub)
    _add_bench_parser(sub)
    _add_model_parsers(sub)
    add_eval_parser(sub)
    add_service_parsers(sub)
    add_convert_parser(sub)
    add_reproduce_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``refstream`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with option_style("cli"):  # errors name options as flags (--decoder pyav), also those raised through the API
        return _dispatch(parser, args)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "live":
            return _cmd_live(args)
        if args.command == "reproduce":
            return run_reproduce_command(args)
        if args.command == "explain":
            return _cmd_explain(args)
        if args.command == "analyze":
            return _cmd_analyze(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command in SERVICE_COMMANDS:
            return run_service_command(args)
        if args.command == "convert":
            return run_convert(args)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "model-info":
            return _cmd_model_info(args)
        if args.command == "flops":
            return _cmd_flops(args)
    except RefStreamError as exc:
        print(f"refstream: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("refstream: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
