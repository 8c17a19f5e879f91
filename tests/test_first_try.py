"""A researcher's first try with their own data: what the grid infers, refuses and says (no Ray here)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from grid.cells import Cell
from grid.cli import apply_classes, build_parser, make_config
from grid.config import DatasetSpec, GridConfig
from grid.data import label_support
from grid.runner import GridOutcome, summary_table
from preprocess.adapters import DatasetError, manifest
from preprocess.pipeline import PreprocessConfig, shard_names


def _csv(tmp_path, labels, subjects=None):
    subjects = subjects or [f"sub{i // 3}" for i in range(len(labels))]
    df = pd.DataFrame({"subject": subjects, "sample_id": [f"e{i}" for i in range(len(labels))],
                       "onset_path": [f"f/{i}_on.png" for i in range(len(labels))],
                       "apex_path": [f"f/{i}_ap.png" for i in range(len(labels))], "label": labels})
    path = tmp_path / "mylab.csv"
    df.to_csv(path, index=False)
    return path


def test_a_manifest_runs_the_protocols_its_labels_allow():
    sde_only = pd.DataFrame({"subject": ["a", "b", "c"], "sde_label": [0, 1, 0], "cde_label": [pd.NA] * 3})
    support = label_support(sde_only, {"sde": ["x", "y"], "cde": ["negative", "positive", "surprise"]})
    assert support["SDE"] is None and support["CDE"] == "no sample has a CDE label"
    one = pd.DataFrame({"subject": ["a", "a"], "sde_label": [0, 1], "cde_label": [0, 1]})
    assert "LOSO needs two" in label_support(one, {"sde": ["x", "y"], "cde": ["x", "y"]})["SDE"]


def test_a_class_only_one_subject_has_is_refused_as_a_typo_unless_the_classes_are_listed(tmp_path):
    labels = ["positive", "negative", "surprise"] * 3 + ["postive"]
    path = _csv(tmp_path, labels)
    with pytest.raises(DatasetError) as e:
        manifest(path)
    msg = str(e.value)
    assert "class 'postive' is held by one subject only (sub3; CSV line(s) 11)" in msg and "--classes" in msg
    kept = manifest(path, classes=["negative", "positive", "postive", "surprise"])  # listed: kept on purpose
    assert kept.classes["sde"] == ["negative", "positive", "postive", "surprise"]
    fine = manifest(_csv(tmp_path, ["positive", "negative", "surprise"] * 3))
    assert fine.classes["sde"] == ["negative", "positive", "surprise"]


def test_the_grid_takes_classes_per_dataset(tmp_path):
    args = build_parser().parse_args(["--dataset", f"manifest={tmp_path / 'a.csv'}:SDE",
                                      "--classes", "negative,positive,surprise"])
    cfg = make_config(args)
    assert cfg.datasets[0].options["classes"] == ["negative", "positive", "surprise"]
    two = [DatasetSpec("manifest", tmp_path / "a.csv", name="a"), DatasetSpec("casme2", tmp_path)]
    with pytest.raises(ValueError, match="say which"):
        apply_classes(two, ["x,y"])
    apply_classes(two, ["a=x,y"])
    assert two[0].options["classes"] == ["x", "y"] and "classes" not in two[1].options
    with pytest.raises(ValueError, match="no configured dataset named 'b'"):
        apply_classes(two, ["b=x,y"])


def test_a_refused_setting_names_the_check_and_where_each_value_came_from():
    with pytest.raises(ValueError) as e:
        GridConfig(presets=["baseline"], profile="cpu", overrides={"epochs": 2, "translate": -1})
    lines = str(e.value).splitlines()
    assert "preset baseline under profile cpu: warmup_epochs=3 (from the cpu profile) must lie in 0..epochs-1 with " \
           "epochs=2 (from --set / overrides)" in lines
    assert "preset baseline under profile cpu: translate=-1 (from --set / overrides) must be >= 0" in lines
    assert len(lines) == 2


def test_a_partial_grid_trains_no_final_model_unless_asked():
    assert GridConfig(datasets=[DatasetSpec("casme2", ".")]).trains_final_models
    assert not GridConfig(datasets=[DatasetSpec("casme2", ".")], folds=2).trains_final_models
    assert GridConfig(datasets=[DatasetSpec("casme2", ".")], folds=2, final_model=True).trains_final_models
    assert not GridConfig(demo=True).trains_final_models


def test_the_shard_cache_key_does_not_depend_on_how_a_path_is_spelled(tmp_path, monkeypatch):
    from preprocess.demo import make_demo_dataset

    csv = make_demo_dataset(tmp_path / "demo", subjects=2, samples_per_class=1)
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(csv, tmp_path / "demo" / "..")
    names = [shard_names(manifest(p), PreprocessConfig()) for p in (csv, relative, tmp_path / "demo" / ".." / relative)]
    assert names[0] == names[1] == names[2]


def test_the_shard_cache_key_follows_the_files_contents_not_their_folder(composite_root, tmp_path):
    import shutil

    import cv2

    from preprocess.adapters import megc2019

    def names(root):
        return shard_names(megc2019(root), PreprocessConfig(), precomputed=True)

    copy = tmp_path / "moved" / "composite"
    shutil.copytree(composite_root, copy)
    assert names(copy) == names(composite_root)  # a moved dataset folder reuses its shards
    png = sorted((copy / "flow").iterdir())[0]
    img = cv2.imread(str(png))
    img[0, 0, 0] ^= 1  # re-exported in place with one value changed
    assert cv2.imwrite(str(png), img)
    assert names(copy) != names(composite_root)


def _cell(name, protocol, subjects, total, preset="epir"):
    return Cell(cell_id=name, name=name, dataset="toy", protocol=protocol, preset=preset, profile="cpu",
                data_key=f"toy/{protocol}", config_id="c", classes=["a", "b"], model={}, recipe={"seed": 0},
                subjects=subjects, all_subjects=total)


def test_the_console_summary_marks_partial_cells_and_shows_published_figures_only_for_cde():
    full, part = _cell("CDE toy epir", "CDE", ["s1", "s2"], 2), _cell("CDE toy baseline", "CDE", ["s1"], 2, "baseline")
    sde = _cell("SDE toy epir", "SDE", ["s1", "s2"], 2)
    score = {"all": {"uf1": 0.5, "uar": 0.5}}
    text = summary_table(GridOutcome([full, part], scores={c.cell_id: score for c in (full, part)}))
    assert "published (CDE Full)" in text and "0.8852 / 0.8944" in text
    assert "1/2" in text and "PARTIAL" in text.splitlines()[2] and "0.7325" not in text  # no paper figure beside a part
    peer = _cell("CDE toy sssnet", "CDE", ["s1", "s2"], 2, "sssnet")  # a figure published with UF1 only
    assert "0.7390 / -" in summary_table(GridOutcome([peer], scores={peer.cell_id: score}))
    only_sde = summary_table(GridOutcome([sde], scores={sde.cell_id: score}))
    assert "published" not in only_sde and "PARTIAL" not in only_sde


def test_a_rejected_predict_pair_says_both_sizes_and_the_path(tmp_path):
    import cv2

    from grid.predict import flows_for

    cv2.imwrite(str(tmp_path / "on.png"), np.zeros((40, 60, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "ap.png"), np.zeros((30, 50, 3), np.uint8))
    pairs = pd.DataFrame([{"sample_id": "p1", "onset_path": str(tmp_path / "on.png"), "apex_path": str(tmp_path / "ap.png")},
                          {"sample_id": "p2", "onset_path": str(tmp_path / "on.png"), "apex_path": str(tmp_path / "no.png")}])
    _, table = flows_for(pairs, PreprocessConfig(), precropped=True)
    size, missing = table.set_index("sample_id").loc["p1"], table.set_index("sample_id").loc["p2"]
    assert size["reason"] == "size_mismatch" and "60x40 px" in size["detail"] and "50x30 px" in size["detail"]
    assert missing["reason"] == "missing_frame" and str(tmp_path / "no.png") in missing["detail"]


def test_the_console_is_quiet_through_the_libraries_own_settings_unless_verbose():
    import subprocess
    import sys

    probe = ("import json, logging, os, sys; from preprocess.runtime import quiet_libraries; quiet_libraries({v}); "
             "print(json.dumps({{'env': {{k: os.environ.get(k) for k in ('RAY_BACKEND_LOG_LEVEL', 'RAY_AIR_NEW_OUTPUT', "
             "'TUNE_WARN_THRESHOLD_S', 'MLFLOW_LOGGING_LEVEL')}}, 'levels': {{n: logging.getLogger(n).level for n in "
             "('ray', 'ray.data', 'ray.tune', 'mlflow')}}}}))")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_BACKEND_LOG_LEVEL", "RAY_AIR_NEW_OUTPUT",
                                                            "TUNE_WARN_THRESHOLD_S", "MLFLOW_LOGGING_LEVEL")}
    import json

    quiet = json.loads(subprocess.run([sys.executable, "-c", probe.format(v=False)], env=env, capture_output=True,
                                      text=True, check=True).stdout)
    # Ray's C++ core workers (the red core_worker.cc lines) only print FATAL; Tune's old quiet reporter; MLflow errors only
    assert quiet["env"] == {"RAY_BACKEND_LOG_LEVEL": "fatal", "RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_THRESHOLD_S": "60",
                            "MLFLOW_LOGGING_LEVEL": "ERROR"}
    assert set(quiet["levels"].values()) == {40}
    loud = json.loads(subprocess.run([sys.executable, "-c", probe.format(v=True)], env=env, capture_output=True,
                                     text=True, check=True).stdout)
    assert set(loud["env"].values()) == {None} and set(loud["levels"].values()) == {0}
    mine = json.loads(subprocess.run([sys.executable, "-c", probe.format(v=False)],
                                     env={**env, "RAY_BACKEND_LOG_LEVEL": "info"}, capture_output=True, text=True,
                                     check=True).stdout)
    assert mine["env"]["RAY_BACKEND_LOG_LEVEL"] == "info"  # a setting the user made is kept
    assert build_parser().parse_args(["-v"]).verbose
