"""Named model presets: the paper's ablation ladder (EPIR Table 4) and peer models, one registry.

A preset names a model family (``epir``: :class:`epir.model.EPIR`; ``ststnet``:
:class:`epir.peers.STSTNet`), the config fields it sets, and, for a peer, the training recipe its
authors published (``recipe``, :class:`epir.train.TrainRecipe` fields). The ladder's rungs carry no
recipe of their own: the grid's training profiles (``paper``, ``cpu``, ``demo``) size them. A peer
keeps its published recipe whatever the profile (``profiled=False``), so that its row means what its
paper's row means.

Configs travel between processes (Ray trials, MLflow params, JSON records) as plain dicts with a
``family`` key: :func:`config_to_dict` / :func:`config_from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from .model import EPIR, EPIRConfig
from .peers import STSTNet, STSTNetConfig

# family name -> (config class, model class)
FAMILIES: dict[str, tuple[type, type]] = {
    "epir": (EPIRConfig, EPIR),
    "ststnet": (STSTNetConfig, STSTNet),
}


@dataclass(frozen=True)
class Preset:
    """One named model of the library.

    Attributes:
        name: what ``--presets`` and ``epir info --preset`` take.
        family: a key of ``FAMILIES``.
        model: config fields set over the family's defaults.
        recipe: TrainRecipe fields of the preset's own (published) recipe; empty for the ladder.
        profiled: True when the grid's training profiles apply (the EPIR ladder); False for a peer,
            which keeps ``recipe``.
        published: (UF1, UAR) its source reports on the MEGC2019 composite (CDE Full), or None.
        source: where the architecture, recipe and published figures come from.
    """

    name: str
    family: str
    model: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    profiled: bool = True
    published: tuple[float, float] | None = None
    source: str = ""


# The ablation ladder of EPIR Table 4; each rung adds one component to the one before.
_LADDER = [
    ("baseline", dict(tokenizer="linear", itals=False, dtsm=False, merge_k=0, contrastive=False)),
    ("+dtsm", dict(dtsm=True, contrastive=True)),
    ("+itals", dict(itals=True)),
    ("+spt", dict(tokenizer="spt")),
    ("+dnspt", dict(tokenizer="dnspt")),
    ("epir", dict(merge_k=1)),
]
# What the paper reports for each rung (Table 4, CDE Full, UF1 / UAR), kept beside the presets.
PAPER_TABLE4 = {
    "baseline": (0.7325, 0.7214),
    "+dtsm": (0.7736, 0.7838),
    "+itals": (0.8021, 0.8165),
    "+spt": (0.8513, 0.8627),
    "+dnspt": (0.8759, 0.8747),
    "epir": (0.8852, 0.8944),
}
LADDER: list[str] = [name for name, _ in _LADDER]

PRESETS: dict[str, Preset] = {}
_acc: dict = {}
for _name, _delta in _LADDER:
    _acc = {**_acc, **_delta}
    PRESETS[_name] = Preset(_name, "epir", dict(_acc), published=PAPER_TABLE4[_name],
                            source="EPIR (arXiv 2604.08106) Table 4")
PRESETS["ststnet"] = Preset(
    "ststnet", "ststnet",
    # christy1206/STSTNet main.py: Adam 5e-5, batch 256, 800 epochs, cross-entropy, no augmentation, the
    # last epoch predicts; its DataLoader does not shuffle and its folders give the samples class by class.
    recipe=dict(epochs=800, batch_size=256, lr=5e-5, sample_order="by_label"),
    profiled=False, published=(0.7209, 0.7250),
    source="STSTNet (Liong et al., FG 2019), PyTorch reproduction github christy1206/STSTNet main.py",
)


def family_fields(family: str) -> set[str]:
    """Config field names of a model family.

    Raises:
        KeyError: for an unknown family.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; choose from {list(FAMILIES)}")
    return {f.name for f in dataclasses.fields(FAMILIES[family][0])}


def make_config(preset: str = "epir", **overrides):
    """Config of a preset, with field overrides.

    Args:
        preset: a key of ``PRESETS`` (the ladder ``baseline`` .. ``epir``, or a peer such as ``ststnet``).
        **overrides: fields of the preset's config class (e.g. ``depth=9``, ``merge_k=2``, ``num_classes=5``
            for the EPIR family).

    Returns:
        An :class:`epir.model.EPIRConfig` or a peer's config (e.g. :class:`epir.peers.STSTNetConfig`).

    Raises:
        KeyError: for an unknown preset; TypeError for a field the family does not have; ValueError
            for an invalid config.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    p = PRESETS[preset]
    cls = FAMILIES[p.family][0]
    return dataclasses.replace(cls(), **{**p.model, **overrides})


def build_model(config) -> nn.Module:
    """A freshly initialised model for a config of any family (seed with ``torch.manual_seed`` first)."""
    return FAMILIES[config.family][1](config)


def config_to_dict(config) -> dict:
    """``{"family": ..., **fields}``: the portable form of a config (Ray trials, MLflow params, JSON)."""
    return {"family": config.family, **dataclasses.asdict(config)}


def config_from_dict(d: dict):
    """Inverse of :func:`config_to_dict`; a dict without ``family`` is an EPIR config.

    Raises:
        KeyError: for an unknown family; TypeError for an unknown field; ValueError for an invalid config.
    """
    d = dict(d)
    family = d.pop("family", "epir")
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; choose from {list(FAMILIES)}")
    return FAMILIES[family][0](**d)
