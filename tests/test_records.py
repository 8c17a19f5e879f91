"""Folds trained outside Ray and MLflow (benchmarks/gpu_ladder.py, as on a lent GPU machine) and imported
with `grid/run_all.py import`: the same parent and child runs and cell ids as the grid's, so a later grid
run of the same settings trains nothing; each fold's honest and best-test-epoch results stay apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from .conftest import REPO, run_grid_cli, synthetic_composite

TINY = ["--set", "warmup_epochs=0", "--set", "epochs=3", "--set", "dim=12", "--set", "dim_head=4", "--set", "depth=4",
        "--set", "integration_blocks=2"]


def test_gpu_ladder_records_import_as_the_grids_own_runs(tmp_path):
    root = synthetic_composite(tmp_path / "composite")
    env = {**os.environ}  # the tests' shared Ray (conftest)
    env.pop("MLFLOW_TRACKING_URI", None)
    # the shards, made as a grid run makes them (here, with Ray) ...
    prep = subprocess.run([sys.executable, "-m", "preprocess", "--dataset", "megc2019", "--root", str(root), "--out",
                           str(tmp_path / "work_dirs" / "shards")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert prep.returncode == 0, prep.stderr[-3000:]
    (shards,) = (tmp_path / "work_dirs" / "shards" / "megc2019").iterdir()
    # ... then trained without Ray or MLflow, two workers, one record per fold
    ladder = [sys.executable, str(REPO / "benchmarks" / "gpu_ladder.py"), "--shards", str(shards), "--presets",
              "baseline,epir", "--profile", "cpu", *TINY, "--folds", "3", "--workers", "2", "--out", str(tmp_path / "rec")]
    run = subprocess.run(ladder, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "6 to train" in out and "folds/hour" in out and "best test epoch (PEEKS)" in out, out[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "rec" / "folds.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for rec in lines:  # one training, two results, never mixed
        b = rec["best_test_epoch"]
        assert b["peeks_at_test"] and len(b["test_acc"]) == 3 and 1 <= b["epoch"] <= 3
        assert abs(np.mean(np.asarray(b["y_pred"]) == np.asarray(rec["y_true"])) - max(b["test_acc"])) < 1e-4
        last = np.mean(np.asarray(rec["y_pred"]) == np.asarray(rec["y_true"]))
        assert abs(last - b["test_acc"][-1]) < 1e-4 and rec["selected_epoch"] == 3
    again = subprocess.run(ladder, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert "6 recorded earlier, 0 to train" in again.stdout, again.stdout[-2000:]
    # import: the grid's parent and child runs, pooled scores, tables
    imp = run_grid_cli(["import", str(tmp_path / "rec"), "--experiment", "ladder"], tmp_path)
    assert imp.returncode == 0 and "imported 6 fold(s)" in imp.stdout, (imp.stdout + imp.stderr)[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ladder")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("epir.kind") == "cell"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    assert all("best_test_epoch.uf1" in r.data.metrics and "uf1" in r.data.metrics for r in parents)
    assert all(r.data.tags["epir.records.workers"] == "2" for r in parents)
    table = (tmp_path / "results" / "ladder" / "table4_ablation.md").read_text()
    assert "best test epoch (PEEKS)" in table and "PARTIAL: 3 folds" in table
    # a grid run of the same settings finds every fold done: the same cells, the same ids
    grid = run_grid_cli(["--dataset", f"megc2019={root}", "--presets", "baseline,epir", "--profile", "cpu", *TINY, "--no-final-model",
                         "--folds", "3", "--experiment", "ladder"], tmp_path)
    out = grid.stdout + grid.stderr
    assert grid.returncode == 0 and "6 finished earlier" in out and "0 to train" in out, out[-3000:]
    # importing again adds nothing
    imp = run_grid_cli(["import", str(tmp_path / "rec"), "--experiment", "ladder"], tmp_path)
    assert "imported 0 fold(s) (6 already in MLflow)" in imp.stdout, imp.stdout[-2000:]
