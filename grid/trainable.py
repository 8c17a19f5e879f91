"""The Ray Tune trial of the grid: one leave-one-subject-out fold of one cell.

The trial trains with :func:`epir.train.train_fold`, reports every epoch (``epoch``, ``loss``,
``train_acc``) through ``ray.tune.report``, and finishes with a report whose ``fold_json`` holds the
test subject's predictions and the curve; the driver logs that to MLflow. Trials never write to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

FOLD_KEY = "fold_json"


class InjectedFailure(RuntimeError):
    """Raised by a trial told to fail (``--inject-failure``), to exercise retries and failure reports."""


def _maybe_fail(spec: str | None, subject: str, marker_dir: str) -> None:
    """``SUBJECT`` fails every attempt; ``SUBJECT:once`` fails only the first (a marker file remembers)."""
    if not spec:
        return
    target, _, mode = spec.partition(":")
    if target != subject:
        return
    if mode == "once":
        marker = Path(marker_dir) / f"injected-{subject}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    raise InjectedFailure(f"injected failure for fold {subject} (--inject-failure {spec})")


def fold_trial(config: dict, data: dict) -> None:
    """Ray Tune function trainable: train and evaluate one fold.

    Args:
        config: ``{"trial": {...}}`` with ``data_key``, ``subject``, ``model`` (EPIRConfig fields),
            ``recipe`` (TrainRecipe fields), ``threads``, ``inject`` and ``marker_dir``.
        data: ``{data_key: grid.data.ProtocolData}`` (put in the object store by ``tune.with_parameters``).

    Raises:
        InjectedFailure: when told to fail; anything :func:`epir.train.train_fold` raises.
    """
    import ray
    import torch
    from ray import tune

    from epir.model import EPIRConfig
    from epir.train import TrainRecipe, train_fold

    t = config["trial"]
    torch.set_num_threads(max(1, int(t["threads"])))
    _maybe_fail(t.get("inject"), t["subject"], t["marker_dir"])
    d = data[t["data_key"]]
    recipe = TrainRecipe(**t["recipe"])
    started = time.time()
    r = train_fold(d.flows, d.labels, d.subjects, t["subject"], EPIRConfig(**t["model"]), recipe,
                   on_epoch_end=lambda rec: tune.report(dict(rec)))
    fold = {
        "subject": r.test_subject, "sample_ids": d.sample_ids[r.test_index].tolist(),
        "groups": d.groups[r.test_index].tolist(), "y_true": r.y_true.tolist(), "y_pred": r.y_pred.tolist(),
        "probs": r.probs.round(5).tolist(), "curve": r.curve, "selected_epoch": r.selected_epoch,
        "epoch_selection": r.epoch_selection, "train_seconds": r.train_seconds, "device": r.device,
        "node": ray.get_runtime_context().get_node_id(), "started": started, "finished": time.time(),
    }
    tune.report({"epoch": r.curve[-1]["epoch"], "done": True, FOLD_KEY: json.dumps(fold)})
