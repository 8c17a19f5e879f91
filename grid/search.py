"""Hyper-parameter search with a strict rule: the configuration used for test subject s is chosen by
validation scores that never involve s's labels.

- **Space**: any TrainRecipe field or model field of the preset's family (``--space lr=loguniform:1e-4:3e-3
  --space tokenizer=choice:spt,dnspt``, or ``[search.space]`` in the grid TOML); by default the
  contrastive margin alpha (EPIR eq. 23), the initial ITALS temperature (eqs. 10-16) and the merge count
  K (eqs. 5-9).
- **Validation groups**: the dataset's subjects are dealt into K groups (``--val-groups``, 5; seeded,
  each source dataset spread over all groups). A trial evaluates one configuration by K trainings: the
  model trained on every other group predicts group g. Every sample thus gets one out-of-group
  ("validation") prediction, and no model ever predicts a subject it trained on.
- **Candidates**: Optuna draws them with a sampler that never looks at a score (``random``: Optuna's
  ``RandomSampler``; ``qmc``: scrambled Sobol, ``QMCSampler``; ``grid``: every combination of choice
  spaces), so which configurations were tried cannot depend on any subject's labels either. (An adaptive
  sampler such as TPE would propose the next candidate from every group's validation score.)
- **Choice per group**: for the test subjects of group g, the chosen configuration is the candidate with
  the best validation UF1 pooled over the OTHER groups' samples; group g's predictions are left out.
  s's labels took part only as training data of models that predicted other subjects.
- **Result**: ``<study>.choices.json`` (each group's choice, its validation UF1 and the runner-up) and an
  honest LOSO cell in which each test subject's fold trains the configuration chosen for its group; each
  child run says which configuration it used and why (``grid.runner``). Both files keep the search's
  base settings (``base``: its ``--set`` values). ``<study>.best.json`` holds the candidate best on ALL
  groups with the base (``overrides``): for new data; on this dataset it would have seen every subject.
- Trials run as Ray Tune trials (``OptunaSearch`` with the chosen sampler), each trial's K trainings as
  Ray tasks inside the trial's placement group. The Optuna study lives in a database (SQLite
  ``optuna.db`` by default): a re-run with the same study name resumes it or extends it (``trials`` is
  the study's target size). MLflow: one parent run per search, one child run per trial.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epir.metrics import uar, uf1

from .cells import split_params

SAMPLERS = ("random", "qmc", "grid")
KINDS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Dist:
    """One searched field: ``uniform`` / ``loguniform`` floats or ``int`` in [low, high], or ``choice``."""

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"distribution must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices:
                raise ValueError("a choice needs at least one value")
        elif self.low is None or self.high is None or self.low > self.high or (self.kind == "loguniform" and self.low <= 0):
            raise ValueError(f"{self.kind} needs low <= high (and low > 0 for loguniform), got {self.low}, {self.high}")

    def tune(self):
        """The Ray Tune search-space object (OptunaSearch converts it to an Optuna distribution)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.choices))
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(self.low, self.high)

    def describe(self) -> str:
        """``kind:low:high`` or ``choice:a,b``: the form ``--space`` takes."""
        if self.kind == "choice":
            return "choice:" + ",".join(json.dumps(c) if not isinstance(c, str) else c for c in self.choices)
        return f"{self.kind}:{self.low:g}:{self.high:g}"


def parse_dist(text: str) -> Dist:
    """``uniform:LO:HI``, ``loguniform:LO:HI``, ``int:LO:HI`` or ``choice:A,B,...`` -> :class:`Dist`.
    Choice values are read as JSON where they parse (``true``, ``3``, ``0.1``), else kept as text.

    Raises:
        ValueError: for a malformed text.
    """
    kind, _, rest = text.partition(":")
    if kind == "choice":
        values = []
        for v in rest.split(","):
            try:
                values.append(json.loads(v))
            except json.JSONDecodeError:
                values.append(v)
        return Dist("choice", choices=tuple(values))
    lo, _, hi = rest.partition(":")
    try:
        return Dist(kind, float(lo), float(hi))
    except ValueError as e:
        raise ValueError(f"search space {text!r}: expected {'|'.join(KINDS[:3])}:LOW:HIGH or choice:A,B ({e})") from None


DEFAULT_SPACE = {"alpha": Dist("uniform", 0.0, 0.8), "temperature": Dist("loguniform", 1.0, 16.0),
                 "merge_k": Dist("int", 0, 2)}


def parse_space(items: list[str] | dict | None) -> dict[str, Dist]:
    """``["FIELD=DIST", ...]`` or ``{FIELD: DIST}`` (TOML) -> ``{field: Dist}``; empty -> ``DEFAULT_SPACE``.

    Raises:
        ValueError: for a malformed item.
    """
    if not items:
        return dict(DEFAULT_SPACE)
    pairs = items.items() if isinstance(items, dict) else [i.partition("=")[::2] for i in items]
    out = {}
    for k, v in pairs:
        if not k or not v:
            raise ValueError(f"search space item {k}={v}: expected FIELD=DIST")
        out[k.strip()] = v if isinstance(v, Dist) else parse_dist(str(v).strip())
    return out


@dataclass
class SearchConfig:
    """What a search runs (see the module docstring). ``trials`` is the study's target size."""

    trials: int = 20
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))
    groups: int = 5
    sampler: str = "random"
    fold_parallel: int = 0
    concurrent_trials: int = 1
    study: str | None = None
    storage: str | None = None
    seed: int = 0
    evaluate: bool = True

    def __post_init__(self):
        if self.trials < 1 or self.groups < 2 or self.fold_parallel < 0 or self.concurrent_trials < 1:
            raise ValueError("trials >= 1, groups >= 2, fold_parallel >= 0, concurrent_trials >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "grid" and any(d.kind != "choice" for d in self.space.values()):
            raise ValueError("the grid sampler needs every searched field as choice:A,B,...")


def validation_groups(subjects, strata, k: int, seed: int) -> dict[str, int]:
    """Deal the subjects into ``k`` validation groups: shuffled (seeded) within each stratum (source
    dataset), then dealt in turn over the groups, so each group holds a share of every stratum and the
    group sizes differ by at most one.

    Args:
        subjects: (N,) subject of each sample; strata: (N,) its stratum (e.g. source dataset).

    Returns:
        subject -> group index in 0..k-1.

    Raises:
        ValueError: fewer subjects than groups.
    """
    stratum = {}
    for s, g in zip(np.asarray(subjects).astype(str), np.asarray(strata).astype(str)):
        stratum.setdefault(s, g)
    if len(stratum) < k:
        raise ValueError(f"{len(stratum)} subjects cannot fill {k} validation groups (--val-groups)")
    rng = np.random.default_rng(seed)
    order = []
    for g in sorted(set(stratum.values())):
        members = sorted(s for s, t in stratum.items() if t == g)
        order += [members[i] for i in rng.permutation(len(members))]
    return {s: i % k for i, s in enumerate(order)}


def group_fold(flows: np.ndarray, labels: np.ndarray, subjects: np.ndarray, held: list[str], model: dict,
               recipe: dict) -> dict:
    """One validation training: fit on every subject not in ``held``, predict the ``held`` subjects.

    Args:
        flows, labels, subjects: (N, H, W, 3), (N,), (N,) of the whole dataset.
        held: the validation group's subjects.
        model, recipe: model config dict (:func:`epir.presets.config_to_dict`) and TrainRecipe fields.

    Returns:
        ``{"held", "subjects", "y_true", "y_pred", "train_seconds"}`` for the held samples.

    Raises:
        ValueError: no held or no training sample.
    """
    from epir.presets import config_from_dict
    from epir.train import TrainRecipe, fit_all, predict, to_model_input

    subjects = np.asarray([str(s) for s in subjects])
    is_held = np.isin(subjects, held)
    if not is_held.any() or is_held.all():
        raise ValueError(f"validation group {held} leaves no held or no training sample")
    rec = TrainRecipe(**recipe)
    config = config_from_dict(model)
    start = time.perf_counter()
    net, _ = fit_all(config, rec, flows[~is_held], labels[~is_held])  # an ensemble as train_fold makes it
    probs = predict(net, to_model_input(flows[is_held], config, rec.flow_range), rec.batch_size)
    return {"held": sorted(held), "subjects": subjects[is_held].tolist(), "y_true": labels[is_held].tolist(),
            "y_pred": probs.argmax(-1).tolist(), "train_seconds": time.perf_counter() - start}


def _group_task(data, held: list[str], model: dict, recipe: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(max(1, threads))
    return group_fold(data.flows, data.labels, data.subjects, held, model, recipe)


def check_space(space: dict, model: dict) -> None:
    """Refuse a searched field that neither TrainRecipe nor the preset's model family has, or the seed.

    Raises:
        ValueError: naming the fields.
    """
    from epir.presets import family_fields
    from epir.train import TrainRecipe

    known = set(TrainRecipe.__dataclass_fields__) | family_fields(model["family"])
    bad = sorted(set(space) - known)
    if bad:
        raise ValueError(f"cannot search {bad}: not a TrainRecipe field nor a field of the {model['family']} model")
    if "seed" in space or "flow_range" in space:
        raise ValueError("seed and flow_range are not hyper-parameters (the seed: --seeds on the grid)")


def search_trial(config: dict, data, spec: dict) -> None:
    """Ray Tune trainable of one Optuna trial: the configuration's K validation trainings as Ray tasks in
    the trial's placement group; reports ``val_uf1`` / ``val_uar`` (all groups pooled, for the record),
    ``val_uf1_g<k>`` per group and the predictions (JSON) once at the end. A configuration the model
    refuses (e.g. more integration blocks than depth allows) reports ``invalid`` and is never chosen."""
    import ray
    from ray import tune

    from epir.presets import config_from_dict
    from epir.train import TrainRecipe

    params = {k: config[k] for k in spec["space"]}
    model, recipe = split_params(params, spec["model"], spec["recipe"])
    try:
        config_from_dict(model)
        TrainRecipe(**recipe)
    except (ValueError, TypeError) as e:
        tune.report({"val_uf1": 0.0, "val_uar": 0.0, "invalid": str(e), "folds_json": "[]", "train_seconds": 0.0})
        return
    ref = ray.put(data)
    task = ray.remote(_group_task).options(num_cpus=spec["cpus"], num_gpus=spec["gpus"], max_retries=2)
    held = [[s for s, g in spec["groups"].items() if g == k] for k in range(spec["k"])]
    folds = ray.get([task.remote(ref, h, model, recipe, spec["threads"]) for h in held])
    yt = np.concatenate([f["y_true"] for f in folds]).astype(int)
    yp = np.concatenate([f["y_pred"] for f in folds]).astype(int)
    out = {"val_uf1": uf1(yt, yp), "val_uar": uar(yt, yp), "invalid": "",
           "train_seconds": sum(f["train_seconds"] for f in folds), "folds_json": json.dumps(folds)}
    for k, f in enumerate(folds):
        out[f"val_uf1_g{k}"] = uf1(f["y_true"], f["y_pred"])
    tune.report(out)


def choose(trials: list[dict], groups: dict[str, int], k: int) -> dict[int, dict]:
    """Each validation group's configuration, chosen WITHOUT that group's labels.

    Args:
        trials: completed trials, each ``{"number", "params", "folds"}`` with ``folds`` as
            :func:`group_fold` returns them (``invalid`` trials are skipped).
        groups: subject -> group; k: number of groups.

    Returns:
        group -> ``{"trial", "params", "validation_uf1" (pooled over the other groups), "runner_up"
        (trial, validation UF1) or None, "subjects"}``. Ties go to the earlier trial.

    Raises:
        ValueError: no valid trial.
    """
    valid = [t for t in trials if t["folds"]]
    if not valid:
        raise ValueError("no valid trial to choose from")
    out = {}
    for g in range(k):
        scored = []
        for t in valid:
            yt, yp = [], []
            for f in t["folds"]:
                for s, a, b in zip(f["subjects"], f["y_true"], f["y_pred"]):
                    if groups[s] != g:  # group g's own predictions never take part in its choice
                        yt.append(a)
                        yp.append(b)
            scored.append((uf1(yt, yp), -t["number"], t))
        scored.sort(key=lambda x: (x[0], x[1]), reverse=True)
        best = scored[0]
        out[g] = {"trial": best[2]["number"], "params": best[2]["params"], "validation_uf1": best[0],
                  "runner_up": (scored[1][2]["number"], scored[1][0]) if len(scored) > 1 else None,
                  "subjects": sorted(s for s, gg in groups.items() if gg == g)}
    return out


@dataclass
class SearchOutcome:
    """A search's result: each group's choice, the overall best (for new data) and the honest test cell."""

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


def _sampler(scfg: SearchConfig):
    import optuna

    if scfg.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=scfg.seed, scramble=True, warn_independent_sampling=False)
    if scfg.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in scfg.space.items()}, seed=scfg.seed)
    return optuna.samplers.RandomSampler(seed=scfg.seed)


def run_search(cfg, scfg: SearchConfig, log=print) -> SearchOutcome:
    """Run (or resume, or extend) a search on one dataset, protocol and preset of ``cfg``, choose each
    validation group's configuration, and (``scfg.evaluate``) run the honest LOSO cell of the choices.

    Args:
        cfg: a :class:`grid.config.GridConfig` with one dataset (one protocol) and one preset; its
            profile, overrides, folds, seeds, resources and experiment apply.
        scfg: the search settings.
        log: receives one-line progress messages.

    Raises:
        ValueError: not exactly one dataset/protocol/preset, a space field the preset cannot take, or
            trial bundles that cannot fit the cluster.
    """
    import dataclasses

    import optuna
    from mlflow.entities import Metric, Param
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from . import tracking
    from preprocess.pipeline import init_ray

    from .runner import check_fit, prepare_data, run_grid

    if len(cfg.presets) != 1:
        raise ValueError(f"a search tunes one preset; got {cfg.presets} (use --presets epir)")
    preset = cfg.presets[0]
    ray = init_ray()
    res = ray.cluster_resources()
    has_gpu = res.get("GPU", 0) > 0
    profile = cfg.resolved_profile(has_gpu)
    model, recipe, label = cfg.settings(preset, profile, 3)
    check_space(scfg.space, model)  # before any data is prepared
    data = prepare_data(cfg, log)
    if len(data) != 1:
        raise ValueError(f"a search runs on one dataset and one protocol; got {list(data)} "
                         "(give --dataset FORMAT=ROOT:SDE or :CDE)")
    ((key, d),) = data.items()
    model, recipe, label = cfg.settings(preset, profile, len(d.classes), cfg.seeds[0])
    recipe["flow_range"] = d.flow_range
    groups = validation_groups(d.subjects, d.groups, scfg.groups, scfg.seed)
    cpus = cfg.cpus_per_trial
    gpus = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else (0.25 if has_gpu else 0.0)
    slots = int(res.get("CPU", 0) // cpus)
    if gpus:
        slots = min(slots, int(res.get("GPU", 0) // gpus))
    parallel = scfg.fold_parallel or max(1, min(scfg.groups, slots // scfg.concurrent_trials))
    bundle = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    bundles = [{}] + [dict(bundle) for _ in range(parallel)]  # an empty head bundle: the trial only waits
    check_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], bundles)
    study = scfg.study or f"{d.dataset}-{d.protocol}-{preset}-{label}".replace("+", "")
    storage_url = scfg.storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"
    storage = optuna.storages.RDBStorage(storage_url)
    try:
        done = sum(t.state == optuna.trial.TrialState.COMPLETE
                   for t in optuna.load_study(study_name=study, storage=storage).trials)
    except KeyError:
        done = 0
    remaining = max(0, scfg.trials - done)
    space_txt = ", ".join(f"{k}={v.describe()}" for k, v in scfg.space.items())
    log(f"search '{study}' ({storage_url}): {d.key}, preset {preset}, profile {label}; space {space_txt}; "
        f"{scfg.sampler} sampler; {scfg.groups} validation groups ({len(groups)} subjects), {parallel} trainings "
        f"at once ({bundle} each); {done} trials completed earlier, {remaining} to run")
    client, exp_id = tracking.setup(cfg.experiment)
    found = tracking.search_runs(client, exp_id, f"tags.`{tracking.TAG_KIND}` = 'search' and tags.`epir.study` = '{study}'")
    if found:
        parent = found[0].info.run_id
    else:
        run = client.create_run(exp_id, run_name=f"search {d.key} {preset}",
                                tags={tracking.TAG_KIND: "search", "epir.study": study, "epir.optuna_storage": storage_url,
                                      "epir.dataset": d.dataset, "epir.protocol": d.protocol, "epir.preset": preset,
                                      "epir.profile": label, "epir.git_commit": tracking.git_commit()})
        parent = run.info.run_id
        params = {**tracking.flat_params("model", model), **tracking.flat_params("recipe", recipe),
                  **{f"space.{k}": v.describe() for k, v in scfg.space.items()}, "sampler": scfg.sampler,
                  "val_groups": str(scfg.groups), "seed": str(scfg.seed)}
        client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    spec = dict(model=model, recipe=recipe, space=list(scfg.space), groups=groups, k=scfg.groups, cpus=cpus, gpus=gpus,
                threads=max(1, int(cpus)))
    counter = {"n": 0}

    class Logger(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "val_uf1" not in r:
                return
            counter["n"] += 1
            p = {k: trial.config[k] for k in scfg.space}
            child = client.create_run(exp_id, run_name=f"trial {trial.trial_id}", tags={
                "mlflow.parentRunId": parent, tracking.TAG_KIND: "search_trial", "epir.study": study,
                "epir.invalid": r.get("invalid", "")})
            rid = child.info.run_id
            now = int(time.time() * 1000)
            keys = [k for k in r if k.startswith("val_u")] + ["train_seconds"]
            client.log_batch(rid, params=[Param(k, str(v)) for k, v in p.items()],
                             metrics=[Metric(k, float(r[k]), now, 0) for k in keys])
            client.log_text(rid, r["folds_json"], "folds.json")
            client.set_terminated(rid, "FINISHED")
            what = f"INVALID ({r['invalid']})" if r.get("invalid") else \
                f"validation UF1 {r['val_uf1']:.4f}, UAR {r['val_uar']:.4f} ({r['train_seconds'] / 60:.1f} min of training)"
            log(f"[trial {counter['n']}/{remaining}] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                                  for k, v in p.items()) + f": {what}")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"  FAILED search trial {trial.trial_id}: {trial.error_file}")

    if remaining:
        searcher = OptunaSearch(metric="val_uf1", mode="max", study_name=study, storage=storage, seed=scfg.seed,
                                sampler=_sampler(scfg))
        trainable = tune.with_resources(tune.with_parameters(search_trial, data=d, spec=spec),
                                        tune.PlacementGroupFactory(bundles, strategy="PACK"))
        tune.Tuner(
            trainable, param_space={k: v.tune() for k, v in scfg.space.items()},
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                        max_concurrent_trials=scfg.concurrent_trials),
            run_config=tune.RunConfig(name=f"search-{study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str((cfg.work_dir / "ray_results").resolve()),
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      callbacks=[Logger()], verbose=0),
        ).fit()
    trials = _completed_trials(client, exp_id, study, scfg.space)
    if not trials:
        raise RuntimeError(f"study '{study}' has no completed trial")
    choices = choose(trials, groups, scfg.groups)
    overall = max((t for t in trials if t["folds"]), key=lambda t: (t["value"], -t["number"]))
    out = cfg.results_dir / cfg.experiment
    out.mkdir(parents=True, exist_ok=True)
    meta = {"study": study, "optuna_storage": storage_url, "trials_completed": len(trials), "dataset": d.key,
            "shards": d.config_id, "preset": preset, "profile": label, "base": cfg.overrides, "sampler": scfg.sampler,
            "space": {k: v.describe() for k, v in scfg.space.items()}, "val_groups": scfg.groups, "seed": scfg.seed}
    choices_path = out / f"{study}.choices.json"
    choices_path.write_text(json.dumps({
        **meta, "groups": {str(g): c for g, c in choices.items()}, "subjects": groups,
        "note": "each group's configuration maximises validation UF1 pooled over the OTHER groups' subjects: "
                "a test subject's own labels never take part in the choice used for it"}, indent=2))
    best_path = out / f"{study}.best.json"
    best_path.write_text(json.dumps({
        **meta, "overrides": {**cfg.overrides, **overall["params"]}, "validation_uf1": overall["value"],
        "note": "best validation UF1 pooled over ALL subjects: for NEW data; on this dataset every subject's labels "
                "took part in this choice (evaluate it here with --choices on the .choices.json instead)"}, indent=2))
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric("best_val_uf1", float(overall["value"]), now, len(trials)),
                                      Metric("trials_completed", float(len(trials)), now, len(trials))])
    client.log_text(parent, choices_path.read_text(), "choices.json")
    client.log_text(parent, best_path.read_text(), "best.json")
    log_study_figures(client, parent, optuna.load_study(study_name=study, storage=storage), log)
    outcome = SearchOutcome(study, storage_url, choices, overall["params"], overall["value"], len(trials), counter["n"],
                            choices_path, best_path)
    for g, c in choices.items():
        ru = c["runner_up"]
        log(f"group {g} ({len(c['subjects'])} test subjects): trial {c['trial']} {c['params']}, validation UF1 "
            f"{c['validation_uf1']:.4f} on the other groups" + (f" (runner-up: trial {ru[0]}, {ru[1]:.4f})" if ru else ""))
    if scfg.evaluate:
        log("honest LOSO test of the choices (each test subject trains its group's choice):")
        ecfg = dataclasses.replace(cfg, presets=[preset], profile=profile, choices=json.loads(choices_path.read_text()))
        g = run_grid(ecfg, log)
        done_cells = [c for c in g.cells if c.cell_id in g.scores]
        if done_cells:
            vals = [g.scores[c.cell_id]["all"] for c in done_cells]
            outcome.test = {"uf1": float(np.mean([v["uf1"] for v in vals])), "uar": float(np.mean([v["uar"] for v in vals])),
                            "cells": [c.name for c in done_cells], "seeds": [c.seed for c in done_cells]}
            client.log_batch(parent, metrics=[Metric("test_uf1", outcome.test["uf1"], now, 0),
                                              Metric("test_uar", outcome.test["uar"], now, 0)])
            client.set_tag(parent, "epir.test_cells", ",".join(c.cell_id for c in done_cells))
    client.set_terminated(parent, "FINISHED")
    return outcome


def log_study_figures(client, run_id: str, study, log=print) -> None:
    """Optuna's optimisation history and parameter importances (PED-ANOVA, no scikit-learn needed) as
    figures of the search's parent run. They show the pooled validation UF1 of all groups: a picture of
    the search, not what any group's choice used."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in (("optuna_history.png", lambda: ov.plot_optimization_history(study)),
                           ("optuna_importances.png", lambda: ov.plot_param_importances(
                               study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()))):
            try:
                ax = plot()
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. too few trials for importances
                log(f"  no {name}: {e}")
                continue
            fig = ax.figure
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            client.log_figure(run_id, fig, name)
            plt.close(fig)


def _completed_trials(client, exp_id: str, study: str, space: dict) -> list[dict]:
    """The study's completed trials as MLflow holds them (params, pooled value, validation predictions),
    numbered 1, 2, ... in the order they finished (the log's ``[trial k/n]``)."""
    from . import tracking

    runs = tracking.search_runs(client, exp_id, f"tags.`{tracking.TAG_KIND}` = 'search_trial' and "
                                                f"tags.`epir.study` = '{study}' and attributes.status = 'FINISHED'")
    out = []
    for n, r in enumerate(sorted(runs, key=lambda r: r.info.start_time)):
        folds = json.loads(Path(client.download_artifacts(r.info.run_id, "folds.json")).read_text())
        params = {k: _typed(r.data.params[k], space[k]) for k in space if k in r.data.params}
        out.append({"number": n + 1, "params": params, "value": r.data.metrics.get("val_uf1", 0.0), "folds": folds,
                    "run_id": r.info.run_id})
    return out


def _typed(text: str, dist: Dist):
    """An MLflow param (text) back to the value the trial used."""
    if dist.kind == "int":
        return int(text)
    if dist.kind in ("uniform", "loguniform"):
        return float(text)
    for c in dist.choices:
        if str(c) == text:
            return c
    return text
