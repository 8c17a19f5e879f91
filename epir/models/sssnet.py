"""SSSNet (Varanka, Peng, Zhao, "Micro-expression recognition with noisy labels", HVEI 2021), as the honest
library tvaranka/meb describes and trains it (``meb/models/me_networks.py``; read for facts, written anew):

    conv 5x5 3 -> 32, ReLU, max-pool 3, BatchNorm, Dropout2d
    conv 3x3 32 -> 64, ReLU, max-pool 2, BatchNorm, Dropout2d
    FC -> 256, ReLU, dropout, FC -> C            (dropout 0.5 throughout)

The FC input is sized for the input side: 9 x 9 x 64 at meb's 64 px, 3 x 3 x 64 at the composite's 28 px (our
flows), so its row on 28 px flows is not the 64 px model meb scored. Recipe (meb's best honest figures): SGD with
momentum 0.9, lr 0.01, weight decay 1e-3, 200 epochs, the last epoch predicts; batch 32 (meb's default batch;
the source does not state one for these runs). Input: the three flow channels ``[u, v, strain]`` as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import MERConfig, Published, register_model

MEB = "tvaranka/meb (Varanka et al., IEEE TAC 2023), notebooks \"Figure 2. Different F1-metrics\" and \"megc evaluation\""


@dataclass(frozen=True)
class SSSNetConfig(MERConfig):
    """SSSNet's configuration (defaults: the published model at 28 px, 3 classes).

    Attributes:
        dropout: of both Dropout2d layers and before the last FC (0.5).
        width1, width2, hidden: the two convolutions' filters (32, 64) and the FC width (256).
    """

    family: ClassVar[str] = "sssnet"
    dropout: float = 0.5
    width1: int = 32
    width2: int = 64
    hidden: int = 256

    def __post_init__(self):
        if self.img_size < 12 or not 0 <= self.dropout < 1:
            raise ValueError(f"SSSNet needs img_size >= 12 and dropout in [0, 1), got {self.img_size}, {self.dropout}")

    @property
    def pooled_side(self) -> int:
        """Side after conv 5 (no padding), pool 3, conv 3 (no padding), pool 2: 3 at 28 px, 9 at 64 px."""
        return ((self.img_size - 4) // 3 - 2) // 2


@register_model("sssnet", config=SSSNetConfig,
                recipe=dict(epochs=200, batch_size=32, lr=0.01, weight_decay=1e-3, optimizer="sgd"),
                published=(Published("CDE", "full", 0.739, None, False, f"{MEB}; 64 x 64 flows, 200 epochs",
                                     "SSSNet (meb, 64 px flows, 200 epochs)"),),
                source="SSSNet (Varanka, Peng, Zhao, HVEI 2021), as tvaranka/meb trains it",
                id_reference={"img_size": 28, "num_classes": 3, "contrastive": False, "alpha": 0.4, "dropout": 0.5,
                              "width1": 32, "width2": 64, "hidden": 256})
class SSSNet(nn.Module):
    """Shapes: ``forward(x (B, 3, H, W))`` -> logits (B, C); with ``return_features=True`` also the hidden
    layer's activations (B, ``hidden``). Raises ValueError for an input of another shape."""

    def __init__(self, config: SSSNetConfig):
        super().__init__()
        c = self.config = config
        self.block1 = nn.Sequential(nn.Conv2d(c.in_chans, c.width1, 5), nn.ReLU(), nn.MaxPool2d(3, 3),
                                    nn.BatchNorm2d(c.width1), nn.Dropout2d(c.dropout))  # (B, 32, 8, 8) at 28 px
        self.block2 = nn.Sequential(nn.Conv2d(c.width1, c.width2, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
                                    nn.BatchNorm2d(c.width2), nn.Dropout2d(c.dropout))  # (B, 64, 3, 3)
        self.fc1 = nn.Linear(c.width2 * c.pooled_side**2, c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.hidden, c.num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"expected (B, {c.in_chans}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        h = torch.relu(self.fc1(self.block2(self.block1(x)).flatten(1)))  # (B, hidden)
        logits = self.fc(self.drop(h))  # (B, C)
        return (logits, h) if return_features else logits
