"""The assembled model, its presets and its complexity report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from epir.complexity import PAPER_MACS, PAPER_PARAMS, measure
from epir.model import EPIR
from epir.presets import LADDER, PRESETS, make_config

from .conftest import REPO


def test_paper_configuration_gives_table1_figures():
    c = measure(EPIR(make_config("epir")))
    assert abs(c.params - PAPER_PARAMS) / PAPER_PARAMS <= 0.01
    assert abs(c.macs - PAPER_MACS) / PAPER_MACS <= 0.05
    assert c.flops == 2 * c.macs
    # 6 integration blocks each merge one pair (17 -> 11), DTSM leaves class token + 3 heads
    assert c.tokens_in == [17, 16, 15, 14, 13, 12] + [11] * 6 + [4]
    assert c.tokens_out[:6] == [16, 15, 14, 13, 12, 11]


def test_ladder_adds_one_component_per_rung():
    cfgs = {p: make_config(p) for p in LADDER}
    assert LADDER == ["baseline", "+dtsm", "+itals", "+spt", "+dnspt", "epir"]
    assert all(PRESETS[p].family == "epir" and PRESETS[p].profiled and not PRESETS[p].recipe for p in LADDER)
    b = cfgs["baseline"]
    assert (b.tokenizer, b.itals, b.dtsm, b.merge_k, b.contrastive) == ("linear", False, False, 0, False)
    assert cfgs["+dtsm"].dtsm and cfgs["+dtsm"].contrastive and not cfgs["+dtsm"].itals
    assert cfgs["+itals"].itals and cfgs["+itals"].tokenizer == "linear"
    assert cfgs["+spt"].tokenizer == "spt" and cfgs["+dnspt"].tokenizer == "dnspt"
    assert cfgs["+dnspt"].merge_k == 0 and cfgs["epir"].merge_k == 1
    base = measure(EPIR(b))
    assert base.tokens_in == [17] * 13  # plain ViT: no merge, no selection
    assert measure(EPIR(cfgs["epir"])).macs < 0.75 * base.macs


def test_depth_and_merge_rate_are_configurable():
    c = measure(EPIR(make_config("epir", depth=9, integration_blocks=4, merge_k=2)))
    assert len(c.tokens_in) == 9
    assert c.tokens_out[:4] == [15, 13, 11, 9] and c.tokens_in[-1] == 4
    with pytest.raises(ValueError):
        make_config("epir", depth=7, integration_blocks=6)  # no block left to roll out over
    with pytest.raises(KeyError):
        make_config("vit-huge")


def test_forward_outputs_and_input_checks():
    model = EPIR(make_config("epir", dim=32, dim_head=8, num_classes=5))
    logits, feats = model(torch.randn(4, 3, 28, 28), return_features=True)
    assert logits.shape == (4, 5) and feats.shape == (4, 32)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(4, 28, 28, 3))


def test_input_standardisation_is_a_saved_per_channel_affine_map():
    torch.manual_seed(0)
    model = EPIR(make_config("baseline", dim=16, dim_head=8, depth=3)).eval()
    x = torch.rand(4, 3, 28, 28)
    mean, std = torch.tensor([0.5, 0.4, 0.1]), torch.tensor([0.2, 0.25, 0.1])
    plain = model(((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))
    assert not torch.allclose(model(x), plain)
    model.set_input_stats(mean, std)
    assert torch.allclose(model(x), plain, atol=1e-6)
    restored = EPIR(make_config("baseline", dim=16, dim_head=8, depth=3)).eval()
    restored.load_state_dict(model.state_dict())  # the statistics travel with the weights
    assert torch.allclose(restored(x), plain, atol=1e-6)
    names = dict(model.named_parameters())
    assert "input_mean" not in names and "input_std" not in names  # buffers: the parameter count is unchanged
    assert {"input_mean", "input_std"} <= set(dict(model.named_buffers()))
    with pytest.raises(ValueError, match="shape"):
        model.set_input_stats(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        model.set_input_stats(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))


def test_every_preset_gets_gradients_everywhere():
    for preset in LADDER:
        model = EPIR(make_config(preset, dim=24, dim_head=8, depth=9, integration_blocks=4))
        logits = model(torch.randn(3, 3, 28, 28))
        logits.sum().backward()
        # DTSM's token selection and the merges must not cut any parameter off from the loss
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{preset}: no gradient for {missing}"


def test_info_command_prints_paper_figures():
    out = subprocess.run([sys.executable, "-m", "epir", "info", "--preset", "epir"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "7,025,384" in out and "7.03 M" in out
    js = json.loads(subprocess.run([sys.executable, "-m", "epir", "info", "--preset", "baseline", "--json",
                                    "--depth", "4"], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert js["preset"] == "baseline" and js["config"]["depth"] == 4 and js["macs"] * 2 == js["flops"]
    assert len(js["tokens_in"]) == 4
    bad = subprocess.run([sys.executable, "-m", "epir", "info", "--patch-size", "5"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not divisible" in bad.stderr
