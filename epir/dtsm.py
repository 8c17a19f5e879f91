"""Dynamic token selection (DTSM, EPIR eqs. 17-20): attention rollout, one token per head.

Follows TransFG's part selection (He et al., AAAI 2022, github TACJu/TransFG, models/modeling.py
``Part_Attention``): the rollout is the product of the blocks' attention matrices, per head and with
no identity term, ``R = A_L-1 @ ... @ A_1``; the class-token row of R ranks the other tokens, and
each head contributes its top-ranked token.

Token integration changes the token count between integration blocks, so a product of attention
matrices cannot cross a merge while staying indexed by the current tokens. Two readings
(``EPIRConfig.dtsm_rollout``):

- ``all`` (EPIR eq. 19, the default): roll out over every block before the last, THROUGH the merges:
  ``R = A_L-1 ... A_k+1 M_k A_k ... M_1 A_1`` with ``M_k`` the (N_k+1 x N_k) averaging matrix of block
  k's merge (:func:`rollout_through_merges`). R's class-token row weighs the INPUT tokens; a current
  token scores the sum of the weights of the input tokens merged into it (its column of the
  cumulative merge, made 0/1).
- ``extractor``: roll out over the trailing run of blocks that all see the current tokens (the
  discriminative-token-extractor blocks in the ``epir`` preset; every block before the last without
  merging, where both readings agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def attention_rollout(attns: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multiply attention maps, later blocks on the left (TransFG ``Part_Attention``).

    Args:
        attns: attention probabilities of consecutive blocks, first block first, each (B, H, N, N).

    Returns:
        (B, H, N, N) per-head rollout ``attns[-1] @ ... @ attns[0]``.

    Raises:
        ValueError: if ``attns`` is empty or the maps differ in shape.
    """
    if len(attns) == 0:
        raise ValueError("attention rollout needs at least one attention map")
    rollout = attns[0]
    for a in attns[1:]:
        if a.shape != rollout.shape:
            raise ValueError(f"attention maps differ in shape: {tuple(a.shape)} vs {tuple(rollout.shape)}")
        rollout = a @ rollout
    return rollout


def rollout_through_merges(steps: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Class-token rollout over blocks that may merge tokens, scored on the CURRENT tokens (eq. 19, ``all``).

    Args:
        steps: per block, first block first: its attention (B, H, N_k, N_k) and its merge matrix
            (B, N_k+1, N_k) or None (no merge), as :func:`epir.merge.bipartite_soft_matching` builds it.

    Returns:
        (B, H, N, N) with row 0 the class token's score of each current token (the rollout's weight of
        the input tokens each one holds); other rows zero. Feed it to :func:`select_tokens`.

    Raises:
        ValueError: if ``steps`` is empty or the shapes do not chain.
    """
    if len(steps) == 0:
        raise ValueError("attention rollout needs at least one attention map")
    attn0 = steps[0][0]
    b, h, n0, _ = attn0.shape
    eye = torch.eye(n0, device=attn0.device, dtype=attn0.dtype)
    rollout = eye.expand(b, h, n0, n0)  # (B, H, N_cur, N_0)
    member = eye.expand(b, n0, n0)  # (B, N_cur, N_0): which input tokens each current token holds
    for attn, merge in steps:
        if attn.shape[-1] != rollout.shape[-2]:
            raise ValueError(f"attention over {attn.shape[-1]} tokens after a rollout over {rollout.shape[-2]}")
        rollout = attn @ rollout
        if merge is not None:
            rollout = merge[:, None] @ rollout
            member = merge @ member
    held = (member > 0).to(rollout.dtype)  # (B, N, N_0)
    scores = rollout[:, :, 0] @ held.transpose(-1, -2)  # (B, H, N)
    out = torch.zeros(b, h, held.shape[1], held.shape[1], device=scores.device, dtype=scores.dtype)
    out[:, :, 0] = scores
    return out


def select_tokens(rollout: torch.Tensor) -> torch.Tensor:
    """Pick, for each head, the token the class token attends to most (EPIR eq. 19).

    Args:
        rollout: (B, H, N, N) rollout; token 0 is the class token.

    Returns:
        (B, H) long indices into the N tokens, each in 1..N-1 (the class token is never picked).

    Raises:
        ValueError: if there is no token besides the class token.
    """
    if rollout.shape[-1] < 2:
        raise ValueError("DTSM needs at least one token besides the class token")
    return rollout[:, :, 0, 1:].argmax(dim=-1) + 1


def gather_selected(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Build the last block's input ``[class token; selected tokens]`` (EPIR eq. 20).

    Args:
        x: (B, N, D) tokens, class token first.
        idx: (B, H) indices from :func:`select_tokens`.

    Returns:
        (B, 1 + H, D). Two heads may pick the same token; it then appears twice, as in TransFG.
    """
    parts = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, H, D)
    return torch.cat([x[:, :1], parts], dim=1)
