"""Hyper-parameter search: Optuna (TPE) through Ray Tune's ``OptunaSearch`` over the contrastive margin
alpha (EPIR eq. 23), the initial ITALS temperature (eqs. 10-16) and the merge count K (eqs. 5-9), for
one dataset, protocol and preset.

- One Optuna trial = one configuration evaluated over every LOSO fold. Its folds run in parallel as
  Ray tasks inside the trial's placement group (``fold_parallel`` bundles of ``cpus``/``gpus``); the
  bundles are checked against the cluster before anything starts.
- No leakage: in the fold of test subject s, a share of the OTHER subjects is held out as validation
  subjects; the model trains on the rest and is scored on them. The fold's test subject is not even
  passed to the fold's task. A trial's score is UF1 on the validation predictions pooled over folds.
- The chosen configuration's test-subject result is measured once, afterwards, by an honest grid run
  of that configuration (``evaluate``), and reported separately.
- The Optuna study lives in a database (SQLite ``optuna.db`` by default): a re-run with the same study
  name resumes it (``trials`` is the study's target size) or extends it (a larger ``trials``).
- MLflow: one parent run per search, one child run per trial with the Optuna parameters as params.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epir.metrics import uar, uf1

SEARCHED = ("alpha", "temperature", "merge_k")


@dataclass
class SearchSpace:
    """Ranges (inclusive) of the searched parameters.

    Attributes:
        alpha: contrastive margin, uniform (TransFG and our default: 0.4).
        temperature: initial ITALS temperature, log-uniform (our default: sqrt(dim_head)).
        merge_k: token pairs merged per integration block, integer (paper: 1; 2 merges 75 % of 16 patches).
    """

    alpha: tuple[float, float] = (0.0, 0.8)
    temperature: tuple[float, float] = (1.0, 16.0)
    merge_k: tuple[int, int] = (0, 2)

    def __post_init__(self):
        if not (-1 <= self.alpha[0] <= self.alpha[1] <= 1):
            raise ValueError(f"alpha range must lie in [-1, 1], got {self.alpha}")
        if not (0 < self.temperature[0] <= self.temperature[1]):
            raise ValueError(f"temperature range must be positive, got {self.temperature}")
        if not (0 <= self.merge_k[0] <= self.merge_k[1]):
            raise ValueError(f"merge_k range must be non-negative integers, got {self.merge_k}")

    def tune_space(self) -> dict:
        """The Ray Tune search space (``OptunaSearch`` converts it to Optuna distributions)."""
        from ray import tune

        return {"alpha": tune.uniform(*self.alpha), "temperature": tune.loguniform(*self.temperature),
                "merge_k": tune.randint(self.merge_k[0], self.merge_k[1] + 1)}


@dataclass
class SearchConfig:
    """What a search runs (see the module docstring). ``trials`` is the study's target size."""

    trials: int = 20
    space: SearchSpace = field(default_factory=SearchSpace)
    val_fraction: float = 0.2
    fold_parallel: int = 0
    concurrent_trials: int = 1
    study: str | None = None
    storage: str | None = None
    seed: int = 0
    evaluate: bool = True

    def __post_init__(self):
        if self.trials < 1 or not (0 < self.val_fraction < 1) or self.fold_parallel < 0 or self.concurrent_trials < 1:
            raise ValueError("trials >= 1, 0 < val_fraction < 1, fold_parallel >= 0, concurrent_trials >= 1")


def validation_subjects(train_subjects, test_subject: str, fraction: float, seed: int) -> list[str]:
    """The validation subjects of one fold: ``fraction`` (at least one) of its TRAINING subjects, drawn
    by a generator seeded with ``seed`` and the test subject's name, so every fold differs and a re-run
    repeats. Raises ValueError when fewer than two training subjects remain."""
    subjects = sorted({str(s) for s in train_subjects} - {str(test_subject)})
    if len(subjects) < 2:
        raise ValueError("a validation split needs at least two training subjects")
    k = min(len(subjects) - 1, max(1, round(fraction * len(subjects))))
    rng = np.random.default_rng([seed, zlib.crc32(str(test_subject).encode())])
    return sorted(rng.choice(subjects, size=k, replace=False).tolist())


def inner_fold(flows: np.ndarray, labels: np.ndarray, subjects: np.ndarray, test_subject: str, model: dict,
               recipe: dict, val_fraction: float, seed: int) -> dict:
    """Score a configuration on one fold WITHOUT its test subject.

    Args:
        flows, labels, subjects: (N, H, W, 3), (N,), (N,) of the fold's TRAINING subjects only (the
            caller removes the test subject; a sample of it here raises ValueError).
        test_subject: names the fold (seeds the validation draw); its samples are not given.
        model, recipe: EPIRConfig and TrainRecipe fields.

    Returns:
        ``{"subject", "val_subjects", "sample_index", "y_true", "y_pred", "train_seconds"}`` on the
        validation subjects.
    """
    from epir.presets import config_from_dict
    from epir.train import TrainRecipe, fit, predict, resolve_device, to_model_input

    subjects = np.asarray([str(s) for s in subjects])
    if (subjects == str(test_subject)).any():
        raise ValueError(f"inner_fold was given samples of the test subject {test_subject!r}")
    val = validation_subjects(subjects, test_subject, val_fraction, seed)
    is_val = np.isin(subjects, val)
    rec = TrainRecipe(**recipe)
    config = config_from_dict(model)
    start = time.perf_counter()
    net, _ = fit(config, rec, flows[~is_val], labels[~is_val])
    x_val = to_model_input(flows[is_val], config, rec.flow_range).to(resolve_device(rec.device))
    probs = predict(net, x_val, rec.batch_size)
    return {"subject": str(test_subject), "val_subjects": val, "y_true": labels[is_val].tolist(),
            "y_pred": probs.argmax(-1).tolist(), "train_seconds": time.perf_counter() - start}


def _fold_task(data, test_subject: str, model: dict, recipe: dict, val_fraction: float, seed: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(max(1, threads))
    keep = data.subjects != test_subject
    return inner_fold(data.flows[keep], data.labels[keep], data.subjects[keep], test_subject, model, recipe,
                      val_fraction, seed)


def search_trial(config: dict, data, spec: dict) -> None:
    """Ray Tune trainable of one Optuna trial: every fold of the configuration as a Ray task inside the
    trial's placement group; reports ``val_uf1``, ``val_uar`` and the folds (JSON) once at the end."""
    import ray
    from ray import tune

    from epir.presets import config_from_dict

    model = {**spec["model"], "alpha": float(config["alpha"]), "temperature": float(config["temperature"]),
             "merge_k": int(config["merge_k"])}
    config_from_dict(model)  # a clear error for an impossible combination
    ref = ray.put(data)
    task = ray.remote(_fold_task).options(num_cpus=spec["cpus"], num_gpus=spec["gpus"], max_retries=2)
    futures = [task.remote(ref, s, model, spec["recipe"], spec["val_fraction"], spec["seed"], spec["threads"])
               for s in spec["subjects"]]
    folds = ray.get(futures)
    yt = np.concatenate([f["y_true"] for f in folds]).astype(int)
    yp = np.concatenate([f["y_pred"] for f in folds]).astype(int)
    tune.report({"val_uf1": uf1(yt, yp), "val_uar": uar(yt, yp), "folds": len(folds),
                 "train_seconds": sum(f["train_seconds"] for f in folds), "folds_json": json.dumps(folds)})


@dataclass
class SearchOutcome:
    """A search's result: the study's best configuration and, when evaluated, its test-subject scores."""

    study: str
    storage: str
    best: dict
    best_value: float
    completed: int
    ran_now: int
    best_path: Path
    test: dict | None = None


def parse_range(text: str | None, cast=float) -> tuple | None:
    """``"LO,HI"`` (or ``"X"``) -> ``(cast(LO), cast(HI))``; None for an empty value. Raises ValueError."""
    if not text:
        return None
    lo, _, hi = text.partition(",")
    return (cast(lo), cast(hi or lo))


def run_search(cfg, scfg: SearchConfig, log=print) -> SearchOutcome:
    """Run (or resume, or extend) an Optuna search on one dataset, protocol and preset of ``cfg``.

    Args:
        cfg: a :class:`grid.config.GridConfig` with one dataset (one protocol) and one preset; its
            profile, overrides, folds, resources and experiment apply.
        scfg: the search settings.
        log: receives one-line progress messages.

    Raises:
        ValueError: not exactly one dataset/protocol/preset, or trial bundles that cannot fit the cluster.
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
    ray = init_ray()
    res = ray.cluster_resources()
    has_gpu = res.get("GPU", 0) > 0
    profile = cfg.resolved_profile(has_gpu)
    data = prepare_data(cfg, log)
    if len(data) != 1:
        raise ValueError(f"a search runs on one dataset and one protocol; got {list(data)} "
                         "(give --dataset FORMAT=ROOT:SDE or :CDE)")
    ((key, d),) = data.items()
    preset = cfg.presets[0]
    model, recipe, _ = cfg.settings(preset, profile, len(d.classes))
    recipe["flow_range"] = d.flow_range
    subjects = d.fold_subjects[: cfg.folds] if cfg.folds else d.fold_subjects
    cpus = cfg.cpus_per_trial
    gpus = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else (0.25 if has_gpu else 0.0)
    slots = int(res.get("CPU", 0) // cpus)
    if gpus:
        slots = min(slots, int(res.get("GPU", 0) // gpus))
    parallel = scfg.fold_parallel or max(1, min(len(subjects), slots // scfg.concurrent_trials))
    bundle = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
    # an empty head bundle: the trial itself only waits on its fold tasks
    bundles = [{}] + [dict(bundle) for _ in range(parallel)]
    check_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], bundles)
    study = scfg.study or f"{d.dataset}-{d.protocol}-{preset}-{profile}".replace("+", "")
    storage_url = scfg.storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"
    storage = optuna.storages.RDBStorage(storage_url)
    try:
        done = sum(t.state == optuna.trial.TrialState.COMPLETE
                   for t in optuna.load_study(study_name=study, storage=storage).trials)
    except KeyError:
        done = 0
    remaining = max(0, scfg.trials - done)
    log(f"search '{study}' ({storage_url}): {d.key}, preset {preset}, profile {profile}, {len(subjects)} folds per "
        f"trial, {parallel} at once ({bundle} each); {done} trials completed earlier, {remaining} to run")
    client, exp_id = tracking.setup(cfg.experiment)
    found = tracking.search_runs(client, exp_id, f"tags.`{tracking.TAG_KIND}` = 'search' and tags.`epir.study` = '{study}'")
    if found:
        parent = found[0].info.run_id
    else:
        run = client.create_run(exp_id, run_name=f"search {d.key} {preset}",
                                tags={tracking.TAG_KIND: "search", "epir.study": study, "epir.optuna_storage": storage_url,
                                      "epir.dataset": d.dataset, "epir.protocol": d.protocol, "epir.preset": preset,
                                      "epir.profile": profile, "epir.git_commit": tracking.git_commit()})
        parent = run.info.run_id
        params = {**tracking.flat_params("model", model), **tracking.flat_params("recipe", recipe),
                  **{f"space.{k}": str(v) for k, v in dataclasses.asdict(scfg.space).items()},
                  "val_fraction": str(scfg.val_fraction), "folds": str(len(subjects)), "seed": str(scfg.seed)}
        client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    spec = dict(model=model, recipe=recipe, subjects=subjects, cpus=cpus, gpus=gpus, val_fraction=scfg.val_fraction,
                seed=scfg.seed, threads=max(1, int(cpus)))
    counter = {"n": 0}

    class Logger(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "val_uf1" not in r:
                return
            counter["n"] += 1
            p = {k: trial.config[k] for k in SEARCHED}
            child = client.create_run(exp_id, run_name=f"trial {trial.trial_id}", tags={
                "mlflow.parentRunId": parent, tracking.TAG_KIND: "search_trial", "epir.study": study})
            rid = child.info.run_id
            now = int(time.time() * 1000)
            client.log_batch(rid, params=[Param(k, str(v)) for k, v in p.items()],
                             metrics=[Metric(k, float(r[k]), now, 0) for k in ("val_uf1", "val_uar", "train_seconds")])
            client.log_text(rid, r["folds_json"], "folds.json")
            client.set_terminated(rid, "FINISHED")
            log(f"[trial {counter['n']}/{remaining}] alpha {p['alpha']:.3f}, temperature {p['temperature']:.2f}, "
                f"K {p['merge_k']}: validation UF1 {r['val_uf1']:.4f}, UAR {r['val_uar']:.4f} "
                f"({r['train_seconds'] / 60:.1f} min of training)")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"  FAILED search trial {trial.trial_id}: {trial.error_file}")

    if remaining:
        searcher = OptunaSearch(metric="val_uf1", mode="max", study_name=study, storage=storage, seed=scfg.seed)
        trainable = tune.with_resources(tune.with_parameters(search_trial, data=d, spec=spec),
                                        tune.PlacementGroupFactory(bundles, strategy="PACK"))
        tune.Tuner(
            trainable, param_space=scfg.space.tune_space(),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                        max_concurrent_trials=scfg.concurrent_trials),
            run_config=tune.RunConfig(name=f"search-{study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str((cfg.work_dir / "ray_results").resolve()),
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      callbacks=[Logger()], verbose=0),
        ).fit()
    st = optuna.load_study(study_name=study, storage=storage)
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study '{study}' has no completed trial")
    best = st.best_trial
    overrides = {k: (int(v) if k == "merge_k" else float(v)) for k, v in best.params.items()}
    out = cfg.results_dir / cfg.experiment
    out.mkdir(parents=True, exist_ok=True)
    best_path = out / f"{study}.best.json"
    record = {"overrides": overrides, "validation_uf1": best.value, "study": study, "optuna_storage": storage_url,
              "trials_completed": len(complete), "dataset": d.dataset, "protocol": d.protocol, "preset": preset,
              "profile": profile, "folds": len(subjects), "val_fraction": scfg.val_fraction,
              "note": "validation UF1 from subjects held out of each fold's training subjects; never the test subject"}
    best_path.write_text(json.dumps(record, indent=2))
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric("best_val_uf1", float(best.value), now, len(complete)),
                                      Metric("trials_completed", float(len(complete)), now, len(complete))])
    client.log_text(parent, json.dumps(record, indent=2), "best.json")
    for k, v in overrides.items():
        client.set_tag(parent, f"best.{k}", str(v))
    outcome = SearchOutcome(study, storage_url, overrides, best.value, len(complete), counter["n"], best_path)
    log(f"best of {len(complete)} trials: {overrides}, validation UF1 {best.value:.4f} -> {best_path}")
    if scfg.evaluate:
        log("test-subject evaluation of the chosen configuration (reported once, by an honest grid run):")
        ecfg = dataclasses.replace(cfg, presets=[preset], overrides={**cfg.overrides, **overrides}, profile=profile)
        g = run_grid(ecfg, log)
        cell = g.cells[0]
        if cell.cell_id in g.scores:
            s = g.scores[cell.cell_id]["all"]
            outcome.test = {"uf1": s["uf1"], "uar": s["uar"], "cell": cell.name, "cell_id": cell.cell_id}
            client.log_batch(parent, metrics=[Metric("test_uf1", s["uf1"], now, 0), Metric("test_uar", s["uar"], now, 0)])
            client.set_tag(parent, "epir.test_cell_id", cell.cell_id)
    client.set_terminated(parent, "FINISHED")
    return outcome
