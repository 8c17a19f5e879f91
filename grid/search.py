"""Hyper-parameter search with a strict rule: no model behind the configuration used for test subject s
was trained on s, and no validation score it was chosen by involves s's labels.

- **Space**: any TrainRecipe field or model field of the preset's family (``--space lr=loguniform:1e-4:3e-3
  --space tokenizer=choice:spt,dnspt``, or ``[search.space]`` in the grid TOML); by default the
  contrastive margin alpha (EPIR eq. 23), the initial ITALS temperature (eqs. 10-16) and the merge count
  K (eqs. 5-9).
- **Validation groups**: the dataset's subjects are dealt into k groups (``--val-groups``, 5; seeded,
  each source dataset spread over all groups).
- **Nested evaluation** (strict): a trial evaluates one configuration by k(k-1)/2 trainings, one per
  unordered pair of groups {g, h}: the model trained on every group except g and h predicts both. Group
  g's *inner validation score* of a candidate is the UF1 pooled over the other groups h, each predicted by
  the model trained without {g, h}: no model behind it ever saw g. (The earlier design trained once per
  group, and the models that scored g's candidates had been trained on g.) At k = 5: 10 trainings on 3/5
  of the subjects against 5 on 4/5, 1.5 x the samples seen.
- **Candidates**: Optuna draws them with a sampler that never looks at a score (``random``: Optuna's
  ``RandomSampler``; ``qmc``: scrambled Sobol, ``QMCSampler``; ``grid``: every combination of choice
  spaces), so which configurations were tried depends on no subject's labels. An adaptive sampler (TPE)
  fits this rule only as one study per outer group g whose objective is g's inner score: k studies of
  k-1 trainings per candidate, 4 x the shared design's trainings for as many candidates per group at
  k = 5 (docs/search.md says what the demo measured). The shared design is kept.
- **Choice per group**: group g's test subjects get the candidate with the best inner validation score of
  g. The candidate *best on all groups* (for NEW data) has the best mean of the k inner scores.
- **Result**: ``<study>.choices.json`` holds each group's choice with its complete resolved model and
  recipe (and the commit), which a ``--choices`` run replays exactly whatever the profiles say later; the
  honest LOSO cell of the choices (each test subject trains its group's configuration; each child run says
  which and why); ``<study>.best.json`` holds the best-on-all candidate (for new data: on this dataset it
  saw every subject); and, unless ``--no-final-model``, that candidate trained on ALL subjects and logged
  as an MLflow model on the search's parent run, whose expected score is the nested cell's honest UF1 /
  UAR (that cell measures the whole tuning procedure: nested cross-validation).
- Trials run as Ray Tune trials (``OptunaSearch`` with the chosen sampler), each trial's trainings as Ray
  tasks inside the trial's placement group. The Optuna study lives in a database (SQLite ``optuna.db`` by
  default): a re-run with the same study name resumes it or extends it (``trials`` is the study's target
  size). MLflow (:mod:`grid.tracking`): one parent run per search, one child run per trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from epir.metrics import uar, uf1
from epir.presets import config_from_dict, family_fields
from epir.registry import import_model_modules
from epir.train import TrainRecipe, fit_all, predict, to_model_input
from preprocess.runtime import init_ray

from . import search_tracking, tracking
from .cells import build_cells, split_params
from .config import SAMPLERS, GridConfig, Sampler
from .data import ProtocolData
from .runner import check_fit, prepare_data, run_grid
from .trainable import save_weights

KINDS = ("uniform", "loguniform", "int", "choice")
CHOICES_FORMAT = 2  # choices files that hold each group's resolved model and recipe (replayed exactly)


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
    sampler: Sampler = "random"
    fold_parallel: int = 0
    concurrent_trials: int = 1
    study: str | None = None
    storage: str | None = None
    seed: int = 0
    evaluate: bool = True
    final_model: bool = True

    def __post_init__(self):
        if self.trials < 1 or self.groups < 3 or self.fold_parallel < 0 or self.concurrent_trials < 1:
            raise ValueError("trials >= 1, groups >= 3 (nesting holds out two groups at once), fold_parallel >= 0, "
                             "concurrent_trials >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "grid" and any(d.kind != "choice" for d in self.space.values()):
            raise ValueError("the grid sampler needs every searched field as choice:A,B,...")


@dataclass(frozen=True)
class SearchPlan:
    """What every trial of a search needs (the typed spec its Ray trainable receives).

    Attributes:
        model, recipe: the base model config dict and TrainRecipe fields the searched values go into.
        space: the searched fields.
        groups: subject -> validation group; k: the number of groups.
        cpus, gpus, threads: resources and torch threads of one training.
        model_modules: a user's model modules (``--model-file`` stems) the trial and its trainings import first.
    """

    model: dict
    recipe: dict
    space: tuple[str, ...]
    groups: dict[str, int]
    k: int
    cpus: float
    gpus: float
    threads: int
    model_modules: tuple[str, ...] = ()

    def pairs(self) -> list[tuple[tuple[int, int], list[str]]]:
        """Every unordered pair of groups {g, h} and the subjects it holds out."""
        return [((g, h), sorted(s for s, x in self.groups.items() if x in (g, h)))
                for g, h in itertools.combinations(range(self.k), 2)]


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


def _group_task(data, held: list[str], model: dict, recipe: dict, threads: int, model_modules=()) -> dict:
    import_model_modules(model_modules)
    torch.set_num_threads(max(1, threads))
    return group_fold(data.model_flows(config_from_dict(model)), data.labels, data.subjects, held, model, recipe)


def check_space(space: dict, model: dict) -> None:
    """Refuse a searched field that neither TrainRecipe nor the preset's model family has, or the seed.

    Raises:
        ValueError: naming the fields.
    """
    known = set(TrainRecipe.__dataclass_fields__) | family_fields(model["family"])
    bad = sorted(set(space) - known)
    if bad:
        raise ValueError(f"cannot search {bad}: not a TrainRecipe field nor a field of the {model['family']} model")
    if "seed" in space or "flow_range" in space:
        raise ValueError("seed and flow_range are not hyper-parameters (the seed: --seeds on the grid)")


def evaluate_candidate(plan: SearchPlan, train) -> list[dict]:
    """A candidate's nested evaluation: for every pair {g, h}, ``train(held)`` fits on every subject outside g
    and h and predicts them (:func:`group_fold`'s dict); each result gains ``pair`` = [g, h]."""
    return [{**fold, "pair": list(pair)} for (pair, _), fold in zip(plan.pairs(), train([h for _, h in plan.pairs()]))]


def inner_scores(folds: list[dict], groups: dict[str, int], k: int) -> dict[int, float]:
    """Each group g's inner validation UF1 of one candidate: the predictions of the subjects of every other
    group h, made by the model trained without {g, h}, pooled.

    Raises:
        ValueError: for folds of the earlier design (one held-out group, no ``pair``).
    """
    if any("pair" not in f for f in folds):
        raise ValueError("this trial was evaluated by the earlier design (models trained on the group they chose "
                         "for); start a new study (--study NAME)")
    out = {}
    for g in range(k):
        yt, yp = [], []
        for f in folds:
            if g not in f["pair"]:
                continue
            for s, a, b in zip(f["subjects"], f["y_true"], f["y_pred"]):
                if groups[s] != g:  # g's own subjects: never scored for g
                    yt.append(a)
                    yp.append(b)
        out[g] = uf1(yt, yp) if yt else 0.0
    return out


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


def choose(trials: list[dict], groups: dict[str, int], k: int) -> dict[int, dict]:
    """Each validation group's configuration: the candidate with the best inner validation score of the group
    (:func:`inner_scores`), so that no model behind it was trained on the group.

    Args:
        trials: completed trials, each ``{"number", "params", "folds"}`` with ``folds`` as
            :func:`evaluate_candidate` returns them (``invalid`` trials, without folds, are skipped).
        groups: subject -> group; k: number of groups.

    Returns:
        group -> ``{"trial", "params", "validation_uf1" (its inner score), "runner_up" (trial, score) or None,
        "subjects"}``. Ties go to the earlier trial.

    Raises:
        ValueError: no valid trial, or trials of the earlier design.
    """
    valid = [t for t in trials if t["folds"]]
    if not valid:
        raise ValueError("no valid trial to choose from")
    scores = {t["number"]: inner_scores(t["folds"], groups, k) for t in valid}
    out = {}
    for g in range(k):
        ranked = sorted(valid, key=lambda t: (scores[t["number"]][g], -t["number"]), reverse=True)
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        out[g] = {"trial": best["number"], "params": best["params"], "validation_uf1": scores[best["number"]][g],
                  "runner_up": (second["number"], scores[second["number"]][g]) if second else None,
                  "subjects": sorted(s for s, x in groups.items() if x == g)}
    return out


def best_on_all(trials: list[dict], groups: dict[str, int], k: int) -> tuple[dict, float]:
    """The candidate best on all groups (for NEW data): the best mean of the k inner validation scores; and that
    mean. Ties go to the earlier trial.

    Raises:
        ValueError: no valid trial.
    """
    valid = [t for t in trials if t["folds"]]
    if not valid:
        raise ValueError("no valid trial to choose from")
    mean = {t["number"]: float(np.mean(list(inner_scores(t["folds"], groups, k).values()))) for t in valid}
    best = max(valid, key=lambda t: (mean[t["number"]], -t["number"]))
    return best, mean[best["number"]]


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


def planned_candidates(scfg: SearchConfig, n: int) -> list[dict]:
    """The first ``n`` candidates the search's sampler draws in an uninterrupted run: the same distributions as
    Ray Tune's ``OptunaSearch`` builds, asked of a fresh sampler of the same seed, one trial after another."""
    space = OptunaSearch.convert_search_space({k: v.tune() for k, v in scfg.space.items()})
    plan = optuna.create_study(sampler=_sampler(scfg))
    out = []
    for _ in range(n):
        t = plan.ask(fixed_distributions=space)
        out.append(t.params)
        plan.tell(t, 0.0)
    return out


def replay_interrupted(study, scfg: SearchConfig, log=print) -> int:
    """A random-sampler study resumed after an interruption would draw its sampler's sequence again from the
    start (Optuna's ``RandomSampler`` keeps its generator in memory), repeating candidates; instead, the
    candidates an uninterrupted run would have drawn next are enqueued (``study.enqueue_trial``), so that a
    resumed search tries what the uninterrupted one would have. Returns how many were enqueued (0 for a new
    study, another sampler, or completed trials that do not follow the seeded sequence, which is said)."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    if scfg.sampler != "random" or not complete or waiting:
        return 0
    planned = planned_candidates(scfg, scfg.trials)
    if [t.params for t in sorted(complete, key=lambda t: t.number)] != planned[:len(complete)]:
        log("  the study's trials do not follow its sampler's seeded sequence: resuming draws anew")
        return 0
    for p in planned[len(complete):]:
        study.enqueue_trial(p)
    return len(planned) - len(complete)


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
                            storage=optuna.storages.RDBStorage(s.storage_url), sampler=_sampler(s.scfg))
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


def _completed(s: _Setup) -> int:
    """Trials the study has completed so far (0 for a new study)."""
    try:
        study = optuna.load_study(study_name=s.study, storage=optuna.storages.RDBStorage(s.storage_url))
    except KeyError:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def resolved_choice(s: _Setup, params: dict) -> dict:
    """What a group's choice trains, complete: the model config dict and TrainRecipe fields (a replay trains
    exactly these, whatever the profiles say later), and which of the model's fields the search set."""
    model, recipe = split_params(params, s.plan.model, s.plan.recipe)
    return {"model": model, "recipe": {k: v for k, v in recipe.items() if k != "seed"},
            "searched_model_fields": sorted(set(params) & family_fields(model["family"]))}


def _write_choices(s: _Setup, trials: list[dict], choices: dict, overall: dict, value: float) -> tuple[Path, Path]:
    """``<study>.choices.json`` (each group's resolved choice, the commit) and ``<study>.best.json``."""
    out = s.cfg.results_dir / s.cfg.experiment
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": CHOICES_FORMAT, "study": s.study, "optuna_storage": s.storage_url,
            "trials_completed": len(trials), "dataset": s.data.key, "shards": s.data.config_id, "preset": s.preset,
            "profile": s.label, "base": s.cfg.overrides, "sampler": s.scfg.sampler, "design": "nested pairs",
            "space": {k: v.describe() for k, v in s.scfg.space.items()}, "val_groups": s.scfg.groups,
            "seed": s.scfg.seed, "commit": tracking.git_commit()}
    groups = {str(g): {**c, **resolved_choice(s, c["params"])} for g, c in choices.items()}
    choices_path = out / f"{s.study}.choices.json"
    choices_path.write_text(json.dumps({
        **meta, "groups": groups, "subjects": s.plan.groups,
        "note": "each group's configuration maximises its inner validation UF1: the other groups' subjects, each "
                "predicted by a model trained without that group and this one. No model behind a test subject's "
                "choice saw its labels. 'model' and 'recipe' are what a --choices run trains."}, indent=2))
    best_path = out / f"{s.study}.best.json"
    best_path.write_text(json.dumps({
        **meta, "overrides": {**s.cfg.overrides, **overall["params"]}, "validation_uf1": value,
        **resolved_choice(s, overall["params"]),
        "note": "best mean inner validation UF1 over ALL groups: for NEW data; on this dataset every subject's "
                "labels took part in this choice (evaluate it here with --choices on the .choices.json instead)"},
        indent=2))
    return choices_path, best_path


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
        start = time.time()
        net, curve = fit_all(config_from_dict(model), TrainRecipe(**recipe), data.model_flows(config_from_dict(model)),
                         data.labels)
        save_weights(net, path)
        return {"path": str(path), "curve": curve, "train_seconds": time.time() - start, "samples": len(data.labels)}

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
    done = _completed(s)
    remaining = max(0, scfg.trials - done)
    log(f"search '{s.study}' ({s.storage_url}): {s.data.key}, preset {s.preset}, profile {s.label}; space "
        + ", ".join(f"{k}={v.describe()}" for k, v in scfg.space.items()) + f"; {scfg.sampler} sampler; {scfg.groups} "
        f"validation groups ({len(s.plan.groups)} subjects), {len(s.plan.pairs())} nested trainings per candidate, "
        f"{len(s.bundles) - 1} at once ({s.bundles[1]} each); {done} trials completed earlier, {remaining} to run")
    client, exp_id = tracking.setup(cfg.experiment)
    parent = search_tracking.search_parent_run(client, exp_id, s.study, s.storage_url, s.data, s.preset, s.label,
                                        {**tracking.flat_params("model", s.plan.model),
                                         **tracking.flat_params("recipe", s.plan.recipe),
                                         **{f"space.{k}": v.describe() for k, v in scfg.space.items()},
                                         "sampler": scfg.sampler, "val_groups": str(scfg.groups), "seed": str(scfg.seed),
                                         "design": "nested pairs"})
    ran = _run_trials(s, client, exp_id, parent, remaining, log)
    trials = search_tracking.search_trials(client, exp_id, s.study, {k: lambda t, d=d: _typed(t, d) for k, d in scfg.space.items()})
    if not trials:
        raise RuntimeError(f"study '{s.study}' has no completed trial")
    choices = choose(trials, s.plan.groups, scfg.groups)
    overall, value = best_on_all(trials, s.plan.groups, scfg.groups)
    choices_path, best_path = _write_choices(s, trials, choices, overall, value)
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


def _sampler(scfg: SearchConfig):
    """The candidates' sampler: none of them looks at a score."""
    if scfg.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=scfg.seed, scramble=True, warn_independent_sampling=False)
    if scfg.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in scfg.space.items()}, seed=scfg.seed)
    return optuna.samplers.RandomSampler(seed=scfg.seed)


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
