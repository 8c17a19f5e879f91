"""UF1 / UAR against scikit-learn, confusion matrices, per-dataset subsets."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, recall_score

from epir.metrics import confusion_matrix, score, uar, uf1


@pytest.mark.parametrize("seed", range(5))
def test_uf1_uar_equal_sklearn_macro_f1_and_recall(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, 60)
    p = np.where(rng.random(60) < 0.5, y, rng.integers(0, 5, 60))
    if seed == 4:
        p[p == 3] = 0  # a class never predicted
    assert uf1(y, p) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert uar(y, p) == pytest.approx(recall_score(y, p, average="macro", zero_division=0))


def test_class_set_and_hand_values():
    y, p = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: tp1 fp1 fn1 -> f1 .5, recall .5; class 1: tp2 fp1 fn0 -> .8, 1; class 2: 0, 0
    assert uf1(y, p) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert uar(y, p) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # a fixed class set that includes an absent class scores it as 0
    assert uar(y, p, labels=[0, 1, 2, 3]) == pytest.approx(1.5 / 4)
    with pytest.raises(ValueError):
        uf1([0, 1], [0])


def test_confusion_and_per_dataset_subsets():
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.array([0, 1, 1, 0, 2, 2])
    cm = confusion_matrix(y, p, 3)
    assert np.array_equal(cm, sk_confusion(y, p, labels=[0, 1, 2]))
    s = score(y, p, 3, groups=["samm", "samm", "samm", "smic", "smic", "smic"])
    assert set(s) == {"all", "samm", "smic"}
    assert s["samm"]["n"] == 3 and s["samm"]["accuracy"] == pytest.approx(2 / 3)
    assert s["all"]["uf1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert s["smic"]["uar"] == pytest.approx(recall_score(y[3:], p[3:], average="macro"))
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
