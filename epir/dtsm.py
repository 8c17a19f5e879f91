"""Dynamic token selection (DTSM, EPIR eqs. 17-20): attention rollout, then tokens for the last block.

Follows TransFG's part selection (He et al., AAAI 2022, github TACJu/TransFG, models/modeling.py
``Part_Attention``): the rollout is the product of the blocks' attention matrices, per head,
``R = A_L-1 @ ... @ A_1``; the class-token row of R ranks the other tokens, and each head contributes
its top-ranked token. Where the paper is silent, four readings are ``EPIRConfig`` fields:

- ``dtsm_rollout``: over which blocks. ``all`` (eq. 19, the default) rolls out over every block before
  the last, THROUGH the merges of token integration: ``R = A_L-1 ... A_k+1 M_k A_k ... M_1 A_1`` with
  ``M_k`` the (N_k+1 x N_k) averaging matrix of block k's merge (:func:`rollout_through_merges`); R's
  class-token row then weighs the INPUT tokens. ``extractor`` rolls out over the trailing run of blocks
  that all see the current tokens (:func:`attention_rollout`; the blocks after the last merge).
- ``dtsm_score`` (``all`` only): how a current token that holds several input tokens scores. ``sum``
  (the earlier reading) adds their weights: a merged token of m inputs gets about m times the weight of
  an unmerged one and wins nearly always. ``mean`` (the default) averages them: size-neutral, so a
  merged token is picked for what it attends to, not for how many tokens it absorbed. Without merges
  every token holds one input and the two agree.
- ``dtsm_residual``: the residual-aware rollout of Abnar & Zuidema (ACL 2020, "Quantifying Attention
  Flow in Transformers"): every block's attention becomes ``0.5 A + 0.5 I`` (rows renormalised) before
  the product, for the part of each token that its residual connection keeps. TransFG omits it, but its
  attention has a diagonal; ITALS masks the diagonal, and without the identity term the rollout drops
  what a token keeps of itself.
- ``dtsm_distinct``: the last block sees ``1 + k`` DIFFERENT tokens (k = heads): head h (in turn, round
  robin) takes its best-ranked token not yet picked (:func:`select_distinct`). EPIR's text says the
  last block sees the class token and "those 3 tokens"; TransFG's per-head argmax lets two heads pick
  the same token, which then appears twice (``False``: :func:`select_tokens`).

Every function here is out-of-place (no indexed assignment), so it runs under ``torch.func.vmap`` and
``torch.compile`` as well as eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

Score = Literal["sum", "mean"]
SCORES = get_args(Score)


def with_residual(attn: torch.Tensor) -> torch.Tensor:
    """``0.5 A + 0.5 I`` with rows renormalised (Abnar & Zuidema 2020). Shapes: (B, H, N, N) -> same."""
    eye = torch.eye(attn.shape[-1], device=attn.device, dtype=attn.dtype)
    aug = 0.5 * attn + 0.5 * eye
    return aug / aug.sum(dim=-1, keepdim=True)


def attention_rollout(attns: Sequence[torch.Tensor], residual: bool = False) -> torch.Tensor:
    """Multiply attention maps, later blocks on the left (TransFG ``Part_Attention``).

    Args:
        attns: attention probabilities of consecutive blocks, first block first, each (B, H, N, N).
        residual: use ``0.5 A + 0.5 I`` for every map (:func:`with_residual`).

    Returns:
        (B, H, N, N) per-head rollout ``attns[-1] @ ... @ attns[0]``.

    Raises:
        ValueError: if ``attns`` is empty or the maps differ in shape.
    """
    if len(attns) == 0:
        raise ValueError("attention rollout needs at least one attention map")
    prep = with_residual if residual else (lambda a: a)
    rollout = prep(attns[0])
    for a in attns[1:]:
        if a.shape != rollout.shape:
            raise ValueError(f"attention maps differ in shape: {tuple(a.shape)} vs {tuple(rollout.shape)}")
        rollout = prep(a) @ rollout
    return rollout


def rollout_through_merges(steps: Sequence[tuple[torch.Tensor, torch.Tensor | None]], score: str = "sum",
                           residual: bool = False) -> torch.Tensor:
    """Class-token rollout over blocks that may merge tokens, scored on the CURRENT tokens (eq. 19, ``all``).

    Args:
        steps: per block, first block first: its attention (B, H, N_k, N_k) and its merge matrix
            (B, N_k+1, N_k) or None (no merge), as :func:`epir.merge.bipartite_soft_matching` builds it.
        score: ``sum`` or ``mean`` of the rollout weights of the input tokens a current token holds.
        residual: use ``0.5 A + 0.5 I`` for every attention map (:func:`with_residual`).

    Returns:
        (B, H, N, N) with row 0 the class token's score of each current token; other rows zero. Feed it to
        :func:`select_tokens` or :func:`select_distinct`.

    Raises:
        ValueError: if ``steps`` is empty, the shapes do not chain, or ``score`` is unknown.
    """
    if len(steps) == 0:
        raise ValueError("attention rollout needs at least one attention map")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    attn0 = steps[0][0]
    b, h, n0, _ = attn0.shape
    eye = torch.eye(n0, device=attn0.device, dtype=attn0.dtype)
    rollout = eye.expand(b, h, n0, n0)  # (B, H, N_cur, N_0)
    member = eye.expand(b, n0, n0)  # (B, N_cur, N_0): which input tokens each current token holds
    for attn, merge in steps:
        if attn.shape[-1] != rollout.shape[-2]:
            raise ValueError(f"attention over {attn.shape[-1]} tokens after a rollout over {rollout.shape[-2]}")
        rollout = (with_residual(attn) if residual else attn) @ rollout
        if merge is not None:
            rollout = merge[:, None] @ rollout
            member = merge @ member
    held = (member > 0).to(rollout.dtype)  # (B, N, N_0)
    scores = rollout[:, :, 0] @ held.transpose(-1, -2)  # (B, H, N): the sum over the inputs each token holds
    if score == "mean":
        scores = scores / held.sum(dim=-1)[:, None]  # (B, H, N): their mean
    n = held.shape[1]
    rest = scores.new_zeros(b, h, n - 1, n)
    return torch.cat([scores[:, :, None], rest], dim=2)  # (B, H, N, N)


def select_tokens(rollout: torch.Tensor) -> torch.Tensor:
    """Pick, for each head, the token the class token attends to most (EPIR eq. 19, TransFG).

    Args:
        rollout: (B, H, N, N) rollout; token 0 is the class token.

    Returns:
        (B, H) long indices into the N tokens, each in 1..N-1 (the class token is never picked); two heads
        may pick the same token.

    Raises:
        ValueError: if there is no token besides the class token.
    """
    if rollout.shape[-1] < 2:
        raise ValueError("DTSM needs at least one token besides the class token")
    return rollout[:, :, 0, 1:].argmax(dim=-1) + 1


def select_distinct(rollout: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Pick ``k`` DIFFERENT tokens: in turn, head ``j mod H`` takes its best-ranked token not yet picked.

    With ``k = H`` every head contributes one token, as :func:`select_tokens`, but never one an earlier
    head took (the last block then sees ``1 + k`` different tokens; EPIR Sec. 3, "those 3 tokens").

    Args:
        rollout: (B, H, N, N) rollout; token 0 is the class token.
        k: tokens to pick (default H).

    Returns:
        (B, k) long indices in 1..N-1, distinct within each sample.

    Raises:
        ValueError: if fewer than ``k`` tokens besides the class token exist.
    """
    b, h, n, _ = rollout.shape
    k = h if k is None else k
    if k > n - 1:
        raise ValueError(f"DTSM cannot pick {k} distinct tokens of {n - 1} (class token excluded)")
    scores = rollout[:, :, 0, 1:]  # (B, H, N-1)
    taken = torch.zeros_like(scores[:, 0], dtype=torch.bool)  # (B, N-1)
    picks = []
    for j in range(k):
        s = scores[:, j % h].masked_fill(taken, float("-inf"))  # (B, N-1)
        p = s.argmax(dim=-1)  # (B,)
        taken = taken | torch.nn.functional.one_hot(p, n - 1).bool()
        picks.append(p + 1)
    return torch.stack(picks, dim=1)  # (B, k)


def gather_selected(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Build the last block's input ``[class token; selected tokens]`` (EPIR eq. 20).

    Args:
        x: (B, N, D) tokens, class token first.
        idx: (B, k) indices from :func:`select_tokens` or :func:`select_distinct`.

    Returns:
        (B, 1 + k, D). With :func:`select_tokens` two heads may pick the same token; it then appears twice,
        as in TransFG.
    """
    parts = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, k, D)
    return torch.cat([x[:, :1], parts], dim=1)
