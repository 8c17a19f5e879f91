"""Cells without Ray: ids that survive a new field and change with a default, built from typed settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

import grid.cells as cells
import grid.config as config
from epir.presets import FAMILIES
from epir.train import TrainRecipe
from grid.cells import ID_REFERENCE, build_cells, cell_id
from grid.config import GridConfig
from grid.data import ProtocolData


def _data() -> dict[str, ProtocolData]:
    n = 12
    d = ProtocolData("toy/CDE", "toy", "CDE", "cfg-1", np.zeros((n, 28, 28, 3), np.float32), np.arange(n) % 3,
                     np.repeat(["a", "b", "c"], 4), np.array([f"x{i}" for i in range(n)]), np.array(["toy"] * n),
                     ["negative", "positive", "surprise"], "unit")
    return {d.key: d}


def _ids(**grid) -> list[str]:
    return [c.cell_id for c in build_cells(GridConfig(presets=["baseline", "epir"], **grid), _data(), "paper")]


def test_the_reference_table_names_every_field_of_every_family_and_the_recipe():
    for family, (cls, _) in FAMILIES.items():
        assert set(ID_REFERENCE[family]) == {f.name for f in dataclasses.fields(cls)}, family
    assert set(ID_REFERENCE["recipe"]) == {f.name for f in dataclasses.fields(TrainRecipe)}


def test_a_new_field_with_its_neutral_value_keeps_every_cell_id(monkeypatch):
    before = _ids()

    @dataclass(frozen=True)
    class WithNewField(TrainRecipe):
        new_switch: bool = False

    monkeypatch.setattr(config, "TrainRecipe", WithNewField)
    monkeypatch.setattr(config, "RECIPE_FIELDS", config.RECIPE_FIELDS | {"new_switch"})
    monkeypatch.setitem(ID_REFERENCE, "recipe", {**ID_REFERENCE["recipe"], "new_switch": False})
    assert _ids() == before  # the finished cells are found again
    assert _ids(overrides={"new_switch": True}) != before  # switched on, the cells are new


def test_a_changed_default_gives_new_cell_ids(monkeypatch):
    before = _ids()

    @dataclass(frozen=True)
    class NewDefault(TrainRecipe):
        lr: float = 1e-4  # the paper's 5e-5 changed

    monkeypatch.setattr(config, "TrainRecipe", NewDefault)
    after = _ids()
    assert all(a != b for a, b in zip(after, before))
    assert _ids(overrides={"lr": 5e-5}) == before  # the old value, asked for, is the old cell


def test_the_id_hashes_the_data_folds_seed_and_settings_but_not_the_dict_order():
    parts = dict(data="toy/CDE", shards="cfg-1", n=12, subjects=["a", "b"], demo=False,
                 model={"family": "epir", "dim": 64}, recipe={"seed": 0, "lr": 1e-3})
    same = dict(reversed(list(parts.items())))
    assert cell_id(parts) == cell_id(same)
    for k, v in (("subjects", ["a"]), ("shards", "cfg-2"), ("recipe", {"seed": 1, "lr": 1e-3}),
                 ("model", {"family": "epir", "dim": 32})):
        assert cell_id({**parts, k: v}) != cell_id(parts), k
    # a setting at its reference value is the same cell as the setting left out
    assert cell_id({**parts, "model": {"family": "epir", "dim": 64, "depth": 13}}) == cell_id(parts)
    assert cells.ID_VERSION >= 2
