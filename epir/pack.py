"""Several LOSO folds trained at once as ONE batched model (a "pack"): the folds of a cell share the
architecture and the recipe; only their training subjects differ.

Follows PyTorch's model-ensembling recipe (tutorial "Model ensembling": ``torch.func.stack_module_state``,
``functional_call``, ``vmap``): the members' parameters are stacked along a leading member dimension P and
one vmapped forward and backward trains all of them. A member is one (fold, ensemble seed) pair, so a pack
of F folds with ``recipe.ensemble`` = S trains F x S models.

Each member keeps, exactly as :func:`epir.train.fit` trains it alone:

- its training subset, its batch order and every random draw from its own generators
  (:func:`epir.train.fold_generators`, :func:`epir.train.augment`), its initialisation
  (``torch.manual_seed(seed)`` before the model is built), its input statistics and class weights;
- its loss: batches are padded to the batch size and masked, so the loss is the mean over the member's own
  samples, the contrastive term over its own valid pairs divided by their count squared (eq. 23);
- its optimiser state and learning-rate schedule. The update is Adam's (or AdamW's), element-wise, written
  for stacked tensors with a learning rate and a step count PER MEMBER (:class:`PackedAdam`; torch's
  optimisers take one learning rate per parameter group, and members whose folds have fewer batches run
  different schedules). A member whose training set yields fewer batches than another's takes no step in
  the extra ones: its parameters, moments, step count and schedule stay as they are.

Only the EPIR family packs: STSTNet's BatchNorm keeps running statistics (state that vmap does not carry
per member) and its dropout draws from torch's global generator; such models are refused with a message,
and their folds train one by one (:func:`epir.train.train_fold`).

On a CPU a pack is not faster than the same folds one after the other (``benchmarks/fold_pack.py``); on a
GPU it turns hundreds of tiny kernels per step into a few large ones.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .inputs import convert, data_convention
from .losses import epir_loss
from .presets import build_model
from .train import (FoldResult, TrainRecipe, _epoch_order, _scheduler, augment, balanced_weights, check_training_arrays,
                    fold_generators, fold_result, fold_split, resolve_device, set_training_stats, to_model_input,
                    to_tensor)


class PackedAdam:
    """Adam / AdamW over stacked parameters (P, ...) with a learning rate and a step count per member.

    The update is torch's ``torch.optim.Adam`` (coupled L2 ``weight_decay``) or ``torch.optim.AdamW``
    (decoupled) single-tensor update, element for element (betas 0.9, 0.999, eps 1e-8), applied only to the
    members marked active; inactive members keep parameters, moments and step count.

    Args:
        params: name -> (P, ...) stacked leaf tensors (``stack_module_state``).
        weight_decay: as the recipe's; decoupled: AdamW.
    """

    def __init__(self, params: dict[str, torch.Tensor], weight_decay: float = 0.0, decoupled: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.wd, self.decoupled, self.betas, self.eps = params, weight_decay, decoupled, betas, eps
        first = next(iter(params.values()))
        self.steps = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)  # (P,)
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: torch.Tensor) -> None:
        """One update of the active members. lr: (P,) float; active: (P,) bool."""
        b1, b2 = self.betas
        steps = self.steps + active.to(self.steps.dtype)
        bc1 = (1 - b1 ** steps.clamp_min(1)).float()  # (P,)
        bc2_sqrt = (1 - b2 ** steps.clamp_min(1)).sqrt().float()
        lr = lr.float()
        for k, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            view = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(view)
            lr_k = lr.view(view)
            if self.wd and not self.decoupled:
                g = g + self.wd * p
            m = torch.where(on, self.m[k].lerp(g, 1 - b1), self.m[k])
            v = torch.where(on, self.v[k] * b2 + (1 - b2) * g * g, self.v[k])
            new = p * (1 - lr_k * self.wd) if (self.wd and self.decoupled) else p
            new = new - (lr_k / bc1.view(view)) * m / (v.sqrt() / bc2_sqrt.view(view) + self.eps)
            p.copy_(torch.where(on, new, p))
            self.m[k], self.v[k] = m, v
        self.steps = steps


@dataclasses.dataclass
class Member:
    """One model of a pack: its training rows (into the pack's flows) and its seed."""

    train_index: np.ndarray
    seed: int
    eval_index: np.ndarray | None = None  # rows it predicts after every epoch (its test subject), or None


def check_packable(config, recipe: TrainRecipe) -> None:
    """Refuse what a pack cannot train exactly as :func:`epir.train.fit` would.

    Raises:
        ValueError: for a model family other than EPIR (BatchNorm running statistics and dropout from the
            global generator, e.g. ``ststnet``), or ``sample_order`` other than per-member shuffles/orders
            (all are supported; listed here for the message only).
    """
    if config.family != "epir":
        raise ValueError(f"fold packs train EPIR-family models only; a {config.family} model (BatchNorm running "
                         "statistics, dropout from torch's global generator) trains its folds one by one")


def _pad(t: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    """Pad the first dimension of t to n rows of ``value``."""
    if len(t) == n:
        return t
    return torch.cat([t, t.new_full((n - len(t),) + tuple(t.shape[1:]), value)])


def fit_pack(config, recipe: TrainRecipe, flows: np.ndarray, labels: np.ndarray, members: Sequence[Member],
             on_epoch_end: Callable[[int, dict], None] | None = None
             ) -> tuple[list[list[dict]], list[np.ndarray | None], list[nn.Module]]:
    """Train every member of a pack at once; see the module docstring.

    Args:
        config: an EPIR-family model config; recipe: the shared recipe (its ``seed`` is replaced by each
            member's).
        flows: (N, H, W, 3) float32 ``[u, v, strain]`` in ``recipe.flow_range``; labels: (N,) in 0..C-1.
        members: the pack's members.
        on_epoch_end: called as ``f(member, record)`` with each member's epoch records.

    Returns:
        Per member: its curve (as :func:`epir.train.fit`'s), its (epochs, n_eval, C) softmax probabilities
        of ``eval_index`` after every epoch (None without), and its trained model (on the CPU, eval mode;
        the weights' moving average with ``recipe.ema``).

    Raises:
        ValueError: as :func:`check_packable` and :func:`epir.train.check_training_arrays`.
    """
    check_packable(config, recipe)
    device = resolve_device(recipe.device)
    labels = np.asarray(labels, dtype=np.int64)
    for mb in members:
        check_training_arrays(config, flows[mb.train_index], labels[mb.train_index])
    src, dst = data_convention(recipe.flow_range), config.input_convention
    x_all = to_tensor(flows).to(device)  # (N, 3, H, W), the data's convention
    y_all = torch.from_numpy(labels).to(device)
    models = []
    for mb in members:  # each member initialised as fit initialises it alone
        torch.manual_seed(mb.seed)
        model = build_model(config).to(device)
        if recipe.standardize:
            set_training_stats(model, convert(x_all[torch.as_tensor(mb.train_index, device=device)], src, dst))
        models.append(model)
    params, buffers = stack_module_state(models)  # name -> (P, ...)
    base = copy.deepcopy(models[0]).to("meta")
    p_count, bsz, c = len(members), recipe.batch_size, config.num_classes
    opt = PackedAdam(params, recipe.weight_decay, decoupled=recipe.optimizer == "adamw")
    ema = {k: v.detach().clone() for k, v in params.items()} if recipe.ema else None
    ema_started = torch.zeros(p_count, dtype=torch.bool, device=device)
    weights = None
    if recipe.class_weights == "balanced":
        weights = torch.stack([balanced_weights(y_all[torch.as_tensor(mb.train_index, device=device)], c)
                               for mb in members])  # (P, C)
    sizes = [len(mb.train_index) for mb in members]
    per_epoch = [-(-n // bsz) for n in sizes]
    schedules = []
    for n_steps in per_epoch:  # each member's own schedule, stepped with its own steps
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
        schedules.append((dummy, _scheduler(dummy, recipe, n_steps)))
    streams = [fold_generators(mb.seed) for mb in members]
    rates = models[0].drop_rates
    drop = any(r > 0 for r in rates)
    del models

    def forward(p, b, x, scale):
        kw = {"drop_scale": scale} if scale is not None else {}
        return functional_call(base, (p, b), (x,), {"return_features": True, **kw})

    def loss_one(logits, feats, y, mask, targets, w):
        return epir_loss(logits, feats, y, alpha=config.alpha, use_contrastive=config.contrastive, targets=targets,
                         class_weights=w, label_smoothing=recipe.label_smoothing, mask=mask)

    train_fwd = vmap(forward, in_dims=(0, 0, 0, 0 if drop else None))
    eval_fwd = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, 0))
    if recipe.compile:
        train_fwd = torch.compile(train_fwd)
    loss_fn = vmap(loss_one, in_dims=(0, 0, 0, 0, 0 if recipe.mixup else None, 0 if weights is not None else None))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16")
    eval_sets = [None if mb.eval_index is None else torch.as_tensor(mb.eval_index, device=device) for mb in members]
    n_eval = max((len(e) for e in eval_sets if e is not None), default=0)
    x_eval = None
    if n_eval:  # (P, n_eval, C', H, W) each member's test subject, padded
        x_eval = torch.stack([_pad(convert(x_all[e], src, dst), n_eval) if e is not None
                              else convert(x_all[:1], src, dst).new_zeros((n_eval,) + tuple(x_all.shape[1:]))
                              for e in eval_sets])
    curves: list[list[dict]] = [[] for _ in members]
    seen: list[list[np.ndarray]] = [[] for _ in members]
    train_index = [torch.as_tensor(mb.train_index, device=device) for mb in members]
    for epoch in range(1, recipe.epochs + 1):
        base.train()
        orders = [train_index[i][_epoch_order(sizes[i], recipe, y_all[train_index[i]], streams[i][0]).to(device)]
                  for i in range(p_count)]
        loss_sum, correct = np.zeros(p_count), np.zeros(p_count)
        for step in range(max(per_epoch)):
            active = [step < per_epoch[i] for i in range(p_count)]
            xs, ys, ms, ts, ds = [], [], [], [], []
            for i in range(p_count):
                rows = orders[i][step * bsz:(step + 1) * bsz] if active[i] else orders[i][:0]
                a = augment(x_all[rows], y_all[rows], recipe, *streams[i], c, rates) if active[i] else None
                n = len(rows)
                xs.append(_pad(convert(a.x, src, dst) if a else convert(x_all[:0], src, dst), bsz))
                ys.append(_pad(a.y if a else y_all[:0], bsz))
                ms.append(torch.arange(bsz, device=device) < n)
                if recipe.mixup:
                    ts.append(_pad(a.targets if a else torch.zeros(0, c, device=device), bsz))
                if drop:
                    ds.append(_pad(a.drop_scale if a and a.drop_scale is not None
                                   else torch.ones(n, len(rates), 2, device=device), bsz, 1.0))
            x, y, mask = torch.stack(xs), torch.stack(ys), torch.stack(ms)  # (P, B, ...), (P, B), (P, B)
            with torch.autocast(**autocast):
                logits, feats = train_fwd(params, buffers, x, torch.stack(ds) if drop else None)
                losses = loss_fn(logits.float(), feats.float(), y, mask, torch.stack(ts) if recipe.mixup else None,
                                 weights)  # (P,)
            for p in params.values():
                p.grad = None
            losses.sum().backward()
            on = torch.tensor(active, device=device)
            lr = torch.tensor([schedules[i][0].param_groups[0]["lr"] for i in range(p_count)], device=device)
            opt.step(lr, on)
            if ema is not None:
                with torch.no_grad():
                    for k, p in params.items():
                        view = (-1,) + (1,) * (p.dim() - 1)
                        upd = torch.where(ema_started.view(view), ema[k].lerp(p, 1 - recipe.ema), p)
                        ema[k] = torch.where(on.view(view), upd, ema[k])
                    ema_started = ema_started | on
            for i in range(p_count):
                if active[i] and schedules[i][1] is not None:
                    schedules[i][0].step()  # no parameter moves (it has no gradient); keeps the scheduler's order check
                    schedules[i][1].step()
            lv = losses.detach().cpu().numpy()
            hit = ((logits.argmax(-1) == y) & mask).sum(-1).cpu().numpy()
            for i in range(p_count):
                if active[i]:
                    loss_sum[i] += float(lv[i]) * int(mask[i].sum())
                    correct[i] += int(hit[i])
        if x_eval is not None:
            base.eval()
            with torch.no_grad():
                probs = eval_fwd(ema or params, buffers, x_eval).softmax(-1).float().cpu().numpy()  # (P, n_eval, C)
            for i, e in enumerate(eval_sets):
                if e is not None:
                    seen[i].append(probs[i, : len(e)])
        for i in range(p_count):
            rec = {"epoch": epoch, "loss": loss_sum[i] / sizes[i], "train_acc": correct[i] / sizes[i],
                   "lr": schedules[i][0].param_groups[0]["lr"]}
            curves[i].append(rec)
            if on_epoch_end is not None:
                on_epoch_end(i, rec)
    trained = _unstack(config, ema or params, buffers)
    return curves, [np.stack(s) if s else None for s in seen], trained


def _unstack(config, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> list[nn.Module]:
    """The pack's members as ordinary models (CPU, eval mode)."""
    out = []
    for i in range(next(iter(params.values())).shape[0]):
        model = build_model(config)
        state = {k: v[i].detach().cpu() for k, v in {**params, **buffers}.items()}
        model.load_state_dict(state)
        out.append(model.eval())
    return out


def train_folds(flows: np.ndarray, labels: np.ndarray, subjects: Sequence, test_subjects: Sequence, config,
                recipe: TrainRecipe, on_epoch_end: Callable[[str, dict], None] | None = None,
                keep_models: bool = False) -> list[FoldResult]:
    """Train the LOSO folds of ``test_subjects`` as one pack; the same results as :func:`epir.train.train_fold`
    called for each (the honest last epoch, the best-test-epoch result beside it, each ensemble member's).

    Args:
        flows, labels, subjects: as :func:`epir.train.train_fold`.
        test_subjects: the folds of the pack (each a held-out subject).
        config: an EPIR-family model config; recipe: the shared recipe (``ensemble`` = S gives S members
            per fold, seeds ``seed + 1000 m``).
        on_epoch_end: called as ``f(test_subject, record)`` with the epochs of each fold's first member.
        keep_models: return each fold's trained model(s) in ``FoldResult.models``.

    Returns:
        One :class:`epir.train.FoldResult` per test subject, in order; ``train_seconds`` is the pack's wall
        time shared out evenly.

    Raises:
        ValueError: as :func:`epir.train.fold_split` and :func:`fit_pack`; for a repeated test subject.
    """
    if len(set(map(str, test_subjects))) != len(test_subjects):
        raise ValueError(f"a pack's test subjects must be distinct, got {list(test_subjects)}")
    start = time.perf_counter()
    members, folds = [], []
    for s in test_subjects:
        y, test = fold_split(flows, labels, subjects, s)
        folds.append((str(s), np.flatnonzero(test)))
        for m in range(recipe.ensemble):
            members.append(Member(np.flatnonzero(~test), recipe.seed + 1000 * m, np.flatnonzero(test)))
    s_count = recipe.ensemble

    def relay(i: int, rec: dict) -> None:
        if on_epoch_end is not None and i % s_count == 0:
            on_epoch_end(folds[i // s_count][0], rec)

    curves, seen, models = fit_pack(config, recipe, flows, y, members, relay)
    seconds = (time.perf_counter() - start) / len(folds)
    device = str(resolve_device(recipe.device))
    out = []
    for f, (s, test_index) in enumerate(folds):
        part = slice(f * s_count, (f + 1) * s_count)
        out.append(fold_result(s, test_index, y[test_index], seen[part], curves[part],
                               models[part] if keep_models else None, seconds, device))
    return out


__all__ = ["PackedAdam", "Member", "check_packable", "fit_pack", "train_folds", "to_model_input"]
