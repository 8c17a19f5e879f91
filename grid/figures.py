"""The figures a cell's parent run carries (matplotlib, written as files): the confusion matrix of each source
dataset, the folds' training curves, and the test subject's accuracy over epochs (what the PEEKS columns read)."""

from __future__ import annotations

import matplotlib
import numpy as np

from .records import FoldRecord

matplotlib.use("Agg")  # figures are files; before pyplot is imported
import matplotlib.pyplot as plt


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str):
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted), counts and row %."""
    cm = np.asarray(confusion, dtype=float)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(classes), 1.2 + 1.0 * len(classes)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def learning_curve_figure(folds: list[FoldRecord], title: str):
    """A matplotlib figure of a cell's TRAINING curves: mean and min..max band over its folds of the training
    loss, the training accuracy and the learning rate per epoch. No test-subject curve: a figure to choose an
    epoch count from must not show the test subjects (:func:`peek_figure` holds theirs, labelled)."""
    epochs = min(len(f.curve) for f in folds)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    x = np.arange(1, epochs + 1)
    for ax, key, name in ((axes[0], "loss", "training loss"), (axes[1], "train_acc", "training accuracy"),
                          (axes[2], "lr", "learning rate")):
        v = np.asarray([[rec.get(key, np.nan) for rec in f.curve[:epochs]] for f in folds], dtype=float)
        ax.plot(x, v.mean(0), label=f"{name}, mean of {len(folds)} folds")
        ax.fill_between(x, v.min(0), v.max(0), alpha=0.25, label="min .. max over folds")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def peek_figure(folds: list[FoldRecord], title: str):
    """The test subjects' accuracy after every epoch, pooled over the folds (each fold weighted by its test
    samples): what the best-test-epoch result is chosen from. It PEEKS; its title says so. None when a fold
    has no per-epoch test scores."""
    if not all(f.best_test_epoch for f in folds):
        return None
    epochs = min(len(f.best_test_epoch.test_acc) for f in folds)
    acc = np.asarray([f.best_test_epoch.test_acc[:epochs] for f in folds])
    w = np.asarray([len(f.y_true) for f in folds], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(np.arange(1, epochs + 1), (acc * w[:, None]).sum(0) / w.sum(), "--", color="tab:red",
            label="test subjects' accuracy, pooled")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    ax.set_title(f"PEEKS at the test subjects (oracle gap only): {title}", fontsize=8)
    fig.tight_layout()
    return fig


