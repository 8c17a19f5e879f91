"""The grid: cells (dataset x protocol x ablation preset), each a full LOSO evaluation whose folds are
Ray Tune trials, recorded in MLflow by the driver.

Flow of :func:`run_grid`:
1. connect to Ray (``preprocess.runtime.init_ray``: ``RAY_ADDRESS``, or the cluster this node
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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ray import tune
from ray.tune import Callback

from epir.complexity import measure
from epir.pack import check_packable
from epir.presets import PRESETS, build_model, config_from_dict
from epir.train import TrainRecipe
from preprocess.adapters import DatasetError
from preprocess.demo import make_demo_dataset
from preprocess.runtime import init_ray

from . import logged_models, migration, tracking
from .cells import Cell, build_cells, fold_packs, member_scores, pooled_scores
from .config import DatasetSpec, GridConfig
from .data import ProtocolData, composite, load_protocol, preprocess, protocol_support
from .records import FoldRecord
from .trainable import FINAL, FINAL_KEY, FOLD_KEY, PACK_KEY, TrialSpec, fold_trial

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


def check_fit(resources_per_node: list[dict], bundles: list[dict]) -> None:
    """Refuse a placement group the cluster can never hold (instead of waiting for it forever).

    Args:
        resources_per_node: total resources of each alive node (``ray.nodes()``'s ``Resources``).
        bundles: the trial's bundles.

    Raises:
        ValueError: the bundles' sum exceeds the cluster, or one bundle fits on no node.
    """
    for key in ("CPU", "GPU"):
        need = sum(b.get(key, 0) for b in bundles)
        have = sum(n.get(key, 0) for n in resources_per_node)
        if need > have + 1e-9:
            raise ValueError(f"a trial reserves {need:g} {key} ({len(bundles)} bundles) but the cluster has {have:g}: "
                             "lower --cpus-per-trial / --gpus-per-trial (search: --fold-parallel)")
    for b in bundles:
        if not any(all(n.get(k, 0) + 1e-9 >= v for k, v in b.items()) for n in resources_per_node):
            raise ValueError(f"no node can hold a fold bundle {b}")


def _cell_stats(cell: Cell, folds: dict[str, dict]) -> dict:
    fs = [folds[s] for s in cell.subjects]
    c = measure(build_model(config_from_dict(cell.fold_model(cell.subjects[0]))))  # a search's cell: its first fold's
    stats = {"folds": len(fs), "train_seconds_sum": sum(f.train_seconds for f in fs),
             "wall_seconds": max(f.finished for f in fs) - min(f.started for f in fs),
             "params_M": c.params / 1e6, "macs_M": c.macs / 1e6}
    members = member_scores(cell, folds)
    if members:  # each member alone: the spread over seeds that the ensemble averages away
        for k in ("uf1", "uar"):
            v = np.array([m["all"][k] for m in members])
            stats.update({f"members.{k}_mean": v.mean(), f"members.{k}_sd": v.std(ddof=1), f"members.{k}_min": v.min(),
                          f"members.{k}_max": v.max()})
    return stats


class _Progress(Callback):
    """Tune callback (driver side): logs each finished fold to MLflow, finishes cells, prints progress.

    Folds and final models (a cell's model on all subjects) are counted apart: ``folds_total`` and
    ``finals_total`` are what this run trains of each.
    """

    def __init__(self, client, exp_id, cells, parents, done, folds_total: int, finals_total: int, log):
        self.client, self.exp_id, self.cells, self.parents, self.done = client, exp_id, cells, parents, done
        self.folds_total, self.finals_total, self.log = folds_total, finals_total, log
        self.folds_now = self.finals_now = 0
        self.errored: dict[tuple[str, str], tuple[int, str]] = {}  # the current pass's (_tune resets it)
        self.train_seconds = 0.0
        self.start = time.perf_counter()

    @property
    def finished_now(self) -> int:
        """Folds and final models trained by this run."""
        return self.folds_now + self.finals_now

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.complete(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.log(f"  retry  {self.label(trial)}: {self.error_line(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        t = TrialSpec.from_config(trial.config["trial"])
        n, err = max(1, trial.num_failures), self.error_line(trial)
        self.errored[t.key] = (n, err)
        self.log(f"  ended  {self.label(trial)} after {n} attempt(s) in this pass: {err}")

    def label(self, trial) -> str:
        t = TrialSpec.from_config(trial.config["trial"])
        return f"{self.cells[t.cell_id].name} | fold {t.subject}"

    @staticmethod
    def error_line(trial) -> str:
        err = trial.error_file and Path(trial.error_file)
        text = err.read_text() if err and err.exists() else str(getattr(trial, "error_msg", "") or "unknown error")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "unknown error"

    def complete(self, trial) -> None:
        t = TrialSpec.from_config(trial.config["trial"])
        res = trial.last_result or {}
        if FINAL_KEY in res:
            cell = self.cells[t.cell_id]
            final = json.loads(res[FINAL_KEY])
            uri = logged_models.log_final_model(self.client, self.exp_id, self.parents[cell.cell_id], cell, final)
            self.finals_now += 1
            self.train_seconds += final["train_seconds"]
            self.log(f"[{self.finals_now}/{self.finals_total} final models] {cell.name}: trained on all "
                     f"{final['samples']} samples in {final['train_seconds']:.1f} s: {uri}")
            return
        if FOLD_KEY in res:
            self.fold_done(self.cells[t.cell_id], FoldRecord.from_dict(json.loads(res[FOLD_KEY])))
        for fold in json.loads(res.get(PACK_KEY, "[]")):  # a pack: its folds, each its own child run
            self.fold_done(self.cells[t.cell_id], FoldRecord.from_dict(fold))

    def fold_done(self, cell: Cell, fold: FoldRecord) -> None:
        """Log one finished fold, print progress, and finish its cell when it was the last."""
        tracking.log_fold(self.client, self.exp_id, self.parents[cell.cell_id], cell, fold)
        self.done[cell.cell_id][fold.subject] = fold
        self.folds_now += 1
        self.train_seconds += fold.train_seconds
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.folds_now * (self.folds_total - self.folds_now)
        cells_done = sum(len(self.done[c.cell_id]) == len(c.subjects) for c in self.cells.values())
        self.log(f"[{self.folds_now}/{self.folds_total} folds, {cells_done}/{len(self.cells)} cells, "
                 f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min] {cell.name} | fold {fold.subject}: "
                 f"acc {fold.accuracy:.3f} on {len(fold.y_true)}, {fold.train_seconds:.1f} s")
        if len(self.done[cell.cell_id]) == len(cell.subjects):
            finish_cell(self.client, self.parents[cell.cell_id], cell, self.done[cell.cell_id], self.log)


def finish_cell(client, parent_id: str, cell: Cell, folds: dict, log=print) -> dict:
    """Pool a complete cell's folds, log the parent run's scores (honest, and best-test-epoch beside them,
    labelled) and figures, and return the honest scores."""
    scores = pooled_scores(cell, folds)
    peek = pooled_scores(cell, folds, best_test_epoch=True)
    tracking.log_cell(client, parent_id, cell, scores, _cell_stats(cell, folds), peek, folds)
    s = scores["all"]
    extra = f"; best test epoch (peeks): UF1 {peek['all']['uf1']:.4f}" if peek else ""
    log(f"  cell done: {cell.name}: UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}  ({len(cell.subjects)} folds{extra})")
    return scores


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


@dataclass
class Resources:
    """What the cluster offers and what one trial asks for."""

    profile: str
    has_gpu: bool
    cpus: float
    gpus: float


def plan_resources(cfg: GridConfig, log=print) -> Resources:
    """Connect to Ray, resolve the profile, size a trial, and refuse a trial no node could hold (it would
    wait forever).

    Raises:
        ValueError: a trial larger than any node.
    """
    ray = init_ray(py_modules=[str(f) for f in cfg.model_files])  # a user's model files reach every worker
    have = ray.cluster_resources()
    has_gpu = have.get("GPU", 0) > 0
    packs = cfg.fold_pack != 1 and has_gpu  # a pack of folds on a GPU takes the whole device by default
    gpus = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else ((1.0 if packs else 0.25) if has_gpu else 0.0)
    res = Resources(cfg.resolved_profile(has_gpu), has_gpu, cfg.cpus_per_trial, gpus)
    log(f"Ray: {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs; profile {res.profile}; each trial asks for "
        f"{res.cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "") + f"; {pack_text(cfg, has_gpu)}")
    check_fit([n["Resources"] for n in ray.nodes() if n["Alive"]], [{"CPU": res.cpus, "GPU": gpus}])
    return res


def pack_text(cfg: GridConfig, has_gpu: bool) -> str:
    """How folds are grouped into trials, in words."""
    size = cfg.fold_pack or (0 if has_gpu else 1)
    return "one fold per trial" if size == 1 else \
        ("every fold of a cell in one batched trial" if size == 0 else f"up to {size} folds per batched trial")


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
        ptxt = f"   {paper.uf1:.4f} / {paper.uar:.4f}" if paper and not c.partial else ""
        lines.append(f"{c.name:<40} {folds:>7} {s['all']['uf1']:7.4f} {s['all']['uar']:7.4f}{ptxt}{mark}")
    return "\n".join(lines)
