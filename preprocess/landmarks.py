"""Five facial landmarks of each sample's APEX frame at 28 x 28 px, as HTNet finds them (github
wangzhifengharrison/HTNet ``main_HTNet.py`` ``whole_face_block_coordinates``): the apex face crop read with
``cv2.imread`` (BGR, passed to MTCNN as it is), resized to 28 x 28 with ``cv2.INTER_AREA``, MTCNN (facenet-pytorch,
``margin=0, image_size=28, select_largest=True, post_process=False``) ``detect(..., landmarks=True)``; the largest
face's five points (left eye, right eye, nose, left and right mouth corner; (x, y) in pixels), or HTNet's fixed
fallback points where MTCNN finds no face (:data:`FALLBACK_LANDMARKS`; counted).

They are computed once, on the CPU, and kept with the shards (``landmarks.csv`` beside the manifest): a machine
that trains HTNet (the GPU machine) needs no face detector. ``epir.regions.tile_regions`` cuts HTNet's input
from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# main_HTNet.py's landmarks where MTCNN finds no face on the 28 x 28 apex: (x, y) of left eye, right eye, nose,
# left and right mouth corner
FALLBACK_LANDMARKS = np.array([[9.528073, 11.062551], [21.396168, 10.919773], [15.380184, 17.380562],
                               [10.255435, 22.121233], [20.583706, 22.25584]], dtype=np.float32)
LANDMARKS_FILE = "landmarks.csv"
SIDE = 28  # HTNet finds the landmarks on the apex resized to the flow's side
COLUMNS = ["subject", "sample_id", *[f"{a}{k}" for k in range(5) for a in ("x", "y")], "found", "apex_path"]


class LandmarkFinder:
    """MTCNN as HTNet configures it (weights ship inside facenet-pytorch's wheel; nothing is downloaded)."""

    def __init__(self, device: str = "cpu"):
        from facenet_pytorch import MTCNN

        self.mtcnn = MTCNN(margin=0, image_size=SIDE, select_largest=True, post_process=False, device=device)

    def __call__(self, face_bgr: np.ndarray) -> tuple[np.ndarray, bool]:
        """An apex face crop (H, W, 3) uint8 as ``cv2.imread`` gives it -> ((5, 2) float32 landmarks (x, y) in
        pixels of its 28 x 28 resize, True), or (the fallback points, False) where MTCNN finds no face."""
        import cv2

        small = cv2.resize(face_bgr, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        _, _, points = self.mtcnn.detect(small, landmarks=True)
        if points is None or len(points) == 0:
            return FALLBACK_LANDMARKS.copy(), False
        return np.asarray(points[0], dtype=np.float32), True


def read_bgr(path: str | Path) -> np.ndarray:
    """``cv2.imread`` of an image (H, W, 3) uint8 BGR.

    Raises:
        FileNotFoundError: the file is missing or not an image OpenCV reads.
    """
    import cv2

    img = cv2.imread(str(path))
    if img is None:
        raise FileNotFoundError(f"cannot read the apex image {path}")
    return img


def find_landmarks(samples: pd.DataFrame, progress=print) -> pd.DataFrame:
    """Landmarks of every sample's apex crop (``apex_path``): one row per sample, :data:`COLUMNS`.

    Raises:
        FileNotFoundError: an apex image cannot be read.
    """
    finder = LandmarkFinder()
    rows = []
    for r in samples.itertuples(index=False):
        points, found = finder(read_bgr(r.apex_path))
        rows.append({"subject": str(r.subject), "sample_id": str(r.sample_id),
                     **{f"{a}{k}": float(points[k, j]) for k in range(5) for j, a in enumerate(("x", "y"))},
                     "found": bool(found), "apex_path": str(r.apex_path)})
    out = pd.DataFrame(rows, columns=COLUMNS)
    progress(f"landmarks: MTCNN found a face on {int(out['found'].sum())} of {len(out)} apex crops at {SIDE} x {SIDE} px; "
             f"HTNet's fallback points stand in for {int((~out['found']).sum())}")
    return out


def write_landmarks(folder: Path, samples: pd.DataFrame, progress=print) -> Path:
    """``folder/landmarks.csv`` for the samples (reused when it holds the same samples and apex paths)."""
    path = Path(folder) / LANDMARKS_FILE
    want = samples[["subject", "sample_id", "apex_path"]].astype(str).reset_index(drop=True)
    if path.is_file():
        have = pd.read_csv(path, dtype={"subject": str, "sample_id": str, "apex_path": str})
        if have[["subject", "sample_id", "apex_path"]].equals(want):
            progress(f"landmarks: {len(have)} kept from an earlier run ({path})")
            return path
    find_landmarks(samples, progress).to_csv(path, index=False)
    return path


def read_landmarks(folder: Path) -> pd.DataFrame | None:
    """The landmarks kept with a shard folder (:data:`COLUMNS`), or None where none were computed."""
    path = Path(folder) / LANDMARKS_FILE
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"subject": str, "sample_id": str, "apex_path": str})


def landmark_array(table: pd.DataFrame) -> np.ndarray:
    """(N, 5, 2) float32 landmarks (x, y) of a :data:`COLUMNS` table, in its row order."""
    return table[[f"{a}{k}" for k in range(5) for a in ("x", "y")]].to_numpy(np.float32).reshape(-1, 5, 2)
