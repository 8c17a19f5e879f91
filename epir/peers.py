"""Peer models that EPIR is compared with, built so that their published weights load unchanged.

STSTNet (Liong, Gan, See, Khor, Huang, "Shallow Triple Stream Three-dimensional CNN (STSTNet) for
Micro-expression Recognition", FG 2019, arXiv 1902.03634), as in its authors' PyTorch reproduction
(github christy1206/STSTNet, ``main.py``): the same module names (``conv1`` .. ``fc``), so a state dict
that ``main.py`` saved loads with ``load_state_dict`` as it is, and PyTorch's default initialisation
(``main.py`` resets every layer with ``reset_parameters``). Its input is what ``cv2.imread`` returns for
the published flow images: channels ``[strain, v, u]`` (BGR) on 0..255, declared by
:attr:`STSTNetConfig.input_convention` and converted to by the data path (:mod:`epir.inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .inputs import InputConvention

# christy1206/STSTNet main.py reads the flow PNGs with cv2.imread: BGR = [strain, v, u], 0..255.
STSTNET_INPUT = InputConvention(("strain", "v", "u"), "unit", 255.0)


@dataclass(frozen=True)
class STSTNetConfig:
    """STSTNet's configuration; defaults are the published model (1,683 parameters for 3 classes).

    Attributes:
        img_size: input side H = W in pixels (28).
        num_classes: C.
        dropout: dropout after each stream's pooling (0.5).
        contrastive, alpha: add EPIR's margin contrastive loss on the pooled features (off: STSTNet
            trains with cross-entropy only).

    Raises:
        ValueError: for a non-positive size or class count, or a dropout outside [0, 1).
    """

    family: ClassVar[str] = "ststnet"
    img_size: int = 28
    num_classes: int = 3
    dropout: float = 0.5
    contrastive: bool = False
    alpha: float = 0.4

    def __post_init__(self):
        if self.img_size < 4 or self.num_classes < 1:
            raise ValueError(f"img_size must be >= 4 and num_classes >= 1, got {self.img_size}, {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def in_chans(self) -> int:
        """Input channels (3: strain, v, u)."""
        return len(STSTNET_INPUT.channels)

    @property
    def input_convention(self) -> InputConvention:
        """``[strain, v, u]`` on 0..255, as ``cv2.imread`` gives the published flow images."""
        return STSTNET_INPUT

    @property
    def pooled_side(self) -> int:
        """Side of each stream's map after conv (padding 2), max-pool 3/3 (padding 1), avg-pool 2/2."""
        conv = self.img_size + 2  # 3x3 kernel, padding 2
        pooled = (conv + 2 - 3) // 3 + 1
        return pooled // 2


class STSTNet(nn.Module):
    """Shallow triple-stream CNN: three 3x3 convolutions (3, 5 and 8 filters) in parallel, each
    ReLU -> BatchNorm -> max-pool 3/3 -> dropout, concatenated, average-pooled 2x2, one linear layer.

    Args:
        config: :class:`STSTNetConfig`.

    Shapes: ``forward(x)`` takes (B, 3, H, W) in :data:`STSTNET_INPUT` and returns logits (B, C); with
    ``return_features=True`` also the flattened pooled features (B, 16 * s * s), s = ``pooled_side``
    (400 at 28 x 28).

    Raises:
        ValueError: in forward, for an input of the wrong channel count or size.
    """

    def __init__(self, config: STSTNetConfig | None = None):
        super().__init__()
        cfg = config or STSTNetConfig()
        self.config = cfg
        self.conv1 = nn.Conv2d(3, 3, kernel_size=3, padding=2)
        self.conv2 = nn.Conv2d(3, 5, kernel_size=3, padding=2)
        self.conv3 = nn.Conv2d(3, 8, kernel_size=3, padding=2)
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(5)
        self.bn3 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=3, padding=1)
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(16 * cfg.pooled_side**2, cfg.num_classes)

    def _stream(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.maxpool(bn(self.relu(conv(x)))))  # (B, F, s', s')

    def forward(self, x: torch.Tensor, return_features: bool = False):
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"expected input (B, 3, {cfg.img_size}, {cfg.img_size}), got {tuple(x.shape)}")
        x = torch.cat([self._stream(self.conv1, self.bn1, x), self._stream(self.conv2, self.bn2, x),
                       self._stream(self.conv3, self.bn3, x)], dim=1)  # (B, 16, 10, 10) at 28 x 28
        features = self.avgpool(x).flatten(1)  # (B, 400)
        logits = self.fc(features)  # (B, C)
        return (logits, features) if return_features else logits
