"""Token integration: merge the K most similar token pairs (EPIR eqs. 5-9).

Follows ToMe's bipartite soft matching (Bolya et al., ICLR 2023, github facebookresearch/ToMe,
tome/merge.py ``bipartite_soft_matching``): the tokens are split alternately into two halves A and B,
each token of A is matched to its most similar token of B by cosine similarity of the attention keys
(averaged over heads), the K best-matched pairs are averaged into their B token, the class token is
never merged. EPIR describes a plain average; ToMe's size tracking and proportional attention are
not used. The merge is applied as a product with an averaging matrix (see below).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_identity.matrix = None


def bipartite_soft_matching(metric: torch.Tensor, k: int, class_token: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plan the K merges of one integration block; return a function that applies them.

    Args:
        metric: (B, N, d) similarity features, the attention keys averaged over heads.
        k: number of pairs to merge (EPIR's K); clipped to floor((N - protected) / 2).
        class_token: if True, token 0 is the class token and is never merged.

    Returns:
        ``merge(x)`` mapping (B, N, C) to (B, N - K, C): the unmerged tokens of half A (even
        positions) in their original order, the class token first, then the tokens of half B (odd
        positions), each the mean of itself and the A tokens merged into it. ``merge.matrix`` is the
        (B, N - K, N) averaging matrix it applies (None when nothing is merged); DTSM's rollout
        through the merges uses it.

    Raises:
        ValueError: if ``k`` is negative or ``metric`` is not 3-D.
    """
    if k < 0:
        raise ValueError(f"merge count k must be >= 0, got {k}")
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, d), got shape {tuple(metric.shape)}")
    protected = 1 if class_token else 0
    n = metric.shape[1]
    k = min(k, (n - protected) // 2)
    if k <= 0:
        return _identity

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]  # (B, Na, d), (B, Nb, d)
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) cosine similarity, eq. (6)
        if class_token:  # the class token (A's first) is never merged
            scores = scores.masked_fill(torch.arange(scores.shape[-2], device=scores.device)[:, None] == 0, -math.inf)
        node_max, node_idx = scores.max(dim=-1)  # best B partner of each A token, (B, Na)
        edge_idx = node_max.argsort(dim=-1, descending=True)  # A tokens, best-matched first, (B, Na)
        unm_idx = edge_idx[:, k:].sort(dim=1)[0]  # A tokens kept, original order, (B, Na-K)
        src_idx = edge_idx[:, :k]  # A tokens merged, (B, K), eq. (7)
        dst_idx = node_idx.gather(dim=1, index=src_idx)  # their B partners, (B, K)

        # The merge as a row-normalised averaging matrix (B, N-K, N): the same result as ToMe's
        # gather + scatter_reduce("mean"), but one batched matmul forward and backward, which is
        # several times faster on CPU for these small token counts. Built out of place (one-hot
        # rows and a product), so that it runs under torch.func.vmap and torch.compile.
        nb = b.shape[1]
        one_hot = torch.nn.functional.one_hot
        kept = one_hot(2 * unm_idx, n).to(metric.dtype)  # (B, Na-K, N): kept A tokens
        b_rows = one_hot(2 * torch.arange(nb, device=metric.device) + 1, n).to(metric.dtype)  # (Nb, N): every B token
        joined = one_hot(dst_idx, nb).to(metric.dtype).transpose(-1, -2) @ one_hot(2 * src_idx, n).to(metric.dtype)
        avg = torch.cat([kept, b_rows.expand(kept.shape[0], -1, -1) + joined], dim=1)  # (B, N-K, N)
        avg = avg / avg.sum(dim=-1, keepdim=True)  # plain average, eq. (8)

    def merge(x: torch.Tensor) -> torch.Tensor:
        return avg.to(x.dtype) @ x  # (B, N-K, C), eq. (9)

    merge.matrix = avg
    return merge
