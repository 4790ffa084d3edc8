"""Refer-YouTube-VOS: the valid split reader and submission helpers (scored only by the server).

Layout (as downloaded from the challenge and used by ReferFormer / OnlineRefer)::

    ROOT/meta_expressions/valid/meta_expressions.json   {"videos": {vid: {"expressions": {exp_id: {"exp": str}},
                                                                         "frames": [frame, ...]}}}
    ROOT/meta_expressions/test/meta_expressions.json    (optional) the test videos
    ROOT/valid/JPEGImages/<vid>/<frame>.jpg

The valid ``meta_expressions.json`` lists 507 videos: the YouTube-VOS 2019 valid videos, which the
challenge split into the 202 Refer-YouTube-VOS *valid* videos and 305 *test* videos. ReferFormer
(github wjn922/ReferFormer @ 06fc218f, ``inference_ytvos.py``) and OnlineRefer (wudongming97/OnlineRefer)
derive the valid split as the valid meta's videos minus those of ``meta_expressions/test/
meta_expressions.json`` and assert 202. The test meta file is not available on this machine, so
:data:`VALID_VIDEOS` embeds the 202 ids: two independent public repositories that hard-code the list
give the same 202 ids, all of them in the 507 of the valid meta (``examples/refytvos/
valid_meta_expressions.json``), with 834 expressions, the published size of the valid split. When the
test meta file is present, :meth:`RefYTVOS.valid_videos` derives the split from it as ReferFormer does
and checks it against :data:`VALID_VIDEOS`.

Submission: ``Annotations/<vid>/<exp_id>/<frame>.png`` (0/255 grayscale, every listed frame of every
valid expression) zipped; the server's formula is not public (assumed MeViS-style per-expression means).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from refstream_errors import DatasetLayoutError

LAYOUT = (
    "ROOT/meta_expressions/valid/meta_expressions.json ({\"videos\": {vid: {\"expressions\": {exp_id: "
    "{\"exp\": str}}, \"frames\": [..]}}}), optionally ROOT/meta_expressions/test/meta_expressions.json, and "
    "ROOT/valid/JPEGImages/<vid>/<frame>.jpg; or the path of a valid meta_expressions.json itself"
)
VALID_VIDEO_COUNT = 202
VALID_EXPRESSION_COUNT = 834
# the 202 Refer-YouTube-VOS valid videos (sorted; sha256 of "\n".join = 2ad9ced87f0f1ae7...)
VALID_VIDEOS = (
    '0062f687f1', '01c88b5b60', '0390fabe58', '03fe6115d4', '0620b43a31', '06a5dfb511', '06cd94d38d',
    '0723d7d4fe', '0782a6df7e', '0788b4033d', '0a598e18a8', '0b0c90e21a', '0c04834d61', '0daaddc9da',
    '0e8a6b63bb', '0f3f8b2b2f', '1335b16cf9', '13c3cea202', '13ca7bbcfd', '152fe4902a', '17cba76927',
    '182dbfd6ba', '188cb4e03d', '19cde15c4b', '1a1dbe153e', '1a609fa7ee', '1a894a8f98', '1ab5f4bbc5',
    '1e0257109e', '1e20ceafae', '1f390d22ea', '20a93b4c54', '218ac81c2d', '226f1e10f7', '246e38963b',
    '257f7fd5b8', '29c06df0f2', '2b904b76c9', '30fe0ed0ce', '31d3a7d2ee', '31e0beaf99', '332dabe378',
    '335fc10235', '33c8dcbe09', '33e8066265', '34564d26d8', '352ad66724', '35948a7fca', '35d5e5149d',
    '3674b2c70a', '369919ef49', '37b4ec2e1a', '39b7491321', '39bce09d8d', '3b72dc1941', '3be852ed44',
    '3dd327ab4e', '3e03f623bb', '3f4bacb16a', '4037d8305d', '411774e9ff', '4307020e0f', '43115c42b2',
    '44e5d1a969', '450bd2e238', '45dc90f558', '466734bc5c', '47d01d34c8', '48d2909d9e', '4b783f1fc5',
    '4ee0105885', '4f5b3310e3', '4f6662e4e0', '4fe6619a47', '541ccb0844', '54526e3c66', '5460cc540a',
    '547416bda1', '559a611d86', '5d2020eff8', '6031809500', '60362df585', '61fca8cbf1', '621487be65',
    '623d24ce2b', '62bf7630b3', '63883da4f5', '64c6f2ed76', '65350fd60a', '65e0640a2a', '68dab8f80c',
    '696e01387c', '69c0f7494e', '6a75316e99', '6cb5b08d93', '6cc8bce61a', '72d613f21a', '749f1abdf9',
    '7741a0fbce', '7775043b5e', '77df215672', '7836afc0c2', '7a19a80b19', '7a72130f21', '7daa6343e6',
    '7f26b553ae', '822c31928a', '8273b59141', '853ca85618', '85968ae408', '8939473ea7', '8b7b57b94d',
    '8c60938d92', '8d803e87f7', '8dea7458de', '8e2e5af6a8', '92fde455eb', '94fa9bd3b5', '975be70866',
    '9787f452bf', '97b38cabcc', '9a38b8e463', '9c0b55cae5', '9ce299a510', '9da2156a73', '9f16d17e42',
    '9f21474aca', '9f429af409', '9fd2d2782b', 'a00c3fa88e', 'a0fc95d8fc', 'a1251195e7', 'a2948d4116',
    'a46012c642', 'a4bce691c6', 'a7462d6aaf', 'a806e58451', 'a9f23c9150', 'ab9a7583f1', 'abae1ce57d',
    'aceb34fcbe', 'b00ff71889', 'b05faf54f7', 'b205d868e6', 'b2256e265c', 'b3b92781d9', 'b5514f75d8',
    'b58a97176b', 'b772ac822a', 'b7928ea5c0', 'b7b7e52e02', 'b83923fd72', 'b90f8c11db', 'ba8823f2d2',
    'bc9ba8917e', 'bf2d38aefe', 'bf4cc89b18', 'c16d9a4ade', 'c280d21988', 'c2bbd6d121', 'c42fdedcdd',
    'c74fc37224', 'c9ef04fe59', 'cb06f84b6e', 'cbea8f6bea', 'cc1a82ac2a', 'cc7c3138ff', 'cd69993923',
    'cd896a9bee', 'cdcfd9f93a', 'd1ac0d8b81', 'd1dd586cfd', 'd59c093632', 'd69812339e', 'd7a38bf258',
    'd7ff44ea97', 'd975e5f4a9', 'dab44991de', 'dc197289ef', 'dce363032d', 'dea0160a12', 'deed0ab4fc',
    'e027ebc228', 'e10236eb37', 'e11254d3b9', 'e633eec195', 'eb263ef128', 'eb49ce8027', 'ebe7138e58',
    'ee9415c553', 'eea1a45e49', 'eeb18f9d47', 'f054e28786', 'f143fede6f', 'f2a45acf1c', 'f3678388a7',
    'f39c805b54', 'f7255a57d0', 'f7d7fb16d0', 'fb104c286f', 'fd8cf868b2', 'fef7e84268',
)


def _load_meta(path: Path) -> dict:
    try:
        videos = json.loads(path.read_text())["videos"]
        for info in videos.values():
            info["expressions"], info["frames"]  # noqa: B018 - presence check
        return videos
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetLayoutError(f"{path}: not a Refer-YouTube-VOS meta_expressions.json ({exc!r}). "
                                 f"Expected {LAYOUT}.") from exc


class RefYTVOS:
    """Refer-YouTube-VOS valid expressions (see the module docstring).

    Args:
        root: the dataset root, or the path of the valid ``meta_expressions.json``.
        test_meta: optional path of the test ``meta_expressions.json`` (default: the one under ``root``).

    Raises:
        DatasetLayoutError: the layout is wrong (the message shows the expected one).
    """

    def __init__(self, root: str | Path, test_meta: str | Path | None = None):
        root = Path(root)
        if root.is_file():
            self.root, self.meta_path = root.parent, root
        else:
            self.root = root
            self.meta_path = root / "meta_expressions" / "valid" / "meta_expressions.json"
            if not self.meta_path.is_file():
                raise DatasetLayoutError(f"{root}: meta_expressions/valid/meta_expressions.json not found. "
                                         f"Expected {LAYOUT}.")
            if test_meta is None and (root / "meta_expressions" / "test" / "meta_expressions.json").is_file():
                test_meta = root / "meta_expressions" / "test" / "meta_expressions.json"
        self.meta = _load_meta(self.meta_path)
        self.test_meta_path = Path(test_meta) if test_meta is not None else None
        self.images = self.root / "valid" / "JPEGImages"

    def valid_videos(self) -> list[str]:
        """The 202 valid videos, sorted: valid meta minus test meta when the test meta is available,
        else :data:`VALID_VIDEOS`.

        Raises:
            DatasetLayoutError: the meta file does not hold the valid videos, or the derived split is not
                the known 202.
        """
        if self.test_meta_path is not None:
            test = set(_load_meta(self.test_meta_path))
            videos = sorted(set(self.meta) - test)
            if videos != sorted(VALID_VIDEOS):
                raise DatasetLayoutError(
                    f"{self.meta_path} minus {self.test_meta_path} gives {len(videos)} videos, not the "
                    f"{VALID_VIDEO_COUNT} Refer-YouTube-VOS valid videos")
            return videos
        absent = [v for v in VALID_VIDEOS if v not in self.meta]
        if absent:
            raise DatasetLayoutError(
                f"{self.meta_path}: {len(absent)} of the {VALID_VIDEO_COUNT} valid videos are not listed "
                f"(e.g. {', '.join(absent[:5])}); give the valid meta_expressions.json (507 videos). Expected {LAYOUT}.")
        return sorted(VALID_VIDEOS)

    def test_videos(self) -> list[str]:
        """Videos of the valid meta that are not valid videos (the 305 test videos for the full file)."""
        valid = set(self.valid_videos())
        return sorted(v for v in self.meta if v not in valid)

    def frames(self, video: str) -> list[str]:
        return list(self.meta[video]["frames"])

    def expressions(self, video: str) -> dict[str, dict]:
        """``{exp_id: {"exp": str}}`` of a video."""
        return dict(self.meta[video]["expressions"])

    def items(self) -> list[tuple[str, str, str]]:
        """``(video, exp_id, expression)`` of every valid expression, videos sorted, meta order within."""
        return [(v, e, info["exp"]) for v in self.valid_videos() for e, info in self.expressions(v).items()]


def missing_submission_frames(dataset: RefYTVOS, annotations: str | Path) -> list[str]:
    """Files (relative to ``annotations`` = the submission's ``Annotations`` folder) the server expects
    and that are missing: ``<vid>/<exp_id>/<frame>.png`` for every valid expression and listed frame."""
    annotations = Path(annotations)
    missing = []
    for vid in dataset.valid_videos():
        for exp_id in dataset.expressions(vid):
            folder = annotations / vid / exp_id
            present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
            missing.extend(f"{vid}/{exp_id}/{f}.png" for f in dataset.frames(vid) if f"{f}.png" not in present)
    return missing


def make_submission_zip(dataset: RefYTVOS, annotations: str | Path, out_zip: str | Path) -> Path:
    """Zip ``annotations`` (``<vid>/<exp_id>/<frame>.png``) as ``Annotations/...`` for the server.

    Raises:
        DatasetLayoutError: files are missing (the message lists them).
    """
    annotations, out_zip = Path(annotations), Path(out_zip)
    missing = missing_submission_frames(dataset, annotations)
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise DatasetLayoutError(f"{annotations}: {len(missing)} submission frame(s) missing: {shown}")
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for vid in dataset.valid_videos():
            for exp_id in dataset.expressions(vid):
                for frame in dataset.frames(vid):
                    path = annotations / vid / exp_id / f"{frame}.png"
                    zf.write(path, f"Annotations/{vid}/{exp_id}/{frame}.png")
    return out_zip
