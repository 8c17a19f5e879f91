"""Apply a logged model to new onset/apex pairs: the same face and flow stages as preprocessing (MTCNN,
Farneback, optical strain; in this process, no Ray), then the model's own input convention, then class
probabilities.

The model is an MLflow model that the grid logged (``--final-model``): a ``models:/`` or ``runs:/`` URI, or
a local folder holding its ``MLmodel``. It is loaded with ``mlflow.pytorch.load_model`` from its
``torch.export`` archive (no pickle runs), and its metadata (:func:`grid.logged_models.model_metadata`) says
the classes, the input convention and how its training flows were made.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from epir.inputs import InputConvention, convert, data_convention
from epir.presets import config_from_dict
from epir.train import to_tensor
from preprocess.shards import PreprocessConfig
from preprocess.stages import faces_and_flows

from .logged_models import flow_record
from .tracking import tracking_uri

REQUIRED = ["sample_id", "onset_path", "apex_path"]


def load(uri: str):
    """(model, metadata) of a logged model.

    Raises:
        mlflow.exceptions.MlflowException / OSError: the URI or folder holds no model.
        ValueError: the model carries no EPIR Grid metadata.
    """
    mlflow.set_tracking_uri(tracking_uri())
    info = mlflow.models.get_model_info(uri)
    meta = info.metadata or {}
    if "classes" not in meta or "input_convention" not in meta:
        raise ValueError(f"{uri} is not a model EPIR Grid logged (its MLmodel has no classes / input convention)")
    return mlflow.pytorch.load_model(uri), meta


def read_pairs(manifest: Path | None = None, onset: Path | None = None, apex: Path | None = None) -> pd.DataFrame:
    """The pairs to classify: one ``--onset``/``--apex`` pair, or a CSV with ``sample_id,onset_path,apex_path``
    (paths absolute or relative to the CSV; other columns are kept).

    Raises:
        ValueError: neither or both given, or the CSV lacks a column.
    """
    if (manifest is None) == (onset is None or apex is None):
        raise ValueError("give either --manifest CSV or both --onset and --apex")
    if manifest is None:
        return pd.DataFrame([{"sample_id": str(apex), "onset_path": str(Path(onset).absolute()),
                              "apex_path": str(Path(apex).absolute())}])
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{manifest} lacks column(s) {missing}; needs {','.join(REQUIRED)}")
    for c in ("onset_path", "apex_path"):
        df[c] = [str(p if Path(p).is_absolute() else Path(manifest).parent / p) for p in df[c]]
    return df


def flow_config(meta: dict, requested: str | None = None, allow_mismatch: bool = False) -> tuple[PreprocessConfig, str]:
    """The preprocessing that makes new pairs' flows as the model's training flows were made, and a line that
    says which.

    Args:
        meta: the model's metadata (its ``flow`` record, :func:`grid.logged_models.flow_record`, or for models logged
            before it, their ``preprocess``).
        requested: ``--flow``; None follows the model.
        allow_mismatch: ``--allow-flow-mismatch``: accept a ``--flow`` that contradicts the model's.

    Raises:
        ValueError: a requested flow that contradicts the model's, without ``allow_mismatch``.
    """
    pre = meta.get("preprocess") or {}
    rec = meta.get("flow") or flow_record(pre)
    algorithm = requested or rec["algorithm"]
    if algorithm != rec["algorithm"] and not allow_mismatch:
        raise ValueError(f"the model was trained on {rec['algorithm']} flows ({rec['source']}); --flow {algorithm} would "
                         "give it another input distribution: leave --flow out, or add --allow-flow-mismatch to insist")
    if rec["source"] == "published":  # the composite's flow images: TV-L1, min-max per image, working size unpublished
        cfg = PreprocessConfig(flow=algorithm)
        line = (f"flows: {algorithm}, min-max per image, at our working size {cfg.working_size} px (the model trained on "
                "the published MEGC2019 composite's TV-L1 flow images, whose working size and exact TV-L1 settings are "
                "not published: the algorithm and the normalisation match, not every detail)")
    else:
        cfg = PreprocessConfig(**{**(pre.get("config") or {}), "flow": algorithm})
        line = f"flows: {algorithm}, {cfg.normalize}, working size {cfg.working_size} px (as the model's training flows)"
    if algorithm != rec["algorithm"]:
        line += f"; NOT the model's {rec['algorithm']} (--allow-flow-mismatch)"
    return cfg, line


def flows_for(pairs: pd.DataFrame, cfg: PreprocessConfig, precropped: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """[u, v, strain] flows of the pairs through the preprocessing stages (face, flow), in this process.

    Args:
        pairs: :func:`read_pairs`'s table.
        cfg: the preprocessing configuration (:func:`flow_config`).
        precropped: the frames are tight face crops (the whole frame is the face).

    Returns:
        (flows (n_ok, H, W, 3) float32 of the accepted pairs, the pairs table with ``status``, ``reason``,
        ``detail`` columns).
    """
    batch = pairs.assign(subject=pairs.get("subject", "new"), precropped=precropped, onset_frame=None, apex_frame=None)
    return faces_and_flows(batch, cfg)


def probabilities(model, meta: dict, flows: np.ndarray) -> np.ndarray:
    """(N, C) class probabilities of flows (N, H, W, 3) ``[u, v, strain]`` in the model's training range,
    converted to the model's input convention."""
    conv = meta["input_convention"]
    dst = InputConvention(tuple(conv["channels"]), conv["value_range"], conv["scale"])
    x = convert(to_tensor(flows), data_convention(meta["flow_range"]), dst)
    with torch.no_grad():
        return model(x).softmax(-1).numpy()


def region_flows(flows: np.ndarray, pairs: pd.DataFrame, log=print) -> np.ndarray:
    """HTNet's input for new pairs, as the grid's for its training data: the landmarks of each apex face (the
    apex image cropped with the face stage's box, :class:`preprocess.landmarks.LandmarkFinder`), then
    :func:`epir.regions.tile_regions` of the flows around them.

    Args:
        flows: (n, 28, 28, 3) flows of the accepted pairs; pairs: those pairs, with ``apex_path`` and ``face_box``.

    Raises:
        FileNotFoundError: an apex image cannot be read.
    """
    from epir.regions import tile_regions
    from preprocess.landmarks import LandmarkFinder, read_bgr

    finder, points, found = LandmarkFinder(), [], 0
    for path, (x1, y1, x2, y2) in zip(pairs["apex_path"], pairs["face_box"]):
        p, ok = finder(read_bgr(path)[y1:y2, x1:x2])
        points.append(p)
        found += ok
    log(f"landmarks: MTCNN found the apex face's landmarks on {found} of {len(points)} pair(s) at 28 x 28 px; "
        "HTNet's fallback points stand in for the others")
    return tile_regions(flows, np.stack(points))


def run(uri: str, manifest: Path | None, onset: Path | None, apex: Path | None, out: Path | None,
        precropped: bool = False, log=print, flow: str | None = None, allow_flow_mismatch: bool = False) -> pd.DataFrame:
    """Classify new pairs with a logged model; write a CSV (``out``) or print one line per pair.

    Returns:
        The table: the pairs (a single ``--onset``/``--apex`` pair is named by its apex path), ``status``,
        ``reason`` and ``detail`` (what was wrong, e.g. both frame sizes or the missing path), ``predicted`` and
        ``p_<class>`` per class.

    Raises:
        ValueError: bad pairs, or a ``flow`` that contradicts the model's (:func:`flow_config`).
    """
    model, meta = load(uri)
    pairs = read_pairs(manifest, onset, apex)
    cfg, line = flow_config(meta, flow, allow_flow_mismatch)
    log(line)
    flows, table = flows_for(pairs, cfg, precropped)
    classes = meta["classes"]
    ok = (table["status"] == "ok").to_numpy()
    table["predicted"] = ""
    for c in classes:
        table[f"p_{c}"] = np.nan
    if ok.any():
        if getattr(config_from_dict(meta["model_config"]), "regions", False):  # HTNet: its facial-region tile
            flows = region_flows(flows, table[ok], log)
        probs = probabilities(model, meta, flows)
        table.loc[ok, "predicted"] = [classes[i] for i in probs.argmax(-1)]
        for j, c in enumerate(classes):
            table.loc[ok, f"p_{c}"] = probs[:, j].round(5)
    cols = [c for c in pairs.columns] + ["status", "reason", "detail", "predicted"] + [f"p_{c}" for c in classes]
    table = table[cols]
    if out:
        table.to_csv(out, index=False, float_format="%.5f")
        log(f"{int(ok.sum())} of {len(table)} pair(s) classified -> {out}")
    else:
        for r in table.to_dict("records"):
            probs = ", ".join(f"{c} {r[f'p_{c}']:.3f}" for c in classes) if r["status"] == "ok" else \
                f"{r['reason']}: {r['detail']}" if r["detail"] else r["reason"]
            log(f"{r['sample_id']}: {r['predicted'] or 'REJECTED'} ({probs})")
    return table
