"""A cell's model for new data as an MLflow model: logged with ``torch.export`` (loading runs no pickle), with the
metadata ``predict`` needs (classes, input convention, how the training flows were made) and pinned
requirements; and the look-up of a cell's logged model."""

from __future__ import annotations

import time

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.models import infer_signature

from epir.presets import build_model, config_from_dict
from epir.train import SoftmaxEnsemble

from . import schema
from .tracking import TAG_CELL, TAG_KIND, search_runs, source_tags


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


