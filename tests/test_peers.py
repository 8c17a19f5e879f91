"""Peer models: STSTNet's published weights load unchanged and meet our data in the convention they were
built for; the published figures come out of our whole data path; a peer preset runs through the grid."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from epir.inputs import InputConvention, convert, data_convention
from epir.peers import STSTNET_INPUT, STSTNet, STSTNetConfig
from epir.presets import PRESETS, build_model, config_from_dict, config_to_dict, make_config
from epir.train import TrainRecipe, fit, to_model_input, to_tensor, train_fold

from .conftest import REPO, SHARED_DATA, run_grid_cli

WEIGHTS = SHARED_DATA / "ststnet_weights"
# christy1206/STSTNet main.py: every parameter and buffer name of a saved state dict, with its shape
REFERENCE_STATE = {
    "conv1.weight": (3, 3, 3, 3), "conv1.bias": (3,), "conv2.weight": (5, 3, 3, 3), "conv2.bias": (5,),
    "conv3.weight": (8, 3, 3, 3), "conv3.bias": (8,), "fc.weight": (3, 400), "fc.bias": (3,),
    **{f"bn{i}.{k}": (c,) for i, c in ((1, 3), (2, 5), (3, 8)) for k in ("weight", "bias", "running_mean", "running_var")},
    **{f"bn{i}.num_batches_tracked": () for i in (1, 2, 3)},
}


def test_ststnet_has_the_reference_state_dict_and_loads_one_unchanged():
    model = STSTNet()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == REFERENCE_STATE
    torch.manual_seed(1)
    saved = {k: torch.randn(s) if s else torch.tensor(7) for k, s in REFERENCE_STATE.items()}
    saved.update({f"bn{i}.running_var": torch.rand(c) + 0.5 for i, c in ((1, 3), (2, 5), (3, 8))})
    model.load_state_dict(saved)  # strict: same names, same shapes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    logits, feats = model.eval()(torch.rand(2, 3, 28, 28) * 255, return_features=True)
    assert logits.shape == (2, 3) and feats.shape == (2, 400)
    assert sum(p.numel() for p in model.parameters()) == 1683
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(2, 28, 28, 3))


def test_presets_name_their_family_and_a_peer_its_own_recipe():
    p = PRESETS["ststnet"]
    assert p.family == "ststnet" and not p.profiled and (p.figure().uf1, p.figure().uar, p.figure().peeks) == (0.7209, 0.7250, False)
    r = TrainRecipe(**p.recipe)  # the published recipe is a valid recipe
    assert (r.epochs, r.batch_size, r.lr, r.sample_order, r.hflip) == (800, 256, 5e-5, "by_label", False)
    cfg = make_config("ststnet", num_classes=5)
    assert isinstance(cfg, STSTNetConfig) and config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(make_config("epir"))["family"] == "epir"
    with pytest.raises(TypeError):
        make_config("ststnet", depth=3)  # an EPIR field does not exist for STSTNet
    with pytest.raises(KeyError, match="family"):
        config_from_dict({"family": "resnet"})


def test_the_data_path_converts_to_the_models_declared_convention():
    flows = np.random.default_rng(0).random((2, 28, 28, 3), dtype=np.float32)  # [u, v, strain] in 0..1
    x = to_model_input(flows, make_config("ststnet"), "unit")
    u, v, strain = (torch.from_numpy(flows[..., i]) for i in range(3))
    assert torch.allclose(x[:, 0], strain * 255) and torch.allclose(x[:, 1], v * 255) and torch.allclose(x[:, 2], u * 255)
    assert torch.equal(to_model_input(flows, make_config("epir"), "unit"), to_tensor(flows))  # EPIR: as stored
    two = convert(to_tensor(flows), data_convention("unit"), InputConvention(("u", "v")))  # a u, v-only model
    assert torch.equal(two, to_tensor(flows)[:, :2])
    with pytest.raises(ValueError, match="unit flows but the data holds signed"):
        to_model_input(flows, make_config("ststnet"), "signed")  # no silent min-max scaling
    with pytest.raises(ValueError, match="channels"):
        InputConvention(("u", "w"))


def test_a_wrong_channel_order_changes_what_a_model_sees():
    """A model that only reads the strain channel answers from strain when the input is converted, and
    from u when it is not: the conversion is what makes published weights see what they were trained on."""
    model = STSTNet(STSTNetConfig(dropout=0.0)).eval()
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, STSTNET_INPUT.channels.index("strain"), 1, 1] = 1.0  # identity on strain
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[1] = 1.0  # class 1 grows with the strain
    flows = np.zeros((2, 28, 28, 3), np.float32)
    flows[0, ..., 2] = 1.0  # sample 0: strain everywhere, no u
    flows[1, ..., 0] = 1.0  # sample 1: u everywhere, no strain
    logits = model(to_model_input(flows, model.config, "unit"))
    assert logits[0, 1] > 100 and logits[1, 1] == 0
    unconverted = model(to_tensor(flows) * 255)  # as stored: the model reads u where it expects strain
    assert unconverted[0, 1] == 0 and unconverted[1, 1] > 100


def test_by_label_order_feeds_the_classes_in_turn_every_epoch():
    """STSTNet's main.py does not shuffle and reads its samples class by class (one folder per label)."""
    labels = np.array([2, 0, 1] * 4)
    cfg = make_config("ststnet")
    tagged = np.random.default_rng(0).random((12, 28, 28, 3), dtype=np.float32)
    tagged[:, 0, 0, 2] = np.arange(12) / 100  # strain pixel (0, 0) names the sample
    recipe = TrainRecipe(epochs=2, batch_size=4, lr=1e-3, device="cpu", sample_order="by_label")
    orders = []
    orig = STSTNet.forward

    def spy(self, x, return_features=False):
        if self.training:
            orders.append((x[:, 0, 0, 0] / 255 * 100).round().long().tolist())
        return orig(self, x, return_features)

    STSTNet.forward = spy
    try:
        fit(cfg, recipe, tagged, labels)
    finally:
        STSTNet.forward = orig
    first = sum(orders[:3], [])
    assert first == sorted(range(12), key=lambda i: (labels[i], i)) and sum(orders[3:], []) == first


@pytest.fixture(scope="module")
def ststnet_weights(composite_root):
    if not (WEIGHTS / "s03.pth").is_file():
        pytest.skip(f"STSTNet's published weights absent: {WEIGHTS}/s03.pth not found")
    return WEIGHTS


def test_published_weights_give_the_published_figures_through_our_data_path(ststnet_weights, tmp_path):
    """benchmarks/published_weights.py: preprocess shards -> LOSO folds -> our metrics = 0.7209 / 0.7250."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "published_weights.py"), "--weights", str(ststnet_weights),
           "--work-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ})  # the shared Ray (conftest)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Full    (442 samples): UF1 0.7209  UAR 0.7250" in out.stdout, out.stdout
    wrong = subprocess.run([*cmd, "--wrong-order"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**__import__("os").environ})  # the shared Ray (conftest)
    full = [ln for ln in wrong.stdout.splitlines() if ln.strip().startswith("Full")]
    assert wrong.returncode == 0 and full and float(full[0].split("UF1")[1].split()[0]) < 0.5, wrong.stdout


def test_a_published_fold_matches_the_reference_reading_of_the_images(ststnet_weights, composite_root):
    """The reference reads the PNGs with cv2.imread (BGR, 0..255); our path reads them with PIL as
    [u, v, strain] / 255 and converts. Both give the same logits for the published model of s03."""
    import cv2

    from preprocess.megc2019 import load_composite

    df, flows = load_composite(composite_root)
    test = (df["subject"] == "s03").to_numpy()
    cfg = make_config("ststnet")
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(ststnet_weights / "s03.pth", map_location="cpu", weights_only=True))
    ref = torch.from_numpy(np.stack([cv2.imread(p).astype(np.float32) for p in df["flow_path"][test]])).permute(0, 3, 1, 2)
    with torch.no_grad():
        ours, theirs = model(to_model_input(flows[test], cfg, "unit")), model(ref)
    assert torch.allclose(ours, theirs, atol=1e-3)


def test_a_peer_trains_through_train_fold_and_the_grid_demo(demo_seeded):
    tmp_path = demo_seeded
    flows = np.random.default_rng(0).random((24, 28, 28, 3), dtype=np.float32)
    labels, subjects = np.arange(24) % 3, np.repeat(["a", "b", "c", "d"], 6)
    r = train_fold(flows, labels, subjects, "b", make_config("ststnet"),
                   TrainRecipe(epochs=2, batch_size=8, device="cpu", sample_order="by_label"))
    assert r.probs.shape == (6, 3) and len(r.curve) == 2
    with pytest.raises(ValueError, match="input statistics"):
        fit(make_config("ststnet"), TrainRecipe(epochs=1, standardize=True), flows, labels)
    res = run_grid_cli(["--presets", "ststnet,epir", "--folds", "2", "--set", "epochs=3", "--seeds", "0,1"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "SDE demo ststnet seed 1" in out and "SDE demo epir seed 0" in out
    table = (tmp_path / "results" / "epir-grid-demo" / "table2_3_sde.md").read_text()
    assert "ststnet (ours, published)" in table and "epir (ours, demo)" in table and "0,1" in table
    runs = __import__("pandas").read_csv(tmp_path / "results" / "epir-grid-demo" / "runs.csv")
    assert sorted(zip(runs["preset"], runs["seed"])) == [("epir", 0), ("epir", 1), ("ststnet", 0), ("ststnet", 1)]
    assert set(runs.loc[runs["preset"] == "ststnet", "epochs"].astype(int)) == {3}  # --set reaches a peer too


def test_htnet_regions_are_cut_as_the_reference_cuts_them():
    from epir.regions import tile_regions

    flows = np.arange(2 * 28 * 28 * 3, dtype=np.float32).reshape(2, 28, 28, 3)
    # the reference's fixed points, clipped to 7..21 and truncated: (9, 11) (21, 10) (15, 17) (10, 21) (20, 21)
    points = np.array([[9.53, 11.06], [21.4, 10.92], [15.38, 17.38], [10.26, 22.12], [20.58, 22.26]], np.float32)
    tiles = tile_regions(flows, np.stack([points, points + 100]))  # the second: every point clipped to 21
    f = flows[0]
    # x indexes the ROWS (main_HTNet.py), blocks [[0, 1], [3, 4]], the nose (2) unused
    np.testing.assert_array_equal(tiles[0, :14, :14], f[2:16, 4:18])
    np.testing.assert_array_equal(tiles[0, :14, 14:], f[14:28, 3:17])
    np.testing.assert_array_equal(tiles[0, 14:, :14], f[3:17, 14:28])
    np.testing.assert_array_equal(tiles[0, 14:, 14:], f[13:27, 14:28])
    assert (tiles[1] == np.tile(flows[1][14:28, 14:28], (2, 2, 1))).all()
    with pytest.raises(ValueError, match="landmarks"):
        tile_regions(flows, points[None])


def test_every_peer_is_logged_as_an_mlflow_model_and_predict_applies_it(tmp_path, monkeypatch):
    """Each peer family (tiny where it is large), trained a step, logged as the grid logs a final model and loaded
    back by predict, gives the same probabilities; HTNet's through its region tile, which predict cuts too."""
    from epir.regions import tile_regions
    from grid import logged_models, predict, tracking
    from grid.cells import build_cells
    from grid.config import GridConfig
    from grid.data import ProtocolData
    from grid.trainable import save_weights
    from preprocess.landmarks import FALLBACK_LANDMARKS

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rng = np.random.default_rng(0)
    n = 12
    d = ProtocolData("toy/CDE", "toy", "CDE", "c1", rng.random((n, 28, 28, 3), dtype=np.float32), np.arange(n) % 3,
                     np.repeat(list("abc"), 4), np.array([f"x{i}" for i in range(n)]), np.array(["toy"] * n),
                     ["negative", "positive", "surprise"], "unit",
                     landmarks=np.repeat(FALLBACK_LANDMARKS[None], n, axis=0) + rng.normal(0, 2, (n, 5, 2)))
    client, exp_id = tracking.setup("peers")
    tiny = {"htnet": dict(dim=6, heads=3, repeats_top=1)}
    for name in ("offapexnet", "sssnet", "rcn-a", "htnet"):
        cfg = GridConfig(presets=[name], overrides=tiny.get(name, {}), seeds=[0])
        cell, = build_cells(cfg, {d.key: d}, "paper")
        config = config_from_dict(cell.model)
        r = train_fold(d.model_flows(config), d.labels, d.subjects, "a", config,
                       TrainRecipe(**{**cell.recipe, "epochs": 1, "device": "cpu"}), keep_models=True)
        save_weights(r.models[0], tmp_path / f"{name}.pt")
        parent = tracking.parent_run(client, exp_id, cell)
        uri = logged_models.log_final_model(client, exp_id, parent, cell, {"path": str(tmp_path / f"{name}.pt"),
                                                                      "curve": r.curve, "samples": n})
        model, meta = predict.load(uri)
        flows = d.model_flows(config)[:4]
        want = r.models[0].eval()(to_model_input(flows, config, "unit")).softmax(-1).detach().numpy()
        np.testing.assert_allclose(predict.probabilities(model, meta, flows), want, atol=1e-5, err_msg=name)
    # predict cuts HTNet's tile from a new pair's apex face (here a blank image: MTCNN finds none, the fallback)
    import cv2

    cv2.imwrite(str(tmp_path / "apex.png"), np.full((64, 64, 3), 128, np.uint8))
    lines = []
    tiled = predict.region_flows(d.flows[:1], {"apex_path": [str(tmp_path / "apex.png")], "face_box": [(0, 0, 64, 64)]},
                                 lines.append)
    assert "on 0 of 1 pair(s)" in lines[0] and np.array_equal(tiled, tile_regions(d.flows[:1], FALLBACK_LANDMARKS[None]))
