"""Named model presets: the paper's ablation ladder (EPIR Table 4) and peer models, registered through the one
registry of :mod:`epir.registry` (which also holds the user's models of ``--model-file`` and the peers of
``epir/models/``).

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

from torch import nn

from .model import EPIR, EPIRConfig
from .peers import STSTNet, STSTNetConfig
from .registry import (  # noqa: F401
    FAMILIES,
    PRESETS,
    Preset,
    Published,
    load_builtin_models,
    make_config,
    register_family,
    register_preset,
    register_published,
)

# FROZEN reference values of the families' config fields for their cell ids (grid.ids.cell_id; id version 2,
# 2026-12-01, moved here verbatim from grid/cells.py). Never edit a value: a cell's id hashes the settings that
# differ from these. A NEW field joins with the value that gives the behaviour from before the field existed.
EPIR_ID_REFERENCE = {
    "img_size": 28, "in_chans": 3, "patch_size": 7, "num_classes": 3, "dim": 256, "depth": 13, "heads": 3,
    "dim_head": 85, "mlp_ratio": 2.0, "tokenizer": "dnspt", "itals": True, "temperature": None, "dtsm": True,
    "integration_blocks": 6, "merge_k": 1, "contrastive": True, "alpha": 0.4, "init": "trunc_normal",
    "itals_param": "temperature", "dtsm_rollout": "all", "drop_path": 0.0, "dtsm_score": "sum",
    "dtsm_residual": False, "dtsm_distinct": False}
STSTNET_ID_REFERENCE = {"img_size": 28, "num_classes": 3, "dropout": 0.5, "contrastive": False, "alpha": 0.4}

EPIR_SOURCE = "EPIR (Wang et al., arXiv 2604.08106)"
register_family(EPIRConfig, EPIR, EPIR_ID_REFERENCE, source=EPIR_SOURCE)
register_family(STSTNetConfig, STSTNet, STSTNET_ID_REFERENCE,
                source="STSTNet (Liong et al., FG 2019), PyTorch reproduction github christy1206/STSTNet main.py")

# The ablation ladder of EPIR Table 4; each rung adds one component to the one before.
_LADDER = [
    ("baseline", dict(tokenizer="linear", itals=False, dtsm=False, merge_k=0, contrastive=False)),
    ("+dtsm", dict(dtsm=True, contrastive=True)),
    ("+itals", dict(itals=True)),
    ("+spt", dict(tokenizer="spt")),
    ("+dnspt", dict(tokenizer="dnspt")),
    ("epir", dict(merge_k=1)),
]
# What the paper reports for each rung (Table 4, CDE Full, UF1 / UAR). The paper publishes no code: whether
# its figures chose each fold's epoch on the test subject is unknown (peeks=None).
PAPER_TABLE4 = {
    "baseline": (0.7325, 0.7214),
    "+dtsm": (0.7736, 0.7838),
    "+itals": (0.8021, 0.8165),
    "+spt": (0.8513, 0.8627),
    "+dnspt": (0.8759, 0.8747),
    "epir": (0.8852, 0.8944),
}
# EPIR's own figures beyond Table 4 (../shared/PAPER.md): Table 1 (CDE, by source dataset), Tables 2-3 (SDE)
EPIR_FIGURES = (
    [Published("CDE", d, uf1, uar, None, f"{EPIR_SOURCE} Table 1", "EPIR (paper)")
     for d, (uf1, uar) in {"full": (0.8852, 0.8944), "samm": (0.8383, 0.8383), "casme2": (0.9882, 0.9896),
                           "smic": (0.8279, 0.8363)}.items()]
    + [Published("SDE", d, uf1, uar, None, f"{EPIR_SOURCE} Tables 2-3", "EPIR (paper)")
       for d, (uf1, uar) in {"samm": (0.8011, 0.8052), "casme2": (0.8712, 0.8466), "smic": (0.8025, 0.8213),
                             "casme3": (0.6727, 0.6345)}.items()])
LADDER: list[str] = [name for name, _ in _LADDER]

_acc: dict = {}
for _name, _delta in _LADDER:
    _acc = {**_acc, **_delta}
    _table4 = Published("CDE", "full", *PAPER_TABLE4[_name], None, f"{EPIR_SOURCE} Table 4")
    register_preset(_name, "epir", dict(_acc), profiled=True,
                    published=tuple(EPIR_FIGURES) if _name == "epir" else (_table4,), source=f"{EPIR_SOURCE} Table 4")
register_preset(
    "ststnet", "ststnet",
    # christy1206/STSTNet main.py: Adam 5e-5, batch 256, 800 epochs, cross-entropy, no augmentation, the
    # last epoch predicts; its DataLoader does not shuffle and its folders give the samples class by class.
    recipe=dict(epochs=800, batch_size=256, lr=5e-5, sample_order="by_label"), profiled=False,
    published=(Published("CDE", "full", 0.7209, 0.7250, False, "github christy1206/STSTNet README (PyTorch, last "
                         "epoch of 800)", "STSTNet (christy1206 PyTorch, last epoch of 800)"),
               Published("CDE", "full", 0.7353, 0.7605, False, "STSTNet (arXiv 1902.03634), MATLAB, 500 epochs",
                         "STSTNet (paper)")),
    source="STSTNet (Liong et al., FG 2019), PyTorch reproduction github christy1206/STSTNet main.py",
)
# figures of models the project does not implement (yet), shown beside ours in Table 1
register_published("mfdan", [Published("CDE", "full", 0.8453, 0.8688, None, "MFDAN, as EPIR's Table 1 cites it",
                                       "MFDAN (paper)")])
load_builtin_models()  # the peers of epir/models/, one file each


def family_fields(family: str) -> set[str]:
    """Config field names of a model family.

    Raises:
        KeyError: for an unknown family.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; choose from {list(FAMILIES)}")
    return {f.name for f in dataclasses.fields(FAMILIES[family].config)}


def build_model(config) -> nn.Module:
    """A freshly initialised model for a config of any family (seed with ``torch.manual_seed`` first)."""
    return FAMILIES[config.family].model(config)


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
    return FAMILIES[family].config(**d)
