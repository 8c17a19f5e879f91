"""The MLflow schema round trip: a cell and its folds written through the real writers into a temporary store read
back, every tag through grid.schema.decode_cell and every table field through grid.report.collect."""

from __future__ import annotations

import numpy as np

from grid import schema, tracking
from grid.cells import build_cells
from grid.config import GridConfig
from grid.progress import finish_cell
from grid.report import collect

from .test_report_paired import _data, _fold


def test_a_cell_written_by_the_grid_reads_back_field_by_field(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    d = _data(n_subjects=3, per=3)
    cell, = build_cells(GridConfig(presets=["epir"], seeds=[7], profile="demo", folds=2), {d.key: d}, "demo")
    client, exp_id = tracking.setup("schema")
    parent = tracking.parent_run(client, exp_id, cell)
    rng = np.random.default_rng(0)
    folds = {s: _fold(d, s, 0.7, rng) for s in cell.subjects}
    for f in folds.values():
        tracking.log_fold(client, exp_id, parent, cell, f)
    finish_cell(client, parent, cell, folds, log=lambda m: None)

    run = client.get_run(parent)
    tags = schema.decode_cell(run.data.tags)
    assert tags == dict(dataset="toy", protocol="CDE", preset="epir", flow=cell.flow, profile="demo",
                        epoch_selection="last", peeks_at_test=False, demo=False, folds=2, subjects_total=3, partial=True,
                        seed=7, setting=cell.setting_id, cell_id=cell.cell_id, commit=tags["commit"],
                        data_fingerprint=d.fingerprint, search=None, provenance="")
    assert run.data.tags[schema.KIND] == "cell" and run.data.tags[schema.CELL_V2] == cell.cell_id_v2
    fold_runs = tracking.search_runs(client, exp_id, f"tags.`{schema.KIND}` = 'fold'")
    assert sorted(r.data.tags[schema.FOLD] for r in fold_runs) == sorted(cell.subjects)
    assert all(schema.decode_cell(r.data.tags)["cell_id"] == cell.cell_id for r in fold_runs)
    row = collect(client, exp_id).iloc[0]
    for field in ("dataset", "protocol", "preset", "flow", "profile", "epoch_selection", "peeks_at_test", "demo",
                  "folds", "partial", "seed", "setting", "cell_id", "data_fingerprint"):
        assert row[field] == tags[field], field
    assert row["uf1"] == run.data.metrics["uf1"] and row["bte_uf1"] == run.data.metrics[f"{schema.PEEK}uf1"]
    values = schema.decode_cell_run(run.data.params, run.data.metrics)  # params and metrics, as written
    assert (values["family"], values["dim"], values["epochs"], values["lr"]) == (
        "epir", str(cell.model["dim"]), str(cell.recipe["epochs"]), str(cell.recipe["lr"]))
    assert values["recipe_seed"] == 7 and values["ensemble"] == 1 and values["params_M"] > 0 and values["macs_M"] > 0
    assert values["train_minutes"] > 0 and values["wall_minutes"] >= 0
    assert run.data.params[schema.CLASSES] == ",".join(d.classes) and run.data.params[schema.SUBJECTS_TOTAL] == "3"
    for field in ("dim", "depth", "epochs", "lr", "batch_size", "hflip", "schedule", "standardize", "params_M", "macs_M"):
        assert row[field] == values[field], field
