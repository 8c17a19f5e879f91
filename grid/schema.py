"""The MLflow names the grid writes and reads, in one place: each tag, param and metric name (or prefix) once, and
what a cell's tags, params and metrics decode to.

Writers (:meth:`grid.cells.Cell.tags`, :mod:`grid.tracking`, :mod:`grid.gpu_import`) and readers
(:func:`grid.report.collect`, the store queries of :mod:`grid.tracking`) use these names; a renamed tag is then one
edit here, not an empty column. Every value is a string in MLflow; :func:`decode_cell` says what a cell's
tags mean (``tests/test_schema.py`` writes a cell and a fold through the real writers into a temporary store and
reads every field back through :func:`decode_cell` and :func:`grid.report.collect`).
"""

from __future__ import annotations

# what a run is: cell, fold, final_model, search, search_trial
KIND = "epir.kind"
CELL = "epir.cell_id"  # the cell's id (id version 3), on the cell's parent run and its fold runs
CELL_V2 = "epir.cell_id_v2"  # the same cell's id under id version 2 (grid.cells.cell_id_v2)
FOLD = "epir.fold"  # a fold run's test subject
DATA = "epir.data_fingerprint"  # grid.data.data_fingerprint of the cell's data
SETTING = "epir.setting"  # the cell's id without the seed: its row of the tables
DATASET, PROTOCOL, PRESET, PROFILE = "epir.dataset", "epir.protocol", "epir.preset", "epir.profile"
SEED = "epir.seed"
SEARCH = "epir.search"  # the study whose per-group choices the cell's folds trained
EPOCH_SELECTION = "epir.epoch_selection"  # "last": the run's own metrics are the honest ones
PEEKS_AT_TEST = "epir.peeks_at_test"  # "false" on every cell: its best_test_epoch.* metrics peek, its own do not
DEMO = "epir.demo"  # "true" / "false"
FOLDS = "epir.folds"  # "<folds run>/<subjects of the dataset>"
FLOW = "epir.flow"  # the flow algorithm of the cell's data
GIT_COMMIT = "epir.git_commit"
VERSIONS = "epir.versions"  # JSON of the package versions that ran the cell
NODE, DEVICE = "epir.node", "epir.device"  # where a fold trained
MODEL_URI = "epir.model_uri"  # a logged model's models:/ URI
STUDY, OPTUNA_STORAGE = "epir.study", "epir.optuna_storage"  # a search's runs
INVALID = "epir.invalid"  # why a search trial's candidate could not train
PROVENANCE = "epir.provenance"  # a warning about where a cell's settings came from (grid.cells.Cell.provenance)
TEST_CELLS = "epir.test_cells"  # a search's honest test cells
RECORDS = "epir.records."  # + a key of a GPU run's records (benchmarks/gpu_ladder.py), on imported cells
PEEK = "best_test_epoch."  # prefix of every metric that peeks at the test subject

# params of a cell run (grid.cells.Cell.params) and of a fold run (its own settings, a search's choice)
MODEL, RECIPE, CHOICE = "model", "recipe", "choice"  # prefixes: model.<field>, recipe.<field>, choice.<key>
CLASSES = "classes"  # the class names in label order, comma-separated
SHARDS_CONFIG_ID, SUBJECTS_TOTAL = "shards_config_id", "subjects_total"
# metrics of a cell run beyond its pooled scores (uf1, uar, accuracy, and per source dataset)
UF1, UAR = "uf1", "uar"
WALL_SECONDS, TRAIN_SECONDS_SUM = "wall_seconds", "train_seconds_sum"  # first fold start to last end; their sum
PARAMS_M, MACS_M = "params_M", "macs_M"  # the model's parameters and MACs per sample, millions
MEMBERS = "members."  # + uf1_mean, uf1_sd, uf1_min, uf1_max (and uar_*): an ensemble's members scored alone
PAIRED = "paired."  # + <vs_kind>.<metric>_diff / _ci_low / _ci_high / _seeds_agree, and the tag paired.<vs_kind>


def flat_params(prefix: str, d: dict) -> dict:
    """``{k: v}`` -> ``{"prefix.k": str(v)}``, the form MLflow params take (``None`` as the text ``None``)."""
    return {f"{prefix}.{k}": ("None" if v is None else str(v)) for k, v in d.items()}


def param(prefix: str, field: str) -> str:
    """The param name of a model or recipe field (``recipe.lr``)."""
    return f"{prefix}.{field}"


def decode_cell_run(params: dict, metrics: dict) -> dict:
    """A cell run's params and metrics as the tables read them: ``family``, ``dim``, ``depth``, ``epochs``, ``lr``,
    ``batch_size``, ``hflip``, ``schedule``, ``standardize`` (text, as logged), ``ensemble`` (int),
    ``recipe_seed`` (int), ``wall_minutes``, ``train_minutes``, ``params_M``, ``macs_M``, ``members_uf1_mean``,
    ``members_uf1_sd``, ``members_uar_mean`` (float; NaN where absent)."""
    nan = float("nan")
    r = {k: params.get(param(RECIPE, k)) for k in ("epochs", "lr", "batch_size", "hflip")}
    return dict(wall_minutes=metrics.get(WALL_SECONDS, nan) / 60, train_minutes=metrics.get(TRAIN_SECONDS_SUM, nan) / 60,
                params_M=metrics.get(PARAMS_M), macs_M=metrics.get(MACS_M), family=params.get(param(MODEL, "family"), "epir"),
                dim=params.get(param(MODEL, "dim")), depth=params.get(param(MODEL, "depth")), **r,
                schedule=params.get(param(RECIPE, "schedule"), "constant"),
                standardize=params.get(param(RECIPE, "standardize"), "False"),
                ensemble=int(params.get(param(RECIPE, "ensemble"), 1)),
                members_uf1_mean=metrics.get(f"{MEMBERS}uf1_mean", nan), members_uf1_sd=metrics.get(f"{MEMBERS}uf1_sd", nan),
                members_uar_mean=metrics.get(f"{MEMBERS}uar_mean", nan),
                recipe_seed=int(params.get(param(RECIPE, "seed"), 0)))


def decode_cell(tags: dict) -> dict:
    """A cell's tags as typed values: ``dataset``, ``protocol``, ``preset``, ``profile``, ``epoch_selection``,
    ``setting``, ``commit``, ``data_fingerprint`` (str; ``setting`` falls back to the cell id, ``flow`` to
    ``farneback`` and ``commit`` to ``unknown`` for runs logged before they existed), ``peeks_at_test``, ``demo``
    (bool), ``folds``, ``subjects_total`` (int), ``partial`` (bool), ``seed`` (int or None when untagged), ``search``
    (str or None), ``provenance`` (str, empty for most cells).

    Raises:
        KeyError: a tag every cell carries is missing (not a cell's run).
    """
    folds, total = tags.get(FOLDS, "0/0").split("/")
    return dict(dataset=tags[DATASET], protocol=tags[PROTOCOL], preset=tags[PRESET], flow=tags.get(FLOW, "farneback"),
                profile=tags[PROFILE], epoch_selection=tags[EPOCH_SELECTION],
                peeks_at_test=tags.get(PEEKS_AT_TEST) == "true", demo=tags.get(DEMO) == "true",
                folds=int(folds), subjects_total=int(total), partial=int(folds) < int(total),
                seed=int(tags[SEED]) if SEED in tags else None, setting=tags.get(SETTING) or tags[CELL],
                cell_id=tags[CELL], commit=tags.get(GIT_COMMIT, "unknown"), data_fingerprint=tags.get(DATA, ""),
                search=tags.get(SEARCH), provenance=tags.get(PROVENANCE, ""))
