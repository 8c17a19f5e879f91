"""Fold records made outside Ray and MLflow (e.g. on a GPU machine that has neither), and their import
into MLflow as if the grid had run them.

A records folder holds two files, few enough to travel back from a lent machine:

- ``cells.json``: ``{"meta": {...}, "cells": [grid.runner.Cell as a dict, ...]}``, the cells exactly as
  :func:`grid.runner.build_cells` makes them (same cell ids as a grid run of the same settings);
- ``folds.jsonl``: one line per finished fold, ``{"cell_id": ..., **grid.trainable.fold_record(...)}``,
  appended as each fold ends (an interrupted run keeps what it finished and resumes from it).

:func:`import_records` logs them with the grid's own functions: the parent run of each cell, one child
run per fold, the pooled scores when a cell is complete, and the results tables. A later grid run of
the same settings finds those folds FINISHED and trains nothing again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

CELLS, FOLDS = "cells.json", "folds.jsonl"


def write_cells(folder: Path, cells: list, meta: dict) -> None:
    """Write ``cells.json`` (the cells and a description of the run: device, command, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CELLS).write_text(json.dumps({"meta": meta, "cells": [dataclasses.asdict(c) for c in cells]}, indent=1))


def append_fold(folder: Path, cell_id: str, record: dict) -> None:
    """Append one finished fold to ``folds.jsonl`` (one line, flushed)."""
    with (folder / FOLDS).open("a") as f:
        f.write(json.dumps({"cell_id": cell_id, **record}) + "\n")


def read_records(folder: Path) -> tuple[dict, list, dict[str, dict[str, dict]]]:
    """Read a records folder.

    Returns:
        (meta, cells as :class:`grid.runner.Cell`, cell_id -> subject -> fold record); a fold recorded
        twice keeps its last line.

    Raises:
        FileNotFoundError: no ``cells.json``. ValueError: a fold of a cell ``cells.json`` does not name.
    """
    from .cells import Cell

    folder = Path(folder)
    if not (folder / CELLS).is_file():
        raise FileNotFoundError(f"{folder} holds no {CELLS}: not a records folder (benchmarks/gpu_ladder.py --out)")
    raw = json.loads((folder / CELLS).read_text())
    cells = [Cell(**c) for c in raw["cells"]]
    by_id = {c.cell_id: c for c in cells}
    folds: dict[str, dict[str, dict]] = {c.cell_id: {} for c in cells}
    path = folder / FOLDS
    for n, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        cid = rec.pop("cell_id")
        if cid not in by_id:
            raise ValueError(f"{path}:{n}: fold of cell {cid}, which {CELLS} does not name")
        folds[cid][rec["subject"]] = rec
    return raw.get("meta", {}), cells, folds


def done_keys(folder: Path) -> set[tuple[str, str]]:
    """(cell_id, subject) of every fold already in ``folds.jsonl``."""
    path = Path(folder) / FOLDS
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.add((rec["cell_id"], rec["subject"]))
    return out


def import_records(folder: Path, experiment: str, results_dir: Path, log=print) -> dict:
    """Log a records folder into MLflow experiment ``experiment`` exactly as the grid would have, and write
    the results tables.

    Returns:
        ``{"cells", "complete", "logged", "already", "results_dir"}`` counts and the tables' folder.

    Raises:
        as :func:`read_records`.
    """
    from . import tracking
    from .report import write_tables
    from .runner import finish_cell

    meta, cells, folds = read_records(folder)
    client, exp_id = tracking.setup(experiment)
    logged = already = complete = 0
    for c in cells:
        parent = tracking.parent_run(client, exp_id, c)
        for key, value in meta.items():
            client.set_tag(parent, f"epir.records.{key}", str(value)[:5000])
        done = tracking.finished_folds(client, exp_id, c.cell_id)
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
