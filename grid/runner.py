"""The grid: cells (dataset x protocol x ablation preset), each a full LOSO evaluation whose folds are
Ray Tune trials, recorded in MLflow by the driver. Its jobs: (1) the data a run trains on (every configured dataset
preprocessed, a composite pooled); (2) the trials planned and run through Ray Tune with their retries; (3) the
run's outcome and its summary. The cluster's side is :mod:`grid.resources`, the driver's logging
:mod:`grid.progress`, the trial itself :mod:`grid.trainable`.

Flow of :func:`run_grid`:
1. connect to Ray (:func:`grid.resources.plan_resources`: ``RAY_ADDRESS``, or the cluster this node
   belongs to, else a local Ray);
2. preprocess every configured dataset with the real pipeline (finished shards are reused);
3. build the cells, open the MLflow store, create each cell's parent run, look up finished folds;
4. run every remaining fold as one Tune trial (one Tuner for all cells, so cells overlap); a failing
   trial is retried ``max_failures`` times (:func:`run_passes` makes sure of it where Tune stops early),
   then reported; the rest of the grid goes on;
5. as each fold ends, log it as a child run; when a cell's last fold is in, log the pooled scores;
6. write the results tables and print a summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ray import tune

from epir.pack import check_packable
from epir.presets import PRESETS, config_from_dict
from epir.train import TrainRecipe
from preprocess.adapters import DatasetError
from preprocess.demo import make_demo_dataset

from . import logged_models, migration, tracking
from .cells import Cell, build_cells, fold_packs, pooled_scores
from .config import DatasetSpec, GridConfig
from .data import ProtocolData, composite, load_protocol, preprocess, protocol_support
from .progress import _Progress, finish_cell
from .resources import plan_resources
from .trainable import FINAL, TrialSpec, fold_trial

# The demo dataset's size: 6 pseudo-subjects x 3 classes x 3 samples = 54 samples, 6 LOSO folds.
DEMO_SUBJECTS, DEMO_PER_CLASS = 6, 3


@dataclass
class GridOutcome:
    """What a run did: cells with their pooled scores, folds trained now and earlier, failures."""

    cells: list[Cell]
    scores: dict[str, dict] = field(default_factory=dict)
    trained: int = 0
    reused: int = 0
    failures: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    results_dir: Path | None = None
    experiment_id: str | None = None


def prepare_data(cfg: GridConfig, log=print) -> dict[str, ProtocolData]:
    """Preprocess the configured datasets (or generate the demo) and load each protocol's arrays."""
    shards = (cfg.work_dir / "shards").resolve()
    specs = cfg.datasets
    if cfg.demo:
        demo_dir = (cfg.work_dir / "demo_data").resolve()
        manifest = demo_dir / "demo_manifest.csv"
        if not manifest.is_file():
            log(f"DEMO: writing the built-in demo dataset ({DEMO_SUBJECTS} pseudo-subjects from matplotlib's "
                f"grace_hopper.jpg, class-specific 1-2 px facial motion) to {demo_dir}")
            make_demo_dataset(demo_dir, DEMO_SUBJECTS, DEMO_PER_CLASS)
        specs = [DatasetSpec("manifest", manifest, name="demo", protocols=["SDE"],
                             options={"classes": ["negative", "positive", "surprise"]})]
    data = {}
    for spec in specs:
        log(f"preprocessing {spec.name or spec.format} from {spec.root} (finished shards are reused) ...")
        folder = preprocess(spec, shards, progress=lambda m: log("  " + m))
        protocols = spec.protocols
        if not protocols:  # what the labels allow, and why the others are left out
            support = protocol_support(folder)
            protocols = [p for p, why in support.items() if why is None]
            skipped = "; ".join(f"not {p}: {why}" for p, why in support.items() if why is not None)
            log(f"  protocols {'+'.join(protocols) or 'none'} (what its labels allow" + (f"; {skipped})" if skipped else ")"))
            if not protocols:
                raise ValueError(f"{spec.name or spec.format}: its labels allow no protocol ({skipped})")
        for protocol in protocols:
            d = load_protocol(folder, protocol)
            data[d.key] = d
            counts = np.bincount(d.labels, minlength=len(d.classes))
            log(f"  {d.key}: {len(d.labels)} samples, {len(set(d.subjects))} subjects; classes (label order, samples): "
                + ", ".join(f"{c} {n}" for c, n in zip(d.classes, counts)))
    if cfg.cde_composite:
        parts = [d for d in data.values() if d.protocol == "CDE"]
        d = composite(parts)
        data = {k: v for k, v in data.items() if v.protocol != "CDE"} | {d.key: d}
        log(f"  {d.key}: the CDE composite of {', '.join(p.key for p in parts)}: {len(d.labels)} samples, "
            f"{len(set(d.subjects))} subjects (named <dataset>_<subject>)")
    return data


def plan_trials(cfg: GridConfig, cells: list[Cell], done: dict, has_gpu: bool, common: dict, log=print) -> list[TrialSpec]:
    """The trials of the folds not yet finished (:func:`grid.cells.fold_packs`): a fold each, or packs of folds of
    one cell that train the same settings (``cfg.fold_pack``; 0 = a cell's folds in one pack on a GPU, one fold per
    trial on a CPU; models that cannot pack, such as ``ststnet``, always one per trial). A pack's ``subject``
    names its folds."""
    out = []
    for c in cells:
        size = cfg.fold_pack or (0 if has_gpu else 1)
        packs = fold_packs(c, done[c.cell_id], size)
        if size != 1 and packs:
            try:
                check_packable(config_from_dict(c.fold_model(packs[0][0])), TrainRecipe(**c.fold_recipe(packs[0][0])))
            except ValueError as e:  # packs were asked for (or are the GPU's default): say why these go one by one
                log(f"cell {c.name}: its folds train one per trial, not in packs: {e}")
                packs = fold_packs(c, done[c.cell_id], 1)
        for part in packs:
            out.append(TrialSpec(cell_id=c.cell_id, data_key=c.data_key, subject="+".join(part), subjects=tuple(part),
                                 model=c.fold_model(part[0]), recipe=c.fold_recipe(part[0]), **common))
    return out


def run_grid(cfg: GridConfig, log=print, inject_failure: str | None = None) -> GridOutcome:
    """Run (or finish) the grid described by ``cfg``; see the module docstring.

    Args:
        cfg: the grid configuration.
        log: receives one-line progress messages.
        inject_failure: ``SUBJECT`` or ``SUBJECT:once``: make that fold's trials fail (tests only).

    Returns:
        :class:`GridOutcome`.

    Raises:
        preprocess.adapters.DatasetError, ValueError: for a wrong dataset or configuration.
    """
    start = time.perf_counter()
    check_roots(cfg)  # a wrong path fails in a second, not after Ray has started
    res = plan_resources(cfg, log)
    data = prepare_data(cfg, log)
    cells = build_cells(cfg, data, res.profile)
    client, exp_id = tracking.setup(cfg.experiment)
    by_id = {c.cell_id: c for c in cells}
    parents = {c.cell_id: tracking.parent_run(client, exp_id, c) for c in cells}
    done = {c.cell_id: tracking.finished_folds(client, exp_id, c.cell_id, c.data_fingerprint) for c in cells}
    for c in cells:
        say_folds_elsewhere(c, *migration.folds_elsewhere(client, exp_id, c), log)
    common = dict(threads=max(1, int(cfg.cpus_per_trial)), inject=inject_failure,
                  model_modules=tuple(f.stem for f in cfg.model_files),
                  marker_dir=str((cfg.work_dir / "markers").resolve()), model_dir=str((cfg.work_dir / "models").resolve()),
                  keep_weights=cfg.log_fold_models)
    pending = plan_trials(cfg, cells, done, res.has_gpu, common, log)
    finals = [c for c in cells if cfg.trains_final_models and not c.fold_settings
              and not logged_models.final_model_uri(client, exp_id, c.cell_id)]
    pending += [TrialSpec(cell_id=c.cell_id, data_key=c.data_key, subject=FINAL, model=c.model, recipe=c.recipe, **common)
                for c in finals]
    reused, to_train = sum(len(v) for v in done.values()), sum(len(c.subjects) - len(done[c.cell_id]) for c in cells)
    log(f"{len(cells)} cells, {sum(len(c.subjects) for c in cells)} folds: {reused} finished earlier "
        f"(MLflow experiment '{cfg.experiment}'), {to_train} to train in {len(pending) - len(finals)} trial(s)"
        + (f", and {len(finals)} final model(s) on all subjects" if finals else ""))
    progress = _Progress(client, exp_id, by_id, parents, done, to_train, len(finals), log)
    for c in cells:  # cells whose folds all finished earlier but whose parent was never closed (driver killed)
        if len(done[c.cell_id]) == len(c.subjects) and client.get_run(parents[c.cell_id]).info.status != "FINISHED":
            finish_cell(client, parents[c.cell_id], c, done[c.cell_id], log)
    failed = run_passes(pending, lambda folds, budget: _tune(cfg, folds, data, res.gpus, progress, budget),
                        cfg.max_failures, log) if pending else {}
    outcome = GridOutcome(cells, trained=progress.finished_now, reused=reused, train_seconds=progress.train_seconds,
                          experiment_id=exp_id,
                          failures=[{"cell": f"{by_id[c].name} | fold {s}", "cell_id": c, "subject": s, "error": err}
                                    for (c, s), (_, err) in failed.items()])
    _close(outcome, done)
    outcome.wall_seconds = time.perf_counter() - start
    from .report import write_tables  # deferred: pandas and SciPy only when the tables are written

    outcome.results_dir = write_tables(client, exp_id, cfg.experiment, cfg.results_dir)
    return outcome


def _close(outcome: GridOutcome, done: dict) -> None:
    """The pooled scores of every complete cell, and a failure line for every fold that never finished
    (e.g. Ctrl-C) and is not yet reported; a failed pack's folds are named one by one."""
    for c in outcome.cells:
        if len(done[c.cell_id]) == len(c.subjects):
            outcome.scores[c.cell_id] = pooled_scores(c, done[c.cell_id])
    known = {(f["cell_id"], s) for f in outcome.failures for s in f["subject"].split("+")}
    for c in outcome.cells:
        for s in c.subjects:
            if s not in done[c.cell_id] and (c.cell_id, s) not in known:
                outcome.failures.append({"cell": f"{c.name} | fold {s}", "cell_id": c.cell_id, "subject": s,
                                         "error": "did not finish"})


def say_folds_elsewhere(cell: Cell, other: dict[str, int], v2: int, log=print) -> None:
    """One line per kind of finished fold that ``cell`` does not reuse (:func:`grid.migration.folds_elsewhere`):
    folds of its settings trained on other data (their fingerprints and this data's), and folds of a store from
    before id version 3 (with the one-off step that re-tags them when they were trained on this data)."""
    for fp, n in other.items():
        log(f"cell {cell.name} ({cell.cell_id}): {n} finished fold(s) in MLflow were trained on other data "
            f"(data fingerprint {fp}; this data: {cell.data_fingerprint}): not reused, trained again")
    if v2:
        log(f"cell {cell.name} ({cell.cell_id}): {v2} finished fold(s) in MLflow carry this cell's id of version 2 "
            f"({cell.cell_id_v2}), which did not cover the data: not reused. If they were trained on this very data, "
            "`python grid/run_all.py migrate-ids` with this command's options re-tags them (docs/grid.md)")


def check_roots(cfg: GridConfig) -> None:
    """Refuse a configured dataset whose root does not exist, before anything starts.

    Raises:
        preprocess.adapters.DatasetError: naming every missing root.
    """
    missing = [f"{d.format}={d.root}" for d in cfg.datasets if not Path(d.root).exists()]
    if missing:
        raise DatasetError(f"dataset root(s) not found: {', '.join(missing)}")


def run_passes(pending: list[TrialSpec], one_pass, max_failures: int, log=print) -> dict[tuple[str, str], tuple[int, str]]:
    """Give every fold its ``max_failures + 1`` attempts, over as many Tune passes as that takes.

    Ray Tune retries a failing trial ``FailureConfig.max_failures`` times, but not when the failure
    hits while the trial is still PENDING: with ``reuse_actors`` a new trial that is handed a cached
    actor on a node that has just died fails in ``reset`` and Tune ends it at once (Ray 2.60,
    ``TuneController._process_trial_failure`` only recovers RUNNING trials). Such folds, and any other
    that Tune ended before its budget was spent, run again in a further pass of one attempt each.

    Args:
        pending: the trials to run (:class:`grid.trainable.TrialSpec`; anything with a ``key`` ``(cell_id, subject)``).
        one_pass: ``one_pass(folds, max_failures) -> (errored, interrupted)``; ``errored`` maps
            ``(cell_id, subject)`` to ``(attempts used, last error line)`` for the folds that ended in
            error in that pass; ``interrupted`` is True when the pass was stopped (Ctrl-C).
        max_failures: retries each fold is allowed (attempts = ``max_failures + 1``).
        log: receives one-line messages.

    Returns:
        ``(cell_id, subject) -> (attempts used, last error)`` for every fold that ended in error and was
        not finished by a later pass (an interrupted run leaves its unfinished folds to the caller).
    """
    def key(f: TrialSpec) -> tuple[str, str]:
        return f.key

    used: dict[tuple[str, str], int] = {}
    failed: dict[tuple[str, str], tuple[int, str]] = {}
    todo, budget = pending, max_failures
    while todo:
        errored, interrupted = one_pass(todo, budget)
        for k in map(key, todo):
            if k in errored:
                used[k] = used.get(k, 0) + errored[k][0]
                failed[k] = (used[k], errored[k][1])
            else:
                failed.pop(k, None)
        if interrupted:
            break
        todo = [f for f in todo if key(f) in errored and used[key(f)] <= max_failures]
        if todo:
            log(f"{len(todo)} fold(s) ended by Ray Tune before their {max_failures + 1} attempts were used "
                f"(e.g. a reused actor on a node that died): running them again")
        budget = 0  # one attempt per fold per further pass, so no fold gets more than max_failures + 1
    return failed


def _tune(cfg: GridConfig, pending: list[TrialSpec], data: dict, gpus: float, progress: _Progress,
          max_failures: int) -> tuple[dict, bool]:
    """One Tuner over the pending folds (one pass of :func:`run_passes`).

    Returns:
        ``(errored, interrupted)``: ``(cell_id, subject) -> (attempts, last error line)`` of the folds
        that ended in error, and True when the run was stopped before its end (Ctrl-C).
    """
    progress.errored = {}

    trainable = tune.with_resources(tune.with_parameters(fold_trial, data=data),
                                    {"cpu": cfg.cpus_per_trial, "gpu": gpus})
    storage = (cfg.work_dir / "ray_results").resolve()
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.to_config() for t in pending])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=cfg.max_concurrent or None,
            reuse_actors=True,  # one worker process per slot: no torch import per fold
            trial_name_creator=lambda t: f"{progress.cells[t.config['trial']['cell_id']].preset}_{t.config['trial']['subject']}",
            trial_dirname_creator=lambda t: f"{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[progress],
            verbose=0,
        ),
    )
    results = tuner.fit()
    # trials neither TERMINATED nor ERROR were stopped before their end (Ctrl-C)
    return progress.errored, results.num_terminated + results.num_errors < len(results)


def summary_table(outcome: GridOutcome) -> str:
    """The table printed at the end: one line per cell with its pooled UF1 / UAR, marked PARTIAL when only
    some folds ran (``--folds N``), and the published CDE Full figure where one exists (CDE cells)."""
    published = {c.cell_id: PRESETS[c.preset].figure("CDE", "full") for c in outcome.cells
                 if c.protocol == "CDE" and PRESETS[c.preset].figure("CDE", "full")}
    lines = [f"{'cell':<40} {'folds':>7} {'UF1':>7} {'UAR':>7}" + ("   published (CDE Full)" if published else "")]
    for c in outcome.cells:
        s = outcome.scores.get(c.cell_id)
        folds = f"{len(c.subjects)}/{c.all_subjects}" if c.partial else str(len(c.subjects))
        if not s:
            lines.append(f"{c.name:<40} {folds:>7} {'incomplete':>15}")
            continue
        paper = published.get(c.cell_id)
        mark = "   PARTIAL: not the dataset's score" if c.partial else ""
        uar = "-" if paper is None or paper.uar is None else f"{paper.uar:.4f}"  # some publish UF1 only (meb's)
        ptxt = f"   {paper.uf1:.4f} / {uar}" if paper and not c.partial else ""
        lines.append(f"{c.name:<40} {folds:>7} {s['all']['uf1']:7.4f} {s['all']['uar']:7.4f}{ptxt}{mark}")
    return "\n".join(lines)
