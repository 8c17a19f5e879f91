"""Paired comparisons of two table rows: the difference in pooled UF1 (or UAR) with a 95 % confidence
interval from a paired bootstrap over SUBJECTS, and how many seed pairs agree in sign.

Two rows are paired when they score the same samples (dataset, protocol and the same test subjects) with
the same seeds: seed k of row A is paired with seed k of row B. The statistic is the difference of pooled
UF1, A minus B, averaged over the paired seeds. A bootstrap resample draws the subjects with replacement
and applies the SAME draw to both rows' predictions (a subject drawn twice counts twice in every pooled
score), so what the two rows share (which subjects are hard) cancels. ``scipy.stats.bootstrap``
(percentile interval, 9,999 resamples, fixed seed) resamples subject indices; the statistic is computed
from per-subject confusion matrices, so one resample costs a weighted sum. Pure: pandas, NumPy, SciPy;
the MLflow side (reading predictions, logging the results) is in :mod:`grid.tracking` and
:mod:`grid.report`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("uf1", "uar")
RESAMPLES = 9999
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Paired:
    """The paired difference ``A - B`` of one metric.

    Attributes:
        metric: ``uf1`` or ``uar``.
        diff: the mean over paired seeds of A's pooled score minus B's (on all subjects).
        ci_low, ci_high: the 95 % percentile bootstrap interval of ``diff`` over subjects.
        seeds: the paired seeds; agree: how many of them have a difference of the same sign as ``diff``.
        subjects: how many subjects were resampled.
    """

    metric: str
    diff: float
    ci_low: float
    ci_high: float
    seeds: tuple[int, ...]
    agree: int
    subjects: int

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or below 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def text(self) -> str:
        """``+0.0123 [-0.0301, +0.0540], 2/3 seeds agree``."""
        return f"{self.diff:+.4f} [{self.ci_low:+.4f}, {self.ci_high:+.4f}], {self.agree}/{len(self.seeds)} seeds agree"


def subject_confusions(pred: pd.DataFrame, subjects: list[str], num_classes: int) -> np.ndarray:
    """Per-subject confusion counts (S, C, C), rows true class, columns predicted.

    Args:
        pred: predictions with columns ``subject``, ``y_true``, ``y_pred`` (class indices).
        subjects: the S subjects, in the order of the output.

    Raises:
        ValueError: a subject without predictions.
    """
    out = np.zeros((len(subjects), num_classes, num_classes))
    pos = {s: i for i, s in enumerate(subjects)}
    missing = set(subjects) - set(pred["subject"].astype(str))
    if missing:
        raise ValueError(f"no predictions for subject(s) {sorted(missing)[:5]}")
    si = pred["subject"].astype(str).map(pos).to_numpy()
    np.add.at(out, (si, pred["y_true"].to_numpy(int), pred["y_pred"].to_numpy(int)), 1)
    return out


def score_confusion(conf: np.ndarray, metric: str) -> np.ndarray:
    """UF1 or UAR of pooled confusion matrices (..., C, C), exactly as :func:`epir.metrics.uf1` / ``uar``
    compute them from labels: the mean, over the classes present in the truth or the predictions, of
    2TP / (2TP + FP + FN), resp. TP / N_c (0 for a class never true)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    true, predicted = conf.sum(-1), conf.sum(-2)
    present = (true + predicted) > 0
    if metric == "uf1":
        per = 2 * tp / np.where(present, true + predicted, 1)
    else:
        per = np.where(true > 0, tp / np.where(true > 0, true, 1), 0.0)
    return np.where(present, per, 0.0).sum(-1) / present.sum(-1)


def paired_difference(a: dict[int, pd.DataFrame], b: dict[int, pd.DataFrame], num_classes: int, metric: str = "uf1",
                      resamples: int = RESAMPLES, seed: int = 0) -> Paired | None:
    """The paired difference of one metric between rows A and B (see the module docstring).

    Args:
        a, b: seed -> that seed's pooled predictions (columns ``subject``, ``y_true``, ``y_pred``).
        num_classes: C. metric: ``uf1`` or ``uar``. resamples, seed: of the bootstrap.

    Returns:
        :class:`Paired`, or None when the rows share no seed or do not score the same samples.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds or metric not in METRICS:
        return None
    subjects = sorted(set(a[seeds[0]]["subject"].astype(str)))
    for s in seeds:
        for side in (a[s], b[s]):
            if sorted(set(side["subject"].astype(str))) != subjects:
                return None
        if not np.array_equal(np.sort(a[s]["y_true"].to_numpy()), np.sort(b[s]["y_true"].to_numpy())):
            return None
    ca = np.stack([subject_confusions(a[s], subjects, num_classes) for s in seeds])  # (K, S, C, C)
    cb = np.stack([subject_confusions(b[s], subjects, num_classes) for s in seeds])
    n = len(subjects)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        w = (np.asarray(idx)[..., :, None] == np.arange(n)).sum(-2).astype(float)  # (..., S) times drawn
        pa = np.einsum("...s,ksij->...kij", w, ca)
        pb = np.einsum("...s,ksij->...kij", w, cb)
        return (score_confusion(pa, metric) - score_confusion(pb, metric)).mean(-1)

    full = score_confusion(ca.sum(1), metric) - score_confusion(cb.sum(1), metric)  # (K,) per seed pair
    diff = float(full.mean())
    res = stats.bootstrap((np.arange(n),), statistic, vectorized=True, n_resamples=resamples, batch=500,
                          confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    agree = int((np.sign(full) == np.sign(diff)).sum()) if diff != 0 else 0
    return Paired(metric, diff, float(res.confidence_interval.low), float(res.confidence_interval.high),
                  tuple(seeds), agree, n)
