"""What makes the model learn: position it can use, a temperature that moves, DTSM over the right blocks,
and the recipe's regularisers (AdamW, label smoothing, class weights, warm-up, translation, mixup,
seed ensembles, weight EMA). Small synthetic data, seconds each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epir.dtsm import rollout_through_merges
from epir.model import EPIR
from epir.presets import make_config
from epir.train import TrainRecipe, fit, predict, to_model_input, train_fold, translate

SMALL = dict(dim=32, dim_head=11, depth=4, integration_blocks=1)


def location_task(n_per_class: int, seed: int):
    """Flows that are zero but for one 3x3 blob of random motion whose PATCH names the class: patch (1, 1),
    (1, 2) or (2, 1) of the 4 x 4 grid. Blob and its DNSPT shifts stay inside the image, so the tokens
    of the three classes are the same multiset: only the position embedding tells them apart."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for c, (pr, pc) in enumerate([(1, 1), (1, 2), (2, 1)]):
        for _ in range(n_per_class):
            f = np.zeros((28, 28, 3), np.float32)
            f[pr * 7 + 2 : pr * 7 + 5, pc * 7 + 2 : pc * 7 + 5] = rng.uniform(0.5, 1.0, (3, 3, 3))
            x.append(f)
            y.append(c)
    return np.stack(x), np.array(y)


def _accuracy(model, config, x, y) -> float:
    return float(np.mean(predict(model, to_model_input(x, config, "unit")).argmax(-1) == y))


def test_the_model_uses_where_the_motion_is():
    """With the SPT reference's initialisation the model learns a task only location can solve, and
    loses it when its position embedding is shuffled; with trunc_normal(0.02) it stays at chance."""
    x, y = location_task(30, 0)
    xt, yt = location_task(10, 1)
    recipe = TrainRecipe(epochs=30, batch_size=32, lr=1e-3, device="cpu")
    cfg = make_config("epir", **SMALL, init="spt", itals_param="log_scale")
    model, _ = fit(cfg, recipe, x, y)
    assert _accuracy(model, cfg, xt, yt) >= 0.9
    with torch.no_grad():
        model.pos_embed[0, 1:] = model.pos_embed[0, 1 + torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert _accuracy(model, cfg, xt, yt) <= 0.6  # the same tokens in other places: it was position
    old = make_config("epir", **SMALL)  # trunc_normal(0.02): position is 2 % of a token's scale
    model, _ = fit(old, recipe, x, y)
    assert _accuracy(model, old, xt, yt) <= 0.5


def test_the_itals_temperature_moves_in_relative_steps_with_log_scale():
    x, y = location_task(30, 0)
    moved = {}
    for param in ("temperature", "log_scale"):
        cfg = make_config("epir", dim=32, dim_head=21, depth=4, integration_blocks=1, init="spt", itals_param=param)
        model, _ = fit(cfg, TrainRecipe(epochs=20, batch_size=32, lr=5e-4, device="cpu"), x, y)
        tau0 = math.sqrt(21)
        moved[param] = max(float(((b.attn.effective_temperature() - tau0).abs() / tau0).max()) for b in model.blocks)
        params = {n for n, _ in model.named_parameters() if "temperature" in n or "log_scale" in n}
        assert len(params) == 4 and all(param in n for n in params)
    assert moved["log_scale"] >= 0.01 and moved["log_scale"] >= 3 * moved["temperature"], moved
    paper = make_config("epir", itals_param="log_scale")
    assert sum(p.numel() for p in EPIR(paper).parameters()) == 7_025_384  # one parameter per head either way


def test_dtsm_rolls_out_through_the_merges_or_over_the_extractor_blocks(monkeypatch):
    import epir.model as model_module

    calls = {}

    def spy(name, fn):
        def wrapped(arg, **kw):
            calls[name] = list(arg)  # the model goes on appending to its list
            return fn(arg, **kw)
        monkeypatch.setattr(model_module, name, wrapped)

    spy("rollout_through_merges", model_module.rollout_through_merges)
    spy("attention_rollout", model_module.attention_rollout)
    x = torch.randn(2, 3, 28, 28)
    kw = dict(dim=24, dim_head=8, depth=9, integration_blocks=4, merge_k=1)
    EPIR(make_config("epir", **kw, dtsm_rollout="all")).eval()(x)
    steps = calls.pop("rollout_through_merges")
    assert len(steps) == 8 and [m is not None for _, m in steps] == [True] * 4 + [False] * 4  # eq. 19: all 8
    EPIR(make_config("epir", **kw, dtsm_rollout="extractor")).eval()(x)
    assert len(calls["attention_rollout"]) == 4 and all(a.shape[-1] == 13 for a in calls["attention_rollout"])


def test_rollout_through_a_merge_scores_each_token_by_the_inputs_it_holds():
    a1 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.25] * 4, [0.25] * 4])[None, None]  # (1, 1, 4, 4)
    merge = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1]])[None]  # tokens 1 and 2 merged
    a2 = torch.tensor([[0.2, 0.5, 0.3], [1 / 3] * 3, [1 / 3] * 3])[None, None]
    out = rollout_through_merges([(a1, merge), (a2, None)], score="sum")
    r = a2[0, 0] @ merge[0] @ a1[0, 0]  # (3, 4): the rollout from the 4 input tokens to the 3 current ones
    held = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(out[0, 0, 0], r[0] @ held.T)
    # without merges it is TransFG's rollout
    b = torch.rand(2, 3, 5, 5).softmax(-1)
    c = torch.rand(2, 3, 5, 5).softmax(-1)
    torch.testing.assert_close(rollout_through_merges([(b, None), (c, None)])[:, :, 0], (c @ b)[:, :, 0])


def test_translate_moves_each_sample_and_repeats_the_edges():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = translate(x, 1, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for i in range(2):
        assert any(torch.equal(out[i, 0], padded[i, 0, dy : dy + 4, dx : dx + 4]) for dy in range(3) for dx in range(3))
    assert torch.equal(translate(x, 0, torch.Generator()), x)


def _toy(n=36, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 2) + [1] * (n // 3) + [2] * (n - n // 2 - n // 3))
    flows = rng.uniform(0, 1, (n, 28, 28, 3)).astype(np.float32)
    flows[:, :7, :7, 0] = labels[:, None, None] / 2
    return flows, labels, np.repeat(["s1", "s2", "s3"], n // 3)


def test_recipe_regularisers_run_and_change_the_training():
    flows, labels, _ = _toy()
    cfg = make_config("epir", **SMALL, init="spt")
    base = dict(epochs=4, batch_size=12, lr=1e-3, device="cpu")
    raw, plain = fit(cfg, TrainRecipe(**base), flows, labels)
    for extra in (dict(optimizer="adamw", weight_decay=0.05), dict(optimizer="sgd"), dict(label_smoothing=0.1), dict(class_weights="balanced"),
                  dict(translate=2), dict(mixup=0.4), dict(hflip=True), dict(precision="bf16")):
        model, curve = fit(cfg, TrainRecipe(**base, **extra), flows, labels)
        assert curve != plain and np.isfinite([c["loss"] for c in curve]).all(), extra
        assert isinstance(model, EPIR)
    # the weights' moving average trains the same model and predicts with the average
    ema, curve = fit(cfg, TrainRecipe(**base, ema=0.9), flows, labels)
    assert curve == plain and isinstance(ema, EPIR)
    x = to_model_input(flows, cfg, "unit")
    assert not np.allclose(predict(ema, x), predict(raw, x))
    with pytest.raises(ValueError, match="optimizer"):
        TrainRecipe(optimizer="rmsprop")
    with pytest.raises(ValueError, match="warmup"):
        TrainRecipe(epochs=3, warmup_epochs=3)


def test_adamw_decays_decoupled_and_adam_couples():
    torch.manual_seed(0)
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        flows, labels, _ = _toy()
        cfg = make_config("baseline", dim=8, dim_head=4, depth=2)
        # lr tiny, decay huge: AdamW shrinks the weights by lr * wd per step whatever the gradient
        model, _ = fit(cfg, TrainRecipe(epochs=1, batch_size=36, lr=1e-6, weight_decay=1e3, optimizer=name,
                                        device="cpu"), flows, labels)
        torch.manual_seed(0)
        fresh = EPIR(cfg)
        ratio = float(model.head.weight.detach().norm() / fresh.head.weight.detach().norm())
        if name == "adamw":
            assert ratio == pytest.approx(1 - 1e-6 * 1e3, abs=1e-4)
        else:  # Adam adds wd * w to the gradient, then normalises it: a step of about lr
            assert ratio > 0.99


def test_warmup_then_cosine():
    flows, labels, _ = _toy()
    _, curve = fit(make_config("baseline", dim=8, dim_head=4, depth=2),
                   TrainRecipe(epochs=6, batch_size=12, lr=1e-3, warmup_epochs=2, schedule="cosine", device="cpu"),
                   flows, labels)
    lrs = [c["lr"] for c in curve]  # 3 steps an epoch: lr after each epoch's last step
    assert lrs[0] < lrs[1] == pytest.approx(1e-3) and lrs[1] > lrs[2] > lrs[3] > lrs[4] > lrs[5]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_class_weights_balance_the_training_labels():
    from epir.losses import epir_loss

    logits, feats = torch.randn(6, 3), torch.randn(6, 4)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    w = torch.tensor([6 / 9, 6 / 6, 6 / 3])  # n / (C n_c)
    ref = torch.nn.functional.cross_entropy(logits, y, weight=w)
    torch.testing.assert_close(epir_loss(logits, feats, y, use_contrastive=False, class_weights=w), ref)


def test_a_seed_ensemble_averages_its_members_and_keeps_both_results():
    flows, labels, subjects = _toy()
    cfg = make_config("epir", **SMALL, init="spt")
    base = dict(epochs=3, batch_size=12, lr=1e-3, device="cpu")
    ens = train_fold(flows, labels, subjects, "s2", cfg, TrainRecipe(**base, ensemble=2))
    a = train_fold(flows, labels, subjects, "s2", cfg, TrainRecipe(**base))
    b = train_fold(flows, labels, subjects, "s2", cfg, TrainRecipe(**base, seed=1000))
    np.testing.assert_allclose(ens.probs, (a.probs + b.probs) / 2, atol=1e-6)
    np.testing.assert_allclose(ens.member_probs, np.stack([a.probs, b.probs]), atol=1e-6)  # each seed alone too
    assert len(ens.curve) == 3 and ens.curve[0]["loss"] == pytest.approx((a.curve[0]["loss"] + b.curve[0]["loss"]) / 2)
    assert len(ens.best_test_epoch.test_acc) == 3


def test_stochastic_depth_is_off_in_eval_and_random_in_training():
    cfg = make_config("epir", **SMALL, drop_path=0.5)
    model = EPIR(cfg)
    x = torch.randn(4, 3, 28, 28)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    one = model(x)
    assert not torch.allclose(one, model(x))
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0, 0.5 / 3, 1 / 3, 0.5])
    with pytest.raises(ValueError, match="drop_path"):
        make_config("epir", drop_path=1.0)
