"""Complexity of one forward pass: parameters, multiply-accumulates and tokens per block.

MACs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, linear
layers, convolutions, attention products; it counts 2 FLOPs per MAC). Elementwise work (LayerNorm,
softmax, GELU) is not counted, as with ``thop`` which the MER literature, and EPIR's Table 1 "FLOPs",
use. Token counts are read from forward hooks on the blocks of a Transformer (EPIR family), so they show what
the model really did; a model without blocks (a CNN peer) reports none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# EPIR Table 1: 7.03 M parameters and 84.03 M "FLOPs" (MACs, see PAPER.md).
PAPER_PARAMS = 7.03e6
PAPER_MACS = 84.03e6


@dataclass
class Complexity:
    """Figures of one forward pass of ONE sample.

    Attributes:
        params: trainable parameters.
        macs: multiply-accumulates.
        flops: 2 x macs.
        tokens_in: tokens entering each block, class token included (length = depth; empty for a CNN).
        tokens_out: tokens leaving each block.
    """

    params: int
    macs: int
    flops: int
    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain dict of the figures (for ``--json``)."""
        return asdict(self)


def count_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure(model: nn.Module) -> Complexity:
    """Run one sample through ``model`` (in eval mode, no grad) and count its cost.

    Args:
        model: a model of the library (:func:`epir.presets.build_model`); its ``config`` gives the input
            shape (1, in_chans, img_size, img_size).

    Returns:
        :class:`Complexity` for batch size 1.
    """
    cfg = model.config
    x = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    tokens_in: list[int] = []
    tokens_out: list[int] = []

    def record(_module, args, out) -> None:  # must return None, or it would replace the output
        tokens_in.append(args[0].shape[1])
        tokens_out.append(out[0].shape[1])

    hooks = [blk.register_forward_hook(record) for blk in getattr(model, "blocks", [])]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    flops = int(counter.get_total_flops())
    return Complexity(count_params(model), flops // 2, flops, tokens_in, tokens_out)
