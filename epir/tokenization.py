"""Patch tokenization: plain ViT patches, shifted patch tokenization (SPT) and dual-norm SPT (DNSPT).

Follows the SPT reference implementation (Lee, Lee & Song 2021, "Vision Transformer for Small-Size
Datasets", github aanna0701/SPT_LSA_ViT, models/SPT.py) and EPIR eq. (3), which adds a LayerNorm after
the projection. Class token and learnable position embedding are EPIR eq. (4).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Tokenizer = Literal["linear", "spt", "dnspt"]
TOKENIZERS = get_args(Tokenizer)


def diagonal_shifts(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Concatenate an image with its four diagonal shifts (SPT / DNSPT, EPIR eq. 3).

    Args:
        x: (B, C, H, W) input, e.g. optical flow [u, v, strain].
        shift: shift in pixels; the reference uses floor(patch_size / 2). Zero padding.

    Returns:
        (B, 5C, H, W): ``[x, lu, ru, lb, rb]`` in the reference order, where with s = shift
        ``lu[i, j] = x[i-s, j-s]``, ``ru[i, j] = x[i-s, j+s]``, ``lb[i, j] = x[i+s, j-s]``,
        ``rb[i, j] = x[i+s, j+s]`` and 0 outside the image.

    Raises:
        ValueError: if ``x`` is not 4-D or ``shift`` is negative.
    """
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if shift == 0:
        return torch.cat([x] * 5, dim=1)
    s2 = 2 * shift
    x_pad = F.pad(x, (shift, shift, shift, shift))  # (B, C, H+2s, W+2s)
    lu = x_pad[:, :, :-s2, :-s2]
    ru = x_pad[:, :, :-s2, s2:]
    lb = x_pad[:, :, s2:, :-s2]
    rb = x_pad[:, :, s2:, s2:]
    return torch.cat([x, lu, ru, lb, rb], dim=1)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split an image into non-overlapping flattened patches.

    Args:
        x: (B, C, H, W); H and W must be multiples of ``patch_size``.
        patch_size: patch side p in pixels.

    Returns:
        (B, (H/p)(W/p), p*p*C), patches in row-major order, each flattened as (p1, p2, C) like the
        einops pattern ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)`` of the reference.

    Raises:
        ValueError: if H or W is not a multiple of ``patch_size``.
    """
    b, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(b, c, gh, patch_size, gw, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p1, p2, C)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


class PatchTokenizer(nn.Module):
    """Image -> patch tokens, in one of three modes (the ablation ladder of EPIR Table 4).

    - ``linear``: plain ViT patch embedding, ``t = FC(P(x))``.
    - ``spt``: shifted patch tokenization, ``t = FC(LN(P([x, shifts])))`` (SPT reference).
    - ``dnspt``: dual-norm SPT, ``t = LN(FC(LN(P([x, shifts]))))`` (EPIR eq. 3).

    Args:
        img_size: input side H = W in pixels.
        patch_size: patch side p; the shift is floor(p / 2) as in the SPT reference.
        in_chans: input channels C (3 for [u, v, strain]).
        dim: token width D.
        mode: one of ``TOKENIZERS``.

    Shapes: forward takes (B, C, H, W) and returns (B, (H/p)^2, D).

    Raises:
        ValueError: for an unknown mode or an image size not divisible by the patch size.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, mode: str = "dnspt"):
        super().__init__()
        if mode not in TOKENIZERS:
            raise ValueError(f"tokenizer mode must be one of {TOKENIZERS}, got {mode!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.mode = mode
        self.patch_size = patch_size
        self.shift = patch_size // 2
        self.num_patches = (img_size // patch_size) ** 2
        shifted = mode != "linear"
        patch_dim = patch_size * patch_size * in_chans * (5 if shifted else 1)
        self.pre_norm = nn.LayerNorm(patch_dim) if shifted else nn.Identity()
        self.proj = nn.Linear(patch_dim, dim)
        self.post_norm = nn.LayerNorm(dim) if mode == "dnspt" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "linear":
            x = diagonal_shifts(x, self.shift)  # (B, 5C, H, W)
        x = patchify(x, self.patch_size)  # (B, N, p*p*C')
        return self.post_norm(self.proj(self.pre_norm(x)))  # (B, N, D)
