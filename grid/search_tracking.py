"""MLflow for the search (:mod:`grid.search`): the study's parent run, one child run per Optuna trial with its
per-pair validation predictions, the result (choices and best-on-all files, Optuna's figures), the honest test
cells and the search's final model."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature

from . import schema
from .figures import plt
from .logged_models import _load_final, model_metadata, model_requirements
from .tracking import TAG_KIND, git_commit, search_runs


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
