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
    check_released_weights(load_model_config(args.model, args.checkpoint))
    dataset = load_dataset(table.dataset, args.root, args.split)  # the layout, checked before any work
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
    p.add_argument("--quiet", action="store_true")


def run_reproduce_command(args: argparse.Namespace) -> int:
    """Exit code 0, 1 when units failed; errors (exit 2) propagate as RefStreamError."""
    report = reproduce(args)
    print(report["markdown"])
    print(f"wrote {Path(args.out) / ('reproduce_' + args.table + '.md')} and .csv")
    return 1 if report["failed"] else 0
