"""Table 4's paired comparisons, from cells logged in a real MLflow store (no Ray, no training)."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pandas as pd
import pytest

from grid import tracking
from grid.cells import build_cells
from grid.config import GridConfig
from grid.data import PUBLISHED_FLOW, ProtocolData
from grid.kept import labels_of, read_beside
from grid.pairing import paired_lines
from grid.predictions import PROB
from grid.progress import finish_cell
from grid.records import FoldRecord
from grid.report import write_tables


def _data(n_subjects=20, per=5) -> ProtocolData:
    """Every subject's samples are named x0 ... x4: a sample name is unique only within its subject (CASME II)."""
    rng = np.random.default_rng(0)
    n = n_subjects * per
    subjects = np.repeat([f"p{i:02d}" for i in range(n_subjects)], per)
    return ProtocolData("toy/CDE", "toy", "CDE", "cfg-1", np.zeros((n, 28, 28, 3), np.float32),
                        rng.integers(0, 3, n), subjects, np.array([f"x{i % per}" for i in range(n)]),
                        np.array(["toy"] * n), ["negative", "positive", "surprise"], "unit")


def _fold(d: ProtocolData, subject: str, acc: float, rng) -> FoldRecord:
    idx = np.flatnonzero(d.subjects == subject)
    y = d.labels[idx]
    pred = np.where(rng.random(len(y)) < acc, y, (y + 1) % 3)
    now = time.time()
    return FoldRecord.from_dict({"subject": subject, "sample_ids": d.sample_ids[idx].tolist(), "groups": d.groups[idx].tolist(),
            "y_true": y.tolist(), "y_pred": pred.tolist(), "probs": np.eye(3)[pred].tolist(),
            "curve": [{"epoch": 1, "loss": 1.0, "train_acc": 0.5, "lr": 1e-3}], "selected_epoch": 1,
            "best_test_epoch": {"epoch": 1, "y_pred": pred.tolist(), "probs": np.eye(3)[pred].tolist(),
                                "test_acc": [float(np.mean(pred == y))], "peeks_at_test": True},
            "member_y_pred": None, "train_seconds": 1.0, "device": "cpu", "node": "", "started": now, "finished": now})


ACC = {"baseline": 0.4, "+dtsm": 0.42, "epir": 0.9}  # epir far better; +dtsm about baseline


def _log_cells(client, exp_id, cells, d: ProtocolData, acc: dict = ACC) -> None:
    for c in cells:
        rng = np.random.default_rng([zlib.crc32(c.preset.encode()), c.seed])  # hash() of a str varies by process
        parent = tracking.parent_run(client, exp_id, c)
        folds = {s: _fold(d, s, acc[c.preset], rng) for s in c.subjects}
        for f in folds.values():
            tracking.log_fold(client, exp_id, parent, c, f)
        finish_cell(client, parent, c, folds, log=lambda m: None)


def test_table4_gives_each_rung_its_paired_difference_with_a_subject_bootstrap_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    d = _data()
    cfg = GridConfig(presets=["baseline", "+dtsm", "epir"], seeds=[0, 1], profile="demo")
    cells = build_cells(cfg, {d.key: d}, "demo")
    client, exp_id = tracking.setup("paired")
    _log_cells(client, exp_id, cells, d)
    out = write_tables(client, exp_id, "paired", tmp_path / "results")
    t4 = pd.read_csv(out / "table4_ablation.csv").set_index("preset")
    assert t4.loc["epir", "ΔUF1 vs baseline CI low"] > 0.2  # a large gain: the interval excludes 0
    assert t4.loc["epir", "ΔUF1 vs rung before"] == pytest.approx(t4.loc["epir", "ΔUF1 vs baseline"], abs=0.1)
    lo, hi = t4.loc["+dtsm", "ΔUF1 vs baseline CI low"], t4.loc["+dtsm", "ΔUF1 vs baseline CI high"]
    assert lo < t4.loc["+dtsm", "ΔUF1 vs baseline"] < hi and hi - lo > 0.05
    assert t4.loc["epir", "ΔUAR vs baseline seeds agree"] == "2/2"
    assert pd.isna(t4.loc["baseline", "ΔUF1 vs baseline"])
    md = (out / "table4_ablation.md").read_text()
    assert "ΔUF1 vs rung before [95% CI]" in md and "bootstrap over SUBJECTS" in md and " *" in md
    # the same figures on the MLflow parent runs of the row, and in the console lines
    epir_run = next(r for r in tracking.finished_cells(client, exp_id) if r.data.tags["epir.preset"] == "epir")
    assert epir_run.data.metrics["paired.vs_baseline.uf1_diff"] == pytest.approx(t4.loc["epir", "ΔUF1 vs baseline"])
    assert "minus baseline" in epir_run.data.tags["paired.vs_baseline"]
    lines = paired_lines(out)
    assert any(ln.strip().startswith("epir - baseline  UF1") for ln in lines), lines
    # every cell's predictions are kept in results/, without the true labels
    kept = sorted((out / "predictions").glob("*.csv"))
    assert {k.stem for k in kept} == {c.cell_id for c in cells}
    one = pd.read_csv(kept[0], dtype=str)
    assert "y_true" not in one and "sample_id" not in one and len(one) == len(d.labels)
    assert set(one["y_pred"]) <= set(d.classes) and not set(one["sample_hash"]) & set(d.sample_ids)
    probs = one[[PROB + c for c in d.classes]].astype(float)  # honest probabilities, for an ensemble
    assert np.allclose(probs.sum(axis=1), 1) and (probs.idxmax(axis=1).str[len(PROB):] == one["y_pred"]).all()

    # the store is gone but results/ stayed: a new experiment that trained only epir pairs it with the kept
    # baseline and +dtsm rows, to the same figures as when all three were in one store
    top = [c for c in cells if c.preset == "epir"]
    client2, exp2 = tracking.setup("top")
    _log_cells(client2, exp2, top, d)
    # (the kept rows name the flow otherwise, as an older runs.csv named the composite's published maps
    # "farneback": both flows are a dataset's only, unnamed one, and they pair)
    lower = read_beside(out / "runs.csv", ["baseline", "+dtsm"]).assign(flow=PUBLISHED_FLOW)
    again = write_tables(client2, exp2, "top", tmp_path / "results", [lower])
    t4b = pd.read_csv(again / "table4_ablation.csv").set_index("preset")
    for col in ("ΔUF1 vs baseline", "ΔUF1 vs baseline CI low", "ΔUAR vs rung before CI high"):
        assert t4b.loc["epir", col] == pytest.approx(t4.loc["epir", col]), col
    assert t4b.loc["+dtsm", "ΔUF1 vs baseline"] == pytest.approx(t4.loc["+dtsm", "ΔUF1 vs baseline"])  # two rows beside
    assert "[from paired]" in t4b.loc["baseline", "method"] and "not paired" not in t4b.loc["baseline", "method"]
    assert len(pd.read_csv(again / "runs.csv")) == len(top)  # runs.csv: this experiment's cells only
    assert "baseline [from paired]" in set(pd.read_csv(again / "paired_comparisons.csv")["against"])

    # a row beside without its kept predictions stands beside, labelled and not paired
    for k in kept:
        if k.stem in {c.cell_id for c in cells if c.preset == "baseline"}:
            k.unlink()
    third = write_tables(client2, exp2, "top", tmp_path / "results", [read_beside(out / "runs.csv", ["baseline"])])
    t4c = pd.read_csv(third / "table4_ablation.csv").set_index("preset")
    assert "[from paired, not paired]" in t4c.loc["baseline", "method"]
    assert pd.isna(t4c.loc["epir", "ΔUF1 vs baseline"])
    assert t4c.loc["baseline", "UF1"] == pytest.approx(t4.loc["baseline", "UF1"])
    with pytest.raises(ValueError, match="no row of preset"):
        read_beside(out / "runs.csv", ["ststnet"])

    # any two rows, e.g. one preset under two profiles (two search designs), paired when asked for: here the
    # cpu-profile epir is much worse than the demo one, on the same subjects and seeds
    worse = build_cells(GridConfig(presets=["epir"], seeds=[0, 1], profile="cpu"), {d.key: d}, "cpu")
    _log_cells(client2, exp2, worse, d, {"epir": 0.45})
    a, b = worse[0].setting_id, top[0].setting_id
    asked = write_tables(client2, exp2, "top", tmp_path / "results", asked=[(a, b)])
    pc = pd.read_csv(asked / "paired_comparisons.csv")
    hit = pc[(pc["vs"] == "asked") & (pc["metric"] == "UF1")]
    assert len(hit) == 1 and hit["ci_high"].iloc[0] < -0.2 and hit["seed_pairs"].iloc[0] == 2, pc
    assert "(cpu)" in hit["row"].iloc[0] and "(demo)" in hit["against"].iloc[0]
    with pytest.raises(ValueError, match="no row has the setting id 'nope'"):
        write_tables(client2, exp2, "top", tmp_path / "results", asked=[(a, "nope")])


def test_beside_and_pair_are_refused_outside_report_and_a_bad_pair_by_argparse(capsys):
    from grid.run_all import main

    assert main(["run", "--pair", "a:b"]) == 2
    assert "--pair only work with the report command" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--pair", "just-one"])
    assert "is not SETTING_A:SETTING_B" in capsys.readouterr().err


def test_the_leaderboard_pairs_every_model_with_epir_and_adds_the_ensemble_and_the_waiting_rows(tmp_path, monkeypatch):
    from grid.kept import Predictions, sample_hash
    from grid.leaderboard import ENSEMBLE, ensemble_predictions, report_leaderboard
    from grid.report import PUBLISHED_DATASET, collect

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setitem(PUBLISHED_DATASET, "toy", "full")  # the toy data stands for the composite's published rows
    d = _data(n_subjects=8)
    cells = build_cells(GridConfig(presets=["epir", "baseline", "sssnet"], seeds=[0, 1], profile="demo"), {d.key: d}, "demo")
    client, exp_id = tracking.setup("board")
    _log_cells(client, exp_id, cells, d, {"epir": 0.9, "baseline": 0.4, "sssnet": 0.5})
    out = report_leaderboard(client, exp_id, "board", tmp_path / "results")
    board = pd.read_csv(out / "leaderboard.csv", dtype=str, keep_default_na=False).set_index("model")
    assert list(board.index) == ["epir", "sssnet", "baseline", ENSEMBLE, "offapexnet", "htnet"]
    assert board.loc["baseline", "ΔUF1 vs epir [95% CI] (seeds)"].startswith("-") and "(2/2)" in board.loc["baseline", "ΔUF1 vs epir [95% CI] (seeds)"]
    assert board.loc["sssnet", "published peeks"] == "no" and board.loc["htnet", "seeds"] == "not run"
    assert "waits for a GPU" in board.loc["offapexnet", "note"] and board.loc[ENSEMBLE, "seeds"] == "0,1"
    # the ensemble: per seed, the mean of the three models' probabilities, arg-max
    preds = Predictions(client, exp_id, collect(client, exp_id))
    members = [preds.of(c.setting_id)[0] for c in cells if c.seed == 0]
    ens = ensemble_predictions(members, d.classes)
    probs = [m[0].assign(h=m[0]["sample_id"].map(sample_hash)).set_index(["subject", "h"])[
        [PROB + c for c in d.classes]] for m in members]
    keys = list(zip(ens[0]["subject"], ens[0]["sample_hash"]))
    mean = np.mean([p.loc[keys].to_numpy() for p in probs], axis=0)
    assert len(keys) == len(d.labels) and (ens[0]["y_pred"].to_numpy() == mean.argmax(1)).all()
    assert "softmax mean of sssnet, baseline, epir" in board.loc[ENSEMBLE, "note"]


def test_rows_beside_pair_with_the_datasets_labels_where_no_own_cell_has_their_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    d = _data(n_subjects=8)
    cells = build_cells(GridConfig(presets=["baseline", "epir"], seeds=[0, 1], profile="demo"), {d.key: d}, "demo")
    client, exp_id = tracking.setup("first")
    _log_cells(client, exp_id, cells, d)
    first = pd.read_csv(write_tables(client, exp_id, "first", tmp_path / "results") / "table4_ablation.csv").set_index("preset")
    # the store is gone; a new experiment trained only on another dataset, so no own cell holds toy's labels
    other = ProtocolData("other/CDE", "other", "CDE", "cfg-2", d.flows, d.labels, d.subjects, d.sample_ids, d.groups,
                         d.classes, "unit")
    client2, exp2 = tracking.setup("second")
    _log_cells(client2, exp2, build_cells(GridConfig(presets=["epir"], seeds=[0], profile="demo"),
                                          {other.key: other}, "demo"), other)
    kept = read_beside(tmp_path / "results" / "first" / "runs.csv")
    blind = write_tables(client2, exp2, "second", tmp_path / "results", [kept])
    t4 = pd.read_csv(blind / "table4_ablation.csv")
    t4 = t4[t4["dataset"] == "toy"].set_index("preset")
    assert pd.isna(t4.loc["epir", "ΔUF1 vs baseline"])  # no labels of toy: nothing to pair with
    # with the dataset's labels (report --dataset/--config), they pair to the figures of their own store
    labelled = write_tables(client2, exp2, "second", tmp_path / "results", [kept], labels={("toy", "CDE"): labels_of(d)})
    t4 = pd.read_csv(labelled / "table4_ablation.csv")
    t4 = t4[t4["dataset"] == "toy"].set_index("preset")
    for col in ("ΔUF1 vs baseline", "ΔUF1 vs baseline CI low", "ΔUAR vs baseline CI high"):
        assert t4.loc["epir", col] == pytest.approx(first.loc["epir", col]), col
    wrong = labels_of(d)
    wrong = (wrong[0].rename(lambda k: k + "x" if isinstance(k, str) and len(k) == 16 else k, level=2), wrong[1])
    other_samples = write_tables(client2, exp2, "second", tmp_path / "results", [kept], labels={("toy", "CDE"): wrong})
    t4 = pd.read_csv(other_samples / "table4_ablation.csv")  # labels of other samples: not paired, never misread
    assert pd.isna(t4[(t4["dataset"] == "toy")].set_index("preset").loc["epir", "ΔUF1 vs baseline"])


def test_the_leaderboard_shows_each_model_s_row_from_the_first_beside_file_that_holds_it():
    """The committed stores' runs: SMIC-HS RCN-A ran at the decayed rate (runs-1) and again at the reference's
    constant rate (runs-2); the board shows the row of the file given first (docs: newest first)."""
    from pathlib import Path

    from grid.leaderboard import leaderboard
    from grid.report import aggregate

    class NoPredictions:  # nothing kept is read: every row stands unpaired, the choice of rows is what is tested
        def of(self, setting):
            return {}, ["negative", "positive", "surprise"]

    runs = Path(__file__).resolve().parents[1] / "results"
    old, new = (read_beside(runs / f"leaderboard-runs-{k}" / "runs.csv", ["rcn-a"]) for k in (1, 2))
    for first, schedule in ((new, "constant"), (old, "step")):
        board = leaderboard(pd.concat([aggregate(first), aggregate(old if first is new else new)], ignore_index=True),
                            NoPredictions())
        row = board[(board["model"] == "rcn-a") & (board["protocol"] == "SDE")]
        assert len(row) == 1 and row["note"].iloc[0].startswith(
            "trained with schedule=step" if schedule == "step" else "from leaderboard-runs-2"), row["note"].iloc[0]
