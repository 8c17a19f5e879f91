"""Input conventions: which flow channels a model reads, in which order, and on which scale.

Our shards hold flows as (N, H, W, 3) float32 with channels ``[u, v, strain]`` (``FLOW_CHANNELS``);
``preprocess --normalize minmax`` and the published MEGC2019 flow images scale each channel of each
sample to 0..1 (range ``unit``), ``--normalize none`` keeps signed pixel displacements (``signed``).
A published model may have been built for something else: STSTNet's reference ``main.py`` reads the same
flow images with ``cv2.imread``, i.e. channels ``[strain, v, u]`` (BGR) on 0..255. Every model config
declares its :class:`InputConvention`; :func:`convert` maps the data's convention to the model's and
refuses what cannot be converted without guessing (a model built for min-max scaled flows given signed
ones, or a channel the data does not have).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOW_CHANNELS = ("u", "v", "strain")
VALUE_RANGES = ("unit", "signed")


@dataclass(frozen=True)
class InputConvention:
    """The layout and scale of a model's (or a dataset's) flow input.

    Attributes:
        channels: channel names in tensor order, each one of ``FLOW_CHANNELS``.
        value_range: ``unit`` (each channel min-max scaled per sample, 0 .. ``scale``), ``signed``
            (raw displacements in pixels), or None for a model that accepts either (trained from scratch
            on whatever the data holds).
        scale: the value that a min-max scaled 1.0 takes (1.0 for our shards, 255.0 for 8-bit images).

    Raises:
        ValueError: for an unknown or repeated channel, an unknown range, or a non-positive scale.
    """

    channels: tuple[str, ...] = FLOW_CHANNELS
    value_range: str | None = None
    scale: float = 1.0

    def __post_init__(self):
        bad = [c for c in self.channels if c not in FLOW_CHANNELS]
        if bad or len(set(self.channels)) != len(self.channels) or not self.channels:
            raise ValueError(f"channels must be distinct names from {FLOW_CHANNELS}, got {self.channels}")
        if self.value_range is not None and self.value_range not in VALUE_RANGES:
            raise ValueError(f"value_range must be one of {VALUE_RANGES} or None, got {self.value_range!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    def describe(self) -> str:
        """One line for logs and ``epir info``, e.g. ``[strain, v, u], unit range x 255``."""
        rng = self.value_range or "any range"
        return f"[{', '.join(self.channels)}], {rng}" + (f" x {self.scale:g}" if self.scale != 1 else "")


def data_convention(value_range: str) -> InputConvention:
    """The convention of our shards: ``[u, v, strain]`` on scale 1, ``unit`` or ``signed``."""
    return InputConvention(FLOW_CHANNELS, value_range, 1.0)


def convert(x: torch.Tensor, src: InputConvention, dst: InputConvention) -> torch.Tensor:
    """Reorder and rescale flows from the data's convention to a model's.

    Args:
        x: (B, len(src.channels), H, W) flows in convention ``src`` (its ``value_range`` must be set).
        src: the data's convention; dst: the model's.

    Returns:
        (B, len(dst.channels), H, W): the channels ``dst`` names, in its order, times
        ``dst.scale / src.scale``. The same tensor when nothing changes.

    Raises:
        ValueError: ``x`` does not have ``src``'s channel count; ``dst`` needs a channel ``src`` lacks;
            ``dst`` needs a value range other than ``src``'s (min-max scaling is a preprocessing choice,
            ``preprocess --normalize``, never made here).
    """
    if x.dim() != 4 or x.shape[1] != len(src.channels):
        raise ValueError(f"expected flows (B, {len(src.channels)}, H, W) in {src.describe()}, got {tuple(x.shape)}")
    if src.value_range is None:
        raise ValueError("the data's value range must be known (unit or signed)")
    if dst.value_range is not None and dst.value_range != src.value_range:
        raise ValueError(f"the model expects {dst.value_range} flows but the data holds {src.value_range} ones; "
                         "preprocess with --normalize minmax for unit flows")
    missing = [c for c in dst.channels if c not in src.channels]
    if missing:
        raise ValueError(f"the model reads channel(s) {missing} that the data ({src.describe()}) does not have")
    if dst.channels != src.channels:
        x = x[:, [src.channels.index(c) for c in dst.channels]]
    if dst.scale != src.scale:
        x = x * (dst.scale / src.scale)
    return x
