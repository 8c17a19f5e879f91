"""Per-sample stages: decode onset/apex, find and crop the face, Farneback flow, optical strain.

Pure functions on numpy arrays (no Ray), used by the Ray Data pipeline in :mod:`preprocess.pipeline`
and testable on their own. EPIR pipeline steps 1-4 (Sec. 3, PAPER.md).

Face rule (documented choice): MTCNN (facenet-pytorch, Zhang et al. 2016) runs on the ONSET frame;
among the faces it finds, the largest box (by area) is kept; the box is widened by ``margin`` x its
width / height on every side, made square around its centre and clipped to the image; the SAME box
crops onset and apex, so the flow measures facial motion and not a moved crop. A pre-cropped release
(CASME II ``Cropped/``; ``--precropped`` for a manifest) holds tight face crops on which MTCNN finds no
face for lack of context: there the whole frame is the face box and MTCNN is not run.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from . import FLOW_ALGORITHMS
from .shards import FlowConfig

# Farneback parameters used across MER code (PAPER.md): pyr_scale, levels, winsize, iterations,
# poly_n, poly_sigma, flags.
FARNEBACK_PARAMS = (0.5, 3, 15, 3, 5, 1.2, 0)
# TV-L1 (Zach, Pock & Bischof 2007; Wedel et al. 2009) as OpenCV's contrib module implements it
# (cv2.optflow.DualTVL1OpticalFlow), at OpenCV's defaults, set explicitly so that they are recorded: time
# step tau, data weight lambda, tightness theta, pyramid scales, warps per scale, stopping epsilon, inner
# and outer iterations, pyramid scale step, illumination weight gamma, median filter size. The MEGC2019
# composite's published flows were made with TV-L1; their own parameters and working size are not published.
TVL1_PARAMS = {"tau": 0.25, "lambda": 0.15, "theta": 0.3, "scales": 5, "warps": 5, "epsilon": 0.01,
               "inner_iterations": 30, "outer_iterations": 10, "scale_step": 0.8, "gamma": 0.0, "median_filtering": 5}


class SampleError(Exception):
    """A sample cannot be processed; ``reason`` is a short stable key for the rejects table."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_frame(path: str) -> np.ndarray:
    """Decode one frame (bmp, jpg, png; grey or colour) as an RGB uint8 array (H, W, 3).

    Raises:
        SampleError("missing_frame"): the file does not exist.
        SampleError("unreadable_frame"): OpenCV cannot decode it.
    """
    if not os.path.isfile(path):
        raise SampleError("missing_frame", path)
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise SampleError("unreadable_frame", path)
    if img.dtype != np.uint8:  # 16-bit frames
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, int(img.max())))
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def face_box_from_detections(boxes, shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Largest detected face, widened by ``margin`` per side, squared, clipped: (x1, y1, x2, y2) pixels.

    Args:
        boxes: (F, 4) MTCNN boxes (x1, y1, x2, y2) in pixels, or None when no face was found.
        shape: (H, W) of the frame.
        margin: fraction of the box's width/height added on each side.

    Raises:
        SampleError("no_face"): no box.
    """
    if boxes is None or len(boxes) == 0:
        raise SampleError("no_face", "MTCNN found no face in the onset frame")
    boxes = np.asarray(boxes, dtype=np.float64)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    x1, y1, x2, y2 = boxes[int(np.argmax(areas))]
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = shape
    bx1, by1 = int(round(max(0, cx - side / 2))), int(round(max(0, cy - side / 2)))
    bx2, by2 = int(round(min(w, cx + side / 2))), int(round(min(h, cy + side / 2)))
    if bx2 - bx1 < 8 or by2 - by1 < 8:
        raise SampleError("no_face", f"face box too small after clipping: {(bx1, by1, bx2, by2)}")
    return bx1, by1, bx2, by2


def crop_grey(img: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop RGB (H, W, 3) to ``box`` and return the grey face resized to (size, size) uint8."""
    x1, y1, x2, y2 = box
    grey = cv2.cvtColor(img[y1:y2, x1:x2], cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)


def farneback_flow(onset: np.ndarray, apex: np.ndarray) -> np.ndarray:
    """Dense optical flow onset -> apex (Farneback 2003, EPIR eq. 1) with the MER parameters.

    Args:
        onset, apex: (H, W) uint8 grey faces of the same size.

    Returns:
        (H, W, 2) float32 in pixels: [..., 0] = u (+x, rightwards), [..., 1] = v (+y, downwards), with
        ``onset[y, x] ~ apex[y + v, x + u]`` (OpenCV's convention): what was at (x, y) at onset is at
        (x + u, y + v) at apex.
    """
    return cv2.calcOpticalFlowFarneback(onset, apex, None, *FARNEBACK_PARAMS)


def tvl1_flow(onset: np.ndarray, apex: np.ndarray) -> np.ndarray:
    """Dense optical flow onset -> apex by TV-L1 (OpenCV contrib ``DualTVL1OpticalFlow``, ``TVL1_PARAMS``).

    Args:
        onset, apex: (H, W) uint8 grey faces of the same size.

    Returns:
        (H, W, 2) float32 in pixels, the same convention as :func:`farneback_flow`.

    Raises:
        RuntimeError: OpenCV without its contrib modules (``opencv-contrib-python-headless`` provides them).
    """
    if not hasattr(cv2, "optflow"):
        raise RuntimeError("TV-L1 needs OpenCV's contrib modules: install opencv-contrib-python-headless "
                           "(it replaces opencv-python-headless)")
    p = TVL1_PARAMS
    t = cv2.optflow.DualTVL1OpticalFlow_create()
    t.setTau(p["tau"]), t.setLambda(p["lambda"]), t.setTheta(p["theta"]), t.setScalesNumber(p["scales"])
    t.setWarpingsNumber(p["warps"]), t.setEpsilon(p["epsilon"]), t.setInnerIterations(p["inner_iterations"])
    t.setOuterIterations(p["outer_iterations"]), t.setScaleStep(p["scale_step"]), t.setGamma(p["gamma"])
    t.setMedianFiltering(p["median_filtering"])
    return t.calc(onset, apex, None)


def optical_flow(onset: np.ndarray, apex: np.ndarray, algorithm: str = "farneback") -> np.ndarray:
    """Onset -> apex flow (H, W, 2) by ``farneback`` (:func:`farneback_flow`) or ``tvl1`` (:func:`tvl1_flow`).

    Raises:
        ValueError: for another algorithm.
    """
    if algorithm not in FLOW_ALGORITHMS:
        raise ValueError(f"flow algorithm must be one of {FLOW_ALGORITHMS}, got {algorithm!r}")
    return farneback_flow(onset, apex) if algorithm == "farneback" else tvl1_flow(onset, apex)


def optical_strain(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Optical strain magnitude, EPIR eq. (2): sqrt(u_x^2 + v_y^2 + 1/2 (u_y + v_x)^2).

    ``np.gradient`` returns d/drow (y) first, then d/dcol (x); the widespread MER snippet swaps them
    and uses 0.25 on the shear term (PAPER.md). Central differences, in 1/pixel units (dimensionless).

    Args:
        u, v: (H, W) horizontal and vertical flow.

    Returns:
        (H, W) float32 strain.
    """
    du_dy, du_dx = np.gradient(u)
    dv_dy, dv_dx = np.gradient(v)
    return np.sqrt(du_dx**2 + dv_dy**2 + 0.5 * (du_dy + dv_dx) ** 2).astype(np.float32)


def flow_features(onset_face: np.ndarray, apex_face: np.ndarray, cfg: FlowConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey faces (working_size^2) -> model input [u, v, strain] (output_size, output_size, 3) float32.

    Returns:
        (flow, ch_min, ch_max): the stored flow and the per-channel min and max (3,) of the
        un-normalised resized flow (with ``minmax`` the stored values are ``(x - min) / (max - min)``;
        a constant channel becomes 0).
    """
    f = optical_flow(onset_face, apex_face, cfg.flow)
    u, v = f[..., 0], f[..., 1]
    s = optical_strain(u, v)
    stack = np.stack([u, v, s], axis=-1)
    out = cv2.resize(stack, (cfg.output_size, cfg.output_size), interpolation=cv2.INTER_AREA).astype(np.float32)
    lo, hi = out.min(axis=(0, 1)), out.max(axis=(0, 1))
    if cfg.normalize == "minmax":
        span = np.where(hi > lo, hi - lo, 1.0)
        out = (out - lo) / span
    return out.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32)
