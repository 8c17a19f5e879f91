"""EPIR's training loss: cross-entropy + margin contrastive loss on class tokens (eqs. 22-23).

The contrastive term follows TransFG's ``con_loss`` (github TACJu/TransFG, train.py): cosine
similarity of L2-normalised class tokens, pulled to 1 for same-label pairs, pushed below the margin
alpha for different-label pairs, normalised by B^2, weight 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, alpha: float = 0.4,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Margin contrastive loss, EPIR eq. (23).

    ``L_con = 1/B^2 [ sum_{y_i = y_j} (1 - s_ij) + sum_{y_i != y_j} max(s_ij - alpha, 0) ]``
    with ``s_ij`` the dot product of the L2-normalised features (pairs i = j included, as in TransFG).

    Args:
        features: (B, D) final class tokens.
        labels: (B,) integer class labels.
        alpha: margin in [-1, 1]; TransFG uses 0.4.
        mask: (B,) bool, the valid samples of a padded batch (:mod:`epir.pack`): only pairs of valid samples
            count and B is their number; None = all.

    Returns:
        Scalar tensor (dimensionless, >= 0); 0 for a batch without valid samples.

    Raises:
        ValueError: if the batch sizes of ``features`` and ``labels`` differ.
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    z = F.normalize(features, dim=-1)
    s = z @ z.t()  # (B, B)
    same = labels[:, None] == labels[None, :]
    pos = torch.where(same, 1.0 - s, torch.zeros_like(s))
    neg = torch.where(same, torch.zeros_like(s), (s - alpha).clamp(min=0))
    if mask is None:
        b = features.shape[0]
        return (pos.sum() + neg.sum()) / (b * b)
    pair = (mask[:, None] & mask[None, :]).to(s.dtype)  # (B, B)
    b = mask.to(s.dtype).sum()
    return ((pos + neg) * pair).sum() / (b * b).clamp_min(1.0)


def epir_loss(
    logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, alpha: float = 0.4, use_contrastive: bool = True,
    targets: torch.Tensor | None = None, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Total loss, EPIR eq. (22): ``L = CE(logits, y) + L_con(features, y)``.

    Args:
        logits: (B, C) class scores before softmax.
        features: (B, D) final class tokens.
        labels: (B,) integer labels in 0..C-1 (the contrastive term's; the cross-entropy's unless ``targets``).
        alpha: contrastive margin.
        use_contrastive: False gives plain cross-entropy (the ``baseline`` preset).
        targets: (B, C) class probabilities for the cross-entropy instead of ``labels`` (mixup).
        class_weights: (C,) cross-entropy weight of each class (``torch.nn.functional.cross_entropy``'s
            ``weight``), e.g. inverse class frequencies; None = equal.
        label_smoothing: cross-entropy label smoothing in [0, 1) (Szegedy et al. 2016; PyTorch's).
        mask: (B,) bool, the valid samples of a padded batch (:mod:`epir.pack`): the loss is the one of the
            valid samples alone, normalised as PyTorch's ``mean`` normalises them (by their count, or by the
            sum of their class weights for integer targets); None = all samples.

    Returns:
        Scalar tensor (0 for a batch without valid samples).
    """
    target = labels if targets is None else targets
    if mask is None:
        loss = F.cross_entropy(logits, target, weight=class_weights, label_smoothing=label_smoothing)
    else:
        per = F.cross_entropy(logits, target, weight=class_weights, label_smoothing=label_smoothing, reduction="none")
        valid = mask.to(per.dtype)
        if class_weights is not None and targets is None:  # PyTorch divides by the targets' weights
            norm = (class_weights.to(per.dtype)[labels] * valid).sum()
        else:
            norm = valid.sum()
        loss = (per * valid).sum() / norm.clamp_min(torch.finfo(per.dtype).tiny)
    if use_contrastive:
        loss = loss + contrastive_loss(features, labels, alpha, mask)
    return loss
