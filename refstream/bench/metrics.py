"""``refstream bench metrics``: the speed of the boundary measure F, ours next to the official toolkit's.

Times :func:`eval.metrics.f_measure` on [T, 480, 854] masks and, when ``--official DIR`` names a
checkout of github davisvideochallenge/davis2017-evaluation (its ``davis2017/metrics.py`` needs
opencv-python-headless and scikit-image), the official ``db_eval_boundary`` on the *same* masks, side by
side (alternating repeats, best of N), and checks that both give the same values. Without
``--official`` only ours is timed. Target (RefStream issue "Evaluation"): F at 480x854 at least 1.5x
the official code.

Cases: the real ``blackswan`` GT (``examples/ref-davis17-mini`` in a repository checkout, 50 frames) against
shifted (small and large), dilated and eroded copies of itself; when that data is absent, synthetic blobs.
Two stress cases follow: a near-full-frame object (the crop cannot shrink) and dense random noise.

Run: ``python -m refstream.bench.metrics [--official DIR] [--repeats 5] [--json FILE]``.

``refstream`` imports this module to build its parser, so OpenCV, scikit-image and Pillow are imported
inside the functions that use them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from eval.metrics import f_measure
from refstream.bench import cpu_name

SHAPE = (480, 854)
TARGET = 1.5
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the bundled data of a repository checkout
log = logging.getLogger("refstream.bench")


def environment(official_dir: Path | None = None) -> dict:
    """Hardware and software versions for the report (``scikit-image`` / ``official_commit`` None when absent)."""
    import cv2  # lazy: see the module docstring

    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "opencv_threads": cv2.getNumThreads(),
           "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
           "platform": platform.platform()}
    try:
        import skimage  # optional: only the official code needs it

        env["scikit-image"] = skimage.__version__
    except ImportError as exc:
        log.debug("scikit-image not installed (%s)", exc)
        env["scikit-image"] = None
    if official_dir is not None:
        try:
            env["official_commit"] = subprocess.run(["git", "-C", str(official_dir), "rev-parse", "HEAD"],
                                                    capture_output=True, text=True).stdout.strip() or None
        except OSError as exc:
            log.debug("no git commit of %s (%s)", official_dir, exc)
            env["official_commit"] = None
    return env


def _blobs(rng, n: int, count: int) -> np.ndarray:
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    out = np.zeros((n, *SHAPE), bool)
    for t in range(n):
        for _ in range(count):
            cy, cx = rng.uniform(50, 430), rng.uniform(80, 770)
            ry, rx = rng.uniform(30, 150), rng.uniform(40, 250)
            out[t] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return out


def make_cases(frames: int = 50, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (gt, pred)}`` bool [T, 480, 854] mask pairs."""
    import cv2  # lazy: see the module docstring

    rng = np.random.default_rng(seed)
    gt_dir = EXAMPLES / "ref-davis17-mini" / "DAVIS" / "Annotations_unsupervised" / "480p" / "blackswan"
    pngs = sorted(gt_dir.glob("*.png"))[:frames]
    if pngs:
        from PIL import Image  # lazy: see the module docstring

        gt = np.stack([np.array(Image.open(p)) == 1 for p in pngs])
        source = "blackswan GT"
    else:
        gt = _blobs(rng, frames, 2)
        source = "synthetic blobs"
    kernel = np.ones((15, 15), np.uint8)
    dil = np.stack([cv2.dilate(g.astype(np.uint8), kernel) for g in gt]).astype(bool)
    ero = np.stack([cv2.erode(g.astype(np.uint8), kernel) for g in gt]).astype(bool)
    n = gt.shape[0]
    full = np.zeros((n, *SHAPE), bool)
    full[:, 30:460, 20:840] = True
    full_pred = np.roll(full, (6, -9), axis=(1, 2))
    return {
        f"{source}, shift (3,-5)": (gt, np.roll(gt, (3, -5), axis=(1, 2))),
        f"{source}, shift (20,15)": (gt, np.roll(gt, (20, 15), axis=(1, 2))),
        f"{source}, dilated 15x15": (gt, dil),
        f"{source}, eroded 15x15": (gt, ero),
        "random blobs vs blobs": (_blobs(rng, n, 3), _blobs(rng, n, 3)),
        "near-full-frame box, shifted": (full, full_pred),
        "dense noise (50%)": (rng.random((min(n, 20), *SHAPE)) < 0.5, rng.random((min(n, 20), *SHAPE)) < 0.5),
    }


def load_official(official_dir: str | Path):
    """``db_eval_boundary`` from a davis2017-evaluation checkout (imported only from that path)."""
    official_dir = Path(official_dir)
    if not (official_dir / "davis2017" / "metrics.py").is_file():
        raise SystemExit(f"{official_dir}: davis2017/metrics.py not found (give a davis2017-evaluation checkout)")
    missing = [m for m in ("cv2", "skimage") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"the official davis2017.metrics needs {', '.join(missing)} (pip install "
                         "opencv-python-headless scikit-image)")
    sys.path.insert(0, str(official_dir))
    try:
        module = importlib.import_module("davis2017.metrics")
    except ImportError as exc:
        raise SystemExit(f"cannot import the official davis2017.metrics ({exc}); it needs opencv-python-headless "
                         "and scikit-image") from exc
    finally:
        sys.path.remove(str(official_dir))
    return module.db_eval_boundary


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_benchmark(official_dir: str | Path | None = None, frames: int = 50, repeats: int = 5) -> dict:
    """Time ours (and the official F when ``official_dir`` is given) on every case; returns the report."""
    official = load_official(official_dir) if official_dir else None
    cases = make_cases(frames)
    rows = []
    for name, (gt, pred) in cases.items():
        ours_values = f_measure(gt[:2], pred[:2])  # warm-up (kernel caches, imports)
        row = {"case": name, "frames": int(gt.shape[0])}
        if official is not None:
            official(gt[:2], pred[:2])
            t_off, t_ours = float("inf"), float("inf")
            for _ in range(repeats):  # alternate so that both see the same machine state
                t_off = min(t_off, _best_time(lambda: official(gt, pred), 1))
                t_ours = min(t_ours, _best_time(lambda: f_measure(gt, pred), 1))
            ours_values = f_measure(gt, pred)
            diff = float(np.max(np.abs(np.asarray(official(gt, pred), float) - ours_values)))
            row.update(official_fps=gt.shape[0] / t_off, ours_fps=gt.shape[0] / t_ours, ratio=t_off / t_ours,
                       max_abs_diff=diff)
        else:
            t_ours = _best_time(lambda: f_measure(gt, pred), repeats)
            row.update(ours_fps=gt.shape[0] / t_ours)
        row["mean_F"] = float(np.mean(f_measure(gt, pred)))
        rows.append(row)
    report = {"environment": environment(Path(official_dir) if official_dir else None), "shape": list(SHAPE),
              "repeats": repeats, "target_ratio": TARGET, "rows": rows}
    if official is not None:
        ratios = [r["ratio"] for r in rows]
        report["min_ratio"] = min(ratios)
        report["geomean_ratio"] = float(np.exp(np.mean(np.log(ratios))))
    return report


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"F (boundary measure) at {report['shape'][0]}x{report['shape'][1]}, best of {report['repeats']}",
        f"hardware: {env['cpu']}, {env['cores']} cores (OpenCV threads {env['opencv_threads']}) | python "
        f"{env['python']}, numpy {env['numpy']}, opencv {env['opencv']}, scikit-image {env['scikit-image']}"
        + (f" | official @ {env['official_commit'][:12]}" if env.get("official_commit") else ""),
    ]
    has_official = "min_ratio" in report
    width = max(len(r["case"]) for r in report["rows"]) + 2
    if has_official:
        lines.append(f"{'case':{width}s}{'frames':>7s}{'official f/s':>14s}{'ours f/s':>10s}{'ratio':>7s}"
                     f"{'max|diff|':>11s}{'mean F':>8s}")
        for r in report["rows"]:
            lines.append(f"{r['case']:{width}s}{r['frames']:7d}{r['official_fps']:14.1f}{r['ours_fps']:10.1f}"
                         f"{r['ratio']:6.2f}x{r['max_abs_diff']:11.1e}{r['mean_F']:8.4f}")
        verdict = "meets" if report["min_ratio"] >= report["target_ratio"] else "MISSES"
        lines.append(f"ratio: min {report['min_ratio']:.2f}x, geometric mean {report['geomean_ratio']:.2f}x "
                     f"({verdict} the {report['target_ratio']}x target)")
    else:
        lines.append(f"{'case':{width}s}{'frames':>7s}{'ours f/s':>10s}{'mean F':>8s}")
        for r in report["rows"]:
            lines.append(f"{r['case']:{width}s}{r['frames']:7d}{r['ours_fps']:10.1f}{r['mean_F']:8.4f}")
        lines.append("(pass --official DIR, a davis2017-evaluation checkout, to time the official code beside it)")
    return "\n".join(lines)


def add_bench_metrics_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``metrics`` to the ``refstream bench`` subparsers."""
    b = bench_subparsers.add_parser("metrics", help="speed of F (boundary measure) next to the official DAVIS code")
    _arguments(b)
    return b


def _arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--official", default=None, metavar="DIR",
                   help="a davis2017-evaluation checkout to time its db_eval_boundary side by side")
    b.add_argument("--frames", type=int, default=50, help="frames per case (default 50)")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (default 5)")
    b.add_argument("--json", default=None, metavar="FILE")


def main_bench_metrics(args: argparse.Namespace) -> int:
    report = run_benchmark(args.official, frames=args.frames, repeats=args.repeats)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m refstream.bench.metrics", description=__doc__.split("\n")[0])
    _arguments(parser)
    sys.exit(main_bench_metrics(parser.parse_args()))
