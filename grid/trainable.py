"""The Ray Tune trial of the grid: one leave-one-subject-out fold of one cell, or a pack of its folds.

The trial trains with :func:`epir.train.train_fold` (a pack of folds of the same settings with
:func:`epir.pack.train_folds`, one batched model), reports its progress (``epoch``, ``loss``,
``train_acc``; every epoch, or every ``epochs // 100``-th for long recipes) through ``ray.tune.report``,
and finishes with a report whose ``fold_json`` (a pack: ``pack_json``, a list) holds the test subject's
predictions and the curve (:class:`grid.records.FoldRecord` as JSON, with ``weights_path`` when saved); the driver logs that to MLflow. Trials never write to
MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from epir.pack import train_folds
from epir.presets import config_from_dict
from epir.registry import import_model_modules
from epir.train import SoftmaxEnsemble, TrainRecipe, fit_all, train_fold

from .records import FoldRecord

FOLD_KEY = "fold_json"
PACK_KEY = "pack_json"  # a pack's folds: a JSON list of fold records
FINAL_KEY = "final_json"
FINAL = "*all subjects*"  # the subject of a cell's final-model trial: it trains on every subject
REPORTS_PER_FOLD = 100  # at most this many progress reports to Tune per fold; the full curve goes to MLflow


@dataclass(frozen=True)
class TrialSpec:
    """What one Ray Tune trial of the grid trains (:func:`grid.runner.plan_trials` makes them; Tune carries each as
    the plain dict :meth:`to_config` gives, and :func:`fold_trial` reads it back with :meth:`from_config`).

    Attributes:
        cell_id, data_key: the cell and the key of its data (``grid.data.ProtocolData.key``).
        subject: the fold's test subject, a pack's subjects joined by ``+``, or :data:`FINAL` (the cell's model on
            every subject).
        model: a model config dict (:func:`epir.presets.config_to_dict`); recipe: TrainRecipe fields.
        subjects: a pack's test subjects (several folds of the same settings as one batched model); empty for one.
        threads: torch threads; inject: ``SUBJECT[:once]`` makes that fold fail (tests only).
        model_modules: a user's model files' module names, imported before the config is read (Ray ships them).
        marker_dir, model_dir: where failure markers and weights for the driver to log are written.
        keep_weights: save each fold's trained model too.
    """

    cell_id: str
    data_key: str
    subject: str
    model: dict
    recipe: dict
    subjects: tuple[str, ...] = ()
    threads: int = 1
    inject: str | None = None
    model_modules: tuple[str, ...] = ()
    marker_dir: str = ""
    model_dir: str = ""
    keep_weights: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """``(cell_id, subject)``: the fold (or pack) this trial is."""
        return self.cell_id, self.subject

    def to_config(self) -> dict:
        """The plain dict Ray Tune carries (lists, not tuples: Tune's config is JSON-like)."""
        return {**dataclasses.asdict(self), "subjects": list(self.subjects), "model_modules": list(self.model_modules)}

    @classmethod
    def from_config(cls, config: dict) -> TrialSpec:
        """Inverse of :meth:`to_config`."""
        return cls(**{**config, "subjects": tuple(config.get("subjects") or ()),
                      "model_modules": tuple(config.get("model_modules") or ())})


class InjectedFailure(RuntimeError):
    """Raised by a trial told to fail (``--inject-failure``), to exercise retries and failure reports."""


def _maybe_fail(spec: str | None, subjects: list[str], marker_dir: str) -> None:
    """``SUBJECT`` fails every attempt of the trial holding that fold; ``SUBJECT:once`` fails only the first
    (a marker file remembers)."""
    if not spec:
        return
    target, _, mode = spec.partition(":")
    if target not in subjects:
        return
    subject = target
    if mode == "once":
        marker = Path(marker_dir) / f"injected-{subject}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    raise InjectedFailure(f"injected failure for fold {subject} (--inject-failure {spec})")


def fold_trial(config: dict, data: dict) -> None:
    """Ray Tune function trainable: train and evaluate one fold, a pack of folds (several folds of the same settings
    trained as one batched model, :func:`epir.pack.train_folds`; reported under :data:`PACK_KEY`), or a cell's
    final model (:data:`FINAL`).

    Args:
        config: ``{"trial": TrialSpec.to_config()}`` (:class:`TrialSpec`).
        data: ``{data_key: grid.data.ProtocolData}`` (put in the object store by ``tune.with_parameters``).

    Raises:
        InjectedFailure: when told to fail; anything :func:`epir.train.train_fold` raises.
    """
    t = TrialSpec.from_config(config["trial"])
    import_model_modules(t.model_modules)  # a user's models, shipped by Ray: registered before any config
    torch.set_num_threads(max(1, int(t.threads)))
    subjects = list(t.subjects) or [t.subject]
    _maybe_fail(t.inject, subjects, t.marker_dir)
    d = data[t.data_key]
    recipe = TrainRecipe(**t.recipe)
    model_config = config_from_dict(t.model)
    every = max(1, recipe.epochs // REPORTS_PER_FOLD)  # Tune's per-report cost matters at 800 epochs

    def report(rec: dict) -> None:
        if rec["epoch"] % every == 0 and rec["epoch"] < recipe.epochs:
            tune.report(dict(rec))

    if t.subject == FINAL:  # the cell's model for new data: every subject, the cell's recipe
        final = _final_model(t, d, model_config, recipe, report)
        tune.report({"epoch": final["curve"][-1]["epoch"], "done": True, FINAL_KEY: json.dumps(final)})
        return
    folds = _folds(t, subjects, d, model_config, recipe, report)
    last = {"epoch": folds[0]["curve"][-1]["epoch"], "done": True}
    tune.report({**last, PACK_KEY: json.dumps(folds)} if len(subjects) > 1 else {**last, FOLD_KEY: json.dumps(folds[0])})


def _final_model(t: TrialSpec, d, model_config, recipe, report) -> dict:
    """Train the cell's model on every subject and save its weights; the record the driver logs."""
    return {**train_final(d, model_config, recipe, Path(t.model_dir) / f"{t.cell_id}-final.pt", report),
            "node": _node()}


def train_final(d, model_config, recipe: TrainRecipe, path: Path, on_epoch_end=None) -> dict:
    """A model trained on every subject of ``d`` (:func:`epir.train.fit_all`), its weights saved at ``path``: the
    record a final model is logged from (``path``, ``curve``, ``train_seconds``, ``samples``). The grid's final
    models and the search's best-on-all model are trained by it."""
    started = time.time()
    model, curve = fit_all(model_config, recipe, d.model_flows(model_config), d.labels, on_epoch_end=on_epoch_end)
    save_weights(model, path)
    return {"path": str(path), "curve": curve, "train_seconds": time.time() - started, "samples": len(d.labels)}


def _folds(t: TrialSpec, subjects: list[str], d, model_config, recipe, report) -> list[dict]:
    """Train one fold, or a pack of folds as one batched model; their records (weights saved on request)."""
    started, keep = time.time(), t.keep_weights
    flows = d.model_flows(model_config)  # HTNet's facial-region tile where the model reads it
    if len(subjects) > 1:  # a pack: the folds trained as one batched model (epir.pack)
        results = train_folds(flows, d.labels, d.subjects, subjects, model_config, recipe, keep_models=keep,
                              on_epoch_end=lambda s, rec: report(rec) if s == subjects[0] else None)
    else:
        results = [train_fold(flows, d.labels, d.subjects, subjects[0], model_config, recipe, on_epoch_end=report,
                              keep_models=keep)]
    folds = []
    for r in results:
        fold = FoldRecord.from_result(r, d, started, _node()).to_dict()
        if r.models:
            path = Path(t.model_dir) / f"{t.cell_id}-{r.test_subject}.pt"
            save_weights(r.models[0] if len(r.models) == 1 else SoftmaxEnsemble(r.models), path)
            fold["weights_path"] = str(path)
        folds.append(fold)
    return folds


def _node() -> str:
    """The Ray node this trial runs on."""
    return ray.get_runtime_context().get_node_id()


def save_weights(model, path: Path) -> None:
    """A trained model's state dict (tensors only: loadable with ``torch.load(weights_only=True)``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
