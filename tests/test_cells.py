"""Cells without Ray: ids that survive a new field and change with a default, built from typed settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

import grid.config as config
import grid.ids as cell_ids
from epir.presets import FAMILIES, LADDER
from epir.train import TrainRecipe
from grid.cells import build_cells
from grid.config import GridConfig
from grid.data import ProtocolData
from grid.ids import ID_REFERENCE, cell_id


def _data() -> dict[str, ProtocolData]:
    n = 12
    d = ProtocolData("toy/CDE", "toy", "CDE", "cfg-1", np.zeros((n, 28, 28, 3), np.float32), np.arange(n) % 3,
                     np.repeat(["a", "b", "c"], 4), np.array([f"x{i}" for i in range(n)]), np.array(["toy"] * n),
                     ["negative", "positive", "surprise"], "unit")
    return {d.key: d}


def _ids(**grid) -> list[str]:
    return [c.cell_id for c in build_cells(GridConfig(presets=["baseline", "epir"], **grid), _data(), "paper")]


def test_the_reference_table_names_every_field_of_every_family_and_the_recipe():
    for family, fam in FAMILIES.items():  # a family registered without one hashes every field
        if fam.id_reference is not None:
            assert set(fam.id_reference) == {f.name for f in dataclasses.fields(fam.config)}, family
    assert {"epir", "ststnet"} <= {f for f, fam in FAMILIES.items() if fam.id_reference is not None}
    assert set(ID_REFERENCE["recipe"]) == {f.name for f in dataclasses.fields(TrainRecipe)}


def test_the_ladder_and_ststnet_keep_their_ids_through_the_registry():
    # the ids main gave these cells when the model registry came (commit 8413189): registering the ladder and
    # STSTNet through epir.registry must not move them (their reference values moved there verbatim)
    want = {"paper": {"baseline": "b7fc75b38323", "+dtsm": "1fbb94ad3e92", "+itals": "62aaeb423d86",
                      "+spt": "f7a1c23c7ab1", "+dnspt": "f6a06c279147", "epir": "92ec6cfd395c",
                      "ststnet": "3e9a29c5f671", "epir seed 1": "9fa35206e3de", "ststnet seed 1": "2fa7e651424c"},
            "cpu": {"baseline": "d36ab72d6719", "epir": "17ec3c912c42", "+dnspt": "799119574a55",
                    "ststnet": "3e9a29c5f671"}}
    for profile, ids in want.items():
        built = build_cells(GridConfig(presets=list(LADDER) + ["ststnet"], seeds=[0, 1]), _data(), profile)
        got = {c.preset + ("" if c.seed == 0 else f" seed {c.seed}"): c.cell_id for c in built}
        assert {k: got[k] for k in ids} == ids, profile


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
    assert cell_ids.ID_VERSION >= 2


def _varied(**change) -> ProtocolData:
    """The toy data with non-constant flows (a fingerprint must see every value), fields replaced by ``change``."""
    d = _data()["toy/CDE"]
    d = dataclasses.replace(d, flows=np.random.default_rng(0).random(d.flows.shape, dtype=np.float32))
    return dataclasses.replace(d, **change)


def test_the_id_covers_the_data_itself_but_not_the_order_of_its_samples():
    def ids(d: ProtocolData) -> list[str]:
        return [c.cell_id for c in build_cells(GridConfig(presets=["baseline", "epir"]), {d.key: d}, "paper")]

    base = _varied()
    one_value = base.flows.copy()
    one_value[5, 3, 4, 1] += 1e-3
    one_label = base.labels.copy()
    one_label[7] = (one_label[7] + 1) % 3
    for change in (dict(flows=one_value), dict(labels=one_label), dict(classes=["neg", "positive", "surprise"]),
                   dict(sample_ids=np.array([f"y{i}" for i in range(12)])), dict(flow_range="signed")):
        assert all(a != b for a, b in zip(ids(_varied(**change)), ids(base))), list(change)
    order = np.random.default_rng(1).permutation(12)  # shards written in another order: the same samples
    shuffled = _varied(flows=base.flows[order], labels=base.labels[order], subjects=base.subjects[order],
                       sample_ids=base.sample_ids[order], groups=base.groups[order])
    assert ids(shuffled) == ids(base) and shuffled.fingerprint == base.fingerprint


def test_each_cell_keeps_the_id_it_had_before_ids_covered_the_data():
    # the ids that main gave these cells under id version 2 (commit 34c6f2e): migrate-ids finds a store's
    # folds by them, so they must not move
    built = build_cells(GridConfig(presets=["baseline", "epir"], seeds=[0, 1]), _data(), "paper")
    assert [c.cell_id_v2 for c in built] == ['dfe4ae330890', '28adff0e3643', '7ab9f14bae57', '300ba4badcc7']
    assert all(c.cell_id != c.cell_id_v2 and c.data_fingerprint == _data()["toy/CDE"].fingerprint for c in built)
    assert all(c.tags()["epir.data_fingerprint"] == c.data_fingerprint for c in built)


def test_a_profile_chosen_on_the_cells_subjects_is_a_provenance_field_not_a_profile():
    import dataclasses

    from grid import schema
    from grid.cells import PROFILE_CHOSEN
    from grid.report import _label

    d = next(iter(_data().values()))
    composite = dataclasses.replace(d, key="megc2019/CDE", dataset="megc2019")
    smic = dataclasses.replace(d, key="megc2019-smic/SDE", dataset="megc2019-smic", protocol="SDE",
                               subset_of="megc2019/CDE")
    elsewhere = dataclasses.replace(d, key="lab/SDE", dataset="lab", protocol="SDE")
    cells = build_cells(GridConfig(presets=["epir"], profile="cpu"), {x.key: x for x in (composite, smic, elsewhere)}, "cpu")
    assert [c.profile for c in cells] == ["cpu"] * 3  # grouping and pairing read the profile: the same for all
    assert [c.provenance for c in cells] == [PROFILE_CHOSEN, PROFILE_CHOSEN, ""]
    assert cells[0].tags()[schema.PROVENANCE] == PROFILE_CHOSEN and schema.PROVENANCE not in cells[2].tags()
    row = dict(preset="epir", profile="cpu", provenance=PROFILE_CHOSEN, peeks_at_test=False, partial=False, demo=False)
    assert PROFILE_CHOSEN in _label(row) and _label({**row, "provenance": ""}) == "epir (ours, cpu)"
