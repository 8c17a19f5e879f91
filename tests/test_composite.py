"""EPIR's CDE from raw frames: CASME II, SAMM and SMIC-HS releases (synthetic layouts of the real ones,
read by the real adapters) preprocessed by the real pipeline and pooled into ONE composite LOSO cell with
the MEGC2019 classes, subject ids kept distinct, each source dataset scored as a subset."""

from __future__ import annotations

import pytest

from grid.data import composite
from preprocess.demo import make_raw_layouts

from .conftest import run_grid_cli


def test_raw_casme2_samm_smic_make_one_cde_composite_cell(tmp_path):
    roots = make_raw_layouts(tmp_path / "raw", subjects=2, samples_per_class=1)
    args = [a for fmt, root in roots.items() for a in ("--dataset", f"{fmt}={root}:CDE")]
    res = run_grid_cli([*args, "--cde-composite", "--no-final-model", "--presets", "epir", "--profile", "demo", "--set", "epochs=3",
                        "--experiment", "raw-cde"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "casme2+samm+smic/CDE: the CDE composite of casme2/CDE, samm/CDE, smic/CDE: 18 samples, 6 subjects" in out, out[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raw-cde")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    cells = [r for r in runs if r.data.tags.get("epir.kind") == "cell"]
    assert len(cells) == 1 and cells[0].data.tags["epir.dataset"] == "casme2+samm+smic"
    m = cells[0].data.metrics
    assert {"uf1", "uf1_casme2", "uf1_samm", "uf1_smic"} <= set(m)  # each source scored as a subset of the run
    folds = sorted(r.data.tags["epir.fold"] for r in runs if r.data.tags.get("epir.kind") == "fold")
    assert folds == ["casme2_sub01", "casme2_sub02", "samm_101", "samm_102", "smic_s01", "smic_s02"]
    table = (tmp_path / "results" / "raw-cde" / "table1_cde.md").read_text()
    assert "casme2+samm+smic" in table


def test_a_composite_refuses_parts_that_do_not_pool():
    import numpy as np

    from grid.data import ProtocolData

    def part(name, protocol="CDE", shape=(2, 28, 28, 3), rng="unit"):
        return ProtocolData(f"{name}/{protocol}", name, protocol, "c", np.zeros(shape, np.float32), np.zeros(2, int),
                            np.array(["a", "b"]), np.array(["x", "y"]), np.array([name] * 2), ["n", "p", "s"], rng)

    c = composite([part("casme2"), part("samm")])
    assert c.subjects.tolist() == ["casme2_a", "casme2_b", "samm_a", "samm_b"] and c.groups.tolist()[2] == "samm"
    for bad in (part("smic", protocol="SDE"), part("smic", shape=(2, 32, 32, 3)), part("smic", rng="signed")):
        with pytest.raises(ValueError, match="cannot pool"):
            composite([part("casme2"), bad])
    with pytest.raises(ValueError, match="at least two"):
        composite([part("casme2")])
