"""A pack of folds trained as one batched model gives what the same folds give trained one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epir.pack import Member, PackedAdam, fit_pack, train_folds
from epir.presets import make_config
from epir.train import TrainRecipe, train_fold

TINY = dict(dim=16, dim_head=8, depth=4, integration_blocks=2, merge_k=1)


def _toy(sizes=(6, 6, 6, 6), seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    labels = np.arange(n) % 3
    flows = rng.uniform(0, 1, (n, 28, 28, 3)).astype(np.float32)
    flows[:, :7, :7, 0] = labels[:, None, None] / 2  # a class cue
    subjects = np.concatenate([[f"s{i + 1}"] * k for i, k in enumerate(sizes)])
    return flows, labels, subjects


def _same(pack, alone):
    for p, a in zip(pack, alone):
        assert p.test_subject == a.test_subject and np.array_equal(p.test_index, a.test_index)
        for cp, ca in zip(p.curve, a.curve):
            assert cp["epoch"] == ca["epoch"] and cp["lr"] == pytest.approx(ca["lr"], rel=1e-6)
            assert cp["loss"] == pytest.approx(ca["loss"], abs=1e-4) and cp["train_acc"] == pytest.approx(ca["train_acc"])
        np.testing.assert_allclose(p.probs, a.probs, atol=1e-4)
        np.testing.assert_allclose(p.best_test_epoch.test_acc, a.best_test_epoch.test_acc)
        assert p.best_test_epoch.epoch == a.best_test_epoch.epoch


def test_a_pack_of_three_folds_equals_three_folds_trained_alone():
    flows, labels, subjects = _toy()
    cfg = make_config("epir", **TINY)
    recipe = TrainRecipe(epochs=3, batch_size=8, lr=1e-3, device="cpu")  # the paper's recipe, small
    pack = train_folds(flows, labels, subjects, ["s1", "s2", "s3"], cfg, recipe)
    _same(pack, [train_fold(flows, labels, subjects, s, cfg, recipe) for s in ("s1", "s2", "s3")])


def test_folds_of_different_sizes_are_masked_and_a_fold_with_fewer_batches_stands_still():
    # training sets of 18, 14 and 21 samples at batch 8: 3, 2 and 3 steps an epoch; the second fold
    # takes no step in the third, and its schedule (cosine over its own steps) is its own
    flows, labels, subjects = _toy(sizes=(5, 9, 2, 7, 4))
    cfg = make_config("+dtsm", dim=16, dim_head=8, depth=3)
    recipe = TrainRecipe(epochs=3, batch_size=8, lr=1e-3, device="cpu", schedule="cosine", class_weights="balanced",
                         optimizer="adamw", weight_decay=0.05, warmup_epochs=1)
    folds = ["s2", "s1", "s3"]
    _same(train_folds(flows, labels, subjects, folds, cfg, recipe),
          [train_fold(flows, labels, subjects, s, cfg, recipe) for s in folds])


def test_random_augmentations_draw_from_each_folds_own_generators():
    flows, labels, subjects = _toy(sizes=(6, 5, 7, 6))
    cfg = make_config("epir", **TINY, drop_path=0.3, init="spt")
    recipe = TrainRecipe(epochs=2, batch_size=8, lr=1e-3, device="cpu", hflip=True, translate=1, mixup=0.4,
                         standardize=True, label_smoothing=0.1, ema=0.9, ensemble=2)
    folds = ["s3", "s1"]
    pack = train_folds(flows, labels, subjects, folds, cfg, recipe)
    _same(pack, [train_fold(flows, labels, subjects, s, cfg, recipe) for s in folds])
    for p in pack:
        assert p.member_probs.shape == (2, len(p.test_index), 3)


def test_a_member_without_a_batch_keeps_its_parameters_and_adam_moments():
    p = {"w": torch.ones(3, 4, requires_grad=True)}
    opt = PackedAdam(p, weight_decay=0.1, decoupled=True)
    p["w"].grad = torch.ones(3, 4)
    opt.step(torch.tensor([0.1, 0.1, 0.1]), torch.tensor([True, False, True]))
    assert torch.equal(p["w"][1], torch.ones(4)) and torch.equal(opt.m["w"][1], torch.zeros(4))
    assert opt.steps.tolist() == [1, 0, 1] and not torch.equal(p["w"][0], torch.ones(4))
    ref = torch.ones(4, requires_grad=True)  # torch's AdamW, one step
    adamw = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.1)
    ref.grad = torch.ones(4)
    adamw.step()
    torch.testing.assert_close(p["w"][0].detach(), ref.detach())


def test_packs_refuse_models_they_cannot_batch_and_repeated_folds():
    flows, labels, subjects = _toy()
    with pytest.raises(ValueError, match="EPIR-family"):
        fit_pack(make_config("ststnet"), TrainRecipe(epochs=1, device="cpu"), flows, labels,
                 [Member(np.arange(12), 0)])
    with pytest.raises(ValueError, match="distinct"):
        train_folds(flows, labels, subjects, ["s1", "s1"], make_config("epir", **TINY), TrainRecipe(epochs=1))


def test_a_pack_too_large_for_the_device_is_split_or_refused_with_the_figures():
    from epir.pack import pack_sizes

    assert pack_sizes(68, per_member=2 * 2**30, free=100 * 2**30) == [40, 28]
    assert pack_sizes(5, per_member=2**20, free=2**30) == [5]
    with pytest.raises(MemoryError, match="one member needs 8.00 GiB, the device has 4.00 GiB free"):
        pack_sizes(3, per_member=8 * 2**30, free=4 * 2**30)
