"""Trained models a user keeps and applies: the demo grid logs each fold's weights and the cell's final
model (an MLflow model, loaded without unpickling); `predict` runs the preprocessing stages on a new
onset/apex pair and gives what the model gives on the pipeline's own flows for it; the MLflow view has
the dataset, source and learning curves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from .conftest import run_grid_cli


def test_demo_final_model_fold_weights_and_predict(demo_seeded):
    tmp_path = demo_seeded
    res = run_grid_cli(["--presets", "epir", "--folds", "2", "--set", "epochs=3", "--final-model", "--log-fold-models"],
                       tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "1 final model(s) on all subjects" in out, out[-3000:]
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("epir-grid-demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("epir.kind") == "cell")
    final = next(r for r in runs if r.data.tags.get("epir.kind") == "final_model")
    folds = [r for r in runs if r.data.tags.get("epir.kind") == "fold"]
    model_uri = parent.data.tags["epir.model_uri"]
    assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id and model_uri.startswith("models:/")
    assert [m.model_id for m in parent.outputs.model_outputs] == [model_uri.split("/")[-1]]  # its Models column
    logged = client.get_logged_model(model_uri.split("/")[-1])  # the column lists the models a row is the source of
    assert logged.source_run_id == parent.info.run_id and logged.experiment_id == exp.experiment_id
    view = json.loads(exp.tags["mlflow.sharedViewState.cells"])  # the view the printed address opens
    assert view["orderByKey"] == "metrics.`uf1`" and {"metrics.`uf1`", "metrics.`uar`"} <= set(view["selectedColumns"])
    assert parent.data.tags["mlflow.source.name"] == "grid/run_all.py" and parent.inputs.dataset_inputs
    assert parent.inputs.dataset_inputs[0].dataset.name == "demo/SDE"
    assert "learning_curves.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # each fold's weights reproduce its logged test predictions, loaded tensors-only
    from epir.presets import build_model, config_from_dict
    from epir.train import predict, to_model_input
    from preprocess.pipeline import read_shards

    (shards,) = (tmp_path / "work_dirs" / "shards" / "demo").iterdir()
    df, flows, _ = read_shards(shards)
    fold = folds[0]
    state = torch.load(client.download_artifacts(fold.info.run_id, f"weights/{fold.data.tags['epir.cell_id']}-"
                                                 f"{fold.data.tags['epir.fold']}.pt"), weights_only=True)
    config = config_from_dict(json.loads(open(client.download_artifacts(fold.info.run_id, "weights/config.json")).read())["model"])
    model = build_model(config)
    model.load_state_dict(state)
    logged = pd.read_csv(client.download_artifacts(fold.info.run_id, "predictions.csv"))
    idx = [int(np.flatnonzero(df["sample_id"] == s)[0]) for s in logged["sample_id"]]
    probs = predict(model, to_model_input(flows[idx], config, "unit"))
    np.testing.assert_allclose(probs, logged[["p_negative", "p_positive", "p_surprise"]].to_numpy(), atol=1e-4)
    # predict: one new pair through the face and flow stages, then the final model
    mlflow.set_tracking_uri(uri)
    sample = df.iloc[0]
    pred = run_grid_cli(["predict", model_uri, "--onset", sample["onset_path"], "--apex", sample["apex_path"],
                         "--out", str(tmp_path / "p.csv")], tmp_path)
    assert pred.returncode == 0, (pred.stdout + pred.stderr)[-3000:]
    got = pd.read_csv(tmp_path / "p.csv")
    final_model = mlflow.pytorch.load_model(model_uri)
    meta = mlflow.models.get_model_info(model_uri).metadata
    assert meta["classes"] == ["negative", "positive", "surprise"] and meta["flow_range"] == "unit"
    with torch.no_grad():
        want = final_model(to_model_input(flows[:1], config, "unit")).softmax(-1).numpy()[0]
    np.testing.assert_allclose(got[["p_negative", "p_positive", "p_surprise"]].to_numpy()[0], want, atol=1e-4)
    assert got["predicted"][0] in meta["classes"] and got["status"][0] == "ok"
    # a pair whose frame is missing is reported, not guessed
    bad = run_grid_cli(["predict", model_uri, "--onset", str(tmp_path / "no.png"), "--apex", sample["apex_path"]], tmp_path)
    assert bad.returncode == 1 and "REJECTED (missing_frame: " in bad.stdout and "no.png)" in bad.stdout, bad.stdout[-2000:]
    with pytest.raises(ValueError, match="either"):
        from grid.predict import read_pairs

        read_pairs(None, None, None)
