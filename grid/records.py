"""Fold records made outside Ray and MLflow (e.g. on a GPU machine that has neither): the records only;
:mod:`grid.gpu_import` logs them into MLflow as if the grid had run them.

A records folder holds two files, few enough to travel back from a lent machine:

- ``cells.json``: ``{"meta": {...}, "cells": [grid.cells.Cell as a dict, ...]}``, the cells exactly as
  :func:`grid.cells.build_cells` makes them (same cell ids as a grid run of the same settings);
- ``folds.jsonl``: one line per finished fold, ``{"cell_id": ..., **FoldRecord.to_dict()}``,
  appended as each fold ends (an interrupted run keeps what it finished and resumes from it).

:func:`grid.gpu_import.import_records` logs them with the grid's own functions: the parent run of each cell, one child
run per fold, the pooled scores when a cell is complete, and the results tables. A later grid run of
the same settings finds those folds FINISHED and trains nothing again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .cells import Cell

CELLS, FOLDS = "cells.json", "folds.jsonl"


@dataclass
class PeekRecord:
    """A fold's best-test-epoch result: the epoch its TEST subject scored best on. It PEEKS at the test subject.

    Attributes:
        epoch: the chosen epoch (1-based); y_pred: (n,) its predictions; probs: (n, C) its probabilities;
        test_acc: (epochs,) the test subject's accuracy after every epoch.
    """

    epoch: int
    y_pred: list[int]
    probs: list[list[float]]
    test_acc: list[float]
    peeks_at_test: bool = True


@dataclass
class FoldRecord:
    """One finished fold as it travels from a trial (or a GPU machine) to MLflow and back (``fold.json``).

    Attributes:
        subject: the test subject; sample_ids, groups: (n,) its samples and their source datasets.
        y_true, y_pred: (n,) class indices, the honest predictions of the last epoch; probs: (n, C).
        curve: one dict per epoch (``epoch``, ``loss``, ``train_acc``, ``lr``).
        selected_epoch: the epoch that predicted (the last); epoch_selection: ``last``.
        best_test_epoch: the peeking result beside it (:class:`PeekRecord`), None for folds logged before it.
        member_y_pred: (S, n) each ensemble member's predictions, None without an ensemble.
        train_seconds, started, finished: timing (s; Unix times); device, node: where it ran.
        weights_path: the saved weights, when asked for (never written into ``fold.json``).
    """

    subject: str
    sample_ids: list[str]
    groups: list[str]
    y_true: list[int]
    y_pred: list[int]
    probs: list[list[float]]
    curve: list[dict]
    selected_epoch: int
    best_test_epoch: PeekRecord | None = None
    member_y_pred: list[list[int]] | None = None
    train_seconds: float = 0.0
    device: str = ""
    node: str = ""
    started: float = 0.0
    finished: float = 0.0
    epoch_selection: str = "last"
    weights_path: str | None = None

    @classmethod
    def from_result(cls, r, d, started: float, node: str = "") -> "FoldRecord":
        """The record of a :class:`epir.train.FoldResult` ``r`` of dataset ``d`` (:class:`grid.data.ProtocolData`)."""
        b = r.best_test_epoch
        members = r.member_probs.argmax(-1).tolist() if r.member_probs is not None and len(r.member_probs) > 1 else None
        return cls(r.test_subject, d.sample_ids[r.test_index].tolist(), d.groups[r.test_index].tolist(),
                   r.y_true.tolist(), r.y_pred.tolist(), r.probs.round(5).tolist(), r.curve, r.selected_epoch,
                   PeekRecord(b.epoch, b.y_pred.tolist(), b.probs.round(5).tolist(), [round(a, 5) for a in b.test_acc]),
                   members, r.train_seconds, r.device, node, started, time.time())

    def to_dict(self) -> dict:
        """The JSON form (``weights_path`` left out)."""
        out = dataclasses.asdict(self)
        out.pop("weights_path")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FoldRecord":
        """Read the JSON form, also that of folds logged before some fields existed.

        Raises:
            TypeError: for an unknown key.
        """
        d = dict(d)
        peek = d.pop("best_test_epoch", None)
        return cls(**d, best_test_epoch=PeekRecord(**peek) if peek else None)

    @property
    def accuracy(self) -> float:
        """Test accuracy of the honest predictions."""
        return sum(a == b for a, b in zip(self.y_true, self.y_pred)) / len(self.y_true)


def write_cells(folder: Path, cells: list, meta: dict) -> None:
    """Write ``cells.json`` (the cells and a description of the run: device, command, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CELLS).write_text(json.dumps({"meta": meta, "cells": [dataclasses.asdict(c) for c in cells]}, indent=1))


def append_fold(folder: Path, cell_id: str, record: FoldRecord) -> None:
    """Append one finished fold to ``folds.jsonl`` (one line, flushed)."""
    with (folder / FOLDS).open("a") as f:
        f.write(json.dumps({"cell_id": cell_id, **record.to_dict()}) + "\n")


def read_records(folder: Path) -> tuple[dict, list, dict[str, dict[str, FoldRecord]]]:
    """Read a records folder.

    Returns:
        (meta, cells as :class:`grid.cells.Cell`, cell_id -> subject -> fold record); a fold recorded
        twice keeps its last line.

    Raises:
        FileNotFoundError: no ``cells.json``. ValueError: a fold of a cell ``cells.json`` does not name.
    """
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
        folds[cid][rec["subject"]] = FoldRecord.from_dict(rec)
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
