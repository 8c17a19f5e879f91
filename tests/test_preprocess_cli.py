"""The public command `python -m preprocess` on real input and on every kind of bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from preprocess.__main__ import main
from preprocess.demo import make_demo_dataset
from preprocess.pipeline import read_shards

from .conftest import REPO


@pytest.fixture
def ray_local(ray_head):
    """This process joined to the tests' shared Ray (conftest's ``ray_head``), as ``init_ray`` joins it."""
    from preprocess.runtime import init_ray

    init_ray()
    yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, subjects=2, samples_per_class=1, seed=3)


def test_megc2019_composite_through_the_command(composite_root, tmp_path):
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "preprocess", "--dataset", "megc2019", "--root", str(composite_root), "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "442 accepted, 0 rejected" in res.stdout and "negative: 250, positive: 109, surprise: 83" in res.stdout
    (folder,) = (out / "megc2019").iterdir()
    df, flows, manifest = read_shards(folder)
    assert flows.shape == (442, 28, 28, 3) and flows.dtype == np.float32
    assert df["subject"].nunique() == 68 and df["cde_label"].value_counts().to_dict() == {0: 250, 1: 109, 2: 83}
    assert manifest["flow_channels"] == ["u", "v", "strain"] and "torch" in manifest["versions"]
    # u, v, strain in the right channels: R, G, B of the published image (PIL order, not OpenCV's)
    row = df.index[(df["subject"] == "006") & (df["sample_id"] == "006_1_2")][0]
    png = np.asarray(Image.open(composite_root / "flow" / "006_006_1_2 .png"), dtype=np.float32) / 255
    np.testing.assert_array_equal(flows[row], png)
    import pyarrow.parquet as pq

    meta = pq.read_schema(next(folder.glob("shard-*/*.parquet"))).metadata
    assert b"epir.preprocess" in meta and b"versions" in meta[b"epir.preprocess"]


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return str(path)


def test_every_bad_input_is_rejected_with_its_reason(ray_local, demo, tmp_path, capsys):
    good = pd.read_csv(demo)
    d = demo.parent
    onset0 = cv2.imread(str(d / good["onset_path"][0]))
    bad = [
        dict(subject="x1", sample_id="missing", onset_path="nowhere/onset.png", apex_path="nowhere/apex.png", label="positive"),
        dict(subject="x1", sample_id="unreadable", onset_path="broken.png", apex_path="broken.png", label="positive"),
        dict(subject="x1", sample_id="sizes", onset_path=good["onset_path"][0],
             apex_path=_write(d / "half.png", cv2.resize(onset0, (100, 120))), label="negative"),
        dict(subject="x2", sample_id="noface", onset_path=_write(d / "blank.png", np.full((240, 200, 3), 90, np.uint8)),
             apex_path=str(d / "blank.png"), label="surprise"),
        dict(subject="x2", sample_id="contempt", onset_path=good["onset_path"][1], apex_path=good["apex_path"][1],
             label="contempt"),
        dict(good.iloc[2]),  # the same subject and sample id again
    ]
    (d / "broken.png").write_bytes(b"this is not an image")
    man = d / "lab.csv"
    pd.concat([good, pd.DataFrame(bad)], ignore_index=True).to_csv(man, index=False)
    out = tmp_path / "out"
    args = ["--dataset", "manifest", "--root", str(man), "--out", str(out), "--classes", "negative,positive,surprise"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "lab: 6 accepted, 6 rejected" in text
    (folder,) = (out / "lab").iterdir()
    rej = pd.read_csv(folder / "rejects.csv")
    assert dict(zip(rej["sample_id"], rej["reason"])) == {
        "missing": "missing_frame", "unreadable": "unreadable_frame", "sizes": "size_mismatch",
        "noface": "no_face", "contempt": "label_outside_mapping", good["sample_id"][2]: "duplicate_sample_id"}
    for reason in ("missing_frame", "unreadable_frame", "size_mismatch", "no_face", "label_outside_mapping",
                   "duplicate_sample_id"):
        assert reason in text  # the summary counts every reason
    df, flows, manifest = read_shards(folder)
    assert sorted(df["sample_id"]) == sorted(good["sample_id"]) and flows.shape == (6, 28, 28, 3)
    assert manifest["rejected"] == 6 and manifest["classes"]["sde"] == ["negative", "positive", "surprise"]

    # a re-run reuses the finished shard; a half-written staging folder is never read and is cleaned
    stale = folder / ".staging-shard-00000-deadbeef-1"
    stale.mkdir()
    shutil.copy(next(folder.glob("shard-*/*.parquet")), stale / "part.parquet")
    assert len(read_shards(folder)[0]) == 6
    assert main(args) == 0
    assert "finished earlier, reused" in capsys.readouterr().out and not stale.exists()
    (folder / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished"):
        read_shards(folder)


def test_casme2_layout_apex_rules_through_the_command(ray_local, demo, tmp_path, capsys):
    good = pd.read_csv(demo)
    root = tmp_path / "casme2"
    for subject, clip, row in (("sub01", "EP01", 0), ("sub01", "EP02", 1), ("sub02", "EP03", 2)):
        onset = cv2.imread(str(demo.parent / good["onset_path"][row]))
        apex = cv2.imread(str(demo.parent / good["apex_path"][row]))
        for n in range(1, 6):
            _write(root / "CASME2_RAW_selected" / subject / clip / f"img{n}.jpg", onset if n == 1 else apex)
    pd.DataFrame({
        "Subject": [1, 1, 2], "Filename": ["EP01", "EP02", "EP03"], "OnsetFrame": [1, 1, 1],
        "ApexFrame": [3, 9, "/"], "OffsetFrame": [5, 10, 5], "Action Units": ["12", "4", "1+2"],
        "Estimated Emotion": ["happiness", "disgust", "surprise"],
    }).to_excel(root / "CASME2-coding-test.xlsx", index=False)
    assert main(["--dataset", "casme2", "--root", str(root), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "2 accepted, 1 rejected" in text and "frame_outside_clip" in text and "repaired" in text
    (folder,) = (tmp_path / "o" / "casme2").iterdir()
    rej = pd.read_csv(folder / "rejects.csv")
    assert rej["sample_id"].tolist() == ["EP02"] and "not in the clip's frames 1..5" in rej["detail"][0]
    df, _, _ = read_shards(folder)
    assert df.set_index("sample_id").loc["EP03", "apex_frame"] == 3 and (df["face_source"] == "mtcnn").all()


def test_clear_failure_for_a_wrong_root_or_no_survivor(ray_local, tmp_path, capsys):
    assert main(["--dataset", "samm", "--root", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--dataset", "casme2", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither CASME2_RAW_selected" in capsys.readouterr().err
    man = tmp_path / "m.csv"
    pd.DataFrame([dict(subject="a", sample_id="1", onset_path="x.png", apex_path="y.png", label="positive")]).to_csv(man, index=False)
    assert main(["--dataset", "manifest", "--root", str(man), "--out", str(tmp_path / "o"), "--classes", "positive"]) == 2
    assert "no sample of m survived" in capsys.readouterr().err
