"""TV-L1 flows beside Farneback: an option of the shards that keeps the old shards' names, and a model that
remembers its flow so that `predict` computes the same kind on new pairs."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from grid import logged_models, tracking
from grid.cells import Cell
from grid.config import DatasetSpec
from preprocess.pipeline import PIPELINE_VERSION, PreprocessConfig


def test_the_default_flow_keeps_the_configuration_id_of_earlier_shards():
    cfg = PreprocessConfig()
    earlier = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "flow"}  # the fields before flow existed
    old_id = hashlib.sha1(json.dumps({**earlier, "v": PIPELINE_VERSION}, sort_keys=True).encode()).hexdigest()[:10]
    assert cfg.config_id() == old_id and PreprocessConfig(flow="tvl1").config_id() != old_id
    with pytest.raises(ValueError, match="flow"):
        PreprocessConfig(flow="horn-schunck")
    with pytest.raises(ValueError, match="flow must be one of"):
        DatasetSpec("casme2", ".", options={"flow": "lucas-kanade"})  # refused before anything runs


def _tvl1_model(tmp_path, monkeypatch):
    """A (untrained) model logged as a final model of a cell whose shards hold TV-L1 flows."""
    from epir.presets import build_model, config_to_dict, make_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    config = make_config("baseline", dim=8, dim_head=4, depth=2)
    pre = PreprocessConfig(flow="tvl1")
    cell = Cell(cell_id="c1", name="SDE lab baseline", dataset="lab", protocol="SDE", preset="baseline", profile="demo",
                data_key="lab/SDE/tvl1", config_id=pre.config_id(), classes=["negative", "positive", "surprise"],
                model=config_to_dict(config), recipe={"seed": 0, "flow_range": "unit"},
                subjects=["s1", "s2"], all_subjects=2, preprocess={"config": dataclasses.asdict(pre), "precomputed": False}, flow="tvl1")
    torch.manual_seed(0)
    path = tmp_path / "final.pt"
    torch.save(build_model(config).state_dict(), path)
    client, exp_id = tracking.setup("tvl1")
    parent = tracking.parent_run(client, exp_id, cell)
    uri = logged_models.log_final_model(client, exp_id, parent, cell, {"path": str(path), "curve": [], "samples": 4})
    return uri


def test_a_model_trained_on_tvl1_flows_makes_predict_compute_tvl1(tmp_path, monkeypatch):
    from grid import predict
    from preprocess import frames
    from preprocess.demo import make_demo_dataset

    uri = _tvl1_model(tmp_path, monkeypatch)
    frames_dir = make_demo_dataset(tmp_path / "demo", subjects=1, samples_per_class=1).parent / "frames" / "demo01"
    pair = frames_dir / "demo01_pos_01"
    used, real = [], frames.optical_flow
    monkeypatch.setattr(frames, "optical_flow", lambda a, b, algorithm="farneback": used.append(algorithm) or real(a, b, algorithm))
    lines = []
    table = predict.run(uri, None, pair / "onset.png", pair / "apex.png", None, log=lines.append)
    assert used == ["tvl1"] and table["status"].tolist() == ["ok"]
    assert any(ln.startswith("flows: tvl1") for ln in lines), lines
    assert predict.flow_config({"flow": {"algorithm": "tvl1", "source": "published"}})[0].flow == "tvl1"
    with pytest.raises(ValueError, match="--allow-flow-mismatch"):
        predict.run(uri, None, pair / "onset.png", pair / "apex.png", None, log=lines.append, flow="farneback")
    used.clear()
    predict.run(uri, None, pair / "onset.png", pair / "apex.png", None, log=lines.append, flow="farneback",
                allow_flow_mismatch=True)
    assert used == ["farneback"] and "NOT the model's tvl1" in lines[-2]


def test_the_environment_holds_one_opencv_with_tv_l1():
    from importlib import metadata

    import cv2

    names = sorted({d.metadata["Name"].lower() for d in metadata.distributions() if "opencv" in d.metadata["Name"].lower()})
    assert names == ["opencv-contrib-python-headless"] and hasattr(cv2, "optflow")
    a = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    assert cv2.optflow.DualTVL1OpticalFlow_create().calc(a, np.roll(a, 1, axis=1), None).shape == (64, 64, 2)
