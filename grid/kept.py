"""A table row's predictions, in and out: read (once) from the cells' MLflow runs or from the files a row beside
was kept with (``results/<experiment>/predictions/<cell_id>.csv``: no true labels, samples named by a hash), and
written there for every own cell, so that a later report pairs with a cell after its store is gone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from . import tracking
from .pairing import KEY
from .predictions import prob_columns

# results/<experiment>/predictions/<cell_id>.csv: each cell's pooled predictions WITHOUT the true labels (those
# belong to the dataset's licence holders), so that a later report pairs with the cell after its store is gone.
# Samples are named by a hash of their id: some datasets' sample names spell the label (SMIC's s03_ne_01).
KEPT = "predictions"
KEPT_COLUMNS = ["subject", "sample_hash", "group", "y_pred", "y_pred_best_test_epoch"]


def sample_hash(sample_id: str) -> str:
    """The name a kept prediction file gives a sample: the first 16 hex digits of SHA-256 of its id."""
    return hashlib.sha256(str(sample_id).encode()).hexdigest()[:16]


def labels_of(data) -> tuple[pd.Series, list[str]]:
    """The true labels of a dataset under one protocol (a :class:`grid.data.ProtocolData`), keyed as kept files key
    their samples: (source dataset, subject, :func:`sample_hash`) -> class index; and the class names in label
    order. What rows beside are paired with when this experiment has no own cell of their dataset and protocol
    (``report --dataset/--config``: the store that held them is gone)."""
    keys = pd.MultiIndex.from_arrays([data.groups.astype(str), data.subjects.astype(str),
                                      [sample_hash(s) for s in data.sample_ids]])
    return pd.Series(data.labels.astype(int), index=keys), list(data.classes)


class Predictions:
    """Reads (once) the pooled predictions of every seed of a table row, by setting id: an own row's from its
    MLflow parent runs, a row beside (:func:`read_beside`) from its kept files (:data:`KEPT`), whose true labels
    are this experiment's own for the same samples, or else the dataset's (``labels``: (dataset, protocol) ->
    :func:`labels_of`); a row beside with neither, or with a sample or class they lack, cannot be paired."""

    def __init__(self, client, exp_id: str, cells: pd.DataFrame, beside: pd.DataFrame | None = None,
                 labels: dict[tuple[str, str], tuple[pd.Series, list[str]]] | None = None):
        self.client, self.exp_id, self.cells, self._cache = client, exp_id, cells, {}
        self.beside = beside if beside is not None else pd.DataFrame(columns=["setting"])
        self.labels = labels or {}

    def of(self, setting: str) -> tuple[dict[int, pd.DataFrame], list[str]]:
        """seed -> predictions of the row's cells (class indices), and the class names; ``({}, [])`` for a
        row that cannot be read (then :func:`grid.compare.paired_difference` pairs nothing)."""
        if setting not in self._cache:
            self._cache[setting] = self._beside(setting) if setting.startswith("beside:") else self._own(setting)
        return self._cache[setting]

    def _own(self, setting: str) -> tuple[dict[int, pd.DataFrame], list[str]]:
        preds, classes = {}, []
        for _, c in self.cells[self.cells["setting"] == setting].iterrows():
            run = self.client.get_run(c["run_id"])
            preds[int(c["seed"])] = tracking.read_pooled_predictions(self.client, self.exp_id, run)
            classes = run.data.params.get("classes", "").split(",")
        return preds, classes

    def _truth(self, dataset: str, protocol: str) -> tuple[pd.Series, list[str]] | None:
        """(source dataset, subject, sample hash (:func:`sample_hash`)) -> true class index, from an own cell of
        the same dataset and protocol, else from the dataset's labels given. A sample name alone is not unique: CASME II's EP02_01 is a sample of
        several subjects."""
        own = self.cells[(self.cells["dataset"] == dataset) & (self.cells["protocol"] == protocol)]
        if own.empty:
            return self.labels.get((dataset, protocol))
        preds, classes = self.of(own["setting"].iloc[0])
        first = next(iter(preds.values()))
        keys = pd.MultiIndex.from_arrays([first["group"], first["subject"], first["sample_id"].map(sample_hash)])
        return pd.Series(first["y_true"].to_numpy(), index=keys), classes

    def _beside(self, setting: str) -> tuple[dict[int, pd.DataFrame], list[str]]:
        rows = self.beside[self.beside["setting"] == setting]
        if rows.empty or not rows["pairable"].all():
            return {}, []
        truth = self._truth(rows["dataset"].iloc[0], rows["protocol"].iloc[0])
        if truth is None:
            return {}, []
        y_true, classes = truth
        index = {c: i for i, c in enumerate(classes)}
        preds = {}
        for _, r in rows.iterrows():
            df = pd.read_csv(r["predictions"], dtype=str, keep_default_na=False)
            keys = pd.MultiIndex.from_frame(df[["group", "subject", "sample_hash"]])
            if not keys.isin(y_true.index).all() or not set(df["y_pred"]) <= set(index):
                return {}, []
            df["y_true"] = y_true.loc[keys].to_numpy().astype(int)
            for col in ("y_pred", "y_pred_best_test_epoch"):
                df[col] = df[col].map(lambda v: index.get(v, -1)).astype(int)
            for col in [c for c in prob_columns(classes) if c in df]:
                df[col] = pd.to_numeric(df[col], errors="coerce")
            preds[int(r["seed"])] = df
        return preds, classes


def keep_predictions(preds: Predictions, cells: pd.DataFrame, out: Path) -> None:
    """Write every own cell's pooled predictions to ``out/predictions/<cell_id>.csv`` (:data:`KEPT_COLUMNS`:
    subject, :func:`sample_hash`, source dataset, predicted class names; then the honest probabilities
    ``prob_<class>`` where the cell kept them; no true labels and no sample names), the files
    :func:`read_beside` pairs with later."""
    folder = Path(out) / KEPT
    folder.mkdir(parents=True, exist_ok=True)
    for _, c in cells.iterrows():
        seeds, classes = preds.of(c["setting"])
        df = seeds[int(c["seed"])].copy()
        df["sample_hash"] = df["sample_id"].map(sample_hash)
        for col in ("y_pred", "y_pred_best_test_epoch"):
            df[col] = df[col].map(lambda i: classes[i] if 0 <= i < len(classes) else "")
        probs = [p for p in prob_columns(classes) if p in df and df[p].notna().all()]
        df[KEPT_COLUMNS + probs].to_csv(folder / f"{c['cell_id']}.csv", index=False, float_format="%.5f")


def read_beside(path: Path, presets: list[str] | None = None) -> pd.DataFrame:
    """Rows of another experiment's ``runs.csv`` (one line per cell and seed, as :func:`write_tables` writes it) to
    show beside this experiment's rows: scored as they were, labelled with their folder. A row whose every
    seed's predictions were kept beside the file (``predictions/<cell_id>.csv``, :func:`keep_predictions`) is
    ``pairable``: it is paired like an own row, with this experiment's true labels for the same samples
    (:class:`Predictions`); any other row is labelled ``not paired``.

    Args:
        path: a ``results/<experiment>/runs.csv`` file.
        presets: keep only these presets (default: every row).

    Raises:
        ValueError: the file is missing or lacks a column the tables need, or a preset asked for has no row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--beside: no runs.csv at {path}")
    rows = pd.read_csv(path)
    if "flow" not in rows:  # written before TV-L1: every computed flow was Farneback's
        rows["flow"] = "farneback"
    missing = [c for c in KEY + ["seed", "setting", "run_id", "uf1", "uar"] if c not in rows]
    if missing:
        raise ValueError(f"--beside: {path} lacks the column(s) {', '.join(missing)}; is it a runs.csv of results/?")
    if presets:
        absent = [p for p in presets if p not in set(rows["preset"])]
        if absent:
            raise ValueError(f"--beside: {path} has no row of preset(s) {', '.join(absent)} "
                             f"(it has {', '.join(sorted(set(rows['preset'])))})")
        rows = rows[rows["preset"].isin(presets)]
    kept = [path.parent / KEPT / f"{c}.csv" for c in rows.get("cell_id", pd.Series("", index=rows.index)).astype(str)]
    rows = rows.assign(predictions=[str(k) if k.is_file() else "" for k in kept])
    rows["pairable"] = rows.groupby("setting")["predictions"].transform(lambda v: bool(v.astype(bool).all()))
    return rows.assign(setting="beside:" + rows["setting"].astype(str), beside=path.parent.name,
                       end_time=pd.Timestamp(0))


