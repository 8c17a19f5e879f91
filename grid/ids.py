"""Cell ids (pure): a short stable hash of everything that makes a cell's folds comparable (the data's fingerprint,
protocol, folds, and every model and recipe setting that differs from FROZEN reference values), and the id the
same cell had under id version 2 (docs/grid.md "Cell ids cover the data")."""

from __future__ import annotations

import hashlib
import json

from epir.presets import FAMILIES

ID_VERSION = 3  # 3: the data fingerprint joined the id (2026-12-05); 2: the frozen reference table
# FROZEN reference values of the recipe's fields (version 2, 2026-12-01); each model family's are registered
# with it (epir.registry.Family.id_reference, e.g. epir/presets.py). Never edit a value: a cell's id hashes its
# settings that differ from these. A NEW field joins with the value that gives the behaviour from before the
# field existed (e.g. a switch that was off). tests/test_cells.py refuses a field missing here.
ID_REFERENCE: dict[str, dict] = {
    "recipe": {"epochs": 300, "batch_size": 256, "lr": 5e-05, "weight_decay": 0.0, "seed": 0, "device": "auto",
               "hflip": False, "flow_range": "unit", "standardize": False, "schedule": "constant",
               "step_epochs": 10, "step_gamma": 0.5, "sample_order": "shuffle", "optimizer": "adam", "label_smoothing": 0.0, "class_weights": "none",
               "warmup_epochs": 0, "translate": 0, "mixup": 0.0, "ensemble": 1, "ema": 0.0, "precision": "fp32",
               "compile": False},
}


# what of a fold's search choice enters the id: the values themselves are in its model and recipe, and
# what a choices file says beside them (scores, notes) may grow without making the folds new
CHOICE_ID_KEYS = ("study", "group", "trial")


def delta(settings: dict, reference: dict) -> dict:
    """The entries of ``settings`` that differ from ``reference`` (or that it lacks), in key order."""
    return {k: settings[k] for k in sorted(settings) if k not in reference or reference[k] != settings[k]}


def _id_form(parts: dict) -> dict:
    """``parts`` with every model config reduced to its difference from its family's registered reference values
    (every field where the family registered none) and every recipe to its difference from :data:`ID_REFERENCE`."""
    def model(m: dict) -> dict:
        family = m.get("family", "epir")
        fields, ref = {k: v for k, v in m.items() if k != "family"}, FAMILIES[family].id_reference
        return {"family": family, **(fields if ref is None else delta(fields, ref))}

    out = {k: v for k, v in parts.items() if k not in ("model", "recipe", "folds")}
    if "model" in parts:
        out["model"] = model(parts["model"])
    if "recipe" in parts:
        out["recipe"] = delta(parts["recipe"], ID_REFERENCE["recipe"])
    if "folds" in parts:  # a search's per-fold settings; of the choice, only which search, group and trial
        out["folds"] = {s: {**({"model": model(f["model"])} if "model" in f else {}),
                            **({"recipe": delta(f["recipe"], ID_REFERENCE["recipe"])} if "recipe" in f else {}),
                            "choice": {k: f["choice"][k] for k in CHOICE_ID_KEYS if k in f.get("choice", {})}}
                        for s, f in parts["folds"].items()}
    return out


def cell_id(parts: dict) -> str:
    """A short stable hash of everything that makes a cell's folds comparable: data, protocol, folds, and the
    model and recipe settings that differ from the frozen reference values (the family's registered
    ``id_reference``, the recipe's :data:`ID_REFERENCE`; see the module docstring);
    finished folds are looked up by it when a grid is re-run.

    Args:
        parts: ``data``, ``data_fingerprint``, ``shards``, ``n``, ``subjects``, ``demo`` and either ``model`` (a config dict,
            :func:`epir.presets.config_to_dict`) and ``recipe`` (TrainRecipe fields), or ``folds``
            (subject -> ``{"model", "recipe", "choice"}``).

    Returns:
        12 hex digits.

    Raises:
        KeyError: for a model family without a reference table.
    """
    form = {"id_version": ID_VERSION, **_id_form(parts)}
    return hashlib.sha1(json.dumps(form, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell_id_v2(parts: dict) -> str:
    """The id the same cell had under id version 2, before the data fingerprint joined it: :func:`cell_id` of
    ``parts`` without ``data_fingerprint``, hashed as version 2 did. Any data of the same key, sample count and
    folds shares it; it finds a store's folds from before version 3 and folds trained on other data."""
    form = {"id_version": 2, **_id_form({k: v for k, v in parts.items() if k != "data_fingerprint"})}
    return hashlib.sha1(json.dumps(form, sort_keys=True, default=str).encode()).hexdigest()[:12]


