"""Off-ApexNet (Gan, Liong, Yau, Huang, Tan, "OFF-ApexNet on micro-expression recognition system", Signal
Processing: Image Communication 74, 2019; arXiv 1805.08699): two streams, the horizontal (u) and the vertical (v)
optical flow of the onset-apex pair, each 28 x 28 x 1:

    each stream: conv 5x5, 6 filters ('same' padding), ReLU, max-pool 2; conv 5x5, 16 filters, ReLU, max-pool 2
    the two streams' 7 x 7 x 16 maps concatenated (1,568), FC 1024, FC 1024 (ReLU, dropout 0.5 each), FC -> C

Recipe (tvaranka/meb's honest run, the source's own being a best-test-epoch one): Adam 1e-4, weight decay 1e-3,
batch 32, 3000 epochs, the last epoch predicts. meb's own module is a one-stream 3 x 3 simplification; this one
follows the paper's two streams. Input: channels ``[u, v]`` of the flows, any value range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..inputs import InputConvention
from ..registry import MERConfig, Published, register_model

MEB = "tvaranka/meb (Varanka et al., IEEE TAC 2023), notebook \"Table 3. Early stopping\""


@dataclass(frozen=True)
class OffApexNetConfig(MERConfig):
    """Off-ApexNet's configuration (defaults: the published model, 3 classes).

    Attributes:
        dropout: after each hidden FC layer (0.5).
        hidden: the two hidden FC layers' width (1024).
    """

    family: ClassVar[str] = "offapexnet"
    dropout: float = 0.5
    hidden: int = 1024

    def __post_init__(self):
        if self.img_size % 4 or not 0 <= self.dropout < 1:
            raise ValueError(f"Off-ApexNet needs img_size divisible by 4 and dropout in [0, 1), got {self.img_size}, "
                             f"{self.dropout}")

    @property
    def input_convention(self) -> InputConvention:
        """The optical flow's ``[u, v]``, any value range (the model trains from scratch on what the data holds)."""
        return InputConvention(("u", "v"), None, 1.0)


def _stream() -> nn.Sequential:
    """One flow component (B, 1, H, W) -> (B, 16, H / 4, W / 4)."""
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))


@register_model("offapexnet", config=OffApexNetConfig,
                recipe=dict(epochs=3000, batch_size=32, lr=1e-4, weight_decay=1e-3),
                published=(Published("CDE", "full", 0.703, None, False, f"{MEB}; 3000 epochs, last epoch",
                                     "Off-ApexNet (meb, last epoch of 3000)"),
                           Published("CDE", "full", 0.839, None, True, f"{MEB}; the epoch best on each test subject",
                                     "Off-ApexNet (meb, best test epoch)")),
                source="Off-ApexNet (Gan et al., Signal Processing: Image Communication 74, 2019; arXiv 1805.08699)",
                id_reference={"img_size": 28, "num_classes": 3, "contrastive": False, "alpha": 0.4, "dropout": 0.5,
                              "hidden": 1024})
class OffApexNet(nn.Module):
    """Shapes: ``forward(x (B, 2, H, W))`` ([u, v]) -> logits (B, C); with ``return_features=True`` also the
    second hidden layer (B, ``hidden``). Raises ValueError for an input of another shape."""

    def __init__(self, config: OffApexNetConfig):
        super().__init__()
        c = self.config = config
        self.u, self.v = _stream(), _stream()
        side = c.img_size // 4
        self.fc1 = nn.Linear(2 * 16 * side * side, c.hidden)
        self.fc2 = nn.Linear(c.hidden, c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.hidden, c.num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (2, c.img_size, c.img_size):
            raise ValueError(f"expected [u, v] flows (B, 2, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        both = torch.cat([self.u(x[:, :1]).flatten(1), self.v(x[:, 1:]).flatten(1)], dim=1)  # (B, 1568) at 28 px
        h = self.drop(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(both))))))  # (B, hidden)
        logits = self.fc(h)  # (B, C)
        return (logits, h) if return_features else logits
