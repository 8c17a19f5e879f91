"""Multi-head self-attention, plain or ITALS (inter-token attention with learnable scaling).

ITALS is EPIR eqs. (10)-(12): the diagonal of the query-key similarity matrix is masked before the
softmax, so that a token cannot attend to itself, and the logits are divided by a learnable
temperature per head. It matches Locality Self-Attention of the SPT reference (github
aanna0701/SPT_LSA_ViT, models/vit.py), whose learnable per-head scale starts at dim_head**-0.5, i.e.
a temperature of sqrt(dim_head).

Two parametrisations of the same learnable temperature (one parameter per head either way):
- ``temperature`` (the paper's wording): logits / tau with tau the parameter. Adam moves a parameter by
  about the learning rate per step, so at lr 5e-5 tau = 9.2 can move by ~0.03 in a whole run: the
  temperature hardly learns.
- ``log_scale``: logits * exp(s) with s the parameter, s = -log(tau) at the start. A step of Adam then
  changes the temperature by a RELATIVE amount (~lr), as for any other weight of the network.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

ItalsParam = Literal["temperature", "log_scale"]
ITALS_PARAMS = get_args(ItalsParam)


class Attention(nn.Module):
    """Multi-head self-attention that also returns what token merging and DTSM need.

    Args:
        dim: token width D.
        heads: number of heads H.
        dim_head: width per head d (the inner width is H * d, projected back to D).
        itals: if True, mask the diagonal and learn one temperature per head (EPIR eqs. 10-12).
        temperature: initial ITALS temperature tau (logits are divided by it); None gives sqrt(d),
            which makes the first forward pass equal to standard scaled dot-product attention.
            Ignored when ``itals`` is False (scale fixed at d**-0.5).
        param: how the temperature is learnt: ``temperature`` (parameter ``temperature`` = tau) or
            ``log_scale`` (parameter ``log_scale`` = -log tau); see the module docstring.

    Shapes: forward takes x (B, N, D) and returns
        out (B, N, D), attn (B, H, N, N) softmax probabilities (rows sum to 1),
        keys (B, N, d): the keys averaged over heads, the similarity metric of ToMe.

    Raises:
        ValueError: if ``temperature`` is not positive or ``param`` is unknown.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, itals: bool = False, temperature: float | None = None,
                 param: str = "temperature"):
        super().__init__()
        if param not in ITALS_PARAMS:
            raise ValueError(f"ITALS parametrisation must be one of {ITALS_PARAMS}, got {param!r}")
        self.heads = heads
        self.dim_head = dim_head
        self.itals = itals
        self.param = param
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)
        self.register_parameter("temperature", None)
        self.register_parameter("log_scale", None)
        if itals:
            tau = math.sqrt(dim_head) if temperature is None else float(temperature)
            if tau <= 0:
                raise ValueError(f"ITALS temperature must be > 0, got {tau}")
            if param == "temperature":
                self.temperature = nn.Parameter(torch.full((heads,), tau))  # (H,)
            else:
                self.log_scale = nn.Parameter(torch.full((heads,), -math.log(tau)))  # (H,)
        else:
            self.scale = dim_head**-0.5

    def effective_temperature(self) -> torch.Tensor:
        """(H,) the temperature the logits are divided by now (sqrt(d) for plain attention)."""
        if not self.itals:
            return torch.full((self.heads,), 1 / self.scale)
        return self.temperature.detach() if self.param == "temperature" else (-self.log_scale.detach()).exp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d); unbind's backward is one stack, not 3 zero-fills
        logits = q @ k.transpose(-2, -1)  # (B, H, N, N)
        if self.itals:
            if self.param == "temperature":
                logits = logits / self.temperature.view(1, -1, 1, 1)
            else:
                logits = logits * self.log_scale.exp().view(1, -1, 1, 1)
            # A large finite negative, not -inf: a single remaining token then attends to itself
            # instead of producing NaN (as the SPT reference does with -987654321).
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            logits = logits.masked_fill(eye, torch.finfo(logits.dtype).min)
        else:
            logits = logits * self.scale
        attn = logits.softmax(dim=-1)  # (B, H, N, N)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, N, H*d)
        return self.proj(out), attn, k.mean(dim=1)
