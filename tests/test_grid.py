"""The grid's public command `python grid/run_all.py`: a short grid on the real composite (MLflow parent
and child runs, results tables, resume without retraining, a failing fold retried and reported), a run
interrupted by Ctrl-C and then by a killed driver and finished by the same command, the built-in demo,
the configuration parsing, and the extra Tune passes for folds Tune ends early."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from grid.cli import build_parser, make_config, parse_dataset
from grid.config import DatasetSpec, GridConfig
from grid.tomlfile import load_config

from .conftest import finished_fold_tags, run_grid_cli

TINY = ["--no-final-model", "--set", "warmup_epochs=0", "--set", "epochs=2", "--set", "dim=12",
        "--set", "dim_head=4", "--set", "depth=4",
        "--set", "integration_blocks=2", "--set", "batch_size=128"]


def _run(args, cwd):
    return run_grid_cli(args, cwd)

def _runs(cwd, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, runs


def test_short_grid_on_the_real_composite(composite_root, tmp_path):
    args = ["--dataset", f"megc2019={composite_root}", "--presets", "epir", "--folds", "3",
            "--experiment", "cde-test", "--profile", "cpu", *TINY, "--max-failures", "1"]
    # 1. the largest subject's fold (s03) is made to fail every attempt: retried once, then reported;
    #    the other two folds finish and the run exits 1.
    first = _run([*args, "--inject-failure", "s03"], tmp_path)
    out = first.stdout + first.stderr
    assert first.returncode == 1, out[-4000:]
    assert "retry  CDE megc2019 epir | fold s03" in out, out[-4000:]
    assert "FAILED  CDE megc2019 epir | fold s03" in out and "injected failure" in out, out[-4000:]
    client, runs = _runs(tmp_path, "cde-test")
    folds = [r for r in runs if r.data.tags.get("epir.kind") == "fold"]
    assert sorted(r.data.tags["epir.fold"] for r in folds) == ["s20", "sub17"]
    # 2. the same command finishes the grid, training only the failed fold
    second = _run(args, tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "2 finished earlier" in out and "1 to train" in out, out[-3000:]
    client, runs = _runs(tmp_path, "cde-test")
    parents = [r for r in runs if r.data.tags.get("epir.kind") == "cell"]
    folds = [r for r in runs if r.data.tags.get("epir.kind") == "fold"]
    assert len(parents) == 1 and len(folds) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in folds} == {parent.info.run_id}
    m = parent.data.metrics
    # s03 and s20 are SMIC subjects, sub17 a CASME II one: each source dataset present is scored alone
    for key in ("uf1", "uar", "uf1_casme2", "uar_smic", "params_M", "macs_M", "wall_seconds"):
        assert key in m, key
    assert 0.0 <= m["uf1"] <= 1.0 and parent.data.tags["epir.epoch_selection"] == "last"
    assert parent.data.tags["epir.git_commit"] != "" and parent.data.params["model.dim"] == "12"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"confusion_all.png", "scores.json", "versions.json", "learning_curves.png",
            "scores_best_test_epoch.json"} <= arts
    # the same trainings' best-test-epoch result sits beside the honest one, never in its place
    assert m["best_test_epoch.uf1"] >= 0 and m["best_test_epoch.gap_uf1"] == pytest.approx(
        m["best_test_epoch.uf1"] - m["uf1"]) and parent.data.tags["epir.peeks_at_test"] == "false"
    child = folds[0]
    assert len(client.get_metric_history(child.info.run_id, "loss")) == 2  # one point per epoch
    assert len(client.get_metric_history(child.info.run_id, "train_acc")) == 2
    assert {"predictions.csv", "predictions_best_test_epoch.csv"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    assert len(client.get_metric_history(child.info.run_id, "best_test_epoch.test_acc_by_epoch")) == 2
    # pooled scores equal sklearn's on the children's predictions
    from sklearn.metrics import f1_score, recall_score

    preds = pd.concat([pd.read_csv(client.download_artifacts(r.info.run_id, "predictions.csv")) for r in folds])
    assert m["uf1"] == pytest.approx(f1_score(preds["y_true"], preds["y_pred"], average="macro"), abs=1e-6)
    assert m["uar"] == pytest.approx(recall_score(preds["y_true"], preds["y_pred"], average="macro"), abs=1e-6)
    # results/ tables, labelled as a partial grid
    res = tmp_path / "results" / "cde-test"
    for name in ("table1_cde", "table4_ablation"):
        assert (res / f"{name}.md").is_file() and (res / f"{name}.csv").is_file()
    t1 = (res / "table1_cde.md").read_text()
    assert "PARTIAL: 3 folds" in t1 and "EPIR (paper)" in t1 and "0.8852" in t1
    assert pd.read_csv(res / "runs.csv")["commit"].iloc[0] == parent.data.tags["epir.git_commit"]
    # 3. once more: nothing to train
    third = _run(args, tmp_path)
    out = third.stdout + third.stderr
    assert third.returncode == 0 and "3 finished earlier" in out and "0 to train" in out, out[-3000:]
    assert len([r for r in _runs(tmp_path, "cde-test")[1] if r.data.tags.get("epir.kind") == "fold"]) == 3


def test_demo_runs_end_to_end(demo_first_run):
    tmp_path, res = demo_first_run  # the run is a session fixture: later tests reuse its demo data and shards
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "DEMO: no dataset configured" in out and "DEMO: writing the built-in demo dataset" in out
    assert "shards: 1 written, 0 reused" in out
    for noise in ("Token authentication", "Configuration for experiment", "TensorBoard", "INFO mlflow", "core_worker.cc",
                  "Creating initial MLflow database tables"):
        assert noise not in out, noise  # a first run's console: our lines and real problems only
    table = (tmp_path / "results" / "epir-grid-demo" / "table2_3_sde.md").read_text()
    assert "DEMO data" in table and "PARTIAL: 2 folds" in table
    _, runs = _runs(tmp_path, "epir-grid-demo")
    assert len([r for r in runs if r.data.tags.get("epir.kind") == "fold"]) == 2
    assert {r.data.tags["epir.demo"] for r in runs} == {"true"}


def test_configuration_parsing(tmp_path):
    spec = parse_dataset("casme2=/data/CASME2:SDE+CDE")
    assert spec.format == "casme2" and str(spec.root) == "/data/CASME2" and spec.protocols == ["SDE", "CDE"]
    assert parse_dataset("manifest=C:/x/m.csv").protocols == []
    with pytest.raises(ValueError, match="FORMAT=ROOT"):
        parse_dataset("casme2")
    with pytest.raises(ValueError, match="format"):
        parse_dataset("casme9=/x")
    toml = tmp_path / "grid.toml"
    toml.write_text('experiment = "x"\npresets = ["epir"]\n[[datasets]]\nformat = "manifest"\nroot = "m.csv"\n'
                    'classes = ["a", "b"]\n[overrides]\nepochs = 7\n')
    kw = load_config(toml)
    assert kw["datasets"][0].root == tmp_path / "m.csv" and kw["datasets"][0].options == {"classes": ["a", "b"]}
    cfg = GridConfig(**kw)
    model, recipe, profile = cfg.settings("epir", "cpu", 2)
    assert recipe["epochs"] == 7 and model["num_classes"] == 2 and model["dim"] == 64 and profile == "cpu"
    assert model["family"] == "epir" and recipe["seed"] == 0
    # a peer keeps its published recipe whatever the profile; overrides still reach it
    peer = GridConfig(**{**kw, "presets": ["ststnet", "epir"], "overrides": {"dim": 32}})
    model, recipe, profile = peer.settings("ststnet", "cpu", 3, seed=2)
    assert profile == "published" and model["family"] == "ststnet" and "dim" not in model
    assert (recipe["epochs"], recipe["lr"], recipe["sample_order"], recipe["hflip"], recipe["seed"]) == (800, 5e-5, "by_label", False, 2)
    assert peer.settings("epir", "cpu", 3)[0]["dim"] == 32
    with pytest.raises(ValueError, match="unknown override"):
        GridConfig(**{**kw, "presets": ["ststnet"], "overrides": {"dim": 32}})  # no chosen preset has it
    with pytest.raises(ValueError, match="seeds"):
        GridConfig(**{**kw, "overrides": {"seed": 3}})
    assert make_config(build_parser().parse_args(["--config", str(toml), "--seeds", "0,1,2"])).seeds == [0, 1, 2]
    with pytest.raises(ValueError, match="seeds"):
        make_config(build_parser().parse_args(["--config", str(toml), "--seeds", "0,x"]))
    cfg = make_config(build_parser().parse_args(["--config", str(toml), "--set", "epochs=5", "--set", "hflip=false"]))
    assert cfg.overrides == {"epochs": 5, "hflip": False} and not cfg.demo
    from grid.values import parse_overrides  # the benchmarks read --set the same way

    assert parse_overrides(["schedule=cosine", "lr=5e-4", "standardize=true"]) == {
        "schedule": "cosine", "lr": 5e-4, "standardize": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["epochs"])
    demo = make_config(build_parser().parse_args([]))
    assert demo.demo and demo.profile == "demo" and demo.experiment == "epir-grid-demo"
    toml.write_text("experimnt = 'typo'\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(toml)
    toml.write_text("[search]\nspace = ['lr=loguniform:1e-4:1e-2']\ntrials = 30\n")  # trials: a command-line option
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['trials'\] in \[search\]"):
        load_config(toml)
    with pytest.raises(ValueError, match="unknown override"):
        GridConfig(datasets=[DatasetSpec("megc2019", tmp_path)], overrides={"epoch": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        GridConfig(presets=["vit"])


def test_mistyped_settings_and_wrong_roots_fail_fast_with_exit_2_before_ray(tmp_path):
    import time

    start = time.perf_counter()
    res = _run(["--dataset", f"megc2019={tmp_path}", "--set", "hflip=False", "--set", "epochs=abc",
                "--set", "batch_size=2.5", "--set", "standardize=true"], tmp_path)
    assert res.returncode == 2 and time.perf_counter() - start < 10, res.stderr[-2000:]
    err = res.stderr.splitlines()
    assert "error: hflip='False' (str): input should be a valid boolean (hflip is bool)" in err
    assert any(ln.startswith("error: epochs='abc'") for ln in err) and any(ln.startswith("error: batch_size=2.5") for ln in err)
    assert not any("standardize" in ln for ln in err) and "Ray:" not in res.stdout  # true is a boolean; Ray never started
    res = _run(["--dataset", f"megc2019={tmp_path / 'nowhere'}"], tmp_path)
    assert res.returncode == 2 and "dataset root(s) not found" in res.stderr and "Ray:" not in res.stdout
    res = _run(["--folds", "0"], tmp_path)
    assert res.returncode == 2 and "positive integer" in res.stderr
    res = _run(["report", "--experiment", "no-such-experiment"], tmp_path)
    assert res.returncode == 2 and "no MLflow experiment 'no-such-experiment'" in res.stderr
    with pytest.raises(ValueError, match="warmup_epochs"):  # a range that only the combination breaks
        GridConfig(presets=["epir"], profile="cpu", overrides={"warmup_epochs": 3, "epochs": 2})


def test_table_rows_say_when_a_score_peeks_at_the_test_subject():
    from grid.report import _label

    row = dict(preset="epir", profile="paper", peeks_at_test=True, partial=False, folds=68, demo=False)
    assert "BEST-TEST-EPOCH" in _label(row)  # a run logged before both results were kept
    assert _label({**row, "peeks_at_test": False}) == "epir (ours, paper)"


def test_tables_pool_seeds_and_keep_the_best_test_epoch_apart():
    import numpy as np

    from grid.report import aggregate

    base = dict(dataset="megc2019", protocol="CDE", flow="farneback", preset="epir", profile="cpu", epoch_selection="last",
                folds=68, demo=False, setting="s1", wall_minutes=1.0, train_minutes=2.0)
    scores = {"uf1": [0.6, 0.7, 0.8], "uar": [0.5, 0.6, 0.7], "bte_uf1": [0.8, 0.9, 0.9], "bte_uar": [0.7, 0.8, 0.8]}
    rows = [{**base, "seed": i, "end_time": pd.Timestamp(2026, 1, 1 + i), **{k: v[i] for k, v in scores.items()}}
            for i in range(3)]
    rows.append({**base, "setting": "s0", "seed": 0, "end_time": pd.Timestamp(2025, 1, 1), "uf1": 0.1, "uar": 0.1,
                 "bte_uf1": 0.2, "bte_uar": 0.2})  # an older setting of the same preset and profile
    df = pd.DataFrame(rows)
    for c in ("uf1_samm", "uar_samm", "uf1_casme2", "uar_casme2", "uf1_smic", "uar_smic"):
        df[c], df[f"bte_{c}"] = np.nan, np.nan
    df["members_uf1_mean"], df["members_uar_mean"], df["ensemble"] = np.nan, np.nan, 1
    out = aggregate(df)
    assert len(out) == 1  # the newest setting of the row's key
    r = out.iloc[0]
    assert r["uf1"] == pytest.approx(0.7) and r["uf1_sd"] == pytest.approx(0.1) and r["n_seeds"] == 3
    assert r["seeds"] == "0,1,2" and r["bte_uf1"] == pytest.approx(0.8667, abs=1e-4)
    assert r["gap_uf1"] == pytest.approx(r["bte_uf1"] - r["uf1"]) and r["wall_minutes"] == 3.0


def test_folds_tune_ended_early_get_their_remaining_attempts():
    """Ray Tune ends a trial without retrying it when the failure hits while the trial is PENDING (a cached
    actor on a node that has just died fails its reset): run_passes gives such folds further passes, one
    attempt each, until each fold has had max_failures + 1 attempts; an interrupted pass stops it."""
    from grid.runner import run_passes
    from grid.trainable import TrialSpec

    folds = [TrialSpec(cell_id="c", data_key="d", subject=s, model={}, recipe={}) for s in ("a", "b", "x", "y")]
    plan = {"a": ["ok"], "b": ["fail", "ok"], "x": ["fail"] * 9, "y": ["fail", "fail", "ok"]}
    calls = []

    def one_pass(todo, budget):  # Tune's early stop: each failing fold ends after one attempt
        calls.append(([f.subject for f in todo], budget))
        errored = {}
        for f in todo:
            if plan[f.subject].pop(0) == "fail":
                errored[("c", f.subject)] = (1, f"boom {f.subject}")
        return errored, False

    log = []
    failed = run_passes(folds, one_pass, max_failures=2, log=log.append)
    assert calls == [(["a", "b", "x", "y"], 2), (["b", "x", "y"], 0), (["x", "y"], 0)]
    assert failed == {("c", "x"): (3, "boom x")}  # 3 attempts = max_failures + 1, then reported
    assert "running them again" in log[0]
    # a fold Tune already retried max_failures times is not run again
    calls.clear()
    assert run_passes(folds[:1], lambda t, b: (calls.append(b) or {("c", "a"): (3, "e")}, False), 2, log.append) \
        == {("c", "a"): (3, "e")} and calls == [2]
    # an interrupted pass (Ctrl-C) is not followed by another
    calls.clear()
    assert run_passes(folds[:1], lambda t, b: (calls.append(b) or {("c", "a"): (1, "e")}, True), 2, log.append) \
        == {("c", "a"): (1, "e")} and calls == [2]


def _finished_fold_subjects(db: Path) -> list[str]:
    """Test subjects of the FINISHED fold runs."""
    return finished_fold_tags(db, "epir.fold")


def test_ctrl_c_then_a_killed_driver_then_the_same_command_finishes(composite_root, tmp_path):
    """Long runs survive: Ctrl-C (SIGINT) mid-run, then SIGKILL of the driver mid-run; the third run of the
    same command trains only what is missing, and every fold is in MLflow exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    folds = 6
    args = [sys.executable, str(REPO / "grid" / "run_all.py"), "--dataset", f"megc2019={composite_root}",
            "--presets", "epir", "--folds", str(folds), "--experiment", "interrupted", "--profile", "cpu",
            *TINY, "--set", "epochs=6"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    env.pop("MLFLOW_TRACKING_URI", None)
    db = tmp_path / "mlflow.db"
    outputs = []
    for sig in (signal.SIGINT, signal.SIGKILL):
        before = len(_finished_fold_subjects(db))
        driver = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=sig == signal.SIGKILL)
        deadline = time.time() + 600
        while driver.poll() is None and len(_finished_fold_subjects(db)) <= before and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, f"the run ended before it could be interrupted\n{driver.communicate()[0][-3000:]}"
        if sig == signal.SIGKILL:  # the driver and its local Ray, as when the machine's session is killed
            os.killpg(driver.pid, sig)
        else:
            driver.send_signal(sig)
        out, _ = driver.communicate(timeout=180)
        outputs.append(out)
        assert driver.returncode != 0, out[-3000:]
    done = _finished_fold_subjects(db)
    assert 2 <= len(done) < folds, "\n".join(o[-2000:] for o in outputs)
    assert "did not finish" in outputs[0], outputs[0][-3000:]  # Ctrl-C: the unfinished folds are listed
    third = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = third.stdout + third.stderr
    assert third.returncode == 0, out[-4000:]
    assert f"{len(done)} finished earlier" in out and f"{folds - len(done)} to train" in out, out[-3000:]
    final = _finished_fold_subjects(db)
    assert len(final) == folds and len(set(final)) == folds, final  # every fold once, none trained twice


def test_fold_packs_log_every_fold_and_a_failed_pack_resumes_alone(demo_seeded):
    tmp_path = demo_seeded
    # 6 demo folds in packs of up to 4 (epir/pack.py: one batched model per trial); the pack holding demo06
    # fails, the other logs its 4 folds; the same command then trains the 2 folds of the failed pack only
    args = ["--presets", "epir", "--fold-pack", "4", *TINY]
    res = _run([*args, "--inject-failure", "demo06", "--max-failures", "0"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "4 to train" not in out and "6 to train in 2 trial(s)" in out, out[-3000:]
    assert sorted(finished_fold_tags(tmp_path / "mlflow.db", "epir.fold")) == ["demo01", "demo02", "demo03", "demo04"]
    assert "FAILED  SDE demo epir | fold demo05+demo06" in out
    for noise in ("Token authentication", "Configuration for experiment", "TensorBoard", "INFO mlflow", "core_worker.cc"):
        assert noise not in out, noise  # the console shows our lines and real problems only (no --verbose)
    res = _run(args, tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "4 finished earlier" in out and "2 to train in 1 trial(s)" in out, out[-3000:]
    assert sorted(finished_fold_tags(tmp_path / "mlflow.db", "epir.fold")) == [f"demo{i:02d}" for i in range(1, 7)]
    client, runs = _runs(tmp_path, "epir-grid-demo")
    folds = [r for r in runs if r.data.tags.get("epir.kind") == "fold"]
    assert all("predictions.csv" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in folds)


def test_a_store_of_id_version_2_is_migrated_and_changed_data_is_trained_again(tmp_path):
    """Cell ids cover the data: a store from before (cell ids of version 2) is re-tagged once by migrate-ids and
    then resumes with nothing to train; one flow image re-exported in place with one value changed makes new
    shards and new cells, whose folds are trained again, and the grid says why."""
    import cv2

    from .conftest import synthetic_composite

    root = synthetic_composite(tmp_path / "composite")
    args = ["--dataset", f"megc2019={root}", "--presets", "baseline", "--folds", "2", "--experiment", "ids",
            "--profile", "cpu", *TINY, "--set", "epochs=1"]
    first = _run(args, tmp_path)
    assert first.returncode == 0 and "0 finished earlier" in first.stdout, (first.stdout + first.stderr)[-3000:]
    client, runs = _runs(tmp_path, "ids")
    for r in runs:  # the store as the previous id scheme wrote it: version-2 cell ids, no data fingerprint
        client.set_tag(r.info.run_id, "epir.cell_id", r.data.tags["epir.cell_id_v2"])
        for tag in ("epir.data_fingerprint", "epir.cell_id_v2"):
            client.delete_tag(r.info.run_id, tag)
    migrated = _run(["migrate-ids", *args], tmp_path)
    assert migrated.returncode == 0 and "3 run(s) re-tagged" in migrated.stdout, (migrated.stdout + migrated.stderr)[-3000:]
    resumed = _run(args, tmp_path)
    assert "2 finished earlier" in resumed.stdout and "0 to train" in resumed.stdout, resumed.stdout[-3000:]
    png = sorted((root / "flow").iterdir())[0]
    img = cv2.imread(str(png))
    img[14, 14, 0] = (int(img[14, 14, 0]) + 1) % 256  # re-exported in place: one value differs
    assert cv2.imwrite(str(png), img)
    changed = _run(args, tmp_path)
    out = changed.stdout + changed.stderr
    assert changed.returncode == 0 and "1 written, 0 reused" in out, out[-3000:]
    assert "0 finished earlier" in out and "2 to train" in out, out[-3000:]
    assert "2 finished fold(s) in MLflow were trained on other data" in out, out[-3000:]
    fps = {r.data.tags["epir.data_fingerprint"] for r in _runs(tmp_path, "ids")[1] if r.data.tags.get("epir.kind") == "cell"}
    assert len(fps) == 2  # two cells, one per data

