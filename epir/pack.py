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
from .train import (
    Augmented,
    FoldResult,
    TrainRecipe,
    _epoch_order,
    _scheduler,
    augment,
    balanced_weights,
    check_training_arrays,
    fold_generators,
    fold_result,
    fold_split,
    resolve_device,
    set_training_stats,
    to_tensor,
)


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
            global generator, e.g. ``ststnet``), an ``sgd`` recipe (the pack's update is Adam's), or ``sample_order`` other than per-member shuffles/orders
            (all are supported; listed here for the message only).
    """
    if config.family != "epir":
        raise ValueError(f"fold packs train EPIR-family models only; a {config.family} model (BatchNorm running "
                         "statistics, dropout from torch's global generator) trains its folds one by one")
    if recipe.optimizer == "sgd":
        raise ValueError("fold packs implement Adam and AdamW; an sgd recipe trains its folds one by one")


def _pad(t: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    """Pad the first dimension of t to n rows of ``value``."""
    if len(t) == n:
        return t
    return torch.cat([t, t.new_full((n - len(t),) + tuple(t.shape[1:]), value)])


@dataclasses.dataclass
class Batch:
    """One step of a pack: every member's batch padded to the batch size, (P, B, ...), and who takes a step.

    Attributes:
        x: (P, B, C', H, W) inputs in the model's convention; y: (P, B) labels; mask: (P, B) valid samples.
        targets: (P, B, C) mixup targets or None; drop_scale: (P, B, depth, 2) or None.
        active: (P,) bool, members that have a batch at this step; sizes: (P,) their valid samples.
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor | None
    drop_scale: torch.Tensor | None
    active: torch.Tensor
    sizes: list[int]


class Pack:
    """The state of a pack being trained: stacked parameters, optimiser, schedules, generators (see
    :func:`fit_pack`). Shapes: P members, B the batch size, N the flows given."""

    def __init__(self, config, recipe: TrainRecipe, flows: np.ndarray, labels: np.ndarray, members: Sequence[Member]):
        check_packable(config, recipe)
        self.config, self.recipe, self.members = config, recipe, list(members)
        self.device = resolve_device(recipe.device)
        labels = np.asarray(labels, dtype=np.int64)
        for mb in members:
            check_training_arrays(config, flows[mb.train_index], labels[mb.train_index])
        self.src, self.dst = data_convention(recipe.flow_range), config.input_convention
        self.x_all = to_tensor(flows).to(self.device)  # (N, 3, H, W), the data's convention
        self.y_all = torch.from_numpy(labels.copy()).to(self.device)
        self.train_index = [torch.as_tensor(mb.train_index, device=self.device) for mb in members]
        self.sizes = [len(mb.train_index) for mb in members]
        self.per_epoch = [-(-n // recipe.batch_size) for n in self.sizes]
        self._build()
        self.streams = [fold_generators(mb.seed) for mb in members]
        self.schedules = []
        for n_steps in self.per_epoch:  # each member's own schedule, stepped with its own steps
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
            self.schedules.append((dummy, _scheduler(dummy, recipe, n_steps)))
        self.weights = None
        if recipe.class_weights == "balanced":  # (P, C)
            self.weights = torch.stack([balanced_weights(self.y_all[t], config.num_classes) for t in self.train_index])
        self._functions()

    def _build(self) -> None:
        """Each member initialised as :func:`epir.train.fit` initialises it alone, then stacked."""
        models = []
        for mb, rows in zip(self.members, self.train_index):
            torch.manual_seed(mb.seed)
            model = build_model(self.config).to(self.device)
            if self.recipe.standardize:
                set_training_stats(model, convert(self.x_all[rows], self.src, self.dst))
            models.append(model)
        self.params, self.buffers = stack_module_state(models)  # name -> (P, ...)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.rates = models[0].drop_rates
        self.drop = any(r > 0 for r in self.rates)
        self.opt = PackedAdam(self.params, self.recipe.weight_decay, decoupled=self.recipe.optimizer == "adamw")
        self.ema = {k: v.detach().clone() for k, v in self.params.items()} if self.recipe.ema else None
        self.ema_started = torch.zeros(len(models), dtype=torch.bool, device=self.device)

    def _functions(self) -> None:
        """The vmapped forward passes (training, evaluation) and loss."""
        cfg, recipe, base = self.config, self.recipe, self.base

        def forward(p, b, x, scale):
            kw = {"drop_scale": scale} if scale is not None else {}
            return functional_call(base, (p, b), (x,), {"return_features": True, **kw})

        def loss_one(logits, feats, y, mask, targets, w):
            return epir_loss(logits, feats, y, alpha=cfg.alpha, use_contrastive=cfg.contrastive, targets=targets,
                             class_weights=w, label_smoothing=recipe.label_smoothing, mask=mask)

        self.train_fwd = vmap(forward, in_dims=(0, 0, 0, 0 if self.drop else None))
        if recipe.compile:
            self.train_fwd = torch.compile(self.train_fwd)
        self.eval_fwd = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, 0))
        self.loss_fn = vmap(loss_one, in_dims=(0, 0, 0, 0, 0 if recipe.mixup else None,
                                               0 if self.weights is not None else None))

    def epoch_orders(self) -> list[torch.Tensor]:
        """Each member's sample order for one epoch (rows into the pack's flows), from its own generator."""
        return [rows[_epoch_order(n, self.recipe, self.y_all[rows], gen).to(self.device)]
                for rows, n, (gen, _) in zip(self.train_index, self.sizes, self.streams)]

    def batch(self, orders: list[torch.Tensor], step: int) -> Batch:
        """Step ``step`` of the epoch: each active member's batch, augmented from its own generators, padded."""
        bsz, c, dev = self.recipe.batch_size, self.config.num_classes, self.device
        xs, ys, ts, ds, sizes = [], [], [], [], []
        for i, order in enumerate(orders):
            rows = order[step * bsz:(step + 1) * bsz] if step < self.per_epoch[i] else order[:0]
            a = augment(self.x_all[rows], self.y_all[rows], self.recipe, *self.streams[i], c, self.rates) \
                if len(rows) else Augmented(self.x_all[:0], self.y_all[:0])
            sizes.append(len(rows))
            xs.append(_pad(convert(a.x, self.src, self.dst), bsz))
            ys.append(_pad(a.y, bsz))
            if self.recipe.mixup:
                ts.append(_pad(a.targets if a.targets is not None else torch.zeros(0, c, device=dev), bsz))
            if self.drop:
                scale = a.drop_scale if a.drop_scale is not None else torch.ones(0, len(self.rates), 2, device=dev)
                ds.append(_pad(scale, bsz, 1.0))
        mask = torch.arange(bsz, device=dev)[None] < torch.tensor(sizes, device=dev)[:, None]  # (P, B)
        return Batch(torch.stack(xs), torch.stack(ys), mask, torch.stack(ts) if ts else None,
                     torch.stack(ds) if ds else None, torch.tensor(sizes, device=dev) > 0, sizes)

    def step(self, b: Batch) -> tuple[np.ndarray, np.ndarray]:
        """One optimisation step of the active members; returns each member's loss and correct count (P,)."""
        autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.recipe.precision == "bf16")
        with torch.autocast(**autocast):
            logits, feats = self.train_fwd(self.params, self.buffers, b.x, b.drop_scale)
            losses = self.loss_fn(logits.float(), feats.float(), b.y, b.mask, b.targets, self.weights)  # (P,)
        for p in self.params.values():
            p.grad = None
        losses.sum().backward()
        lr = torch.tensor([opt.param_groups[0]["lr"] for opt, _ in self.schedules], device=self.device)
        self.opt.step(lr, b.active)
        if self.ema is not None:
            self._ema_update(b.active)
        for (dummy, sched), on in zip(self.schedules, b.sizes):
            if on and sched is not None:
                dummy.step()  # moves nothing (no gradient); keeps the scheduler's order check quiet
                sched.step()
        correct = ((logits.argmax(-1) == b.y) & b.mask).sum(-1)
        return losses.detach().cpu().numpy(), correct.cpu().numpy()

    @torch.no_grad()
    def _ema_update(self, active: torch.Tensor) -> None:
        """``torch.optim.swa_utils`` EMA per member: the first step copies, later steps lerp by 1 - decay."""
        for k, p in self.params.items():
            view = (-1,) + (1,) * (p.dim() - 1)
            upd = torch.where(self.ema_started.view(view), self.ema[k].lerp(p, 1 - self.recipe.ema), p)
            self.ema[k] = torch.where(active.view(view), upd, self.ema[k])
        self.ema_started = self.ema_started | active

    @torch.no_grad()
    def predict(self, rows: list[torch.Tensor | None]) -> list[np.ndarray | None]:
        """Each member's softmax probabilities (n_i, C) of its own rows (None: nothing), in eval mode, with
        the weights' moving average under ``recipe.ema``."""
        n = max((len(r) for r in rows if r is not None), default=0)
        if not n:
            return [None] * len(rows)
        x = torch.stack([_pad(convert(self.x_all[r if r is not None else self.train_index[i][:0]], self.src, self.dst), n)
                         for i, r in enumerate(rows)])
        self.base.eval()
        probs = self.eval_fwd(self.ema or self.params, self.buffers, x).softmax(-1).float().cpu().numpy()
        self.base.train()
        return [None if r is None else probs[i, : len(r)] for i, r in enumerate(rows)]

    def lrs(self) -> list[float]:
        """Each member's learning rate now."""
        return [opt.param_groups[0]["lr"] for opt, _ in self.schedules]

    def models(self) -> list[nn.Module]:
        """The members as ordinary models (CPU, eval mode)."""
        return _unstack(self.config, self.ema or self.params, self.buffers)


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
    pack = Pack(config, recipe, flows, labels, members)
    evals = [None if mb.eval_index is None else torch.as_tensor(mb.eval_index, device=pack.device) for mb in members]
    curves: list[list[dict]] = [[] for _ in members]
    seen: list[list[np.ndarray]] = [[] for _ in members]
    for epoch in range(1, recipe.epochs + 1):
        orders = pack.epoch_orders()
        loss_sum, correct = np.zeros(len(members)), np.zeros(len(members))
        for step in range(max(pack.per_epoch)):
            b = pack.batch(orders, step)
            losses, hits = pack.step(b)
            loss_sum += losses * np.asarray(b.sizes)
            correct += hits
        for i, probs in enumerate(pack.predict(evals)):
            if probs is not None:
                seen[i].append(probs)
        for i, lr in enumerate(pack.lrs()):
            rec = {"epoch": epoch, "loss": float(loss_sum[i] / pack.sizes[i]),
                   "train_acc": float(correct[i] / pack.sizes[i]), "lr": lr}
            curves[i].append(rec)
            if on_epoch_end is not None:
                on_epoch_end(i, rec)
    return curves, [np.stack(s) if s else None for s in seen], pack.models()


def _unstack(config, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> list[nn.Module]:
    """The pack's members as ordinary models (CPU, eval mode)."""
    out = []
    for i in range(next(iter(params.values())).shape[0]):
        model = build_model(config)
        state = {k: v[i].detach().cpu() for k, v in {**params, **buffers}.items()}
        model.load_state_dict(state)
        out.append(model.eval())
    return out


def probe_member_bytes(config, recipe: TrainRecipe, flows: np.ndarray, labels: np.ndarray, member: Member) -> int:
    """Peak CUDA memory (bytes) of ONE member's training step: what each member of a pack adds.

    Raises:
        ValueError: on a device other than CUDA (host memory is not probed).
    """
    device = resolve_device(recipe.device)
    if device.type != "cuda":
        raise ValueError("only CUDA memory is probed")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    pack = Pack(config, dataclasses.replace(recipe, epochs=1, compile=False), flows, labels, [member])
    pack.step(pack.batch(pack.epoch_orders(), 0))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - pack.x_all.numel() * pack.x_all.element_size()
    del pack
    torch.cuda.empty_cache()
    return int(peak)


def pack_sizes(members: int, per_member: int, free: int, margin: float = 0.8) -> list[int]:
    """Split ``members`` into packs that fit ``margin`` of ``free`` bytes at ``per_member`` bytes each.

    Raises:
        MemoryError: when not even one member fits, with the figures.
    """
    fit = int(margin * free // max(per_member, 1))
    if fit < 1:
        raise MemoryError(f"one member needs {per_member / 2**30:.2f} GiB, the device has {free / 2**30:.2f} GiB free: "
                          "lower the batch size or the width")
    return [min(fit, members - k) for k in range(0, members, fit)]


def _chunk(config, recipe: TrainRecipe, flows: np.ndarray, labels: np.ndarray, members: list[Member],
           log: Callable[[str], None] | None) -> int:
    """Members per pack: all of them, or on CUDA as many as fit the free memory (a multiple of the ensemble
    size, so that a fold's members stay together)."""
    if resolve_device(recipe.device).type != "cuda":
        return len(members)
    per = probe_member_bytes(config, recipe, flows, labels, members[0])
    fit = pack_sizes(len(members), per, torch.cuda.mem_get_info(resolve_device(recipe.device))[0])[0]
    chunk = max(recipe.ensemble, fit - fit % recipe.ensemble)
    if chunk < len(members) and log is not None:
        log(f"pack of {len(members)} members split into packs of {chunk} ({per / 2**20:.0f} MiB per member)")
    return chunk


def train_folds(flows: np.ndarray, labels: np.ndarray, subjects: Sequence, test_subjects: Sequence, config,
                recipe: TrainRecipe, on_epoch_end: Callable[[str, dict], None] | None = None,
                keep_models: bool = False, log: Callable[[str], None] | None = None) -> list[FoldResult]:
    """Train the LOSO folds of ``test_subjects`` as one pack; the same results as :func:`epir.train.train_fold`
    called for each (the honest last epoch, the best-test-epoch result beside it, each ensemble member's).

    On a CUDA device a pack that would not fit the free memory is split into packs that do (the probe,
    :func:`probe_member_bytes`, trains one member for one step; ``log`` hears of the split); on a CPU the
    pack is not split.

    Args:
        flows, labels, subjects: as :func:`epir.train.train_fold`.
        test_subjects: the folds of the pack (each a held-out subject).
        config: an EPIR-family model config; recipe: the shared recipe (``ensemble`` = S gives S members
            per fold, seeds ``seed + 1000 m``).
        on_epoch_end: called as ``f(test_subject, record)`` with the epochs of each fold's first member.
        keep_models: return each fold's trained model(s) in ``FoldResult.models``.
        log: receives a line when the pack is split for memory.

    Returns:
        One :class:`epir.train.FoldResult` per test subject, in order; ``train_seconds`` is the pack's wall
        time shared out evenly.

    Raises:
        ValueError: as :func:`epir.train.fold_split` and :func:`fit_pack`; for a repeated test subject.
        MemoryError: on CUDA, when not one member fits (:func:`pack_sizes`).
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
    chunk = _chunk(config, recipe, flows, y, members, log)
    curves, seen, models = [], [], []
    for k in range(0, len(members), chunk):
        part = members[k:k + chunk]

        def relay(i: int, rec: dict, k=k) -> None:
            j = k + i
            if on_epoch_end is not None and j % s_count == 0:
                on_epoch_end(folds[j // s_count][0], rec)

        c, e, m = fit_pack(config, recipe, flows, y, part, relay)
        curves += c
        seen += e
        models += m
    seconds = (time.perf_counter() - start) / len(folds)
    device = str(resolve_device(recipe.device))
    out = []
    for f, (s, test_index) in enumerate(folds):
        part = slice(f * s_count, (f + 1) * s_count)
        out.append(fold_result(s, test_index, y[test_index], seen[part], curves[part],
                               models[part] if keep_models else None, seconds, device))
    return out
