"""``refstream reproduce table2|table3|table7``: the LiteLVLM paper's video tables, run and set beside the paper.

Each table's rows (VideoGLaMM with all 576 tokens; LiteLVLM and VisPruner at 196 and 81) run through
``refstream bench run`` under the dataset's evaluation protocol (``configs/protocols/``; Ray, resumable,
``--address`` for a cluster) into one run folder; then the paper's J, F, J&F and Rel. (stored as data with their
table and row: ``configs/paper/litelvlm-video-tables.yaml``) are printed beside ours with the difference, the
visual tokens into the LLM and frames/s per row, and written as ``RUN/reproduce_<table>.md`` and ``.csv``.
Refer-YouTube-VOS (and MeViS ``valid``) have no public masks: the server zip is written and ours reads
"score on the server".

Missing weights or data exit 2 before any work, naming what is missing and where to put it.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from refstream.errors import ConfigError
from refstream.outputs import write_text_atomic

#: the paper's tables (under ``configs/``)
PAPER_FILE = Path("paper") / "litelvlm-video-tables.yaml"
TABLES = ("table2", "table3", "table7")


class PaperRow(BaseModel):
    """One row of a paper table: J, F, J&F in %, Rel. in % of VideoGLaMM's J&F at 576 tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    method: str
    budget: int
    J: float
    F: float
    JF: float
    rel: float


class PaperTable(BaseModel):
    """A table of the paper: its caption, the ``bench run`` dataset and its rows (the first is the 576-token
    upper bound)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    title: str
    dataset: str
    rows: list[PaperRow]


def load_paper_tables() -> dict[str, PaperTable]:
    """The paper's video tables by name (``table2``, ``table3``, ``table7``).

    Raises:
        ConfigError: the data file is missing or malformed (named).
    """
    from workers.config import CONFIG_DIR

    path = CONFIG_DIR / PAPER_FILE
    try:
        data = yaml.safe_load(path.read_text())
        return {name: PaperTable(**table) for name, table in data["tables"].items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValidationError) as exc:
        raise ConfigError(f"cannot read the paper's tables from {path} ({exc}). Fix: restore it from the RefStream "
                          "repository.") from None


def _bench_argv(table: PaperTable, method: str, budgets: list[int], args: argparse.Namespace) -> list[str]:
    argv = ["run", "--dataset", table.dataset, "--root", str(args.root), "--out", str(args.out), "--method", method,
            "--model", args.model, "--device", args.device]
    for budget in budgets:
        argv += ["--budget", str(budget)]
    for flag, value in (("--checkpoint", args.checkpoint), ("--address", args.address), ("--workers", args.workers),
                        ("--split", args.split)):
        if value is not None:
            argv += [flag, str(value)]
    if args.quiet:
        argv.append("--quiet")
    return argv


def reproduce(args: argparse.Namespace) -> dict:
    """Run a table's rows and compare them with the paper (see the module docstring).

    Args:
        args: ``table``, ``root``, ``out``, ``model``, ``checkpoint``, ``device``, ``address``, ``workers``,
            ``split``, ``quiet`` (the ``refstream reproduce`` flags).

    Returns:
        ``{"table", "title", "rows": [...], "markdown", "csv", "failed"}``; each row holds the paper's and our
        values (ours None where there is no ground truth), the J&F difference, visual tokens and frames/s.

    Raises:
        WeightsNotFoundError / DatasetLayoutError / ConfigError: missing weights or data, named with the fix
            (before anything runs).
    """
    from refstream.bench.datasets import load_dataset
    from refstream.bench.runs import BenchRun, add_bench_run_parsers, load_results
    from workers.build import check_released_weights
    from workers.config import load_model_config

    tables = load_paper_tables()
    table = tables[args.table]
    if getattr(args, "estimate", None) is None:
        check_released_weights(load_model_config(args.model, args.checkpoint))
    dataset = load_dataset(table.dataset, args.root, args.split)  # the layout, checked before any work
    if getattr(args, "estimate", None) is not None:
        est = estimate(table, dataset, "videoglamm" if args.model == "tiny" else args.model, args.estimate)
        lines = [f"{table.title}: {est['videos']} videos, {est['frames']} frames, {est['units']} expressions "
                 f"({dataset.name} {dataset.split}, full-size model)",
                 *(f"  {r['model']} {r['budget']}: {r['flops'] / 1e15:.1f} PFLOPs" for r in est["rows"]),
                 f"  encoders, once per video and clip for every row: {est['shared_flops'] / 1e15:.1f} PFLOPs",
                 f"  total {est['total_flops'] / 1e15:.1f} PFLOPs: about {est['seconds'] / 3600:.2f} h at "
                 f"{est['tflops']:g} TFLOP/s sustained"]
        return {"table": args.table, "title": table.title, "estimate": est, "markdown": "\n".join(lines) + "\n",
                "failed": 0, "rows": []}
    parser = argparse.ArgumentParser(prog="refstream reproduce")
    add_bench_run_parsers(parser.add_subparsers(dest="bench", required=True))
    failed = 0
    by_method: dict[str, list[int]] = {}
    for row in table.rows:
        by_method.setdefault(row.method, []).append(row.budget)
    for method, budgets in by_method.items():  # one bench run folder: the rows' combos accumulate in it
        summary = BenchRun.from_args(parser.parse_args(_bench_argv(table, method, budgets, args))).run()
        failed += summary["failed"]
    results = {r["combo"]: r for r in load_results(args.out)}
    rows = _rows(table, results, dataset.has_gt)
    markdown, table_csv = _markdown(table, rows, dataset), _csv(rows)
    out = Path(args.out)
    write_text_atomic(out / f"reproduce_{args.table}.md", markdown)
    write_text_atomic(out / f"reproduce_{args.table}.csv", table_csv)
    return {"table": args.table, "title": table.title, "rows": rows, "markdown": markdown, "csv": table_csv,
            "failed": failed}


def video_frames(dataset) -> dict[str, int]:
    """Frames segmented per video: the listed frames (MeViS, Refer-YouTube-VOS) or the folder's JPEG/PNG."""
    counts = {}
    for video in dataset.videos():
        listed = dataset.frames.get(video)
        if listed:
            counts[video] = len(listed)
        else:
            folder = Path(dataset.video_paths[video])
            counts[video] = sum(1 for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return counts


def estimate(table: PaperTable, dataset, model: str = "videoglamm", tflops: float = 100.0) -> dict:
    """FLOPs of a table's rows on ``dataset`` (from :func:`workers.stats.stage_flops`, as ``refstream flops``)
    and the wall time at ``tflops`` sustained TFLOP/s; nothing runs.

    Per video (its protocol's clips): the encoders (CLIP, InternVideo2, projectors) once per clip for every row
    (``bench run`` computes them once per video); per row, the LLM prefill once per expression and clip, SAM2's
    image encoder once per frame (a row's expressions share one SAM2 pass) and memory attention once per frame
    and expression. Generated answer tokens, SAM2's mask decoder and memory encoder are not counted.

    Returns:
        ``{"rows": [{"model", "budget", "flops"}], "shared_flops", "total_flops", "seconds", "videos", "frames",
        "units", "tflops"}``.
    """
    from refstream.bench.protocol import load_protocol
    from workers.config import load_model_config
    from workers.stats import build_skeleton, stage_flops

    protocol = load_protocol(table.dataset)
    config = load_model_config(model)
    parts = build_skeleton(config)
    frames = video_frames(dataset)
    units = {}
    for unit in dataset.units:
        units[unit.video] = units.get(unit.video, 0) + 1
    clips = {v: -(-n // protocol.clip_length) if protocol.clip_length else 1 for v, n in frames.items()}
    rows, shared = [], None
    for row in table.rows:
        f = stage_flops(parts, config, frames=protocol.encoder_frames, method=row.method, budget=row.budget)["flops"]
        encoders = f["clip"] + f["internvideo2"] + f["projectors"]
        shared = encoders * sum(clips.values())
        per_row = sum(units.get(v, 0) * clips[v] * f["llm_prefill"] + n * f["sam2_image_encoder"]
                      + units.get(v, 0) * n * f["sam2_memory_attention"] for v, n in frames.items())
        rows.append({"model": row.model, "budget": row.budget, "flops": per_row})
    total = (shared or 0.0) + sum(r["flops"] for r in rows)
    return {"rows": rows, "shared_flops": shared, "total_flops": total, "seconds": total / (tflops * 1e12),
            "videos": len(frames), "frames": sum(frames.values()), "units": sum(units.values()), "tflops": tflops}


def _rows(table: PaperTable, results: dict[str, dict], scored: bool) -> list[dict]:
    from refstream.bench.runs import combo_name

    upper = results.get(combo_name(table.rows[0].method, table.rows[0].budget), {})
    rows = []
    for paper in table.rows:
        ours = results.get(combo_name(paper.method, paper.budget), {})
        pct = lambda v: None if v is None else round(100.0 * v, 2)  # noqa: E731
        jf = pct(ours.get("J&F")) if scored else None
        upper_jf = upper.get("J&F") if scored else None
        rows.append({
            "model": paper.model, "method": paper.method, "budget": paper.budget,
            "paper_J": paper.J, "paper_F": paper.F, "paper_JF": paper.JF, "paper_rel": paper.rel,
            "J": pct(ours.get("J")) if scored else None, "F": pct(ours.get("F")) if scored else None, "JF": jf,
            "rel": round(100.0 * ours["J&F"] / upper_jf, 1) if jf is not None and upper_jf else None,
            "diff_JF": round(jf - paper.JF, 2) if jf is not None else None,
            "visual_tokens": ours.get("visual_tokens"), "frames_per_second": ours.get("frames_per_second"),
            "submission": ours.get("submission"), "units": f"{ours.get('units_ok', 0)}/{ours.get('units', 0)}",
        })
    return rows


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(table: PaperTable, rows: list[dict], dataset) -> str:
    lines = [f"{table.title} (paper) beside this run: {dataset.name} {dataset.split}", "",
             "| model | tokens | paper J | paper F | paper J&F | paper Rel. | J | F | J&F | Rel. | J&F - paper | "
             "visual tokens into the LLM | frames/s | units |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours = ([_fmt(r["J"]), _fmt(r["F"]), _fmt(r["JF"]), _fmt(r["rel"]), _fmt(r["diff_JF"], 2)]
                if dataset.has_gt else ["score on the server"] + [""] * 4)
        lines.append(f"| {r['model']} | {r['budget']} | {_fmt(r['paper_J'])} | {_fmt(r['paper_F'])} | "
                     f"{_fmt(r['paper_JF'])} | {_fmt(r['paper_rel'])}% | " + " | ".join(ours) +
                     f" | {_fmt(r['visual_tokens'], 0)} | {_fmt(r['frames_per_second'], 2)} | {r['units']} |")
    if not dataset.has_gt:
        zips = sorted({r["submission"] for r in rows if r["submission"]})
        lines += ["", "No public masks for this split: submit " + (", ".join(zips) or "the zips in RUN/submissions")
                  + " to the challenge server."]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def add_reproduce_parser(sub) -> None:
    """``refstream reproduce`` (dispatch with :func:`run_reproduce_command`)."""
    p = sub.add_parser("reproduce", help="run a LiteLVLM paper video table (Ref-DAVIS-17, Refer-YouTube-VOS, MeViS) "
                       "and print it beside the paper's numbers")
    p.add_argument("table", choices=TABLES, help="table2 Ref-DAVIS-17, table3 Refer-YouTube-VOS, table7 MeViS")
    p.add_argument("--root", required=True, help="the dataset folder (the layout bench run reads)")
    p.add_argument("--out", required=True, help="the run folder (rerun to resume)")
    p.add_argument("--model", default="videoglamm", help="videoglamm (default; needs the weights), tiny or a YAML")
    p.add_argument("--checkpoint", default=None, help="the VideoGLaMM checkpoint folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local one)")
    p.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, else 1; 0 = no Ray)")
    p.add_argument("--split", default=None, help="default: the protocol's (MeViS valid_u, scored here)")
    p.add_argument("--estimate", type=float, default=None, metavar="TFLOPS",
                   help="print the table's FLOPs on this data and the wall time at TFLOPS sustained (e.g. 100 for an "
                   "H100 in bf16 at ~10%% of peak); runs nothing and needs no weights")
    p.add_argument("--quiet", action="store_true")


def run_reproduce_command(args: argparse.Namespace) -> int:
    """Exit code 0, 1 when units failed; errors (exit 2) propagate as RefStreamError."""
    report = reproduce(args)
    print(report["markdown"])
    if "estimate" not in report:
        print(f"wrote {Path(args.out) / ('reproduce_' + args.table + '.md')} and .csv")
    return 1 if report["failed"] else 0
