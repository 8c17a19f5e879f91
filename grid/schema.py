"""The MLflow tags the grid writes and reads, in one place: each name once, and what a cell's tags decode to.

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
