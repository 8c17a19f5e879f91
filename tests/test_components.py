"""Behaviour of the paper's components: SPT shifts, ITALS, token integration, DTSM, L_con."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from epir.attention import Attention
from epir.dtsm import (
    SCORES,
    attention_rollout,
    gather_selected,
    rollout_through_merges,
    select_distinct,
    select_tokens,
    with_residual,
)
from epir.losses import contrastive_loss, epir_loss
from epir.merge import bipartite_soft_matching
from epir.model import EPIR
from epir.presets import make_config
from epir.tokenization import PatchTokenizer, diagonal_shifts, patchify

# --- shifted patch tokenization -------------------------------------------------------------

def test_diagonal_shifts_move_pixels_as_the_spt_reference():
    x = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)  # x[i, j] = 4i + j + 1
    out = diagonal_shifts(x, 1)
    assert out.shape == (1, 5, 4, 4)
    plain, lu, ru, lb, rb = out[0]
    assert torch.equal(plain, x[0, 0])
    # lu[i, j] = x[i-1, j-1], zero where that falls outside the image
    assert torch.equal(lu, torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11.]]))
    assert torch.equal(ru, torch.tensor([[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0.]]))
    assert torch.equal(lb, torch.tensor([[0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15], [0, 0, 0, 0.]]))
    assert torch.equal(rb, torch.tensor([[6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0], [0, 0, 0, 0.]]))


def test_shifts_are_per_channel_and_reject_bad_input():
    x = torch.randn(2, 3, 6, 6)
    out = diagonal_shifts(x, 2)
    assert out.shape == (2, 15, 6, 6)
    assert torch.equal(out[:, 3:6, 2:, 2:], x[:, :, :-2, :-2])  # lu group holds all 3 channels
    with pytest.raises(ValueError):
        diagonal_shifts(torch.randn(3, 6, 6), 1)


def test_patchify_row_major_patches():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5]  # top-left patch
    assert p[0, 1].tolist() == [2, 3, 6, 7]  # top-right patch
    assert p[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 1, 5, 4), 2)


def test_tokenizer_modes_differ_as_the_ladder_says():
    x = torch.randn(2, 3, 28, 28)
    lin, spt, dn = (PatchTokenizer(28, 7, 3, 32, m) for m in ("linear", "spt", "dnspt"))
    assert lin.proj.in_features == 7 * 7 * 3 and spt.proj.in_features == 7 * 7 * 15
    assert isinstance(spt.pre_norm, torch.nn.LayerNorm) and not isinstance(spt.post_norm, torch.nn.LayerNorm)
    t = dn(x)
    assert t.shape == (2, 16, 32)
    # the second LayerNorm of DNSPT normalises every token (eq. 3)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    assert spt.shift == 3
    with pytest.raises(ValueError):
        PatchTokenizer(28, 7, 3, 32, "conv")


# --- ITALS --------------------------------------------------------------------------------

def test_itals_masks_the_diagonal_and_learns_its_temperature():
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=2, dim_head=8, itals=True)
    assert attn.temperature.shape == (2,)
    torch.testing.assert_close(attn.temperature.detach(), torch.full((2,), math.sqrt(8)))
    x = torch.randn(3, 5, 16)
    out, a, keys = attn(x)
    assert out.shape == (3, 5, 16) and a.shape == (3, 2, 5, 5) and keys.shape == (3, 5, 8)
    assert torch.all(torch.diagonal(a, dim1=-2, dim2=-1) == 0)  # exactly zero, not just small
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 5))
    out.pow(2).sum().backward()
    assert attn.temperature.grad is not None and torch.all(attn.temperature.grad.abs() > 0)


def test_itals_divides_by_the_temperature():
    torch.manual_seed(0)
    attn = Attention(dim=8, heads=1, dim_head=8, itals=True, temperature=2.0)
    x = torch.randn(1, 4, 8)
    q, k, _ = attn.qkv(x).reshape(1, 4, 3, 1, 8).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) / 2.0
    logits = logits.masked_fill(torch.eye(4, dtype=torch.bool), -math.inf)
    torch.testing.assert_close(attn(x)[1], logits.softmax(-1))


def test_plain_attention_matches_torch_sdpa_and_itals_survives_one_token():
    torch.manual_seed(0)
    attn = Attention(dim=12, heads=3, dim_head=4, itals=False)
    x = torch.randn(2, 6, 12)
    out, a, _ = attn(x)
    q, k, v = attn.qkv(x).reshape(2, 6, 3, 3, 4).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 6, 12)
    torch.testing.assert_close(out, attn.proj(ref))
    assert torch.all(torch.diagonal(a, dim1=-2, dim2=-1) > 0)
    single = Attention(dim=12, heads=3, dim_head=4, itals=True)(torch.randn(2, 1, 12))
    assert torch.isfinite(single[0]).all() and torch.equal(single[1], torch.ones(2, 3, 1, 1))


# --- token integration ----------------------------------------------------------------------

def _reference_tome_merge(metric, x, k):
    """ToMe's tome/merge.py bipartite_soft_matching + merge(mode='mean'), written independently."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., k:, :].sort(dim=1)[0], edge_idx[..., :k, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - k, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, k, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, k, c), src, reduce="mean")
    return torch.cat([unm, dst], dim=1)


def test_merge_of_a_known_duplicate_pair_gives_their_average():
    n, d = 9, 16
    keys = torch.eye(n, d)[None].clone()  # orthogonal keys: no pair is similar ...
    keys[0, 4] = keys[0, 7] + 1e-3 * keys[0, 4]  # ... except tokens 4 (half A) and 7 (half B)
    keys[0, 0] = keys[0, 1]  # the class token's key equals token 1's, yet it must never merge
    x = torch.randn(1, n, 5)
    out = bipartite_soft_matching(keys, 1, class_token=True)(x)
    assert out.shape == (1, n - 1, 5)
    assert torch.equal(out[0, 0], x[0, 0])  # class token first and untouched
    # the pair is gone as two tokens and present once as its average
    merged = (x[0, 4] + x[0, 7]) / 2
    assert any(torch.allclose(row, merged) for row in out[0])
    assert not any(torch.allclose(row, x[0, 4]) or torch.allclose(row, x[0, 7]) for row in out[0])
    for i in (1, 2, 3, 5, 6, 8):  # every other token survives unchanged
        assert any(torch.equal(row, x[0, i]) for row in out[0])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_merge_equals_tome_reference(k):
    torch.manual_seed(k)
    metric, x = torch.randn(3, 17, 8), torch.randn(3, 17, 6)
    out = bipartite_soft_matching(metric, k)(x)
    assert out.shape == (3, 17 - k, 6)
    torch.testing.assert_close(out, _reference_tome_merge(metric, x, k))


def test_merge_clips_k_and_rejects_negative():
    x = torch.randn(1, 5, 3)
    assert bipartite_soft_matching(torch.randn(1, 5, 4), 10)(x).shape == (1, 3, 3)  # (5-1)//2 = 2 pairs
    assert torch.equal(bipartite_soft_matching(torch.randn(1, 5, 4), 0)(x), x)
    with pytest.raises(ValueError):
        bipartite_soft_matching(torch.randn(1, 5, 4), -1)


# --- DTSM ---------------------------------------------------------------------------------

def test_rollout_multiplies_later_blocks_on_the_left():
    torch.manual_seed(0)
    a1, a2, a3 = (torch.rand(2, 3, 4, 4).softmax(-1) for _ in range(3))
    torch.testing.assert_close(attention_rollout([a1, a2, a3]), a3 @ a2 @ a1)
    with pytest.raises(ValueError):
        attention_rollout([])


def test_dtsm_picks_the_per_head_argmax_of_the_class_row():
    rollout = torch.zeros(1, 3, 5, 5)
    rollout[0, 0, 0] = torch.tensor([9.0, 0.1, 0.7, 0.2, 0.0])  # class token itself is ignored
    rollout[0, 1, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5])
    rollout[0, 2, 0] = torch.tensor([0.0, 0.3, 0.1, 0.2, 0.1])
    rollout[0, :, 1:] = 5.0  # rows of other tokens must not matter
    idx = select_tokens(rollout)
    assert idx.tolist() == [[2, 4, 1]]
    x = torch.arange(5, dtype=torch.float32)[None, :, None].expand(1, 5, 2)
    assert gather_selected(x, idx)[0, :, 0].tolist() == [0.0, 2.0, 4.0, 1.0]


def test_the_sum_rule_picks_a_merged_token_that_the_mean_rule_does_not():
    # 4 input tokens (class token first); tokens 2 and 3 merge into one current token. The class token's
    # rollout weights: token 1 holds 0.40 alone, the merged token holds 0.25 + 0.25 = 0.50.
    a1 = torch.tensor([[0.10, 0.40, 0.25, 0.25]] + [[0.25] * 4] * 3)[None, None]  # (1, 1, 4, 4)
    merge = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.5, 0.5]])[None]  # (1, 3, 4)
    eye = torch.eye(3)[None, None]
    pick = {s: select_tokens(rollout_through_merges([(a1, merge), (eye, None)], score=s)).item() for s in SCORES}
    assert pick == {"sum": 2, "mean": 1}  # sum: the merged token (0.50 > 0.40); mean: token 1 (0.40 > 0.25)


def test_without_merges_every_rollout_reading_agrees():
    torch.manual_seed(0)
    steps = [(torch.rand(2, 3, 6, 6).softmax(-1), None) for _ in range(3)]
    for residual in (False, True):
        ref = attention_rollout([a for a, _ in steps], residual=residual)[:, :, 0]
        for s in SCORES:
            torch.testing.assert_close(rollout_through_merges(steps, score=s, residual=residual)[:, :, 0], ref)
    x = torch.randn(3, 3, 28, 28)
    for distinct in (False, True):  # a model that never merges: "all" and "extractor" pick the same tokens
        picks = []
        for rollout in ("all", "extractor"):
            torch.manual_seed(1)
            cfg = make_config("+dnspt", dim=24, dim_head=8, depth=4, dtsm_rollout=rollout, dtsm_distinct=distinct)
            picks.append(EPIR(cfg).eval().dtsm_picks(x)[0])
        assert torch.equal(*picks)


def test_the_residual_rollout_adds_half_the_identity_and_keeps_rows_stochastic():
    a = torch.rand(1, 2, 5, 5).softmax(-1) * (1 - torch.eye(5))  # ITALS: zero diagonal
    a = a / a.sum(-1, keepdim=True)
    r = with_residual(a)
    torch.testing.assert_close(r, 0.5 * a + 0.5 * torch.eye(5))
    torch.testing.assert_close(r.sum(-1), torch.ones(1, 2, 5))


def test_distinct_picks_never_repeat_a_token():
    torch.manual_seed(0)
    rollout = torch.zeros(64, 3, 6, 6)
    rollout[:, :, 0] = torch.rand(64, 1, 6).expand(64, 3, 6)  # every head ranks the tokens alike
    same = select_tokens(rollout)
    assert (same == same[:, :1]).all()  # TransFG's per-head argmax: one token three times
    idx = select_distinct(rollout)
    assert idx.shape == (64, 3) and all(len(set(row)) == 3 for row in idx.tolist()) and (idx >= 1).all()
    assert torch.equal(idx[:, 0], same[:, 0])  # the first head keeps its own best token
    x = torch.randn(8, 3, 28, 28)
    model = EPIR(make_config("epir", dim=24, dim_head=8, depth=7, integration_blocks=4, merge_k=2, dtsm_distinct=True))
    picks, held = model.eval().dtsm_picks(x)
    assert all(len(set(row)) == 3 for row in picks.tolist()) and held.shape == (8, 17 - 8)
    assert held.sum(-1).tolist() == [17] * 8  # every input token is held by exactly one current token
    with pytest.raises(ValueError, match="distinct"):
        select_distinct(rollout[:, :, :3, :3])  # 3 picks of 2 tokens


# --- loss ---------------------------------------------------------------------------------

def test_contrastive_loss_matches_a_hand_computation():
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    # normalised: e1, e1, e2, (e1+e2)/sqrt2 -> cosine matrix
    r = 1 / math.sqrt(2)
    s = [[1, 1, 0, r], [1, 1, 0, r], [0, 0, 1, r], [r, r, r, 1]]
    alpha = 0.4
    total = 0.0
    for i in range(4):
        for j in range(4):
            total += (1 - s[i][j]) if y[i] == y[j] else max(s[i][j] - alpha, 0.0)
    expected = total / 16
    torch.testing.assert_close(contrastive_loss(f, y, alpha), torch.tensor(expected))
    # a different margin changes only the negative pairs
    assert contrastive_loss(f, y, 0.9).item() < expected
    logits = torch.randn(4, 3)
    torch.testing.assert_close(epir_loss(logits, f, y, alpha), F.cross_entropy(logits, y) + expected)
    torch.testing.assert_close(epir_loss(logits, f, y, alpha, use_contrastive=False), F.cross_entropy(logits, y))
