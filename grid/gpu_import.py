"""A GPU machine's fold records (:mod:`grid.records`, written by ``benchmarks/gpu_ladder.py`` without Ray or
MLflow) logged into MLflow exactly as the grid would have logged them: ``grid/run_all.py import``. Orchestration:
it imports the tracking, report and runner modules that :mod:`grid.records`, a module of records only, must not.
"""

from __future__ import annotations

from pathlib import Path

from . import schema, tracking
from .progress import finish_cell
from .records import read_records
from .report import write_tables


def import_records(folder: Path, experiment: str, results_dir: Path, log=print) -> dict:
    """Log a records folder into MLflow experiment ``experiment`` exactly as the grid would have, and write
    the results tables.

    Returns:
        ``{"cells", "complete", "logged", "already", "results_dir"}`` counts and the tables' folder.

    Raises:
        as :func:`read_records`.
    """
    meta, cells, folds = read_records(folder)
    client, exp_id = tracking.setup(experiment)
    logged = already = complete = 0
    for c in cells:
        parent = tracking.parent_run(client, exp_id, c)
        for key, value in meta.items():
            client.set_tag(parent, f"{schema.RECORDS}{key}", str(value)[:5000])
        done = tracking.finished_folds(client, exp_id, c.cell_id, c.data_fingerprint)
        for s, rec in folds[c.cell_id].items():
            if s in done:
                already += 1
                continue
            tracking.log_fold(client, exp_id, parent, c, rec)
            done[s] = rec
            logged += 1
        if all(s in done for s in c.subjects):
            complete += 1
            if client.get_run(parent).info.status != "FINISHED":
                finish_cell(client, parent, c, done, log)
        else:
            log(f"  {c.name}: {sum(s in done for s in c.subjects)}/{len(c.subjects)} folds (incomplete)")
    out = write_tables(client, exp_id, experiment, results_dir)
    log(f"imported {logged} fold(s) ({already} already in MLflow) of {len(cells)} cell(s), {complete} complete, "
        f"into experiment '{experiment}'" + (f"; tables: {out}/" if out else ""))
    return {"cells": len(cells), "complete": complete, "logged": logged, "already": already, "results_dir": out}
