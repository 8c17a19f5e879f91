"""A model of one's own, in one file: a small CNN on (B, 3, 28, 28) flows, registered as ``tinycnn``.
Run it beside EPIR's baseline on the demo (docs/extending.md):

    uv run python grid/run_all.py --model-file examples/tiny_cnn.py --presets tinycnn,baseline --profile demo
"""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from epir.registry import MERConfig, register_model


@dataclass(frozen=True)
class TinyCNNConfig(MERConfig):  # img_size, num_classes, contrastive, alpha, input_convention ([u, v, strain])
    family: ClassVar[str] = "tinycnn"
    width: int = 16  # channels of the first convolution


@register_model("tinycnn", config=TinyCNNConfig, recipe=dict(epochs=30, batch_size=32, lr=1e-3),
                source="docs/extending.md (an example, not a published model)")
class TinyCNN(nn.Module):
    def __init__(self, config: TinyCNNConfig):
        super().__init__()
        self.config, w = config, config.width
        self.features = nn.Sequential(  # (B, 3, 28, 28) -> (B, 2w)
            nn.Conv2d(config.in_chans, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, config.num_classes)

    def forward(self, x, return_features=False):
        f = self.features(x)  # (B, 2w): what the contrastive term compares, when the config asks for it
        logits = self.head(f)  # (B, C)
        return (logits, f) if return_features else logits
