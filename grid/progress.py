"""The driver's side of a grid run (a Ray Tune callback): each finished fold logged to MLflow as it ends, a cell's
pooled scores when its last fold is in, final models logged, and one progress line per fold."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from ray.tune import Callback

from epir.complexity import measure
from epir.presets import build_model, config_from_dict

from . import logged_models, schema, tracking
from .cells import Cell, member_scores, pooled_scores
from .records import FoldRecord
from .trainable import FINAL_KEY, FOLD_KEY, PACK_KEY, TrialSpec


def _cell_stats(cell: Cell, folds: dict[str, dict]) -> dict:
    fs = [folds[s] for s in cell.subjects]
    c = measure(build_model(config_from_dict(cell.fold_model(cell.subjects[0]))))  # a search's cell: its first fold's
    stats = {"folds": len(fs), schema.TRAIN_SECONDS_SUM: sum(f.train_seconds for f in fs),
             schema.WALL_SECONDS: max(f.finished for f in fs) - min(f.started for f in fs),
             schema.PARAMS_M: c.params / 1e6, schema.MACS_M: c.macs / 1e6}
    members = member_scores(cell, folds)
    if members:  # each member alone: the spread over seeds that the ensemble averages away
        for k in ("uf1", "uar"):
            v = np.array([m["all"][k] for m in members])
            stats.update({f"{schema.MEMBERS}{k}_{stat}": x for stat, x in (("mean", v.mean()), ("sd", v.std(ddof=1)),
                                                                           ("min", v.min()), ("max", v.max()))})
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


