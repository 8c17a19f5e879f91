"""Tight face crops are accepted (MTCNN tries again on a padded frame), and every preprocessing option
that changes a shard's content changes its cache key, so a changed option rebuilds instead of reusing."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import cv2
import pytest

from preprocess.__main__ import build_parser, prepare
from preprocess.demo import make_demo_dataset
from preprocess.frames import SampleError
from preprocess.shards import PreprocessConfig, read_shards, shard_names
from preprocess.stages import FaceStage

from .conftest import REPO

# options that decide WHERE or HOW FAST, never WHAT a shard holds (the dataset's folder is its name)
NOT_CONTENT = {"help", "dataset", "root", "out", "annotations", "name", "workers", "shard_size", "gpu_per_actor", "force",
               "verbose"}
# for every other option, a value other than its default
OTHER_VALUE = {"flow": "tvl1", "working_size": "96", "output_size": "32", "normalize": "none", "face_margin": "0.2",
               "min_face_prob": "0.8", "face_pad": "0.5", "precropped": None, "classes": "surprise,positive,negative"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, subjects=2, samples_per_class=1, seed=3)


def tight_crop_manifest(demo_manifest, folder):
    """One demo pair cut to a tight face crop: the detector's box shrunk by 10 % on each side, enlarged
    3 x (a frame of about 270 x 220 px, as CASME II's Cropped/ release)."""
    import pandas as pd

    row = pd.read_csv(demo_manifest).iloc[0]
    onset = cv2.imread(str(demo_manifest.parent / row["onset_path"]))
    apex = cv2.imread(str(demo_manifest.parent / row["apex_path"]))
    stage = FaceStage(dataclasses.asdict(PreprocessConfig(face_pad=0)))
    x1, y1, x2, y2 = stage._detect(cv2.cvtColor(onset, cv2.COLOR_BGR2RGB))[0]  # MTCNN's own box, no margin
    w, h = x2 - x1, y2 - y1
    box = (slice(int(y1 + 0.1 * h), int(y2 - 0.1 * h)), slice(int(x1 + 0.1 * w), int(x2 - 0.1 * w)))
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in (("onset", onset), ("apex", apex)):
        cv2.imwrite(str(folder / f"{name}.png"), cv2.resize(img[box], None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC))
    manifest = folder / "tight.csv"
    manifest.write_text(f"subject,sample_id,onset_path,apex_path,label\np1,a,onset.png,apex.png,{row['label']}\n")
    return manifest


def test_a_tight_crop_is_found_on_the_padded_frame_and_faces_as_they_are_directly(demo, tmp_path):
    import pandas as pd

    manifest = tight_crop_manifest(demo, tmp_path / "tight")
    onset = cv2.cvtColor(cv2.imread(str(tmp_path / "tight" / "onset.png")), cv2.COLOR_BGR2RGB)
    with pytest.raises(SampleError, match="no_face"):  # without context around it MTCNN finds no face
        FaceStage(dataclasses.asdict(PreprocessConfig(face_pad=0))).face_box(onset)
    box, source = FaceStage(dataclasses.asdict(PreprocessConfig())).face_box(onset)
    assert source == "mtcnn_padded" and box[2] - box[0] > 0.8 * onset.shape[1]  # about the whole crop, clipped
    row = pd.read_csv(demo).iloc[1]
    whole = cv2.cvtColor(cv2.imread(str(demo.parent / row["onset_path"])), cv2.COLOR_BGR2RGB)
    assert FaceStage(dataclasses.asdict(PreprocessConfig())).face_box(whole)[1] == "mtcnn"
    # through the command: accepted, and the summary says which samples needed the padding
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "preprocess", "--dataset", "manifest", "--root", str(manifest), "--out", str(out),
           "--classes", "negative"]  # one sample: its class is listed, as a class of one subject must be
    env = {**__import__("os").environ}  # the tests' shared Ray (conftest)
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "1 accepted" in res.stdout, res.stdout + res.stderr
    assert "1  face found only on the frame padded by 0.25" in res.stdout, res.stdout
    (folder,) = [p for p in (out / "tight").iterdir() if p.is_dir()]
    df, _, mf = read_shards(folder)
    assert df["face_source"].tolist() == ["mtcnn_padded"] and mf["face_sources"] == {"mtcnn_padded": 1}
    # without the second try it fails, and the message says what to try
    res = subprocess.run([*cmd, "--face-pad", "0"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2 and "no_face" in res.stderr and "--precropped" in res.stderr, res.stderr[-2000:]
    # the same manifest again, now --precropped, into the same --out: a new shard, not the old one reused
    res = subprocess.run([*cmd, "--precropped"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "finished earlier, reused" not in res.stdout and "1 written, 0 reused" in res.stdout, res.stdout
    df, _, _ = read_shards(folder)
    assert df["face_source"].tolist() == ["precropped"]


def test_every_content_option_changes_the_shard_cache_key(demo, tmp_path):
    """Each option of `python -m preprocess` either changes the shards' cache key or is listed as not
    touching their content; an option added later that is in neither list fails here."""
    parser = build_parser()
    base_argv = ["--dataset", "manifest", "--root", str(demo), "--out", str(tmp_path)]

    def keys(extra):
        adapted, _, cfg = prepare(parser.parse_args(base_argv + extra))
        return shard_names(adapted, cfg)

    base = keys([])
    options = [a for a in parser._actions if a.dest != "help"]
    unknown = [a.dest for a in options if a.dest not in NOT_CONTENT and a.dest not in OTHER_VALUE]
    assert not unknown, f"say whether {unknown} change a shard's content (OTHER_VALUE) or not (NOT_CONTENT)"
    for a in options:
        if a.dest in NOT_CONTENT:
            continue
        flag = a.option_strings[0]
        extra = [flag] if isinstance(a, argparse._StoreTrueAction) else [flag, OTHER_VALUE[a.dest]]
        assert keys(extra) != base, f"{flag} does not change the shard cache key"
    assert keys(["--workers", "1"]) == base and keys(["--force"]) == base  # where and how fast: the same shards


def test_the_flow_stage_recovers_the_demos_known_motion(capsys):
    """benchmarks/flow_accuracy.py: the face + flow stages on motions whose every pixel is known."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flow_accuracy", REPO / "benchmarks" / "flow_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--subjects", "1", "--samples", "2"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.split() and ln.split()[0] in
            ("negative", "positive", "surprise")]
    assert sorted((r[0], r[1]) for r in rows) == sorted((c, a) for c in ("negative", "positive", "surprise")
                                                        for a in ("farneback", "tvl1"))  # both algorithms
    for r in rows:
        angle, ratio = float(r[4]), float(r[8])
        assert angle < 30 and 0.6 < ratio < 1.4, r  # the right direction and about the right size
