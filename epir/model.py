"""The EPIR model (EPIR Sec. 3); the presets of the paper's ablation ladder live in :mod:`epir.presets`.

Layout in the style of timm's ``vision_transformer.py``: a patch tokenizer, a class token and a
learnable position embedding, a stack of pre-norm Transformer blocks, a final LayerNorm and a linear
head on the class token.

- Blocks 0 .. integration_blocks-1 are token-integration blocks: each merges K token pairs between
  attention and MLP (EPIR eqs. 5-9, :mod:`epir.merge`).
- With ITALS on, every block's attention masks its diagonal and learns a temperature per head
  (:mod:`epir.attention`). Putting it in all 13 blocks, as SPT's LSA-ViT does, is what reproduces the
  paper's 7.03 M parameters (7,025,384 = 7,025,345 + 13 blocks x 3 heads).
- With DTSM on, the last block sees only the class token and one token per head, picked by attention
  rollout (EPIR eqs. 17-20, :mod:`epir.dtsm`).

Choices that change behaviour are config fields. Where the paper is silent the defaults keep this
library's earlier behaviour, so the ladder runs as it did (the ``cpu`` profile may choose otherwise):
``init`` (ViT's trunc_normal(0.02) or the SPT reference's randn / xavier_normal), ``itals_param`` (how
the temperature is learnt) and ``drop_path`` (stochastic depth, off in the paper). Where the paper
speaks, the default follows it: ``dtsm_rollout="all"`` rolls out over every block before the last,
through the merges, as eq. 19 writes (the earlier ``extractor`` reading remains an option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import nn

from .attention import Attention, ItalsParam
from .dtsm import Score, attention_rollout, gather_selected, rollout_through_merges, select_distinct, select_tokens
from .fields import literal_problems
from .inputs import FLOW_CHANNELS, InputConvention
from .merge import bipartite_soft_matching
from .tokenization import PatchTokenizer, Tokenizer

Init = Literal["trunc_normal", "spt"]
Rollout = Literal["extractor", "all"]
INITS, ROLLOUTS = get_args(Init), get_args(Rollout)


@dataclass(frozen=True)
class EPIRConfig:
    """Every architectural choice of the model. Defaults are the paper configuration (PAPER.md).

    Attributes:
        img_size: input side H = W in pixels (28, as STSTNet/HTNet flows).
        in_chans: input channels, the first ``in_chans`` of [u, v, optical strain] (3).
        patch_size: patch side p in pixels (7 -> 16 patches).
        num_classes: number of emotion classes C.
        dim: token width D.
        depth: total number of Transformer blocks (13 in the paper; Fig. 5 varies it).
        heads: attention heads H (3; DTSM keeps one token per head).
        dim_head: width per head d.
        mlp_ratio: MLP hidden width / D.
        tokenizer: ``linear`` (plain ViT), ``spt`` or ``dnspt``.
        itals: diagonal-masked attention with a learnable temperature per head.
        temperature: initial ITALS temperature; None = sqrt(dim_head).
        dtsm: dynamic token selection before the last block.
        integration_blocks: how many leading blocks merge tokens (6 in the paper).
        merge_k: K, token pairs merged per integration block (0 disables token integration;
            Fig. 6 varies the share of tokens merged, ``integration_blocks * merge_k / patches``).
        contrastive: add the margin contrastive loss (eq. 23) to cross-entropy.
        alpha: contrastive margin.
        init: ``trunc_normal`` (timm's ViT: position embedding, class token and linear weights
            trunc_normal(0.02)) or ``spt`` (the SPT reference, aanna0701/SPT_LSA_ViT models/vit.py:
            position embedding and class token randn, i.e. of the tokens' own scale after DNSPT's
            LayerNorm, linear weights xavier_normal).
        itals_param: ``temperature`` (logits / tau, tau learnt) or ``log_scale`` (logits * exp(s), s learnt;
            moves the temperature in relative steps): :mod:`epir.attention`. Same parameter count.
        dtsm_rollout: ``extractor`` (rollout over the blocks after the last merge) or ``all`` (eq. 19:
            every block before the last, through the merges): :mod:`epir.dtsm`.
        dtsm_score: with ``dtsm_rollout="all"``, a merged token's score from the rollout weights of the
            input tokens it holds: ``sum`` or ``mean`` (size-neutral): :mod:`epir.dtsm`.
        dtsm_residual: roll out ``0.5 A + 0.5 I`` per block (Abnar & Zuidema 2020; the residual path that
            ITALS's masked diagonal leaves out of A): :mod:`epir.dtsm`.
        dtsm_distinct: the last block sees ``heads`` DIFFERENT tokens (each head in turn takes its best
            token not yet taken) instead of each head's argmax, repeats allowed (TransFG).
        drop_path: stochastic depth, the largest rate (the last block's); block i drops its residual
            branches with rate ``drop_path * i / (depth - 1)`` per sample in training, as timm's ViT.
    """

    family: ClassVar[str] = "epir"
    img_size: int = 28
    in_chans: int = 3
    patch_size: int = 7
    num_classes: int = 3
    dim: int = 256
    depth: int = 13
    heads: int = 3
    dim_head: int = 85
    mlp_ratio: float = 2.0
    tokenizer: Tokenizer = "dnspt"
    itals: bool = True
    temperature: float | None = None
    dtsm: bool = True
    integration_blocks: int = 6
    merge_k: int = 1
    contrastive: bool = True
    alpha: float = 0.4
    init: Init = "trunc_normal"
    itals_param: ItalsParam = "temperature"
    dtsm_rollout: Rollout = "all"
    drop_path: float = 0.0
    dtsm_score: Score = "mean"
    dtsm_residual: bool = False
    dtsm_distinct: bool = True

    def __post_init__(self):
        problems = literal_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must lie in [0, 1), got {self.drop_path}")
        for name in ("img_size", "in_chans", "patch_size", "num_classes", "dim", "depth", "heads", "dim_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.in_chans > len(FLOW_CHANNELS):
            raise ValueError(f"in_chans must be at most {len(FLOW_CHANNELS)} ({', '.join(FLOW_CHANNELS)}), got {self.in_chans}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.merge_k < 0 or self.integration_blocks < 0:
            raise ValueError("merge_k and integration_blocks must be >= 0")
        if self.dtsm and self.depth < 2:
            raise ValueError("DTSM needs depth >= 2 (rollout blocks + the last block)")
        if self.merge_k > 0:
            # DTSM (either rollout) needs a block between the last merge and the last block: the
            # selected tokens must be indexed by the tokens the last block receives.
            limit = self.depth - 2 if self.dtsm else self.depth
            if self.integration_blocks > limit:
                raise ValueError(
                    f"integration_blocks={self.integration_blocks} leaves no non-merging block before the last "
                    f"block for DTSM's rollout; use at most {limit} with depth {self.depth}"
                )
        if self.dtsm and self.dtsm_distinct and self.heads > self.tokens_per_block[-1] - 1:
            raise ValueError(f"dtsm_distinct: {self.heads} distinct tokens for {self.heads} heads, but only "
                             f"{self.tokens_per_block[-1] - 1} tokens besides the class token remain before the last block")

    @property
    def input_convention(self) -> InputConvention:
        """[u, v, strain][:in_chans] on the data's own scale and range (EPIR trains from scratch on them)."""
        return InputConvention(FLOW_CHANNELS[: self.in_chans], None, 1.0)

    @property
    def tokens_per_block(self) -> list[int]:
        """Tokens (class token included) each block receives, first block first, DTSM's cut excluded: merges
        clip K to floor((N - 1) / 2) as :func:`epir.merge.bipartite_soft_matching` does."""
        n, out = self.num_patches + 1, []
        for i in range(self.depth):
            out.append(n)
            if i < self.integration_blocks:
                n -= min(self.merge_k, (n - 1) // 2)
        return out

    @property
    def num_patches(self) -> int:
        """Patch tokens per sample, (img_size / patch_size)^2, class token not counted."""
        return (self.img_size // self.patch_size) ** 2


class Mlp(nn.Module):
    """Linear -> GELU -> Linear. Shapes: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``layers/drop.py`` ``drop_path``): in training, zero a sample's
    residual branch with probability ``p`` and scale the kept ones by 1 / (1 - p); identity in eval.
    Shapes: (B, ...) -> (B, ...).

    ``forward(x, scale)`` takes the per-sample factors (B,) (0 or 1 / (1 - p)) drawn by the caller, so that
    the trainer draws them from a fold's own generator (:func:`epir.train.augment`); without ``scale`` it
    draws them from torch's global generator, as timm does.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if scale is None:
            keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
            return x * keep / (1 - self.p)
        return x * scale.to(x.dtype).view((x.shape[0],) + (1,) * (x.dim() - 1))


class Block(nn.Module):
    """Pre-norm Transformer block, optionally merging K token pairs between attention and MLP.

    The merge sits after the attention residual, as in ToMe's ``ToMeBlock`` and EPIR Fig. 2.

    Args:
        dim, heads, dim_head, mlp_ratio: widths (see :class:`EPIRConfig`).
        itals, temperature, itals_param: attention variant (see :class:`epir.attention.Attention`).
        merge_k: token pairs merged in this block (0: none).
        drop_path: stochastic-depth rate of this block's two residual branches.

    Shapes: forward takes (B, N, D) and optionally the stochastic-depth factors (B, 2) of its two residual
    branches (:class:`DropPath`), and returns tokens (B, N - K, D), the attention probabilities (B, H, N, N)
    computed on the input tokens, and the merge's averaging matrix (B, N - K, N) or None.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_ratio: float, itals: bool, temperature: float | None,
                 merge_k: int = 0, itals_param: str = "temperature", drop_path: float = 0.0):
        super().__init__()
        self.merge_k = merge_k
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, itals=itals, temperature=temperature, param=itals_param)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, drop_scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        s1, s2 = (None, None) if drop_scale is None else (drop_scale[:, 0], drop_scale[:, 1])
        out, attn, keys = self.attn(self.norm1(x))
        x = x + self.drop_path(out, s1)  # (B, N, D)
        matrix = None
        if self.merge_k:
            merge = bipartite_soft_matching(keys, self.merge_k, class_token=True)
            x, matrix = merge(x), merge.matrix  # (B, N-K, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)), s2)
        return x, attn, matrix


class EPIR(nn.Module):
    """EPIR and its ablations for micro-expression recognition from optical flow.

    Args:
        config: :class:`EPIRConfig` (``make_config(preset)`` for the paper's presets).

    Shapes: ``forward(x)`` takes flows (B, C, H, W), channels [u, v, strain], and returns logits
    (B, num_classes); with ``return_features=True`` it also returns the final class tokens (B, D)
    that the contrastive loss uses. ``drop_scale`` (B, depth, 2), optional, holds the stochastic-depth
    factors of every block's two residual branches (:attr:`drop_rates`; drawn by the trainer). Inputs first pass ``(x - input_mean) / input_std``, two (1, C, 1, 1)
    buffers that are the identity until :meth:`set_input_stats` sets them (``TrainRecipe.standardize``).

    Raises:
        ValueError: in forward, for an input of the wrong channel count or size.
    """

    def __init__(self, config: EPIRConfig | None = None):
        super().__init__()
        cfg = config or EPIRConfig()
        self.config = cfg
        self.tokenizer = PatchTokenizer(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim, cfg.tokenizer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.blocks = nn.ModuleList(
            Block(
                cfg.dim, cfg.heads, cfg.dim_head, cfg.mlp_ratio, cfg.itals, cfg.temperature,
                merge_k=cfg.merge_k if i < cfg.integration_blocks else 0, itals_param=cfg.itals_param,
                drop_path=cfg.drop_path * i / max(cfg.depth - 1, 1),
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        # Per-channel input standardisation, (x - mean) / std; identity unless set_input_stats is called.
        self.register_buffer("input_mean", torch.zeros(1, cfg.in_chans, 1, 1))
        self.register_buffer("input_std", torch.ones(1, cfg.in_chans, 1, 1))
        self._init_weights()

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise every input channel as ``(x - mean) / std`` before tokenization.

        The statistics belong to the training samples only (``fit`` computes them on the fold's training
        flows), like torchvision's ``Normalize`` with dataset statistics. They are buffers, so they move
        with the model and are saved in its ``state_dict``.

        Args:
            mean, std: (C,) per-channel mean and standard deviation of the training flows.

        Raises:
            ValueError: for a shape other than (C,) or a non-positive std.
        """
        c = self.config.in_chans
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (c,) or std.shape != (c,):
            raise ValueError(f"mean and std must have shape ({c},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"std must be positive, got {std.tolist()}")
        self.input_mean.copy_(mean.view(1, c, 1, 1))
        self.input_std.copy_(std.view(1, c, 1, 1))

    def _init_weights(self):
        spt = self.config.init == "spt"
        for p in (self.pos_embed, self.cls_token):
            nn.init.normal_(p) if spt else nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight) if spt else nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def drop_rates(self) -> list[float]:
        """Stochastic-depth rate of each block, first block first (all 0 without ``drop_path``)."""
        return [b.drop_path.p for b in self.blocks]

    def forward_features(self, x: torch.Tensor, drop_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Flows (B, C, H, W) -> final class tokens (B, D), after the last LayerNorm."""
        return self._features(x, drop_scale=drop_scale)

    def _features(self, x: torch.Tensor, record: dict | None = None, drop_scale: torch.Tensor | None = None
                  ) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_chans or x.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(
                f"expected input (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), got {tuple(x.shape)}"
            )
        x = (x - self.input_mean) / self.input_std  # (B, C, H, W); identity unless standardised
        t = self.tokenizer(x)  # (B, N, D)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed  # (B, N+1, D), eq. (4)
        steps: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (attention, merge) of each block so far
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if cfg.dtsm and i == last:
                idx = self._select(steps)  # (B, k)
                if record is not None:
                    record.update(picks=idx, held=_held_counts(steps, t))
                t = gather_selected(t, idx)  # (B, 1+k, D)
            t, attn, merge = blk(t, None if drop_scale is None else drop_scale[:, i])
            if cfg.dtsm:
                steps.append((attn, merge))
        return self.norm(t[:, 0])

    @torch.no_grad()
    def dtsm_picks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What DTSM picks for flows x (B, C, H, W), for diagnostics (``benchmarks/dtsm_picks.py``).

        Returns:
            ``(picks, held)``: (B, k) indices of the tokens the last block sees besides the class token, and
            (B, N) how many input tokens each of the N tokens before the last block holds (1: never merged).

        Raises:
            ValueError: for a model without DTSM, or as :meth:`forward_features`.
        """
        if not self.config.dtsm:
            raise ValueError("dtsm_picks: this model has no DTSM")
        record: dict = {}
        self._features(x, record)
        return record["picks"], record["held"]

    @torch.no_grad()
    def _select(self, steps: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """DTSM's (B, H) token indices from the blocks before the last (:mod:`epir.dtsm`)."""
        cfg = self.config
        if cfg.dtsm_rollout == "all":
            rollout = rollout_through_merges(steps, score=cfg.dtsm_score, residual=cfg.dtsm_residual)
        else:
            since = [a for a, _ in steps[max((i + 1 for i, (_, m) in enumerate(steps) if m is not None), default=0):]]
            if not since:
                raise RuntimeError("DTSM found no attention map over the current tokens to roll out")
            rollout = attention_rollout(since, residual=cfg.dtsm_residual)
        return select_distinct(rollout) if cfg.dtsm_distinct else select_tokens(rollout)

    def forward(self, x: torch.Tensor, return_features: bool = False, drop_scale: torch.Tensor | None = None):
        """Flows (B, C, H, W) -> logits (B, num_classes), and the final class tokens (B, D) if asked."""
        features = self.forward_features(x, drop_scale)
        logits = self.head(features)  # (B, num_classes)
        return (logits, features) if return_features else logits


def _held_counts(steps: list[tuple[torch.Tensor, torch.Tensor | None]], t: torch.Tensor) -> torch.Tensor:
    """(B, N) input tokens each current token holds, from the merge matrices of ``steps`` (1 without merges)."""
    member = None
    for _, merge in steps:
        if merge is not None:
            m = (merge > 0).to(t.dtype)
            member = m if member is None else m @ member
    if member is None:
        return torch.ones(t.shape[:2], dtype=torch.long, device=t.device)
    return member.sum(-1).round().long()
