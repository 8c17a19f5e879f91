"""Hyper-parameter search with a strict rule: no model behind the configuration used for test subject s was
trained on s, and no validation score it was chosen by involves s's labels (the design: docs/search.md).

This module runs it on Ray: (1) a trial (one candidate) trains its k(k-1)/2 pair trainings as Ray tasks in its
placement group (:func:`grid.nested.evaluate_candidate`); (2) the trials run as Ray Tune trials under
``OptunaSearch`` with a sampler that never looks at a score, resumed from the study's database
(:mod:`grid.study`); (3) the result: each group's choice and the best-on-all candidate (:mod:`grid.choices`),
the honest LOSO cell of the choices, and the best-on-all candidate trained on all subjects as the search's model.
The space is :mod:`grid.space`, the nested scoring :mod:`grid.nested`, its MLflow runs :mod:`grid.search_tracking`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from epir.metrics import uar
from epir.presets import config_from_dict
from epir.registry import import_model_modules
from epir.train import TrainRecipe
from preprocess.runtime import init_ray

from . import schema, search_tracking, tracking
from .cells import build_cells, split_params
from .choices import write_choices
from .config import GridConfig
from .data import ProtocolData
from .nested import SearchPlan, best_on_all, choose, evaluate_candidate, group_fold, inner_scores, validation_groups
from .resources import check_fit
from .runner import prepare_data, run_grid
from .space import SearchConfig, check_space
from .study import completed, replay_interrupted, sampler, typed
from .trainable import train_final


def _group_task(data, held: list[str], model: dict, recipe: dict, threads: int, model_modules=()) -> dict:
    import_model_modules(model_modules)
    torch.set_num_threads(max(1, threads))
    return group_fold(data.model_flows(config_from_dict(model)), data.labels, data.subjects, held, model, recipe)


def search_trial(config: dict, data: ProtocolData, plan: SearchPlan) -> None:
    """Ray Tune trainable of one Optuna trial: the candidate's k(k-1)/2 nested trainings as Ray tasks in the
    trial's placement group; reports ``val_uf1`` (the mean of the groups' inner scores, for the record),
    ``val_uf1_g<g>`` per group, ``val_uar`` (all held-out predictions pooled) and the per-pair predictions
    (JSON) once at the end. A configuration the model refuses (e.g. more integration blocks than depth
    allows) reports ``invalid`` and is never chosen."""
    import_model_modules(plan.model_modules)  # a user's models, shipped by Ray: registered before any config
    params = {k: config[k] for k in plan.space}
    model, recipe = split_params(params, plan.model, plan.recipe)
    try:
        config_from_dict(model)
        TrainRecipe(**recipe)
    except (ValueError, TypeError) as e:
        tune.report({"val_uf1": 0.0, "val_uar": 0.0, "invalid": str(e), "folds_json": "[]", "train_seconds": 0.0})
        return
    ref = ray.put(data)
    task = ray.remote(_group_task).options(num_cpus=plan.cpus, num_gpus=plan.gpus, max_retries=2)
    folds = evaluate_candidate(plan, lambda helds: ray.get([task.remote(ref, h, model, recipe, plan.threads,
                                                                        plan.model_modules) for h in helds]))
    inner = inner_scores(folds, plan.groups, plan.k)
    yt = np.concatenate([f["y_true"] for f in folds]).astype(int)
    yp = np.concatenate([f["y_pred"] for f in folds]).astype(int)
    tune.report({"val_uf1": float(np.mean(list(inner.values()))), "val_uar": uar(yt, yp), "invalid": "",
                 "train_seconds": sum(f["train_seconds"] for f in folds), "folds_json": json.dumps(folds),
                 **{f"val_uf1_g{g}": v for g, v in inner.items()}})


@dataclass
class SearchOutcome:
    """A search's result: each group's choice, the overall best (for new data), the honest test cell and the
    final model."""

    study: str
    storage: str
    choices: dict
    best: dict
    best_value: float
    completed: int
    ran_now: int
    choices_path: Path
    best_path: Path
    test: dict | None = None
    model_uri: str | None = None


@dataclass
class _Setup:
    """A search's data, settings and resources, found before its study opens."""

    cfg: GridConfig
    scfg: SearchConfig
    data: ProtocolData
    preset: str
    profile: str
    label: str
    plan: SearchPlan
    bundles: list[dict]
    study: str
    storage_url: str


def _setup(cfg: GridConfig, scfg: SearchConfig, log) -> _Setup:
    """One dataset, protocol and preset; the base settings; the groups; the trials' resources (refused now
    when the cluster could never hold them)."""
    if len(cfg.presets) != 1:
        raise ValueError(f"a search tunes one preset; got {cfg.presets} (use --presets epir)")
    preset = cfg.presets[0]
    res = init_ray(py_modules=[str(f) for f in cfg.model_files]).cluster_resources()
    has_gpu = res.get("GPU", 0) > 0
    profile = cfg.resolved_profile(has_gpu)
    check_space(scfg.space, cfg.settings(preset, profile, 3)[0])  # before any data is prepared
    data = prepare_data(cfg, log)
    if len(data) != 1:
        raise ValueError(f"a search runs on one dataset and one protocol; got {list(data)} "
                         "(give --dataset FORMAT=ROOT:SDE or :CDE)")
    ((_, d),) = data.items()
    model, recipe, label = cfg.settings(preset, profile, len(d.classes), cfg.seeds[0])
    recipe["flow_range"] = d.flow_range
    cpus = cfg.cpus_per_trial
    gpus = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else (0.25 if has_gpu else 0.0)
    slots = int(res.get("CPU", 0) // cpus)
    if gpus:
        slots = min(slots, int(res.get("GPU", 0) // gpus))
    pairs = scfg.groups * (scfg.groups - 1) // 2
    parallel = scfg.fold_parallel or max(1, min(pairs, slots // scfg.concurrent_trials))
    bundle = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    bundles = [{}] + [dict(bundle) for _ in range(parallel)]  # an empty head bundle: the trial only waits
    check_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], bundles)
    plan = SearchPlan(model, recipe, tuple(scfg.space), validation_groups(d.subjects, d.groups, scfg.groups, scfg.seed),
                      scfg.groups, cpus, gpus, max(1, int(cpus)), tuple(f.stem for f in cfg.model_files))
    study = scfg.study or f"{d.dataset}-{d.protocol}-{preset}-{label}".replace("+", "")
    return _Setup(cfg, scfg, d, preset, profile, label, plan, bundles, study,
                  scfg.storage or f"sqlite:///{Path.cwd() / 'optuna.db'}")


class _TrialLogger(tune.Callback):
    """Tune callback (driver side): one MLflow child run per finished trial, one progress line."""

    def __init__(self, client, exp_id: str, parent: str, s: _Setup, remaining: int, log):
        self.client, self.exp_id, self.parent, self.s, self.remaining, self.log = client, exp_id, parent, s, remaining, log
        self.n = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if "val_uf1" not in r:
            return
        self.n += 1
        params = {k: trial.config[k] for k in self.s.plan.space}
        search_tracking.log_search_trial(self.client, self.exp_id, self.parent, self.s.study, trial.trial_id, params, r)
        what = f"INVALID ({r['invalid']})" if r.get("invalid") else \
            f"mean inner validation UF1 {r['val_uf1']:.4f} ({r['train_seconds'] / 60:.1f} min of training)"
        self.log(f"[trial {self.n}/{self.remaining}] " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()) + f": {what}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"  FAILED search trial {trial.trial_id}: {trial.error_file}")


def _run_trials(s: _Setup, client, exp_id: str, parent: str, remaining: int, log) -> int:
    """The trials the study still lacks, as Ray Tune trials with Optuna's sampler; returns how many ran."""
    if not remaining:
        return 0
    try:
        study = optuna.load_study(study_name=s.study, storage=optuna.storages.RDBStorage(s.storage_url))
        if replay_interrupted(study, s.scfg, log):
            log(f"  resuming: the next {remaining} candidates are those an uninterrupted run would have drawn")
    except KeyError:  # a new study
        pass
    searcher = OptunaSearch(metric="val_uf1", mode="max", study_name=s.study, seed=s.scfg.seed,
                            storage=optuna.storages.RDBStorage(s.storage_url), sampler=sampler(s.scfg))
    trainable = tune.with_resources(tune.with_parameters(search_trial, data=s.data, plan=s.plan),
                                    tune.PlacementGroupFactory(s.bundles, strategy="PACK"))
    logger = _TrialLogger(client, exp_id, parent, s, remaining, log)
    tune.Tuner(
        trainable, param_space={k: v.tune() for k, v in s.scfg.space.items()},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                    max_concurrent_trials=s.scfg.concurrent_trials),
        run_config=tune.RunConfig(name=f"search-{s.study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str((s.cfg.work_dir / "ray_results").resolve()),
                                  failure_config=tune.FailureConfig(max_failures=s.cfg.max_failures),
                                  callbacks=[logger], verbose=0),
    ).fit()
    return logger.n


def _evaluate(s: _Setup, choices_path: Path, log) -> dict | None:
    """The honest LOSO cell(s) of the choices (one per seed): mean UF1 / UAR over the seeds."""
    log("honest LOSO test of the choices (each test subject trains its group's choice):")
    g = run_grid(dataclasses.replace(s.cfg, presets=[s.preset], profile=s.profile,
                                     choices=json.loads(choices_path.read_text())), log)
    done = [c for c in g.cells if c.cell_id in g.scores]
    if not done:
        return None
    vals = [g.scores[c.cell_id]["all"] for c in done]
    return {"uf1": float(np.mean([v["uf1"] for v in vals])), "uar": float(np.mean([v["uar"] for v in vals])),
            "cells": [c.name for c in done], "cell_ids": [c.cell_id for c in done], "seeds": [c.seed for c in done]}


def _final_model(s: _Setup, client, exp_id: str, parent: str, overall: dict, test: dict | None, log) -> str:
    """The best-on-all candidate trained on ALL subjects (a Ray task), logged as an MLflow model on the search's
    parent run; its metadata gives the nested cell's honest score as its expected score."""
    cfg = dataclasses.replace(s.cfg, presets=[s.preset], overrides={**s.cfg.overrides, **overall["params"]},
                              choices=None, overrides_from=None)
    (cell,) = build_cells(cfg, {s.data.key: s.data}, s.profile)[:1]
    path = (s.cfg.work_dir / "models" / f"search-{s.study}-final.pt").resolve()

    def train(data, model: dict, recipe: dict, threads: int) -> dict:
        torch.set_num_threads(threads)
        return train_final(data, config_from_dict(model), TrainRecipe(**recipe), path)

    task = ray.remote(train).options(num_cpus=s.plan.cpus, num_gpus=s.plan.gpus)
    final = ray.get(task.remote(s.data, cell.model, cell.recipe, s.plan.threads))
    expected = {"expected_uf1": test["uf1"], "expected_uar": test["uar"], "expected_from": test["cell_ids"]} if test else {}
    uri = search_tracking.log_search_model(client, exp_id, parent, cell, final, s.study, expected)
    log(f"final model: the best-on-all candidate trained on all {final['samples']} samples "
        f"({final['train_seconds']:.1f} s): {uri}" + (f"; expected UF1 {test['uf1']:.4f} (the nested cell)" if test else ""))
    return uri


def run_search(cfg: GridConfig, scfg: SearchConfig, log=print) -> SearchOutcome:
    """Run (or resume, or extend) a search on one dataset, protocol and preset of ``cfg``, choose each
    validation group's configuration, run the honest LOSO cell of the choices (``scfg.evaluate``) and train
    the final model (``scfg.final_model``).

    Args:
        cfg: a :class:`grid.config.GridConfig` with one dataset (one protocol) and one preset; its
            profile, overrides, folds, seeds, resources and experiment apply.
        scfg: the search settings.
        log: receives one-line progress messages.

    Raises:
        ValueError: not exactly one dataset/protocol/preset, a space field the preset cannot take, trial
            bundles that cannot fit the cluster, or a study of the earlier design.
    """
    s = _setup(cfg, scfg, log)
    done = completed(s)
    remaining = max(0, scfg.trials - done)
    log(f"search '{s.study}' ({s.storage_url}): {s.data.key}, preset {s.preset}, profile {s.label}; space "
        + ", ".join(f"{k}={v.describe()}" for k, v in scfg.space.items()) + f"; {scfg.sampler} sampler; {scfg.groups} "
        f"validation groups ({len(s.plan.groups)} subjects), {len(s.plan.pairs())} nested trainings per candidate, "
        f"{len(s.bundles) - 1} at once ({s.bundles[1]} each); {done} trials completed earlier, {remaining} to run")
    client, exp_id = tracking.setup(cfg.experiment)
    parent = search_tracking.search_parent_run(client, exp_id, s.study, s.storage_url, s.data, s.preset, s.label,
                                        {**schema.flat_params(schema.MODEL, s.plan.model),
                                         **schema.flat_params(schema.RECIPE, s.plan.recipe),
                                         **{f"space.{k}": v.describe() for k, v in scfg.space.items()},
                                         "sampler": scfg.sampler, "val_groups": str(scfg.groups), "seed": str(scfg.seed),
                                         "design": "nested pairs"})
    ran = _run_trials(s, client, exp_id, parent, remaining, log)
    trials = search_tracking.search_trials(client, exp_id, s.study, {k: lambda t, d=d: typed(t, d) for k, d in scfg.space.items()})
    if not trials:
        raise RuntimeError(f"study '{s.study}' has no completed trial")
    choices = choose(trials, s.plan.groups, scfg.groups)
    overall, value = best_on_all(trials, s.plan.groups, scfg.groups)
    choices_path, best_path = write_choices(s, trials, choices, overall, value)
    search_tracking.log_search_result(client, parent, choices_path, best_path, value, len(trials),
                               optuna.load_study(study_name=s.study, storage=optuna.storages.RDBStorage(s.storage_url)),
                               log)
    outcome = SearchOutcome(s.study, s.storage_url, choices, overall["params"], value, len(trials), ran,
                            choices_path, best_path)
    for g, c in choices.items():
        ru = c["runner_up"]
        log(f"group {g} ({len(c['subjects'])} test subjects): trial {c['trial']} {c['params']}, inner validation UF1 "
            f"{c['validation_uf1']:.4f}" + (f" (runner-up: trial {ru[0]}, {ru[1]:.4f})" if ru else ""))
    if scfg.evaluate:
        outcome.test = _evaluate(s, choices_path, log)
        if outcome.test:
            search_tracking.log_search_test(client, parent, outcome.test)
    if scfg.final_model:
        outcome.model_uri = _final_model(s, client, exp_id, parent, overall, outcome.test, log)
    search_tracking.finish_search(client, parent)
    return outcome


