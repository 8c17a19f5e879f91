"""The Optuna search: no leakage from a fold's test subject, resources that fit or a clear refusal, and
`python grid/run_all.py search` on a manifest dataset (resumed, extended, best configuration fed to a
grid run, every trial an MLflow run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grid.data import ProtocolData
from grid.runner import check_fit
from grid.search import _fold_task, inner_fold, validation_subjects
from preprocess.demo import make_demo_dataset

from .conftest import run_grid_cli

TINY_MODEL = dict(img_size=28, in_chans=3, patch_size=7, num_classes=3, dim=8, depth=3, heads=3, dim_head=3,
                  mlp_ratio=2.0, tokenizer="dnspt", itals=True, temperature=2.0, dtsm=True, integration_blocks=1,
                  merge_k=1, contrastive=True, alpha=0.4)
TINY_RECIPE = dict(epochs=2, batch_size=16, lr=1e-3, device="cpu")


def _data(seed=0) -> ProtocolData:
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"p{i}" for i in range(6)], 8)
    return ProtocolData("toy/SDE", "toy", "SDE", "x", rng.random((48, 28, 28, 3), dtype=np.float32),
                        rng.integers(0, 3, 48), subjects, np.array([f"s{i}" for i in range(48)]),
                        np.array(["toy"] * 48), ["a", "b", "c"], "unit")


def test_validation_subjects_come_from_the_training_subjects_only():
    train = [f"p{i}" for i in range(10)]
    for test in ("p3", "q9"):
        val = validation_subjects(train + [test], test, 0.2, seed=0)
        assert test not in val and set(val) <= set(train) and len(val) == 2
        assert val == validation_subjects(train + [test], test, 0.2, seed=0)  # a re-run repeats
    assert len({tuple(validation_subjects(train, f"p{i}", 0.3, 0)) for i in range(10)}) > 1  # folds differ
    with pytest.raises(ValueError):
        validation_subjects(["p1", "p2"], "p1", 0.5, 0)


def test_a_fold_score_never_depends_on_its_test_subject():
    data = _data()
    base = _fold_task(data, "p2", TINY_MODEL, TINY_RECIPE, 0.25, 0, 1)
    assert "p2" not in base["val_subjects"] and len(base["y_true"]) == 8 * len(base["val_subjects"])
    # scramble the test subject's flows and labels: the fold's validation result is the same
    other = _data()
    test = other.subjects == "p2"
    other.flows[test] = np.random.default_rng(9).random(other.flows[test].shape, dtype=np.float32)
    other.labels[test] = (other.labels[test] + 1) % 3
    again = _fold_task(other, "p2", TINY_MODEL, TINY_RECIPE, 0.25, 0, 1)
    assert again["y_pred"] == base["y_pred"] and again["val_subjects"] == base["val_subjects"]
    with pytest.raises(ValueError, match="test subject"):
        inner_fold(data.flows, data.labels, data.subjects, "p2", TINY_MODEL, TINY_RECIPE, 0.25, 0)


def test_trial_resources_must_fit_the_cluster():
    nodes = [{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}]
    check_fit(nodes, [{}, {"CPU": 1}, {"CPU": 1}, {"CPU": 1}])
    check_fit(nodes, [{}, {"CPU": 1, "GPU": 0.5}, {"CPU": 1}])
    with pytest.raises(ValueError, match="reserves 4 CPU"):
        check_fit(nodes, [{}] + [{"CPU": 1}] * 4)
    with pytest.raises(ValueError, match="GPU"):
        check_fit(nodes, [{}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}])
    with pytest.raises(ValueError, match="no node"):
        check_fit(nodes, [{}, {"CPU": 3}])


def test_search_on_a_manifest_dataset(tmp_path):
    manifest = make_demo_dataset(tmp_path / "lab", subjects=4, samples_per_class=2, seed=1)
    base = ["search", "--dataset", f"manifest={manifest}:SDE", "--profile", "demo", "--set", "epochs=2",
            "--set", "dim=12", "--set", "dim_head=4", "--set", "depth=4", "--set", "integration_blocks=1",
            "--val-fraction", "0.34", "--experiment", "lab-search"]
    first = run_grid_cli([*base, "--trials", "2", "--no-evaluate"], tmp_path)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "0 trials completed earlier, 2 to run" in out and "[trial 2/2]" in out, out[-3000:]
    # extend the stored study by one trial, then evaluate the chosen configuration on the test subjects
    second = run_grid_cli([*base, "--trials", "3"], tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "2 trials completed earlier, 1 to run" in out, out[-3000:]
    assert "test subjects, chosen configuration, reported once: UF1" in out
    best = json.loads((tmp_path / "results" / "lab-search" / "demo_manifest-SDE-epir-demo.best.json").read_text())
    assert set(best["overrides"]) == {"alpha", "temperature", "merge_k"} and best["trials_completed"] == 3
    assert 0.0 <= best["overrides"]["alpha"] <= 0.8 and 1.0 <= best["overrides"]["temperature"] <= 16.0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lab-search")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("epir.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("epir.kind") == "search_trial"]
    assert len(parent) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent[0].info.run_id}
    for r in trials:
        assert {"alpha", "temperature", "merge_k"} <= set(r.data.params) and "val_uf1" in r.data.metrics
    assert "test_uf1" in parent[0].data.metrics and "best_val_uf1" in parent[0].data.metrics
    # the chosen configuration, fed to a grid run, is the cell the search evaluated: nothing to train
    grid = run_grid_cli(["--dataset", f"manifest={manifest}:SDE", "--presets", "epir", "--profile", "demo", "--set", "epochs=2",
                 "--set", "dim=12", "--set", "dim_head=4", "--set", "depth=4", "--set", "integration_blocks=1",
                 "--overrides", str(tmp_path / "results" / "lab-search" / "demo_manifest-SDE-epir-demo.best.json"),
                 "--experiment", "lab-search"], tmp_path)
    out = grid.stdout + grid.stderr
    assert grid.returncode == 0 and "4 finished earlier" in out and "0 to train" in out, out[-3000:]
