"""HTNet's facial-region input: four 14 x 14 blocks of the 28 x 28 flow, cut around five facial landmarks of the
APEX frame, tiled into one 28 x 28 image (Wang et al., "HTNet for micro-expression recognition", Neurocomputing
602, 2024; github wangzhifengharrison/HTNet ``main_HTNet.py`` ``whole_face_block_coordinates`` and
``crop_optical_flow_block``; read for facts, written anew).

The reference, step by step (followed where the published number depends on it):

1. the apex face crop is resized to 28 x 28 (``cv2.INTER_AREA``) and MTCNN (facenet-pytorch, margin 0,
   ``select_largest``) finds five landmarks on it, in MTCNN's order: left eye, right eye, nose, left and right
   mouth corner, each ``(x, y)`` in pixels; where it finds no face, fixed points stand in (:mod:`preprocess.landmarks`, which finds them);
2. every coordinate is clipped to 7..21 and truncated to an integer (:func:`clip_landmarks`);
3. block k is ``flow[l[k][0] - 7 : l[k][0] + 7, l[k][1] - 7 : l[k][1] + 7]``: the landmark's x indexes the
   ROWS (a slip: the blocks are cut around the transposed point; kept, since the published model learned
   on them);
4. the tile is ``[[block 0, block 1], [block 3, block 4]]`` (the reference names them left eye, left lips,
   right eye, right lips: in MTCNN's order they are both eyes, then both mouth corners). Block 2 (the nose)
   is cut and never used.
"""

from __future__ import annotations

import numpy as np

SIDE = 28  # the flow's side the reference cuts from
HALF = 7  # half a block's side
TILED = (0, 1, 3, 4)  # the blocks in the tile, row by row (block 2, the nose, is unused)


def clip_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(..., 5, 2) landmarks in pixels of the 28 x 28 apex -> int64, each coordinate clipped to 7..21, then
    truncated toward zero (``astype(int)``), as the reference does."""
    return np.clip(np.asarray(landmarks, dtype=np.float64), HALF, SIDE - HALF).astype(np.int64)


def tile_regions(flows: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """HTNet's input: for each sample, the blocks around its landmarks tiled as the reference does.

    Args:
        flows: (N, 28, 28, C) flows, any channel order and dtype.
        landmarks: (N, 5, 2) landmarks (x, y) in pixels of the 28 x 28 apex (clipped here as the reference does).

    Returns:
        (N, 28, 28, C), the same dtype: rows 0-13 hold blocks 0 and 1 side by side, rows 14-27 blocks 3 and 4.

    Raises:
        ValueError: flows not (N, 28, 28, C) or landmarks not (N, 5, 2).
    """
    flows, landmarks = np.asarray(flows), np.asarray(landmarks)
    if flows.ndim != 4 or flows.shape[1:3] != (SIDE, SIDE):
        raise ValueError(f"HTNet's regions are cut from (N, {SIDE}, {SIDE}, C) flows, got {flows.shape}")
    if landmarks.shape != (len(flows), 5, 2):
        raise ValueError(f"expected landmarks (N={len(flows)}, 5, 2), got {landmarks.shape}")
    pts = clip_landmarks(landmarks)
    out = np.empty_like(flows)
    for i, (f, p) in enumerate(zip(flows, pts)):
        blocks = [f[r - HALF : r + HALF, c - HALF : c + HALF] for r, c in p[list(TILED)]]  # x as the row (step 3)
        out[i] = np.concatenate([np.concatenate(blocks[:2], axis=1), np.concatenate(blocks[2:], axis=1)], axis=0)
    return out
