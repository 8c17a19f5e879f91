"""The model interface and the one registry: every registered model builds, trains a step and gets a cell id; a
model that misses a piece is refused before Ray starts with a line naming it; a user's model file reaches Ray's
workers and runs through the demo grid beside EPIR's baseline, paired; dataset formats come from one list."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from epir.presets import PRESETS, build_model, make_config
from epir.registry import FAMILIES, UNIMPLEMENTED, ModelInterfaceError, check_model
from epir.train import TrainRecipe, train_fold
from grid.cells import build_cells
from grid.config import GridConfig

from .conftest import REPO, disconnect_ray, run_grid_cli

EXAMPLE = REPO / "examples" / "tiny_cnn.py"
BAD_MODEL = '''
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from epir.registry import register_model


@dataclass(frozen=True)
class NoConventionConfig:  # no input_convention: the data path could not know which channels it reads
    family: ClassVar[str] = "noconvention"
    img_size: int = 28
    num_classes: int = 3
    contrastive: bool = False
    alpha: float = 0.4


@register_model("noconvention", config=NoConventionConfig)
class NoConvention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.fc = config, nn.Linear(3 * 28 * 28, config.num_classes)

    def forward(self, x, return_features=False):
        return self.fc(x.flatten(1))
'''


def test_every_registered_model_builds_trains_a_step_and_gets_a_cell_id():
    from .test_cells import _data

    rng = np.random.default_rng(0)
    flows, labels, subjects = rng.random((12, 28, 28, 3), dtype=np.float32), np.arange(12) % 3, np.repeat(list("abc"), 4)
    small = {"epir": dict(dim=8, dim_head=4, depth=3, integration_blocks=1),  # the ladder at a tiny width
             "htnet": dict(dim=6, heads=3, repeats_top=1)}  # 140 M parameters at its published size
    for name, preset in PRESETS.items():
        config = make_config(name, **small.get(preset.family, {}))
        check_model(config, build_model(config))
        r = train_fold(flows, labels, subjects, "b", config, TrainRecipe(epochs=1, batch_size=8, device="cpu"))
        assert r.probs.shape == (4, 3) and len(r.curve) == 1, name
        data = _data()
        for d in data.values():  # HTNet reads facial regions: the landmarks of the apex, kept with the shards
            d.landmarks = np.full((len(d.labels), 5, 2), 14.0, np.float32)
        (cell,) = build_cells(GridConfig(presets=[name]), data, "paper")
        assert re.fullmatch(r"[0-9a-f]{12}", cell.cell_id), name
    assert {"epir", "ststnet", "htnet", "rcna"} <= set(FAMILIES) and "mfdan" in UNIMPLEMENTED
    epir = PRESETS["epir"].figure("CDE", "full")
    assert (epir.uf1, epir.uar, epir.peeks) == (0.8852, 0.8944, None)  # EPIR published no code: unknown
    assert PRESETS["htnet"].figure("CDE", "full").peeks is True  # its main_HTNet.py keeps each fold's best test epoch


def test_a_model_that_misses_a_piece_is_named_before_ray_starts(tmp_path):
    bad = tmp_path / "no_convention.py"
    bad.write_text(BAD_MODEL)
    res = run_grid_cli(["--model-file", str(bad), "--presets", "noconvention,baseline", "--profile", "demo"], tmp_path)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert "noconvention" in errors[0] and "lacks `input_convention`" in errors[0] and "Ray:" not in res.stdout
    with pytest.raises(ModelInterfaceError, match="return_features"):  # a forward that ignores the features
        class NoFeatures(build_model(make_config("ststnet")).__class__):
            def forward(self, x, return_features=False):
                return super().forward(x)

        check_model(make_config("ststnet"), NoFeatures(make_config("ststnet")))


def test_ray_ships_a_model_file_to_its_workers(tmp_path, ray_head):
    """The grid's workers import a user's model file from what Ray shipped them (``py_modules``), not from the
    driver's disk: on a real cluster the two do not share one."""
    import ray

    from preprocess.runtime import init_ray

    src = tmp_path / "shipped_net.py"
    src.write_text(EXAMPLE.read_text().replace('"tinycnn"', '"shippednet"'))
    disconnect_ray()
    try:
        init_ray(py_modules=[str(src)])

        @ray.remote(num_cpus=0)
        def where() -> tuple[str, list[str]]:
            import shipped_net

            from epir.registry import PRESETS as registered
            return shipped_net.__file__, sorted(registered)

        path, names = ray.get(where.remote())
    finally:
        disconnect_ray()
    assert "shippednet" in names and path != str(src) and open(path).read() == src.read_text()


def test_a_users_model_file_runs_in_the_demo_grid_beside_baseline_paired(demo_seeded):
    tmp_path = demo_seeded
    args = ["--model-file", str(EXAMPLE), "--presets", "tinycnn,baseline", "--profile", "demo", "--folds", "3",
            "--set", "epochs=2", "--final-model"]
    res = run_grid_cli(args, tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    res_dir = tmp_path / "results" / "epir-grid-demo"
    runs = pd.read_csv(res_dir / "runs.csv")
    assert sorted(runs["preset"]) == ["baseline", "tinycnn"]
    assert set(runs.loc[runs["preset"] == "tinycnn", "profile"]) == {"own recipe"}
    pairs = pd.read_csv(res_dir / "paired_comparisons.csv")
    mine = pairs[pairs["row"].str.startswith("tinycnn") & (pairs["vs"] == "baseline")]
    assert set(mine["metric"]) == {"UF1", "UAR"} and (mine["subjects"] == 3).all(), pairs.to_string()
    assert "tinycnn (own recipe) - baseline (demo) UF1" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("epir-grid-demo")
    cells = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("epir.kind") == "cell"]
    mine = [r for r in cells if r.data.tags["epir.preset"] == "tinycnn"]
    assert len(cells) == 2 and mine[0].data.params["model.family"] == "tinycnn" and "uf1" in mine[0].data.metrics
    # its final model, applied by predict to a new pair
    frames = tmp_path / "work_dirs" / "demo_data" / "frames" / "demo01" / "demo01_pos_01"
    pred = run_grid_cli(["predict", mine[0].data.tags["epir.model_uri"], "--model-file", str(EXAMPLE),
                         "--onset", str(frames / "onset.png"), "--apex", str(frames / "apex.png"),
                         "--out", str(tmp_path / "p.csv")], tmp_path)
    assert pred.returncode == 0, (pred.stdout + pred.stderr)[-3000:]
    got = pd.read_csv(tmp_path / "p.csv")
    assert got["status"][0] == "ok" and got["predicted"][0] in ("negative", "positive", "surprise")
    assert json.loads(json.dumps(got[["p_negative", "p_positive", "p_surprise"]].sum(axis=1).round(4).tolist())) == [1.0]


def test_dataset_formats_come_from_the_adapters_registry(tmp_path):
    from grid.cli import build_parser
    from grid.config import FORMATS, DatasetSpec
    from grid.tomlfile import load_config
    from preprocess.adapters import ADAPTERS

    assert FORMATS == tuple(ADAPTERS)
    assert f"formats: {', '.join(ADAPTERS)}" in build_parser().format_help()
    for fmt in ADAPTERS:  # the TOML check takes every adapter, and nothing else
        toml = tmp_path / f"{fmt}.toml"
        toml.write_text(f'[[datasets]]\nformat = "{fmt}"\nroot = "x"\n')
        assert load_config(toml)["datasets"][0].format == fmt
    with pytest.raises(ValueError, match="dataset format must be one of"):
        DatasetSpec("casme9", tmp_path)
