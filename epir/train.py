"""Training and evaluation of one leave-one-subject-out (LOSO) fold from arrays.

The default recipe is the paper's (EPIR Sec. 4.2): Adam, learning rate 5e-5, batch size 256, 300
epochs, loss CE + L_con. Epoch selection:

- ``last`` (default, honest): the model after the last epoch predicts the test subject; the test
  subject is never looked at before that.
- ``best_test_epoch``: the test subject is scored after every epoch and the epoch with the best test
  accuracy is kept (the last of equal ones), as HTNet's public ``main_HTNet.py`` does. It peeks at the
  test subject and inflates scores (Varanka et al., IEEE TAC 2023); results carry
  ``peeks_at_test=True`` and must be labelled so wherever they appear.

Nothing here knows of Ray or MLflow: progress goes to an optional per-epoch callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .losses import epir_loss
from .model import EPIR, EPIRConfig

EPOCH_SELECTIONS = ("last", "best_test_epoch")
SCHEDULES = ("constant", "cosine")
FLOW_RANGES = ("unit", "signed")


@dataclass(frozen=True)
class TrainRecipe:
    """Optimisation settings; defaults are the paper's recipe.

    Attributes:
        epochs: passes over the fold's training samples.
        batch_size: samples per step (the last batch of an epoch may be smaller).
        lr: Adam learning rate.
        weight_decay: Adam weight decay (the paper uses none).
        seed: seeds initialisation and shuffling.
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:i]``.
        epoch_selection: ``last`` or ``best_test_epoch`` (see module docstring).
        hflip: mirror a random half of each training batch left-right (faces are roughly symmetric;
            the paper does not augment). Mirroring reverses the horizontal flow, so u is mapped by
            ``flow_range``.
        flow_range: how u is stored: ``unit`` (min-max scaled to 0..1 per sample, as the MEGC2019
            flow images and ``preprocess --normalize minmax``: mirrored u = 1 - u) or ``signed``
            (pixels: mirrored u = -u).
        schedule: learning rate over the run: ``constant`` (the paper) or ``cosine`` (decays from
            ``lr`` to 0 over all steps, ``torch.optim.lr_scheduler.CosineAnnealingLR`` stepped per batch).
        standardize: standardise each input channel with the mean and std of the fold's training flows
            (:meth:`epir.model.EPIR.set_input_stats`; the paper does not). Mirroring happens before it.
    """

    epochs: int = 300
    batch_size: int = 256
    lr: float = 5e-5
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    epoch_selection: str = "last"
    hflip: bool = False
    flow_range: str = "unit"
    standardize: bool = False
    schedule: str = "constant"

    def __post_init__(self):
        if self.flow_range not in FLOW_RANGES:
            raise ValueError(f"flow_range must be one of {FLOW_RANGES}, got {self.flow_range!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epoch_selection not in EPOCH_SELECTIONS:
            raise ValueError(f"epoch_selection must be one of {EPOCH_SELECTIONS}, got {self.epoch_selection!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


@dataclass
class FoldResult:
    """Outcome of one LOSO fold.

    Attributes:
        test_subject: the held-out subject.
        test_index: (n,) positions of the test samples in the arrays given to :func:`train_fold`.
        y_true, y_pred: (n,) integer labels and predictions of the test subject.
        probs: (n, C) softmax probabilities.
        curve: one dict per epoch: ``epoch`` (1-based), ``loss`` (mean training loss),
            ``train_acc`` (accuracy of the training forward passes), ``lr`` (learning rate after the
            epoch's last step), and ``test_acc`` only in
            ``best_test_epoch`` mode.
        selected_epoch: the epoch whose model made the predictions.
        epoch_selection: the mode used; ``peeks_at_test`` is True for ``best_test_epoch``.
        train_seconds: wall time of training and prediction, in seconds.
        device: where it ran.
    """

    test_subject: str
    test_index: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray
    curve: list[dict] = field(default_factory=list)
    selected_epoch: int = 0
    epoch_selection: str = "last"
    train_seconds: float = 0.0
    device: str = "cpu"

    @property
    def peeks_at_test(self) -> bool:
        """True when the test subject chose the epoch (``best_test_epoch``): label such results."""
        return self.epoch_selection == "best_test_epoch"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_tensor(flows: np.ndarray) -> torch.Tensor:
    """Flows (N, H, W, 3) float32 [u, v, strain] -> tensor (N, 3, H, W) float32.

    Raises:
        ValueError: if ``flows`` is not 4-D.
    """
    flows = np.asarray(flows, dtype=np.float32)
    if flows.ndim != 4:
        raise ValueError(f"flows must be (N, H, W, C), got shape {flows.shape}")
    return torch.from_numpy(np.ascontiguousarray(flows.transpose(0, 3, 1, 2)))


def mirror(x: torch.Tensor, flow_range: str = "unit") -> torch.Tensor:
    """Mirror flows (B, 3, H, W) [u, v, strain] left-right: the image axis flips and u changes sign.

    With ``flow_range="unit"`` (u min-max scaled to 0..1 per sample) the sign change is ``1 - u``,
    exactly what min-max scaling of -u gives; with ``signed`` it is ``-u``. v and strain only flip.
    """
    x = x.flip(-1)
    u = 1.0 - x[:, :1] if flow_range == "unit" else -x[:, :1]
    return torch.cat([u, x[:, 1:]], dim=1)


@torch.no_grad()
def predict(model: EPIR, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of ``model`` (eval mode) on inputs x (N, C_in, H, W) already on its device."""
    was_training = model.training
    model.eval()
    out = [model(x[i : i + batch_size]).softmax(-1).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def fit(
    config: EPIRConfig,
    recipe: TrainRecipe,
    x_train: np.ndarray,
    y_train: np.ndarray,
    on_epoch_end: Callable[[dict], None] | None = None,
    eval_each_epoch: Callable[[EPIR, int], dict] | None = None,
) -> tuple[EPIR, list[dict]]:
    """Train a fresh model on flows (N, H, W, 3) and labels (N,), seeded by ``recipe.seed``.

    Args:
        config: model configuration (its ``contrastive`` and ``alpha`` choose the loss).
        recipe: optimisation settings.
        x_train: (N, H, W, C) float32 flows; y_train: (N,) integer labels in 0..C-1.
        on_epoch_end: called with each epoch's record (a dict, see :class:`FoldResult`).
        eval_each_epoch: called as ``f(model, epoch)`` after every epoch; its dict is merged into
            the epoch's record (used by ``best_test_epoch``).

    Returns:
        The trained model (on the recipe's device) and the per-epoch records.

    Raises:
        ValueError: for empty or inconsistent arrays or labels outside 0..C-1.
    """
    if len(x_train) == 0:
        raise ValueError("no training samples")
    if len(x_train) != len(y_train):
        raise ValueError(f"{len(x_train)} flows but {len(y_train)} labels")
    y = np.asarray(y_train, dtype=np.int64)
    if y.min() < 0 or y.max() >= config.num_classes:
        raise ValueError(f"labels must lie in 0..{config.num_classes - 1}, got {y.min()}..{y.max()}")
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    model = EPIR(config).to(device)
    x = to_tensor(x_train).to(device)
    if recipe.standardize:  # training statistics only; the test subject is never seen here
        model.set_input_stats(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6))
    yt = torch.from_numpy(y).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-len(x) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if recipe.schedule == "cosine" else None
    gen = torch.Generator().manual_seed(recipe.seed)
    curve: list[dict] = []
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen).to(device)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            xb = x[idx]
            if recipe.hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip.to(device)[:, None, None, None], mirror(xb, recipe.flow_range), xb)
            logits, feats = model(xb, return_features=True)
            loss = epir_loss(logits, feats, yt[idx], alpha=config.alpha, use_contrastive=config.contrastive)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == yt[idx]).sum())
        record = {"epoch": epoch, "loss": loss_sum / len(x), "train_acc": correct / len(x),
                  "lr": opt.param_groups[0]["lr"]}
        if eval_each_epoch is not None:
            record.update(eval_each_epoch(model, epoch))
        curve.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return model, curve


def train_fold(
    flows: np.ndarray,
    labels: np.ndarray,
    subjects: Sequence,
    test_subject,
    config: EPIRConfig | None = None,
    recipe: TrainRecipe | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> FoldResult:
    """Train on every subject but ``test_subject`` and predict ``test_subject`` (one LOSO fold).

    Args:
        flows: (N, H, W, 3) float32 [u, v, strain] flows of all samples.
        labels: (N,) integer labels in 0..C-1.
        subjects: (N,) subject of each sample (compared as strings).
        test_subject: the subject held out.
        config: model configuration (default: the ``epir`` paper configuration).
        recipe: optimisation settings (default: the paper recipe).
        on_epoch_end: optional callback receiving each epoch's record.

    Returns:
        :class:`FoldResult` with the test subject's predictions and the training curve.

    Raises:
        ValueError: if the arrays differ in length, the test subject has no samples, or no
            training samples remain.
    """
    config = config or EPIRConfig()
    recipe = recipe or TrainRecipe()
    subjects = np.asarray([str(s) for s in subjects])
    labels = np.asarray(labels, dtype=np.int64)
    if not (len(flows) == len(labels) == len(subjects)):
        raise ValueError(f"lengths differ: {len(flows)} flows, {len(labels)} labels, {len(subjects)} subjects")
    test = subjects == str(test_subject)
    if not test.any():
        raise ValueError(f"test subject {test_subject!r} has no samples")
    if test.all():
        raise ValueError("no training samples: every sample belongs to the test subject")
    test_index = np.flatnonzero(test)
    device = resolve_device(recipe.device)
    x_test = to_tensor(flows[test]).to(device)
    y_test = labels[test]

    best: dict = {"acc": -1.0, "probs": None, "epoch": 0}

    def peek(model: EPIR, epoch: int) -> dict:
        probs = predict(model, x_test, recipe.batch_size)
        acc = float(np.mean(probs.argmax(-1) == y_test))
        if acc >= best["acc"]:  # HTNet keeps the last of equally good epochs
            best.update(acc=acc, probs=probs, epoch=epoch)
        return {"test_acc": acc}

    start = time.perf_counter()
    model, curve = fit(
        config, recipe, flows[~test], labels[~test], on_epoch_end,
        eval_each_epoch=peek if recipe.epoch_selection == "best_test_epoch" else None,
    )
    if recipe.epoch_selection == "best_test_epoch":
        probs, selected = best["probs"], best["epoch"]
    else:
        probs, selected = predict(model, x_test, recipe.batch_size), recipe.epochs
    return FoldResult(
        test_subject=str(test_subject),
        test_index=test_index,
        y_true=y_test,
        y_pred=probs.argmax(-1),
        probs=probs,
        curve=curve,
        selected_epoch=selected,
        epoch_selection=recipe.epoch_selection,
        train_seconds=time.perf_counter() - start,
        device=str(device),
    )
