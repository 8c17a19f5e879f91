"""The strict search: validation groups, a choice for each group that never sees the group's labels,
any field searchable, resources that fit or a clear refusal, and `python grid/run_all.py search` on a
manifest dataset (resumed, extended, every trial an MLflow run, the choices tested by an honest LOSO cell
whose folds say what they trained and why)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from grid.nested import SearchPlan, best_on_all, choose, evaluate_candidate, group_fold, inner_scores, validation_groups
from grid.resources import check_fit
from grid.space import Dist, SearchConfig, check_space, parse_space
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


def _nested(groups: dict, labels: dict, bias: int) -> list[dict]:
    """A candidate's nested folds from a fake training whose predictions depend on its TRAINING labels: a held
    sample's prediction is a hash of the sum of the training labels, the bias and its own index."""
    plan = SearchPlan({}, {}, (), groups, 3, 1.0, 0.0, 1)

    def train(helds):
        out = []
        for held in helds:
            seen = sum(v for s, v in labels.items() if s not in held)
            out.append({"subjects": held, "y_true": [labels[s] for s in held],
                        "y_pred": [hash((seen, bias, i)) % 2 for i, _ in enumerate(held)], "train_seconds": 0.0})
        return out

    return evaluate_candidate(plan, train)


def test_no_model_behind_a_groups_choice_was_trained_on_the_group():
    groups = {s: i // 4 for i, s in enumerate("abcdefghijkl")}  # 3 groups of 4
    labels = {s: (i * 7 % 5) % 2 for i, s in enumerate("abcdefghijkl")}

    def trials(lab):
        return [{"number": n, "params": {"bias": n}, "folds": _nested(groups, lab, n)} for n in range(4)]

    base = choose(trials(labels), groups, 3)
    assert all(len(t["folds"]) == 3 and all(len(f["pair"]) == 2 for f in t["folds"]) for t in trials(labels))
    moved_elsewhere = False
    for g in range(3):
        # every label of group g changed: as ground truth AND as training data of every model
        changed = {s: (1 - v if groups[s] == g else v) for s, v in labels.items()}
        again = choose(trials(changed), groups, 3)
        assert again[g]["trial"] == base[g]["trial"] and again[g]["validation_uf1"] == base[g]["validation_uf1"]
        moved_elsewhere |= any(again[h]["validation_uf1"] != base[h]["validation_uf1"] for h in range(3) if h != g)
    assert moved_elsewhere  # the change reaches the other groups' scores: the test can fail
    best, value = best_on_all(trials(labels), groups, 3)
    assert value == pytest.approx(np.mean([inner_scores(best["folds"], groups, 3)[g] for g in range(3)]))
    with pytest.raises(ValueError, match="no valid"):
        choose([{"number": 0, "params": {}, "folds": []}], groups, 3)
    with pytest.raises(ValueError, match="earlier design"):  # one held-out group per training: refused
        choose([{"number": 0, "params": {}, "folds": [{"subjects": ["a"], "y_true": [0], "y_pred": [0]}]}], groups, 3)


def test_a_choices_file_replays_its_stored_settings_whatever_the_profiles_say_later(monkeypatch):
    from grid import config as grid_config
    from grid.cells import build_cells
    from grid.config import GridConfig
    from grid.data import ProtocolData

    n = 12
    d = ProtocolData("toy/SDE", "toy", "SDE", "c1", np.zeros((n, 28, 28, 3), np.float32), np.arange(n) % 3,
                     np.repeat(["a", "b", "c"], 4), np.array([f"x{i}" for i in range(n)]), np.array(["toy"] * n),
                     ["x", "y", "z"], "unit")
    cfg = GridConfig(presets=["epir"], profile="demo")
    model, recipe, _ = cfg.settings("epir", "demo", 3)
    stored = {"model": {**model, "dim": 24, "merge_k": 2}, "recipe": {**{k: v for k, v in recipe.items() if k != "seed"},
                                                                       "lr": 3e-3, "flow_range": "unit"},
              "searched_model_fields": ["merge_k"]}
    choices = {"format": 2, "study": "toy-study", "dataset": "toy/SDE", "preset": "epir", "profile": "demo",
               "subjects": {"a": 0, "b": 1, "c": 2},
               "groups": {str(g): {"trial": 1, "params": {"merge_k": 2, "lr": 3e-3}, "validation_uf1": 0.5, **stored}
                          for g in range(3)}}

    def cells(presets):
        c = GridConfig(presets=presets, profile="demo", choices=choices, seeds=[0])
        return build_cells(c, {d.key: d}, "demo")

    before = cells(["epir", "baseline"])
    monkeypatch.setitem(grid_config.PROFILES, "demo", {**grid_config.PROFILES["demo"], "dim": 48, "lr": 9e-4})
    after = cells(["epir", "baseline"])
    assert [c.cell_id for c in before] == [c.cell_id for c in after]  # the same cells: nothing trains again
    epir, baseline = after
    assert epir.fold_model("a") == stored["model"] and epir.fold_recipe("a")["lr"] == 3e-3
    assert epir.fold_recipe("a")["epochs"] == stored["recipe"]["epochs"]
    # the baseline keeps its own components but trains what the search validated otherwise
    assert (baseline.fold_model("a")["tokenizer"], baseline.fold_model("a")["itals"]) == ("linear", False)
    assert baseline.fold_model("a")["dim"] == 24 and baseline.fold_model("a")["merge_k"] == 2  # merge_k was searched

    # a source dataset cut from the searched data (SMIC-HS from the composite) replays each of ITS subjects' own
    # group's choice, labelled with where the choice was made; other data is refused
    part = dataclasses.replace(d, key="toy-b/SDE", dataset="toy-b", flows=d.flows[4:8], labels=d.labels[4:8],
                               subjects=d.subjects[4:8], sample_ids=d.sample_ids[4:8], groups=d.groups[4:8],
                               subset_of="toy/SDE")
    sub, = build_cells(GridConfig(presets=["epir"], profile="demo", choices=choices, seeds=[0]), {part.key: part}, "demo")
    assert sub.subjects == ["b"] and sub.fold_model("b") == stored["model"] and sub.profile.endswith("on toy/SDE")
    with pytest.raises(ValueError, match="were made on toy/SDE, not other/SDE"):
        build_cells(GridConfig(presets=["epir"], profile="demo", choices=choices, seeds=[0]),
                    {"other/SDE": dataclasses.replace(part, key="other/SDE", subset_of="")}, "demo")


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
    base = ["search", *common, "--val-groups", "3", "--space", "lr=loguniform:1e-3:1e-2",
            "--space", "tokenizer=choice:spt,dnspt"]
    first = run_grid_cli([*base, "--trials", "1", "--no-evaluate", "--no-final-model"], tmp_path)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "0 trials completed earlier, 1 to run" in out and "[trial 1/1]" in out, out[-3000:]
    # extend the stored study by one trial, then test the choices honestly on the test subjects
    second = run_grid_cli([*base, "--trials", "2"], tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "1 trials completed earlier, 1 to run" in out, out[-3000:]
    assert "test subjects, each trained with its group's choice, reported once: UF1" in out
    out_search = out
    res = tmp_path / "results" / "lab-search"
    choices = json.loads((res / "demo_manifest-SDE-epir-demo.choices.json").read_text())
    assert choices["trials_completed"] == 2 and set(choices["groups"]) == {"0", "1", "2"}
    assert sorted(choices["subjects"].values()) == [0, 0, 1, 2] and choices["format"] == 2
    for c in choices["groups"].values():
        assert set(c["params"]) == {"lr", "tokenizer"} and 1e-3 <= c["params"]["lr"] <= 1e-2
        assert c["recipe"]["lr"] == c["params"]["lr"] and c["model"]["tokenizer"] == c["params"]["tokenizer"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lab-search")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("epir.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("epir.kind") == "search_trial"]
    assert len(parent) == 1 and len(trials) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent[0].info.run_id}
    for r in trials:
        assert {"lr", "tokenizer"} <= set(r.data.params) and {"val_uf1", "val_uf1_g0", "val_uf1_g2"} <= set(r.data.metrics)
        assert len(json.loads(open(client.download_artifacts(r.info.run_id, "folds.json")).read())) == 3  # 3 pairs
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
    # the search ends with a model: its best-on-all candidate on every subject, which predict applies
    uri = parent[0].data.tags["epir.model_uri"]
    assert "final model (that candidate trained on all subjects" in out_search
    frames = tmp_path / "lab" / "frames" / "demo01" / "demo01_pos_01"
    pred = run_grid_cli(["predict", uri, "--onset", str(frames / "onset.png"), "--apex", str(frames / "apex.png")],
                        tmp_path)
    assert pred.returncode == 0 and "apex.png: " in pred.stdout and "positive" in pred.stdout, pred.stderr[-2000:]
    # the configuration chosen on every subject is refused on this dataset: it would peek
    peek = run_grid_cli([*common, "--presets", "epir", "--overrides", str(res / "demo_manifest-SDE-epir-demo.best.json")],
                        tmp_path)
    assert peek.returncode == 2 and "would peek" in peek.stderr, peek.stderr[-2000:]
    assert "Ray:" not in peek.stdout  # refused from the configuration, before Ray starts or data is prepared


def test_a_resumed_random_search_draws_what_an_uninterrupted_one_would_have():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from grid.study import planned_candidates, replay_interrupted

    scfg = SearchConfig(trials=6, space=parse_space(["lr=loguniform:1e-4:1e-2", "depth=int:2:4",
                                                     "tokenizer=choice:spt,dnspt"]), seed=3)
    space = OptunaSearch.convert_search_space({k: v.tune() for k, v in scfg.space.items()})
    whole = planned_candidates(scfg, 6)
    assert len({str(p) for p in whole}) == 6
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(2):  # two trials, then the process stops
        t = study.ask(fixed_distributions=space)
        study.tell(t, 0.5)
    resumed = optuna.load_study(study_name=study.study_name, storage=study._storage,
                                sampler=optuna.samplers.RandomSampler(seed=3))
    assert replay_interrupted(resumed, scfg) == 4
    rest = []
    for _ in range(4):
        t = resumed.ask(fixed_distributions=space)
        rest.append(t.params)
        resumed.tell(t, 0.5)
    assert [t.params for t in study.trials[:2]] + rest == whole
    fresh = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    assert fresh.ask(fixed_distributions=space).params == whole[0]  # without the replay: trial 1 again
