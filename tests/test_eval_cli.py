"""``refstream eval`` (eval.cli, eval.davis, eval.mevis) and the dataset readers.

The evaluation is checked end to end against numbers recorded from the official code on the same files
(``tests/golden/davis_metrics_eval.json``): a small synthetic DAVIS-2017 dataset scored with the DAVIS
toolkit's ``DAVISEvaluation`` (github davisvideochallenge/davis2017-evaluation @ ac7c43fc), a synthetic
MeViS split scored with MeViS's ``tools/eval_mevis.py`` (github henghuiding/MeViS @ 7c0620b9), and
perturbed predictions of the real ``ref-davis17-mini`` / ``mevis-mini`` data scored with both.
Regenerate with (needs opencv-python-headless, scikit-image, scipy, tqdm, pycocotools)::

    python tools/goldens/davis_metrics_eval.py /path/to/davis2017-evaluation --mevis /path/to/MeViS
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics import decode  # noqa: E402

from eval.cli import add_eval_parser, run_eval  # noqa: E402
from refstream.errors import DatasetLayoutError, RefStreamError  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "davis_metrics_eval.json"
TOL = 1e-12
RUNS_ANNO = ("anno_0", "anno_1", "anno_2", "anno_3")
RUNS_TEXT = ("Davis17_annot1", "Davis17_annot1_full_video", "Davis17_annot2", "Davis17_annot2_full_video")


# ------------------------------------------------------------------------------------------ helpers

def cli(argv: list[str]) -> int:
    """Run ``refstream eval ...`` through our own parser (as refstream.cli.main would)."""
    parser = argparse.ArgumentParser(prog="refstream")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except RefStreamError as exc:
        print(f"refstream: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _palette() -> list[int]:
    pal = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128, 0, 128, 128]
    return pal + [255] * (768 - len(pal))


def save_indexed(path: Path, labels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(_palette())
    image.save(path)


def save_gray(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L").save(path)


def write_davis(root: Path, sequences: dict[str, dict], results: dict[str, Path]) -> None:
    """A DAVIS-2017 folder at ``root`` (JPEGs, both annotation folders, ImageSets) and the prediction
    folders ``results[task]`` from the decoded golden sequences."""
    from PIL import Image

    for seq, data in sequences.items():
        gt = data["gt"]
        for t in range(gt.shape[0]):
            jpg = root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg"
            jpg.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (gt.shape[2], gt.shape[1])).save(jpg)
            save_indexed(root / "Annotations_unsupervised" / "480p" / seq / f"{t:05d}.png", gt[t])
            save_indexed(root / "Annotations" / "480p" / seq / f"{t:05d}.png", data["gt_semi"][t])
            for task, folder in results.items():
                save_indexed(folder / seq / f"{t:05d}.png", data[f"pred_{task}"][t])
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(sequences) + "\n")


def write_mevis(split: Path, pred: Path, videos: dict) -> None:
    """A MeViS split (meta_expressions.json, mask_dict.json, JPEGImages) and 0/255 predictions."""
    from PIL import Image

    meta, masks = {"videos": {}}, {}
    for vid, data in videos.items():
        frames = [f"{t:05d}" for t in range(data["T"])]
        meta["videos"][vid] = {"expressions": data["expressions"], "frames": frames}
        for t, f in enumerate(frames):
            jpg = split / "JPEGImages" / vid / f"{f}.jpg"
            jpg.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (data["W"], data["H"])).save(jpg)
        masks.update(data["mask_dict"])
        for exp_id, p in data["pred"].items():
            for t, f in enumerate(frames):
                save_gray(pred / vid / exp_id / f"{f}.png", p[t])
    (split / "meta_expressions.json").write_text(json.dumps(meta))
    (split / "mask_dict.json").write_text(json.dumps(masks))


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _sequences(golden) -> dict[str, dict]:
    return {seq: {k: decode(v) for k, v in data.items()} for seq, data in golden["davis"]["sequences"].items()}


def _mevis_videos(golden) -> dict:
    out = {}
    for vid, data in golden["mevis"]["videos"].items():
        out[vid] = {**data, "pred": {e: decode(p) for e, p in data["pred"].items()}}
    return out


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and (b is None or math.isnan(b))
    return abs(a - b) <= TOL


@pytest.fixture(scope="module")
def synthetic_davis(golden, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("davis")
    write_davis(root / "DAVIS", _sequences(golden),
                {"unsupervised": root / "res_uns", "semi": root / "res_semi"})
    return root


# ------------------------------------------------------------------------ DAVIS against official

@pytest.mark.parametrize("task", ["unsupervised", "semi-supervised"])
def test_davis_matches_official_toolkit(golden, synthetic_davis, tmp_path, task):
    out = tmp_path / "davis.json"
    results = synthetic_davis / ("res_uns" if task == "unsupervised" else "res_semi")
    assert cli(["eval", "davis", "--davis-root", str(synthetic_davis / "DAVIS"), "--results", str(results),
                "--task", task, "--json", str(out)]) == 0
    ours = json.loads(out.read_text())
    official = golden["davis"]["official"][task]
    for key in ("J", "F"):
        for stat, letter in (("mean", "M"), ("recall", "R"), ("decay", "D")):
            theirs = float(np.mean(official[key][letter]))
            assert _close(ours[key][stat], theirs), (task, key, stat, ours[key][stat], theirs)
        # per object, in the toolkit's order (matched pairs sorted by proposal id)
        got = [o[key]["mean"] for o in ours["per_object"].values()]
        np.testing.assert_allclose(got, official[key]["M"], rtol=0, atol=TOL)
    assert _close(ours["J&F"], (np.mean(official["J"]["M"]) + np.mean(official["F"]["M"])) / 2)
    if task == "unsupervised":
        # our per_object keys are the GT ids the toolkit's Hungarian assignment chose
        expected = [f"{seq}_{col + 1}" for seq, pairs in official["assignment"].items() for _row, col in pairs]
        assert list(ours["per_object"]) == expected


def test_hungarian_beats_greedy_on_constructed_case(golden, synthetic_davis, tmp_path):
    """In sequence ``hungarian`` a greedy matching (best pair first) pairs proposal 1 with object 1 and
    leaves object 2 to proposal 2 (which misses it); the optimal assignment swaps them."""
    from scipy.optimize import linear_sum_assignment

    from eval.davis import score_sequence_unsupervised

    data = _sequences(golden)["hungarian"]
    labels, void = data["gt"].copy(), data["gt"] == 255
    labels[void] = 0
    pred = data["pred_unsupervised"]
    from eval.metrics import f_measure, jaccard

    cost = np.array([[(np.mean(jaccard(labels == g, pred == p, void)) + np.mean(f_measure(labels == g, pred == p, void))) / 2
                      for g in (1, 2)] for p in (1, 2)])
    greedy_first = np.unravel_index(np.argmax(cost), cost.shape)
    greedy_total = cost[greedy_first] + cost[1 - greedy_first[0], 1 - greedy_first[1]]
    rows, cols = linear_sum_assignment(-cost)
    assert cost[rows, cols].sum() > greedy_total + 0.1
    assert greedy_first == (0, 0) and list(cols) == [1, 0]
    scored = score_sequence_unsupervised(labels, void, pred, seq="hungarian")
    assert [o.name for o in scored] == ["hungarian_2", "hungarian_1"]
    assert golden["davis"]["official"]["unsupervised"]["assignment"]["hungarian"] == [[0, 1], [1, 0]]


def test_void_is_excluded_in_unsupervised_only(golden):
    from eval.davis import score_sequence_semisupervised, score_sequence_unsupervised

    data = _sequences(golden)["void"]
    labels = data["gt"].copy()
    void = labels == 255
    assert void.any()
    labels[void] = 0
    pred = labels.copy()
    pred[void] = 1                              # paint the void region as object 1
    uns = score_sequence_unsupervised(labels, void, pred, seq="void")
    assert all(np.all(o.j == 1) and np.all(o.f == 1) for o in uns)      # void pixels do not count
    semi = score_sequence_semisupervised(labels, pred, seq="void")     # the toolkit passes no void here
    assert np.all(semi[0].j < 1)


# ----------------------------------------------------------------------- real data: Ref-DAVIS-17

def _ref_davis_results(examples_dir: Path, dest: Path, runs, shift=(0, 0)) -> Path:
    from PIL import Image

    gt_dir = examples_dir / "ref-davis17-mini" / "DAVIS" / "Annotations_unsupervised" / "480p" / "blackswan"
    for run_index, run in enumerate(runs):
        for png in sorted(gt_dir.glob("*.png")):
            labels = np.array(Image.open(png))
            if shift != (0, 0):
                labels = np.roll(labels, (shift[0] * (run_index + 1), shift[1]), axis=(0, 1))
            save_indexed(dest / run / "blackswan" / png.name, labels)
    return dest


@pytest.mark.parametrize("runs", [RUNS_ANNO, RUNS_TEXT])
def test_ref_davis17_perfect_from_gt(examples_dir, tmp_path, capsys, runs):
    results = _ref_davis_results(examples_dir, tmp_path / "res", runs)
    out = tmp_path / "out" / "ref.json"
    assert cli(["eval", "ref-davis17", "--davis-root", str(examples_dir / "ref-davis17-mini"),
                "--results", str(results), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["J&F"] == 1.0 and result["J"]["mean"] == 1.0 and result["F"]["mean"] == 1.0
    assert set(result["runs"]) == set(runs) and result["per_object"]["blackswan_1"]["J"]["mean"] == 1.0
    printed = capsys.readouterr().out
    assert "Ref-DAVIS-17" in printed and runs[3] in printed and "mean" in printed


def test_ref_davis17_perturbed_matches_official(examples_dir, golden, tmp_path):
    real = golden["real"]["ref_davis17"]
    results = _ref_davis_results(examples_dir, tmp_path / "res", RUNS_ANNO, shift=tuple(real["shift"]))
    out = tmp_path / "ref.json"
    assert cli(["eval", "ref-davis17", "--davis-root", str(examples_dir / "ref-davis17-mini"),
                "--results", str(results), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for run, official in real["runs"].items():
        for key in ("J", "F"):
            for stat, letter in (("mean", "M"), ("recall", "R"), ("decay", "D")):
                assert _close(result["runs"][run][key][stat], official[key][letter]), (run, key, stat)
    jf = [(real["runs"][r]["J"]["M"] + real["runs"][r]["F"]["M"]) / 2 for r in RUNS_ANNO]
    assert _close(result["J&F"], float(np.mean(jf)))
    assert result["J&F"] < 0.95


def test_ref_davis17_incomplete_runs(examples_dir, tmp_path, capsys):
    results = _ref_davis_results(examples_dir, tmp_path / "res", RUNS_ANNO[:3])
    assert cli(["eval", "ref-davis17", "--davis-root", str(examples_dir / "ref-davis17-mini"),
                "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "anno_3" in err and "Davis17_annot1" in err


def test_davis_missing_frames_listed_and_missing_as_empty(examples_dir, tmp_path, capsys):
    results = _ref_davis_results(examples_dir, tmp_path / "res", ["run"])
    for name in ("00003.png", "00017.png"):
        (results / "run" / "blackswan" / name).unlink()
    root = str(examples_dir / "ref-davis17-mini")
    assert cli(["eval", "davis", "--davis-root", root, "--results", str(results / "run")]) == 2
    err = capsys.readouterr().err
    assert "2 prediction file(s) missing" in err and "blackswan/00003.png" in err and "blackswan/00017.png" in err
    out = tmp_path / "r.json"
    assert cli(["eval", "davis", "--davis-root", root, "--results", str(results / "run"), "--missing-as-empty",
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["J"]["mean"] == pytest.approx(48 / 50) and result["F"]["mean"] == pytest.approx(48 / 50)
    assert result["J"]["recall"] == pytest.approx(48 / 50)


# ------------------------------------------------------------------------------------------ MeViS

def test_mevis_matches_official_script(golden, tmp_path):
    write_mevis(tmp_path / "valid_u", tmp_path / "pred", _mevis_videos(golden))
    out = tmp_path / "m.json"
    assert cli(["eval", "mevis", "--split-root", str(tmp_path / "valid_u"), "--results", str(tmp_path / "pred"),
                "--json", str(out)]) == 0
    ours = json.loads(out.read_text())
    official = golden["mevis"]["official"]
    assert set(ours["per_expression"]) == set(official["per_expression"])
    for name, (j, f) in official["per_expression"].items():
        assert abs(ours["per_expression"][name][0] - j) <= TOL and abs(ours["per_expression"][name][1] - f) <= TOL
    for key in ("J", "F", "J&F"):
        assert abs(ours[key] - official[key]) <= TOL


def _mevis_predictions(examples_dir: Path, dest: Path, shift=(0, 0)) -> Path:
    from eval.mevis import MevisSplit

    split = MevisSplit(examples_dir / "mevis-mini" / "valid_u")
    for vid in split.videos():
        for k, exp_id in enumerate(split.expressions(vid)):
            gt = split.gt_masks(vid, exp_id)
            for t, frame in enumerate(split.frames(vid)):
                mask = np.roll(gt[t], (shift[0] * k, shift[1] * k), axis=(0, 1))
                save_gray(dest / vid / exp_id / f"{frame}.png", mask)
    return dest


def test_mevis_real_perfect_perturbed_and_missing(examples_dir, golden, tmp_path, capsys):
    split = str(examples_dir / "mevis-mini" / "valid_u")
    perfect = _mevis_predictions(examples_dir, tmp_path / "perfect")
    out = tmp_path / "m.json"
    assert cli(["eval", "mevis", "--split-root", split, "--results", str(perfect), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["J&F"] == 1.0 and len(result["per_expression"]) == 4
    assert result["per_expression"]["blackswan_0"] == [1.0, 1.0]
    assert "MeViS valid_u: 4 expressions" in capsys.readouterr().out

    real = golden["real"]["mevis"]
    shifted = _mevis_predictions(examples_dir, tmp_path / "shifted", shift=tuple(real["shift"]))
    assert cli(["eval", "mevis", "--split-root", split, "--results", str(shifted), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for name, (j, f) in real["per_expression"].items():
        assert abs(result["per_expression"][name][0] - j) <= TOL and abs(result["per_expression"][name][1] - f) <= TOL
    assert result["J&F"] < 1.0

    (shifted / "blackswan" / "2" / "00007.png").unlink()
    shutil.rmtree(shifted / "blackswan" / "3")
    assert cli(["eval", "mevis", "--split-root", split, "--results", str(shifted)]) == 2
    err = capsys.readouterr().err
    assert "blackswan/2/00007.png" in err and "blackswan/3/" in err and "--missing-as-empty" in err
    assert cli(["eval", "mevis", "--split-root", split, "--results", str(shifted), "--missing-as-empty",
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["per_expression"]["blackswan_3"] == [0.0, 0.0]            # every GT frame is non-empty
    j2 = real["per_expression"]["blackswan_2"][0]
    assert result["per_expression"]["blackswan_2"][0] < j2


def test_mevis_wrong_layouts(examples_dir, tmp_path, capsys):
    # the MeViS root instead of the split folder
    (tmp_path / "mevis").mkdir()
    shutil.copytree(examples_dir / "mevis-mini" / "valid_u", tmp_path / "mevis" / "valid_u",
                    ignore=shutil.ignore_patterns("JPEGImages"))
    assert cli(["eval", "mevis", "--split-root", str(tmp_path / "mevis"), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "meta_expressions.json not found" in err and "valid_u" in err
    # the server-scored split has no masks
    (tmp_path / "mevis" / "valid_u" / "mask_dict.json").unlink()
    assert cli(["eval", "mevis", "--split-root", str(tmp_path / "mevis" / "valid_u"), "--results", str(tmp_path)]) == 2
    assert "mask_dict.json not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ DAVIS layouts

def test_davis_wrong_layouts(examples_dir, tmp_path, capsys):
    assert cli(["eval", "davis", "--davis-root", str(tmp_path), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "JPEGImages/480p not found" in err and "Annotations_unsupervised" in err
    # judo: 16 frames but 4 sparse masks -> the missing GT frames are listed
    judo = tmp_path / "judo" / "DAVIS"
    shutil.copytree(examples_dir / "judo" / "images" / "judo", judo / "JPEGImages" / "480p" / "judo")
    shutil.copytree(examples_dir / "judo" / "masks" / "judo", judo / "Annotations_unsupervised" / "480p" / "judo")
    (judo / "ImageSets" / "2017").mkdir(parents=True)
    (judo / "ImageSets" / "2017" / "val.txt").write_text("judo\n")
    with pytest.raises(DatasetLayoutError, match=r"16 frames but 4 GT masks; missing 00001.png, 00002.png"):
        _evaluate(judo, tmp_path)
    # keep only the annotated frames: the masks differ in size (00005.png is 853 wide)
    for jpg in (judo / "JPEGImages" / "480p" / "judo").glob("*.jpg"):
        if jpg.stem not in {"00000", "00005", "00008", "00013"}:
            jpg.unlink()
    results = tmp_path / "judo_res"
    shutil.copytree(judo / "Annotations_unsupervised" / "480p" / "judo", results / "judo")
    with pytest.raises(DatasetLayoutError, match=r"differ in size .*00005.png 480x853"):
        _evaluate(judo, results)


def _evaluate(root, results, **kw):
    from eval.davis import evaluate_davis

    return evaluate_davis(root, results, **kw)


def test_davis_prediction_errors(synthetic_davis, golden, tmp_path):
    from PIL import Image

    seqs = list(_sequences(golden))
    res = tmp_path / "res"
    shutil.copytree(synthetic_davis / "res_uns", res)
    first = res / seqs[0] / "00000.png"
    labels = np.array(Image.open(first))
    save_indexed(first, np.full_like(labels, 21))                       # 21 proposals > 20
    with pytest.raises(RefStreamError, match="above the 20 proposals"):
        _evaluate(synthetic_davis / "DAVIS", res, sequences=[seqs[0]])
    Image.new("RGB", (labels.shape[1], labels.shape[0])).save(first)    # colour PNG
    with pytest.raises(RefStreamError, match="single-channel"):
        _evaluate(synthetic_davis / "DAVIS", res, sequences=[seqs[0]])
    save_indexed(first, np.zeros((5, 5), np.uint8))                     # wrong size
    with pytest.raises(RefStreamError, match="prediction is 5x5"):
        _evaluate(synthetic_davis / "DAVIS", res, sequences=[seqs[0]])
    with pytest.raises(RefStreamError, match="semi-supervised protocol prediction id k"):
        _evaluate(synthetic_davis / "DAVIS", synthetic_davis / "res_uns", task="semi-supervised",
                  sequences=["many"])


def test_davis_workers_give_the_same_result(synthetic_davis):
    one = _evaluate(synthetic_davis / "DAVIS", synthetic_davis / "res_uns")
    two = _evaluate(synthetic_davis / "DAVIS", synthetic_davis / "res_uns", workers=2)
    assert one == two


# --------------------------------------------------------------------------------------- readers

def test_ref_davis_converted_layout(examples_dir, tmp_path):
    from eval.ref_davis import ANNOTATION_FILES, RefDavis, RefDavisConverted, open_ref_davis, read_text_annotations

    mini = examples_dir / "ref-davis17-mini"
    root = tmp_path / "ref-davis"
    shutil.copytree(mini / "DAVIS" / "JPEGImages" / "480p" / "blackswan", root / "valid" / "JPEGImages" / "blackswan")
    shutil.copytree(mini / "DAVIS" / "Annotations_unsupervised" / "480p" / "blackswan",
                    root / "valid" / "Annotations" / "blackswan")
    expressions = {}
    for index, name in enumerate(ANNOTATION_FILES):   # ReferFormer: exp_id = 4 * object + annotation set
        e = read_text_annotations(mini / "davis_text_annotations" / f"{name}.txt")[0]
        expressions[str(index)] = {"exp": e.text, "obj_id": str(e.obj_id)}
    meta = {"videos": {"blackswan": {"expressions": expressions, "frames": [f"{t:05d}" for t in range(50)]}}}
    (root / "meta_expressions" / "valid").mkdir(parents=True)
    (root / "meta_expressions" / "valid" / "meta_expressions.json").write_text(json.dumps(meta))
    converted = open_ref_davis(root)
    original = open_ref_davis(mini)
    assert isinstance(converted, RefDavisConverted) and isinstance(original, RefDavis)
    for name in ANNOTATION_FILES:
        assert converted.expressions(name) == original.expressions(name)
    assert converted.videos() == ["blackswan"] and len(converted.frames("blackswan")) == 50
    assert np.array_equal(converted.mask("blackswan", "00010"), original.mask("blackswan", "00010"))
    # the DAVIS evaluation reads GT from the converted layout too
    results = _ref_davis_results(examples_dir, tmp_path / "res", ["run"])
    assert _evaluate(root, results / "run")["J&F"] == 1.0
    with pytest.raises(DatasetLayoutError, match="not a Ref-DAVIS-17 folder"):
        open_ref_davis(tmp_path / "res")
    with pytest.raises(DatasetLayoutError, match="valid/JPEGImages not found"):
        RefDavisConverted(tmp_path / "res")


def test_text_annotation_video_name_fixes(tmp_path):
    from eval.ref_davis import read_text_annotations

    path = tmp_path / "Davis17_annot1.txt"
    path.write_text('clasic-car 1 "a car"\ndog-scale 2 "a dog"\nmotor-bike 1 "a bike"\n')
    assert [e.video for e in read_text_annotations(path)] == ["classic-car", "dogs-scale", "motorbike"]


def test_refytvos_valid_split(examples_dir, tmp_path):
    from eval.refytvos import VALID_VIDEOS, RefYTVOS, make_submission_zip, missing_submission_frames

    meta_path = examples_dir / "refytvos" / "valid_meta_expressions.json"
    d = RefYTVOS(meta_path)
    valid = d.valid_videos()
    assert len(valid) == 202 and len(d.test_videos()) == 305 and len(d.items()) == 834
    meta = json.loads(meta_path.read_text())
    assert len(meta["videos"]) == 507
    # with the test meta file present the split is derived from it, as ReferFormer does
    root = tmp_path / "ytvos"
    (root / "meta_expressions" / "valid").mkdir(parents=True)
    (root / "meta_expressions" / "test").mkdir(parents=True)
    shutil.copy(meta_path, root / "meta_expressions" / "valid" / "meta_expressions.json")
    test = {"videos": {v: meta["videos"][v] for v in meta["videos"] if v not in set(VALID_VIDEOS)}}
    (root / "meta_expressions" / "test" / "meta_expressions.json").write_text(json.dumps(test))
    assert RefYTVOS(root).valid_videos() == valid
    test["videos"].pop(next(iter(test["videos"])))
    (root / "meta_expressions" / "test" / "meta_expressions.json").write_text(json.dumps(test))
    with pytest.raises(DatasetLayoutError, match="gives 203 videos"):
        RefYTVOS(root).valid_videos()
    # a meta file without the valid videos, and a wrong folder
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"videos": {"abc": {"expressions": {}, "frames": []}}}))
    with pytest.raises(DatasetLayoutError, match="202 valid videos are not listed"):
        RefYTVOS(small).valid_videos()
    with pytest.raises(DatasetLayoutError, match="meta_expressions/valid/meta_expressions.json not found"):
        RefYTVOS(tmp_path)
    # submission check
    missing = missing_submission_frames(d, tmp_path / "Annotations")
    assert len(missing) == sum(len(d.frames(v)) * len(d.expressions(v)) for v in valid)
    with pytest.raises(DatasetLayoutError, match="submission frame"):
        make_submission_zip(d, tmp_path / "Annotations", tmp_path / "sub.zip")


def test_refstream_cli_wiring(synthetic_davis, tmp_path):
    """Once refstream/cli.py wires eval.cli, ``refstream eval`` goes through it."""
    from refstream import cli as refstream_cli

    try:
        refstream_cli.build_parser().parse_args(["eval", "davis", "--davis-root", "x", "--results", "y"])
    except SystemExit:
        pytest.skip("refstream.cli does not wire `eval` yet")
    out = tmp_path / "d.json"
    assert refstream_cli.main(["eval", "davis", "--davis-root", str(synthetic_davis / "DAVIS"), "--results",
                               str(synthetic_davis / "res_uns"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["J&F"] is not None
    assert refstream_cli.main(["eval", "davis", "--davis-root", str(tmp_path), "--results", str(tmp_path)]) == 2
