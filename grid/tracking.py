"""MLflow for the grid: the store, one parent run per cell, one child run per fold. Its jobs: (1) the store, its
experiment and UI view, and a run's provenance (git, packages, dataset input); (2) writing a cell's and its
folds' runs (tags from :mod:`grid.schema`, params, metrics, figures from :mod:`grid.figures`, predictions from
:mod:`grid.predictions`); (3) reading finished cells and folds back. Logged models are :mod:`grid.logged_models`,
the search's runs :mod:`grid.search_tracking`, old stores' ids :mod:`grid.migration`.

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
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from preprocess.runtime import package_versions

from . import schema
from .figures import confusion_figure, learning_curve_figure, peek_figure, plt
from .predictions import POOLED, POOLED_COLUMNS, _pooled_rows, pooled_predictions_csv, prob_columns
from .records import FoldRecord

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
                 source=json.dumps({schema.SHARDS_CONFIG_ID: cell.config_id, "data_key": cell.data_key, "flow": cell.flow,
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
            other data and is left out (:func:`grid.migration.folds_elsewhere` says so). None: every run of the id.
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
        metrics += [Metric(f"{schema.PAIRED}{name}.{m}_{k}", float(v), now, 0)
                    for k, v in (("diff", p.diff), ("ci_low", p.ci_low), ("ci_high", p.ci_high), ("seeds_agree", p.agree))]
    text = f"minus {against}, paired over seeds {list(next(iter(paired.values())).seeds)}; " + \
        "; ".join(f"{m.upper()} {p.text()}" for m, p in paired.items())
    for rid in run_ids:
        client.log_batch(rid, metrics=metrics)
        client.set_tag(rid, f"{schema.PAIRED}{name}", text[:5000])


def finished_cells(client, exp_id: str) -> list:
    """The experiment's finished parent runs (complete cells), newest first."""
    runs = search_runs(client, exp_id, f"tags.`{TAG_KIND}` = 'cell' and attributes.status = 'FINISHED'")
    return sorted(runs, key=lambda r: r.info.end_time or 0, reverse=True)



# --- searches (grid/search.py) ------------------------------------------------------------------

