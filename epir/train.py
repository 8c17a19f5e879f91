"""Training and evaluation of one leave-one-subject-out (LOSO) fold from arrays, for any model of the
library (the EPIR ladder and the peers of :mod:`epir.presets`).

The default recipe is the paper's (EPIR Sec. 4.2): Adam, learning rate 5e-5, batch size 256, 300
epochs, loss CE + L_con. One training yields two results, stored side by side and never mixed:

- the honest one (``FoldResult.y_pred`` / ``probs``): the model after the last epoch predicts the
  test subject, which no choice looked at;
- the best-test-epoch one (``FoldResult.best_test_epoch``): the test subject is scored after every
  epoch and the epoch with the best test accuracy is kept (the last of equal ones), as HTNet's public
  ``main_HTNet.py`` does. It PEEKS at the test subject and inflates scores (Varanka et al., IEEE TAC
  2023); it exists to compare with published numbers and to measure the inflation (the "oracle gap"),
  and is labelled wherever it appears. Scoring the test subject does not touch training: it runs in
  eval mode, without gradients, and draws no random numbers.

Inputs are our flows (N, H, W, 3) ``[u, v, strain]`` in the range ``recipe.flow_range``; each batch is
converted to the model's declared input convention (:mod:`epir.inputs`) after augmentation.
Nothing here knows of Ray or MLflow: progress goes to an optional per-epoch callback.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from .fields import literal_problems
from .inputs import FLOW_CHANNELS, convert, data_convention
from .losses import epir_loss
from .presets import build_model, make_config

Schedule = Literal["constant", "cosine", "step"]
FlowRange = Literal["unit", "signed"]
SampleOrder = Literal["shuffle", "by_label", "given"]
Optimizer = Literal["adam", "adamw", "sgd"]
Precision = Literal["fp32", "bf16"]
ClassWeights = Literal["none", "balanced"]
SCHEDULES, FLOW_RANGES, SAMPLE_ORDERS = get_args(Schedule), get_args(FlowRange), get_args(SampleOrder)
OPTIMIZERS, PRECISIONS, CLASS_WEIGHTS = get_args(Optimizer), get_args(Precision), get_args(ClassWeights)


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
        hflip: mirror a random half of each training batch left-right (faces are roughly symmetric;
            the paper does not augment). Mirroring reverses the horizontal flow, so u is mapped by
            ``flow_range``.
        flow_range: how the data's flows are stored: ``unit`` (min-max scaled to 0..1 per sample, as the
            MEGC2019 flow images and ``preprocess --normalize minmax``: mirrored u = 1 - u) or ``signed``
            (pixels: mirrored u = -u). The grid sets it from the shards' manifest.
        schedule: learning rate over the run: ``constant`` (the paper), ``cosine`` (decays from
            ``lr`` to 0 over all steps, ``torch.optim.lr_scheduler.CosineAnnealingLR`` stepped per batch) or
            ``step`` (multiplied by ``step_gamma`` every ``step_epochs`` epochs, ``torch.optim.lr_scheduler.StepLR``
            at epoch boundaries; RCN-A's ``ModelTrain_Final.py`` creates such a scheduler and never steps it).
        step_epochs, step_gamma: the ``step`` schedule's period in epochs (10) and factor (0.5).
        standardize: standardise each input channel with the mean and std of the fold's training flows
            (:meth:`epir.model.EPIR.set_input_stats`; EPIR family only; the paper does not). Mirroring
            happens before it.
        sample_order: order of the training samples in each epoch: ``shuffle`` (a new permutation every
            epoch), ``by_label`` (the same order every epoch, class by class, as STSTNet's ``main.py`` reads
            them from one folder per class), ``given`` (the arrays' order, every epoch).
        optimizer: ``adam`` (``weight_decay`` is Adam's coupled L2 penalty, the paper's optimiser),
            ``adamw`` (decoupled weight decay, Loshchilov & Hutter 2019; ``torch.optim.AdamW``) or ``sgd``
            (``torch.optim.SGD`` with momentum 0.9 and coupled ``weight_decay``, as SSSNet's recipe in meb).
        label_smoothing: cross-entropy label smoothing (0: none).
        class_weights: ``none`` or ``balanced``: cross-entropy weights n / (C n_c) from the fold's
            training labels (scikit-learn's "balanced"), for the macro-averaged UF1 / UAR.
        warmup_epochs: the learning rate rises linearly from lr / (warm-up steps) to lr over these first
            epochs, then follows ``schedule`` over the rest (``torch.optim.lr_scheduler.LinearLR`` then
            ``CosineAnnealingLR`` / constant, in ``SequentialLR``).
        translate: shift each training sample by a random integer in -translate..translate pixels,
            vertically and horizontally, edge values repeated (flows are not changed, only moved: a
            small error of the face crop).
        mixup: Beta(mixup, mixup) mixing of pairs of training samples and of their one-hot targets
            (Zhang et al. 2018); 0 = off. The contrastive term uses the larger share's label.
        ensemble: train this many models per fold (seeds ``seed``, ``seed + 1000``, ...) and average their
            softmax probabilities (the best-test-epoch result averages them epoch by epoch).
        ema: keep an exponential moving average of the weights with this decay per step (e.g. 0.99;
            ``torch.optim.swa_utils`` EMA, buffers included) and predict with it; 0 = off.
        precision: ``fp32``, or ``bf16``: the training forward pass and loss under ``torch.autocast`` in
            bfloat16 (weights and optimiser stay fp32; prediction stays fp32). For GPUs.
        compile: train through ``torch.compile(model)`` (the same parameters; prediction uses the plain
            module). Pays on GPUs for long runs; its first steps compile.

    Raises:
        ValueError: for an unknown mode or a size, count or rate out of its range.
    """

    epochs: int = 300
    batch_size: int = 256
    lr: float = 5e-5
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    hflip: bool = False
    flow_range: FlowRange = "unit"
    standardize: bool = False
    schedule: Schedule = "constant"
    step_epochs: int = 10
    step_gamma: float = 0.5
    sample_order: SampleOrder = "shuffle"
    optimizer: Optimizer = "adam"
    label_smoothing: float = 0.0
    class_weights: ClassWeights = "none"
    warmup_epochs: int = 0
    translate: int = 0
    mixup: float = 0.0
    ensemble: int = 1
    ema: float = 0.0
    precision: Precision = "fp32"
    compile: bool = False

    def __post_init__(self):
        problems = literal_problems(self)
        for name, ok, rule in (
            ("epochs", self.epochs >= 1, "must be >= 1"), ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"), ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must lie in [0, 1)"),
            ("mixup", self.mixup >= 0, "must be >= 0"), ("translate", self.translate >= 0, "must be >= 0"),
            ("ensemble", self.ensemble >= 1, "must be >= 1"), ("ema", 0 <= self.ema < 1, "must lie in [0, 1)"),
            ("step_epochs", self.step_epochs >= 1, "must be >= 1"), ("step_gamma", 0 < self.step_gamma <= 1,
                                                                     "must lie in (0, 1]"),
            ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs,
             f"must lie in 0..epochs-1 with epochs={self.epochs}")):
            if not ok:
                problems.append(f"{name}={getattr(self, name)!r} {rule}")
        if problems:
            raise ValueError("\n".join(problems))


@dataclass
class BestTestEpoch:
    """The fold's result at the epoch its TEST subject scored best on: it PEEKS at the test subject.

    Attributes:
        epoch: the chosen epoch (1-based; the last of equally good ones, as HTNet's code).
        y_pred: (n,) predictions of that epoch; probs: (n, C) its softmax probabilities.
        test_acc: (epochs,) the test subject's accuracy after every epoch.
    """

    epoch: int
    y_pred: np.ndarray
    probs: np.ndarray
    test_acc: list[float]

    peeks_at_test: bool = True


@dataclass
class FoldResult:
    """Outcome of one LOSO fold: the honest result and, beside it, the best-test-epoch one.

    Attributes:
        test_subject: the held-out subject.
        test_index: (n,) positions of the test samples in the arrays given to :func:`train_fold`.
        y_true: (n,) integer labels of the test subject.
        y_pred, probs: (n,) predictions and (n, C) softmax probabilities of the LAST epoch (honest).
        curve: one dict per epoch: ``epoch`` (1-based), ``loss`` (mean training loss),
            ``train_acc`` (accuracy of the training forward passes), ``lr`` (learning rate after the
            epoch's last step).
        best_test_epoch: the test-subject-chosen epoch's result (:class:`BestTestEpoch`; peeks).
        member_probs: (S, n, C) each ensemble member's last-epoch probabilities (S = ``recipe.ensemble``):
            S single models of different seeds, whose scores give the spread over seeds.
        models: the S trained models (on the CPU), only when :func:`train_fold` was asked to keep them.
        train_seconds: wall time of training and prediction, in seconds.
        device: where it ran.
    """

    test_subject: str
    test_index: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray
    curve: list[dict] = field(default_factory=list)
    best_test_epoch: BestTestEpoch | None = None
    member_probs: np.ndarray | None = None
    models: list | None = None
    train_seconds: float = 0.0
    device: str = "cpu"

    @property
    def selected_epoch(self) -> int:
        """The epoch whose model made the honest predictions: the last."""
        return len(self.curve)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_tensor(flows: np.ndarray) -> torch.Tensor:
    """Flows (N, H, W, C) float32 -> tensor (N, C, H, W) float32, channels kept in their order.

    Raises:
        ValueError: if ``flows`` is not 4-D.
    """
    flows = np.asarray(flows, dtype=np.float32)
    if flows.ndim != 4:
        raise ValueError(f"flows must be (N, H, W, C), got shape {flows.shape}")
    return torch.from_numpy(np.ascontiguousarray(flows.transpose(0, 3, 1, 2)))


def to_model_input(flows, config, flow_range: str) -> torch.Tensor:
    """Our flows (N, H, W, 3) ``[u, v, strain]`` -> the model's input (N, C', H, W) in its convention.

    Args:
        flows: numpy (N, H, W, 3) or an already transposed tensor (N, 3, H, W).
        config: a model config (declares ``input_convention``).
        flow_range: ``unit`` or ``signed``, how the flows are stored.

    Raises:
        ValueError: as :func:`epir.inputs.convert` (a convention that cannot be met without guessing).
    """
    x = flows if isinstance(flows, torch.Tensor) else to_tensor(flows)
    return convert(x, data_convention(flow_range), config.input_convention)


def mirror(x: torch.Tensor, flow_range: str = "unit") -> torch.Tensor:
    """Mirror flows (B, 3, H, W) [u, v, strain] left-right: the image axis flips and u changes sign.

    With ``flow_range="unit"`` (u min-max scaled to 0..1 per sample) the sign change is ``1 - u``,
    exactly what min-max scaling of -u gives; with ``signed`` it is ``-u``. v and strain only flip.
    """
    x = x.flip(-1)
    u = 1.0 - x[:, :1] if flow_range == "unit" else -x[:, :1]
    return torch.cat([u, x[:, 1:]], dim=1)


def translate(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each sample of x (B, C, H, W) by its own random (dy, dx) in -max_shift..max_shift pixels,
    repeating the edge values into the uncovered border (``F.pad(mode="replicate")`` then a crop).

    The offsets (B, 2) are drawn from ``gen`` (a CPU generator), then every crop is taken at once by
    indexing, on x's device."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H+2s, W+2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen).to(x.device)  # (B, 2): dy, dx
    rows = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    return padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[
        None, :, None, None], rows, cols]


@dataclass
class Augmented:
    """One training batch after :func:`augment`.

    Attributes:
        x: (B, 3, H, W) flows, still in the data's convention; y: (B,) labels (the contrastive term's; with
            mixup the larger share's).
        targets: (B, C) soft cross-entropy targets with mixup, else None.
        drop_scale: (B, depth, 2) stochastic-depth factors of every block's two residual branches, or None.
    """

    x: torch.Tensor
    y: torch.Tensor
    targets: torch.Tensor | None = None
    drop_scale: torch.Tensor | None = None


def augment(xb: torch.Tensor, yb: torch.Tensor, recipe: "TrainRecipe", gen: torch.Generator,
            rng: np.random.Generator, num_classes: int, drop_rates: Sequence[float] = ()) -> Augmented:
    """The recipe's random augmentations of one training batch, every draw from the fold's own generators.

    Draws, in this order: mirroring (``hflip``: one uniform per sample from ``gen``), shifts (``translate``:
    two integers per sample), mixup (``mixup``: lambda ~ Beta(a, a) from ``rng``, then a permutation from
    ``gen``; Zhang et al. 2018, as timm's ``Mixup`` per batch), stochastic depth (``drop_rates``: one
    uniform per sample, block and residual branch; timm's ``drop_path``). A fold that draws from its own
    generators in this order gets the same batch trained alone (:func:`fit`) or in a pack of folds
    (:mod:`epir.pack`); nothing random comes from torch's global generator.

    Args:
        xb: (B, 3, H, W) flows in the data's convention (on any device); yb: (B,) integer labels.
        recipe: the :class:`TrainRecipe` (``hflip``, ``flow_range``, ``translate``, ``mixup``).
        gen: the fold's CPU ``torch.Generator``; rng: its ``numpy`` generator (mixup's lambda).
        num_classes: C, for mixup's one-hot targets.
        drop_rates: the model's per-block stochastic-depth rates (``EPIR.drop_rates``); empty or all 0 = none.

    Returns:
        :class:`Augmented`.
    """
    device, b = xb.device, len(xb)
    if recipe.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        xb = torch.where(flip.to(device)[:, None, None, None], mirror(xb, recipe.flow_range), xb)
    xb = translate(xb, recipe.translate, gen)
    targets = None
    if recipe.mixup:
        lam = float(rng.beta(recipe.mixup, recipe.mixup))
        perm = torch.randperm(b, generator=gen).to(device)
        xb = lam * xb + (1 - lam) * xb[perm]
        onehot = torch.nn.functional.one_hot(yb, num_classes).float()
        targets = lam * onehot + (1 - lam) * onehot[perm]
        yb = yb if lam >= 0.5 else yb[perm]
    drop_scale = None
    if any(r > 0 for r in drop_rates):
        rates = torch.tensor(list(drop_rates), dtype=torch.float32)[None, :, None]  # (1, depth, 1)
        keep = torch.rand(b, len(drop_rates), 2, generator=gen) >= rates  # (B, depth, 2)
        drop_scale = (keep / (1 - rates)).to(device)
    return Augmented(xb, yb, targets, drop_scale)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of ``model`` (eval mode) on inputs x (N, C_in, H, W) already in its
    input convention (:func:`to_model_input`) and on its device."""
    was_training = model.training
    model.eval()
    out = [model(x[i : i + batch_size]).softmax(-1).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def fold_generators(seed: int) -> tuple[torch.Generator, np.random.Generator]:
    """A fold's own random streams: a CPU ``torch.Generator`` (sample order, mirroring, shifts, mixup's
    permutation, stochastic depth) and a ``numpy`` generator (mixup's lambda), both seeded by ``seed``."""
    return torch.Generator().manual_seed(seed), np.random.default_rng(seed)


def _epoch_order(n: int, recipe: TrainRecipe, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if recipe.sample_order == "shuffle":
        return torch.randperm(n, generator=gen)
    if recipe.sample_order == "by_label":
        return torch.argsort(labels.cpu(), stable=True)
    return torch.arange(n)


def check_training_arrays(config, x_train, y_train) -> np.ndarray:
    """Refuse training arrays :func:`fit` cannot use; return the labels as int64 (N,).

    Raises:
        ValueError: for empty or inconsistent arrays, labels outside 0..C-1 or flows that are not
            (N, H, W, 3).
    """
    if len(x_train) == 0:
        raise ValueError("no training samples")
    if len(x_train) != len(y_train):
        raise ValueError(f"{len(x_train)} flows but {len(y_train)} labels")
    y = np.asarray(y_train, dtype=np.int64)
    if y.min() < 0 or y.max() >= config.num_classes:
        raise ValueError(f"labels must lie in 0..{config.num_classes - 1}, got {y.min()}..{y.max()}")
    if np.asarray(x_train).shape[-1] != len(FLOW_CHANNELS):
        raise ValueError(f"flows must be (N, H, W, {len(FLOW_CHANNELS)}) [u, v, strain], got {np.asarray(x_train).shape}")
    return y


def set_training_stats(model: nn.Module, x: torch.Tensor) -> None:
    """``recipe.standardize``: the model standardises its inputs with the per-channel mean and std of the
    training inputs x (N, C, H, W), already in its input convention (EPIR family only).

    Raises:
        ValueError: for a model without input statistics.
    """
    if not hasattr(model, "set_input_stats"):
        raise ValueError(f"standardize: the {model.config.family} model has no input statistics (EPIR family only)")
    model.set_input_stats(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6))


def balanced_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``class_weights="balanced"``: (C,) n / (C n_c) over the training labels y (N,), 0 for an absent class
    (scikit-learn's ``compute_class_weight("balanced")``)."""
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.where(counts > 0, len(y) / (num_classes * counts.clamp_min(1)), torch.zeros_like(counts))


def fit(
    config,
    recipe: TrainRecipe,
    x_train: np.ndarray,
    y_train: np.ndarray,
    on_epoch_end: Callable[[dict], None] | None = None,
    eval_each_epoch: Callable[[nn.Module, int], dict] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train a fresh model on flows (N, H, W, 3) and labels (N,), seeded by ``recipe.seed``.

    Args:
        config: model configuration of any family (its ``contrastive`` and ``alpha`` choose the loss).
        recipe: optimisation settings.
        x_train: (N, H, W, 3) float32 flows ``[u, v, strain]`` in ``recipe.flow_range``; y_train: (N,)
            integer labels in 0..C-1.
        on_epoch_end: called with each epoch's record (a dict, see :class:`FoldResult`).
        eval_each_epoch: called as ``f(model, epoch)`` after every epoch; its dict is merged into
            the epoch's record.

    Returns:
        The trained model (on the recipe's device; its weights' moving average with ``recipe.ema``) and
        the per-epoch records. ``recipe.ensemble`` is :func:`train_fold`'s business: this trains one model.

    Raises:
        ValueError: for empty or inconsistent arrays, labels outside 0..C-1, an input convention the
            data cannot meet, or ``standardize`` for a model without input statistics.
    """
    run = _Training(config, recipe, x_train, check_training_arrays(config, x_train, y_train))
    curve: list[dict] = []
    for epoch in range(1, recipe.epochs + 1):
        record = run.epoch(epoch)
        if eval_each_epoch is not None:
            record.update(eval_each_epoch(run.predictor, epoch))
        curve.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return run.predictor, curve


class _Training:
    """One model being trained by :func:`fit`: the model, its optimiser, schedule, weight average and the
    fold's random streams. Shapes: x (N, 3, H, W) in the data's convention on the device, y (N,)."""

    def __init__(self, config, recipe: TrainRecipe, x_train: np.ndarray, y: np.ndarray):
        self.config, self.recipe = config, recipe
        self.device = resolve_device(recipe.device)
        torch.manual_seed(recipe.seed)
        self.model = build_model(config).to(self.device)
        self.x = to_tensor(x_train).to(self.device)  # the data's convention; converted per batch after augmentation
        self.src, self.dst = data_convention(recipe.flow_range), config.input_convention
        if recipe.standardize:  # training statistics only; the test subject is never seen here
            set_training_stats(self.model, convert(self.x, self.src, self.dst))
        self.y = torch.from_numpy(y).to(self.device)
        self.weights = balanced_weights(self.y, config.num_classes) if recipe.class_weights == "balanced" else None
        if recipe.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
        else:
            opt_cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
            self.opt = opt_cls(self.model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.sched = _scheduler(self.opt, recipe, -(-len(self.x) // recipe.batch_size))
        self.ema = None
        if recipe.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
        self.gen, self.rng = fold_generators(recipe.seed)
        self.rates = getattr(self.model, "drop_rates", [])
        self.forward = torch.compile(self.model) if recipe.compile else self.model
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16")

    @property
    def predictor(self) -> nn.Module:
        """The model that predicts: the weights' moving average with ``recipe.ema``, else the model."""
        return self.model if self.ema is None else self.ema.module

    def epoch(self, epoch: int) -> dict:
        """One pass over the training samples; returns the epoch's record (see :class:`FoldResult`)."""
        self.model.train()
        order = _epoch_order(len(self.x), self.recipe, self.y, self.gen).to(self.device)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(self.x), self.recipe.batch_size):
            idx = order[i : i + self.recipe.batch_size]
            loss, hits = self.step(augment(self.x[idx], self.y[idx], self.recipe, self.gen, self.rng,
                                           self.config.num_classes, self.rates))
            loss_sum += loss * len(idx)
            correct += hits
        return {"epoch": epoch, "loss": loss_sum / len(self.x), "train_acc": correct / len(self.x),
                "lr": self.opt.param_groups[0]["lr"]}

    def step(self, a: Augmented) -> tuple[float, int]:
        """One optimisation step on an augmented batch; returns its loss and correct predictions."""
        cfg = self.config
        with torch.autocast(**self.autocast):
            kw = {} if a.drop_scale is None else {"drop_scale": a.drop_scale}
            logits, feats = self.forward(convert(a.x, self.src, self.dst), return_features=True, **kw)
            loss = epir_loss(logits, feats, a.y, alpha=cfg.alpha, use_contrastive=cfg.contrastive, targets=a.targets,
                             class_weights=self.weights, label_smoothing=self.recipe.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.sched is not None:
            self.sched.step()
        return loss.item(), int((logits.argmax(-1) == a.y).sum())


class SoftmaxEnsemble(nn.Module):
    """Several trained models as one: ``forward`` returns the log of their mean softmax, so that its softmax
    is the ensemble's probabilities (what :func:`train_fold` averages). Shapes: (B, C_in, H, W) -> (B, C).

    Args:
        models: models of one config (:attr:`config` is the first one's).
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.config = models[0].config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)  # (B, C)
        return probs.clamp_min(1e-12).log()


def fit_all(config, recipe: TrainRecipe, flows: np.ndarray, labels: np.ndarray,
            on_epoch_end: Callable[[dict], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train the model a cell's recipe makes on ALL given samples (no test subject): the model to keep and
    apply to new data. ``recipe.ensemble`` = S trains S seeds (``seed + 1000 m``) and returns a
    :class:`SoftmaxEnsemble`.

    Returns:
        (the model or ensemble on the CPU in eval mode, the first member's curve).

    Raises:
        as :func:`fit`.
    """
    models, first = [], None
    for m in range(recipe.ensemble):
        model, curve = fit(config, dataclasses.replace(recipe, seed=recipe.seed + 1000 * m), flows, labels,
                           on_epoch_end if m == 0 else None)
        models.append(model.cpu().eval())
        first = first or curve
    return (models[0] if len(models) == 1 else SoftmaxEnsemble(models).eval()), first


def _scheduler(opt, recipe: TrainRecipe, per_epoch: int):
    """The per-step learning-rate schedule: optional linear warm-up, then constant, cosine to 0, or a step every
    ``step_epochs`` epochs (at the same step as a per-epoch ``StepLR``)."""
    from torch.optim import lr_scheduler

    warm = recipe.warmup_epochs * per_epoch
    rest = recipe.epochs * per_epoch - warm
    main = lr_scheduler.CosineAnnealingLR(opt, rest) if recipe.schedule == "cosine" else (
        lr_scheduler.StepLR(opt, recipe.step_epochs * per_epoch, recipe.step_gamma) if recipe.schedule == "step" else None)
    if not warm:
        return main
    ramp = lr_scheduler.LinearLR(opt, start_factor=1 / warm, end_factor=1.0, total_iters=warm)
    return lr_scheduler.SequentialLR(opt, [ramp, main or lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)],
                                     milestones=[warm])


def fold_split(flows, labels, subjects, test_subject) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 (N,) and the (N,) bool mask of ``test_subject``'s samples (subjects compared as text).

    Raises:
        ValueError: if the arrays differ in length, the test subject has no samples, or no training samples
            remain.
    """
    subjects = np.asarray([str(s) for s in subjects])
    labels = np.asarray(labels, dtype=np.int64)
    if not (len(flows) == len(labels) == len(subjects)):
        raise ValueError(f"lengths differ: {len(flows)} flows, {len(labels)} labels, {len(subjects)} subjects")
    test = subjects == str(test_subject)
    if not test.any():
        raise ValueError(f"test subject {test_subject!r} has no samples")
    if test.all():
        raise ValueError("no training samples: every sample belongs to the test subject")
    return labels, test


def train_fold(
    flows: np.ndarray,
    labels: np.ndarray,
    subjects: Sequence,
    test_subject,
    config=None,
    recipe: TrainRecipe | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    keep_models: bool = False,
) -> FoldResult:
    """Train on every subject but ``test_subject`` and predict ``test_subject`` (one LOSO fold).

    Args:
        flows: (N, H, W, 3) float32 ``[u, v, strain]`` flows of all samples, in ``recipe.flow_range``.
        labels: (N,) integer labels in 0..C-1.
        subjects: (N,) subject of each sample (compared as strings).
        test_subject: the subject held out.
        config: model configuration of any family (default: the ``epir`` paper configuration).
        recipe: optimisation settings (default: the paper recipe).
        on_epoch_end: optional callback receiving each epoch's record (never the test accuracy).
        keep_models: return the trained model(s) in ``FoldResult.models`` (moved to the CPU).

    Returns:
        :class:`FoldResult`: the last epoch's (honest) predictions, and the best-test-epoch ones beside
        them (``best_test_epoch``, labelled as peeking). With ``recipe.ensemble`` = S, the softmax average
        of S models (seeds ``seed + 1000 m``); its curve is the members' mean, and ``on_epoch_end`` sees
        the first member's epochs.

    Raises:
        ValueError: if the arrays differ in length, the test subject has no samples, or no
            training samples remain; as :func:`fit`.
    """
    config = config or make_config("epir")
    recipe = recipe or TrainRecipe()
    labels, test = fold_split(flows, labels, subjects, test_subject)
    test_index = np.flatnonzero(test)
    device = resolve_device(recipe.device)
    x_test = to_model_input(flows[test], config, recipe.flow_range).to(device)
    y_test = labels[test]

    start = time.perf_counter()
    members, curves, models = [], [], []  # per member: (epochs, n, C) test probabilities after every epoch
    for m in range(recipe.ensemble):
        seen: list[np.ndarray] = []

        def peek(model: nn.Module, epoch: int) -> dict:
            seen.append(predict(model, x_test, recipe.batch_size))
            return {}  # kept out of the training curve: the curve is what callbacks and logs see

        member = dataclasses.replace(recipe, seed=recipe.seed + 1000 * m)
        model, curve = fit(config, member, flows[~test], labels[~test], on_epoch_end if m == 0 else None,
                           eval_each_epoch=peek)
        if keep_models:
            models.append(model.cpu().eval())
        members.append(np.stack(seen))
        curves.append(curve)
    return fold_result(str(test_subject), test_index, y_test, members, curves, models if keep_models else None,
                       time.perf_counter() - start, str(device))


def fold_result(test_subject: str, test_index: np.ndarray, y_test: np.ndarray, members: Sequence[np.ndarray],
                curves: Sequence[list[dict]], models: list | None, seconds: float, device: str) -> FoldResult:
    """Combine a fold's S ensemble members into its :class:`FoldResult` (:func:`train_fold`, :mod:`epir.pack`).

    Args:
        test_subject, test_index, y_test: the held-out subject, its sample positions and (n,) labels.
        members: per member, (epochs, n, C) the test subject's softmax probabilities after every epoch.
        curves: per member, its per-epoch training records.
        models: the trained members (or None); seconds, device: timing and where it ran.

    Returns:
        The honest last-epoch result, the best-test-epoch one beside it (the ensemble's softmax average
        scored epoch by epoch; the last of equally good epochs, as HTNet), each member's last-epoch
        probabilities, and the members' mean curve.
    """
    by_epoch = np.mean(members, axis=0)  # (epochs, n, C): the ensemble's softmax average after each epoch
    test_acc = [float(np.mean(p.argmax(-1) == y_test)) for p in by_epoch]
    best = max(i for i, a in enumerate(test_acc) if a == max(test_acc))  # HTNet keeps the last of the best
    probs = by_epoch[-1]
    curve = curves[0] if len(curves) == 1 else [
        {k: float(np.mean([c[e][k] for c in curves])) if k != "epoch" else rec["epoch"] for k in rec}
        for e, rec in enumerate(curves[0])]
    return FoldResult(
        test_subject=test_subject,
        test_index=test_index,
        y_true=y_test,
        y_pred=probs.argmax(-1),
        probs=probs,
        curve=curve,
        best_test_epoch=BestTestEpoch(best + 1, by_epoch[best].argmax(-1), by_epoch[best], test_acc),
        member_probs=np.stack([m[-1] for m in members]),
        models=models,
        train_seconds=seconds,
        device=device,
    )
