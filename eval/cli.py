"""``refstream eval``: score predictions on DAVIS-2017, Ref-DAVIS-17 and MeViS (valid_u).

Wiring (in ``refstream/cli.py``)::

    from eval.cli import add_eval_parser, run_eval
    add_eval_parser(sub)                       # in build_parser()
    if args.command == "eval": return run_eval(args)

Each command prints a table and, with ``--json OUT``, writes the full result (see :mod:`eval.davis` and
:mod:`eval.mevis` for the JSON keys). Errors are :class:`refstream_errors.RefStreamError` (exit code 2 in
``refstream.cli.main``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eval.davis import evaluate_davis, evaluate_ref_davis17
from eval.mevis import evaluate_mevis
from refstream_errors import RefStreamError


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval {davis, ref-davis17, mevis}`` to an argparse ``subparsers`` object; returns the parser."""
    p = subparsers.add_parser("eval", help="score predictions (DAVIS-2017, Ref-DAVIS-17, MeViS valid_u)",
                              description="Score saved predictions with the official protocols "
                                          "(J region similarity, F boundary accuracy).")
    esub = p.add_subparsers(dest="benchmark", required=True, metavar="{davis,ref-davis17,mevis}")

    d = esub.add_parser("davis", help="DAVIS-2017 toolkit semantics (unsupervised or semi-supervised)",
                        description="DAVIS-2017 evaluation with the official toolkit's semantics. unsupervised: all "
                                    "frames, void excluded, up to 20 predicted ids matched to GT objects by the "
                                    "Hungarian algorithm on (J+F)/2; semi-supervised: first and last frame dropped, "
                                    "id k scored against GT object k.")
    d.add_argument("--davis-root", required=True, metavar="D",
                   help="the DAVIS folder (JPEGImages/, Annotations_unsupervised/ or Annotations/, ImageSets/), "
                        "or a folder holding DAVIS/")
    d.add_argument("--results", required=True, metavar="R", help="R/<seq>/<frame>.png indexed PNGs")
    d.add_argument("--task", default="unsupervised", choices=["unsupervised", "semi-supervised"])
    d.add_argument("--subset", default="val", help="ImageSets list (default val)")
    _common(d, per_object=True)

    r = esub.add_parser("ref-davis17", help="Ref-DAVIS-17: 4 runs scored as unsupervised DAVIS-2017 val, averaged",
                        description="Ref-DAVIS-17: each of the 4 expression sets is a run scored with the DAVIS-2017 "
                                    "unsupervised protocol; the reported J, F and J&F are the means over the runs.")
    r.add_argument("--davis-root", required=True, metavar="D",
                   help="Ref-DAVIS-17 root holding DAVIS/ (or the DAVIS folder itself)")
    r.add_argument("--results", required=True, metavar="R",
                   help="R/<run>/<seq>/<frame>.png with runs anno_0..anno_3 or Davis17_annot1, "
                        "Davis17_annot1_full_video, Davis17_annot2, Davis17_annot2_full_video")
    _common(r, per_object=True)

    m = esub.add_parser("mevis", help="MeViS valid_u (per-expression J and F, averaged over expressions)",
                        description="MeViS offline protocol (valid_u): per expression, J and F averaged over all "
                                    "frames; J, F = means over expressions; J&F = (J+F)/2.")
    m.add_argument("--split-root", required=True, metavar="S",
                   help="the split folder (meta_expressions.json, mask_dict.json, JPEGImages/)")
    m.add_argument("--results", required=True, metavar="R", help="R/<vid>/<exp_id>/<frame>.png, 0/255 grayscale")
    _common(m, per_object=False)
    return p


def _common(p: argparse.ArgumentParser, per_object: bool) -> None:
    p.add_argument("--json", default=None, metavar="OUT", help="write the full result as JSON")
    p.add_argument("--missing-as-empty", action="store_true",
                   help="score missing prediction files as empty masks (default: error listing them)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    if per_object:
        p.add_argument("--per-object", action="store_true", help="also print the per-object table")


def run_eval(args: argparse.Namespace) -> int:
    """Run the ``eval`` command parsed by :func:`add_eval_parser`; returns the exit code (0).

    Raises:
        RefStreamError: bad dataset layout, missing or unreadable predictions.
    """
    if args.workers < 1:
        raise RefStreamError("--workers must be at least 1")
    started = time.perf_counter()
    if args.benchmark == "davis":

        result = evaluate_davis(args.davis_root, args.results, task=args.task, subset=args.subset,
                                missing_as_empty=args.missing_as_empty, workers=args.workers)
        title = f"DAVIS-2017 {args.task}, {args.subset}: {len(result['per_object'])} objects"
        lines = _davis_table(title, result, args.per_object)
    elif args.benchmark == "ref-davis17":

        result = evaluate_ref_davis17(args.davis_root, args.results, missing_as_empty=args.missing_as_empty,
                                      workers=args.workers)
        lines = _ref_davis_table(result, args.per_object)
    elif args.benchmark == "mevis":

        result = evaluate_mevis(args.split_root, args.results, missing_as_empty=args.missing_as_empty,
                                workers=args.workers)
        lines = _mevis_table(Path(args.split_root).name, result)
    else:  # pragma: no cover - argparse restricts the choices
        raise RefStreamError(f"unknown benchmark {args.benchmark!r}")
    lines.append(f"({time.perf_counter() - started:.1f}s)")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        lines.append(f"wrote {out}")
    print("\n".join(lines))
    return 0


def _f(x) -> str:
    return "    n/a" if x is None else f"{x:7.3f}"


def _davis_table(title: str, result: dict, per_object: bool) -> list[str]:
    lines = [title, f"{'':8s}{'mean':>7s}{'recall':>7s}{'decay':>7s}"]
    for key in ("J", "F"):
        s = result[key]
        lines.append(f"{key:8s}{_f(s['mean'])}{_f(s['recall'])}{_f(s['decay'])}")
    lines.append(f"{'J&F':8s}{_f(result['J&F'])}")
    if per_object:
        lines += _per_object_lines(result["per_object"], "object")
    return lines


def _per_object_lines(per_object: dict, header: str) -> list[str]:
    """Table rows of per-object mean J and F (none when there are no objects)."""
    if not per_object:
        return []
    width = max(len(header), *(len(n) for n in per_object)) + 2
    lines = [f"{header:{width}s}{'J':>7s}{'F':>7s}"]
    for name, s in per_object.items():
        lines.append(f"{name:{width}s}{_f(s['J']['mean'])}{_f(s['F']['mean'])}")
    return lines


def _ref_davis_table(result: dict, per_object: bool) -> list[str]:
    runs = result["runs"]
    width = max(len(n) for n in runs) + 2
    lines = [f"Ref-DAVIS-17 (DAVIS-2017 unsupervised val, {len(runs)} runs)",
             f"{'run':{width}s}{'J&F':>7s}{'J':>7s}{'F':>7s}"]
    for name, r in runs.items():
        lines.append(f"{name:{width}s}{_f(r['J&F'])}{_f(r['J']['mean'])}{_f(r['F']['mean'])}")
    lines.append(f"{'mean':{width}s}{_f(result['J&F'])}{_f(result['J']['mean'])}{_f(result['F']['mean'])}")
    if per_object:
        lines += _per_object_lines(result["per_object"], "object (mean of runs)")
    return lines


def _mevis_table(split: str, result: dict) -> list[str]:
    return [f"MeViS {split}: {len(result['per_expression'])} expressions",
            f"{'J&F':>7s}{'J':>7s}{'F':>7s}",
            f"{_f(result['J&F'])}{_f(result['J'])}{_f(result['F'])}"]
