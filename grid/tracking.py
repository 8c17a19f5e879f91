"""MLflow for the grid: the store, one parent run per cell, one child run per fold.

Only the driver writes to MLflow (trials return their predictions and curves to it), so a fresh SQLite
store is never raced by concurrent trials. The store and the experiment are created before any trial
starts. A fold counts as done when its child run is FINISHED; a re-run of the same grid looks the
finished folds up by the cell's id and trains only the rest.

Store: ``MLFLOW_TRACKING_URI`` when set (e.g. the cluster's tracking server), else a SQLite file
``mlflow.db`` in the working directory with artifacts in ``mlartifacts/`` beside it. MLflow 3 no longer
accepts the old ``./mlruns`` file store.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from epir.presets import build_model, config_from_dict
from epir.train import SoftmaxEnsemble
from preprocess.runtime import package_versions

from . import schema
from .records import FoldRecord

matplotlib.use("Agg")  # figures are files; before pyplot is imported
import matplotlib.pyplot as plt

TAG_KIND, TAG_CELL, TAG_FOLD = schema.KIND, schema.CELL, schema.FOLD
TAG_DATA, TAG_CELL_V2 = schema.DATA, schema.CELL_V2  # see grid.cells.Cell


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(experiment: str, create: bool = True):
    """Create (or open) the store and the experiment, on the driver, before trials start.

    Args:
        create: create the experiment when it does not exist; with False its id is None then.

    Returns:
        (MlflowClient, experiment id).
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fold read back is noise
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None and not create:
        return client, None
    if exp is None:
        artifacts = (Path.cwd() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        exp_id = client.create_experiment(experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    # MLflow 3's UI opens an experiment of unknown kind on its GenAI overview; these are model training runs
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    save_view(client, exp_id)
    return client, exp_id


VIEW = "cells"  # the runs-table view every experiment carries (mlflow.sharedViewState.cells)
VIEW_STATE = {
    "searchFilter": f"tags.`{TAG_KIND}` = 'cell'", "orderByKey": "metrics.`uf1`", "orderByAsc": False,
    "selectedColumns": ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`", "metrics.`uf1`",
                        "metrics.`uar`", f"metrics.`{schema.PEEK}uf1`", f"tags.`{schema.PRESET}`", f"tags.`{schema.SEED}`",
                        f"tags.`{schema.FOLDS}`"],
}


def save_view(client, exp_id: str) -> None:
    """Save the runs-table view of the cells as MLflow's shared view state (the experiment tag
    ``mlflow.sharedViewState.cells``, which the UI's "share view" writes and ``?viewStateShareKey=`` reads):
    only the cells, best UF1 first, with the UF1, UAR and best-test-epoch UF1 (PEEKS) columns shown beside
    the Source, Models and Dataset columns."""
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW}", json.dumps(VIEW_STATE))


def runs_url(exp_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI address of an experiment's runs table in the saved view (:func:`save_view`): the cells,
    best UF1 first, their scores as columns."""
    return f"{host}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW}"


def source_tags(entry_point: str = "grid/run_all.py") -> dict:
    """MLflow's own source tags (the runs table's Source column): entry point, type, git commit."""
    commit = git_commit()
    return {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL",
            **({"mlflow.source.git.commit": commit.replace("+dirty", "")} if commit != "unknown" else {})}


def log_dataset(client, run_id: str, cell) -> None:
    """The cell's data as an MLflow dataset input (the runs table's Dataset column): named
    ``<dataset>/<protocol>``, its digest the data fingerprint (:attr:`grid.data.ProtocolData.fingerprint`; the
    shards' configuration id for a cell made without one), its source the shards' key."""
    ds = Dataset(name=f"{cell.dataset}/{cell.protocol}" + ("" if cell.flow == "farneback" else f" ({cell.flow})"),
                 digest=cell.data_fingerprint or cell.config_id[-10:], source_type="local",
                 source=json.dumps({"shards_config_id": cell.config_id, "data_key": cell.data_key, "flow": cell.flow,
                                    "data_fingerprint": cell.data_fingerprint}),
                 profile=json.dumps({"classes": cell.classes, "subjects": cell.all_subjects}))
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])])


def search_runs(client, exp_id: str, query: str) -> list:
    """Every run of an experiment matching an MLflow filter ``query``, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def git_commit() -> str:
    """The repository's HEAD commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


from .cells import flat_params  # noqa: E402, F401  (re-exported: the form MLflow params take)


def parent_run(client, exp_id: str, cell) -> str:
    """The cell's parent run id, created (RUNNING, with the cell's parameters) on first use."""
    found = search_runs(client, exp_id, f"tags.`{TAG_KIND}` = 'cell' and tags.`{TAG_CELL}` = '{cell.cell_id}'")
    if found:
        return found[0].info.run_id
    tags = {TAG_KIND: "cell", TAG_CELL: cell.cell_id, "mlflow.runName": cell.name, **cell.tags(), **source_tags()}
    run = client.create_run(exp_id, tags=tags, run_name=cell.name)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in cell.params().items()])
    client.set_tag(run.info.run_id, schema.GIT_COMMIT, git_commit())
    log_dataset(client, run.info.run_id, cell)
    return run.info.run_id


def finished_folds(client, exp_id: str, cell_id: str, fingerprint: str | None = None) -> dict[str, FoldRecord]:
    """Finished child runs of a cell: ``{subject: its record}`` read back from their ``fold.json``.

    Args:
        fingerprint: the cell's data fingerprint; a run tagged with another one (or with none) was trained on
            other data and is left out (:func:`folds_elsewhere` says so). None: every run of the id.
    """
    runs = search_runs(client, exp_id, f"tags.`{TAG_KIND}` = 'fold' and tags.`{TAG_CELL}` = '{cell_id}' "
                                   "and attributes.status = 'FINISHED'")
    out = {}
    for r in runs:
        subject = r.data.tags[TAG_FOLD]
        if subject in out or (fingerprint is not None and r.data.tags.get(TAG_DATA, "") != fingerprint):
            continue
        path = client.download_artifacts(r.info.run_id, "fold.json")
        out[subject] = FoldRecord.from_dict(json.loads(Path(path).read_text()))
    return out


def folds_elsewhere(client, exp_id: str, cell) -> tuple[dict[str, int], int]:
    """Finished fold runs that this cell does not reuse although a grid before id version 3 would have: those
    of the same settings trained on other data (tag ``epir.cell_id_v2`` equal, ``epir.data_fingerprint``
    different), and those of a store from before version 3, tagged with this cell's version-2 id as their
    cell id (their data unknown; ``grid/run_all.py migrate-ids`` re-tags them when it is this data).

    Returns:
        (``{other fingerprint: number of fold runs}``, number of version-2 fold runs).
    """
    fold = f"tags.`{TAG_KIND}` = 'fold' and attributes.status = 'FINISHED'"
    other: dict[str, int] = {}
    for r in search_runs(client, exp_id, f"{fold} and tags.`{TAG_CELL_V2}` = '{cell.cell_id_v2}'"):
        fp = r.data.tags.get(TAG_DATA, "")
        if fp != cell.data_fingerprint:
            other[fp or "none"] = other.get(fp or "none", 0) + 1
    v2 = [r for r in search_runs(client, exp_id, f"{fold} and tags.`{TAG_CELL}` = '{cell.cell_id_v2}'")
          if TAG_DATA not in r.data.tags]
    return other, len(v2)


def migrate_v2(client, exp_id: str, cell) -> int:
    """Re-tag the runs of a store made before id version 3 as this cell's (the one-off step of docs/grid.md):
    every run (parent, folds, final model) tagged with the cell's version-2 id as its cell id and carrying no
    data fingerprint gets the cell's id, setting id, data fingerprint and version-2 id. It ASSUMES that those
    runs were trained on the very data this cell was built from: nothing in a version-2 store can tell.

    Returns:
        the number of runs re-tagged.
    """
    runs = [r for r in search_runs(client, exp_id, f"tags.`{TAG_CELL}` = '{cell.cell_id_v2}'")
            if TAG_DATA not in r.data.tags]
    for r in runs:
        for k, v in {TAG_CELL: cell.cell_id, schema.SETTING: cell.setting_id, TAG_DATA: cell.data_fingerprint,
                     TAG_CELL_V2: cell.cell_id_v2}.items():
            client.set_tag(r.info.run_id, k, v)
    return len(runs)


PEEK = schema.PEEK  # prefix of every metric that peeks at the test subject


def _predictions_csv(cell, fold: FoldRecord, y_pred, probs) -> str:
    lines = ["sample_id,y_true,y_pred," + ",".join(f"p_{c}" for c in cell.classes)]
    for s, t, p, pr in zip(fold.sample_ids, fold.y_true, y_pred, probs):
        lines.append(f"{s},{cell.classes[t]},{cell.classes[p]}," + ",".join(f"{x:.5f}" for x in pr))
    return "\n".join(lines) + "\n"


def _fold_metrics(fold: FoldRecord, now: int) -> list:
    """A fold's MLflow metrics: the curve as histories, the test scores, and the peeking ones beside them."""
    metrics = [Metric(k, float(rec[k]), now, int(rec["epoch"])) for rec in fold.curve for k in rec if k != "epoch"]
    metrics += [Metric("test_accuracy", fold.accuracy, now, 0), Metric("test_samples", float(len(fold.y_true)), now, 0),
                Metric("train_seconds", float(fold.train_seconds), now, 0),
                Metric("selected_epoch", float(fold.selected_epoch), now, 0)]
    peek = fold.best_test_epoch
    if peek:
        hits = sum(a == b for a, b in zip(fold.y_true, peek.y_pred)) / len(fold.y_true)
        metrics += [Metric(f"{PEEK}epoch", float(peek.epoch), now, 0), Metric(f"{PEEK}test_accuracy", hits, now, 0)]
        metrics += [Metric(f"{PEEK}test_acc_by_epoch", float(a), now, e) for e, a in enumerate(peek.test_acc, 1)]
    return metrics


def log_fold(client, exp_id: str, parent_id: str, cell, fold: FoldRecord) -> str:
    """One child run for one finished fold: the full configuration as params, per-epoch loss and
    training accuracy as metric histories, the fold's metrics, its honest predictions
    (``predictions.csv``), and everything as ``fold.json``; marked FINISHED last, so a half-logged fold is
    not counted. The best-test-epoch result of the same training sits beside it, labelled: metrics
    ``best_test_epoch.epoch``, ``best_test_epoch.test_accuracy``, the history
    ``best_test_epoch.test_acc_by_epoch`` (the test subject's accuracy after each epoch) and
    ``predictions_best_test_epoch.csv``."""
    tags = {"mlflow.parentRunId": parent_id, TAG_KIND: "fold", TAG_CELL: cell.cell_id, TAG_FOLD: fold.subject,
            schema.NODE: str(fold.node), schema.DEVICE: str(fold.device), **cell.tags(), **source_tags()}
    rid = client.create_run(exp_id, tags=tags, run_name=f"{cell.name} | {fold.subject}").info.run_id
    metrics = _fold_metrics(fold, int(time.time() * 1000))
    params = {**cell.params(), **cell.fold_params(fold.subject), "fold.test_subject": fold.subject}
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i : i + 900])
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    client.log_text(rid, _predictions_csv(cell, fold, fold.y_pred, fold.probs), "predictions.csv")
    if fold.best_test_epoch:
        client.log_text(rid, _predictions_csv(cell, fold, fold.best_test_epoch.y_pred, fold.best_test_epoch.probs),
                        "predictions_best_test_epoch.csv")
    if fold.weights_path and Path(fold.weights_path).is_file():
        client.log_artifact(rid, fold.weights_path, "weights")
        client.log_text(rid, json.dumps({"model": cell.fold_model(fold.subject), "recipe": cell.fold_recipe(fold.subject),
                                         "classes": cell.classes}, indent=2), "weights/config.json")
    client.log_text(rid, json.dumps(fold.to_dict()), "fold.json")
    client.set_terminated(rid, "FINISHED")
    return rid


def final_model_uri(client, exp_id: str, cell_id: str) -> str | None:
    """The ``models:/`` URI of a cell's final model when it was logged (a FINISHED final-model run)."""
    runs = search_runs(client, exp_id, f"tags.`{TAG_KIND}` = 'final_model' and tags.`{TAG_CELL}` = '{cell_id}' "
                                       "and attributes.status = 'FINISHED'")
    return runs[0].data.tags.get(schema.MODEL_URI) if runs else None


def flow_record(preprocess: dict) -> dict:
    """How a model's training flows were made, for ``predict`` to make new pairs' flows the same way:
    ``algorithm`` (``farneback`` / ``tvl1``), ``normalization`` (per image), ``working_size`` (None where not
    published), ``source`` (``computed`` by our stages, or ``published`` flow images: the MEGC2019 composite
    is TV-L1, min-max per image, at an unpublished working size)."""
    if preprocess.get("precomputed"):
        return {"algorithm": "tvl1", "normalization": "minmax", "working_size": None, "source": "published"}
    cfg = preprocess.get("config") or {}
    return {"algorithm": cfg.get("flow", "farneback"), "normalization": cfg.get("normalize", "minmax"),
            "working_size": cfg.get("working_size"), "source": "computed"}


def model_metadata(cell) -> dict:
    """What applying a cell's model to new data needs, stored in its MLmodel file: the classes, the model and
    recipe, the input convention the model reads, and how its training flows were made."""
    conv = config_from_dict(cell.model).input_convention
    return {"classes": list(cell.classes), "model_config": cell.model, "recipe": cell.recipe,
            "input_convention": {"channels": list(conv.channels), "value_range": conv.value_range, "scale": conv.scale},
            "flow_range": cell.recipe["flow_range"], "preprocess": cell.preprocess or {}, "cell_id": cell.cell_id,
            "flow": flow_record(cell.preprocess or {}),
            "dataset": cell.dataset, "protocol": cell.protocol, "preset": cell.preset,
            "output": "log-probabilities; softmax gives the class probabilities in 'classes' order"}


def model_requirements() -> list[str]:
    """The packages a logged model needs to be loaded (its ``torch.export`` program: torch; MLflow reads it with
    numpy), pinned to the versions that saved it, as the model's ``requirements.txt``. Given explicitly: MLflow's
    own inference imports the model's modules again in a subprocess (6 s per model on the 2-core machine) and
    cannot ask a uv environment's pip for its version."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _load_final(cell, final: dict):
    """The model a final-model training saved (``final["path"]``), built from the cell's config, in eval mode."""
    config = config_from_dict(cell.model)
    members = int(cell.recipe.get("ensemble", 1))
    model = build_model(config) if members == 1 else SoftmaxEnsemble([build_model(config) for _ in range(members)])
    model.load_state_dict(torch.load(final["path"], map_location="cpu", weights_only=True))
    return model.eval()


def log_final_model(client, exp_id: str, parent_id: str, cell, final: dict) -> str:
    """Log a cell's model trained on all its subjects as an MLflow model (``mlflow.pytorch``, exported
    with ``torch.export``: loading runs no pickle) whose source is the cell's parent run (its Models column),
    with its input/output signature, an input example and :func:`model_metadata`, and a final-model child
    run holding its training curve; the input standardisation is inside the weights (buffers). Returns the
    model's ``models:/`` URI, also set as the tag ``epir.model_uri`` of both runs."""
    model = _load_final(cell, final)
    config = model.config
    x = torch.zeros(2, len(config.input_convention.channels), config.img_size, config.img_size)
    with torch.no_grad():
        signature = infer_signature(x.numpy(), model(x).numpy())
    tags = {TAG_KIND: "final_model", TAG_CELL: cell.cell_id, "mlflow.parentRunId": parent_id, **cell.tags(),
            **source_tags()}
    run = client.create_run(exp_id, tags=tags, run_name=f"{cell.name} | final model ({final['samples']} samples)")
    rid = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(rec[k]), now, int(rec["epoch"])) for rec in final["curve"] for k in rec if k != "epoch"]
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i : i + 900])
    # the model's source is the cell's parent run, so that the cell's row shows it in the runs table's Models
    # column (which lists the logged models whose source run a row is); the child run keeps its training curve
    mlflow.set_experiment(experiment_id=exp_id)  # a logged model without an active run joins the active experiment
    info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=x.numpy(),
                                    metadata=model_metadata(cell), run_id=parent_id,
                                    pip_requirements=model_requirements())
    client.log_outputs(rid, models=[LoggedModelOutput(info.model_id, 0)])
    client.set_tag(rid, schema.MODEL_URI, info.model_uri)
    client.set_tag(parent_id, schema.MODEL_URI, info.model_uri)
    return info.model_uri


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str):
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted), counts and row %."""
    cm = np.asarray(confusion, dtype=float)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(classes), 1.2 + 1.0 * len(classes)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def learning_curve_figure(folds: list[FoldRecord], title: str):
    """A matplotlib figure of a cell's TRAINING curves: mean and min..max band over its folds of the training
    loss, the training accuracy and the learning rate per epoch. No test-subject curve: a figure to choose an
    epoch count from must not show the test subjects (:func:`peek_figure` holds theirs, labelled)."""
    epochs = min(len(f.curve) for f in folds)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    x = np.arange(1, epochs + 1)
    for ax, key, name in ((axes[0], "loss", "training loss"), (axes[1], "train_acc", "training accuracy"),
                          (axes[2], "lr", "learning rate")):
        v = np.asarray([[rec.get(key, np.nan) for rec in f.curve[:epochs]] for f in folds], dtype=float)
        ax.plot(x, v.mean(0), label=f"{name}, mean of {len(folds)} folds")
        ax.fill_between(x, v.min(0), v.max(0), alpha=0.25, label="min .. max over folds")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def peek_figure(folds: list[FoldRecord], title: str):
    """The test subjects' accuracy after every epoch, pooled over the folds (each fold weighted by its test
    samples): what the best-test-epoch result is chosen from. It PEEKS; its title says so. None when a fold
    has no per-epoch test scores."""
    if not all(f.best_test_epoch for f in folds):
        return None
    epochs = min(len(f.best_test_epoch.test_acc) for f in folds)
    acc = np.asarray([f.best_test_epoch.test_acc[:epochs] for f in folds])
    w = np.asarray([len(f.y_true) for f in folds], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(np.arange(1, epochs + 1), (acc * w[:, None]).sum(0) / w.sum(), "--", color="tab:red",
            label="test subjects' accuracy, pooled")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    ax.set_title(f"PEEKS at the test subjects (oracle gap only): {title}", fontsize=8)
    fig.tight_layout()
    return fig


def score_metrics(scores: dict, now: int, prefix: str = "") -> list:
    """MLflow metrics of pooled scores: ``uf1``, ``uar``, ``accuracy`` overall and ``uf1_<group>`` ... per
    source dataset, each name behind ``prefix`` (``best_test_epoch.`` for the peeking result)."""
    out = []
    for group, s in scores.items():
        suffix = "" if group == "all" else f"_{group}"
        out += [Metric(f"{prefix}{k}{suffix}", float(s[k]), now, 0) for k in ("uf1", "uar", "accuracy")]
    return out


def log_cell(client, parent_id: str, cell, scores: dict, stats: dict, peek: dict | None = None,
             folds: dict | None = None) -> None:
    """Finish a cell's parent run: pooled UF1 / UAR / accuracy overall and per source dataset, the
    confusion matrices as figures and JSON, complexity, wall and training time, package versions.

    ``peek``, the pooled best-test-epoch scores of the same folds, goes beside them under
    ``best_test_epoch.*`` (with ``best_test_epoch.gap_uf1`` / ``gap_uar``, how much choosing the epoch on
    the test subject adds) and into ``scores_best_test_epoch.json``; it never replaces the honest ones.
    With ``folds`` (subject -> fold record), ``learning_curves.png`` shows the folds' training curves."""
    now = int(time.time() * 1000)
    metrics = score_metrics(scores, now)
    metrics += [Metric(k, float(v), now, 0) for k, v in stats.items()]
    if peek:
        metrics += score_metrics(peek, now, PEEK)
        metrics += [Metric(f"{PEEK}gap_{k}", float(peek["all"][k] - scores["all"][k]), now, 0) for k in ("uf1", "uar")]
    client.log_batch(parent_id, metrics=metrics)
    for group, s in scores.items():
        fig = confusion_figure(s["confusion"], cell.classes, f"{cell.name} [{group}] UF1 {s['uf1']:.4f} UAR {s['uar']:.4f}")
        client.log_figure(parent_id, fig, f"confusion_{group}.png")
        plt.close(fig)
    client.log_text(parent_id, json.dumps(scores, indent=2), "scores.json")
    if peek:
        client.log_text(parent_id, json.dumps(peek, indent=2), "scores_best_test_epoch.json")
    if cell.fold_settings:
        client.log_text(parent_id, json.dumps({s: f["choice"] for s, f in cell.fold_settings.items()}, indent=2),
                        "choices.json")
    if folds:
        client.log_text(parent_id, pooled_predictions_csv(cell, folds), POOLED)
        fig = learning_curve_figure([folds[s] for s in cell.subjects], f"{cell.name}: learning curves")
        client.log_figure(parent_id, fig, "learning_curves.png")
        plt.close(fig)
        fig = peek_figure([folds[s] for s in cell.subjects], cell.name)
        if fig is not None:
            client.log_figure(parent_id, fig, "peeks_test_accuracy.png")
            plt.close(fig)
    client.log_text(parent_id, json.dumps(package_versions(), indent=2), "versions.json")
    client.set_tag(parent_id, schema.VERSIONS, json.dumps(package_versions()))
    client.set_terminated(parent_id, "FINISHED")


POOLED = "pooled_predictions.csv"  # a cell's honest and best-test-epoch predictions, every fold, on its parent run
POOLED_COLUMNS = ["subject", "sample_id", "group", "y_true", "y_pred", "y_pred_best_test_epoch"]
PROB = "prob_"  # + a class name: that class's honest (last-epoch) softmax probability, a column per class


def prob_columns(classes: list[str]) -> list[str]:
    """The probability columns of pooled and kept predictions, in class order (``prob_<class>``)."""
    return [f"{PROB}{c}" for c in classes]


def _pooled_rows(cell, folds: dict) -> list[dict]:
    """One row per sample of every fold: subject, sample, source dataset, true and predicted class names, and the
    honest probabilities of every class (empty for folds logged without them)."""
    rows = []
    cols = prob_columns(cell.classes)
    for s in cell.subjects:
        f = folds[s]
        bte = f.best_test_epoch.y_pred if f.best_test_epoch else [None] * len(f.y_true)
        probs = f.probs if f.probs and len(f.probs) == len(f.y_true) else [[""] * len(cols)] * len(f.y_true)
        for sid, g, t, p, b, q in zip(f.sample_ids, f.groups, f.y_true, f.y_pred, bte, probs):
            rows.append({"subject": s, "sample_id": sid, "group": g, "y_true": cell.classes[t], "y_pred": cell.classes[p],
                         "y_pred_best_test_epoch": "" if b is None else cell.classes[b], **dict(zip(cols, q))})
    return rows


def pooled_predictions_csv(cell, folds: dict) -> str:
    """Every fold's predictions in one table (what paired comparisons resample, :mod:`grid.compare`):
    ``subject, sample_id, group, y_true, y_pred, y_pred_best_test_epoch`` (class names; the last column PEEKS,
    empty for folds without it), then ``prob_<class>`` per class (honest softmax probabilities, 5 decimals)."""
    columns = POOLED_COLUMNS + prob_columns(cell.classes)
    return pd.DataFrame(_pooled_rows(cell, folds), columns=columns).to_csv(index=False)


def read_pooled_predictions(client, exp_id: str, run) -> pd.DataFrame:
    """A finished cell's pooled predictions: its parent run's ``pooled_predictions.csv``, or, for cells logged
    before it existed, read back from its child runs. Columns as :func:`pooled_predictions_csv`, labels as
    class indices (``y_true``, ``y_pred``, ``y_pred_best_test_epoch``, -1 where absent), probabilities as
    floats (NaN where absent; cells logged before they were kept have no such columns)."""
    classes = run.data.params.get("classes", "").split(",")
    index = {c: i for i, c in enumerate(classes)}
    try:
        df = pd.read_csv(client.download_artifacts(run.info.run_id, POOLED), dtype=str, keep_default_na=False)
    except (MlflowException, OSError):  # a cell finished before the parent run kept its predictions
        folds = finished_folds(client, exp_id, run.data.tags[TAG_CELL])
        cell = SimpleNamespace(subjects=sorted(folds), classes=classes)
        df = pd.DataFrame(_pooled_rows(cell, folds), columns=POOLED_COLUMNS + prob_columns(classes))
    for col in ("y_true", "y_pred", "y_pred_best_test_epoch"):
        df[col] = df[col].map(lambda v: index.get(v, -1)).astype(int)
    for col in [c for c in prob_columns(classes) if c in df]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def log_comparison(client, run_ids: list[str], name: str, against: str, paired: dict) -> None:
    """A paired comparison (:class:`grid.compare.Paired` per metric) on the parent runs of the row compared:
    metrics ``paired.<name>.<metric>_diff`` / ``_ci_low`` / ``_ci_high`` / ``_seeds_agree`` and a tag
    ``paired.<name>`` that says against which preset and how."""
    now = int(time.time() * 1000)
    metrics = []
    for m, p in paired.items():
        metrics += [Metric(f"paired.{name}.{m}_{k}", float(v), now, 0)
                    for k, v in (("diff", p.diff), ("ci_low", p.ci_low), ("ci_high", p.ci_high), ("seeds_agree", p.agree))]
    text = f"minus {against}, paired over seeds {list(next(iter(paired.values())).seeds)}; " + \
        "; ".join(f"{m.upper()} {p.text()}" for m, p in paired.items())
    for rid in run_ids:
        client.log_batch(rid, metrics=metrics)
        client.set_tag(rid, f"paired.{name}", text[:5000])


def finished_cells(client, exp_id: str) -> list:
    """The experiment's finished parent runs (complete cells), newest first."""
    runs = search_runs(client, exp_id, f"tags.`{TAG_KIND}` = 'cell' and attributes.status = 'FINISHED'")
    return sorted(runs, key=lambda r: r.info.end_time or 0, reverse=True)



# --- searches (grid/search.py) ------------------------------------------------------------------

def search_parent_run(client, exp_id: str, study: str, storage_url: str, data, preset: str, label: str,
                      params: dict) -> str:
    """The search's parent run (found again by its study name, or created with its settings as params)."""
    found = search_runs(client, exp_id, f"tags.`{TAG_KIND}` = 'search' and tags.`{schema.STUDY}` = '{study}'")
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"search {data.key} {preset}",
                            tags={TAG_KIND: "search", schema.STUDY: study, schema.OPTUNA_STORAGE: storage_url,
                                  schema.DATASET: data.dataset, schema.PROTOCOL: data.protocol, schema.PRESET: preset,
                                  schema.PROFILE: label, schema.GIT_COMMIT: git_commit()})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def log_search_trial(client, exp_id: str, parent: str, study: str, trial_id: str, params: dict, result: dict) -> str:
    """One search trial as a child run: its values as params, ``val_uf1`` (mean inner score), ``val_uf1_g<g>``,
    ``val_uar`` and ``train_seconds`` as metrics, and its per-pair predictions as ``folds.json``."""
    child = client.create_run(exp_id, run_name=f"trial {trial_id}", tags={
        "mlflow.parentRunId": parent, TAG_KIND: "search_trial", schema.STUDY: study,
        schema.INVALID: result.get("invalid", "")})
    rid = child.info.run_id
    now = int(time.time() * 1000)
    keys = [k for k in result if k.startswith("val_u")] + ["train_seconds"]
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(result[k]), now, 0) for k in keys])
    client.log_text(rid, result["folds_json"], "folds.json")
    client.set_terminated(rid, "FINISHED")
    return rid


def search_trials(client, exp_id: str, study: str, types: dict) -> list[dict]:
    """The study's completed trials as MLflow holds them, numbered 1, 2, ... in the order they finished (the
    log's ``[trial k/n]``): ``{"number", "params", "value", "folds", "run_id"}``; ``types`` maps each searched
    field to a function that turns its param text back into the value the trial used."""
    runs = search_runs(client, exp_id, f"tags.`{TAG_KIND}` = 'search_trial' and tags.`{schema.STUDY}` = '{study}' "
                                       "and attributes.status = 'FINISHED'")
    out = []
    for n, r in enumerate(sorted(runs, key=lambda r: r.info.start_time)):
        folds = json.loads(Path(client.download_artifacts(r.info.run_id, "folds.json")).read_text())
        params = {k: f(r.data.params[k]) for k, f in types.items() if k in r.data.params}
        out.append({"number": n + 1, "params": params, "value": r.data.metrics.get("val_uf1", 0.0), "folds": folds,
                    "run_id": r.info.run_id})
    return out


def log_search_result(client, parent: str, choices_path: Path, best_path: Path, best_value: float, trials: int,
                      study, log=print) -> None:
    """The search's choice files and figures on its parent run."""
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric("best_val_uf1", float(best_value), now, trials),
                                      Metric("trials_completed", float(trials), now, trials)])
    client.log_text(parent, choices_path.read_text(), "choices.json")
    client.log_text(parent, best_path.read_text(), "best.json")
    log_study_figures(client, parent, study, log)


def log_study_figures(client, run_id: str, study, log=print) -> None:
    """Optuna's optimisation history and parameter importances (PED-ANOVA, no scikit-learn needed) as
    figures of the search's parent run. They show the mean inner validation UF1 of all groups: a picture of
    the search, not what any group's choice used."""
    import optuna  # deferred: the search's alone
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


def log_search_test(client, parent: str, test: dict) -> None:
    """The honest nested cell's scores on the search's parent run."""
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric("test_uf1", test["uf1"], now, 0), Metric("test_uar", test["uar"], now, 0)])
    client.set_tag(parent, schema.TEST_CELLS, ",".join(test["cell_ids"]))


def log_search_model(client, exp_id: str, parent: str, cell, final: dict, study: str, expected: dict) -> str:
    """A search's final model (its best-on-all candidate trained on all subjects) as an MLflow model of the
    search's parent run (its Models column), with :func:`model_metadata` plus the expected score (the
    nested cell's honest UF1 / UAR) and the study. Returns the ``models:/`` URI (tag ``epir.model_uri``)."""
    model = _load_final(cell, final)
    x = torch.zeros(2, len(model.config.input_convention.channels), model.config.img_size, model.config.img_size)
    with torch.no_grad():
        signature = infer_signature(x.numpy(), model(x).numpy())
    meta = {**model_metadata(cell), "search": study, **expected,
            "expected_note": "the honest UF1 / UAR of the search's nested LOSO cell: the score of the whole tuning "
                             "procedure; this model is that procedure refit on every subject"}
    mlflow.set_experiment(experiment_id=exp_id)  # a logged model without an active run joins the active experiment
    info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=x.numpy(), metadata=meta,
                                    run_id=parent,  # the parent row's Models column
                                    pip_requirements=model_requirements())
    client.set_tag(parent, schema.MODEL_URI, info.model_uri)
    return info.model_uri


def finish_search(client, parent: str) -> None:
    """Mark the search's parent run FINISHED."""
    client.set_terminated(parent, "FINISHED")
