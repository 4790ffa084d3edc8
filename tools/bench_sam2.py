"""Side-by-side speed of the SAM2 share: SAM2's image encoder frame by frame vs in batches, and against the
code of another checkout (e.g. the one from before the change).

Usage (from the repository root)::

    python tools/bench_sam2.py                      # both parts, 2 rounds, the table on stdout
    python tools/bench_sam2.py --rounds 3 --out docs/bench_sam2_cpu.txt
    python tools/bench_sam2.py --baseline-repo ../before   # (a) also runs another checkout's code, its defaults

(a) ``refstream run`` on the README's example (``examples/bedroom.mp4 --expression "the bed" --model tiny``),
    each run a fresh process: whole-process wall time and the job's own ``total_seconds`` (summary.json), for
    ``--sam2-chunk 1 --no-overlap`` (the CPU defaults) and ``--sam2-chunk 4 --no-overlap``; with
    ``--baseline-repo`` a third arm runs that checkout's own code with its defaults, and each arm gets its
    ratio to it.
(b) the full-size SAM2 (``configs/videoglamm.yaml``'s ``sam2``: Hiera-L, 1024 px, random weights) over
    ``--full-frames`` (8) real frames of the example, one object, in this process: frames/s of
    ``Sam2VideoDecoder(chunk_size=1)`` vs each of ``--chunks``.

Arms run interleaved (A B A B ...) ``--rounds`` times; the table gives every time, the medians and the median
of the per-round ratios. The machine, its load average and the library versions are printed with it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> list[str]:
    import av
    import torch
    import transformers

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [f"host: {platform.node()}  cpu: {cpu}  cores visible: {os.cpu_count()}  torch threads: "
            f"{torch.get_num_threads()}",
            f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
            f"av {av.__version__}",
            f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]


def run_cli(extra: list[str], pythonpath: Path, max_frames: int | None = None) -> tuple[float, float]:
    """Wall seconds of one ``refstream run`` of the README's example in a fresh process, and the job's own
    seconds from its ``summary.json`` (``total_seconds``: model load to the last file, without the interpreter's
    start and the imports of torch and transformers, which every arm pays alike)."""
    with tempfile.TemporaryDirectory(prefix="bench-sam2-") as tmp:
        cmd = [sys.executable, "-c", "import sys; from refstream.cli import main; sys.exit(main())", "run",
               str(REPO / "examples" / "bedroom.mp4"), "--expression", "the bed", "--model", "tiny",
               "--out", str(Path(tmp) / "out"), *extra,
               *(["--max-frames", str(max_frames)] if max_frames else [])]
        env = dict(os.environ, PYTHONPATH=str(pythonpath), PYTHONDONTWRITEBYTECODE="1")  # read-only on a baseline
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"refstream run failed ({extra}):\n{proc.stderr[-2000:]}")
        job = json.loads((Path(tmp) / "out" / "summary.json").read_text())["total_seconds"]
        return seconds, job


def part_a(rounds: int, baseline: Path | None, lines: list[str], max_frames: int | None = None) -> None:
    arms = {"chunk 1 (--sam2-chunk 1 --no-overlap)": (["--sam2-chunk", "1", "--no-overlap"], REPO),
            "chunk 4 (--sam2-chunk 4 --no-overlap)": (["--sam2-chunk", "4", "--no-overlap"], REPO)}
    if baseline is not None:
        arms[f"baseline checkout {baseline.name}"] = ([], baseline)
    times: dict[str, list[float]] = {name: [] for name in arms}
    jobs: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        for name, (extra, path) in arms.items():
            wall, job = run_cli(extra, path, max_frames)
            times[name].append(wall)
            jobs[name].append(job)
            print(f"  (a) round {r + 1} {name}: {wall:.2f} s (job {job:.2f} s)", file=sys.stderr)
    frames = f"--max-frames {max_frames}: {max_frames}" if max_frames else "200"
    lines.append(f"(a) refstream run examples/bedroom.mp4 --expression 'the bed' --model tiny ({frames} frames, "
                 "960x540), whole-process wall seconds, fresh process each")
    for name, values in times.items():
        lines.append(f"    {name:<40} " + "  ".join(f"{v:7.2f}" for v in values)
                     + f"   median {statistics.median(values):7.2f}")
    names = list(arms)
    for other in names[1:]:
        ratios = [n / o for n, o in zip(times[other], times[names[0]])]
        lines.append(f"    ratio {other} / {names[0]} per round: " + "  ".join(f"{x:.3f}" for x in ratios)
                     + f"   median {statistics.median(ratios):.3f}")
    lines.append("    the job alone (summary.json total_seconds: model load to the last file; without the interpreter's "
                 "start and the torch + transformers imports)")
    for name, values in jobs.items():
        lines.append(f"    {name:<40} " + "  ".join(f"{v:7.2f}" for v in values)
                     + f"   median {statistics.median(values):7.2f}")
    if baseline is not None:
        base = names[-1]
        for name in names[:-1]:
            for label, table in (("wall", times), ("job", jobs)):
                ratios = [n / b for n, b in zip(table[name], table[base])]
                lines.append(f"    ratio {name} / {base}, {label}, per round: "
                             + "  ".join(f"{x:.3f}" for x in ratios) + f"   median {statistics.median(ratios):.3f}")


def part_b(rounds: int, frames: int, chunks: list[int], lines: list[str]) -> None:
    import torch

    from video_pipeline.decode import open_video
    from video_pipeline.preprocess import sam2_preprocess
    from workers.config import load_model_config
    from workers.sam2_decoder import Sam2VideoDecoder, build_sam2, sam2_video_config

    spec = load_model_config("videoglamm").sam2
    model = build_sam2(sam2_video_config(spec), seed=0)
    with open_video(REPO / "examples" / "bedroom.mp4", "pyav") as source:
        pixels = sam2_preprocess(source.read(list(range(frames))), style="videoglamm", size=spec.image_size)
        size = (source.height, source.width)
    seg = torch.randn(1, spec.prompt_encoder_hidden_size, generator=torch.Generator().manual_seed(0))
    arms = [1] + [c for c in chunks if c != 1]
    fps: dict[int, list[float]] = {c: [] for c in arms}
    for r in range(rounds):
        for c in arms:
            decoder = Sam2VideoDecoder(model, chunk_size=c)
            start = time.perf_counter()
            for _ in decoder.propagate_many(pixels.split(8), seg, size):
                pass
            fps[c].append(frames / (time.perf_counter() - start))
            print(f"  (b) round {r + 1} chunk {c}: {fps[c][-1]:.3f} frames/s", file=sys.stderr)
    lines.append(f"(b) full-size SAM2 (configs/videoglamm.yaml sam2: Hiera-L, {spec.image_size} px, random weights), "
                 f"{frames} frames of examples/bedroom.mp4, 1 object, CPU float32: frames/s")
    for c in arms:
        label = "old (chunk 1)" if c == 1 else f"new chunk {c}"
        lines.append(f"    {label:<20} " + "  ".join(f"{v:6.3f}" for v in fps[c])
                     + f"   median {statistics.median(fps[c]):6.3f}")
    for c in arms[1:]:
        ratios = [n / o for n, o in zip(fps[c], fps[1])]
        lines.append(f"    speed-up chunk {c} / chunk 1 per round: " + "  ".join(f"{x:.3f}" for x in ratios)
                     + f"   median {statistics.median(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--parts", default="ab", help="a, b or ab (default ab)")
    parser.add_argument("--baseline-repo", type=Path, help="another checkout whose code runs as a third arm of (a)")
    parser.add_argument("--max-frames", type=int, help="(a) on the first N frames only (default: all 200)")
    parser.add_argument("--full-frames", type=int, default=8, help="frames of part (b) (default 8)")
    parser.add_argument("--chunks", default="4", help="chunk sizes of part (b), comma-separated (default 4)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    lines = ["SAM2 share: old path (image encoder frame by frame, no overlap) vs new, side by side, interleaved "
             f"{args.rounds} rounds", *machine()]
    if "a" in args.parts:
        part_a(args.rounds, args.baseline_repo.resolve() if args.baseline_repo else None, lines, args.max_frames)
    if "b" in args.parts:
        part_b(args.rounds, args.full_frames, [int(c) for c in args.chunks.split(",")], lines)
    lines.append(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
