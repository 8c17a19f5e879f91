"""The grid's cells, pure. Its jobs: (1) what a cell is and how the cells of a run are built; (2) what each fold
trains (a search's choices replayed) and how folds are packed; (3) a cell's pooled scores.

A cell is one dataset x protocol x preset x seed: a full leave-one-subject-out (LOSO) evaluation. This
module imports neither Ray nor MLflow nor Optuna: the Ray runner (:mod:`grid.runner`), the GPU path
(``benchmarks/gpu_ladder.py``, :mod:`grid.records`) and the benchmarks build the same cells from it.

Cell ids (:mod:`grid.ids`). A finished fold is found again by its cell's id, so the id must change exactly when
what the cell trains changes. :func:`grid.ids.cell_id` hashes the data, the folds, and every model and recipe setting that
DIFFERS from a frozen table of reference values (:data:`grid.ids.ID_REFERENCE`, kept with the id format
:data:`grid.ids.ID_VERSION`), not from the live defaults: a new field that joins the table with the value that
keeps today's behaviour leaves every id as it was, and a changed default changes the ids of the cells it
changes (a fold trained under the old default is never reused for the new one).

Since id version 3 the id also covers the data itself (:attr:`grid.data.ProtocolData.fingerprint`: flows,
labels, classes, subjects, sample ids, groups, flow range): other flows of the same samples, or one label
fixed in a manifest, make new cells. Each cell also carries the id it had under version 2 (which covered the
data key, sample count and folds only), so that a store made before can be re-tagged once
(``grid/run_all.py migrate-ids``, docs/grid.md) and a fold trained on other data is recognised and refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from epir.metrics import score
from epir.presets import PRESETS, config_from_dict
from epir.train import TrainRecipe

from . import schema
from .config import PROFILE_CHOSEN_ON, GridConfig, peeking_overrides
from .data import ProtocolData
from .ids import cell_id, cell_id_v2


def split_params(params: dict, model: dict, recipe: dict) -> tuple[dict, dict]:
    """Apply searched values to a model config dict and TrainRecipe fields (each field where it belongs)."""
    recipe_fields = set(TrainRecipe.__dataclass_fields__)
    return ({**model, **{k: v for k, v in params.items() if k not in recipe_fields}},
            {**recipe, **{k: v for k, v in params.items() if k in recipe_fields}})


def replay(group: dict, model: dict, recipe: dict, search_preset: str) -> tuple[dict, dict]:
    """What a replayable choice (a choices file of format 2) trains for a cell: the stored model config and
    recipe, exactly, whatever the profiles say today; for a cell of another preset of the family (``baseline``
    from a search on ``epir``), the fields that tell the presets apart come from the cell's own preset unless
    the search set them. The seed and the flow range are the cell's.

    Args:
        group: the choices file's entry of one group (``model``, ``recipe``, ``searched_model_fields``).
        model, recipe: the cell's own settings (its preset, profile and overrides).
        search_preset: the preset the search ran.
    """
    stored = dict(group["model"])
    apart = (set(PRESETS[search_preset].model) | {k for p in PRESETS.values() if p.family == stored["family"]
                                                   for k in p.model}) - set(group.get("searched_model_fields", []))
    m = {**stored, **{k: model[k] for k in apart if k in model}}
    r = {**group["recipe"], "seed": recipe["seed"], "flow_range": recipe["flow_range"]}
    return m, r


# the provenance of a cell whose profile was chosen on its own subjects (config.PROFILE_CHOSEN_ON); until
# 2026-12-06 it was written into the cell's profile label ("cpu: PROFILE CHOSEN ON THESE SUBJECTS")
PROFILE_CHOSEN = "PROFILE CHOSEN ON THESE SUBJECTS"


def fold_settings(choices: dict, data_key: str, subjects: list[str], model: dict, recipe: dict,
                  subset_of: str = "") -> dict[str, dict]:
    """Per test subject, the settings a search chose for its validation group (``GridConfig.choices``): a
    choices file of format 2 is replayed exactly (:func:`replay`); an earlier one resolves its base settings
    from today's profile, as it did. Choices made on ``subset_of`` (the composite a source dataset is cut from,
    :attr:`grid.data.ProtocolData.subset_of`) replay on the subset's subjects: each subject gets its own
    group's choice, made without that group's labels, as on the composite.

    Returns:
        subject -> ``{"model", "recipe", "choice": {"study", "group", "trial", "params", "validation_uf1"}}``.

    Raises:
        ValueError: the choices belong to another dataset, miss a subject, or make an invalid config.
    """
    if choices["dataset"] not in (data_key, subset_of or data_key):
        raise ValueError(f"choices of search {choices['study']!r} were made on {choices['dataset']}, not {data_key}"
                         + (f" nor {subset_of}, the data it is a subset of" if subset_of else ""))
    out = {}
    for s in subjects:
        if s not in choices["subjects"]:
            raise ValueError(f"subject {s} of {data_key} is in no validation group of search {choices['study']!r}")
        g = choices["subjects"][s]
        c = choices["groups"][str(g)]
        if "model" in c:
            m, r = replay(c, model, recipe, choices["preset"])
        else:
            m, r = split_params(c["params"], model, recipe)
        config_from_dict(m)  # validates
        TrainRecipe(**r)
        out[s] = {"model": m, "recipe": r, "choice": {"study": choices["study"], "group": g, "trial": c["trial"],
                                                      "params": c["params"], "validation_uf1": c["validation_uf1"]}}
    return out


@dataclass(kw_only=True)
class Cell:
    """One dataset x protocol x preset x seed: a full LOSO evaluation (built by keyword only).

    Attributes:
        cell_id: hash of data, protocol, preset, model, recipe (seed included) and fold selection (MLflow tag).
        setting_id: the same hash without the seed: the cells of one setting over several seeds share it,
            and the tables pool them (mean and spread).
        name: ``<protocol> <dataset> <preset>[ seed N]`` (the parent run's name).
        profile: the training profile, or ``published`` for a peer on its own recipe.
        data_key: key of its :class:`grid.data.ProtocolData`.
        model, recipe: the model config (:func:`epir.presets.config_to_dict`) and TrainRecipe fields.
        subjects: the test subjects of its folds; ``all_subjects``: how many the dataset has.
        fold_settings: for a cell of a search's choices (``GridConfig.choices``), each subject's own
            ``model``, ``recipe`` and ``choice`` (which configuration and why); None for a plain cell.
        preprocess: how the cell's flows were made (:attr:`grid.data.ProtocolData.preprocess`); flow: their
            algorithm (``farneback``, ``tvl1``, or ``tvl1-published`` for the composite's flow images).
        data_fingerprint: :attr:`grid.data.ProtocolData.fingerprint` of the data the cell trains and scores on
            (part of ``cell_id``); cell_id_v2: the cell's id under id version 2 (:func:`cell_id_v2`).
        provenance: a warning about where the cell's settings came from (:data:`PROFILE_CHOSEN`: its profile was
            chosen with these subjects), or empty; tables print it, no grouping or pairing reads it.
    """

    cell_id: str
    name: str
    dataset: str
    protocol: str
    preset: str
    profile: str
    data_key: str
    config_id: str
    classes: list[str]
    model: dict
    recipe: dict
    subjects: list[str]
    all_subjects: int
    demo: bool = False
    setting_id: str = ""
    fold_settings: dict | None = None
    preprocess: dict | None = None
    flow: str = "farneback"
    data_fingerprint: str = ""
    cell_id_v2: str = ""
    provenance: str = ""

    def fold_model(self, subject: str) -> dict:
        """The model config the fold of ``subject`` trains."""
        return self.fold_settings[subject]["model"] if self.fold_settings else self.model

    def fold_recipe(self, subject: str) -> dict:
        """The TrainRecipe fields the fold of ``subject`` trains with."""
        return self.fold_settings[subject]["recipe"] if self.fold_settings else self.recipe

    def fold_params(self, subject: str) -> dict:
        """MLflow params of one fold beyond the cell's: its own configuration and, for a search's choices,
        ``choice.*`` (study, validation group, trial, its validation UF1 on the other groups, the values)."""
        if not self.fold_settings:
            return {}
        f = self.fold_settings[subject]
        c = f["choice"]
        choice = {"study": c["study"], "group": str(c["group"]), "trial": str(c["trial"]),
                  "validation_uf1": f"{c['validation_uf1']:.4f}", **{k: str(v) for k, v in c["params"].items()}}
        return {**schema.flat_params(schema.MODEL, f["model"]), **schema.flat_params(schema.RECIPE, f["recipe"]),
                **schema.flat_params(schema.CHOICE, choice)}

    @property
    def seed(self) -> int:
        """The recipe's seed."""
        return int(self.recipe["seed"])

    @property
    def partial(self) -> bool:
        """True when only some of the dataset's subjects are folds (``--folds N``)."""
        return len(self.subjects) < self.all_subjects

    def tags(self) -> dict:
        """MLflow tags shared by the parent and child runs (strings)."""
        search = {schema.SEARCH: next(iter(self.fold_settings.values()))["choice"]["study"]} if self.fold_settings else {}
        return {schema.DATASET: self.dataset, schema.PROTOCOL: self.protocol, schema.PRESET: self.preset,
                schema.PROFILE: self.profile, schema.SEED: str(self.seed), schema.SETTING: self.setting_id, **search,
                # the run's own metrics are the honest ones (last epoch); best_test_epoch.* metrics peek
                schema.EPOCH_SELECTION: "last", schema.PEEKS_AT_TEST: "false", schema.DEMO: str(self.demo).lower(),
                schema.FOLDS: f"{len(self.subjects)}/{self.all_subjects}", schema.FLOW: self.flow,
                schema.DATA: self.data_fingerprint, schema.CELL_V2: self.cell_id_v2,
                **({schema.PROVENANCE: self.provenance} if self.provenance else {})}

    def params(self) -> dict:
        """The full configuration as MLflow params: ``model.*``, ``recipe.*``, data and protocol."""
        return {**schema.flat_params(schema.MODEL, self.model), **schema.flat_params(schema.RECIPE, self.recipe),
                "dataset": self.dataset, "protocol": self.protocol, "preset": self.preset, "profile": self.profile,
                schema.SHARDS_CONFIG_ID: self.config_id, "flow": self.flow, schema.CLASSES: ",".join(self.classes),
                "folds": str(len(self.subjects)), schema.SUBJECTS_TOTAL: str(self.all_subjects)}


def _model_data(d: ProtocolData, model: dict) -> dict:
    """What of the data beyond its fingerprint a model reads, for its cell id: the landmarks digest for a model of
    HTNet's facial regions (:meth:`grid.data.ProtocolData.model_flows`), nothing for any other model.

    Raises:
        ValueError: such a model, and no landmarks kept with the data (as ``model_flows``).
    """
    config = config_from_dict(model)
    if not getattr(config, "regions", False):
        return {}
    d.model_flows(config)  # refused here, before anything trains
    return {"landmarks": d.landmarks_digest}


def build_cells(cfg: GridConfig, data: dict[str, ProtocolData], profile: str) -> list[Cell]:
    """Every dataset x protocol x preset x seed cell, in that order."""
    cells = []
    for key, d in data.items():
        if cfg.overrides_from and cfg.overrides_from.get("dataset") in (key, d.subset_of or key):
            raise ValueError(peeking_overrides(cfg.overrides_from["study"], key))
        subjects = d.fold_subjects
        chosen = subjects[: cfg.folds] if cfg.folds else subjects
        for preset in cfg.presets:
            for seed in cfg.seeds:
                model, recipe, label = cfg.settings(preset, profile, len(d.classes), seed)
                recipe["flow_range"] = d.flow_range
                parts = dict(data=key, data_fingerprint=d.fingerprint, shards=d.config_id, n=len(d.labels),
                             model=model, recipe=recipe, subjects=chosen, demo=cfg.demo, **_model_data(d, model))
                no_seed = {"recipe": {k: v for k, v in recipe.items() if k != "seed"}}
                per_fold = None
                chosen_here = PROFILE_CHOSEN_ON.get(profile, ("",))[0] in (key, d.subset_of or key) and label == profile
                provenance = PROFILE_CHOSEN if chosen_here and not cfg.choices else ""
                if cfg.choices:  # what each fold trains, and why, names the cell (not the base it came from)
                    per_fold = fold_settings(cfg.choices, key, chosen, model, recipe, d.subset_of)
                    del parts["model"], parts["recipe"]
                    parts["folds"] = {s: {"model": f["model"], "recipe": f["recipe"], "choice": f["choice"]}
                                      for s, f in per_fold.items()}
                    no_seed = {"folds": {s: {**f, "recipe": {k: v for k, v in f["recipe"].items() if k != "seed"}}
                                         for s, f in parts["folds"].items()}}
                    label = f"{label}, chosen by search {cfg.choices['study']}" + (
                        f" on {cfg.choices['dataset']}" if cfg.choices["dataset"] != key else "")
                setting = cell_id({**parts, **no_seed})
                name = f"{d.protocol} {d.dataset}" + (f" [{d.flow}]" if key.endswith("/" + d.flow) else "") \
                    + f" {preset}" + (" searched" if per_fold else "") \
                    + (f" seed {seed}" if cfg.seeds != [0] else "")
                cells.append(Cell(cell_id=cell_id(parts), name=name, dataset=d.dataset, protocol=d.protocol, preset=preset,
                                  profile=label, data_key=key, config_id=d.config_id, classes=d.classes, model=model,
                                  recipe=recipe, subjects=chosen, all_subjects=len(subjects), demo=cfg.demo,
                                  setting_id=setting, fold_settings=per_fold, preprocess=d.preprocess, flow=d.flow,
                                  data_fingerprint=d.fingerprint, cell_id_v2=cell_id_v2(parts), provenance=provenance))
    return cells


def fold_packs(cell: Cell, done, size: int) -> list[list[str]]:
    """The one planner of packs (the grid's trials, ``benchmarks/gpu_ladder.py``'s tasks): a cell's folds not in
    ``done``, grouped by the settings they train (a search's choices differ by validation group), in the cell's
    fold order (largest test subjects first), cut into packs of up to ``size`` folds (0: a group in one pack).
    Whether a model can pack at all is the caller's check (:func:`epir.pack.check_packable`)."""
    groups: dict[str, list[str]] = {}
    for s in cell.subjects:
        if s not in done:
            groups.setdefault(json.dumps([cell.fold_model(s), cell.fold_recipe(s)], sort_keys=True), []).append(s)
    return [subjects[k:k + (size or len(subjects))] for subjects in groups.values()
            for k in range(0, len(subjects), size or len(subjects))]


def pooled_scores(cell: Cell, folds: dict, best_test_epoch: bool = False) -> dict | None:
    """UF1 / UAR / accuracy / confusion from the predictions pooled over the cell's folds, overall and per
    source dataset when there is more than one (EPIR Table 1 scores SAMM, CASME II, SMIC as subsets).

    Args:
        best_test_epoch: score the folds' best-test-epoch predictions instead of the honest ones (they
            PEEK at each fold's test subject); None when a fold has none (folds logged before they existed).
    """
    fs = [folds[s] for s in cell.subjects]
    if best_test_epoch and not all(f.best_test_epoch for f in fs):
        return None
    yt = np.concatenate([f.y_true for f in fs]).astype(int)
    yp = np.concatenate([f.best_test_epoch.y_pred if best_test_epoch else f.y_pred for f in fs]).astype(int)
    groups = np.concatenate([f.groups for f in fs])
    return score(yt, yp, len(cell.classes), groups if len(set(groups.tolist())) > 1 else None)


def member_scores(cell: Cell, folds: dict) -> list[dict] | None:
    """Pooled scores of each ensemble member alone (a single model per seed), or None without an ensemble."""
    fs = [folds[s] for s in cell.subjects]
    if not all(f.member_y_pred for f in fs):
        return None
    return [pooled_scores(cell, {f.subject: dataclasses.replace(f, y_pred=f.member_y_pred[m]) for f in fs})
            for m in range(len(fs[0].member_y_pred))]
