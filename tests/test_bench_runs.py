"""`refstream bench run` / `report`: the sweep on a real local Ray cluster with the tiny model, feature
sharing, resume, failing units, the Ref-DAVIS merge, the report's Rel. column, the server zips."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from refstream.bench.runs import merge_objects, report_rows
from refstream.errors import ConfigError

BLACKSWAN_FRAMES = 50


def bench(*argv: str) -> int:
    """Through ``refstream.cli.main`` when ``bench run`` is wired there, else through our own parser
    (``refstream.bench.runs.main``, which handles errors as the CLI does: exit code 2)."""
    import contextlib
    import io

    from refstream.bench.runs import main as bench_main
    from refstream.cli import build_parser, main

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["bench", "report", "x"])
        wired = True
    except SystemExit:
        wired = False
    if wired:
        return main(["bench", *argv])
    return bench_main(list(argv))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ref_davis(examples_dir) -> Path:
    return examples_dir / "ref-davis17-mini"


@pytest.fixture(scope="module")
def mevis_root(examples_dir) -> Path:
    return examples_dir / "mevis-mini"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- by hand
def test_merge_objects_binarises_first_and_the_first_object_wins():
    """Hand-made probabilities where the old rule (highest probability above 0.1) gives other labels."""
    probs = np.array([
        [[0.05, 0.60, 0.30], [0.45, 0.10, 0.90]],  # object id 1
        [[0.09, 0.70, 0.30], [0.02, 0.51, 0.95]],  # object id 3
    ])
    # VideoGLaMM (logit > 0 first, then the first object): (0,1) both above 0.5 -> 1 (not 3, the higher);
    # (0,2) 0.3 is below 0.5 -> background (the old rule: 1); (1,0) 0.45 -> background (old: 1);
    # (1,1) 0.51 -> 3; (1,2) both above -> 1 (old: 3)
    assert merge_objects(probs, [1, 3]).tolist() == [[0, 1, 0], [0, 3, 1]]
    # ReferFormer's variant: above 0.5 first, then the highest probability
    assert merge_objects(probs, [1, 3], "highest-probability").tolist() == [[0, 3, 0], [0, 3, 3]]
    assert merge_objects(probs, [1, 3]).dtype == np.uint8
    assert merge_objects(np.zeros((0, 2, 2)), []).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ConfigError, match="unknown merge rule"):
        merge_objects(probs, [1, 3], "max")


def test_merge_objects_equals_videoglamms_torch_steps():
    """The original's order of operations (binarise at logit > 0, zero below 0.5, argmax against a 0.1 plane),
    written out with torch on random logits, gives the same labels."""
    torch = pytest.importorskip("torch")
    logits = torch.randn(4, 2, 30, 40, generator=torch.Generator().manual_seed(0)) * 3
    masks = (logits > 0).float()  # VideoGLaMM.py L873
    masks[masks < 0.5] = 0.0  # eval_referdavis_infer.py L251
    planes = torch.cat([torch.full((1, *masks.shape[1:]), 0.1), masks])  # L252-253
    expected = torch.argmax(planes, dim=0).numpy()  # L254: 0 = background, i = the i-th object
    ids = np.array([1, 2, 3, 4])
    got = np.stack([merge_objects(torch.sigmoid(logits[:, t]).numpy(), ids) for t in range(2)])
    assert (got == expected).all()


def result(dataset, method, budget, j, f, fps=2.0, tokens=3328.0):
    return {"dataset": dataset, "combo": f"{method}_{budget}", "method": method, "budget": budget, "J": j, "F": f,
            "J&F": (j + f) / 2, "frames_per_second": fps, "visual_tokens": tokens, "units": 4, "units_ok": 4}


def test_report_rel_column_by_hand(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    rows = [result("mevis", "none", 576, 0.60, 0.70), result("mevis", "litelvlm", 196, 0.58, 0.69, 4.0, 1808.0),
            result("mevis", "random", 81, 0.30, 0.35, 5.0, 1344.0)]
    for r in rows:
        (run / "results" / f"{r['combo']}.json").write_text(json.dumps(r))
    (run / "run.json").write_text(json.dumps({"combos": {r["combo"]: [r["method"], r["budget"]] for r in rows}}))
    assert bench("report", str(run)) == 0
    table = {(r["method"], r["budget"]): r for r in report_rows([json.loads(json.dumps(r)) for r in rows])}
    # none: J&F 0.65 -> 65.0, Rel. 100; litelvlm: 0.635 / 0.65 = 97.69%; random: 0.325 / 0.65 = 50%
    assert table["none", 576]["J&F"] == pytest.approx(65.0) and table["none", 576]["Rel."] == pytest.approx(100.0)
    assert table["litelvlm", 196]["Rel."] == pytest.approx(100 * 0.635 / 0.65)
    assert table["random", 81]["Rel."] == pytest.approx(50.0)
    md = (run / "report.md").read_text()
    assert "| mevis | litelvlm | 196 | 58.0 | 69.0 | 63.5 | 97.7 | 4.00 | 1808 | 4/4 |" in md
    lines = (run / "report.csv").read_text().splitlines()
    assert lines[0] == "dataset,method,budget,J,F,J&F,Rel.,frames/s,visual tokens,units"
    assert lines[3].startswith("mevis,random,81,30.0,35.0,32.5,50.0,5.0,1344.0")
    assert "97.7" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- feature sharing
def test_sweep_computes_video_features_once(blackswan_dir):
    """2 methods x 2 budgets over 2 expressions: ONE CLIP vision forward, ONE text forward, ONE InternVideo2
    forward for the video; one SAM2 pass per (method, budget) with both expressions as objects (image
    features once per frame); the `none` run equals `refstream run`'s masks."""
    import torch

    from refstream.config import load_model_config
    from refstream.pipeline import Pipeline, RunOptions, SweepOptions

    pipe = Pipeline(load_model_config("tiny"), "cpu")
    counts = {"vision": 0, "text": 0, "iv2": 0, "sam2_image": 0}
    model = pipe.model
    hooks = [
        model.clip.vision_model.register_forward_hook(lambda *a: counts.__setitem__("vision", counts["vision"] + 1)),
        model.clip.text_model.register_forward_hook(lambda *a: counts.__setitem__("text", counts["text"] + 1)),
        model.internvideo2.register_forward_hook(lambda *a: counts.__setitem__("iv2", counts["iv2"] + 1)),
        model.sam2.vision_encoder.register_forward_hook(  # frames encoded (batched by --sam2-chunk)
            lambda m, args, out: counts.__setitem__("sam2_image", counts["sam2_image"] + args[0].shape[0])),
    ]
    frames = 4
    logits: dict = {}
    runs = [("none", 196), ("none", 81), ("litelvlm", 196), ("litelvlm", 81)]
    starts = {}
    try:
        pipe.run_sweep(blackswan_dir, ["the black swan", "the water"], runs,
                       lambda r, pos, name, lg: logits.setdefault(r, []).append(lg),
                       options=SweepOptions(max_frames=frames), on_run_start=lambda r, info: starts.__setitem__(r, info))
    finally:
        for h in hooks:
            h.remove()
    assert counts["vision"] == 1 and counts["text"] == 1 and counts["iv2"] == 1
    assert counts["sam2_image"] == frames * len(runs)  # per run: N = 2 objects, image features once per frame
    assert all(len(logits[r]) == frames and len(logits[r][0]) == 2 for r in range(len(runs)))
    assert starts[0]["visual_tokens"] == [16 * 144 + 16 * 64] * 2 and starts[3]["visual_tokens"] == [16 * 20 + 16 * 64] * 2
    # the run with `none` is exactly `refstream run` (one job, both expressions)
    job = pipe.run(blackswan_dir, RunOptions(expressions=["the black swan", "the water"], model="tiny", method="none",
                                             max_frames=frames), progress=False)
    from refstream.outputs import decode_rle

    for t in range(frames):
        for i in range(2):
            assert np.array_equal(decode_rle(job.masks[i][t]), (logits[0][t][i] > 0).numpy())
    assert torch.equal(logits[0][2][1], logits[1][2][1])  # `none` ignores the budget


# ------------------------------------------------------------------------------------------ on Ray
def common(root, out, *extra):
    return ["run", "--root", str(root), "--model", "tiny", "--device", "cpu", "--out", str(out), "--quiet", *extra]


def test_ref_davis_sweep_on_ray_then_resume(ray_cluster, ref_davis, tmp_path):
    out = tmp_path / "run"
    argv = common(ref_davis, out, "--dataset", "ref-davis17", "--method", "none", "--method", "litelvlm",
                  "--budget", "196", "--budget", "81", "--max-frames", "8", "--workers", "2")
    assert bench(*argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == 16 and summary["skipped"] == 0 and summary["failed"] == 0
    assert set(summary["results"]) == {"none_196", "none_81", "litelvlm_196", "litelvlm_81"}
    from eval.davis import read_indexed_png

    for combo, res in summary["results"].items():
        assert res["units_ok"] == 4 and res["J&F"] is not None and res["scored_partial"] is True
        assert set(res["runs"]) == {"anno_0", "anno_1", "anno_2", "anno_3"}
        assert res["runs_scored"] == ["anno_0", "anno_1", "anno_2"]  # VideoGLaMM's metrics script: 3 of 4
        assert res["J&F_runs_scored"] == pytest.approx(np.mean([res["runs"][f"anno_{k}"] for k in range(3)]))
        for k in range(4):
            pngs = sorted((out / "predictions" / combo / f"anno_{k}" / "blackswan").glob("*.png"))
            assert [p.stem for p in pngs] == [f"{i:05d}" for i in range(8)]
            from PIL import Image

            assert Image.open(pngs[0]).mode == "P" and set(np.unique(read_indexed_png(pngs[3]))) <= {0, 1}
    assert summary["results"]["litelvlm_81"]["visual_tokens"] == 16 * 20 + 16 * 64
    rec = json.loads((out / "status" / "litelvlm_81" / "blackswan" / "2_1.json").read_text())
    assert rec["status"] == "ok" and rec["attempts"] == 1 and rec["seconds"] > 0 and rec["frames"] == 8

    before = tree_digest(out / "predictions")
    npz = out / "units" / "litelvlm_196" / "blackswan" / "1_1.npz"
    first_probs = np.load(npz)["probs"]
    assert bench(*argv) == 0  # resume: everything is done
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == 0 and summary["skipped"] == 16
    assert tree_digest(out / "predictions") == before

    (out / "status" / "litelvlm_196" / "blackswan" / "1_1.json").unlink()  # lost its record: runs again
    assert bench(*argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == 1 and summary["skipped"] == 15
    np.testing.assert_allclose(np.load(npz)["probs"].astype(int), first_probs.astype(int), atol=2)
    assert tree_digest(out / "predictions").keys() == before.keys()

    # a resume with other settings is refused
    bad = [a if a != "8" else "6" for a in argv]
    assert bench(*bad) == 2


def synthetic_mevis(tmp_path: Path, mevis_root: Path, frames: int = 6) -> Path:
    """A MeViS valid-style split (no masks): blackswan with 2 expressions + an empty one, and a corrupt video."""
    split = tmp_path / "mevis" / "valid"
    src = mevis_root / "valid_u" / "JPEGImages" / "blackswan"
    names = [f"{i:05d}" for i in range(frames)]
    (split / "JPEGImages" / "blackswan").mkdir(parents=True)
    for n in names:
        shutil.copy(src / f"{n}.jpg", split / "JPEGImages" / "blackswan" / f"{n}.jpg")
    (split / "JPEGImages" / "broken").mkdir(parents=True)
    for n in names:
        (split / "JPEGImages" / "broken" / f"{n}.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    meta = {"videos": {
        "blackswan": {"frames": names, "expressions": {
            "0": {"exp": "a black swan", "obj_id": [1], "anno_id": [0]},
            "1": {"exp": "   ", "obj_id": [1], "anno_id": [0]},
            "2": {"exp": "the pond", "obj_id": [1], "anno_id": [0]}}},
        "broken": {"frames": names, "expressions": {"0": {"exp": "a swan", "obj_id": [1], "anno_id": [0]}}},
    }}
    (split / "meta_expressions.json").write_text(json.dumps(meta))
    return split


def test_failing_units_are_retried_then_reported_while_others_finish(ray_cluster, mevis_root, tmp_path):
    split = synthetic_mevis(tmp_path, mevis_root)
    out = tmp_path / "run"
    code = bench(*common(split.parent, out, "--dataset", "mevis", "--split", "valid", "--method", "random",
                         "--budget", "81", "--workers", "2", "--retries", "1"))
    assert code == 1  # units failed
    failures = {(f["video"], f["exp_id"]): f for f in json.loads((out / "failures.json").read_text())}
    assert set(failures) == {("blackswan", "1"), ("broken", "0")}
    assert all(f["attempts"] == 2 for f in failures.values())  # tried, retried, then reported
    assert "empty" in failures["blackswan", "1"]["error"]
    assert "broken" in failures["broken", "0"]["error"] or "JPEG" in failures["broken", "0"]["error"] \
        or "image" in failures["broken", "0"]["error"].lower()
    for exp_id in ("0", "2"):
        pngs = sorted((out / "predictions" / "random_81" / "blackswan" / exp_id).glob("*.png"))
        assert len(pngs) == 6
        from PIL import Image

        assert Image.open(pngs[0]).mode == "L" and set(np.unique(np.array(Image.open(pngs[0])))) <= {0, 255}
    res = json.loads((out / "results" / "random_81.json").read_text())
    assert res["units_ok"] == 2 and res["units_failed"] == 2 and len(res["failed"]) == 2
    with zipfile.ZipFile(res["submission"]) as zf:  # MeViS valid: the server zip
        names = zf.namelist()
    assert "blackswan/0/00000.png" in names and len(names) == 12
    status = json.loads((out / "status" / "random_81" / "broken" / "0.json").read_text())
    assert status["status"] == "failed" and status["attempts"] == 2

    # the failed units are not skipped on resume: tried again (and reported again), the others skipped
    code = bench(*common(split.parent, out, "--dataset", "mevis", "--split", "valid", "--method", "random",
                         "--budget", "81", "--workers", "0", "--retries", "0"))
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1 and summary["skipped"] == 2 and summary["ran"] == 2 and summary["failed"] == 2


def test_mevis_valid_u_scored(mevis_root, tmp_path):
    """In-process (--workers 0) on the real mevis-mini valid_u: J / F from eval.mevis."""
    out = tmp_path / "run"
    assert bench(*common(mevis_root, out, "--dataset", "mevis", "--split", "valid_u", "--method", "litelvlm",
                         "--budget", "81", "--max-frames", "4", "--workers", "0")) == 0
    res = json.loads((out / "results" / "litelvlm_81.json").read_text())
    assert res["units_ok"] == 4 and len(res["per_expression"]) == 4
    assert 0 <= res["J"] <= 1 and 0 <= res["F"] <= 1 and res["J&F"] == pytest.approx((res["J"] + res["F"]) / 2)
    assert len(list((out / "predictions" / "litelvlm_81" / "blackswan" / "3").glob("*.png"))) == 4


def test_refytvos_synthetic_layout_zip(examples_dir, tmp_path):
    """Refer-YouTube-VOS: a tiny layout with frames for one valid video; predictions for every listed frame,
    zipped as Annotations/<vid>/<exp_id>/<frame>.png."""
    from PIL import Image

    root = tmp_path / "ytvos"
    meta_dir = root / "meta_expressions" / "valid"
    meta_dir.mkdir(parents=True)
    real = json.loads((examples_dir / "refytvos" / "valid_meta_expressions.json").read_text())
    vid = "0062f687f1"
    info = real["videos"][vid]
    info["frames"] = info["frames"][:5]
    real["videos"][vid] = info
    (meta_dir / "meta_expressions.json").write_text(json.dumps(real))
    folder = root / "valid" / "JPEGImages" / vid
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in info["frames"]:
        Image.fromarray(rng.integers(0, 255, (72, 128, 3), dtype=np.uint8)).save(folder / f"{f}.jpg")
    out = tmp_path / "run"
    assert bench(*common(root, out, "--dataset", "refytvos", "--method", "none", "--budget", "576",
                         "--video", vid, "--workers", "0")) == 0
    res = json.loads((out / "results" / "none_576.json").read_text())
    assert res["J&F"] is None and res["units_ok"] == len(info["expressions"])
    with zipfile.ZipFile(res["submission"]) as zf:
        names = set(zf.namelist())
        png = zf.read(f"Annotations/{vid}/{next(iter(info['expressions']))}/{info['frames'][0]}.png")
    expected = {f"Annotations/{vid}/{e}/{f}.png" for e in info["expressions"] for f in info["frames"]}
    assert names == expected
    import io

    assert Image.open(io.BytesIO(png)).size == (128, 72)


def test_cuda_error_exits_the_actor_process(monkeypatch):
    """A CUDA error inside a unit ends the worker process (so Ray restarts the actor); other errors do not."""
    import refstream.bench.actor as actor

    worker = object.__new__(actor.BenchWorker)
    worker.pipeline, worker.run_dir, worker.tasks_done = None, "x", 0
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(actor.os, "_exit", fake_exit)
    monkeypatch.setattr(actor, "process_video", lambda *a: (_ for _ in ()).throw(
        RuntimeError("CUDA error: an illegal memory access was encountered")))
    with pytest.raises(SystemExit):
        worker.run_video({})
    assert exits == [1]
    monkeypatch.setattr(actor, "process_video", lambda *a: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError):
        worker.run_video({})
    assert exits == [1]
    import torch

    assert not actor.is_cuda_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))


@pytest.mark.slow
def test_full_length_sweep_on_ray(ray_cluster, ref_davis, mevis_root, tmp_path):
    """The issue's sweep at full length: none / random / litelvlm x 576 / 196 / 81."""
    for dataset, root, split in (("ref-davis17", ref_davis, "valid"), ("mevis", mevis_root, "valid_u")):
        out = tmp_path / dataset
        argv = common(root, out, "--dataset", dataset, "--split", split, "--workers", "2")
        for m in ("none", "random", "litelvlm"):
            argv += ["--method", m]
        for b in ("576", "196", "81"):
            argv += ["--budget", b]
        assert bench(*argv) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["failed"] == 0 and len(summary["results"]) == 9
        for res in summary["results"].values():
            assert res["J&F"] is not None and res["frames"] == BLACKSWAN_FRAMES and not res["scored_partial"]


def test_one_sam2_pass_for_the_whole_sweep_matches_per_run_passes(blackswan_dir):
    """--sam2-pass video: every run's objects in one SAM2 session (image features once per frame for the
    whole sweep); each object's masks are those of the per-run passes (up to float rounding)."""
    from refstream.config import load_model_config
    from refstream.pipeline import Pipeline, SweepOptions

    pipe = Pipeline(load_model_config("tiny"), "cpu")
    calls = []
    hook = pipe.model.sam2.vision_encoder.register_forward_hook(  # frames encoded (batched by --sam2-chunk)
        lambda m, args, out: calls.append(args[0].shape[0]))
    out = {"run": {}, "video": {}}
    runs = [("none", 576), ("litelvlm", 81)]
    try:
        for mode in out:
            pipe.run_sweep(blackswan_dir, ["the black swan", "the water"], runs,
                           lambda r, pos, name, lg, mode=mode: out[mode].setdefault(r, []).append(lg),
                           options=SweepOptions(max_frames=3, sam2_pass=mode))
    finally:
        hook.remove()
    assert sum(calls) == 3 * 2 + 3  # per-run passes: 3 frames x 2 runs; one shared pass: 3 frames
    for r in range(2):
        for t in range(3):
            for i in range(2):
                a, b = out["run"][r][t][i], out["video"][r][t][i]
                assert ((a > 0) == (b > 0)).float().mean() > 0.999


def test_split_tasks_gives_every_worker_runs_of_a_single_video():
    from refstream.bench.runs import split_tasks

    runs = {f"m_{b}": ["m", b] for b in (1, 2, 3)}
    task = {"video": "v", "runs": runs, "units": [{"exp_id": "0", "text": "a", "combos": list(runs)},
                                                   {"exp_id": "1", "text": "b", "combos": ["m_3"]}]}
    parts = split_tasks([task], 2)
    assert len(parts) == 2 and sorted(c for p in parts for c in p["runs"]) == sorted(runs)
    pairs = sorted((u["exp_id"], c) for p in parts for u in p["units"] for c in u["combos"])
    assert pairs == [("0", "m_1"), ("0", "m_2"), ("0", "m_3"), ("1", "m_3")]
    assert all(set(u["combos"]) <= set(p["runs"]) and u["combos"] for p in parts for u in p["units"])
    assert split_tasks([task], 1) == [task]


def test_bench_run_refuses_bad_options_with_the_options_models_message(mevis_root, tmp_path, capsys):
    """bench run validates its sweep and each method x budget with refstream.options (the run's messages)."""
    for extra, words in ((["--budget", "0"], "--budget 0: must be an integer >= 1"),
                         (["--budget", "81", "--frames", "6"], "--frames 6: must be a positive multiple of 4"),
                         (["--budget", "81", "--method", "bogus"], "--method 'bogus': unknown pruning method")):
        code = bench(*common(mevis_root, tmp_path / "run", "--dataset", "mevis", "--split", "valid_u", "--method",
                             "none", *extra, "--workers", "0"))
        assert code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unreadable_unit_status_is_logged_and_the_unit_reruns(mevis_root, tmp_path, caplog):
    from refstream.bench.runs import BenchRun

    run = BenchRun({"dataset": "mevis", "root": str(mevis_root), "split": "valid_u", "model": "tiny",
                    "checkpoint": None, "videos": None, "placement": "pooled", "variant": "paper", "frames": 16,
                    "stride": 1, "max_frames": 4, "clip_text": "question", "answer": "forced", "clip_length": None},
                   ["none"], [576], tmp_path / "run", workers=0, progress=False)
    status = run.status_path("none_576", "blackswan", "0")
    status.parent.mkdir(parents=True)
    status.write_text("{not json")
    with caplog.at_level("WARNING", logger="refstream.bench"):
        assert run._done("none_576", "blackswan", "0") is False
    assert "unreadable unit status" in caplog.text and str(status) in caplog.text


# ------------------------------------------------------------------------------------------ protocols
def test_every_protocol_loads_and_cites_the_original_for_each_field(tmp_path, monkeypatch):
    from refstream.bench import protocol as protocols

    davis = protocols.load_protocol("ref-davis17")
    assert (davis.clip_length, davis.merge, davis.answer, davis.mask_threshold) == (64, "first-wins", "generate", 0.0)
    for name in ("mevis", "refytvos"):
        p = protocols.load_protocol(name)
        assert p.clip_length is None and p.merge is None and p.dataset == name
        assert all("L" in p.sources[f] for f in ("clip_length", "answer", "max_new_tokens"))  # file:line cited
    assert davis.record() == {"name": "videoglamm-ref-davis17", "clip_length": 64, "merge": "first-wins",
                              "answer": "generate", "seed": 0, "off_protocol": False}
    off = davis.record({"clip_length": None})
    assert off["off_protocol"] is True and off["clip_length"] is None
    assert off["overrides"] == {"clip_length": {"protocol": 64, "used": None}}
    # a protocol without a source for a field, or of the wrong shape, is refused naming the file
    (tmp_path / "protocols").mkdir()
    data = davis.model_dump()
    del data["sources"]["merge"]
    (tmp_path / "protocols" / "ref-davis17.yaml").write_text(json.dumps(data))
    monkeypatch.setattr(protocols, "protocol_dir", lambda: tmp_path / "protocols")
    with pytest.raises(ConfigError, match="ref-davis17.yaml is not a valid protocol.*missing: merge"):
        protocols.load_protocol("ref-davis17")
    with pytest.raises(ConfigError, match="no evaluation protocol for 'mevis'"):
        protocols.load_protocol("mevis")


def hundred_frame_ref_davis(ref_davis: Path, tmp_path: Path) -> Path:
    """The mini Ref-DAVIS-17 with blackswan played forward then backward: 100 frames, longer than one 64-frame
    clip (frames at 1/4 size to keep it quick)."""
    from PIL import Image

    root = tmp_path / "ref-davis-100"
    shutil.copytree(ref_davis, root, symlinks=False)
    for kind, ext in (("JPEGImages", "jpg"), ("Annotations_unsupervised", "png")):
        folder = root / "DAVIS" / kind / "480p" / "blackswan"
        frames = sorted(folder.glob(f"*.{ext}"))
        assert len(frames) == 50
        for i, src in enumerate(frames + frames[::-1]):
            image = Image.open(src)
            size = (image.width // 4, image.height // 4)
            image = image.resize(size, Image.NEAREST if ext == "png" else Image.BILINEAR)
            image.save(folder / f"{i:05d}.{ext}.tmp", format="PNG" if ext == "png" else "JPEG")
        for tmp in folder.glob("*.tmp"):
            tmp.rename(tmp.with_suffix(""))
    return root


def test_ref_davis_runs_in_64_frame_clips_by_its_protocol(ref_davis, tmp_path, capsys):
    """A 100-frame video: the protocol's 64-frame clips (2 clips, each its own answer and SAM2 state) give other
    masks than the whole video as one clip (the old default); leaving the protocol is warned and recorded."""
    root = hundred_frame_ref_davis(ref_davis, tmp_path)
    base = ["--dataset", "ref-davis17", "--method", "none", "--budget", "576", "--answer", "forced",
            "--workers", "0", "--no-score"]
    assert bench(*common(root, tmp_path / "clips", *base)) == 0
    assert bench(*common(root, tmp_path / "whole", *base, "--clip-length", "0")) == 0
    err = capsys.readouterr().err
    assert ("WARNING: bench run: --clip-length 0 (the whole video) (protocol: 64), --answer forced (protocol: "
            "generate) leaves the videoglamm-ref-davis17 protocol") in err
    clips = json.loads((tmp_path / "clips" / "results" / "none_576.json").read_text())
    whole = json.loads((tmp_path / "whole" / "results" / "none_576.json").read_text())
    assert clips["protocol"]["clip_length"] == 64 and clips["protocol"]["merge"] == "first-wins"
    assert clips["protocol"]["off_protocol"] is True  # --answer forced leaves it too (the protocol generates)
    assert set(clips["protocol"]["overrides"]) == {"answer"}
    assert set(whole["protocol"]["overrides"]) == {"answer", "clip_length"}
    unit = "blackswan/0_1"
    assert json.loads((tmp_path / "clips" / "status" / "none_576" / f"{unit}.json").read_text())["clips"] == 2
    assert json.loads((tmp_path / "whole" / "status" / "none_576" / f"{unit}.json").read_text())["clips"] == 1
    a = np.load(tmp_path / "clips" / "units" / "none_576" / f"{unit}.npz")["probs"]
    b = np.load(tmp_path / "whole" / "units" / "none_576" / f"{unit}.npz")["probs"]
    assert a.shape == b.shape == (100, 120, 213) and not np.array_equal(a[64:], b[64:])


def test_sampled_answers_are_seeded_and_recorded(mevis_root, tmp_path, capsys):
    argv = common(mevis_root, tmp_path / "run", "--dataset", "mevis", "--split", "valid_u", "--method", "none",
                  "--budget", "576", "--max-frames", "4", "--workers", "0", "--answer", "sample", "--seed", "3")
    assert bench(*argv) == 0
    assert "--answer sample (protocol: generate), --seed 3 (protocol: 0)" in capsys.readouterr().err
    result = json.loads((tmp_path / "run" / "results" / "none_576.json").read_text())
    assert result["answer"] == {"mode": "sample", "seed": 3, "max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0}
    assert result["protocol"]["name"] == "videoglamm-mevis" and result["protocol"]["seed"] == 3
    assert set(result["protocol"]["overrides"]) == {"answer", "seed"}
    texts = [json.loads(p.read_text())["answer"] for p in sorted((tmp_path / "run" / "status").rglob("*.json"))]
    assert bench(*argv) == 0  # resumed: nothing reruns
    assert bench(*common(mevis_root, tmp_path / "again", *argv[argv.index("--dataset"):])) == 0
    again = [json.loads(p.read_text())["answer"] for p in sorted((tmp_path / "again" / "status").rglob("*.json"))]
    assert texts == again and texts  # the same seed, the same sampled answers
