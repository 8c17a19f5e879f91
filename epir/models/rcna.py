"""RCN-A (Xia, Peng, Khor, Feng, Zhao, "Revealing the invisible with model and data shrinking for
composite-database micro-expression recognition", IEEE TIP 29, 2020): a shallow recurrent convolutional network
with a class-activation attention unit, as the authors' code builds it (github
xiazhaoqiang/ParameterFreeRCNs-MicroExpressionRec, ``MeNets.py`` ``RCN_A`` with ``model_version=3``, and
``ModelTrain_Final.py``; read for facts, written anew)::

    conv 5x5 3 -> F (no padding), BatchNorm, ReLU, max-pool 2, dropout 0.5        (B, F, 12, 12) at 28 px
    attention: the map above average-pooled to P x P; per class c, the classifier's weights of c, shaped
               (F, P, P), times the map, averaged over channels, min-max scaled per sample; averaged over
               the classes -> (B, 1, P, P)
    one recurrent convolutional layer: y = ff(x) (1x1 conv, BN, ReLU); y = rr(x + y); y = rr(x + y), the same
               3x3 conv, BN, ReLU twice (shared weights: the recurrence); max-pool 2, dropout 0.5   (B, F, 6, 6)
    average-pooled to P x P, times the attention, flattened, FC -> C (the same FC whose weights made the map)

F = 64 feature maps and P = 7 (the authors' defaults). Input: the three flow channels ``[u, v, strain]`` as
stored (``num_input=3``; the authors' own flow images are not ours). Recipe (``ModelTrain_Final.py``): SGD
momentum 0.9, lr 5e-4, no weight decay, batch 64, shuffled, 100 epochs, the last epoch predicts;
initialisation: Kaiming-normal (fan out) convolutions, N(0, 0.01) linear weights, BN weight 1 and bias 0. At
28 px the last pooling upsamples 6 x 6 to 7 x 7 (adaptive average pooling, as the reference would on these
inputs).

What reads as a slip in the reference (followed: the published number depends on it): ``train_model`` creates
``StepLR(optimizer, step_size=10, gamma=0.5)`` and never calls its ``step()``, so the rate stays 5e-4 for all
100 epochs; the recipe here is that constant rate (``TrainRecipe(schedule="step", step_epochs=10)`` gives the
decay the code seems to intend). Deviation: the min-max scaling divides by the map's maximum after subtracting
its minimum, which is 0 for a constant map (a NaN in the reference); here the divisor is at least 1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import MERConfig, Published, register_model

MEB = "tvaranka/meb (Varanka et al., IEEE TAC 2023), notebook \"megc evaluation\""
AUTHORS = "xiazhaoqiang/ParameterFreeRCNs-MicroExpressionRec (MeNets.py, ModelTrain_Final.py)"


@dataclass(frozen=True)
class RCNAConfig(MERConfig):
    """RCN-A's configuration (defaults: the authors' model, 3 classes).

    Attributes:
        featuremaps: F, the width of every convolution (64).
        pool_size: P, the side of the pooled map and of the attention (7).
        dropout: after the first block and the recurrent layer (0.5, ``nn.Dropout()``'s default).
    """

    family: ClassVar[str] = "rcna"
    featuremaps: int = 64
    pool_size: int = 7
    dropout: float = 0.5

    def __post_init__(self):
        if self.img_size < 8 or self.featuremaps < 1 or self.pool_size < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"RCN-A needs img_size >= 8, featuremaps and pool_size >= 1, dropout in [0, 1); got "
                             f"{self.img_size}, {self.featuremaps}, {self.pool_size}, {self.dropout}")


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv k x k ('same' padding), BatchNorm, ReLU: (B, cin, H, W) -> (B, cout, H, W)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


def class_attention(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RCN-A's attention map (``SpatialAttentionBlock_P``): x (B, F, P, P), the classifier's weight (C, F*P*P)
    -> (B, 1, P, P): per class, weights times map averaged over channels, min-max scaled per sample, then the
    mean over classes."""
    b, f, p, _ = x.shape
    cams = (weight.view(-1, 1, f, p, p) * x.unsqueeze(0)).mean(dim=2)  # (C, B, P, P)
    lo = cams.amin(dim=(2, 3), keepdim=True)
    cams = cams - lo
    cams = cams / cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return cams.mean(dim=0).unsqueeze(1)  # (B, 1, P, P)


@register_model("rcn-a", config=RCNAConfig,
                recipe=dict(epochs=100, batch_size=64, lr=5e-4, optimizer="sgd"),  # its StepLR is never stepped
                published=(Published("CDE", "full", 0.682, None, False, f"{MEB}; meb's flows, last epoch",
                                     "RCN-A (meb, last epoch)"),),
                source=f"RCN-A (Xia et al., IEEE TIP 29, 2020), as {AUTHORS} builds and trains it",
                id_reference={"img_size": 28, "num_classes": 3, "contrastive": False, "alpha": 0.4, "featuremaps": 64,
                              "pool_size": 7, "dropout": 0.5})
class RCNA(nn.Module):
    """Shapes: ``forward(x (B, 3, H, W))`` -> logits (B, C); with ``return_features=True`` also the attended,
    pooled map flattened (B, F * P * P). Raises ValueError for an input of another shape."""

    def __init__(self, config: RCNAConfig):
        super().__init__()
        c = self.config = config
        f, p = c.featuremaps, c.pool_size
        self.conv1 = nn.Sequential(nn.Conv2d(c.in_chans, f, 5), nn.BatchNorm2d(f), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Dropout(c.dropout))
        self.ff, self.rr = _conv_bn_relu(f, f, 1), _conv_bn_relu(f, f, 3)
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Dropout(c.dropout))
        self.classifier = nn.Linear(p * p * f, c.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"expected (B, {c.in_chans}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        p = c.pool_size
        x = self.conv1(x)  # (B, F, 12, 12) at 28 px
        att = class_attention(F.adaptive_avg_pool2d(x, p), self.classifier.weight)  # (B, 1, P, P)
        y = self.ff(x)
        y = self.rr(x + y)
        y = self.rr(x + y)  # the recurrence: the same convolution again
        h = F.adaptive_avg_pool2d(self.down(y), p) * att  # (B, F, P, P)
        logits = self.classifier(h.flatten(1))  # (B, C)
        return (logits, h.flatten(1)) if return_features else logits
