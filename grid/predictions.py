"""A cell's pooled predictions as a table (no MLflow here): every fold's samples with their true and predicted
classes, the best-test-epoch prediction (PEEKS) and the honest class probabilities; what paired comparisons
resample (:mod:`grid.compare`) and the ensemble averages (:mod:`grid.leaderboard`)."""

from __future__ import annotations

import pandas as pd

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


