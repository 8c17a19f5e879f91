"""The preprocessing stages: decode onset and apex, find the face (MTCNN) and crop both with its box, then
the optical flow (Farneback or TV-L1), optical strain and resize, into the shard schema
(:mod:`preprocess.shards`). Ray Data runs them as actors (:mod:`preprocess.pipeline`); :func:`faces_and_flows`
runs them in this process on a table of new pairs (``grid/run_all.py predict``).
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

from .frames import (
    FARNEBACK_PARAMS,
    TVL1_PARAMS,
    FlowConfig,
    SampleError,
    crop_grey,
    face_box_from_detections,
    flow_features,
    read_frame,
)
from .megc2019 import FLOW_IMAGE_SCALE, read_flow_image
from .runtime import package_versions
from .shards import FLOW_CHANNELS, PIPELINE_VERSION, PreprocessConfig, check_files, missing_reason, to_table


class FaceStage:
    """Ray Data actor: decode onset and apex, find the face on the onset frame, crop both with the same box.

    Input batch (pandas): the adapter's columns. Output: the same plus ``onset_face``, ``apex_face``
    ((working_size, working_size) uint8 grey; zeros for a rejected sample), ``face_box``
    (x1, y1, x2, y2), ``face_source`` (``mtcnn``, ``mtcnn_padded`` when the face was only found on the
    padded frame, or ``precropped``), ``px_scale`` (working-size pixels per source pixel), ``status``
    (``ok`` / ``rejected``), ``reason``, ``detail``.
    """

    def __init__(self, cfg: dict, device: str = "cpu"):
        import torch  # deferred: in the actor's process, which alone runs the face model
        from facenet_pytorch import MTCNN  # its weights ship inside the wheel

        torch.set_num_threads(1)  # one core per actor: the pool scales by actors
        cv2.setNumThreads(1)
        self.cfg = PreprocessConfig(**cfg)
        self.mtcnn = MTCNN(keep_all=True, device=device)

    @staticmethod
    def _read(path: str, frame_no) -> np.ndarray:
        try:
            return read_frame(path)
        except SampleError as e:
            if e.reason == "missing_frame":
                raise SampleError(*missing_reason(path, frame_no)) from e
            raise

    def _one(self, r) -> dict:
        size = self.cfg.working_size
        onset = self._read(r["onset_path"], r.get("onset_frame"))
        apex = self._read(r["apex_path"], r.get("apex_frame"))
        if onset.shape != apex.shape:
            raise SampleError("size_mismatch", f"onset {onset.shape[1]}x{onset.shape[0]} px ({r['onset_path']}) vs apex "
                                               f"{apex.shape[1]}x{apex.shape[0]} px ({r['apex_path']})")
        h, w = onset.shape[:2]
        if bool(r.get("precropped")):
            box, source = (0, 0, w, h), "precropped"
        else:
            box, source = self.face_box(onset)
        side = max(box[2] - box[0], box[3] - box[1])
        return dict(onset_face=crop_grey(onset, box, size), apex_face=crop_grey(apex, box, size),
                    face_box=np.asarray(box, dtype=np.int32), face_source=source, px_scale=np.float32(size / side),
                    status="ok", reason="", detail="")

    def _detect(self, img: np.ndarray):
        from PIL import Image  # deferred: with the face model, in the actor

        boxes, probs = self.mtcnn.detect(Image.fromarray(img))
        return None if boxes is None else boxes[np.asarray(probs, dtype=float) >= self.cfg.min_face_prob]

    def face_box(self, onset: np.ndarray) -> tuple[tuple[int, int, int, int], str]:
        """The face box (x1, y1, x2, y2) of an RGB onset frame and how it was found: on the frame
        (``mtcnn``) or, failing that, on the frame padded by ``face_pad`` of its size with its edges
        repeated (``mtcnn_padded``; the box is moved back and clipped to the frame).

        Raises:
            SampleError("no_face"): no face either way.
        """
        h, w = onset.shape[:2]
        boxes = self._detect(onset)
        if boxes is not None and len(boxes):
            return face_box_from_detections(boxes, (h, w), self.cfg.face_margin), "mtcnn"
        if self.cfg.face_pad > 0:
            py, px = int(round(self.cfg.face_pad * h)), int(round(self.cfg.face_pad * w))
            boxes = self._detect(cv2.copyMakeBorder(onset, py, py, px, px, cv2.BORDER_REPLICATE))
            if boxes is not None and len(boxes):
                boxes = boxes - np.array([px, py, px, py], dtype=float)
                return face_box_from_detections(boxes, (h, w), self.cfg.face_margin), "mtcnn_padded"
        raise SampleError("no_face", "MTCNN found no face in the onset frame"
                          + (f", nor with {self.cfg.face_pad:g} of its size padded around it" if self.cfg.face_pad else ""))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        size = self.cfg.working_size
        out = []
        for r in batch.to_dict("records"):
            try:
                out.append(self._one(r))
            except SampleError as e:
                out.append(dict(onset_face=np.zeros((size, size), np.uint8), apex_face=np.zeros((size, size), np.uint8),
                                face_box=np.zeros(4, np.int32), face_source="", px_scale=np.float32(0),
                                status="rejected", reason=e.reason, detail=e.detail))
        res = pd.DataFrame(out, index=batch.index)
        return pd.concat([batch, res], axis=1)


NO_FLOW = dict(flow=None, shape=None, flow_min=None, flow_max=None)


def flow_row(r: dict, flow_cfg: FlowConfig) -> dict:
    """One faced sample's flow fields (``flow`` flattened, ``shape``, ``flow_min``, ``flow_max``); none when rejected."""
    if r["status"] != "ok":
        return NO_FLOW
    flow, lo, hi = flow_features(np.asarray(r["onset_face"]), np.asarray(r["apex_face"]), flow_cfg)
    return dict(flow=flow.ravel(), shape=list(flow.shape), flow_min=lo, flow_max=hi)


def shard_meta(cfg: dict, precomputed: bool) -> dict:
    """The shards' Parquet metadata: the configuration (the flow algorithm with TV-L1's parameters), versions."""
    flow = {"algorithm": "tvl1 (published)", "normalization": "minmax per image"} if precomputed else \
        {"algorithm": cfg.get("flow", "farneback"), "normalization": cfg.get("normalize"),
         "parameters": TVL1_PARAMS if cfg.get("flow") == "tvl1" else list(FARNEBACK_PARAMS),
         "working_size": cfg.get("working_size")}
    return {"config": cfg, "precomputed": precomputed, "pipeline_version": PIPELINE_VERSION, "flow": flow,
            "flow_channels": FLOW_CHANNELS, "versions": package_versions()}


def flow_stage(batch: pd.DataFrame, cfg: dict) -> pa.Table:
    """Grey faces -> [u, v, strain] (output_size^2 x 3) float32 in the shard schema; drops the face images."""
    cv2.setNumThreads(1)
    c = PreprocessConfig(**cfg)
    rows = [flow_row(r, c.flow_config) for r in batch.to_dict("records")]
    return to_table(batch, rows, shard_meta(cfg, False))


class FlowStage:
    """Ray Data actor running :func:`flow_stage` (or ``fn``, same signature). Actors, not tasks: a task
    pool kept starting fresh worker processes (importing OpenCV, pandas, pyarrow), which on a small
    machine took the CPU from the face actors (2-worker/1-worker ratio 0.69 instead of 1.70)."""

    def __init__(self, cfg: dict, fn=None):
        self.cfg, self.fn = cfg, fn or flow_stage

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        return self.fn(batch, self.cfg)


def precomputed_stage(batch: pd.DataFrame, cfg: dict) -> pa.Table:
    """Ray Data task for MEGC2019 flow images: decode each PNG as [u, v, strain] in 0..1.

    ``flow_min`` / ``flow_max`` record the publishers' scale: 0 and 255 pixel values (the flows
    themselves were min-max scaled per image before publication; their physical units are lost).
    """
    rows, status, reason, detail = [], [], [], []
    for r in batch.to_dict("records"):
        try:
            f = read_flow_image(r["flow_path"])
            rows.append(dict(flow=f.ravel(), shape=list(f.shape), flow_min=np.zeros(3, np.float32),
                             flow_max=np.full(3, FLOW_IMAGE_SCALE, np.float32)))
            status.append("ok"), reason.append(""), detail.append("")
        except (OSError, ValueError) as e:
            rows.append(NO_FLOW)
            status.append("rejected"), reason.append("unreadable_flow_image" if os.path.exists(r["flow_path"]) else "missing_frame")
            detail.append(str(e))
    batch = batch.assign(status=status, reason=reason, detail=detail, face_source="precomputed")
    return to_table(batch, rows, shard_meta(cfg, True))


def faces_and_flows(pairs: pd.DataFrame, cfg: PreprocessConfig) -> tuple[np.ndarray, pd.DataFrame]:
    """The face and flow stages on a table of pairs, in this process (no Ray): what ``predict`` runs on new
    onset/apex pairs, exactly as preprocessing runs it.

    Args:
        pairs: columns ``sample_id``, ``onset_path``, ``apex_path``, ``subject``, ``precropped`` (and the
            optional frame columns, None).
        cfg: the preprocessing configuration the model's training flows were made with.

    Returns:
        (flows (n_ok, H, W, 3) float32 ``[u, v, strain]`` of the accepted pairs, in order; the pairs with
        ``status``, ``reason`` and ``detail``: what was wrong with a rejected pair, e.g. both frame sizes or
        the missing path; and ``face_box`` (x1, y1, x2, y2) in source pixels, where the face stage ran).
    """
    ok, absent = check_files(pairs, precomputed=False)
    out = pairs.assign(status="rejected", reason="", detail="")
    for r in absent.itertuples(index=False):
        m = out["sample_id"] == r.sample_id
        out.loc[m, ["reason", "detail"]] = [r.reason, r.detail]
    flows = np.zeros((0, cfg.output_size, cfg.output_size, 3), np.float32)
    if len(ok):
        faced = FaceStage(dataclasses.asdict(cfg))(ok)
        rows = [flow_row(r, cfg.flow_config) for r in faced.to_dict("records")]
        good = [r["flow"] for r in rows if r["flow"] is not None]
        if good:
            flows = np.stack([np.asarray(r["flow"], np.float32).reshape(r["shape"]) for r in rows if r["flow"] is not None])
        for sid, status, reason, detail in zip(faced["sample_id"], faced["status"], faced["reason"], faced["detail"]):
            out.loc[out["sample_id"] == sid, ["status", "reason", "detail"]] = [status, reason, detail]
        boxes = {sid: tuple(int(v) for v in b) for sid, b in zip(faced["sample_id"], faced["face_box"])}
        out["face_box"] = [boxes.get(sid) for sid in out["sample_id"]]
    return flows, out
