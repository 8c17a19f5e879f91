"""Stores made before cell ids covered the data (id version 3, docs/grid.md "Cell ids cover the data"): the fold
runs a cell no longer reuses, and the one-off re-tagging of a version-2 store (``grid/run_all.py migrate-ids``)."""

from __future__ import annotations

from . import schema
from .tracking import TAG_CELL, TAG_CELL_V2, TAG_DATA, TAG_KIND, search_runs


def folds_elsewhere(client, exp_id: str, cell) -> tuple[dict[str, int], int]:
    """Finished fold runs that this cell does not reuse although a grid before id version 3 would have: those
    of the same settings trained on other data (tag ``epir.cell_id_v2`` equal, ``epir.data_fingerprint``
    different), and those of a store from before version 3, tagged with this cell's version-2 id as their
    cell id (their data unknown; ``grid/run_all.py migrate-ids`` re-tags them when it is this data).

    Returns:
        (``{other fingerprint: number of fold runs}``, number of version-2 fold runs).
    """
    fold = f"tags.`{TAG_KIND}` = 'fold' and attributes.status = 'FINISHED'"
    other: dict[str, int] = {}
    for r in search_runs(client, exp_id, f"{fold} and tags.`{TAG_CELL_V2}` = '{cell.cell_id_v2}'"):
        fp = r.data.tags.get(TAG_DATA, "")
        if fp != cell.data_fingerprint:
            other[fp or "none"] = other.get(fp or "none", 0) + 1
    v2 = [r for r in search_runs(client, exp_id, f"{fold} and tags.`{TAG_CELL}` = '{cell.cell_id_v2}'")
          if TAG_DATA not in r.data.tags]
    return other, len(v2)


def migrate_v2(client, exp_id: str, cell) -> int:
    """Re-tag the runs of a store made before id version 3 as this cell's (the one-off step of docs/grid.md):
    every run (parent, folds, final model) tagged with the cell's version-2 id as its cell id and carrying no
    data fingerprint gets the cell's id, setting id, data fingerprint and version-2 id. It ASSUMES that those
    runs were trained on the very data this cell was built from: nothing in a version-2 store can tell.

    Returns:
        the number of runs re-tagged.
    """
    runs = [r for r in search_runs(client, exp_id, f"tags.`{TAG_CELL}` = '{cell.cell_id_v2}'")
            if TAG_DATA not in r.data.tags]
    for r in runs:
        for k, v in {TAG_CELL: cell.cell_id, schema.SETTING: cell.setting_id, TAG_DATA: cell.data_fingerprint,
                     TAG_CELL_V2: cell.cell_id_v2}.items():
            client.set_tag(r.info.run_id, k, v)
    return len(runs)


