"""The strict search: validation groups, a choice for each group that never sees the group's labels,
any field searchable, resources that fit or a clear refusal, and `python grid/run_all.py search` on a
manifest dataset (resumed, extended, every trial an MLflow run, the choices tested by an honest LOSO cell
whose folds say what they trained and why)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from grid.runner import check_fit
from grid.search import Dist, SearchConfig, check_space, choose, group_fold, parse_space, validation_groups
from preprocess.demo import make_demo_dataset

from .conftest import run_grid_cli

TINY_MODEL = dict(family="epir", img_size=28, in_chans=3, patch_size=7, num_classes=3, dim=8, depth=3, heads=3,
                  dim_head=3, mlp_ratio=2.0, tokenizer="dnspt", itals=True, temperature=2.0, dtsm=True,
                  integration_blocks=1, merge_k=1, contrastive=True, alpha=0.4)
TINY_RECIPE = dict(epochs=2, batch_size=16, lr=1e-3, device="cpu")


def test_validation_groups_spread_every_source_over_the_groups():
    subjects = [f"c{i}" for i in range(7)] + [f"s{i}" for i in range(5)]
    strata = ["casme2"] * 7 + ["smic"] * 5
    g = validation_groups(subjects, strata, 3, seed=0)
    assert set(g) == set(subjects) and g == validation_groups(subjects, strata, 3, seed=0)  # a re-run repeats
    sizes = np.bincount(list(g.values()))
    assert sizes.max() - sizes.min() <= 1
    for k in range(3):
        assert {s[0] for s, gg in g.items() if gg == k} == {"c", "s"}  # both sources in every group
    assert g != validation_groups(subjects, strata, 3, seed=1)
    with pytest.raises(ValueError, match="cannot fill"):
        validation_groups(["a", "b"], ["x", "x"], 3, 0)


def _trial(number, params, preds):
    """A completed trial whose predictions for each subject's single sample are given: subject -> (true, pred)."""
    return {"number": number, "params": params, "folds": [{"subjects": list(preds), "y_true": [t for t, _ in preds.values()],
                                                           "y_pred": [p for _, p in preds.values()]}]}


def test_a_groups_choice_never_depends_on_its_own_labels():
    groups = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2}
    truth = {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0, "f": 1}
    good_on_12 = _trial(0, {"lr": 1}, {s: (t, t if groups[s] else 1 - t) for s, t in truth.items()})
    good_on_0 = _trial(1, {"lr": 2}, {s: (t, t if groups[s] == 0 else 1 - t) for s, t in truth.items()})
    c = choose([good_on_12, good_on_0], groups, 3)
    # group 0 is scored on groups 1 and 2 only, where trial 0 is perfect: trial 1's perfection on group 0 is unseen
    assert c[0]["trial"] == 0 and c[0]["validation_uf1"] == 1.0 and c[0]["subjects"] == ["a", "b"]
    # groups 1 and 2 each see group 0, where trial 1 wins, and the other of them, where trial 0 wins: a tie
    assert c[1]["trial"] == 0 and c[1]["runner_up"][0] == 1  # ties go to the earlier trial
    # flip group 0's labels: its own choice cannot move
    flipped = [_trial(t["number"], t["params"], {s: ((1 - tr if groups[s] == 0 else tr), p) for s, tr, p in
                                                  zip(t["folds"][0]["subjects"], t["folds"][0]["y_true"], t["folds"][0]["y_pred"])})
               for t in (good_on_12, good_on_0)]
    assert choose(flipped, groups, 3)[0]["trial"] == c[0]["trial"]
    with pytest.raises(ValueError, match="no valid"):
        choose([{"number": 0, "params": {}, "folds": []}], groups, 3)


def test_a_validation_training_never_sees_the_subjects_it_predicts():
    rng = np.random.default_rng(0)
    subjects = np.repeat([f"p{i}" for i in range(4)], 8)
    flows, labels = rng.random((32, 28, 28, 3), dtype=np.float32), rng.integers(0, 3, 32)
    base = group_fold(flows, labels, subjects, ["p1", "p3"], TINY_MODEL, TINY_RECIPE)
    assert set(base["subjects"]) == {"p1", "p3"} and len(base["y_true"]) == 16
    scrambled = labels.copy()
    held = np.isin(subjects, ["p1", "p3"])
    scrambled[held] = (scrambled[held] + 1) % 3  # the held subjects' labels cannot reach the model
    again = group_fold(flows, scrambled, subjects, ["p1", "p3"], TINY_MODEL, TINY_RECIPE)
    assert again["y_pred"] == base["y_pred"]


def test_any_field_can_be_searched_and_bad_ones_are_refused_before_anything_runs():
    space = parse_space(["lr=loguniform:1e-4:1e-2", "depth=int:2:4", "tokenizer=choice:spt,dnspt", "hflip=choice:true,false"])
    assert space["lr"] == Dist("loguniform", 1e-4, 1e-2) and space["hflip"].choices == (True, False)
    assert space["tokenizer"].choices == ("spt", "dnspt") and space["depth"].kind == "int"
    check_space(space, TINY_MODEL)
    assert set(parse_space(None)) == {"alpha", "temperature", "merge_k"}
    assert parse_space({"label_smoothing": "uniform:0:0.2"})["label_smoothing"].high == 0.2  # the TOML form
    with pytest.raises(ValueError, match="cannot search"):
        check_space(parse_space(["dropout=uniform:0:0.5"]), TINY_MODEL)  # an STSTNet field, not EPIR's
    with pytest.raises(ValueError, match="seed"):
        check_space({"seed": Dist("int", 0, 3)}, TINY_MODEL)
    with pytest.raises(ValueError, match="LOW:HIGH"):
        parse_space(["lr=loguniform:x:1"])
    with pytest.raises(ValueError, match="grid sampler"):
        SearchConfig(space=space, sampler="grid")


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
    common = ["--dataset", f"manifest={manifest}:SDE", "--profile", "demo", "--set", "epochs=2", "--set", "dim=12",
              "--set", "dim_head=4", "--set", "depth=4", "--set", "integration_blocks=1", "--experiment", "lab-search"]
    base = ["search", *common, "--val-groups", "2", "--space", "lr=loguniform:1e-3:1e-2",
            "--space", "tokenizer=choice:spt,dnspt"]
    first = run_grid_cli([*base, "--trials", "2", "--no-evaluate"], tmp_path)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "0 trials completed earlier, 2 to run" in out and "[trial 2/2]" in out, out[-3000:]
    # extend the stored study by one trial, then test the choices honestly on the test subjects
    second = run_grid_cli([*base, "--trials", "3"], tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "2 trials completed earlier, 1 to run" in out, out[-3000:]
    assert "test subjects, each trained with its group's choice, reported once: UF1" in out
    res = tmp_path / "results" / "lab-search"
    choices = json.loads((res / "demo_manifest-SDE-epir-demo.choices.json").read_text())
    assert choices["trials_completed"] == 3 and set(choices["groups"]) == {"0", "1"}
    assert sorted(choices["subjects"].values()) == [0, 0, 1, 1]
    for c in choices["groups"].values():
        assert set(c["params"]) == {"lr", "tokenizer"} and 1e-3 <= c["params"]["lr"] <= 1e-2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lab-search")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("epir.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("epir.kind") == "search_trial"]
    assert len(parent) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent[0].info.run_id}
    for r in trials:
        assert {"lr", "tokenizer"} <= set(r.data.params) and {"val_uf1", "val_uf1_g0", "val_uf1_g1"} <= set(r.data.metrics)
    assert "test_uf1" in parent[0].data.metrics and "best_val_uf1" in parent[0].data.metrics
    assert "optuna_history.png" in {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    # every fold of the tested cell says which configuration it trained and why
    folds = [r for r in runs if r.data.tags.get("epir.kind") == "fold"]
    assert len(folds) == 4
    for r in folds:
        g = choices["subjects"][r.data.tags["epir.fold"]]
        chosen = choices["groups"][str(g)]
        assert r.data.params["choice.group"] == str(g) and r.data.params["choice.trial"] == str(chosen["trial"])
        assert r.data.params["recipe.lr"] == str(chosen["params"]["lr"])
        assert r.data.params["model.tokenizer"] == chosen["params"]["tokenizer"]
    assert {r.data.tags["epir.search"] for r in runs if r.data.tags.get("epir.kind") == "cell"} == {choices["study"]}
    # the same choices given to a grid run are that cell: nothing to train
    grid = run_grid_cli([*common, "--presets", "epir", "--choices", str(res / "demo_manifest-SDE-epir-demo.choices.json")],
                        tmp_path)
    out = grid.stdout + grid.stderr
    assert grid.returncode == 0 and "4 finished earlier" in out and "0 to train" in out, out[-3000:]
    # its tables say what the folds trained (the groups' choices), not the search's base settings
    lrs = sorted({c["params"]["lr"] for c in choices["groups"].values()})
    cell = pd.read_csv(res / "runs.csv", dtype=str).iloc[0]
    assert cell["lr"] == (str(lrs[0]) if len(lrs) == 1 else "/".join(f"{v:.3g}" for v in lrs) + " (per group)")
    assert cell["lr"] in (res / "table2_3_sde.md").read_text()
    # the configuration chosen on every subject is refused on this dataset: it would peek
    peek = run_grid_cli([*common, "--presets", "epir", "--overrides", str(res / "demo_manifest-SDE-epir-demo.best.json")],
                        tmp_path)
    assert peek.returncode == 2 and "would peek" in peek.stderr, peek.stderr[-2000:]
