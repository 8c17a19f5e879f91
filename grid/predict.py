"""Apply a logged model to new onset/apex pairs: the same face and flow stages as preprocessing (MTCNN,
Farneback, optical strain; in this process, no Ray), then the model's own input convention, then class
probabilities.

The model is an MLflow model that the grid logged (``--final-model``): a ``models:/`` or ``runs:/`` URI, or
a local folder holding its ``MLmodel``. It is loaded with ``mlflow.pytorch.load_model`` from its
``torch.export`` archive (no pickle runs), and its metadata (:func:`grid.tracking.model_metadata`) says
the classes, the input convention and how its training flows were made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED = ["sample_id", "onset_path", "apex_path"]


def load(uri: str):
    """(model, metadata) of a logged model.

    Raises:
        mlflow.exceptions.MlflowException / OSError: the URI or folder holds no model.
        ValueError: the model carries no EPIR Grid metadata.
    """
    import mlflow

    from .tracking import tracking_uri

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


def flows_for(pairs: pd.DataFrame, preprocess: dict, precropped: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """[u, v, strain] flows of the pairs through the preprocessing stages (face, flow), in this process.

    Args:
        pairs: :func:`read_pairs`'s table.
        preprocess: the model's training preprocessing (``{"config": PreprocessConfig fields, "precomputed"}``);
            for a model trained on precomputed flow images, our default configuration.
        precropped: the frames are tight face crops (the whole frame is the face).

    Returns:
        (flows (n_ok, H, W, 3) float32 of the accepted pairs, the pairs table with ``status``, ``reason``,
        ``detail`` columns).
    """
    from preprocess.pipeline import FaceStage, PreprocessConfig, _flow_row, check_files

    cfg = PreprocessConfig() if preprocess.get("precomputed") else PreprocessConfig(**preprocess.get("config", {}))
    batch = pairs.assign(subject=pairs.get("subject", "new"), precropped=precropped, onset_frame=None, apex_frame=None)
    ok, absent = check_files(batch, precomputed=False)
    out = batch.assign(status="rejected", reason="", detail="")
    for r in absent.itertuples(index=False):
        m = out["sample_id"] == r.sample_id
        out.loc[m, ["reason", "detail"]] = [r.reason, r.detail]
    flows = np.zeros((0, cfg.output_size, cfg.output_size, 3), np.float32)
    if len(ok):
        faced = FaceStage(dataclasses.asdict(cfg))(ok)
        rows = [_flow_row(r, cfg.flow) for r in faced.to_dict("records")]
        good = [r["flow"] is not None for r in rows]
        flows = np.stack([np.asarray(r["flow"], np.float32).reshape(r["shape"]) for r in rows if r["flow"] is not None]) \
            if any(good) else flows
        for (sid, status, reason, detail) in zip(faced["sample_id"], faced["status"], faced["reason"], faced["detail"]):
            out.loc[out["sample_id"] == sid, ["status", "reason", "detail"]] = [status, reason, detail]
    return flows, out


def probabilities(model, meta: dict, flows: np.ndarray) -> np.ndarray:
    """(N, C) class probabilities of flows (N, H, W, 3) ``[u, v, strain]`` in the model's training range,
    converted to the model's input convention."""
    import torch

    from epir.inputs import InputConvention, convert, data_convention
    from epir.train import to_tensor

    conv = meta["input_convention"]
    dst = InputConvention(tuple(conv["channels"]), conv["value_range"], conv["scale"])
    x = convert(to_tensor(flows), data_convention(meta["flow_range"]), dst)
    with torch.no_grad():
        return model(x).softmax(-1).numpy()


def run(uri: str, manifest: Path | None, onset: Path | None, apex: Path | None, out: Path | None,
        precropped: bool = False, log=print) -> pd.DataFrame:
    """Classify new pairs with a logged model; write a CSV (``out``) or print one line per pair.

    Returns:
        The table: the pairs (a single ``--onset``/``--apex`` pair is named by its apex path), ``status``,
        ``reason`` and ``detail`` (what was wrong, e.g. both frame sizes or the missing path), ``predicted`` and
        ``p_<class>`` per class.
    """
    model, meta = load(uri)
    pairs = read_pairs(manifest, onset, apex)
    if meta.get("preprocess", {}).get("precomputed"):
        log("note: this model trained on published precomputed flow images (e.g. TV-L1); new pairs get our own "
            "Farneback flows, which differ from those: expect a domain shift")
    flows, table = flows_for(pairs, meta.get("preprocess", {}), precropped)
    classes = meta["classes"]
    ok = (table["status"] == "ok").to_numpy()
    table["predicted"] = ""
    for c in classes:
        table[f"p_{c}"] = np.nan
    if ok.any():
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
