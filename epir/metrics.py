"""UF1 and UAR, the MEGC metrics (EPIR Sec. 4), on predictions pooled across LOSO folds.

UF1 = mean over classes of 2TP / (2TP + FP + FN); UAR = mean over classes of TP / N_c. Both are
computed once on the predictions of all folds pooled (the MEGC2019 convention), not averaged over
folds. By default the classes are those present in the ground truth or the predictions, which is
scikit-learn's ``f1_score(average='macro')`` / ``recall_score(average='macro')`` with
``zero_division=0``; pass ``labels`` to fix the class set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _labels(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int] | None) -> np.ndarray:
    if labels is not None:
        return np.asarray(labels)
    return np.union1d(y_true, y_pred)


def _check(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} labels but {y_pred.size} predictions")
    if y_true.size == 0:
        raise ValueError("no predictions to score")
    return y_true, y_pred


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Confusion counts.

    Args:
        y_true, y_pred: (N,) integer labels in 0..num_classes-1.
        num_classes: C.

    Returns:
        (C, C) int64 matrix, rows = true class, columns = predicted class.

    Raises:
        ValueError: for mismatched lengths, no samples or a label outside 0..C-1.
    """
    y_true, y_pred = _check(y_true, y_pred)
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return cm


def uf1(y_true, y_pred, labels: Sequence[int] | None = None) -> float:
    """Unweighted F1 (macro F1): mean over classes of 2TP / (2TP + FP + FN); 0 for an empty class.

    Args:
        y_true, y_pred: (N,) integer labels, pooled over folds.
        labels: classes to average over; default: those in y_true or y_pred.

    Raises:
        ValueError: for mismatched lengths or no samples.
    """
    y_true, y_pred = _check(y_true, y_pred)
    scores = []
    for c in _labels(y_true, y_pred, labels):
        tp = np.sum((y_true == c) & (y_pred == c))
        fp = np.sum((y_true != c) & (y_pred == c))
        fn = np.sum((y_true == c) & (y_pred != c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def uar(y_true, y_pred, labels: Sequence[int] | None = None) -> float:
    """Unweighted average recall (macro recall): mean over classes of TP / N_c; 0 where N_c = 0.

    Args:
        y_true, y_pred: (N,) integer labels, pooled over folds.
        labels: classes to average over; default: those in y_true or y_pred.

    Raises:
        ValueError: for mismatched lengths or no samples.
    """
    y_true, y_pred = _check(y_true, y_pred)
    scores = []
    for c in _labels(y_true, y_pred, labels):
        n_c = np.sum(y_true == c)
        scores.append(np.sum((y_true == c) & (y_pred == c)) / n_c if n_c else 0.0)
    return float(np.mean(scores))


def score(y_true, y_pred, num_classes: int, groups=None) -> dict[str, dict]:
    """UF1, UAR, accuracy and confusion matrix, overall and per group (e.g. per source dataset of a
    composite run: EPIR Table 1 scores SAMM, CASME II and SMIC as subsets of the composite run).

    Args:
        y_true, y_pred: (N,) pooled integer labels.
        num_classes: C, for the confusion matrix.
        groups: optional (N,) group names; each group is scored on its own subset.

    Returns:
        ``{"all": {...}, group: {...}}``, each with ``uf1``, ``uar``, ``accuracy``, ``n`` and
        ``confusion`` (C x C nested list).
    """
    y_true, y_pred = _check(y_true, y_pred)

    def one(t, p):
        return {
            "uf1": uf1(t, p),
            "uar": uar(t, p),
            "accuracy": float(np.mean(t == p)),
            "n": int(t.size),
            "confusion": confusion_matrix(t, p, num_classes).tolist(),
        }

    out = {"all": one(y_true, y_pred)}
    if groups is not None:
        groups = np.asarray(groups).ravel()
        if groups.shape != y_true.shape:
            raise ValueError(f"{groups.size} group names for {y_true.size} predictions")
        for g in sorted(set(groups.tolist())):
            m = groups == g
            out[str(g)] = one(y_true[m], y_pred[m])
    return out
