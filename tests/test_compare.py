"""Paired comparisons: the pooled-score statistic, the shared subject resample, and the pairing rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, recall_score

from grid.compare import paired_difference, score_confusion, subject_confusions


def _row(rng, subjects, y, acc):
    pred = np.where(rng.random(len(y)) < acc, y, rng.integers(0, 3, len(y)))
    return pd.DataFrame({"subject": subjects, "y_true": y, "y_pred": pred})


def _data(n_subjects=30, per=6, seed=0):
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"s{i:02d}" for i in range(n_subjects)], per)
    y = rng.integers(0, 3, len(subjects))
    return rng, subjects, y


def test_the_statistic_is_the_pooled_uf1_and_uar_of_scikit_learn():
    rng, subjects, y = _data()
    for _ in range(5):
        p = _row(rng, subjects, y, 0.5)
        conf = subject_confusions(p, sorted(set(subjects)), 3).sum(0)
        assert score_confusion(conf, "uf1") == np.float64(f1_score(p.y_true, p.y_pred, average="macro", zero_division=0))
        assert np.isclose(score_confusion(conf, "uar"), recall_score(p.y_true, p.y_pred, average="macro", zero_division=0))
    # a class that is never true nor predicted is left out, as epir.metrics and scikit-learn do
    only_two = pd.DataFrame({"subject": ["a"] * 4, "y_true": [0, 0, 1, 1], "y_pred": [0, 1, 1, 1]})
    conf = subject_confusions(only_two, ["a"], 3).sum(0)
    assert np.isclose(score_confusion(conf, "uf1"), f1_score(only_two.y_true, only_two.y_pred, average="macro"))


def test_a_better_row_gets_an_interval_above_zero_and_equal_rows_one_around_zero():
    rng, subjects, y = _data()
    good = {s: _row(rng, subjects, y, 0.8) for s in (0, 1, 2)}
    bad = {s: _row(rng, subjects, y, 0.4) for s in (0, 1, 2)}
    d = paired_difference(good, bad, 3, "uf1", resamples=999)
    assert d.diff > 0.2 and d.ci_low > 0 and d.excludes_zero and d.agree == 3 and d.seeds == (0, 1, 2)
    same = paired_difference(good, good, 3, "uar", resamples=999)
    assert same.diff == 0 and same.ci_low == same.ci_high == 0 and not same.excludes_zero
    close = paired_difference(good, {s: _row(rng, subjects, y, 0.8) for s in (0, 1, 2)}, 3, "uf1", resamples=999)
    assert close.ci_low < 0 < close.ci_high


def test_the_resample_is_shared_so_what_both_rows_share_cancels():
    # both rows miss the same hard subjects; B also misses one sample elsewhere. A shared resample gives a
    # narrow interval; resampling the rows independently would not.
    rng, subjects, y = _data(n_subjects=40)
    hard = np.isin(subjects, [f"s{i:02d}" for i in range(0, 40, 3)])
    a_pred = np.where(hard, (y + 1) % 3, y)
    b_pred = a_pred.copy()
    b_pred[np.flatnonzero(~hard)[0]] = (y[np.flatnonzero(~hard)[0]] + 1) % 3
    a = {0: pd.DataFrame({"subject": subjects, "y_true": y, "y_pred": a_pred})}
    b = {0: pd.DataFrame({"subject": subjects, "y_true": y, "y_pred": b_pred})}
    d = paired_difference(a, b, 3, "uf1", resamples=999)
    assert 0 < d.diff < 0.02 and d.ci_high - d.ci_low < 0.03 and d.ci_low >= 0


def test_rows_without_common_seeds_or_subjects_are_not_paired():
    rng, subjects, y = _data()
    a = {0: _row(rng, subjects, y, 0.7)}
    assert paired_difference(a, {1: _row(rng, subjects, y, 0.7)}, 3) is None
    other = _row(rng, subjects, y, 0.7)
    assert paired_difference(a, {0: other[other.subject != "s00"]}, 3) is None
